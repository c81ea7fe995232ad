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
from ..lora import PEFT_PREFIX, SD15_DIM, LoraLayout
from ..lora_io import layout_from_weight_dimensions
from .formats import (_BUILD_OURS, _GET_W2W, _REGET_W2W, _ST_DTYPES, _W2W_DIRS, OURS_FILES, W2W_FILES,
                      _bad_rows, _check_float, _layout_weight_dimensions, _missing, _read_attributes_csv, _read_json,
                      _to_binary, logger)

_CSV_FIX = ("rewrite it from the attributes that belong to these weights with w2wlib.data.write_attributes_csv, "
            "or delete it")


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
        from safetensors import SafetensorError, safe_open

        self._weights_path = paths["weights"]
        self.weights, meta, offset = _mmap_safetensors(paths["weights"])  # [N, D], mmap
        if self.weights.dim() == 2:
            self._file = _RowFile(paths["weights"], offset, tuple(self.weights.shape), self.weights.dtype)
        ids = {"all_weights.safetensors": meta.get("dataset_id")}
        for key in ("mean", "std"):
            try:
                with safe_open(str(paths[key]), framework="pt") as f:
                    t = f.get_tensor(key) if key in f.keys() else None
                    ids[paths[key].name] = (f.metadata() or {}).get("dataset_id")
            except (SafetensorError, OSError, ValueError, RuntimeError) as err:
                raise W2WError(f"{paths[key]} is truncated or corrupt ({err}); {_BUILD_OURS}.") from err
            if t is None:
                raise W2WError(f"{paths[key]} has no tensor {key!r}: wrong file? {_BUILD_OURS}.")
            _check_float(t, paths[key], key, _BUILD_OURS)
            setattr(self, key, t.float())                                   # [D]
        info = _read_json(paths["identities"], dict, 'an object {"dataset_id", "identity_seeds", "extra", ...}')
        if "dataset_id" not in info:
            raise W2WError(f"{paths['identities']} has no dataset_id, so save_weights did not write it: wrong or "
                           f"damaged file; {_BUILD_OURS}.")
        seeds, extra = info.get("identity_seeds"), info.get("extra") or {}
        if seeds is not None and not (isinstance(seeds, list) and all(type(v) is int for v in seeds)):
            raise W2WError(f"{paths['identities']}: identity_seeds must be a list of ints (or null); it is "
                           f"{str(seeds)[:60]}; {_BUILD_OURS}.")
        if not isinstance(extra, dict):
            raise W2WError(f"{paths['identities']}: extra must be an object; it is a {type(extra).__name__}; "
                           f"{_BUILD_OURS}.")
        n = self.weights.shape[0] if self.weights.dim() == 2 else None
        if seeds is not None and n is not None and len(seeds) != n:  # before attributes.csv, which is checked against it
            raise W2WError(f"{paths['identities']} lists {len(seeds):,} identity seeds but {paths['weights'].name} "
                           f"has {n:,} rows: identities.json was edited or comes from another save; {_BUILD_OURS}.")
        ids["identities.json"] = info.get("dataset_id")
        if len(set(ids.values())) != 1:
            raise W2WError(f"The files in {self.folder} come from different saves (dataset_id {ids}): a crash "
                           f"during save_weights, or files mixed from two datasets; {_BUILD_OURS}.")
        self.identity_seeds, self.extra = seeds, extra
        self.dataset_id = info.get("dataset_id")
        wd = _read_json(paths["weight_dimensions"], list, "a list of [key, [rows, cols]] pairs")
        try:
            self.weight_dimensions = [(k, tuple(int(x) for x in v)) for k, v in wd
                                      if isinstance(k, str) and isinstance(v, list)]
        except (TypeError, ValueError) as err:
            raise W2WError(f"{paths['weight_dimensions']} entries are not [key, [rows, cols]] pairs ({err}); "
                           f"{_BUILD_OURS}.") from err
        if len(self.weight_dimensions) != len(wd):
            raise W2WError(f"{paths['weight_dimensions']} entries are not [key, [rows, cols]] pairs; {_BUILD_OURS}.")
        self._layout_dict = _read_json(paths["layout"], dict, "a LoRA layout (LoraLayout.to_dict())")
        try:
            saved = LoraLayout.from_dict(self._layout_dict)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise W2WError(f"{paths['layout']} is not a LoRA layout ({type(err).__name__}: {err}); "
                           f"{_BUILD_OURS}.") from err
        if _layout_weight_dimensions(saved) != self.weight_dimensions:
            raise LayoutError(f"layout.json and weight_dimensions.json in {self.folder} disagree; {_BUILD_OURS}.")
        if paths["attributes"].is_file() and n is not None:
            index, self._attributes = _read_attributes_csv(paths["attributes"], n, f"{_CSV_FIX}, or {_BUILD_OURS}")
            if self.identity_seeds is not None and index != [str(s) for s in self.identity_seeds]:
                raise W2WError(f"{paths['attributes']} rows are not in the order of identities.json (its first column "
                               f"must list the identity seeds in row order); {_CSV_FIX}, or {_BUILD_OURS}.")

    def _open_w2w(self) -> None:
        paths = {k: self._w2w_path(v) for k, v in W2W_FILES.items()}
        for key in ("weights", "mean", "std", "weight_dimensions"):
            if paths[key] is None:
                raise _missing(self.folder / W2W_FILES[key], _GET_W2W.format(
                    ", include_all_weights=True" if key == "weights" else ""))
        self._weights_path = paths["weights"]
        # weights_only: no arbitrary unpickling; mmap: all_weights stays on disk
        self.weights = _load_pt(paths["weights"], _FETCH_ARGS["weights"], mmap=True)
        self.mean, self.std = (_load_pt(paths[k]) for k in ("mean", "std"))
        wd = _load_pt(paths["weight_dimensions"])
        for key in ("weights", "mean", "std"):
            _check_float(getattr(self, key), paths[key], {"weights": "all_weights"}.get(key, key),
                         _GET_W2W.format(_FETCH_ARGS.get(key, "")).replace("fetch it", "fetch the original"))
        self.mean, self.std = self.mean.float(), self.std.float()
        if not isinstance(wd, Mapping):
            raise LayoutError(f"{paths['weight_dimensions']} holds a {type(wd).__name__}, not an ordered dict: "
                              f"wrong file? {_GET_W2W.format('')}.")
        try:
            self.weight_dimensions = [(k, tuple(int(s) for s in v[1])) for k, v in wd.items()]
        except (TypeError, IndexError, ValueError) as err:
            raise LayoutError(f"{paths['weight_dimensions']} entries are not key -> [[numel], shape]: wrong file? "
                              f"{_GET_W2W.format('')}.") from err
        self._w2w_wd, self._paths = wd, paths
        if self.weights.dim() == 2:
            self._file = _pt_row_file(paths["weights"], self.weights)
        # attributes.csv next to all_weights.pt, in files/ (where identity_df.pt lives), or in the folder itself
        places = (paths["weights"].parent, *(self.folder / d for d in _W2W_DIRS))
        csv_path = next((p / OURS_FILES["attributes"] for p in dict.fromkeys(places)
                         if (p / OURS_FILES["attributes"]).is_file()), None)
        if csv_path is not None and self.weights.dim() == 2:
            self._attributes = _read_attributes_csv(csv_path, self.weights.shape[0], _CSV_FIX)[1]

    def _validate(self) -> None:
        w = self.weights
        how = _BUILD_OURS if self.layout == "ours" else _GET_W2W.format(_FETCH_ARGS["weights"])
        _check_float(w, self._weights_path, "all_weights", how)  # never cast int/bool/complex silently
        if w.dim() != 2:
            raise W2WError(f"all_weights must be a 2-D float [N, D] tensor; it is {w.dtype} {tuple(w.shape)} in "
                           f"{self._weights_path}; {how}.")
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
        """A float32 copy of the chosen rows, ``[len(idx), D]`` (an int gives ``[1, D]``).

        Every row read is checked: a row with NaN/inf raises W2WError naming it (``check_finite`` lists all).
        """
        t = self._index(idx)
        out = self._read(t)
        suspect = torch.nonzero(~torch.isfinite(out.sum(1))).flatten()  # a finite row sum proves the row finite
        if suspect.numel():
            bad = suspect[~torch.isfinite(out[suspect]).all(1)]           # a sum may overflow: check those exactly
            if bad.numel():
                rows = sorted(set(t[bad].tolist()))
                raise W2WError(f"Row(s) {rows[:10]} of all_weights in {self.folder} have NaN/inf values: run "
                               f"ds.check_finite() to list every bad row, then leave them out (ds.rows(good_rows)) "
                               f"or rebuild those identities.")
        return out

    def _index(self, idx: int | slice | Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Row indices ``[M]`` (int64, in range, negatives wrapped) of any index :meth:`rows` takes."""
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
        return t % n if n else t

    def _read(self, t: torch.Tensor) -> torch.Tensor:
        """Rows ``t`` as float32 ``[len(t), D]``, unchecked; the file is read in increasing row order."""
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
            bad += _bad_rows(self._read(self._index(slice(s, s + batch_size))), s)
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
            obj = _load_pt(path, _FETCH_ARGS["identity_df"])  # plain tensors/lists: safe
        except _PickleRefused as err:  # a DataFrame pickles arbitrary classes
            if not self.trust_pickles:
                raise W2WError(
                    f"{path} is a pickle (a pandas DataFrame); loading it can run arbitrary code, so it is "
                    f"refused. If you trust its source, open with open_weights(..., trust_pickles=True) "
                    f"(unsafe; needs pandas), and convert it once with w2wlib.data.write_attributes_csv("
                    f"'{path.parent / OURS_FILES['attributes']}', ds.attributes): later opens read that CSV "
                    f"(attributes.csv is looked for next to all_weights.pt, in files/ and in the folder)."
                ) from err
            logger.warning("Unpickling %s with weights_only=False (trust_pickles=True).", path)
            obj = _load_pt(path, _FETCH_ARGS["identity_df"], weights_only=False)
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
        if names is None and self.dim == SD15_DIM and any(k.startswith("lora_unet_") for k, _ in self.weight_dimensions):
            from ..lora import sd15_meta_unet     # w2w's own spelling of SD 1.5's modules: map them through its UNet

            names = sd15_meta_unet()
        elif names is None:
            names = [_module_of_key(k) for k, _ in self.weight_dimensions]
        return layout_from_weight_dimensions(self._w2w_wd, names, alpha=27.0 if alpha is None else alpha,
                                             expected_dim=self.dim)


def _module_of_key(key: str) -> str:
    for suffix in (".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight"):
        if key.endswith(suffix):
            path = key[: -len(suffix)]
            for p in (PEFT_PREFIX, "unet.", "lora_unet."):
                path = path[len(p):] if path.startswith(p) else path
            if path.startswith("lora_unet_"):  # kohya spelling: dots became underscores, which cannot be undone
                raise LayoutError(f"weight_dimensions key {key!r} spells its module with underscores (lora_unet_...), "
                                  f"so the module's dotted name cannot be read from it: pass the UNet (or its module "
                                  f"names) to lora_layout(), e.g. ds.lora_layout(pipe.unet).")
            return path
    raise LayoutError(f"Cannot read a module name from weight_dimensions key {key!r}; pass the UNet (or "
                      f"its module names) to lora_layout(), e.g. ds.lora_layout(pipe.unet).")


class _PickleRefused(W2WError):
    """A ``.pt`` file holds more than plain tensors and containers, so ``weights_only=True`` refused it."""


_FETCH_ARGS = {"weights": ", include_all_weights=True", "identity_df": ", files=['identity_df.pt']"}


def _load_pt(path: Path, fetch_args: str = "", *, mmap: bool = False, weights_only: bool = True) -> Any:
    """``torch.load`` of one of w2w's files on the CPU; errors name the file and how to fetch it again."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise _PickleRefused(f"{path} holds Python objects other than tensors, so it is not loaded "
                             f"(weights_only=True): wrong file? {_REGET_W2W.format(fetch_args)}.") from err
    except (RuntimeError, ValueError, OSError, EOFError) as err:  # cut short: miniz/zip errors, short reads
        if "weights only load failed" in str(err).lower():
            raise _PickleRefused(f"{path} holds Python objects other than tensors, so it is not loaded "
                                 f"(weights_only=True): wrong file? {_REGET_W2W.format(fetch_args)}.") from err
        first = str(err).split(". ")[0].splitlines()[0][:160] if str(err) else type(err).__name__
        raise W2WError(f"Could not read {path} ({first}): {_REGET_W2W.format(fetch_args)}.") from err


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
