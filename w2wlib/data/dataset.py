"""Reading a weights dataset, memory-mapped: :class:`WeightsDataset` and :func:`open_weights` (see :mod:`w2wlib.data`)."""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ArtifactMissingError, LayoutError, W2WError
from ..lora import PEFT_PREFIX, LoraLayout
from ..lora_io import layout_from_weight_dimensions
from .formats import (_BUILD_OURS, _GET_W2W, _ST_DTYPES, _W2W_DIRS, OURS_FILES, W2W_FILES, _bad_rows,
                      _layout_weight_dimensions, _missing, _read_attributes_csv, _to_binary, logger)

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


def open_weights(folder: str | os.PathLike, layout: str | None = None, *,
                 trust_pickles: bool = False) -> WeightsDataset:
    """Open a weights dataset, detecting the layout (``"ours"`` or ``"w2w"``) unless given.

    ``trust_pickles=True`` (unsafe) lets w2w's pickled ``identity_df.pt`` be unpickled.

    >>> ds = open_weights("hub_download/")      # files/ + weights_datasets/identities/   # doctest: +SKIP
    """
    return WeightsDataset(folder, layout, trust_pickles=trust_pickles)
