"""Training the identity encoder (:mod:`w2wlib.world.encoder`): a margin loss over fresh identities.

:func:`train_encoder` draws fresh rendered identities every batch (identity seeds < ``HELD_OUT_BASE``),
applies heavy nuisance augmentation and, optionally, the autoencoder's reconstruction to a share of each
batch, and minimises CosFace + attribute BCE + factor regression.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from w2wlib.errors import W2WError
from w2wlib.optim import adamw
from w2wlib.viz import to_tensor
from w2wlib.world.encoder import _REGRESSED, EncoderConfig, IdentityEncoder
from w2wlib.world.render import FACTOR_NAMES, attributes, render, sample_identities

__all__ = ["train_encoder"]

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _factor_stats() -> tuple[np.ndarray, np.ndarray]:
    """Mean and std [F'] of the regressed factors over 4096 training identities (fixed)."""
    f = sample_identities(np.arange(4096)).as_array()[:, [FACTOR_NAMES.index(n) for n in _REGRESSED]]
    return f.mean(0), f.std(0) + 1e-6


def _render_batch(ids: np.ndarray, img_seeds: np.ndarray):
    """Images [N,3,64,64] in [-1,1], attribute targets [N,A] and standardised factors [N,F']."""
    f = sample_identities(ids)
    x = to_tensor(render(f, img_seeds))                                 # [N, 3, 64, 64]
    mu, sd = _factor_stats()
    fac = (f.as_array()[:, [FACTOR_NAMES.index(n) for n in _REGRESSED]] - mu) / sd
    return (x, torch.from_numpy(attributes(f).astype(np.float32)),
            torch.from_numpy(fac.astype(np.float32)))


def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur (5 taps) of [N,C,H,W], reflect padding."""
    t = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def _augment(x: torch.Tensor, cfg: EncoderConfig, g: torch.Generator) -> torch.Tensor:
    """Augment a random ``aug_prob`` share of [N,3,H,W] in [-1,1]; the rest stays clean."""
    on = torch.nonzero(torch.rand(len(x), generator=g) < cfg.aug_prob).flatten()
    out = x.clone()
    if len(on):
        out[on] = _nuisance(x[on], cfg, g)
    return out


def _nuisance(x: torch.Tensor, cfg: EncoderConfig, g: torch.Generator) -> torch.Tensor:
    """Flip, shift/zoom/rotate, brightness/contrast/saturation/colour cast, blur, noise."""
    n = len(x)
    u = lambda *s: torch.rand(*s, generator=g)                          # noqa: E731
    sym = lambda *s: 2 * torch.rand(*s, generator=g) - 1                # noqa: E731
    ang = sym(n) * math.radians(cfg.rotate)
    sc = 1.0 + sym(n) * cfg.zoom                                        # >1 zooms out
    flip = torch.where(u(n) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)                                        # output -> input coords
    theta[:, 0, 0], theta[:, 0, 1] = sc * torch.cos(ang) * flip, -sc * torch.sin(ang)
    theta[:, 1, 0], theta[:, 1, 1] = sc * torch.sin(ang) * flip, sc * torch.cos(ang)
    theta[:, :, 2] = sym(n, 2) * (2 * cfg.shift / x.shape[-1])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # colour in [0, 1]: brightness, contrast, saturation, per-channel cast
    j = cfg.jitter
    y = (x + 1) * 0.5
    y = y * (1 + j * sym(n, 1, 1, 1)) * (1 + 0.3 * j * sym(n, 3, 1, 1))
    mean = y.mean((1, 2, 3), keepdim=True)
    y = mean + (y - mean) * (1 + j * sym(n, 1, 1, 1))
    gray = y.mean(1, keepdim=True)
    y = gray + (y - gray) * (1 + j * sym(n, 1, 1, 1))
    x = y.clamp(0, 1) * 2 - 1
    # blur: blend with a gaussian blur, per-sample strength (a cheap variable-sigma blur)
    a = (u(n) < cfg.blur).float() * u(n)
    x = x + a.view(n, 1, 1, 1) * (_gauss_blur(x, 1.2) - x)
    x = x + (u(n) * cfg.noise).view(n, 1, 1, 1) * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


def _margin_loss(z: torch.Tensor, k: int, m: int, margin: float, scale: float) -> torch.Tensor:
    """CosFace over the K identities of a batch, with batch-mean class centres.

    The identities are open-set (each batch brings fresh ones), so there is no class-weight matrix:
    the centre of identity k is the normalised mean of its M views. A view is classified among the
    K centres, with its own centre computed *without* it (leave-one-out, else it would partly match
    itself) and the CosFace margin subtracted from that cosine: ``CE(s * (cos - m * onehot))``.
    Fresh identities every batch make it see tens of thousands of people in a short build, which a
    fixed pool of a few thousand ArcFace classes, each seen a handful of times, would not.
    z: [K*M, E] unit rows, ordered identity-major.
    """
    zz = z.view(k, m, -1)                                               # [K, M, E]
    tot = zz.sum(1)                                                     # [K, E]
    own = F.normalize(tot[:, None] - zz, dim=-1)                        # [K, M, E] leave-one-out
    cen = F.normalize(tot, dim=-1)                                      # [K, E]
    cos = z @ cen.T                                                     # [K*M, K]
    y = torch.arange(k, device=z.device).repeat_interleave(m)           # [K*M]
    pos = (zz * own).sum(-1).reshape(-1)                                # [K*M]
    hot = F.one_hot(y, k).bool()
    logits = torch.where(hot, (pos - margin)[:, None], cos) * scale
    return F.cross_entropy(logits, y)


def train_encoder(cfg: EncoderConfig | None = None, *, device: str | torch.device = "cpu",
                  recon_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  progress: bool = True) -> tuple[IdentityEncoder, list[dict]]:
    """Train an :class:`IdentityEncoder`; returns it (eval mode, on ``device``) and the history.

    Each step draws K = batch_size/views fresh identity seeds below ``identity_pool`` (never a
    held-out seed) and ``views`` random image seeds each, renders them, passes a random
    ``recon_fraction`` of the batch through ``recon_fn`` (float [n,3,64,64] in [-1,1] -> same) if
    given, augments ``aug_prob`` of it, and minimises ``attr_weight`` * attribute BCE +
    ``factor_weight`` * factor regression + CosFace (:func:`_margin_loss`, ramped in after
    ``id_start``) with AdamW and a warm-up + cosine schedule. Deterministic from ``cfg.seed`` (the
    global RNG state is restored afterwards). History entries: step, loss, id_loss (logged even
    before it is weighted in), attr_loss, id_weight, lr, seconds, images_per_s.

    Example:
        >>> enc, hist = train_encoder(EncoderConfig.micro(steps=2), progress=False)
        >>> len(hist) >= 1 and not enc.training
        True
    """
    cfg = cfg or EncoderConfig()
    cfg.validate()
    k, m = cfg.ids_per_batch, cfg.views
    rng = np.random.default_rng([cfg.seed, 0xE7C])                   # identities and image seeds
    g = torch.Generator().manual_seed(cfg.seed)                      # augmentation, recon subset
    history: list[dict] = []

    def draw() -> tuple[np.ndarray, np.ndarray]:
        ids = rng.choice(cfg.identity_pool, k, replace=False)            # [K] distinct
        return np.repeat(ids, m), rng.integers(0, 2**31, k * m)      # identity-major [K*M]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = IdentityEncoder(cfg).to(device).train()
        opt, sched = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, steps=cfg.steps, warmup=cfg.warmup)
        n_recon = round(cfg.recon_fraction * cfg.batch_size) if recon_fn is not None else 0
        # render the next batch in a worker thread while this one trains (numpy releases the GIL)
        pool = concurrent.futures.ThreadPoolExecutor(1)
        nxt = pool.submit(_render_batch, *draw())
        t0, seen, acc = time.perf_counter(), 0, np.zeros(3)
        bar = tqdm(range(cfg.steps), desc="identity encoder", disable=not progress)
        try:
            for step in bar:
                x, a, fac = nxt.result()                     # [B,3,64,64], [B,A], [B,F']
                if step + 1 < cfg.steps:
                    nxt = pool.submit(_render_batch, *draw())
                if n_recon:
                    idx = torch.randperm(len(x), generator=g)[:n_recon]
                    with torch.no_grad():
                        r = recon_fn(x[idx].to(device))              # [n, 3, 64, 64]
                    if tuple(r.shape) != (n_recon, *x.shape[1:]):
                        raise W2WError(f"recon_fn must return [{n_recon}, 3, 64, 64], got "
                                       f"{tuple(r.shape)}")
                    x[idx] = r.detach().float().cpu().clamp(-1, 1)
                x = _augment(x, cfg, g).to(device)
                z, logits, fhat = model._forward(x)
                id_loss = _margin_loss(z, k, m, cfg.margin, cfg.scale)
                id_w = min(1.0, max(0.0, (step / cfg.steps - cfg.id_start) / 0.1))
                attr_loss = F.binary_cross_entropy_with_logits(logits, a.to(device))
                fac_loss = F.smooth_l1_loss(fhat, fac.to(device))
                loss = id_w * id_loss + cfg.attr_weight * attr_loss + cfg.factor_weight * fac_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                seen += len(x)
                acc += (loss.item(), id_loss.item(), attr_loss.item())
                if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                    cnt = (step % cfg.log_every) + 1
                    dt = time.perf_counter() - t0
                    rec = dict(step=step + 1, loss=acc[0] / cnt, id_loss=acc[1] / cnt,
                               attr_loss=acc[2] / cnt, id_weight=id_w,
                               lr=opt.param_groups[0]["lr"],
                               seconds=dt, images_per_s=seen / dt)
                    history.append(rec)
                    acc[:] = 0
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", attr=f"{rec['attr_loss']:.3f}")
                    log.info("encoder step %d/%d loss %.4f (id %.4f attr %.4f) %.0f img/s",
                             step + 1, cfg.steps, rec["loss"], rec["id_loss"], rec["attr_loss"],
                             rec["images_per_s"])
        finally:
            bar.close()
            pool.shutdown(wait=True, cancel_futures=True)
    log.info("trained identity encoder on %d identities (%d images) in %.0f s",
             cfg.steps * k, seen, time.perf_counter() - t0)
    return model.eval(), history
