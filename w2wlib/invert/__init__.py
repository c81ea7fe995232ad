"""Single-image inversion into a weight space: gradient (w2w), CMA-ES (w2w++'s attempt, made to work)
and amortised (one forward pass).

Example:
    >>> res = invert(pipe, space, images, cfg=InversionConfig(method="cmaes", steps=60))   # doctest: +SKIP
    >>> res.W.shape                                                                        # doctest: +SKIP
    torch.Size([4, 5376])
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..diffusion import training_scheduler
from ..dreambooth import _Frozen, encode_images, encode_prompts
from ..errors import W2WError
from ..lora import BatchedLora, LoraLayout
from .cmaes import default_popsize, run_cmaes
from .core import Inversion, InversionConfig, InversionObjective, _Timer, comparison_methods, prior_scale
from .gradient import run_gradient

__all__ = ["invert", "Inversion", "InversionConfig", "InversionObjective", "prior_scale", "default_popsize",
           "latent_masks", "comparison_methods"]


def latent_masks(masks: torch.Tensor, latent_size: int) -> torch.Tensor:
    """Image masks ``[G, H, W]`` (bool or [0, 1]) -> ``[G, 1, h, w]`` weights at the latent's resolution."""
    m = torch.as_tensor(masks).float()
    if m.dim() != 3:
        raise W2WError(f"masks must be [G, H, W]; got shape {tuple(m.shape)}")
    return torch.nn.functional.adaptive_avg_pool2d(m[:, None], latent_size)


def invert(pipe, space, images: torch.Tensor, *, cfg: InversionConfig | None = None, masks: torch.Tensor | None = None,
           keys: Sequence[int] | None = None, u0: torch.Tensor | None = None, layout: LoraLayout | None = None,
           progress: bool = True) -> Inversion:
    """Invert G images into ``space``: one latent (and LoRA row) per image, all in one batch.

    ``images``: float ``[G, 3, H, W]`` in [-1, 1] at the pipeline's resolution (see
    :func:`w2wlib.images.load_images` and :func:`w2wlib.viz.to_tensor`). ``masks`` ``[G, H, W]``
    weight the loss (w2w masks it to the face); ``keys`` name each image's random streams (default
    ``0..G-1``); ``u0`` ``[G, k]`` is the start in searched units (default: the space's mean, u = 0,
    or an amortised prediction). ``layout`` is the LoRA layout of the space's rows (default: w2w's).
    """
    cfg = cfg or InversionConfig()
    images = torch.as_tensor(images)
    if images.dim() != 4 or images.shape[1] != 3 or not torch.is_floating_point(images):
        raise W2WError(f"images must be float [G, 3, H, W] in [-1, 1]; got {images.dtype} {tuple(images.shape)}: "
                       f"convert uint8 [G, H, W, 3] with w2wlib.viz.to_tensor")
    if not torch.isfinite(images).all() or images.min() < -1.001 or images.max() > 1.001:
        raise W2WError("images must be finite and in [-1, 1] (diffusers' convention): for [0, 1] images pass x * 2 - 1")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if images.shape[-1] != size or images.shape[-2] != size:
        raise W2WError(f"images are {images.shape[-2]}x{images.shape[-1]} but this pipeline draws {size}x{size}: "
                       f"load them with w2wlib.images.load_images(..., size={size})")
    G = len(images)
    keys = list(range(G)) if keys is None else [int(k) for k in keys]
    layout = layout or LoraLayout.from_unet(pipe.unet)
    if layout.dim != space.dim:
        raise W2WError(f"the space has D={space.dim:,} but the pipeline's LoRA layout has D={layout.dim:,}: "
                       f"wrong space for this base model?")
    with _Frozen(pipe.unet, pipe.vae, pipe.text_encoder), _Timer() as timer:
        latents = encode_images(pipe.vae, images)                                        # [G, c, h, w]
        if masks is not None:
            masks = latent_masks(masks, latents.shape[-1])
            if len(masks) != G:
                raise W2WError(f"{G} images but {len(masks)} masks")
        cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [cfg.prompt])
        sched = training_scheduler(pipe)
        obj = InversionObjective(space, pipe.unet, sched, latents, cond, masks=masks, keys=keys, cfg=cfg, layout=layout)
        if u0 is None:
            if cfg.init == "encoder":
                raise W2WError("init='encoder' needs u0 from an amortised inverter: pass u0=inverter.predict(images)")
            u0 = torch.zeros(G, obj.k)
        if tuple(u0.shape) != (G, obj.k):
            raise W2WError(f"u0 has shape {tuple(u0.shape)} but {G} images x k={obj.k} are needed")
        run = run_gradient if cfg.method == "gradient" else run_cmaes
        with BatchedLora.attached_to(pipe.unet, layout) as bank:
            u, history, snapshots = run(obj, u0.to(obj.device), cfg, bank, progress=progress)
        with torch.no_grad():
            z = obj.z_of(u)
            W = space.decode_weights(z)
    return Inversion(z=z.cpu(), W=W.cpu(), history=history, snapshots=snapshots, seconds=timer.seconds, u=u.cpu(),
                     config={**cfg.to_dict(), "space": type(space).__name__, "k": obj.k})
