"""Metrics over images and identities.

``frechet_distance`` is FID's formula on any features; the book computes it in the identity encoder's
embedding space (``fid_identity``), the mini world's analogue of FID's Inception features.

Example:
    >>> import torch
    >>> x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    >>> round(frechet_distance(x, x), 6)
    0.0
"""

from __future__ import annotations

import torch

from .errors import W2WError

__all__ = ["frechet_distance"]


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
