"""One LoRA row out as files a user's tools load: the diffusers file, the peft folder, the latent, a preview.

Every command that makes a model (``w2w invert``, ``w2w sample``, ``w2w edit``, ``w2w export``) writes
through :func:`export_lora`, so their folders look alike:

- ``pytorch_lora_weights.safetensors``: ``pipe.load_lora_weights(folder)`` (alpha kept in its metadata);
- ``peft/``: ``PeftModel.from_pretrained(unet, folder / "peft")``;
- ``latent.safetensors`` (when the row came from a space): the latent ``z`` and the space's kind;
- ``preview.png``: a strip of images (e.g. the input, then the model's images over several seeds).

A folder is written under a temporary name and renamed at the end, so a failure never leaves half of one.

Example:
    >>> export_lora("out/id0", W[0], layout, z=z[0], space="vae", preview=strip)   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import W2WError
from .lora import LoraLayout

__all__ = ["export_lora", "preview_strips", "FORMATS"]

FORMATS = ("diffusers", "peft")


def export_lora(folder: str | os.PathLike, w: torch.Tensor, layout: LoraLayout, *, formats=FORMATS,
                z: torch.Tensor | None = None, space: str | None = None, preview: np.ndarray | None = None,
                info: dict | None = None, overwrite: bool = False) -> Path:
    """Write LoRA row ``w [D]`` (raw weights) into ``folder`` in ``formats``; returns the folder."""
    from safetensors.torch import save_file

    from .lora_io import save_diffusers_lora, save_peft_adapter
    from .viz import png_bytes

    folder = Path(folder)
    w = torch.as_tensor(w).detach().float().cpu().reshape(-1)
    if w.numel() != layout.dim:
        raise W2WError(f"the LoRA row has {w.numel():,} values but the layout needs D={layout.dim:,}: wrong base model?")
    if not torch.isfinite(w).all():
        raise W2WError("the LoRA row has NaN or inf values: refusing to write a model that would draw black images")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise W2WError(f"unknown format {unknown[0]!r}: choose from {FORMATS}")
    if folder.exists() and not overwrite:
        raise W2WError(f"{folder} exists: choose another --out, or remove it first")
    if folder.parent.exists() and not folder.parent.is_dir():
        raise W2WError(f"{folder.parent} is a file, not a folder: choose another --out")
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if "diffusers" in formats:
            save_diffusers_lora(w, layout, tmp)
        if "peft" in formats:
            save_peft_adapter(w, layout, tmp / "peft")
        if z is not None:
            save_file({"z": torch.as_tensor(z).detach().float().cpu().reshape(1, -1).contiguous()},
                      str(tmp / "latent.safetensors"), metadata={"space": str(space or "")})
        if preview is not None:
            (tmp / "preview.png").write_bytes(png_bytes(preview))
        if info is not None:
            (tmp / "info.json").write_text(json.dumps(info, indent=1, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def preview_strips(pipe, W: torch.Tensor, layout: LoraLayout, *, n_preview: int, seed: int = 0,
                   lead: np.ndarray | None = None, progress: bool = False, **draw) -> list[np.ndarray]:
    """One preview strip per row of ``W``: its images over ``n_preview`` noise seeds, after ``lead[g]`` if given
    (e.g. the input image of an inversion). ``draw``: :func:`w2wlib.generate.generate`'s ``prompt``, ``steps``,
    ``guidance``, ``negative_prompt`` (a command passes its profile's, :attr:`w2wlib.models.Models.draw`)."""
    from .generate import generate
    from .viz import image_grid

    imgs = generate(pipe, W, n_per_row=n_preview, seed=seed, progress=progress, **{**draw, "layout": layout})
    rows = [list(imgs[g * n_preview:(g + 1) * n_preview]) for g in range(len(W))]
    if lead is not None:
        rows = [[lead[g], *row] for g, row in enumerate(rows)]
    return [image_grid(row, nrow=len(row)) for row in rows]
