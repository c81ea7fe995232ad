"""Scoring weights against mini-world identities: the seed-based wrapper over :mod:`w2wlib.scoring`.

``functional_id_scores`` is the seeds' ID score applied to weights: generate images with each identity's
LoRA and compare them, through the identity encoder, with that identity's evaluation renders (image
seeds from ``EVAL_VIEWS``, never used in training). It scores the dataset's LoRAs (the oracle) and the
weights a space reconstructs or an inversion finds; ``reconstruction_id_scores`` scores a dataset's rows
against their reconstructions by each space, between the oracle and the base model (the chapter "The
latent space" and ``benchmarks/latent_space.py``). Library code outside ``world/`` scores against
reference images with :mod:`w2wlib.scoring` instead.
"""

from __future__ import annotations

import torch

from ..errors import W2WError
from ..scoring import reconstruction_scores, weights_scores
from .render import EVAL_VIEWS, identity_views

__all__ = ["functional_id_scores", "reconstruction_id_scores"]


def functional_id_scores(pipe, encoder, W: torch.Tensor | None, identity_seeds, *, n_images: int = 4,
                         n_renders: int = 4, return_images: bool = False, **draw):
    """ID score ``[G]`` of images generated from ``W [G, D]`` against renders of ``identity_seeds`` (``[G]``).

    ``W=None`` scores the base model (the same ``n_images`` for every identity): the floor a LoRA must
    beat. Renders are evaluation views (image seeds from ``EVAL_VIEWS``), never training images. ``draw``
    goes to :func:`w2wlib.generate.generate` (``seed``, ``steps``, ``guidance``, ``prompt``, ``layout``...).
    With ``return_images``, returns ``(scores, images)``: the generated uint8 ``[G * n_images, H, W, 3]``
    (``[n_images, ...]`` for the base model).
    """
    seeds = [int(s) for s in identity_seeds]
    if W is not None and len(W) != len(seeds):
        raise W2WError(f"W has {len(W)} rows but {len(seeds)} identity seeds were given; one seed per row")
    scores, images = weights_scores(pipe, encoder, W, identity_views(seeds, n_renders, EVAL_VIEWS),
                                    n_images=n_images, n_refs=n_renders, **draw)
    return (scores, images) if return_images else scores


def reconstruction_id_scores(pipe, encoder, ds, rows, spaces: dict, *, n_renders: int = 4, **score
                             ) -> tuple[dict, dict, dict]:
    """:func:`w2wlib.scoring.reconstruction_scores` of the dataset's ``rows`` against their identities' renders
    (``n_renders`` evaluation views each): the oracle, each space's reconstruction and the base model.

    >>> scores, recon, images = reconstruction_id_scores(pipe, enc, ds, [0, 1], {"PCA": pca})   # doctest: +SKIP
    """
    rows = [int(r) for r in rows]
    refs = identity_views([ds.identity_seeds[r] for r in rows], n_renders, EVAL_VIEWS)
    return reconstruction_scores(pipe, encoder, ds.rows(rows), spaces, refs, n_refs=n_renders, **score)
