"""Benchmark records: the JSON a benchmark script writes and a chapter reads, tied to the dataset it ran on.

A chapter re-runs a small live subset of a heavy sweep and reads the rest from the sweep's record in
``benchmarks/``. A record is only worth reading on the dataset it was measured on: two weights datasets
of the same size (the mini world before and after its rebuild) would otherwise pass for each other. So
:func:`write_record` stamps every record with :func:`dataset_key` (size and the sha256 of the weights,
from the dataset's manifest), and :func:`read_record` gives ``None``, and says why in one line, for a
record of another dataset.

Example:
    >>> write_record("benchmarks/latent_space.json", {"sizes": sizes}, ds)      # doctest: +SKIP
    >>> rec = read_record("benchmarks/latent_space.json", ds)                   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from .errors import W2WError

__all__ = ["dataset_key", "write_record", "read_record"]


def dataset_key(ds) -> dict:
    """``{"n", "dim", "sha256"}`` of a weights dataset; ``sha256`` is its weights file's, from its manifest
    (``None`` for a dataset without one, such as the public w2w files)."""
    sha = None
    manifest = Path(ds.folder) / "manifest.json"
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError) as err:
            raise W2WError(f"{manifest} is not a readable manifest ({err}); check it with `w2w verify "
                           f"{ds.folder}`") from err
        sha = next((v["sha256"] for k, v in files.items() if k.startswith("all_weights")), None)
    return {"n": len(ds), "dim": ds.dim, "sha256": sha}


def write_record(path: str | os.PathLike, record: dict, ds) -> Path:
    """Write ``record`` as JSON, with the dataset's key and the machine it ran on; returns the path."""
    path = Path(path)
    out = {**record, "dataset": dataset_key(ds),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "torch": torch.__version__}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)
    return path


def read_record(path: str | os.PathLike, ds) -> dict | None:
    """The record at ``path`` if it was measured on ``ds``; else ``None``, with a printed line that says why
    and which script re-records it."""
    path = Path(path)
    if not path.is_file():
        print(f"no record at {path}: run benchmarks/{path.stem}.py to write one; only the live runs are shown")
        return None
    try:
        rec = json.loads(path.read_text())
    except ValueError as err:
        raise W2WError(f"{path} is not valid JSON ({err}): re-run benchmarks/{path.stem}.py") from err
    if rec.get("dataset") != dataset_key(ds):
        print(f"{path} was recorded on another dataset ({rec.get('dataset')}), not on {ds.folder}: re-run "
              f"benchmarks/{path.stem}.py on it; only the live runs are shown")
        return None
    return rec
