"""CMA-ES inversion with Hansen's ``cma`` package: one evolution strategy per image, all populations
scored in one batched UNet pass.

Each generation asks every image's strategy for λ candidates, decodes all G·λ of them to LoRA rows,
and scores them through :class:`~w2wlib.lora.BatchedLora` in one pass, with common random numbers:
the candidates of one image share that generation's (t, ε) draws, so CMA-ES ranks them on the same
noise. The answer is ``result.xfavorite``, the distribution mean, the better estimate under noise.
Each strategy draws from its own numpy generator (``(seed, image key)``), not numpy's global state,
so an image's run does not depend on the others in its batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..seeding import numpy_rng, seed_int
from .core import InversionConfig, InversionObjective

__all__ = ["run_cmaes", "default_popsize"]

_CMA = 0xC3A


def default_popsize(k: int) -> int:
    """cma's default population, ``4 + floor(3 ln k)``."""
    return 4 + int(3 * math.log(k))


def run_cmaes(obj: InversionObjective, u0: torch.Tensor, cfg: InversionConfig, bank, *,
              progress: bool = True) -> tuple[torch.Tensor, list[dict], list]:
    """Run ``cfg.steps`` generations from the means ``u0 [G, k]``; returns the ``xfavorite`` of each image."""
    import cma
    from tqdm.auto import tqdm

    G, k = u0.shape
    lam = cfg.popsize or default_popsize(k)
    strategies = []
    for g, key in enumerate(obj.keys):
        rng = numpy_rng(cfg.seed, _CMA, key)
        opts = {"popsize": lam, "seed": seed_int(cfg.seed, _CMA, key) % (2**31 - 1) + 1, "verbose": -9,
                "randn": lambda *shape, rng=rng: rng.standard_normal(shape), "CMA_diagonal": cfg.diagonal,
                "maxiter": cfg.steps, "tolfun": 0, "tolx": 0, "tolfunhist": 0, "tolstagnation": 10**9}
        if cfg.bounds is not None:
            opts["bounds"] = [-cfg.bounds, cfg.bounds]
        strategies.append(cma.CMAEvolutionStrategy(u0[g].double().cpu().numpy(), cfg.sigma0, opts))
    image = torch.arange(G, device=obj.device).repeat_interleave(lam)                   # [G*lam]
    history: list[dict] = []
    snapshots, keep = [], obj.snapshot_steps()
    bar = tqdm(range(cfg.steps), desc=f"invert x{G} (CMA-ES, pop {lam})", disable=not progress, unit="gen")
    for step in bar:
        X = [es.ask() for es in strategies]                                              # G x [lam arrays of k]
        U = torch.as_tensor(np.asarray(X), dtype=torch.float32, device=obj.device).view(G * lam, k)
        with torch.no_grad():
            L = obj.loss(U, image, step, bank).view(G, lam).cpu().double().numpy()
        for es, x, losses in zip(strategies, X, L):
            es.tell(x, losses.tolist())
        if step + 1 in keep:
            u_now = torch.as_tensor(np.stack([es.result.xfavorite for es in strategies]), dtype=torch.float32)
            snapshots.append((step + 1, obj.z_of(u_now.to(obj.device)).cpu()))
        history.append({"step": step, "loss": L.mean(1).tolist(), "best": L.min(1).tolist(),
                        "sigma": [float(es.sigma) for es in strategies]})
        bar.set_postfix(loss=f"{L.mean():.4f}", refresh=False)
    u = torch.as_tensor(np.stack([es.result.xfavorite for es in strategies]), dtype=torch.float32)
    return u.to(obj.device), history, snapshots
