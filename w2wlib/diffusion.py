"""The diffusion objective, once: the DDPM loss of a UNet with one LoRA row per sample.

DreamBooth trains ``W`` with it, and inversion optimises a space's latent through it (gradient) or
ranks candidates with it (CMA-ES). Given clean latents ``x0``, noise and timesteps, it noises
``x0`` with the scheduler, asks the UNet (with row ``index[n]`` of ``W`` applied to sample ``n``
through :class:`~w2wlib.lora.BatchedLora`) for its prediction and returns each sample's mean squared
error against the scheduler's target: the noise ε (SD 1.5) or the velocity (``v_prediction``).
An optional ``weight`` (a mask, ``[N, 1, h, w]`` in latent resolution) makes it a weighted mean,
as w2w's inversion masks its loss to the face.

Example:
    >>> err = ddpm_loss(unet, ddpm, x0, noise, t, cond, bank=bank, W=W, index=idx)   # doctest: +SKIP
    >>> err.shape                                                                     # doctest: +SKIP
    torch.Size([8])
"""

from __future__ import annotations

import contextlib

import torch

from .errors import W2WError

__all__ = ["ddpm_loss", "check_prediction_type", "training_scheduler"]


def check_prediction_type(noise_scheduler) -> str:
    """The scheduler's ``prediction_type`` if this objective supports it (epsilon, v_prediction)."""
    kind = noise_scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise W2WError(f"prediction_type {kind!r} is not supported (epsilon or v_prediction): "
                       f"use the base model's own DDPM scheduler config")
    return kind


def ddpm_loss(unet, noise_scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, *,
              bank=None, W: torch.Tensor | None = None, index: torch.Tensor | None = None,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample DDPM loss ``[N]`` of ``unet`` on ``x0 [N, c, h, w]`` noised with ``noise`` at ``t [N]``.

    ``cond [N, L, C]`` are the text embeddings. With ``bank`` (an attached ``BatchedLora``) and ``W``,
    sample ``n`` uses row ``index[n]`` of ``W`` (``n % G`` when ``index`` is None); the loss is
    differentiable in ``W``. ``weight`` (broadcastable to ``x0``, e.g. a ``[N, 1, h, w]`` mask) turns
    the mean over elements into a weighted mean.
    """
    if not (len(x0) == len(noise) == len(t) == len(cond)):
        raise W2WError(f"x0, noise, t and cond must have one entry per sample; got {len(x0)}, {len(noise)}, "
                       f"{len(t)} and {len(cond)}")
    kind = check_prediction_type(noise_scheduler)
    noisy = noise_scheduler.add_noise(x0, noise, t)
    target = noise_scheduler.get_velocity(x0, noise, t) if kind == "v_prediction" else noise
    use = contextlib.nullcontext() if bank is None else bank.use(W, index)
    with use:
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
    err = (pred.float() - target.float()).pow(2)                                        # [N, c, h, w]
    if weight is None:
        return err.flatten(1).mean(1)
    weight = weight.to(err).expand_as(err)
    return (err * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-12)


def training_scheduler(pipe):
    """A ``DDPMScheduler`` on the pipeline's own noise schedule: what its UNet was trained with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)
