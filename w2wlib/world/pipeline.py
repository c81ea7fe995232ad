"""The mini world's tiny Stable Diffusion: components, training, and saving in diffusers format.

Same architecture family as SD 1.5, scaled down (see ``../shared/NOTES.md`` for the figures):

- a ``CLIPTokenizer`` with its own vocabulary (:mod:`w2wlib.world.text`) and a 4-layer ``CLIPTextModel``
  (64 wide, so that ``cross_attention_dim`` and the LoRA layout stay as they were);
- an ``AutoencoderKL`` with factor 8: 64×64×3 images ↔ 4×8×8 latents (16 channels at full
  resolution rather than 32: half the training cost on a CPU, ~1.0M parameters);
- a ``UNet2DConditionModel`` with cross-attention blocks (64, 128 channels; rank-1 LoRA on
  ``to_q``/``to_v`` of its 7 transformer blocks gives D = 5,376);
- SD 1.5's noise schedule (scaled-linear betas 0.00085–0.012, 1,000 steps) with a DDIM scheduler.

Training follows latent diffusion :cite:`rombach2022ldm`: the autoencoder first, then the UNet and the
text encoder together on cached latents, with 10% empty prompts for classifier-free guidance.
The result loads with plain ``StableDiffusionPipeline.from_pretrained(folder)``, offline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ArtifactMissingError, W2WError
from ..optim import adamw
from ..viz import to_tensor
from . import render
from .text import PromptMix, identity_prompt, write_tokenizer_files

__all__ = ["AutoencoderConfig", "UNetConfig", "make_tokenizer", "make_text_encoder", "make_autoencoder", "make_unet",
           "make_schedulers", "train_autoencoder", "encode_latents", "train_unet", "save_pipeline", "load_pipeline",
           "render_batch", "autoencode", "world_guidance", "TRAIN_IDENTITY_SEEDS"]

log = logging.getLogger(__name__)

#: Identity seeds the base pipeline is trained on; held-out identities use seeds >= 10**9.
TRAIN_IDENTITY_SEEDS = range(0, 10**8)

_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass
class AutoencoderConfig:
    """How the autoencoder is trained (images are rendered on the fly)."""

    n_identities: int = 30_000  # distinct identities drawn from (>= 20,000, as the brief asks)
    steps: int = 3_000          # optimiser steps
    batch: int = 64
    lr: float = 1e-3            # AdamW, cosine-decayed
    kl_weight: float = 1e-6     # SD's tiny KL keeps the latent near N(0, s^2) without blurring
    edge_weight: float = 1.0    # L1 on image gradients: keeps eyes, brows and glasses sharp
    face_weight: float = 2.0    # extra weight on the person mask: identity lives in the face
    init_logvar: float = -8.0   # initial posterior log-variance (see train_autoencoder)
    id_weight: float = 1.0      # weight of 1 - cos(teacher(rec), teacher(x)) when a teacher encoder is given
    checkpoint_every: int = 100 # steps between resumable checkpoints
    seed: int = 0


@dataclass
class UNetConfig:
    """How the UNet and text encoder are trained on cached latents."""

    n_identities: int = 30_000  # distinct identities in the latent cache
    views: int = 6              # images per identity in the cache
    steps: int = 12_000
    batch: int = 128
    lr: float = 4e-4
    uncond: float = 0.1         # fraction of empty prompts, for classifier-free guidance
    generic: float = 0.15       # fraction of "a photo of a person" (PromptMix.generic)
    short: float = 0.15         # fraction of short prompts (1-3 phrases); the rest are full descriptions
    checkpoint_every: int = 200 # steps between resumable checkpoints
    seed: int = 0


def render_batch(identity_seeds: np.ndarray, image_seeds: np.ndarray) -> torch.Tensor:
    """Renders as float ``[N, 3, 64, 64]`` in [-1, 1], diffusers' image convention."""
    return to_tensor(render.render_ids(identity_seeds, image_seeds))


def make_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                         pad_token="<|endoftext|>")


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(cfg)


def make_autoencoder():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=32)


def make_schedulers():
    """(DDPM for training, DDIM for sampling), both on SD 1.5's noise schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    return (DDPMScheduler(**_SCHEDULE, clip_sample=False),
            DDIMScheduler(**_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1))


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def train_autoencoder(cfg: AutoencoderConfig, *, device: torch.device, progress: bool = True,
                      checkpoint: Callable[[int, dict], None] | None = None, state: dict | None = None,
                      teacher: torch.nn.Module | None = None):
    """Train the AutoencoderKL on fresh renders; returns it with ``scaling_factor`` set from the data.

    ``checkpoint(step, state)`` is called every ``cfg.checkpoint_every`` steps with a resumable state; pass it back as ``state``.
    ``teacher`` (an :class:`~w2wlib.world.encoder.IdentityEncoder`, frozen) adds the identity loss
    ``cfg.id_weight * (1 - cos(teacher(rec), teacher(x)))``: pixel losses alone leave eyes, glasses and
    mouths faint for thousands of steps (``benchmarks/ae_recipe.md``); the identity loss sharpens them early.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    vae = make_autoencoder().to(device)
    # The posterior's log-variance starts near 0, i.e. unit noise on latents of unit scale, and the tiny
    # KL weight hardly moves it: the decoder then learns from noise and outputs blurred means (measured:
    # MAE 12/255 after 800 steps, no eyes). Starting at log-variance -8 (std 0.02) lets reconstruction
    # drive learning from the first step; the KL term still regularises it.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = cfg.init_logvar
    opt, sched = adamw(vae, lr=cfg.lr, steps=cfg.steps, warmup=100)
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    start = 0
    if state:
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        start = state["step"]
    vae.train()
    bar = tqdm(range(start, cfg.steps), desc="autoencoder", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        # per-step streams (data and posterior noise): a resumed run replays exactly what a straight one draws
        rng = np.random.default_rng([cfg.seed, step])
        ids = rng.integers(0, cfg.n_identities, cfg.batch)
        imgs, mask = render.render_ids(ids, rng.integers(0, 2**31, cfg.batch), return_mask=True)
        x = to_tensor(imgs).to(device)                                                             # [B,3,64,64]
        w = 1.0 + cfg.face_weight * torch.from_numpy(mask).to(device)[:, None]                    # [B,1,64,64]
        post = vae.encode(x).latent_dist
        gen = torch.Generator(device).manual_seed(int(rng.integers(2**62)))
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = (w * (rec - x).abs()).mean()
        for d_rec, d_x in zip(_edges(rec), _edges(x)):
            loss = loss + cfg.edge_weight * (d_rec - d_x).abs().mean()
        loss = loss + cfg.kl_weight * post.kl().mean()
        if teacher is not None and cfg.id_weight:
            with torch.no_grad():
                z_x = teacher(x)[0]                                                                # [B, E]
            loss = loss + cfg.id_weight * (1 - (teacher(rec)[0] * z_x).sum(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step(), sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoint and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            checkpoint(step + 1, {"model": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step + 1})
    vae.eval()
    # SD scales latents to unit variance before diffusion (0.18215 for SD 1.5); measure ours.
    with torch.no_grad():
        rng = np.random.default_rng([cfg.seed, 10**6])
        x = render_batch(rng.integers(0, cfg.n_identities, 512), rng.integers(0, 2**31, 512)).to(device)
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


@torch.no_grad()
def autoencode(vae, x: torch.Tensor) -> torch.Tensor:
    """Reconstruct float ``[N, 3, H, W]`` images in [-1, 1] through the posterior mean (same shape and range)."""
    x_in = x.to(vae.device, vae.dtype)
    return vae.decode(vae.encode(x_in).latent_dist.mean).sample.clamp(-1, 1).to(x.device, x.dtype)


@torch.no_grad()
def encode_latents(vae, identity_seeds: np.ndarray, image_seeds: np.ndarray, *, device: torch.device,
                   batch: int = 256, progress: bool = True) -> torch.Tensor:
    """Scaled latent means ``[N, 4, 8, 8]`` of renders, the cache the UNet trains on."""
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(identity_seeds), batch), desc="latent cache", disable=not progress):
        x = render_batch(identity_seeds[i:i + batch], image_seeds[i:i + batch]).to(device)
        out.append(vae.encode(x).latent_dist.mean.cpu() * vae.config.scaling_factor)
    return torch.cat(out)


def _tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def train_unet(cfg: UNetConfig, latents: torch.Tensor, factors: render.Factors, tokenizer, *, device: torch.device,
               progress: bool = True, checkpoint: Callable[[int, dict], None] | None = None, state: dict | None = None):
    """Train UNet and text encoder together with the epsilon objective on cached latents.

    ``latents[i]`` is an image of identity ``i`` of ``factors``; prompts are drawn per sample from its
    description (:func:`~w2wlib.world.text.identity_prompt`), mostly naming the whole identity.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    unet, text_encoder = make_unet().to(device), make_text_encoder(tokenizer).to(device)
    noise_sched, _ = make_schedulers()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt, sched = adamw(params, lr=cfg.lr, steps=cfg.steps, warmup=100)
    start = 0
    if state:
        unet.load_state_dict(state["unet"]), text_encoder.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        start = state["step"]
    unet.train(), text_encoder.train()
    alphas = noise_sched.alphas_cumprod.to(device)
    mix = PromptMix(generic=cfg.generic, short=cfg.short)
    bar = tqdm(range(start, cfg.steps), desc="unet", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.integers(0, len(latents), cfg.batch)
        prompts = ["" if rng.random() < cfg.uncond else identity_prompt(factors, i, rng, mix) for i in idx]
        x0 = latents[idx].to(device)                                                   # [B,4,8,8]
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch,), generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = text_encoder(_tokenize(tokenizer, prompts, device))[0]                 # [B,77,64]
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoint and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            checkpoint(step + 1, {"unet": unet.state_dict(), "text": text_encoder.state_dict(), "opt": opt.state_dict(),
                                  "sched": sched.state_dict(), "step": step + 1})
    return unet.eval(), text_encoder.eval()


def save_pipeline(folder: Path, *, vae, unet, text_encoder, tokenizer) -> Path:
    """Assemble a ``StableDiffusionPipeline`` and save it in diffusers format (safetensors)."""
    from diffusers import StableDiffusionPipeline

    _, ddim = make_schedulers()
    for part in (vae, unet):  # from_pretrained records the folder it read in config.json: a build into (or moved
        if part.config.get("_name_or_path") is not None:  # to) another folder would otherwise differ by that path
            part.register_to_config(_name_or_path=None)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=ddim,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def load_pipeline(folder: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Load the mini world's pipeline with plain diffusers, offline; a missing folder names the build command."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ArtifactMissingError(f"no diffusers pipeline at {folder}; build the mini world with `w2w world build` "
                                   f"(or `w2w world build --config micro --out DIR` for a tiny one)")
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def world_guidance(world: Path) -> float:
    """The classifier-free guidance scale the world in ``world`` is sampled at: the one its quality gates were
    measured at (``config.guidance`` in its ``manifest.json``), or 4.0 for a world that records none."""
    import json

    manifest = Path(world) / "manifest.json"
    if not manifest.is_file():
        return 4.0
    try:
        g = json.loads(manifest.read_text())["config"].get("guidance")
    except (ValueError, KeyError, AttributeError) as err:
        raise W2WError(f"{manifest} is not a readable world manifest ({err}); rebuild the world with "
                       f"`w2w world build`, or give the scale (-p sampler.guidance 7.5)") from err
    return 4.0 if g is None else float(g)
