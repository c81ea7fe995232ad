"""Images from weights: a ``StableDiffusionPipeline`` run with one identity LoRA per sample.

Row ``g`` of ``W [G, D]`` is applied to the samples of identity ``g`` through
:class:`~w2wlib.lora.BatchedLora`, so a batch of identities is generated in one pipeline call, with
classifier-free guidance (the pipeline's doubled batch uses row ``n % B``). Image ``j`` of every row
starts from the same noise (its generator is seeded by ``(seed, j)``), so images of different weights
are paired: the base model, a reconstruction and the original identity differ only by their weights.

Example:
    >>> imgs = generate(pipe, W[:4], n_per_row=2, steps=25)     # doctest: +SKIP
    >>> imgs.shape                                             # doctest: +SKIP
    (8, 64, 64, 3)
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .errors import W2WError
from .lora import BatchedLora, LoraLayout

__all__ = ["generate", "image_generator"]


def image_generator(seed: int, j: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of image ``j``: seeded by ``(seed, j)``, whatever the batch it falls in."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, j]).generate_state(1)[0]))


@torch.no_grad()
def generate(pipe, W: torch.Tensor | None = None, *, prompt: str = "a photo of sks person", n_per_row: int = 1,
             seed: int = 0, steps: int = 25, guidance: float = 4.0, batch: int = 32,
             layout: LoraLayout | None = None, progress: bool = False) -> np.ndarray:
    """Images of each LoRA in ``W [G, D]`` (``None``: the base model, one "row"), uint8 ``[G * n_per_row, H, W, 3]``.

    Images are row-major: ``out[g * n_per_row + j]`` is image ``j`` of row ``g``. ``layout`` is the
    LoRA layout of ``W`` (default: rank 1, alpha 27 on ``to_q``/``to_v``, as w2w; pass
    ``dataset.lora_layout(pipe.unet)`` for a dataset's own). The pipeline is left as it was (a LoRA bank
    the caller attached stays attached).
    """
    from tqdm.auto import tqdm

    if n_per_row < 1:
        raise W2WError(f"n_per_row must be >= 1, got {n_per_row}")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    device = pipe.unet.device
    if W is not None and W.dim() == 1:
        W = W[None]
    rows = 1 if W is None else len(W)
    jobs = [(g, j) for g in range(rows) for j in range(n_per_row)]
    out = []
    bank_cm = contextlib.nullcontext() if W is None else \
        BatchedLora.attached_to(pipe.unet, layout or LoraLayout.from_unet(pipe.unet))
    with bank_cm as bank:
        if bank is not None:
            W = bank.check(W).to(device, pipe.unet.dtype)
        for i in tqdm(range(0, len(jobs), batch), desc="generate", disable=not progress):
            chunk = jobs[i:i + batch]
            kwargs = dict(prompt=[prompt] * len(chunk), height=size, width=size, num_inference_steps=steps,
                          guidance_scale=guidance, output_type="np",
                          generator=[image_generator(seed, j, device) for _, j in chunk])  # image j alike in every row
            with contextlib.nullcontext() if bank is None else bank.use(W[[g for g, _ in chunk]]):
                imgs = pipe(**kwargs).images
            out.append((imgs * 255).round().astype(np.uint8))
    return np.concatenate(out)
