"""Scoring inversions as the w2w++ poster proposed: the ID score of the inverted model's images.

A method is scored on the images its model draws over several noise seeds, against **reference images**
of the person (for the mini world, evaluation renders the method never saw; for SD 1.5, other photos),
and, for comparison, against the input image itself. The references are arguments: nothing here knows
which world made them. :func:`single_image_dreambooth` is the unconstrained reference w2w compared
with: a DreamBooth-LoRA trained directly on the one input image, outside any space.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import W2WError
from ..metrics import bootstrap_ci, identity_scores

__all__ = ["score_models", "summary_row", "single_image_dreambooth"]


def score_models(pipe, encoder, W: torch.Tensor | None, references: np.ndarray, inputs: np.ndarray | None = None, *,
                 n_images: int = 4, n_refs: int = 4, seed: int = 0, steps: int = 25, guidance: float = 4.0,
                 layout=None, prompt: str = "a photo of sks person") -> dict[str, object]:
    """ID scores of the models in ``W [G, D]`` (``None``: the base model for every row).

    ``references``: uint8 ``[G * n_refs, H, W, 3]``, row-major by identity; ``inputs``: ``[G, H, W, 3]``.
    Returns ``{"id": [G], "id_input": [G] or None, "images": uint8 [G * n_images, ...]}``.
    """
    from ..generate import generate

    G = len(references) // n_refs
    if G * n_refs != len(references) or (W is not None and len(W) != G):
        raise W2WError(f"{len(references)} references do not split into {n_refs} per identity for "
                       f"{'the base model' if W is None else f'{len(W)} models'}")
    if W is None:
        one = generate(pipe, None, n_per_row=n_images, seed=seed, steps=steps, guidance=guidance, prompt=prompt)
        images = np.tile(one, (G, 1, 1, 1))
    else:
        images = generate(pipe, W, n_per_row=n_images, seed=seed, steps=steps, guidance=guidance, layout=layout,
                          prompt=prompt)
    out: dict[str, object] = {"id": identity_scores(encoder, images, references, n_images, n_refs), "images": images}
    out["id_input"] = None if inputs is None else identity_scores(encoder, images, inputs, n_images, 1)
    return out


def summary_row(name: str, scores: dict, seconds_per_image: float | None = None, *, seed: int = 0) -> list:
    """One table row: name, mean ID with its bootstrap 95 % CI, ID against the input, seconds per image."""
    m, lo, hi = bootstrap_ci(scores["id"], seed=seed)
    inp = scores.get("id_input")
    return [name, m, f"[{lo:.3f}, {hi:.3f}]", "—" if inp is None else float(torch.as_tensor(inp).mean()),
            "—" if seconds_per_image is None else f"{seconds_per_image:.2f}"]


def single_image_dreambooth(pipe, images: torch.Tensor, *, steps: int, lr: float, keys: Sequence[int] | None = None,
                            cfg=None, progress: bool = False) -> torch.Tensor:
    """A DreamBooth-LoRA per image ``[G, 3, H, W]`` (in [-1, 1]) trained on that image alone, no prior: ``W [G, D]``."""
    from ..diffusion import training_scheduler
    from ..dreambooth import DreamBoothConfig, train_identities

    cfg = cfg or DreamBoothConfig(steps=steps, lr=lr, images_per_identity=1, prior_loss_weight=0.0)
    keys = list(range(len(images))) if keys is None else list(keys)
    return train_identities(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, training_scheduler(pipe),
                            images[:, None], None, cfg, identity_keys=keys, progress=progress)
