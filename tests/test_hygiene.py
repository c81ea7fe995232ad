"""Rules that keep the suite honest, checked on the tests' own source with ``ast``.

- Every ``pytest.raises`` names its error and checks the message with ``match=``: a test that accepts
  any message also passes when the code fails for another reason.
- No ``pytest.importorskip`` of a package that pyproject.toml lists in ``[project] dependencies``: a
  hard dependency that is missing is a broken install, and must fail rather than skip silently.
"""

from __future__ import annotations

import ast
import re
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them: ``PyYAML`` is ``pyyaml``, ``jupyter_book`` ``jupyter-book``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def hard_dependencies(pyproject: Path = ROOT / "pyproject.toml") -> set[str]:
    """Normalised names of the ``[project] dependencies`` (version specifiers and markers dropped)."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return {_normalise(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", d).group(1)) for d in deps}


def _distributions(module: str) -> set[str]:
    """Normalised distributions that provide the import name ``module`` (``yaml`` -> ``pyyaml``)."""
    top = module.split(".")[0]
    return {_normalise(d) for d in packages_distributions().get(top, [])} | {_normalise(top)}


def _call_name(call: ast.Call) -> str | None:
    """``"raises"`` for ``pytest.raises(...)`` or a bare ``raises(...)``; likewise ``"importorskip"``."""
    f = call.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "pytest":
        return f.attr
    if isinstance(f, ast.Name) and f.id in ("raises", "importorskip"):
        return f.id
    return None


def violations(source: str, filename: str, deps: set[str]) -> list[str]:
    """``"file:line: what is wrong"`` for each ``raises`` without ``match=`` and each importorskip of a dependency."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        if name == "raises":
            match = next((k.value for k in node.keywords if k.arg == "match"), None)
            if match is None or (isinstance(match, ast.Constant) and match.value is None):
                out.append(f"{filename}:{node.lineno}: pytest.raises without match=: check a phrase of the message")
        elif name == "importorskip" and node.args and isinstance(node.args[0], ast.Constant):
            module = str(node.args[0].value)
            if _distributions(module) & deps:
                out.append(f"{filename}:{node.lineno}: importorskip({module!r}) of a dependency listed in "
                           f"pyproject.toml: import it")
    return sorted(out, key=lambda s: (s.split(":")[0], int(s.split(":")[1])))


def test_the_checker_finds_both_faults_and_passes_good_code():
    deps = hard_dependencies()
    assert {"torch", "diffusers", "peft", "pyyaml", "jupyter-book"} <= deps
    bad = ("import pytest\n"
           "yaml = pytest.importorskip('yaml')\n"
           "other = pytest.importorskip('some_optional_extra')\n"
           "def test_x():\n"
           "    with pytest.raises(ValueError):\n"
           "        int('x')\n"
           "    with pytest.raises(ValueError, match=None):\n"
           "        int('x')\n"
           "    with pytest.raises(ValueError, match='invalid literal'):\n"
           "        int('x')\n")
    assert violations(bad, "t.py", deps) == [
        "t.py:2: importorskip('yaml') of a dependency listed in pyproject.toml: import it",
        "t.py:5: pytest.raises without match=: check a phrase of the message",
        "t.py:7: pytest.raises without match=: check a phrase of the message",
    ]


def test_every_raises_checks_its_message_and_no_dependency_is_skipped():
    deps = hard_dependencies()
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        found += violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)), deps)
    assert not found, "\n".join(found)


def _assigned_names(source: str) -> list[str]:
    """Names assigned at the top level of a cell, in order (what a parameters cell declares)."""
    return [t.id for node in ast.parse(source).body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)]


def test_papermill_sees_every_parameter_each_notebook_declares():
    """papermill parses a parameters cell line by line: a comment holding '=' or a value spread over lines
    hides a parameter from ``papermill --help-notebook`` and from its ``-p`` type inference."""
    import nbformat
    import papermill

    for nb_path in sorted((ROOT / "book").glob("*.ipynb")):
        cells = [c for c in nbformat.read(nb_path, as_version=4).cells if "parameters" in c.metadata.get("tags", [])]
        assert len(cells) == 1, f"{nb_path.name} needs exactly one cell tagged 'parameters', has {len(cells)}"
        declared = _assigned_names(cells[0].source)
        assert declared and declared[0] == "profile", f"{nb_path.name}: the first parameter must be profile"
        seen = list(papermill.inspect_notebook(str(nb_path)))
        assert seen == declared, f"{nb_path.name}: papermill sees {seen}, the cell declares {declared}"


def test_the_parameter_check_catches_a_comment_with_an_equals_sign(tmp_path):
    import nbformat
    import papermill

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("profile = 'mini'\nsteps = 3   # x = 2 is too few\nlr = 0.1",
                                          metadata={"tags": ["parameters"]})]
    path = tmp_path / "t.ipynb"
    nbformat.write(nb, path)
    seen = list(papermill.inspect_notebook(str(path)))
    assert _assigned_names(nb.cells[0].source) == ["profile", "steps", "lr"] and seen != ["profile", "steps", "lr"]
