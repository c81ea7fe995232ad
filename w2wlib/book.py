"""Running the book: notebooks executed with papermill, then HTML built by Jupyter Book.

``run_notebook`` executes one notebook with a profile's parameters (``w2w run``). ``build_book`` runs
every notebook listed in ``_toc.yml`` into a staging copy of the book, writes the status page, and
builds HTML from the executed copies with execution turned off (``w2w book``).

Parameters reach a notebook in three layers, later ones winning: the notebook's own ``parameters``
cell, the profile's ``notebooks:`` entry for it, and command-line ``-p KEY VALUE`` pairs. A ``-p`` key
that is not a parameter of the notebook but is a dotted profile setting (``-p device cuda``) is
passed through the notebook's ``overrides`` parameter instead.

A chapter states the worlds it runs in (a profile's ``world`` setting) in its notebook metadata, which
travels with the file through papermill and Jupyter::

    "metadata": {"w2w": {"worlds": ["mini"], "reason": "it builds and inspects the mini world itself"}}

A notebook that states nothing runs in the mini world only. ``build_book`` skips a chapter that does not
run in the profile's world, prints one line saying why, lists it on the status page and puts the reason
at the top of its page; ``run_notebook`` refuses it with that line (:func:`check_chapter`, which a
notebook's first cell can call too, for plain papermill runs).

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
from .profile import DEFAULT_SETTINGS, WORLDS, Profile, list_profiles, load_profile

__all__ = ["toc_entries", "notebook_parameters", "run_notebook", "build_book", "NotebookRun", "chapter_worlds",
           "unsupported_reason", "check_chapter", "METADATA_KEY"]

log = logging.getLogger(__name__)

#: Package versions listed on the status page.
_VERSIONED = ("w2wlib", "torch", "diffusers", "peft", "transformers", "accelerate", "safetensors",
              "papermill", "jupyter-book", "myst-nb", "ipywidgets", "cma", "numpy", "matplotlib")


#: The notebook-metadata key under which a chapter states its worlds (``worlds``) and why not others (``reason``).
METADATA_KEY = "w2w"
_DEFAULT_WORLDS = (DEFAULT_SETTINGS["world"],)   # a chapter that states nothing was written for the mini world


@dataclass
class NotebookRun:
    """What happened to one notebook in a book build."""

    path: str  # relative to the project root, e.g. book/mini_world.ipynb
    seconds: float | None  # None when it was not executed in this build
    parameters: dict[str, Any]
    skipped: str | None = None  # why it was not run: it does not run in the profile's world


def chapter_worlds(notebook: str | os.PathLike) -> tuple[tuple[str, ...], str | None]:
    """The worlds a chapter runs in and the reason it gives for the others, from its notebook metadata.

    A notebook without ``metadata.w2w.worlds`` runs in the mini world only, with no reason given.

    Raises:
        W2WError: the metadata is malformed (not a list of known worlds, or a reason that is not one line).

    >>> chapter_worlds("book/mini_world.ipynb")          # doctest: +SKIP
    (('mini',), 'it builds and inspects the mini world itself')
    """
    path = Path(notebook)
    try:
        meta = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
    except (OSError, ValueError) as err:
        raise W2WError(f"cannot read the notebook {path} ({err})") from err
    info = meta.get(METADATA_KEY)
    if info is None:
        return _DEFAULT_WORLDS, None
    fix = (f'write e.g. "{METADATA_KEY}": {{"worlds": ["mini"], "reason": "one line"}} in its notebook metadata, '
           f"with worlds from {list(WORLDS)}")
    if not isinstance(info, dict) or set(info) - {"worlds", "reason"}:
        raise W2WError(f"{path.name}: notebook metadata {METADATA_KEY!r} must be a mapping with keys worlds and reason; {fix}")
    worlds, reason = info.get("worlds", list(_DEFAULT_WORLDS)), info.get("reason")
    if (not isinstance(worlds, list) or not worlds or any(w not in WORLDS for w in worlds)
            or len(set(worlds)) != len(worlds)):
        raise W2WError(f"{path.name}: notebook metadata {METADATA_KEY}.worlds is {worlds!r}; {fix}")
    if reason is not None and (not isinstance(reason, str) or not reason.strip() or "\n" in reason):
        raise W2WError(f"{path.name}: notebook metadata {METADATA_KEY}.reason must be one line of text; {fix}")
    return tuple(worlds), reason.strip().rstrip(".") if reason else None


def unsupported_reason(notebook: str | os.PathLike, profile: Profile) -> str | None:
    """None if the chapter runs in ``profile``'s world; else one line that says why it does not."""
    worlds, reason = chapter_worlds(notebook)
    world = profile.get("world")
    if world in worlds:
        return None
    name = Path(notebook).name
    why = reason or (f"it states no worlds (notebook metadata {METADATA_KEY}.worlds), so it runs in the "
                     f"{_DEFAULT_WORLDS[0]} world only")
    return f"{name} does not run in the {world} world (profile {profile.name!r}): {why}; it runs in: {', '.join(worlds)}"


def check_chapter(notebook: str | os.PathLike, profile: Profile) -> None:
    """Raise W2WError, in one line, if chapter ``notebook`` does not run in ``profile``'s world.

    ``notebook`` is a path, or a file stem of ``book/`` under the profile's root, so that a notebook's own
    first cell can guard a plain papermill run: ``check_chapter("mini_world", P)``.

    >>> check_chapter("mini_world", load_profile("sd15"))   # doctest: +SKIP
    Traceback (most recent call last):
    w2wlib.errors.W2WError: mini_world.ipynb does not run in the sd15 world (profile 'sd15'): ...
    """
    path = Path(notebook)
    if path.suffix != ".ipynb" and len(path.parts) == 1:
        path = profile.root / "book" / f"{path.name}.ipynb"
    reason = unsupported_reason(path, profile)
    if reason is None:
        return
    worlds = chapter_worlds(path)[0]
    others = []
    for name in list_profiles():
        try:
            if load_profile(name, root=profile.root).get("world") in worlds:
                others.append(name)
        except W2WError:
            continue
    raise W2WError(reason + (f" (use --profile {' or '.join(others)})" if others else ""))


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
    params: dict[str, Any] = {"profile": profile.reference, "overrides": {}}   # a YAML file's path, or a name
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
    check_chapter(notebook, profile)
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
        executed = "yes" if run.seconds is not None else "no (skipped, see below)" if run.skipped else "no (earlier copy)"
        lines.append(f"| `{run.path}` | {executed} | {seconds} | {params} |")
    total = sum(r.seconds or 0.0 for r in runs)
    lines += ["", f"Total execution time: {total:.1f} s."]
    skipped = [r for r in runs if r.skipped]
    if skipped:
        lines += ["", "## Chapters skipped", "",
                  f"These chapters do not run in the **{profile.get('world')}** world of this profile; their pages "
                  f"say so at the top.", "", "| notebook | why |", "|---|---|"]
        lines += [f"| `{r.path}` | {r.skipped.replace('|', '/')} |" for r in skipped]
    lines += ["", "## Package versions", "", "| package | version |", "|---|---|"]
    lines += [f"| {name} | {version} |" for name, version in _versions()]
    return "\n".join(lines) + "\n"


def _skipped_copy(notebook: Path, target: Path, reason: str) -> None:
    """The source notebook, unexecuted, with a note under its title that says why this build skipped it."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    note = nbformat.v4.new_markdown_cell(f"```{{note}}\nThis chapter was not run in this build: {reason}.\n```")
    first = nb.cells[0] if nb.cells else None
    titled = first is not None and first.cell_type == "markdown" and first.source.lstrip().startswith("# ")
    nb.cells.insert(1 if titled else 0, note)
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)


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
    skips = {nb: unsupported_reason(nb, profile) for nb in notebooks}   # every notebook's metadata read up front
    for nb in notebooks:
        if only and nb.stem in only and skips[nb]:
            raise W2WError(f"--only {nb.stem}: {skips[nb]}")
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
        if skips[nb]:
            tqdm.write(f"skipped {nb.relative_to(root)}: {skips[nb]}")
            _skipped_copy(nb, target, skips[nb])
            runs.append(NotebookRun(str(nb.relative_to(root)), None, {}, skipped=skips[nb]))
            continue
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
