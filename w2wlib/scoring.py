"""Scoring weights through their images: draw with each LoRA row, then score the images by ID against
reference images of its person (:func:`w2wlib.metrics.identity_scores`).

The references are the caller's: evaluation renders in the mini world
(:mod:`w2wlib.world.scoring` wraps these calls with them), photos of the person, or, on SD 1.5's public
LoRAs, where no photo comes with a row, the row's own images at other noise seeds. The same call scores
the dataset's LoRAs (the oracle), a space's reconstructions of them, an inversion's answer and the base model.

Example:
    >>> refs = generate(pipe, W, n_per_row=4, seed=1, **draw)          # doctest: +SKIP
    >>> scores, recon, images = reconstruction_scores(pipe, scorer, W, {"PCA": pca}, refs, n_images=4,
    ...                                              n_refs=4, **draw)  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from .errors import W2WError
from .metrics import _mean_cosines, identity_scores

__all__ = ["weights_scores", "reconstruction_scores"]


def weights_scores(pipe, scorer, W: torch.Tensor | None, refs, *, n_images: int = 4, n_refs: int = 4,
                   seed: int = 0, progress: bool = False, **draw):
    """ID scores ``[G]`` of the images of ``W [G, D]`` against ``refs`` (uint8 ``[G * n_refs, H, W, 3]``,
    row-major), and the images (uint8 ``[G * n_images, ...]``).

    ``W=None`` is the base model: one set of ``n_images`` images, scored against every person's references (the
    floor a LoRA must beat). ``draw`` goes to :func:`w2wlib.generate.generate` (prompt, steps, guidance, layout...).
    """
    from .generate import generate

    if len(refs) % n_refs:
        raise W2WError(f"{len(refs)} reference images are not a whole number of sets of n_refs={n_refs}")
    G = len(refs) // n_refs
    if W is not None and len(W) != G:
        raise W2WError(f"W has {len(W)} rows but the references are of {G} people ({len(refs)} images, "
                       f"{n_refs} each); give one row per person")
    images = generate(pipe, W, n_per_row=n_images, seed=seed, progress=progress, **draw)
    if W is None:   # one set of base-model images, embedded once, scored against every person
        zr = scorer.embed(refs).view(G, n_refs, -1)
        return _mean_cosines(scorer.embed(images).view(1, n_images, -1), zr), images
    return identity_scores(scorer, images, refs, n_images, n_refs), images


def reconstruction_scores(pipe, scorer, W: torch.Tensor, spaces: dict, refs, **score) -> tuple[dict, dict, dict]:
    """ID scores of the rows ``W [G, D]`` (the oracle), of their reconstructions by each of ``spaces``
    (``{name: WeightSpace}``) and of the base model, each ``[G]`` against ``refs``.

    ``score`` goes to :func:`weights_scores`. Returns ``(scores, reconstructions, images)``:
    ``{"own LoRA (oracle)", *spaces, "base model": [G]}``, the reconstructed raw rows ``{name: W [G, D]}`` and
    the generated images of each score (uint8, row-major).
    """
    W = torch.as_tensor(W).float()
    with torch.no_grad():
        recon = {name: space.decode_weights(space.encode_weights(W)).cpu() for name, space in spaces.items()}
    runs = {"own LoRA (oracle)": W, **recon, "base model": None}
    out = {name: weights_scores(pipe, scorer, Wr, refs, **score) for name, Wr in runs.items()}
    return {n: s for n, (s, _) in out.items()}, recon, {n: im for n, (_, im) in out.items()}
