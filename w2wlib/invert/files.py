"""``w2w invert``: image files in, one model folder per image out (diffusers file, peft folder, latent, preview)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..errors import W2WError

__all__ = ["invert_files"]


def _names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Folder names from file stems; a repeated stem gets its position appended."""
    stems = [Path(p).stem or f"image{i}" for i, p in enumerate(paths)]
    return [s if stems.count(s) == 1 else f"{s}_{i}" for i, s in enumerate(stems)]


def invert_files(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, pipe, spaces, space: str = "vae",
                 cfg=None, amortised_steps: int | None = None, amortised_scale: float = 1.0, n_preview: int = 4,
                 seed: int = 0, overwrite: bool = False, progress: bool = True, draw: dict | None = None) -> list[Path]:
    """Invert each image file into ``spaces.space(space)`` (all in one batch) and export one folder each.

    ``cfg`` (an :class:`~w2wlib.invert.InversionConfig`) says how; or, with ``amortised_steps`` set, the
    space's shipped amortised inverter answers in one forward pass, refined by that many gradient steps
    (0: none) with ``cfg``'s other settings; ``amortised_scale`` scales its answer first
    (:func:`~w2wlib.invert.amortised.predict_inversion`).

    Images are read with :func:`w2wlib.images.load_images` (grayscale and RGBA converted, square
    images resized, the rest refused with the fix). Each folder holds what :func:`w2wlib.export.export_lora`
    writes; the preview is the input, then the inverted model's images over ``n_preview`` seeds, drawn with
    ``draw`` (the profile's steps, guidance, negative prompt) and ``cfg``'s prompt, the one the inversion trained with.
    """
    from ..export import export_lora, preview_strips
    from ..images import load_images
    from ..viz import to_tensor
    from . import InversionConfig, invert
    from .amortised import invert_amortised

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise W2WError(f"--out {out} is a file: give a folder (it is created if missing)")
    names = _names(paths)
    clash = [n for n in names if (out / n).exists()]
    if clash and not overwrite:
        raise W2WError(f"{out / clash[0]} exists: choose another --out, or pass --overwrite")
    if amortised_steps is None and amortised_scale != 1.0:
        raise W2WError("--scale applies to --method amortised only (it scales the inverter's answer)")
    cfg = cfg or InversionConfig()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    arr = load_images(list(paths), size)                                                  # [G, H, W, 3]
    layout = spaces.dataset.lora_layout(pipe.unet)
    if amortised_steps is None:
        res = invert(pipe, spaces.space(space), to_tensor(arr), cfg=cfg, layout=layout, progress=progress)
    else:
        res = invert_amortised(pipe, spaces.space(space), spaces.amortised(space), to_tensor(arr),
                               steps=amortised_steps, cfg=cfg, layout=layout, progress=progress, scale=amortised_scale)
    strips = preview_strips(pipe, res.W, layout, n_preview=n_preview, seed=seed, lead=arr, progress=progress,
                            **{**(draw or {}), "prompt": cfg.prompt})
    written = []
    for i, (path, name, strip) in enumerate(zip(paths, names, strips)):
        info = {"input": str(path), "space": space, "inversion": res.config, "seconds": res.seconds / len(names),
                "final_loss": res.history[-1]["loss"][i] if res.history else None, "preview_seed": seed}
        written.append(export_lora(out / name, res.W[i], layout, z=res.z[i], space=space, preview=strip, info=info,
                                   overwrite=overwrite))
    return written
