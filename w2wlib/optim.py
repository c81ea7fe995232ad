"""The project's one optimiser set-up: AdamW with decay on matrices only, and a warm-up + cosine schedule.

Every trainer (the world's UNet and encoder, the VAE, DreamBooth, inversion) calls :func:`adamw`.
With ``weight_decay=0`` AdamW is exactly Adam. Weight decay, when asked for, applies to tensors of two
or more dimensions (matrices, convolution kernels); biases, norms and embeddings-as-vectors are left
alone, as is usual for transformers. The schedule multiplies the base lr by ``lr_factor(step)``; it is
stepped once per optimiser step and saves plain floats, so a checkpoint reloads with
``torch.load(weights_only=True)``.

Example:
    >>> w = torch.zeros(3, requires_grad=True)
    >>> opt, sched = adamw([w], lr=0.1, steps=10, warmup=2)
    >>> [round(cosine(s, steps=10, warmup=2), 3) for s in (0, 1, 5, 10)]
    [0.5, 1.0, 0.345, 0.0]
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from .errors import W2WError

__all__ = ["adamw", "cosine"]


def cosine(step: int, *, steps: int, warmup: int = 0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to 0 at ``steps`` (0 after)."""
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return ramp * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def adamw(params: Iterable[torch.Tensor] | torch.nn.Module, *, lr: float, weight_decay: float = 0.0,
          steps: int | None = None, warmup: int = 0,
          lr_factor: Callable[[int], float] | None = None) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """``(optimizer, scheduler)`` for ``params`` (tensors or a module).

    The schedule is ``lr_factor`` if given, else :func:`cosine` over ``steps`` with ``warmup`` when
    ``steps`` is given, else constant.
    """
    params = list(params.parameters() if isinstance(params, torch.nn.Module) else params)
    if not params:
        raise W2WError("adamw got no parameters to optimise")
    if not (lr > 0 and math.isfinite(lr)) or weight_decay < 0:
        raise W2WError(f"lr must be a positive number and weight_decay >= 0; got lr={lr}, weight_decay={weight_decay}")
    if steps is not None and steps < 1:
        raise W2WError(f"steps must be >= 1 for the cosine schedule; got {steps}")
    if weight_decay:
        groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    else:
        groups = [{"params": params, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr)
    if lr_factor is None:
        lr_factor = (lambda s: cosine(s, steps=steps, warmup=warmup)) if steps else (lambda s: 1.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
