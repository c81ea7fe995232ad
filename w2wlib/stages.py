"""Resumable, cached build stages and the manifest of what they produced.

Both builders (``w2w world build`` and ``w2w dataset build``) run named stages into an output folder.
:class:`Stages` keeps the bookkeeping under ``<out>/_work/`` (never shipped): a stage is done when its
marker carries the key of the config it depends on, long stages checkpoint there atomically, and a
checkpoint from another config is ignored. :func:`write_manifest` then records every shipped file's
sha256 next to the build's command, seeds, configs, times and metrics; :func:`verify_folder` checks
the files against it (``w2w verify``, over every artifact folder :func:`artifact_folders` finds).

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> st = Stages(out, lambda stage: {"steps": 3})
    >>> st.done("train") is None
    True
    >>> st.finish("train", 1.5); st.done("train")["seconds"]
    1.5
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ._version import __version__
from .errors import ArtifactMissingError, W2WError

__all__ = ["Stages", "config_key", "sha256", "write_manifest", "verify_manifest", "verify_folder", "Verification",
           "artifact_folders", "write_text_atomic", "content_id", "sort_safetensors_header"]

log = logging.getLogger(__name__)


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it over ``path``: a kill never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def config_key(obj: Any) -> str:
    """A short stable hash of a JSON-able config."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class Stages:
    """Done-markers, checkpoints and timings for one build folder; ``depends(stage)`` gives a stage's config."""

    def __init__(self, out: Path, depends: Callable[[str], Any]):
        self.out, self.depends, self.work = Path(out), depends, Path(out) / "_work"
        self.work.mkdir(parents=True, exist_ok=True)

    def run(self, stages, body: Callable[[str], dict | None], *, is_main: bool = True,
            barrier: Callable[[], None] = lambda: None) -> dict[str, float]:
        """Run ``body(stage)`` for each stage not yet done (it may return extras for the marker); returns seconds.

        Under several processes every process runs ``body``; ``barrier`` waits for all of them and only the
        main process writes the marker.
        """
        seconds: dict[str, float] = {}
        for stage in stages:
            if (info := self.done(stage)) is not None:
                log.info("%s: cached (%.0f s when built)", stage, info["seconds"])
                seconds[stage] = info["seconds"]
                continue
            t0 = time.perf_counter()
            extra = body(stage) or {}
            barrier()
            seconds[stage] = time.perf_counter() - t0
            if is_main:
                self.finish(stage, seconds[stage], **extra)
            log.info("%s: done in %.0f s", stage, seconds[stage])
        return seconds

    def key(self, stage: str) -> str:
        return config_key(self.depends(stage))

    def done(self, stage: str) -> dict | None:
        """The stage's marker (with its build ``seconds``) if it was built from the current config."""
        marker = self.work / f"{stage}.done.json"
        if marker.is_file():
            info = json.loads(marker.read_text())
            if info.get("key") == self.key(stage):
                return info
        return None

    def finish(self, stage: str, seconds: float, **extra) -> None:
        info = {"key": self.key(stage), "seconds": round(seconds, 1), **extra}
        (self.work / f"{stage}.done.json").write_text(json.dumps(info, indent=1))
        (self.work / f"{stage}.ckpt.pt").unlink(missing_ok=True)

    def checkpointer(self, stage: str) -> Callable[[int, dict], None]:
        def save(step: int, state: dict) -> None:
            tmp = self.work / f"{stage}.ckpt.pt.tmp"
            torch.save({"key": self.key(stage), **state}, tmp)
            tmp.replace(self.work / f"{stage}.ckpt.pt")  # atomic: a kill never leaves half a checkpoint
            log.info("%s: checkpoint at step %d", stage, step)
        return save

    def resume(self, stage: str) -> dict | None:
        path = self.work / f"{stage}.ckpt.pt"
        if not path.is_file():
            return None
        state = torch.load(path, weights_only=True)
        if state.pop("key", None) != self.key(stage):
            log.warning("%s: ignoring a checkpoint from another config", stage)
            return None
        log.info("%s: resuming from step %d", stage, state["step"])
        return state


def portable_path(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies inside it, so manifests hold no machine's paths."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_manifest(out: Path, **fields: Any) -> dict:
    """Write ``<out>/manifest.json``: ``fields`` plus versions and every shipped file's sha256 and size.

    Shipped files are those under ``out`` outside ``_work/``, other than the manifest itself.
    """
    out = Path(out)
    files = sorted(p for p in out.rglob("*") if p.is_file() and "_work" not in p.relative_to(out).parts
                   and p.name != "manifest.json")
    manifest = {**fields, "w2wlib_version": __version__, "torch": torch.__version__,
                "python": sys.version.split()[0],
                "files": {str(p.relative_to(out)): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in files}}
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


@dataclass
class Verification:
    """What :func:`verify_folder` found in one artifact folder; ``str()`` gives it as one line."""

    folder: Path
    n_files: int                 # files the manifest lists
    differ: list[str]            # listed files whose sha256 is not the recorded one
    missing: list[str]           # listed files that are absent
    command: str | None          # the manifest's recorded command, which rebuilds the folder

    @property
    def ok(self) -> bool:
        return not (self.differ or self.missing)

    @property
    def bad(self) -> list[str]:
        """Every listed file that differs or is missing, sorted by name."""
        return sorted(self.differ + self.missing)

    def __str__(self) -> str:
        rebuild = f"rebuild with: {self.command}" if self.command else "the manifest records no command"
        if self.ok:
            return f"{self.folder}: OK, {self.n_files} file{'' if self.n_files == 1 else 's'} ({rebuild})"
        parts = [f"{len(names)} of {self.n_files} files {what} ({', '.join(names)})"
                 for names, what in ((self.differ, "differ"), (self.missing, "missing")) if names]
        return f"{self.folder}: {'; '.join(parts)}; {rebuild}"


def _need_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ArtifactMissingError(f"{folder} is not a folder: give an artifact folder (one with manifest.json), "
                                   "or a folder of them such as data/")


def _read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    _need_folder(folder)
    if not path.is_file():
        raise ArtifactMissingError(f"no manifest.json in {folder}: it is not a built artifact folder; build it with "
                                   "its `w2w ... build` command (data/README.md lists them)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise W2WError(f"{path} is not valid JSON ({exc}): restore it (`git checkout -- {path}`) "
                       "or rebuild the folder") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and "sha256" in v for v in files.values()):
        raise W2WError(f"{path} has no 'files' table of sha256s: it was not written by w2wlib's write_manifest; "
                       "restore it or rebuild the folder")
    return manifest


def verify_folder(folder: str | os.PathLike) -> Verification:
    """Check every file ``<folder>/manifest.json`` lists against its recorded sha256.

    Raises :class:`~w2wlib.ArtifactMissingError` when ``folder`` or its manifest is missing, and
    :class:`~w2wlib.W2WError` when the manifest is not valid JSON or lists no sha256s.

    Example:
        >>> print(verify_folder("data/next/world"))       # doctest: +SKIP
        data/next/world: OK, 13 files (rebuild with: w2w world build --config mini --out data/next/world --device cpu)
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    differ, missing = [], []
    for name, info in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            missing.append(name)
        elif sha256(path) != info["sha256"]:
            differ.append(name)
    return Verification(folder, len(manifest["files"]), differ, missing, manifest.get("command"))


def verify_manifest(out: str | os.PathLike) -> list[str]:
    """Files whose sha256 differs from the manifest, or that are missing (empty when intact): :func:`verify_folder`'s
    ``bad``."""
    return verify_folder(out).bad


def artifact_folders(path: str | os.PathLike, depth: int = 2) -> tuple[list[Path], list[Path]]:
    """The artifact folders (those with a ``manifest.json``) at or below ``path``, looking ``depth`` folder levels
    down (``_work`` and hidden folders are skipped), and the folders beside them that have none at or below.

    Example:
        >>> artifact_folders("data")                      # doctest: +SKIP
        ([PosixPath('data/next/dataset'), PosixPath('data/next/spaces'), PosixPath('data/next/world')], [])
    """
    path = Path(path)
    _need_folder(path)
    found: list[Path] = []
    without: list[Path] = []

    def walk(folder: Path, left: int) -> bool:           # True when an artifact lies at or below folder
        if (folder / "manifest.json").is_file():
            found.append(folder)
            return True
        if left == 0:
            return False
        subs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "_work" and not p.name.startswith("."))
        hits = {p: walk(p, left - 1) for p in subs}
        if not any(hits.values()):
            return False
        without.extend(p for p, hit in hits.items() if not hit)   # the topmost folders with nothing below
        return True

    if not walk(path, depth):
        raise ArtifactMissingError(f"no manifest.json in {path} or in its folders {depth} levels down: give an "
                                   "artifact folder (one with manifest.json) or a folder of them, such as data/")
    return found, without


def content_id(config_text: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 (first 32 hex digits) of a text and every tensor's name, dtype, shape and bytes (in row blocks):
    an artifact's id derived from what it holds, so that two saves of the same content are byte-identical."""
    h = hashlib.sha256(config_text.encode())
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"\0{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        for blk in (t.reshape(1, -1) if t.dim() < 2 else t).split(4096):      # bounded memory for large tensors
            h.update(blk.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def sort_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys: safetensors writes ``__metadata__`` in hash-map order,
    which changes from one process to the next. Same data offsets, so the tensor bytes are untouched."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        new = json.dumps(header, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
        if len(new) <= n:  # the usual case: same keys, same length, padded with spaces as safetensors pads
            f.seek(8)
            f.write(new + b" " * (n - len(new)))
            return
        f.seek(8 + n)
        data = f.read()
    new += b" " * (-len(new) % 8)
    with open(path, "wb") as f:
        f.write(len(new).to_bytes(8, "little") + new + data)
