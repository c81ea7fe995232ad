"""Metrics over images and identities.

``frechet_distance`` is FID's formula on any features; the book computes it in the identity encoder's
embedding space (``fid_identity``), the mini world's analogue of FID's Inception features.

``functional_id_scores`` is the seeds' ID score applied to weights: generate images with each identity's
LoRA and compare them, through the identity encoder, with that identity's evaluation renders. It
scores the dataset's LoRAs (the oracle) and the weights a space reconstructs or an inversion finds.

Example:
    >>> import torch
    >>> x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    >>> round(frechet_distance(x, x), 6)
    0.0
"""

from __future__ import annotations

import torch

from .errors import W2WError

__all__ = ["frechet_distance", "identity_scores", "functional_id_scores"]


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


def functional_id_scores(pipe, encoder, W: torch.Tensor | None, identity_seeds, *, n_images: int = 4,
                         n_renders: int = 4, seed: int = 0, steps: int = 25, guidance: float = 4.0,
                         prompt: str = "a photo of sks person", layout=None, progress: bool = False) -> torch.Tensor:
    """ID score ``[G]`` of images generated from ``W [G, D]`` against renders of ``identity_seeds`` (``[G]``).

    ``W=None`` scores the base model (the same ``n_images`` for every identity): the floor a LoRA must
    beat. Renders are evaluation views (image seeds from ``EVAL_VIEWS``), never training images.
    """
    from .generate import generate
    from .world.render import EVAL_VIEWS, identity_views

    seeds = [int(s) for s in identity_seeds]
    if W is not None and len(W) != len(seeds):
        raise W2WError(f"W has {len(W)} rows but {len(seeds)} identity seeds were given; one seed per row")
    if W is None:   # one set of base-model images, embedded once, scored against every identity
        images = generate(pipe, None, prompt=prompt, n_per_row=n_images, seed=seed, steps=steps, guidance=guidance,
                          progress=progress)
        zr = encoder.embed(identity_views(seeds, n_renders, EVAL_VIEWS)).view(len(seeds), n_renders, -1)
        return _mean_cosines(encoder.embed(images).view(1, n_images, -1), zr)
    images = generate(pipe, W, prompt=prompt, n_per_row=n_images, seed=seed, steps=steps, guidance=guidance,
                      layout=layout, progress=progress)
    return identity_scores(encoder, images, identity_views(seeds, n_renders, EVAL_VIEWS), n_images, n_renders)
