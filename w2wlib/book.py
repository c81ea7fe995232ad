"""Running the book: notebooks executed with papermill, then HTML built by Jupyter Book.

``run_notebook`` executes one notebook with a profile's parameters (``w2w run``). ``build_book`` runs
every notebook listed in ``_toc.yml`` into a staging copy of the book, writes the status page, and
builds HTML from the executed copies with execution turned off (``w2w book``).

Parameters reach a notebook in three layers, later ones winning: the notebook's own ``parameters``
cell, the profile's ``notebooks:`` entry for it, and command-line ``-p KEY VALUE`` pairs. A ``-p`` key
that is not a parameter of the notebook but is a dotted profile setting (``-p device cuda``) is
passed through the notebook's ``overrides`` parameter instead.

Example:
    >>> from w2wlib.book import build_book
    >>> index = build_book("smoke")          # doctest: +SKIP
    >>> index.name
    'index.html'
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import NotebookError, ProfileError, W2WError
from .profile import Profile, load_profile

__all__ = ["toc_entries", "notebook_parameters", "run_notebook", "build_book", "NotebookRun"]

log = logging.getLogger(__name__)

#: Package versions listed on the status page.
_VERSIONED = ("w2wlib", "torch", "diffusers", "peft", "transformers", "accelerate", "safetensors",
              "papermill", "jupyter-book", "myst-nb", "ipywidgets", "cma", "numpy", "matplotlib")


@dataclass
class NotebookRun:
    """What happened to one notebook in a book build."""

    path: str  # relative to the project root, e.g. book/mini_world.ipynb
    seconds: float | None  # None when it was not executed in this build
    parameters: dict[str, Any]


def toc_entries(root: Path) -> list[Path]:
    """Every file listed in ``root/_toc.yml`` (root, chapters and sections, in reading order)."""
    toc_path = root / "_toc.yml"
    if not toc_path.is_file():
        raise W2WError(f"no _toc.yml in {root}; run w2w from the project root or set W2W_ROOT")
    toc = yaml.safe_load(toc_path.read_text())
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "file" in node:
                names.append(node["file"])
            elif "root" in node:
                names.append(node["root"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []) or []:
                    walk(child)

    walk(toc)
    paths = []
    for name in names:
        matches = [root / f"{name}{ext}" for ext in ("", ".ipynb", ".md") if (root / f"{name}{ext}").is_file()]
        if not matches:
            raise W2WError(f"_toc.yml lists {name!r} but no {name}.ipynb or {name}.md exists under {root}")
        paths.append(matches[0])
    return paths


def notebook_parameters(notebook: Path, profile: Profile, cli: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The papermill parameters for ``notebook`` under ``profile`` and command-line pairs ``cli``.

    Raises:
        ProfileError: a key is neither a parameter of the notebook nor a setting of the profile, or
            the profile sets a parameter the notebook does not declare.
    """
    import papermill

    declared = set(papermill.inspect_notebook(str(notebook)))
    for required in ("profile", "overrides"):
        if required not in declared:
            raise W2WError(f"{notebook.name}: its parameters cell must define {required!r} (every book notebook takes a profile)")
    params: dict[str, Any] = {"profile": profile.name, "overrides": {}}
    from_profile = profile.notebook_parameters(notebook.stem)
    unknown = set(from_profile) - declared
    if unknown:
        raise ProfileError(f"profile {profile.name!r} sets {sorted(unknown)} for {notebook.name}, which declares only {sorted(declared)}")
    params.update(from_profile)
    for key, value in (cli or {}).items():
        if key in declared and key not in ("profile", "overrides"):
            params[key] = value
        else:
            profile.get(key)  # raises ProfileError naming the valid keys
            params["overrides"][key] = value
    return params


def _kernel_env() -> None:
    """Make the notebook kernel the Python that runs w2w: ipykernel's spec launches ``python`` from PATH."""
    bindir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def run_notebook(notebook: Path, output: Path, profile: Profile, cli: Mapping[str, Any] | None = None,
                 *, progress: bool = True) -> NotebookRun:
    """Execute ``notebook`` into ``output`` with papermill under ``profile``.

    Raises:
        NotebookError: a cell raised; the message names the notebook, the cell and the error, and
            the executed copy is kept at ``output`` for inspection.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    notebook, output = Path(notebook).resolve(), Path(output).resolve()
    if not notebook.is_file():
        raise W2WError(f"notebook {notebook} does not exist")
    params = notebook_parameters(notebook, profile, cli)
    output.parent.mkdir(parents=True, exist_ok=True)
    _kernel_env()
    log.info("running %s under profile %s", notebook.name, profile.name)
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(notebook), str(output), parameters=params, kernel_name="python3",
                                   cwd=str(profile.root), progress_bar=progress, log_output=False)
    except PapermillExecutionError as exc:
        first_line = next((ln for ln in exc.source.splitlines() if ln.strip()), "")
        raise NotebookError(
            f"{notebook.name} failed in cell {_source_cell_number(output, exc.cell_index)} (counting all cells "
            f"from 1, the one starting {first_line!r}): {exc.ename}: {exc.evalue}\n"
            f"The executed copy, with the traceback, is kept at {output}"
        ) from None
    return NotebookRun(str(notebook.relative_to(profile.root)) if notebook.is_relative_to(profile.root) else str(notebook),
                       time.perf_counter() - start, params)


def _source_cell_number(executed: Path, cell_index: int) -> int:
    """The 1-based number, in the source notebook, of cell ``cell_index`` of papermill's executed copy,
    which has one extra cell (the injected parameters) after the ``parameters`` cell."""
    import nbformat

    cells = nbformat.read(executed, as_version=4).cells
    injected = next((i for i, c in enumerate(cells) if "injected-parameters" in c.metadata.get("tags", [])), None)
    return cell_index + (0 if injected is not None and cell_index > injected else 1)


def _versions() -> list[tuple[str, str]]:
    rows = [("python", platform.python_version())]
    for name in _VERSIONED:
        try:
            rows.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    return rows


def _status_page(profile: Profile, runs: list[NotebookRun]) -> str:
    lines = [
        "# Status", "",
        f"This page is written by `w2w book` when it builds the book. This build used the **{profile.name}** "
        f"profile ({profile.description}) on {platform.node() or 'an unnamed machine'} "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, device `{profile.device}`), "
        f"finished {time.strftime('%Y-%m-%d %H:%M %Z')}.", "",
        "## Execution times", "",
        "| notebook | executed in this build | seconds | parameters |", "|---|---|---:|---|",
    ]
    for run in runs:
        seconds = f"{run.seconds:.1f}" if run.seconds is not None else ""
        params = ", ".join(f"`{k}={v!r}`" for k, v in run.parameters.items()) or ""
        lines.append(f"| `{run.path}` | {'yes' if run.seconds is not None else 'no (earlier copy)'} | {seconds} | {params} |")
    total = sum(r.seconds or 0.0 for r in runs)
    lines += ["", f"Total execution time: {total:.1f} s.", "", "## Package versions", "",
              "| package | version |", "|---|---|"]
    lines += [f"| {name} | {version} |" for name, version in _versions()]
    return "\n".join(lines) + "\n"


def _jupyter_book(src: Path, out: Path) -> Path:
    """Build HTML from ``src`` with execution off and warnings as errors; returns ``out/html``."""
    jb = Path(sys.executable).parent / "jupyter-book"
    tmp = out / "jb"
    cmd = [str(jb if jb.exists() else "jupyter-book"), "build", str(src), "--path-output", str(tmp),
           "--builder", "html", "-W", "-n", "--keep-going"]
    log.info("building HTML: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
        warnings = [ln for ln in text.splitlines() if "WARNING" in ln or "ERROR" in ln]
        tail = "\n".join(warnings[-20:] or text.splitlines()[-30:])
        raise W2WError(f"jupyter-book build failed (warnings are errors):\n{tail}")
    html = out / "html"
    if html.exists():
        shutil.rmtree(html)
    shutil.move(str(tmp / "_build" / "html"), html)
    return html


def build_book(profile: str | Profile = "mini", *, only: list[str] | None = None,
               cli: Mapping[str, Any] | None = None, out: Path | None = None, progress: bool = True) -> Path:
    """Run the book's notebooks under ``profile`` and build its HTML. Returns the path of index.html.

    Args:
        only: notebook stems to execute; the others keep their executed copy from an earlier build
            (or appear without outputs if there is none).
        cli: ``-p`` pairs, applied to every executed notebook.
        out: the build folder (default ``<root>/_build``): ``src/`` holds the executed copies,
            ``html/`` the book.

    Raises:
        NotebookError: a notebook failed; nothing is built, and its executed copy is kept in ``out/src``.
    """
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    root = profile.root
    out = Path(out) if out else root / "_build"
    src = out / "src"
    entries = toc_entries(root)
    notebooks = [p for p in entries if p.suffix == ".ipynb"]
    stems = {p.stem for p in notebooks}
    for name in only or []:
        if name not in stems:
            raise W2WError(f"--only {name!r}: no such notebook in _toc.yml; choose from {sorted(stems)}")
    # Stage the book's sources: config, toc, every non-notebook file under book/ (pages, vendored JS).
    src.mkdir(parents=True, exist_ok=True)
    for name in ("_config.yml", "_toc.yml", "references.bib"):
        if name == "references.bib" and not (root / name).is_file():
            continue  # the bibliography is optional
        shutil.copy2(root / name, src / name)
    shutil.copytree(root / "book", src / "book", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints"))
    runs: list[NotebookRun] = []
    from tqdm.auto import tqdm

    for nb in tqdm(notebooks, desc=f"notebooks ({profile.name})", unit="nb", disable=not progress):
        target = src / nb.relative_to(root)
        if only and nb.stem not in only:
            if not target.exists():
                shutil.copy2(nb, target)
            runs.append(NotebookRun(str(nb.relative_to(root)), None, {}))
            continue
        runs.append(run_notebook(nb, target, profile, cli, progress=False))
    status = src / "book" / "status.md"
    status.write_text(_status_page(profile, runs))
    (out / "runs.json").write_text(json.dumps([r.__dict__ for r in runs], indent=1, default=str))
    return _jupyter_book(src, out) / "index.html"
