"""Images from weights: a ``StableDiffusionPipeline`` run with one identity LoRA per sample.

Row ``g`` of ``W [G, D]`` is applied to the samples of identity ``g`` through
:class:`~w2wlib.lora.BatchedLora`, so a batch of identities is generated in one pipeline call, with
classifier-free guidance (the pipeline's doubled batch uses row ``n % B``). Image ``j`` of every row
starts from the same noise (its generator is seeded by ``(seed, j)``), so images of different weights
are paired: the base model, a reconstruction and the original identity differ only by their weights.

``edited=`` with ``switch_t=`` is w2w's timestep switch for edits (its ``edit_inference``): the original
rows denoise the early, high-noise steps (timestep ``t > switch_t``), which lay out the image, and the
edited rows every step after (``t <= switch_t``), so an edit changes the person without moving the picture.

Example:
    >>> imgs = generate(pipe, W[:4], n_per_row=2, steps=25)     # doctest: +SKIP
    >>> imgs.shape                                             # doctest: +SKIP
    (8, 64, 64, 3)
    >>> edited = generate(pipe, W[:4], edited=W_edit[:4], switch_t=800)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from .errors import W2WError
from .lora import BatchedLora, LoraLayout
from .seeding import generator

__all__ = ["generate", "generate_loaded", "image_generator"]


def image_generator(seed: int, j: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of image ``j``: the stream ``(seed, j)`` (:mod:`w2wlib.seeding`), whatever the batch it falls in."""
    return generator(seed, j, device=device)


@torch.no_grad()
def generate(pipe, W: torch.Tensor | None = None, *, prompt: str = "a photo of sks person", n_per_row: int = 1,
             seed: int = 0, steps: int = 25, guidance: float = 4.0, batch: int = 32,
             layout: LoraLayout | None = None, progress: bool = False, edited: torch.Tensor | None = None,
             switch_t: int | None = None, negative_prompt: str = "") -> np.ndarray:
    """Images of each LoRA in ``W [G, D]`` (``None``: the base model, one "row"), uint8 ``[G * n_per_row, H, W, 3]``.

    Images are row-major: ``out[g * n_per_row + j]`` is image ``j`` of row ``g``. ``layout`` is the
    LoRA layout of ``W`` (default: rank 1, alpha 27 on ``to_q``/``to_v``, as w2w; pass
    ``dataset.lora_layout(pipe.unet)`` for a dataset's own). The pipeline is left as it was (a LoRA bank
    the caller attached stays attached).

    ``edited`` ``[G, D]`` (with ``switch_t``) are edited rows of ``W``: row ``g`` denoises the steps with
    timestep ``t > switch_t`` with ``W[g]`` and the steps with ``t <= switch_t`` with ``edited[g]``. A
    ``switch_t`` at or above the first timestep gives ``generate(pipe, edited)``, one below the last gives
    ``generate(pipe, W)``. ``negative_prompt`` is the prompt of guidance's unconditional branch ("" : none).
    """
    from tqdm.auto import tqdm

    if n_per_row < 1:
        raise W2WError(f"n_per_row must be >= 1, got {n_per_row}")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    device = pipe.unet.device
    if W is not None and W.dim() == 1:
        W = W[None]
    if (edited is None) != (switch_t is None):
        raise W2WError("pass edited= and switch_t= together: the edited rows and the timestep from which they "
                       "replace the original ones (w2w's start_noise; 1000 edits every step)")
    if edited is not None:
        if W is None:
            raise W2WError("edited= needs the original rows W too: the base model has no weights to edit")
        edited = torch.as_tensor(edited)
        edited = edited[None] if edited.dim() == 1 else edited
        if isinstance(switch_t, bool) or not isinstance(switch_t, (int, float)) or math.isnan(switch_t):
            raise W2WError(f"switch_t must be a timestep number (0 to 1000 for SD's schedulers), not {switch_t!r}")
        if edited.shape != W.shape:
            raise W2WError(f"edited has shape {tuple(edited.shape)} but W has {tuple(W.shape)}: give one edited row "
                           f"per original row")
    rows = 1 if W is None else len(W)
    jobs = [(g, j) for g in range(rows) for j in range(n_per_row)]
    out = []
    bank_cm = contextlib.nullcontext() if W is None else \
        BatchedLora.attached_to(pipe.unet, layout or LoraLayout.from_unet(pipe.unet))
    with bank_cm as bank:
        if bank is not None:
            W = bank.check(W).to(device, pipe.unet.dtype)
            edited = None if edited is None else bank.check(edited).to(device, pipe.unet.dtype)
        for i in tqdm(range(0, len(jobs), batch), desc="generate", disable=not progress):
            chunk = jobs[i:i + batch]
            idx = [g for g, _ in chunk]
            kwargs = dict(prompt=[prompt] * len(chunk), height=size, width=size, num_inference_steps=steps,
                          guidance_scale=guidance, output_type="np",
                          negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                          generator=[image_generator(seed, j, device) for _, j in chunk])  # image j alike in every row
            with contextlib.nullcontext() if bank is None else bank.use(W[idx]), \
                    contextlib.nullcontext() if edited is None else _switch_at(pipe.unet, bank, edited[idx], switch_t):
                imgs = pipe(**kwargs).images
            out.append((imgs * 255).round().astype(np.uint8))
    return np.concatenate(out)


@torch.no_grad()
def generate_loaded(pipe, W: torch.Tensor, *, layout: LoraLayout, prompt: str = "a photo of sks person",
                    n_per_row: int = 1, seed: int = 0, steps: int = 25, guidance: float = 4.0,
                    negative_prompt: str = "") -> np.ndarray:
    """The images :func:`generate` draws, drawn instead the way a diffusers user would: each row of ``W [G, D]``
    saved as a diffusers LoRA file, loaded with the pipeline's own ``load_lora_weights``, a plain pipeline call,
    then unloaded. uint8 ``[G * n_per_row, H, W, 3]``, row-major, image ``j`` from the same noise as ``generate``'s.
    It takes ``generate``'s drawing arguments (a chapter passes :attr:`w2wlib.models.Models.draw` to both).

    It is the reference ``generate`` must match, and the proof that a row's file loads in diffusers.
    """
    import tempfile

    from diffusers.utils import logging as diffusers_logging

    from .lora_io import save_diffusers_lora

    W = W[None] if W.dim() == 1 else W
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    device = pipe.unet.device
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()   # our files hold UNet keys only: no text-encoder notice per load
    out = []
    try:
        for g in range(len(W)):
            with tempfile.TemporaryDirectory() as tmp:
                save_diffusers_lora(W[g], layout, tmp)
                pipe.load_lora_weights(tmp, adapter_name=f"w2w_row{g}")
                try:
                    imgs = pipe([prompt] * n_per_row, negative_prompt=[negative_prompt] * n_per_row if negative_prompt
                                else None, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                                generator=[image_generator(seed, j, device) for j in range(n_per_row)],
                                output_type="np").images
                finally:
                    pipe.unload_lora_weights()
            out.append((imgs * 255).round().astype(np.uint8))
    finally:
        diffusers_logging.set_verbosity(level)
    return np.concatenate(out)


@contextlib.contextmanager
def _switch_at(unet, bank: BatchedLora, edited: torch.Tensor, switch_t: int):
    """Within the block, the first UNet call at a timestep ``t <= switch_t`` puts ``edited`` on top of ``bank``.

    A forward pre-hook on the UNet, not a step-end callback: it sees the timestep each denoising step is run
    at, the first step included, whatever the scheduler. Timesteps only decrease, so one switch suffices;
    leaving the block takes the edited rows off again.
    """
    with contextlib.ExitStack() as stack:
        switched = []                                      # set once the edited rows are on the bank

        def hook(module, args, kwargs):
            t = kwargs["timestep"] if "timestep" in kwargs else args[1]
            if not switched and float(torch.as_tensor(t).reshape(-1)[0]) <= switch_t:
                stack.enter_context(bank.use(edited))
                switched.append(True)

        stack.callback(unet.register_forward_pre_hook(hook, with_kwargs=True).remove)
        yield
