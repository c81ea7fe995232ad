"""Scoring weights against mini-world identities: the seed-based wrapper over :mod:`w2wlib.metrics`.

``functional_id_scores`` is the seeds' ID score applied to weights: generate images with each identity's
LoRA and compare them, through the identity encoder, with that identity's evaluation renders (image
seeds from ``EVAL_VIEWS``, never used in training). It scores the dataset's LoRAs (the oracle) and the
weights a space reconstructs or an inversion finds. Library code outside ``world/`` scores against
reference images with :func:`w2wlib.metrics.identity_scores` instead.
"""

from __future__ import annotations

import torch

from ..errors import W2WError
from ..metrics import _mean_cosines, identity_scores
from .render import EVAL_VIEWS, identity_views

__all__ = ["functional_id_scores"]


def functional_id_scores(pipe, encoder, W: torch.Tensor | None, identity_seeds, *, n_images: int = 4,
                         n_renders: int = 4, seed: int = 0, steps: int = 25, guidance: float = 4.0,
                         prompt: str = "a photo of sks person", layout=None, progress: bool = False) -> torch.Tensor:
    """ID score ``[G]`` of images generated from ``W [G, D]`` against renders of ``identity_seeds`` (``[G]``).

    ``W=None`` scores the base model (the same ``n_images`` for every identity): the floor a LoRA must
    beat. Renders are evaluation views (image seeds from ``EVAL_VIEWS``), never training images.
    """
    from ..generate import generate

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
