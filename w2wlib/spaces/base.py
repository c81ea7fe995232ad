"""The :class:`WeightSpace` interface, its on-disk format, and the row source shared by fitting and training.

Every space works in the **standardised** weight space of :mod:`w2wlib.data`: callers pass
``ds.standardise(w)`` (``(w - mean) / std`` per dimension, as w2w does) and get standardised rows back.
A space may also carry the dataset's ``mean``/``std`` (``PCASpace.fit`` and ``train_vae`` store them);
then :meth:`WeightSpace.encode_weights` / :meth:`WeightSpace.decode_weights` map raw LoRA vectors.

On disk a space is a folder of two files, written together and renamed into place in one step:

- ``config.json``: ``{"format", "kind", "w2wlib_version", "space_id", "config"}``;
- ``tensors.safetensors``: the space's tensors, with the same ``space_id`` in its metadata.

``space_id`` is a sha256 of the saved config and tensors, and the safetensors header is written with
sorted keys, so saving the same space twice gives byte-identical folders.

Example:
    >>> import torch
    >>> from w2wlib.spaces import PCASpace, load_space
    >>> x = torch.randn(50, 20, generator=torch.Generator().manual_seed(0))  # standardised rows
    >>> space = PCASpace.fit(x, k=5)
    >>> space.encode(x).shape, space.decode(space.encode(x)).shape
    (torch.Size([50, 5]), torch.Size([50, 20]))
"""

from __future__ import annotations

import abc
import json
import logging
import math
import numbers
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch

from .._version import __version__
from ..errors import ArtifactMissingError, W2WError
from ..stages import content_id, sort_safetensors_header

__all__ = ["WeightSpace", "load_space", "active_units", "CONFIG_FILE", "TENSORS_FILE"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TENSORS_FILE = "tensors.safetensors"
_FORMAT = "w2wlib-weight-space"
_KINDS: dict[str, type["WeightSpace"]] = {}
_RESAVE = "fit or train the space again and save it with space.save(folder, overwrite=True)"


class WeightSpace(abc.ABC):
    """A map between standardised weights ``[N, D]`` and latents ``[N, k]``.

    Subclasses set ``kind`` and implement ``dim``, ``latent_dim``, ``encode``, ``decode``, ``sample``
    and the two halves of saving, ``_state`` (config dict, tensors) and ``_from_state``.

    >>> z = space.sample(4, torch.Generator().manual_seed(0))        # [4, k]   # doctest: +SKIP
    >>> w = ds.unstandardise(space.decode(z))                        # [4, D] raw LoRA rows  # doctest: +SKIP
    """

    kind: ClassVar[str] = ""
    mean: torch.Tensor | None = None  # [D] the dataset's mean, if known
    std: torch.Tensor | None = None   # [D] the dataset's std, if known

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.kind:
            _KINDS[cls.kind] = cls

    # ------------------------------------------------------------------ the interface
    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """D, the length of a weight vector."""

    @property
    @abc.abstractmethod
    def latent_dim(self) -> int:
        """k, the length of a latent."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where the space's tensors live; inputs are moved here."""

    @abc.abstractmethod
    def encode(self, w_std: torch.Tensor) -> torch.Tensor:
        """Standardised weights ``[N, D]`` -> latents ``[N, k]``."""

    @abc.abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, k]`` -> standardised weights ``[N, D]`` (differentiable in ``z``)."""

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None, *, scale: float = 1.0) -> torch.Tensor:
        """``n`` latents ``[n, k]`` from the space's prior; ``scale`` multiplies its spread."""

    @abc.abstractmethod
    def _state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON config, tensors) that :meth:`_from_state` rebuilds the space from."""

    @classmethod
    @abc.abstractmethod
    def _from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "WeightSpace":
        ...

    # ------------------------------------------------------------------ built on it
    def sample_weights(self, n: int, generator: torch.Generator | None = None, *, scale: float = 1.0,
                       raw: bool = False) -> torch.Tensor:
        """``decode(sample(n))``: ``[n, D]`` standardised weights, or raw LoRA rows with ``raw=True``."""
        with torch.no_grad():
            w = self.decode(self.sample(n, generator, scale=scale))
        return self.unstandardise(w) if raw else w

    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
        """``steps`` latents on the segment from ``a`` to ``b`` (both ends included): ``[steps, k]``.

        >>> space.interpolate(z[0], z[1], 5)[[0, -1]]  # == stack([z[0], z[1]])   # doctest: +SKIP
        """
        if steps < 2:
            raise W2WError(f"interpolate needs steps >= 2 (both ends are included), not {steps}.")
        a, b = (self._check_latent(t.reshape(1, -1) if t.dim() == 1 else t, name) for t, name in ((a, "a"), (b, "b")))
        if a.shape[0] != 1 or b.shape[0] != 1:
            raise W2WError(f"interpolate takes one latent per end ([k] or [1, k]); got {tuple(a.shape)} and "
                           f"{tuple(b.shape)}.")
        t = torch.linspace(0, 1, steps, device=a.device, dtype=a.dtype)[:, None]  # [steps, 1]
        out = (1 - t) * a + t * b                                                # [steps, k]
        out[-1] = b[0]  # exact end point despite rounding in (1 - t) * a + t * b
        return out

    def standardise(self, w: torch.Tensor) -> torch.Tensor:
        """``(w - mean) / std`` with the statistics the space was fit with."""
        mean, std = self._stats()
        return (w - mean.to(w)) / std.to(w)

    def unstandardise(self, w_std: torch.Tensor) -> torch.Tensor:
        """``w_std * std + mean``, the inverse of :meth:`standardise`."""
        mean, std = self._stats()
        return w_std * std.to(w_std) + mean.to(w_std)

    def encode_weights(self, w: torch.Tensor) -> torch.Tensor:
        """Raw LoRA rows ``[N, D]`` -> latents ``[N, k]`` (standardises first)."""
        _check_float_dtype(w, "w")
        return self.encode(self.standardise(w.to(self.device, torch.float32)))

    def decode_weights(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, k]`` -> raw LoRA rows ``[N, D]``."""
        return self.unstandardise(self.decode(z))

    def set_standardisation(self, mean: torch.Tensor | None, std: torch.Tensor | None) -> None:
        """Record the dataset statistics (``[D]`` each) that raw weights are standardised with."""
        if (mean is None) != (std is None):
            raise W2WError("Pass both mean and std, or neither.")
        if mean is not None:
            for name, t in (("mean", mean), ("std", std)):
                _check_float_dtype(t, name)
                if tuple(t.shape) != (self.dim,):
                    raise W2WError(f"{name} has shape {tuple(t.shape)} but this space has D={self.dim:,}.")
            if not (torch.isfinite(mean).all() and (std > 0).all()):
                raise W2WError("mean must be finite and std positive to standardise with them.")
            mean, std = mean.detach().float().cpu().clone(), std.detach().float().cpu().clone()
        self.mean, self.std = mean, std

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None or self.std is None:
            raise W2WError(f"This {type(self).__name__} has no dataset mean/std, so it only maps standardised "
                           f"weights: pass ds.standardise(w) instead, or call "
                           f"space.set_standardisation(ds.mean, ds.std).")
        return self.mean, self.std

    # ------------------------------------------------------------------ input checks
    def _check_weights(self, w: torch.Tensor, name: str = "w_std") -> torch.Tensor:
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise W2WError(f"{name} must be a 2-D tensor [N, D]; got {getattr(w, 'shape', type(w).__name__)}.")
        if w.shape[1] != self.dim:
            raise W2WError(f"{name} has {w.shape[1]:,} columns but this {type(self).__name__} has D={self.dim:,}: "
                           f"wrong dataset or layout?")
        _check_float_dtype(w, name)
        _check_finite(w, name)
        return w.to(self.device, torch.float32)

    def _check_latent(self, z: torch.Tensor, name: str = "z") -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise W2WError(f"{name} must be [N, {self.latent_dim}] latents of this {type(self).__name__}; got "
                           f"{tuple(getattr(z, 'shape', ()))}.")
        _check_float_dtype(z, name)
        _check_finite(z, name)
        return z.to(self.device, torch.float32)

    # ------------------------------------------------------------------ saving
    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the space to ``folder`` (``config.json`` + ``tensors.safetensors``); returns the folder.

        Both files go to a temporary sibling folder that is renamed into place, so a crash leaves either
        the old space or the new one, never a mix.

        >>> space.save("data/spaces/pca")           # doctest: +SKIP
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        if folder.exists() and not overwrite:
            raise W2WError(f"{folder} already exists; pass overwrite=True to replace it, or choose another folder.")
        config, tensors = self._state()
        if self.mean is not None:
            tensors = {**tensors, "_mean": self.mean, "_std": self.std}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        doc = {"format": _FORMAT, "kind": self.kind, "w2wlib_version": __version__, "space_id": "",
               "config": config}
        text = json.dumps(doc, indent=1)  # fails here, before anything is written, if not JSON-able
        doc["space_id"] = space_id = content_id(text, tensors)  # same content, same id: reproducible files
        text = json.dumps(doc, indent=1)
        folder.parent.mkdir(parents=True, exist_ok=True)
        unique = uuid.uuid4().hex[:8]  # temporaries only: two saves at once never share them
        tmp = folder.parent / f".{folder.name}.{unique}.tmp"
        old = folder.parent / f".{folder.name}.{unique}.old"
        try:
            tmp.mkdir()
            save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "pt", "space_id": space_id, "kind": self.kind})
            sort_safetensors_header(tmp / TENSORS_FILE)
            (tmp / CONFIG_FILE).write_text(text, encoding="utf-8")
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        logger.info("Saved %s space (D=%d, k=%d) to %s", self.kind, self.dim, self.latent_dim, folder)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "WeightSpace":
        """Load a space written by :meth:`save`; ``WeightSpace.load`` (or :func:`load_space`) takes any kind."""
        doc, tensors = _read_folder(Path(folder))
        kind = doc.get("kind")
        target = _KINDS.get(kind)
        if target is None:
            raise W2WError(f"{Path(folder) / CONFIG_FILE} names an unknown space kind {kind!r} (known: "
                           f"{sorted(_KINDS)}); was it written by a newer w2wlib?")
        if cls is not WeightSpace and not issubclass(target, cls):
            raise W2WError(f"{folder} holds a {kind!r} space, not {cls.kind!r}: load it with "
                           f"w2wlib.spaces.load_space(folder) or {target.__name__}.load(folder).")
        mean, std = tensors.pop("_mean", None), tensors.pop("_std", None)
        try:
            space = target._from_state(doc.get("config") or {}, tensors)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise W2WError(f"{folder} does not hold a valid {kind!r} space ({type(err).__name__}: {err}); "
                           f"{_RESAVE}.") from err
        space.set_standardisation(mean, std)
        if doc.get("w2wlib_version") != __version__:
            logger.info("%s was saved by w2wlib %s (this is %s)", folder, doc.get("w2wlib_version"), __version__)
        return space

    def __repr__(self) -> str:
        return f"{type(self).__name__}(D={self.dim}, k={self.latent_dim})"


def load_space(folder: str | os.PathLike) -> WeightSpace:
    """Load any saved space (PCA or VAE), dispatching on the ``kind`` in its ``config.json``.

    >>> space = load_space("data/spaces/vae")   # a VAESpace       # doctest: +SKIP
    """
    return WeightSpace.load(folder)


def active_units(z_mean: torch.Tensor, threshold: float = 0.01) -> tuple[int, torch.Tensor]:
    """Active latent units (Burda et al. 2016, "Importance Weighted Autoencoders", sec. 5.2).

    A unit is active when the variance over the data of its posterior mean exceeds ``threshold``.
    ``z_mean`` is ``space.encode(w_std)`` ``[N, k]``; returns (count, per-unit variance ``[k]``).
    Few active units mean posterior collapse.

    >>> n, var = active_units(torch.randn(100, 4) * torch.tensor([1, 1, 0, 0]))
    >>> n
    2
    """
    if z_mean.dim() != 2 or z_mean.shape[0] < 2:
        raise W2WError(f"active_units needs encoded means [N >= 2, k]; got {tuple(z_mean.shape)}.")
    var = z_mean.detach().double().var(0)
    return int((var > threshold).sum()), var.float()


# ---------------------------------------------------------------------- helpers


def _check_float_dtype(t: torch.Tensor, name: str) -> None:
    """Refuse int, bool and complex tensors, which ``.to(float32)`` would cast silently."""
    if isinstance(t, torch.Tensor) and not t.is_floating_point():
        raise W2WError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}, but weights and latents must be "
                       f"float32 (or float16, bfloat16, float64): pass {name}.float() if the values are right, or "
                       f"check where {name} came from.")


def _check_sample_args(n: int, scale: float) -> None:
    """``sample(n, scale=...)``: n a positive int, scale a finite positive number (else NaN or degenerate draws)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise W2WError(f"sample needs an int n >= 1, not {n!r}.")
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.is_complex():
        scale = float(scale)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise W2WError(f"scale must be a finite number > 0 (1.0 samples the prior as fitted, < 1 stays closer to "
                       f"its centre), not {scale!r}.")


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        rows = torch.nonzero(~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)).flatten()
        raise W2WError(f"{name} has NaN/inf in {rows.numel():,} row(s) (first {rows[:10].tolist()}); drop or "
                       f"fix those rows (ds.check_finite() lists every bad row of a dataset).")


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not folder.is_dir():
        raise ArtifactMissingError(f"No weight space at {folder}: fit one (PCASpace.fit) or train one "
                                   f"(w2wlib.train.train_vae) and save it with space.save('{folder}').")
    cfg_path, ten_path = folder / CONFIG_FILE, folder / TENSORS_FILE
    for p in (cfg_path, ten_path):
        if not p.is_file():
            raise ArtifactMissingError(f"{p.name} is missing from {folder}: {_RESAVE}.")
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise W2WError(f"{cfg_path} is not valid JSON ({err}); {_RESAVE}.") from err
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise W2WError(f"{cfg_path} is not a w2wlib weight-space config (format {_FORMAT!r}); wrong folder?")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(ten_path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise W2WError(f"{ten_path} is corrupt or truncated ({err}); {_RESAVE}.") from err
    if meta.get("space_id") != doc.get("space_id"):
        raise W2WError(f"{cfg_path.name} and {ten_path.name} in {folder} come from different saves; {_RESAVE}.")
    return doc, tensors


class _StdRows:
    """Standardised float32 rows from a tensor (taken as already standardised) or a WeightsDataset.

    ``get(idx)`` returns ``[len(idx), D]``; a dataset is read memory-mapped, only the rows asked for.
    """

    def __init__(self, data: Any):
        from ..data import WeightsDataset

        self.dataset = data if isinstance(data, WeightsDataset) else None
        if self.dataset is not None:
            self.n, self.dim = len(data), data.dim
            self.mean, self.std = data.mean, data.std
        elif isinstance(data, torch.Tensor):
            if data.dim() != 2 or not data.is_floating_point():
                raise W2WError(f"Weights must be a 2-D float tensor [N, D] or a WeightsDataset; got "
                               f"{data.dtype} {tuple(data.shape)}.")
            self.tensor, (self.n, self.dim) = data.detach(), data.shape
            self.mean = self.std = None
        else:
            raise W2WError(f"Weights must be a standardised [N, D] tensor or a WeightsDataset, not "
                           f"{type(data).__name__}.")

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        if self.dataset is not None:
            x = self.dataset.standardise(self.dataset.rows(idx))
        else:
            x = self.tensor[idx.to(self.tensor.device)].to("cpu", torch.float32)
        if not torch.isfinite(x).all():
            bad = idx[~torch.isfinite(x).all(1).cpu()]
            raise W2WError(f"Row(s) {bad[:10].tolist()} of the weights have NaN/inf; drop or fix them "
                           f"(ds.check_finite() lists every bad row of a dataset).")
        return x

    def blocks(self, rows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        """``[b, D]`` blocks of the given rows, read in increasing row order."""
        rows = torch.sort(rows).values
        for s in range(0, rows.numel(), batch_size):
            yield self.get(rows[s:s + batch_size])

    def select(self, rows: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        if rows is None:
            return torch.arange(self.n)
        r = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if r.numel() and (int(r.min()) < 0 or int(r.max()) >= self.n):
            raise W2WError(f"rows must index the {self.n:,} rows of the weights (0 ... {self.n - 1}).")
        if torch.unique(r).numel() != r.numel():
            raise W2WError("rows must not repeat a row.")
        return r
