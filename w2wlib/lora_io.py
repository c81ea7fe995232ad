"""Conversions between flat LoRA vectors and the ecosystem's files.

Each conversion is an exact round trip for a given :class:`~w2wlib.lora.LoraLayout`:

- peft state dicts (``...to_q.lora_A.weight``) and adapter folders (``adapter_config.json`` +
  ``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained``);
- diffusers LoRA files (``pytorch_lora_weights.safetensors``, loadable with ``pipe.load_lora_weights``,
  with ``lora_alpha`` kept in the file's metadata);
- the key lists of the public w2w files (``weight_dimensions.pt``), in any of the spellings seen in
  the wild (peft, diffusers, ``lora_unet_`` prefixed, kohya underscores), mapped to UNet modules by
  matching names, never by chained string replaces.

Example:
    >>> from w2wlib.lora import LoraLayout
    >>> layout = LoraLayout.from_modules([("blk.to_q", 4, 4)], rank=1, alpha=27.0, target_modules=("to_q",))
    >>> sd = vector_to_state_dict(torch.arange(8.0), layout)
    >>> torch.equal(state_dict_to_vector(sd, layout), torch.arange(8.0))
    True
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .errors import LayoutError
from .lora import DIFFUSERS_WEIGHT_NAME, PEFT_PREFIX, LoraLayout

__all__ = [
    "vector_to_state_dict",
    "state_dict_to_vector",
    "save_peft_adapter",
    "load_peft_adapter",
    "save_diffusers_lora",
    "load_diffusers_lora",
    "layout_from_weight_dimensions",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- key spellings

_KEY_RE = re.compile(
    r"^(?P<path>.+?)[._]lora(?:[._](?P<ab>A|B|down|up))(?:\.(?!weight$)[A-Za-z0-9_\-]+)?\.weight$")
_PREFIXES = ("base_model.model.", "unet.", "lora_unet_", "lora_unet.")
_AB = {"A": "A", "down": "A", "B": "B", "up": "B"}


def _norm(name: str) -> str:
    return name.replace(".", "_")


def _parse_key(key: str) -> tuple[str, str] | None:
    """``(normalised module path, "A"|"B")`` for any known spelling, else None."""
    m = _KEY_RE.match(key)
    if m is None:
        return None
    path = m["path"]
    for p in _PREFIXES:
        if path.startswith(p):
            path = path[len(p):]
            break
    return _norm(path), _AB[m["ab"]]


def _module_index(modules: Iterable[str]) -> dict[str, str]:
    index: dict[str, str] = {}
    for m in modules:
        if index.setdefault(_norm(m), m) != m:
            raise LayoutError(f"Modules {index[_norm(m)]!r} and {m!r} have the same underscore name.")
    return index


def _map_keys(keys: Iterable[str], modules: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Map every key to ``(module, "A"|"B")``; unknown keys raise LayoutError naming them."""
    index = _module_index(modules)
    mapped, bad = {}, []
    for k in keys:
        p = _parse_key(k)
        if p is None or p[0] not in index:
            bad.append(k)
        else:
            mapped[k] = (index[p[0]], p[1])
    if bad:
        raise LayoutError(f"{len(bad)} key(s) match no LoRA module of this layout/UNet: {bad[:8]}. Keys may be in "
                          f"peft, diffusers, lora_unet_ or kohya spelling of a module name: are these LoRAs of "
                          f"this base model (pass its UNet, or the layout the weights were saved with)?")
    return mapped


# --------------------------------------------------------------------------- state dicts


def _as_vector(vec: torch.Tensor, layout: LoraLayout) -> torch.Tensor:
    vec = torch.as_tensor(vec)
    if vec.dim() == 2 and vec.shape[0] == 1:
        vec = vec[0]
    if vec.dim() != 1 or vec.numel() != layout.dim:
        raise LayoutError(f"Vector has shape {tuple(vec.shape)} but the layout needs [{layout.dim:,}].")
    return vec


def vector_to_state_dict(vec: torch.Tensor, layout: LoraLayout, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flat vector -> peft state dict ``{prefix}<module>.lora_A.weight`` / ``.lora_B.weight`` (copies).

    >>> sd = vector_to_state_dict(w, layout)                           # doctest: +SKIP
    >>> torch.equal(state_dict_to_vector(sd, layout), w)               # doctest: +SKIP
    True
    """
    vec = _as_vector(vec, layout)
    sd = {}
    for e in layout.entries:
        sd[f"{prefix}{e.module}.lora_A.weight"] = vec[e.a_slice].reshape(e.a_shape).clone()
        sd[f"{prefix}{e.module}.lora_B.weight"] = vec[e.b_slice].reshape(e.b_shape).clone()
    return sd


def state_dict_to_vector(sd: Mapping[str, torch.Tensor], layout: LoraLayout) -> torch.Tensor:
    """LoRA state dict -> flat vector. Keys may be peft, peft-file, diffusers or kohya spelling.

    Missing, unknown, duplicate or mis-sized keys raise LayoutError naming them.
    """
    mapped = _map_keys(sd, layout.by_module)
    got: dict[tuple[str, str], str] = {}
    for k, mk in mapped.items():
        if mk in got:
            raise LayoutError(f"Keys {got[mk]!r} and {k!r} both give {mk[1]} of {mk[0]!r}.")
        got[mk] = k
    missing = [f"{m}.lora_{ab}.weight" for m in layout.by_module for ab in "AB" if (m, ab) not in got]
    if missing:
        raise LayoutError(f"{len(missing)} LoRA tensor(s) missing from the state dict: {missing[:8]}")
    first = next(iter(sd.values()))
    vec = torch.empty(layout.dim, dtype=first.dtype if first.is_floating_point() else torch.float32)
    bad = []
    for e in layout.entries:
        for ab, sl, shape in (("A", e.a_slice, e.a_shape), ("B", e.b_slice, e.b_shape)):
            t = sd[got[(e.module, ab)]]
            if tuple(t.shape) != shape:
                bad.append(f"{got[(e.module, ab)]}: {tuple(t.shape)} != {shape}")
            else:
                vec[sl] = t.detach().reshape(-1).to(vec.dtype).cpu()
    if bad:
        raise LayoutError(f"{len(bad)} LoRA tensor(s) have the wrong shape: {bad[:8]}")
    return vec


def _rescale_b(vec: torch.Tensor, layout: LoraLayout, file_scale: float, source: str) -> torch.Tensor:
    """Fold a file's own alpha/rank into B so that the vector means the same under ``layout.alpha``."""
    if math.isclose(file_scale, layout.scale, rel_tol=1e-9):
        return vec
    logger.warning("%s has LoRA scale %g but the layout's is %g; rescaling B so the model is unchanged.",
                   source, file_scale, layout.scale)
    vec = vec.clone()
    for e in layout.entries:
        vec[e.b_slice] *= file_scale / layout.scale
    return vec


def _lora_config(layout: LoraLayout):
    from peft import LoraConfig

    return LoraConfig(r=layout.rank, lora_alpha=layout.alpha,
                      target_modules=[e.module for e in layout.entries], init_lora_weights=True)


# --------------------------------------------------------------------------- peft folders


def save_peft_adapter(vec: torch.Tensor, layout: LoraLayout, folder: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for ``PeftModel.from_pretrained``.

    The config comes from peft's ``LoraConfig.save_pretrained``; the weights file has the keys and
    metadata of ``PeftModel.save_pretrained`` (``base_model.model.<module>.lora_A.weight``).
    """
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    _lora_config(layout).save_pretrained(
        str(folder), auto_mapping_dict={"base_model_class": "UNet2DConditionModel",
                                        "parent_library": "diffusers.models.unets.unet_2d_condition"})
    sd = vector_to_state_dict(vec.detach().cpu(), layout, prefix=PEFT_PREFIX)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, SAFETENSORS_WEIGHTS_NAME),
              metadata={"format": "pt"})


def load_peft_adapter(folder: str | os.PathLike, layout: LoraLayout) -> torch.Tensor:
    """Read a peft adapter folder into a flat vector (B rescaled if its alpha differs, with a warning)."""
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    cfg = LoraConfig.from_pretrained(str(folder))
    if cfg.rank_pattern or cfg.alpha_pattern or getattr(cfg, "use_dora", False):
        raise LayoutError(f"{folder}: per-module rank/alpha patterns and DoRA are not supported.")
    vec = state_dict_to_vector(load_peft_weights(str(folder), device="cpu"), layout)
    scale = cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
    return _rescale_b(vec, layout, scale, str(folder))


# --------------------------------------------------------------------------- diffusers files


def save_diffusers_lora(vec: torch.Tensor, layout: LoraLayout, folder: str | os.PathLike,
                        weight_name: str = DIFFUSERS_WEIGHT_NAME) -> None:
    """Write a diffusers LoRA file that ``pipe.load_lora_weights(folder)`` loads with alpha intact.

    Keys are ``unet.<module>.lora.down.weight`` (diffusers' own conversion of the peft keys), and the
    peft config goes into the file's metadata, which is what keeps ``lora_alpha`` on reload.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    sd = vector_to_state_dict(vec.detach().cpu(), layout)
    conv = convert_state_dict_to_diffusers(sd)
    if any(".lora_A." in k or ".lora_B." in k for k in conv):  # modules diffusers cannot rename
        conv = sd
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=conv, weight_name=weight_name,
        unet_lora_adapter_metadata=_lora_config(layout).to_dict())


def load_diffusers_lora(folder: str | os.PathLike, layout: LoraLayout,
                        weight_name: str | None = None) -> torch.Tensor:
    """Read a diffusers LoRA file (UNet part) into a flat vector.

    The file's alpha comes from its metadata; without metadata diffusers uses alpha = rank, and B is
    rescaled (with a warning) so that the vector gives the same model as ``load_lora_weights``.
    """
    from diffusers import StableDiffusionPipeline

    sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(
        str(folder), weight_name=weight_name, return_lora_metadata=True)
    unet_sd = {k: v for k, v in sd.items() if not k.startswith("text_encoder")}
    vec = state_dict_to_vector(unet_sd, layout)
    meta = {k[len("unet."):]: v for k, v in (meta or {}).items() if k.startswith("unet.")}
    if meta:
        if meta.get("rank_pattern") or meta.get("alpha_pattern"):
            raise LayoutError(f"{folder}: per-module rank/alpha patterns are not supported.")
        scale = meta["lora_alpha"] / (math.sqrt(meta["r"]) if meta.get("use_rslora") else meta["r"])
    elif alphas:
        values = {float(a) for a in alphas.values()}
        if len(values) != 1:
            raise LayoutError(f"{folder}: per-module alphas {sorted(values)} are not supported.")
        scale = values.pop() / layout.rank
    else:
        scale = 1.0
    return _rescale_b(vec, layout, scale, str(folder))


# --------------------------------------------------------------------------- public w2w files


def layout_from_weight_dimensions(weight_dimensions: Mapping[str, Any],
                                  unet_module_names: Iterable[str] | nn.Module, alpha: float = 27.0,
                                  expected_dim: int | None = None) -> LoraLayout:
    """The layout of w2w's ``weight_dimensions.pt`` (ordered ``key -> [[numel], shape]``).

    Its order defines the flat order. Keys may be in peft, diffusers, ``lora_unet_`` or kohya
    underscore spelling; each is mapped to a UNet module by comparing underscore-normalised names.
    Pass the UNet itself (not just its module names) to match only its Linears and check their shapes.

    >>> wd = torch.load("weight_dimensions.pt")                                  # doctest: +SKIP
    >>> layout = layout_from_weight_dimensions(wd, unet, expected_dim=99648)      # doctest: +SKIP
    """
    shapes: dict[str, tuple[int, int]] = {}
    if isinstance(unet_module_names, nn.Module):
        shapes = {n: (m.in_features, m.out_features) for n, m in unet_module_names.named_modules()
                  if isinstance(m, nn.Linear)}
        names: Iterable[str] = shapes
    else:
        names = unet_module_names
    mapped = _map_keys(weight_dimensions, names)
    order: list[tuple[str, str, tuple[int, ...]]] = []
    bad = []
    for key, value in weight_dimensions.items():
        numel, shape = value[0], tuple(int(s) for s in value[1])
        numel = int(numel[0] if isinstance(numel, (list, tuple, torch.Size)) else numel)
        if len(shape) != 2 or math.prod(shape) != numel:
            bad.append(f"{key}: numel {numel} shape {shape}")
        order.append((key, *mapped[key], shape))
    if bad:
        raise LayoutError(f"{len(bad)} weight_dimensions entries are mis-sized: {bad[:8]}")
    if len(order) % 2:
        raise LayoutError(f"weight_dimensions has an odd number of keys ({len(order)}): an A or B is missing.")
    modules, rank = [], None
    for (ka, ma, aba, sa), (kb, mb, abb, sb) in zip(order[::2], order[1::2], strict=True):
        if ma != mb or (aba, abb) != ("A", "B"):
            raise LayoutError(f"Keys {ka!r}, {kb!r} are not the A then B of one module; the flat "
                              f"layout needs each module's A directly followed by its B.")
        r, fin = sa
        fout, r2 = sb
        if r != r2 or (rank is not None and r != rank) or (ma in shapes and shapes[ma] != (fin, fout)):
            raise LayoutError(f"Keys {ka!r}, {kb!r} have shapes {sa}, {sb}, which do not fit rank "
                              f"{rank or r} and module {ma!r} {shapes.get(ma, '')}.")
        rank = r
        modules.append((ma, fin, fout))
    if len({m for m, _, _ in modules}) != len(modules):
        raise LayoutError("weight_dimensions names some module more than once.")
    targets = tuple(dict.fromkeys(m.rsplit(".", 1)[-1] for m, _, _ in modules))
    layout = LoraLayout.from_modules(modules, rank=rank or 1, alpha=alpha, target_modules=targets)
    if expected_dim is not None and layout.dim != expected_dim:
        raise LayoutError(f"weight_dimensions sums to {layout.dim:,} but {expected_dim:,} was expected.")
    return layout
