"""Write a book notebook from a compact cell list (a developer tool; the notebooks are the source).

Cells are ("md", text) or ("code", text) or ("code", text, {"tags": [...], "caption": "..."}).
"""

from __future__ import annotations

import nbformat


def write_notebook(path: str, cells: list[tuple]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for cell in cells:
        kind, text = cell[0], cell[1].strip("\n")
        opts = cell[2] if len(cell) > 2 else {}
        if kind == "md":
            c = nbformat.v4.new_markdown_cell(text)
        else:
            c = nbformat.v4.new_code_cell(text)
            if opts.get("tags"):
                c.metadata["tags"] = list(opts["tags"])
            if opts.get("caption"):
                c.metadata["mystnb"] = {"figure": {"caption": opts["caption"], "name": opts.get("name", "")}}
        c["id"] = f"c{len(nb.cells):02d}"
        nb.cells.append(c)
    nbformat.validator.normalize(nb)
    nbformat.write(nb, path)
