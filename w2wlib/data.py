"""The weights dataset: N identity LoRAs as an ``[N, D]`` matrix, read memory-mapped.

One class, :class:`WeightsDataset`, reads two on-disk layouts; :func:`open_weights` tells them apart.

**Ours** (written by :func:`save_weights`), one folder:

- ``all_weights.safetensors``: tensor ``"weights"`` ``[N, D]``, float32 or float16 (w2w's ``all_weights.pt``);
- ``mean.safetensors`` / ``std.safetensors``: tensors ``"mean"`` / ``"std"`` ``[D]`` float32, computed in
  float64 over the stored rows, std with Bessel's correction (w2w's ``mean.pt`` / ``std.pt``);
- ``weight_dimensions.json``: ``[[key, [rows, cols]], ...]`` in flat order, peft keys
  ``base_model.model.<module>.lora_A.weight`` (w2w's ``weight_dimensions.pt``);
- ``layout.json``: ``LoraLayout.to_dict()``, with rank and ``lora_alpha`` (w2w's ``adapter_config.json``);
- ``attributes.csv`` (optional): ``identity_seed`` then one 0/1 column per attribute, one row per
  identity in row order (w2w's ``identity_df.pt``, without the pickle);
- ``identities.json``: ``{"format", "version", "dataset_id", "n", "dim", "dtype", "identity_seeds",
  "extra"}``; ``extra`` holds held-out seeds and training hyperparameters.

Every file carries the same random ``dataset_id`` (in the safetensors metadata and in
``identities.json``), so files from two different saves are caught on open.

**Public w2w** (``Snapchat/weights2weights``, fetched by :func:`download_w2w`), either as on the hub
(``files/*.pt`` and ``weights_datasets/identities/all_weights.pt``) or all in one flat folder:
``all_weights.pt`` ``[64974, 99648]`` float32, ``mean.pt`` / ``std.pt`` ``[99648]``, ``weight_dimensions.pt``
(ordered ``key -> [[numel], shape]``, the flat order) and ``identity_df.pt`` (a pickled pandas DataFrame:
refused unless ``trust_pickles=True``; an ``attributes.csv`` next to it is read instead).

Memory-mapping: ours maps ``all_weights.safetensors`` with ``torch.UntypedStorage.from_file(shared=False)``
(a private, copy-on-write ``mmap``) and views the data region given by the header; the public
file is opened with ``torch.load(weights_only=True, mmap=True)``. Pages are read only when rows are
touched, so opening a 26 GB file is instant, and writing to ``ds.weights`` never reaches the file.

Reading: :meth:`WeightsDataset.rows` (and everything built on it: ``iter_batches``, the trainer, the
streaming PCA) does not fault the mapping in. It reads the rows' bytes from the file with ``os.preadv``
into a fresh buffer (at the data offset found in the safetensors header, or in the zip record of the
``.pt`` file), so the process's resident memory holds only the batch: a pass over a 26 GB file keeps RSS
bounded, while the kernel's page cache still serves repeated passes.

Example:
    >>> ds = open_weights("data/dataset")                      # doctest: +SKIP
    >>> len(ds), ds.dim                                         # doctest: +SKIP
    (4000, 5376)
    >>> for batch in ds.iter_batches(256, shuffle=True):        # [B, D] float32  # doctest: +SKIP
    ...     z = ds.standardise(batch)
"""

from __future__ import annotations

import collections
import csv
import io
import json
import logging
import math
import os
import pickle
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ArtifactMissingError, LayoutError, W2WError
from .lora import PEFT_PREFIX, LoraLayout
from .lora_io import layout_from_weight_dimensions

__all__ = ["WeightsDataset", "open_weights", "save_weights", "export_w2w_layout", "download_w2w",
           "write_attributes_csv", "OURS_FILES", "W2W_FILES"]

logger = logging.getLogger(__name__)

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


def _hub_path(name: str) -> str:
    return f"weights_datasets/identities/{name}" if name == W2W_FILES["weights"] else f"files/{name}"


def _missing(path: Path, how: str) -> ArtifactMissingError:
    return ArtifactMissingError(f"{path.name} is missing from {path.parent}: {how}.")


def _mmap_safetensors(path: Path, name: str = "weights") -> tuple[torch.Tensor, dict[str, str], int]:
    """Tensor ``name`` of a safetensors file as a private mmap (never read whole), the metadata, and the
    byte offset of the tensor's data in the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise W2WError(f"{path} is not a safetensors file (bad header length); {_BUILD_OURS}.")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise W2WError(f"{path} has a corrupt safetensors header; {_BUILD_OURS}.") from err
    meta = header.pop("__metadata__", None) or {}
    if name not in header:
        raise W2WError(f"{path} has no tensor {name!r} (it holds {sorted(header)}): wrong file?")
    info = header[name]
    dtype, shape = _ST_DTYPES.get(info["dtype"]), [int(s) for s in info["shape"]]
    if dtype is None:
        raise W2WError(f"{path}: tensor {name!r} has dtype {info['dtype']}; expected one of {list(_ST_DTYPES)}.")
    start, end = (int(o) for o in info["data_offsets"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end - start != math.prod(shape) * itemsize or 8 + n + end > size:
        raise W2WError(f"{path} is truncated or inconsistent ({size:,} bytes for shape {shape}); {_BUILD_OURS}.")
    begin = 8 + n + start
    if begin % itemsize or sys.byteorder != "little":
        raise W2WError(f"{path}: data of {name!r} is not aligned for memory-mapping; re-save it with "
                       f"w2wlib.data.save_weights or safetensors >= 0.4.")
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)  # MAP_PRIVATE mmap
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)
    return raw[begin:begin + end - start].view(dtype).view(shape), meta, begin


class _RowFile:
    """Rows of a row-major ``[N, D]`` matrix stored at byte ``offset`` of ``path``, read with ``os.preadv``.

    Reading never touches a memory mapping, so resident memory holds only what is returned.
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, int], dtype: torch.dtype):
        self.path, self.offset, (self.n, self.d), self.dtype = path, offset, shape, dtype
        self.row_bytes = self.d * torch.empty((), dtype=dtype).element_size()

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (sorted, in range) as ``[len(rows), D]`` in the file's dtype."""
        out = torch.empty(rows.numel(), self.d, dtype=self.dtype)
        if not rows.numel():
            return out
        buf = out.view(torch.uint8).numpy().reshape(rows.numel(), self.row_bytes)
        r = rows.numpy()
        cuts = np.flatnonzero(np.diff(r) != 1) + 1                     # runs of consecutive rows
        with open(self.path, "rb", buffering=0) as f:
            for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(r)]):
                want, pos = (hi - lo) * self.row_bytes, self.offset + int(r[lo]) * self.row_bytes
                view = memoryview(buf[lo:hi]).cast("B")
                done = 0
                while done < want:                                     # preadv may return short counts
                    got = os.preadv(f.fileno(), [view[done:]], pos + done)
                    if got <= 0:
                        raise W2WError(f"{self.path} ended early while reading rows {int(r[lo])}..{int(r[hi - 1])}: "
                                       f"the file is truncated.")
                    done += got
        return out


def _pt_row_file(path: Path, t: torch.Tensor) -> _RowFile | None:
    """The :class:`_RowFile` of tensor ``t`` loaded with ``torch.load(path, mmap=True)``; None if not locatable."""
    import zipfile

    if not t.is_contiguous():
        return None
    nbytes = t.untyped_storage().nbytes()
    try:
        with zipfile.ZipFile(path) as z:
            hits = [i for i in z.infolist() if "/data/" in i.filename and i.file_size == nbytes
                    and i.compress_type == zipfile.ZIP_STORED]
        if len(hits) != 1:
            return None
        with open(path, "rb") as f:                                    # the local header gives the data offset
            f.seek(hits[0].header_offset)
            head = f.read(30)
        if head[:4] != b"PK\x03\x04":
            return None
        data = hits[0].header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
    except (OSError, zipfile.BadZipFile):
        return None
    return _RowFile(path, data + t.storage_offset() * t.element_size(), tuple(t.shape), t.dtype)


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


def _read_attributes_csv(path: Path, n: int) -> tuple[list[str], dict[str, np.ndarray]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or len(rows) - 1 != n:
        raise W2WError(f"{path} has {max(len(rows) - 1, 0):,} identities but all_weights has {n:,} rows: "
                       f"files from different datasets? {_BUILD_OURS}.")
    names, body = rows[0][1:], rows[1:]
    try:
        data = np.array([[int(v) for v in r[1:]] for r in body], dtype=np.int64).reshape(n, len(names))
    except ValueError as err:
        raise W2WError(f"{path}: every attribute must be an integer 0/1 ({err}).") from err
    return [r[0] for r in body], {k: _to_binary(k, data[:, j], n) for j, k in enumerate(names)}


class WeightsDataset:
    """N flat LoRAs, memory-mapped; see the module docstring for the two layouts.

    >>> ds = open_weights(folder)                           # doctest: +SKIP
    >>> ds.rows([0, 5]).shape, ds.rows(slice(0, 3)).dtype    # doctest: +SKIP
    (torch.Size([2, 99648]), torch.float32)
    """

    def __init__(self, folder: str | os.PathLike, layout: str | None = None, *, trust_pickles: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ArtifactMissingError(f"No weights dataset folder {self.folder}: build ours with "
                                       f"w2wlib.data.save_weights, or fetch w2w's with w2wlib.data.download_w2w.")
        self.layout = layout or self._detect()
        if self.layout not in ("ours", "w2w"):
            raise W2WError(f"layout must be 'ours' or 'w2w', not {self.layout!r}.")
        self.trust_pickles = trust_pickles
        self.identity_seeds: list[int] | None = None
        self.dataset_id: str | None = None   # the id every file of one save carries (ours); None for w2w's
        self.extra: dict[str, Any] = {}
        self._attributes: dict[str, np.ndarray] | None = None
        self._layout_dict: dict | None = None
        self._file: _RowFile | None = None  # direct reads of all_weights (None: read through the mapping)
        (self._open_ours if self.layout == "ours" else self._open_w2w)()
        self._validate()
        logger.info("Opened %s weights dataset %s: %d x %d %s", self.layout, self.folder, len(self), self.dim,
                    self.weights.dtype)

    # ------------------------------------------------------------------ opening
    def _detect(self) -> str:
        if (self.folder / OURS_FILES["weights"]).exists():
            return "ours"
        if any(self._w2w_path(n) for n in W2W_FILES.values()):
            return "w2w"
        raise ArtifactMissingError(
            f"{self.folder} holds no weights dataset: expected {OURS_FILES['weights']} (ours; build it with "
            f"w2wlib.data.save_weights) or {W2W_FILES['weights']} + files/*.pt (public w2w; "
            f"{_GET_W2W.format(', include_all_weights=True')}).")

    def _w2w_path(self, name: str) -> Path | None:
        return next((self.folder / d / name for d in _W2W_DIRS if (self.folder / d / name).is_file()), None)

    def _open_ours(self) -> None:
        paths = {k: self.folder / v for k, v in OURS_FILES.items()}
        for key in ("weights", "mean", "std", "weight_dimensions", "layout", "identities"):
            if not paths[key].is_file():
                raise _missing(paths[key], _BUILD_OURS)
        from safetensors import safe_open

        self.weights, meta, offset = _mmap_safetensors(paths["weights"])  # [N, D], mmap
        if self.weights.dim() == 2:
            self._file = _RowFile(paths["weights"], offset, tuple(self.weights.shape), self.weights.dtype)
        ids = {"all_weights.safetensors": meta.get("dataset_id")}
        for key in ("mean", "std"):
            with safe_open(str(paths[key]), framework="pt") as f:
                if key not in f.keys():
                    raise W2WError(f"{paths[key]} has no tensor {key!r}: wrong file? {_BUILD_OURS}.")
                setattr(self, key, f.get_tensor(key).float())              # [D]
                ids[paths[key].name] = (f.metadata() or {}).get("dataset_id")
        info = json.loads(paths["identities"].read_text(encoding="utf-8"))
        ids["identities.json"] = info.get("dataset_id")
        if len(set(ids.values())) != 1:
            raise W2WError(f"The files in {self.folder} come from different saves (dataset_id {ids}): a crash "
                           f"during save_weights, or files mixed from two datasets; {_BUILD_OURS}.")
        self.identity_seeds, self.extra = info.get("identity_seeds"), info.get("extra") or {}
        self.dataset_id = info.get("dataset_id")
        wd = json.loads(paths["weight_dimensions"].read_text(encoding="utf-8"))
        self.weight_dimensions = [(k, tuple(s)) for k, s in wd]
        self._layout_dict = json.loads(paths["layout"].read_text(encoding="utf-8"))
        saved = LoraLayout.from_dict(self._layout_dict)
        if _layout_weight_dimensions(saved) != self.weight_dimensions:
            raise LayoutError(f"layout.json and weight_dimensions.json in {self.folder} disagree; {_BUILD_OURS}.")
        if paths["attributes"].is_file():
            index, self._attributes = _read_attributes_csv(paths["attributes"], self.weights.shape[0])
            if self.identity_seeds is not None and index != [str(s) for s in self.identity_seeds]:
                raise W2WError(f"attributes.csv rows are not in the order of identities.json; {_BUILD_OURS}.")

    def _open_w2w(self) -> None:
        paths = {k: self._w2w_path(v) for k, v in W2W_FILES.items()}
        for key in ("weights", "mean", "std", "weight_dimensions"):
            if paths[key] is None:
                raise _missing(self.folder / W2W_FILES[key], _GET_W2W.format(
                    ", include_all_weights=True" if key == "weights" else ""))
        try:  # weights_only: no arbitrary unpickling; mmap: all_weights stays on disk
            self.weights = torch.load(paths["weights"], map_location="cpu", weights_only=True, mmap=True)
            self.mean, self.std = (torch.load(paths[k], map_location="cpu", weights_only=True)
                                   for k in ("mean", "std"))
            wd = torch.load(paths["weight_dimensions"], weights_only=True)
        except (RuntimeError, ValueError, OSError, pickle.UnpicklingError) as err:
            raise W2WError(f"Could not read the w2w files in {self.folder} safely ({err}).") from err
        for key in ("weights", "mean", "std"):
            if not isinstance(getattr(self, key), torch.Tensor):
                raise W2WError(f"{paths[key]} holds a {type(getattr(self, key)).__name__}, not a tensor.")
        self.mean, self.std = self.mean.float(), self.std.float()
        if not isinstance(wd, Mapping):
            raise LayoutError(f"{paths['weight_dimensions']} holds a {type(wd).__name__}, not an ordered dict.")
        try:
            self.weight_dimensions = [(k, tuple(int(s) for s in v[1])) for k, v in wd.items()]
        except (TypeError, IndexError, ValueError) as err:
            raise LayoutError(f"{paths['weight_dimensions']} entries are not key -> [[numel], shape].") from err
        self._w2w_wd, self._paths = wd, paths
        if self.weights.dim() == 2:
            self._file = _pt_row_file(paths["weights"], self.weights)
        csv_path = paths["weights"].parent / OURS_FILES["attributes"]
        csv_path = next((p for p in (csv_path, self.folder / OURS_FILES["attributes"]) if p.is_file()), None)
        if csv_path is not None:
            self._attributes = _read_attributes_csv(csv_path, self.weights.shape[0])[1]

    def _validate(self) -> None:
        w = self.weights
        if w.dim() != 2 or not w.is_floating_point():
            raise W2WError(f"all_weights must be a 2-D float [N, D] tensor; it is {w.dtype} {tuple(w.shape)}.")
        n, d = w.shape
        wd_sum = sum(math.prod(s) for _, s in self.weight_dimensions)
        if wd_sum != d:
            raise LayoutError(f"all_weights has {d:,} columns but weight_dimensions sums to {wd_sum:,}: "
                              f"wrong files? ({self.folder})")
        for name, t in (("mean", self.mean), ("std", self.std)):
            if tuple(t.shape) != (d,):
                raise LayoutError(f"{name} has shape {tuple(t.shape)} but all_weights has {d:,} columns: "
                                  f"wrong files? ({self.folder})")
        for name, t, bad in (("mean", self.mean, ~torch.isfinite(self.mean)),
                             ("std", self.std, ~torch.isfinite(self.std) | (self.std <= 0))):
            if bad.any():
                cols = torch.nonzero(bad).flatten()
                raise W2WError(f"{name} has {cols.numel():,} {'NaN/inf' if name == 'mean' else 'zero/NaN'} "
                               f"entries (first at columns {cols[:5].tolist()}), so standardising would fail. "
                               f"Recompute the statistics (save_weights does) or fetch the right files.")
        if n == 0:
            raise W2WError(f"all_weights in {self.folder} has no rows.")
        if self.identity_seeds is not None and len(self.identity_seeds) != n:
            raise W2WError(f"identities.json lists {len(self.identity_seeds):,} seeds for {n:,} rows.")
        if self._file is not None and not torch.equal(self._file.read(torch.tensor([0, n - 1])), w[[0, n - 1]]):
            logger.warning("%s: direct reads of all_weights disagree with the mapping; reading through the "
                           "mapping instead (resident memory then grows with the rows read)", self.folder)
            self._file = None
        rows = _bad_rows(w[[0, n - 1]], 0)
        if rows:
            raise W2WError(f"Row {[0, n - 1][rows[0]]} of all_weights has NaN/inf; run ds.check_finite() to "
                           f"list every bad row.")

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return self.weights.shape[0]

    def __repr__(self) -> str:
        return f"WeightsDataset({str(self.folder)!r}, layout={self.layout!r}, N={len(self)}, D={self.dim})"

    @property
    def dim(self) -> int:
        """D, the length of one flat LoRA."""
        return self.weights.shape[1]

    def rows(self, idx: int | slice | Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """A float32 copy of the chosen rows, ``[len(idx), D]`` (an int gives ``[1, D]``)."""
        n = len(self)
        if isinstance(idx, slice):
            idx = torch.arange(n)[idx]
        t = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx).reshape(-1)
        if t.dtype == torch.bool:
            if t.numel() != n:
                raise IndexError(f"A boolean row mask needs {n:,} entries, not {t.numel():,}.")
            t = torch.nonzero(t).flatten()
        t = t.long()
        if t.numel() and (int(t.min()) < -n or int(t.max()) >= n):
            raise IndexError(f"Row index out of range for a dataset of {n:,} rows.")
        t = t % n if n else t
        order = torch.argsort(t)  # read the file in increasing order, return in the order asked
        out = torch.empty(t.numel(), self.dim, dtype=torch.float32)
        if self._file is not None:
            out[order] = self._file.read(t[order]).float()
        else:
            out[order] = self.weights.index_select(0, t[order]).float()
        return out

    def iter_batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                     *, drop_last: bool = False, with_index: bool = False) -> Iterator[Any]:
        """Yield ``[B, D]`` float32 batches covering every row once (``(index, batch)`` with ``with_index``).

        >>> g = torch.Generator().manual_seed(0)                     # doctest: +SKIP
        >>> for idx, w in ds.iter_batches(64, shuffle=True, generator=g, with_index=True): ...  # doctest: +SKIP
        """
        if batch_size < 1:
            raise W2WError(f"batch_size must be >= 1, not {batch_size}.")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            if drop_last and idx.numel() < batch_size:
                return
            batch = self.rows(slice(s, s + batch_size)) if not shuffle else self.rows(idx)
            yield (idx, batch) if with_index else batch

    def check_finite(self, batch_size: int = 1024) -> None:
        """Scan every row; raise W2WError naming the first rows with NaN/inf."""
        bad: list[int] = []
        for s in tqdm(range(0, len(self), batch_size), desc="check_finite", unit="batch", disable=None):
            bad += _bad_rows(self.rows(slice(s, s + batch_size)), s)
        if bad:
            raise W2WError(f"{len(bad):,} row(s) of all_weights in {self.folder} have NaN/inf, first rows "
                           f"{bad[:10]}; drop them or rebuild those identities.")

    def standardise(self, w: torch.Tensor) -> torch.Tensor:
        """``(w - mean) / std``, on ``w``'s device and dtype; ``[..., D]``."""
        return (w - self.mean.to(w)) / self.std.to(w)

    def unstandardise(self, z: torch.Tensor) -> torch.Tensor:
        """``z * std + mean``, the inverse of :meth:`standardise`."""
        return z * self.std.to(z) + self.mean.to(z)

    @property
    def attributes(self) -> dict[str, np.ndarray] | None:
        """Attribute name -> uint8 0/1 array ``[N]`` (CelebA's -1/1 mapped to 0/1), or None if none."""
        if self._attributes is None and self.layout == "w2w" and self._paths["identity_df"] is not None:
            self._attributes = self._load_identity_df(self._paths["identity_df"])
        return self._attributes

    def _load_identity_df(self, path: Path) -> dict[str, np.ndarray]:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors/lists: safe
        except (pickle.UnpicklingError, RuntimeError) as err:  # a DataFrame pickles arbitrary classes
            if not self.trust_pickles:
                raise W2WError(
                    f"{path} is a pickle (a pandas DataFrame); loading it can run arbitrary code, so it is "
                    f"refused. If you trust its source, open with open_weights(..., trust_pickles=True) "
                    f"(unsafe; needs pandas), and convert it once with w2wlib.data.write_attributes_csv("
                    f"'{path.parent / OURS_FILES['attributes']}', ds.attributes): later opens read the CSV."
                ) from err
            logger.warning("Unpickling %s with weights_only=False (trust_pickles=True).", path)
            obj = torch.load(path, map_location="cpu", weights_only=False)
        if not (hasattr(obj, "columns") or isinstance(obj, Mapping)):
            raise W2WError(f"{path} holds a {type(obj).__name__}, not a DataFrame or column -> values dict.")
        cols = list(obj.columns) if hasattr(obj, "columns") else list(obj)
        out = {}
        for c in cols:
            v = obj[c]
            v = v.to_numpy() if hasattr(v, "to_numpy") else v.numpy() if isinstance(v, torch.Tensor) else v
            if (b := _to_binary(str(c), v, len(self), strict=False)) is not None:
                out[str(c)] = b
        return out

    @property
    def held_out_seeds(self) -> list[int] | None:
        return self.extra.get("held_out_seeds")

    def lora_layout(self, unet_or_module_names: Any = None, alpha: float | None = None) -> LoraLayout:
        """The :class:`LoraLayout` of a row: ``layout.json`` for ours, ``weight_dimensions`` for w2w.

        For w2w files with peft (dotted) keys the module names come from the keys; with underscore
        keys pass the UNet or its module names. ``alpha`` defaults to the dataset's (w2w: 27).
        """
        if self.layout == "ours":
            layout = LoraLayout.from_dict(self._layout_dict)
            if alpha is not None and float(alpha) != layout.alpha:
                raise LayoutError(f"This dataset was trained with alpha {layout.alpha}, not {alpha}.")
            if unet_or_module_names is not None:
                _check_modules(layout, unet_or_module_names)
            return layout
        names = unet_or_module_names
        if names is None:
            names = [_module_of_key(k) for k, _ in self.weight_dimensions]
        return layout_from_weight_dimensions(self._w2w_wd, names, alpha=27.0 if alpha is None else alpha,
                                             expected_dim=self.dim)


def _module_of_key(key: str) -> str:
    for suffix in (".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight"):
        if key.endswith(suffix):
            path = key[: -len(suffix)]
            for p in (PEFT_PREFIX, "unet."):
                path = path[len(p):] if path.startswith(p) else path
            return path
    raise LayoutError(f"Cannot read a module name from weight_dimensions key {key!r}; pass the UNet (or "
                      f"its module names) to lora_layout().")


def _check_modules(layout: LoraLayout, unet_or_names: Any) -> None:
    if isinstance(unet_or_names, torch.nn.Module):
        mods = dict(unet_or_names.named_modules())
        bad = [e.module for e in layout.entries if (getattr(mods.get(e.module), "in_features", None),
               getattr(mods.get(e.module), "out_features", None)) != (e.in_features, e.out_features)]
    else:
        names = set(unet_or_names)
        bad = [e.module for e in layout.entries if e.module not in names]
    if bad:
        raise LayoutError(f"{len(bad)} module(s) of the dataset's layout are missing or mis-sized in this "
                          f"UNet: {bad[:5]}: wrong base model?")


def _layout_weight_dimensions(layout: LoraLayout) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{PEFT_PREFIX}{e.module}.lora_{ab}.weight", s) for e in layout.entries
            for ab, s in (("A", e.a_shape), ("B", e.b_shape))]


def open_weights(folder: str | os.PathLike, layout: str | None = None, *,
                 trust_pickles: bool = False) -> WeightsDataset:
    """Open a weights dataset, detecting the layout (``"ours"`` or ``"w2w"``) unless given.

    ``trust_pickles=True`` (unsafe) lets w2w's pickled ``identity_df.pt`` be unpickled.

    >>> ds = open_weights("hub_download/")      # files/ + weights_datasets/identities/   # doctest: +SKIP
    """
    return WeightsDataset(folder, layout, trust_pickles=trust_pickles)


# ---------------------------------------------------------------------- writing


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
    if not isinstance(weights, torch.Tensor) or weights.dim() != 2 or not weights.is_floating_point():
        raise W2WError(f"weights must be a 2-D float tensor [N, D], not {getattr(weights, 'shape', weights)}.")
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
    seeds = None if identity_seeds is None else [int(s) for s in identity_seeds]
    if seeds is not None and (len(seeds) != n or len(set(seeds)) != n):
        raise W2WError(f"identity_seeds must be {n:,} distinct ints, one per row; got {len(seeds):,} "
                       f"({len(set(seeds)):,} distinct).")
    dataset_id = uuid.uuid4().hex
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
            save_file({key: t.float().contiguous()}, str(out.path(OURS_FILES[key])), metadata=meta)
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


def download_w2w(local_dir: str | os.PathLike, *, files: Sequence[str] = (
        "mean.pt", "std.pt", "V.pt", "weight_dimensions.pt", "adapter_config.json"),
        include_all_weights: bool = False, repo_id: str = W2W_REPO, revision: str | None = None) -> Path:
    """Fetch w2w's public files into ``local_dir`` in the hub arrangement; returns ``local_dir``.

    ``files`` are names under ``files/`` (add ``"identity_df.pt"`` or ``"proj_1000pc.pt"`` as needed);
    ``include_all_weights`` adds the 26 GB ``weights_datasets/identities/all_weights.pt``. ``repo_id``
    may be a local folder holding a copy of the repo (then files are copied from it, no network).

    >>> ds = open_weights(download_w2w("w2w", include_all_weights=True))    # doctest: +SKIP
    """
    local_dir = Path(local_dir)
    patterns = [_hub_path(f) for f in files]
    if include_all_weights:
        patterns.append(_hub_path(W2W_FILES["weights"]))
        logger.info("Downloading all_weights.pt (about 26 GB) from %s", repo_id)
    if Path(repo_id).is_dir():
        for p in patterns:
            src, dst = Path(repo_id) / p, local_dir / p
            if not src.is_file():
                raise ArtifactMissingError(f"{src} is missing from the local copy of the w2w repo {repo_id}.")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    else:
        import huggingface_hub

        try:
            huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, local_dir=str(local_dir),
                                              revision=revision)
        except Exception as err:  # offline, unknown repo, auth: say what to do
            raise W2WError(f"Could not download {patterns} from {repo_id} ({type(err).__name__}: {err}). "
                           f"Check the network (HF_HUB_OFFLINE must be unset), or download the files on "
                           f"another machine and pass repo_id=<that folder>.") from err
    missing = [p for p in patterns if not (local_dir / p).is_file()]
    if missing:
        raise ArtifactMissingError(f"{repo_id} did not provide {missing}: check the file names.")
    return local_dir
