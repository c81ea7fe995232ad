"""How varied a set of models is, and how smoothly a path between two models changes identity.

All three measures read images through the identity encoder, so sampled models, dataset LoRAs and the
points of an interpolation are measured alike (next to each other in the chapter "Sampling and
interpolation"):

- :func:`model_distance`: the mean pairwise ID distance between models, ``1 - cos`` of their mean
  identity embeddings (over their images), averaged over pairs of different models;
- :func:`attribute_frequencies`: the share of images in which the encoder's attribute head reads each
  attribute, to set next to the dataset's label frequencies;
- :func:`path_steps`: the ID change per step of a path, ``1 - cos`` between the embeddings of
  consecutive points' images drawn with the same noise.

Example:
    >>> imgs = generate(pipe, W, n_per_row=4)                   # [G * 4, H, W, 3]   # doctest: +SKIP
    >>> model_distance(enc, imgs, 4)                            # 0 if all G draw one person  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from .errors import W2WError

__all__ = ["model_distance", "attribute_frequencies", "path_steps"]


def _grouped(encoder, images, n_per_row: int, what: str) -> torch.Tensor:
    """Unit embeddings ``[G, n_per_row, E]`` of row-major images."""
    if n_per_row < 1:
        raise W2WError(f"n_per_row must be >= 1, not {n_per_row}")
    z = encoder.embed(images)                                            # [G * n, E]
    g = len(z) // n_per_row
    if g < 2 or g * n_per_row != len(z):
        raise W2WError(f"{len(z)} images are not >= 2 {what} of {n_per_row} images each")
    return z.view(g, n_per_row, -1)


def model_distance(encoder, images, n_per_row: int) -> float:
    """Mean ``1 - cos`` between the mean identity embeddings of different models (``[G * n_per_row]`` images)."""
    z = torch.nn.functional.normalize(_grouped(encoder, images, n_per_row, "models").mean(1), dim=1)   # [G, E]
    sims = z @ z.T                                                                                    # [G, G]
    off = ~torch.eye(len(z), dtype=torch.bool)
    return float(1 - sims[off].mean())


def attribute_frequencies(encoder, images) -> dict[str, float]:
    """Attribute -> the share of ``images`` in which the encoder reads it (logit > 0)."""
    from .world.render import ATTRIBUTES

    present = (encoder.predict_attributes(images) > 0).float().mean(0)    # [A]
    return {name: float(p) for name, p in zip(ATTRIBUTES, present, strict=True)}


def path_steps(encoder, images, n_per_point: int = 1) -> torch.Tensor:
    """ID change ``[P - 1]`` between consecutive points of a path of ``P`` points (``[P * n_per_point]`` images,
    point-major; image ``j`` of every point drawn with the same noise): ``1 - cos``, mean over ``j``."""
    z = _grouped(encoder, images, n_per_point, "points")                # [P, n, E]
    return 1 - (z[1:] * z[:-1]).sum(-1).mean(1)                         # [P - 1]
