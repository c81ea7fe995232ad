"""Scoring weights against mini-world identities: the seed-based wrapper over :mod:`w2wlib.metrics`.

``functional_id_scores`` is the seeds' ID score applied to weights: generate images with each identity's
LoRA and compare them, through the identity encoder, with that identity's evaluation renders (image
seeds from ``EVAL_VIEWS``, never used in training). It scores the dataset's LoRAs (the oracle) and the
weights a space reconstructs or an inversion finds; ``reconstruction_id_scores`` scores a dataset's rows
against their reconstructions by each space, between the oracle and the base model (the chapter "The
latent space" and ``benchmarks/latent_space.py``). Library code outside ``world/`` scores against
reference images with :func:`w2wlib.metrics.identity_scores` instead.
"""

from __future__ import annotations

import torch

from ..errors import W2WError
from ..metrics import _mean_cosines, identity_scores
from .render import EVAL_VIEWS, identity_views

__all__ = ["functional_id_scores", "reconstruction_id_scores"]


def functional_id_scores(pipe, encoder, W: torch.Tensor | None, identity_seeds, *, n_images: int = 4,
                         n_renders: int = 4, seed: int = 0, steps: int = 25, guidance: float = 4.0,
                         prompt: str = "a photo of sks person", layout=None, progress: bool = False,
                         return_images: bool = False):
    """ID score ``[G]`` of images generated from ``W [G, D]`` against renders of ``identity_seeds`` (``[G]``).

    ``W=None`` scores the base model (the same ``n_images`` for every identity): the floor a LoRA must
    beat. Renders are evaluation views (image seeds from ``EVAL_VIEWS``), never training images. With
    ``return_images``, returns ``(scores, images)``: the generated uint8 ``[G * n_images, H, W, 3]``
    (``[n_images, ...]`` for the base model).
    """
    from ..generate import generate

    seeds = [int(s) for s in identity_seeds]
    if W is not None and len(W) != len(seeds):
        raise W2WError(f"W has {len(W)} rows but {len(seeds)} identity seeds were given; one seed per row")
    if W is None:   # one set of base-model images, embedded once, scored against every identity
        images = generate(pipe, None, prompt=prompt, n_per_row=n_images, seed=seed, steps=steps, guidance=guidance,
                          progress=progress)
        zr = encoder.embed(identity_views(seeds, n_renders, EVAL_VIEWS)).view(len(seeds), n_renders, -1)
        scores = _mean_cosines(encoder.embed(images).view(1, n_images, -1), zr)
    else:
        images = generate(pipe, W, prompt=prompt, n_per_row=n_images, seed=seed, steps=steps, guidance=guidance,
                          layout=layout, progress=progress)
        scores = identity_scores(encoder, images, identity_views(seeds, n_renders, EVAL_VIEWS), n_images, n_renders)
    return (scores, images) if return_images else scores


def reconstruction_id_scores(pipe, encoder, ds, rows, spaces: dict, **score) -> tuple[dict, dict, dict]:
    """ID scores of the dataset's ``rows`` (the oracle), of their reconstructions by each of ``spaces``
    (``{name: WeightSpace}``) and of the base model, each ``[len(rows)]`` against the rows' identities' renders.

    ``score`` goes to :func:`functional_id_scores` (``n_images``, ``seed``, ``steps``, ``prompt``, ``layout``...).
    Returns ``(scores, reconstructions, images)``: ``{"own LoRA (oracle)", *spaces, "base model": [G]}``, the
    reconstructed raw rows ``{name: W [G, D]}`` and the generated images of each score (uint8, row-major).

    >>> scores, recon, images = reconstruction_id_scores(pipe, enc, ds, [0, 1], {"PCA": pca})   # doctest: +SKIP
    """
    rows = [int(r) for r in rows]
    seeds = [ds.identity_seeds[r] for r in rows]
    W = ds.rows(rows)                                                                   # [G, D]
    x = ds.standardise(W)
    with torch.no_grad():
        recon = {name: space.unstandardise(space.decode(space.encode(x.to(space.device)))).cpu()
                 for name, space in spaces.items()}
    runs = {"own LoRA (oracle)": W, **recon, "base model": None}
    out = {name: functional_id_scores(pipe, encoder, Wr, seeds, return_images=True, **score)
           for name, Wr in runs.items()}
    return {n: s for n, (s, _) in out.items()}, recon, {n: im for n, (_, im) in out.items()}
