"""Writing weights datasets: ours (:func:`save_weights`), w2w's (:func:`export_w2w_layout`), attribute tables."""

from __future__ import annotations

import collections
import json
import math
import operator
import os
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import LayoutError, W2WError
from ..lora import LoraLayout
from ..stages import content_id, sort_safetensors_header
from .dataset import WeightsDataset
from .formats import (_ST_CODES, OURS_FILES, W2W_FILES, _attributes_csv_text, _bad_rows, _hub_path,
                      _layout_weight_dimensions, _to_binary, logger)

class _AtomicFiles:
    """Write every file under a temporary name, then rename all; on error remove the temporaries."""

    def __init__(self, folder: Path):
        self.folder, self.tmp = folder, {}

    def path(self, name: str) -> Path:
        self.tmp[name] = self.folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        return self.tmp[name]

    def text(self, name: str, text: str) -> None:
        with open(self.path(name), "w", newline="", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def __enter__(self) -> "_AtomicFiles":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            for name, p in self.tmp.items():
                os.replace(p, self.folder / name)
        for p in self.tmp.values():
            p.unlink(missing_ok=True)


def _write_weights_safetensors(path: Path, weights: torch.Tensor, dtype: torch.dtype,
                               meta: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream ``weights`` into a safetensors file in row chunks; return float64 mean and std ``[D]``."""
    n, d = weights.shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    header = {"__metadata__": meta,
              "weights": {"dtype": _ST_CODES[dtype], "shape": [n, d], "data_offsets": [0, n * d * itemsize]}}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # keeps the data 8-byte aligned, as safetensors does
    mean, m2, count, bad = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), 0, []
    chunk = max(1, (1 << 22) // max(d, 1))  # rows per chunk: about 32 MB in float64
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little") + hb)
        for s in range(0, n, chunk):
            block = weights[s:s + chunk].detach().to("cpu", dtype).contiguous()
            bad += _bad_rows(block, s)
            if bad:
                continue
            f.write(block.view(torch.uint8).numpy())
            x = block.double()
            bm, k = x.mean(0), x.shape[0]
            delta = bm - mean
            mean += delta * (k / (count + k))
            m2 += ((x - bm) ** 2).sum(0) + delta ** 2 * (count * k / (count + k))
            count += k
        if bad:
            raise W2WError(f"{len(bad):,} row(s) are NaN/inf in {dtype} (first rows {bad[:10]}); nothing "
                           f"was written. Fix or drop those rows (float16 overflows above 65504).")
        f.flush()
        os.fsync(f.fileno())
    return mean, (m2 / (n - 1)).sqrt()


def save_weights(folder: str | os.PathLike, weights: torch.Tensor, layout: LoraLayout, *,
                 attributes: Mapping[str, Any] | None = None, identity_seeds: Sequence[int] | None = None,
                 extra: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32,
                 overwrite: bool = False) -> Path:
    """Write ``weights`` ``[N, D]`` as OUR layout (see the module docstring); returns the folder.

    Everything is validated before anything is written, every file is written under a temporary
    name and renamed into place, and an existing dataset is only replaced with ``overwrite=True``.

    >>> save_weights("data/dataset", W, layout, attributes={"Male": male}, identity_seeds=seeds,
    ...              extra={"held_out_seeds": [7, 9], "steps": 800}, dtype=torch.float16)  # doctest: +SKIP
    """
    folder = Path(folder)
    if not isinstance(weights, torch.Tensor) or weights.dim() != 2:
        raise W2WError(f"weights must be a 2-D float tensor [N, D], not {getattr(weights, 'shape', weights)}.")
    if not weights.is_floating_point():  # int, bool, complex: never cast silently
        raise W2WError(f"weights have dtype {str(weights.dtype).replace('torch.', '')}, but LoRA weights are float "
                       f"(float32 or float16): pass weights.float() if these values really are weights.")
    n, d = weights.shape
    if d != layout.dim:
        raise LayoutError(f"weights have {d:,} columns but the layout needs {layout.dim:,}: wrong layout?")
    if n < 2:
        raise W2WError(f"A dataset needs at least 2 rows to have a std; got {n}.")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise W2WError(f"dtype must be float32, float16 or bfloat16, not {dtype}.")
    attrs = {}
    for name, v in (attributes or {}).items():
        if not isinstance(name, str) or not name or name == "identity_seed" or any(c in name for c in ',"\n'):
            raise W2WError(f"Attribute name {name!r} is not a plain CSV column name.")
        attrs[name] = _to_binary(name, v, n)
    try:  # operator.index: 3.7 or "7" is refused rather than truncated or parsed
        seeds = None if identity_seeds is None else [operator.index(s) for s in identity_seeds]
    except TypeError as err:
        raise W2WError(f"identity_seeds must be ints, one per row ({err}); pass the integer seeds the identities "
                       f"were rendered from.") from err
    if seeds is not None and (len(seeds) != n or len(set(seeds)) != n):
        raise W2WError(f"identity_seeds must be {n:,} distinct ints, one per row; got {len(seeds):,} "
                       f"({len(set(seeds)):,} distinct).")
    try:  # an id derived from what is saved: the same data saves to the same bytes
        described = json.dumps({"layout": layout.to_dict(), "seeds": seeds, "extra": dict(extra or {}),
                                "attributes": {k: [int(x) for x in v] for k, v in attrs.items()}}, sort_keys=True)
    except TypeError as err:
        raise W2WError(f"extra must be JSON-serialisable ({err}).") from err
    dataset_id = content_id(described, {"weights": weights.to(dtype)})
    try:
        info = json.dumps({"format": "w2wlib-weights-dataset", "version": 1, "dataset_id": dataset_id,
                           "n": n, "dim": d, "dtype": str(dtype).replace("torch.", ""),
                           "identity_seeds": seeds, "extra": dict(extra or {})}, indent=1)
    except TypeError as err:
        raise W2WError(f"extra must be JSON-serialisable ({err}).") from err
    existing = [v for v in OURS_FILES.values() if (folder / v).exists()]
    if existing and not overwrite:
        raise W2WError(f"{folder} already holds a weights dataset ({', '.join(existing)}); pass "
                       f"overwrite=True to replace it, or choose another folder.")
    folder.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    meta = {"format": "pt", "w2wlib": "weights-dataset", "dataset_id": dataset_id}
    with _AtomicFiles(folder) as out:
        mean, std = _write_weights_safetensors(out.path(OURS_FILES["weights"]), weights, dtype, meta)
        const = torch.nonzero(~(std > 0)).flatten()
        if const.numel():
            raise W2WError(f"{const.numel():,} column(s) are constant over all {n:,} rows (first "
                           f"{const[:5].tolist()}), so std would be 0; nothing was written.")
        for key, t in (("mean", mean), ("std", std)):
            path = out.path(OURS_FILES[key])
            save_file({key: t.float().contiguous()}, str(path), metadata=meta)
            sort_safetensors_header(path)   # safetensors writes metadata in hash-map order: same bytes every save
        out.text(OURS_FILES["layout"], json.dumps(layout.to_dict(), indent=1))
        out.text(OURS_FILES["weight_dimensions"], json.dumps(
            [[k, list(s)] for k, s in _layout_weight_dimensions(layout)], indent=0))
        if attrs:
            out.text(OURS_FILES["attributes"], _attributes_csv_text(attrs, seeds or range(n)))
        out.text(OURS_FILES["identities"], info)
    for stale in set(existing) - set(out.tmp):  # e.g. an old attributes.csv the new save lacks
        (folder / stale).unlink(missing_ok=True)
    logger.info("Saved weights dataset %s: %d x %d %s", folder, n, d, dtype)
    return folder


def write_attributes_csv(path: str | os.PathLike, attributes: Mapping[str, Any],
                         index: Sequence[Any] | None = None, index_name: str = "identity_seed") -> Path:
    """Write attributes (name -> 0/1 ``[N]``) as CSV, atomically; first column ``index`` (default 0..N-1)."""
    path = Path(path)
    n = len(next(iter(attributes.values()))) if attributes else 0
    attrs = {k: _to_binary(k, v, n) for k, v in attributes.items()}
    with _AtomicFiles(path.parent) as out:
        out.text(path.name, _attributes_csv_text(attrs, range(n) if index is None else index, index_name))
    return path


def export_w2w_layout(dataset: WeightsDataset, folder: str | os.PathLike, *, arrangement: str = "hub",
                      overwrite: bool = False) -> Path:
    """Write ``dataset`` as w2w does: ``all_weights.pt`` (float32), ``mean.pt``, ``std.pt``, ``weight_dimensions.pt``.

    ``arrangement="hub"`` mirrors the hub repo (``files/`` + ``weights_datasets/identities/``),
    ``"flat"`` puts everything in ``folder``. Attributes go to ``attributes.csv`` (not a pickle).
    ``all_weights.pt`` is written with ``torch.save``, so the float32 matrix is held in memory once.
    """
    folder = Path(folder)
    if arrangement not in ("hub", "flat"):
        raise W2WError(f"arrangement must be 'hub' or 'flat', not {arrangement!r}.")
    where = {n: folder / (_hub_path(n) if arrangement == "hub" else n) for n in W2W_FILES.values()}
    if where[W2W_FILES["weights"]].exists() and not overwrite:
        raise W2WError(f"{where[W2W_FILES['weights']]} exists; pass overwrite=True to replace it.")
    wd = collections.OrderedDict((k, [[math.prod(s)], torch.Size(s)]) for k, s in dataset.weight_dimensions)
    objs = {W2W_FILES["weights"]: dataset.rows(slice(None)), W2W_FILES["mean"]: dataset.mean.clone(),
            W2W_FILES["std"]: dataset.std.clone(), W2W_FILES["weight_dimensions"]: wd}
    for name, obj in objs.items():
        where[name].parent.mkdir(parents=True, exist_ok=True)
        with _AtomicFiles(where[name].parent) as out:
            torch.save(obj, out.path(name))
    attrs = dataset.attributes if dataset.layout == "ours" else dataset._attributes  # never unpickle here
    if attrs:
        write_attributes_csv(where[W2W_FILES["weights"]].parent / OURS_FILES["attributes"], attrs,
                             dataset.identity_seeds)
    return folder
