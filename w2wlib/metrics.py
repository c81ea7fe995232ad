"""Metrics over images and identities.

``frechet_distance`` is FID's formula on any features; the book computes it in the identity encoder's
embedding space (``fid_identity``), the mini world's analogue of FID's Inception features.

``identity_scores`` is the seeds' ID score: the cosine, through an identity encoder, between the images
a model generates and reference images of the person (renders, a user's photos, an unedited model's
images). Every metric takes reference images, so SD 1.5 and the mini world are scored by the same call;
the mini world's seed-based wrapper is :func:`w2wlib.world.scoring.functional_id_scores`.

``identity_consistency`` asks whether a model (a sampled LoRA) draws one identity: the cosine between
its own images against that between images of different models.

``reconstruction_mse`` is a space's per-identity error in the standardised space of the data.

``attribute_probe`` asks how linearly an attribute can be read from features (weights, PCA or latent
coordinates): the held-out accuracy of a logistic probe, against always guessing the majority class.

Example:
    >>> import torch
    >>> x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    >>> round(frechet_distance(x, x), 6)
    0.0
"""

from __future__ import annotations

import torch

from .errors import W2WError

__all__ = ["frechet_distance", "identity_scores", "attribute_probe", "bootstrap_ci",
           "reconstruction_mse", "identity_consistency"]


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features ``a [N, F]`` and ``b [M, F]`` (float64).

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, the symmetric form that needs only
    eigendecompositions of PSD matrices.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise W2WError(f"frechet_distance needs two [N, F] feature sets with N >= 2 and equal F; got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))  # [F, F], also for F = 1
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    return float((mu_a - mu_b).square().sum() + torch.trace(s_a + s_b - 2 * cross))


def _mean_cosines(zi: torch.Tensor, zr: torch.Tensor) -> torch.Tensor:
    """``[G or 1, n, E]`` x ``[G, m, E]`` unit embeddings -> ``[G]`` mean pairwise cosine (a 1 broadcasts)."""
    return (zi @ zr.transpose(1, 2)).mean((1, 2))


def identity_scores(encoder, images, renders, n_images: int, n_renders: int) -> torch.Tensor:
    """Per identity, the mean cosine between its ``n_images`` images and its ``n_renders`` renders: ``[G]``.

    ``images`` ``[G * n_images, ...]`` and ``renders`` ``[G * n_renders, ...]`` are row-major by identity
    (uint8 HWC or float CHW in [-1, 1], as the encoder takes them).
    """
    zi, zr = encoder.embed(images), encoder.embed(renders)              # [G*n, E], [G*m, E]
    g = len(zi) // n_images
    if len(zi) != g * n_images or len(zr) != g * n_renders:
        raise W2WError(f"{len(zi)} images and {len(zr)} renders do not split into identities of "
                       f"{n_images} and {n_renders}")
    return _mean_cosines(zi.view(g, n_images, -1), zr.view(g, n_renders, -1))


def attribute_probe(x_train: torch.Tensor, y_train: dict, x_val: torch.Tensor, y_val: dict, *,
                    l2: float = 1e-2, max_iter: int = 200) -> dict[str, dict[str, float]]:
    """Held-out accuracy of one L2-regularised logistic probe per attribute on features ``x [N, F]``.

    ``y_train``/``y_val`` map attribute -> 0/1 arrays. Features are standardised with the training
    rows' statistics. Returns attribute -> ``{"accuracy", "balanced_accuracy", "majority"}``, where
    ``majority`` is the accuracy of always answering the training set's more frequent class.
    """
    x_train, x_val = torch.as_tensor(x_train, dtype=torch.float64), torch.as_tensor(x_val, dtype=torch.float64)
    if x_train.ndim != 2 or x_val.ndim != 2 or x_train.shape[1] != x_val.shape[1]:
        raise W2WError(f"features must be [N, F] with the same F, not {tuple(x_train.shape)} and {tuple(x_val.shape)}")
    names = [a for a in y_train if a in y_val]
    if not names:
        raise W2WError("y_train and y_val share no attribute")
    yt = torch.stack([torch.as_tensor(y_train[a], dtype=torch.float64) for a in names], 1)
    yv = torch.stack([torch.as_tensor(y_val[a], dtype=torch.float64) for a in names], 1)
    if len(yt) != len(x_train) or len(yv) != len(x_val):
        raise W2WError(f"{len(x_train)}/{len(x_val)} feature rows but {len(yt)}/{len(yv)} attribute rows")
    mu, sd = x_train.mean(0), x_train.std(0).clamp(min=1e-12)
    xt, xv = (x_train - mu) / sd, (x_val - mu) / sd
    w = torch.zeros(xt.shape[1], len(names), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(names), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt, reduction="sum") / len(xt)
        loss = loss + l2 * w.pow(2).sum()   # the loss separates over attributes: one probe each
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (xv @ w + b > 0).double()
    out = {}
    for j, a in enumerate(names):
        pos, neg = yv[:, j] == 1, yv[:, j] == 0
        rates = [float((pred[m, j] == yv[m, j]).double().mean()) for m in (pos, neg) if m.any()]
        major = float(yt[:, j].mean() >= 0.5)
        out[a] = {"accuracy": float((pred[:, j] == yv[:, j]).double().mean()),
                  "balanced_accuracy": sum(rates) / len(rates), "majority": float((yv[:, j] == major).double().mean())}
    return out


@torch.no_grad()
def reconstruction_mse(space, w_std: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Per-row mean squared error ``[N]`` of ``space.decode(space.encode(w_std))`` in the standardised space.

    A VAE encodes to its posterior mean; 1.0 is the error of predicting the mean identity.
    """
    w_std = torch.as_tensor(w_std)
    if w_std.ndim != 2 or w_std.shape[1] != space.dim:
        raise W2WError(f"w_std must be [N, {space.dim:,}] standardised rows, not {tuple(w_std.shape)}")
    out = []
    for blk in w_std.split(batch_size):
        x = blk.to(space.device, torch.float32)
        out.append((space.decode(space.encode(x)) - x).pow(2).mean(1).cpu())
    return torch.cat(out)


def identity_consistency(encoder, images, n_per_row: int) -> tuple[torch.Tensor, float]:
    """Mean cosine between different images of the same row ``[G]``, and between images of different rows.

    ``images`` ``[G * n_per_row, ...]`` are row-major, one row per model (e.g. :func:`~w2wlib.generate.generate`
    of ``G`` sampled LoRAs). A model that keeps one identity scores well above the across-row value.
    Only pairs of different columns count, so noise shared by column ``j`` of every row adds nothing.
    """
    if n_per_row < 2:
        raise W2WError(f"identity_consistency needs n_per_row >= 2 images of each model, not {n_per_row}")
    z = encoder.embed(images)
    g = len(z) // n_per_row
    if g < 2 or len(z) != g * n_per_row:
        raise W2WError(f"{len(z)} images are not >= 2 rows of {n_per_row}")
    z = z.view(g, n_per_row, -1)
    sims = torch.einsum("gie,hje->ghij", z, z)                          # [G, G, n, n]
    off = ~torch.eye(n_per_row, dtype=torch.bool)
    within = sims[torch.arange(g), torch.arange(g)][:, off].mean(1)      # [G], distinct images of one row
    # across rows, only pairs of different columns: column j of every row may share its noise (generate)
    across = sims[~torch.eye(g, dtype=torch.bool)][:, off].mean()
    return within, float(across)


def bootstrap_ci(values, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``values`` and its percentile bootstrap ``level`` interval."""
    x = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if len(x) == 0 or not torch.isfinite(x).all():
        raise W2WError(f"bootstrap_ci needs finite values, got {len(x)} values with "
                       f"{int((~torch.isfinite(x)).sum()) if len(x) else 0} non-finite")
    idx = torch.randint(0, len(x), (n_boot, len(x)), generator=torch.Generator().manual_seed(seed))
    means = x[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(x.mean()), float(lo), float(hi)
