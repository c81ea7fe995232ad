"""File names, dtypes and the attributes table of the two weights-dataset layouts (see :mod:`w2wlib.data`)."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import ArtifactMissingError, W2WError
from ..lora import PEFT_PREFIX, LoraLayout

logger = logging.getLogger("w2wlib.data")

OURS_FILES = dict(weights="all_weights.safetensors", mean="mean.safetensors", std="std.safetensors",
                  weight_dimensions="weight_dimensions.json", layout="layout.json",
                  attributes="attributes.csv", identities="identities.json")
W2W_FILES = dict(weights="all_weights.pt", mean="mean.pt", std="std.pt",
                 weight_dimensions="weight_dimensions.pt", identity_df="identity_df.pt")
W2W_REPO = "Snapchat/weights2weights"
_W2W_DIRS = ("files", "weights_datasets/identities", ".")  # hub arrangement first, then flat
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
_BUILD_OURS = "write it again with w2wlib.data.save_weights"
_GET_W2W = "fetch it with `w2wlib.data.download_w2w(folder{})`"
_REGET_W2W = "the file is damaged or was cut short by an interrupted download: delete it and fetch it again with " \
             "`w2wlib.data.download_w2w(folder{})`"
_FLOAT_DTYPES = "float32 or float16 (bfloat16 and float64 are read too)"


def _hub_path(name: str) -> str:
    return f"weights_datasets/identities/{name}" if name == W2W_FILES["weights"] else f"files/{name}"


def _missing(path: Path, how: str) -> ArtifactMissingError:
    return ArtifactMissingError(f"{path.name} is missing from {path.parent}: {how}.")


def _read_json(path: Path, expect: type, what: str, how: str = _BUILD_OURS) -> Any:
    """``path`` parsed as JSON, which must be a ``expect`` (dict or list); else W2WError naming the file and ``how``."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise W2WError(f"{path} is not valid JSON ({err}): the file is damaged; {how}.") from err
    if not isinstance(obj, expect):
        raise W2WError(f"{path} holds a JSON {type(obj).__name__}, but {path.name} is {what}: wrong or damaged "
                       f"file; {how}.")
    return obj


def _check_float(t: Any, path: Path, name: str, how: str) -> None:
    """Refuse a tensor that is not floating point (int, bool, complex) instead of casting it silently."""
    if not isinstance(t, torch.Tensor):
        raise W2WError(f"{path} holds a {type(t).__name__}, not a tensor: wrong file? {how}.")
    if not t.is_floating_point():
        raise W2WError(f"{name} in {path} has dtype {str(t.dtype).replace('torch.', '')}, but weights and their "
                       f"statistics must be {_FLOAT_DTYPES}: the file was not written from LoRA weights, or was "
                       f"converted wrongly; {how}.")


def _bad_rows(block: torch.Tensor, offset: int) -> list[int]:
    return (offset + torch.nonzero(~torch.isfinite(block).all(dim=1)).flatten()).tolist()


def _to_binary(name: str, values: Any, n: int, strict: bool = True) -> np.ndarray | None:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise W2WError(f"Attribute {name!r} has shape {arr.shape} but the weights have {n:,} rows.")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "iuf":
        vals = set(np.unique(arr).tolist())
        if vals <= {0, 1}:
            return arr.astype(np.uint8)
        if vals <= {-1, 1}:  # CelebA's own -1/1 coding
            return (arr > 0).astype(np.uint8)
    if strict:
        raise W2WError(f"Attribute {name!r} must hold 0/1 (or bool) values; got {arr.dtype} {arr[:5]}.")
    logger.warning("Skipping attribute %r: not a 0/1 column.", name)
    return None


def _attributes_csv_text(attributes: Mapping[str, np.ndarray], index: Sequence[Any],
                         index_name: str = "identity_seed") -> str:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow([index_name, *attributes])
    cols = [np.asarray(v) for v in attributes.values()]
    for i, idx in enumerate(index):
        wr.writerow([idx, *(int(c[i]) for c in cols)])
    return buf.getvalue()


def _read_attributes_csv(path: Path, n: int, how: str = _BUILD_OURS) -> tuple[list[str], dict[str, np.ndarray]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or len(rows) - 1 != n:
        raise W2WError(f"{path} has {max(len(rows) - 1, 0):,} identities but all_weights has {n:,} rows: "
                       f"files from different datasets? {how}.")
    names, body = rows[0][1:], rows[1:]
    ragged = next((i for i, r in enumerate(body) if len(r) != len(rows[0])), None)
    if ragged is not None:
        raise W2WError(f"{path}: line {ragged + 2} has {len(body[ragged])} fields but the header has "
                       f"{len(rows[0])}: the file is damaged; {how}.")
    try:
        data = np.array([[int(v) for v in r[1:]] for r in body], dtype=np.int64).reshape(n, len(names))
    except ValueError as err:
        raise W2WError(f"{path}: every attribute must be an integer 0/1 ({err}); {how}.") from err
    return [r[0] for r in body], {k: _to_binary(k, data[:, j], n) for j, k in enumerate(names)}


def _layout_weight_dimensions(layout: LoraLayout) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{PEFT_PREFIX}{e.module}.lora_{ab}.weight", s) for e in layout.entries
            for ab, s in (("A", e.a_shape), ("B", e.b_shape))]
