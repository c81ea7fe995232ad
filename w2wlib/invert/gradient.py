"""Gradient inversion: Adam on the searched latent of every image at once (w2w's method, in any space).

Each image's loss is its own mean DDPM loss, and the objective is their sum, so image ``g``'s latent
gets exactly its solo gradient, and Adam (element-wise) moves it as a solo run would.
"""

from __future__ import annotations

import torch

from ..optim import adamw
from .core import InversionConfig, InversionObjective

__all__ = ["run_gradient"]


def run_gradient(obj: InversionObjective, u0: torch.Tensor, cfg: InversionConfig, bank, *,
                 progress: bool = True) -> tuple[torch.Tensor, list[dict], list]:
    """Optimise ``u [G, k]`` from ``u0``; returns the final ``u``, one history row per step and the snapshots."""
    from tqdm.auto import tqdm

    u = u0.detach().clone().to(obj.device).requires_grad_(True)
    opt, sched = adamw([u], lr=cfg.lr, weight_decay=cfg.weight_decay,
                       steps=cfg.steps if cfg.schedule == "cosine" else None)
    image = torch.arange(len(u), device=obj.device)
    history: list[dict] = []
    snapshots, keep = [], obj.snapshot_steps()
    bar = tqdm(range(cfg.steps), desc=f"invert x{len(u)} (gradient)", disable=not progress, unit="step")
    for step in bar:
        loss = obj.loss(u, image, step, bank)                                          # [G]
        total = loss.sum()
        if cfg.prior_weight:
            total = total + cfg.prior_weight * u.pow(2).mean(1).sum()                  # |u|^2 / k per image
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step(), sched.step()
        if cfg.max_norm is not None:
            with torch.no_grad():
                cap = cfg.max_norm * u.shape[1] ** 0.5
                u.mul_((cap / u.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))
        if step + 1 in keep:
            snapshots.append((step + 1, obj.z_of(u.detach()).cpu()))
        history.append({"step": step, "loss": loss.detach().cpu().tolist(),
                        "norm": (u.detach().norm(dim=1) / u.shape[1] ** 0.5).cpu().tolist()})
        bar.set_postfix(loss=f"{loss.mean().item():.4f}", refresh=False)
    return u.detach(), history, snapshots
