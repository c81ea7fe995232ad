"""Batched multi-identity DreamBooth-LoRA: G identities trained in one forward pass, sharded with Accelerate.

weights2weights trained one DreamBooth-LoRA per identity (rank 1, ``lora_alpha`` 27, ``to_q``/``to_v``,
prompt "sks person", prior preservation with class images from the base model, lr 1e-4, 800 steps).
Here a trainable ``W [G, D]`` holds G such LoRAs and :class:`~w2wlib.lora.BatchedLora` applies row
``g`` to the samples of identity ``g``, so one UNet forward/backward trains all of them.

**Why this equals G separate runs.** Row ``g`` only enters the UNet on identity ``g``'s samples (the
base is frozen and a UNet mixes nothing across the batch: GroupNorm and attention act per sample), and
the loss is ``sum_g L_g`` where ``L_g`` is identity ``g``'s own DreamBooth loss (instance MSE +
``prior_loss_weight`` * class MSE, each a mean over that identity's samples). Hence
``dLoss/dW[g] = dL_g/dW[g]``: exactly its solo gradient. Gradient clipping is done per row (row ``g``'s
norm is the norm of identity ``g``'s LoRA parameters, as ``clip_grad_norm_`` computes it in a solo run).
Adam is element-wise, and every row gets a gradient at every step, so its moments and its shared step
counter are exactly those of G separate optimisers; with ``weight_decay=0`` no term touches a row from
outside. (A row that skipped a step would still move through momentum, which is why every identity is
in every step.) The randomness of identity ``g`` (initial ``A``, images drawn, noise, timesteps)
comes from generators seeded by ``(seed, identity key[, step])``, never from the other identities, so
its row does not depend on G, its position in the bank or the shard it falls in. The models run in
eval mode (no dropout, whose masks would come from a shared random state). What remains is float
rounding (batched matmul vs ``nn.Linear``, batch-size-dependent kernels): ~1e-5 of the update against
peft in ``tests/test_dreambooth.py``, a little more in the few entries where Adam's step
``g / (sqrt(v) + eps)`` sees a gradient near ``eps``.

Example:
    >>> cfg = DreamBoothConfig(steps=300)                                          # doctest: +SKIP
    >>> W = train_identities(unet, vae, text_encoder, tokenizer, ddpm, images, class_images, cfg,
    ...                      identity_keys=[17, 42])                               # doctest: +SKIP
    >>> W.shape                                                                    # doctest: +SKIP
    torch.Size([2, 5376])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from .diffusion import check_prediction_type, ddpm_loss
from .errors import LayoutError, W2WError
from .lora import BatchedLora, LoraLayout
from .optim import adamw
from .seeding import generator

__all__ = ["DreamBoothConfig", "StepDraw", "init_lora_bank", "draw_step", "encode_images", "encode_prompts",
           "train_identities", "generate_class_images", "train_shards", "merge_shards", "shard_name"]

logger = logging.getLogger(__name__)

_INIT, _STEP, _CLASS = 0, 1, 2                      # separate random streams per (seed, key)
_SHARD_RE = re.compile(r"^shard_(\d+)_(\d+)\.safetensors$")
_SHARD_KIND = "w2w-dreambooth-shard"


@dataclass
class DreamBoothConfig:
    """One DreamBooth-LoRA run per identity, as weights2weights did it (mini-world sizes by default)."""

    rank: int = 1                                    # w2w: rank-1 LoRA
    alpha: float = 27.0                              # w2w: lora_alpha 27, so the LoRA scale is 27
    target: tuple[str, ...] = ("to_q", "to_v")       # w2w: to_q/to_v of every attention layer
    instance_prompt: str = "a photo of sks person"   # the rare token "sks" binds the identity
    class_prompt: str = "a photo of a person"        # prior preservation keeps "person" generic
    prior_loss_weight: float = 1.0                   # DreamBooth default weight of the class loss
    lr: float = 5e-4                                 # mini-world default, to be tuned (w2w: 1e-4 on SD 1.5)
    steps: int = 300                                 # optimiser steps per identity (w2w: 800)
    lr_schedule: str = "constant"                    # constant (w2w, diffusers' default) | cosine (to 0 at steps)
    warmup: int = 0                                  # linear warm-up steps of the cosine schedule
    images_per_identity: int = 8                     # instance images per identity (K); checked against the data
    class_images: int = 200                          # size of the shared prior-preservation pool (M); checked
    batch_per_identity: int = 1                      # instance samples (and as many class samples) per step
    max_grad_norm: float | None = 1.0                # per-identity clipping, as diffusers' DreamBooth scripts
    identities_per_forward: int | None = None        # split a step into micro-batches (exact); None = all G
    shared_init: bool = True                         # one LoRA init for every identity (a fixed-seed script);
                                                     # False: each identity's own, which buries the learnt part
                                                     # of A under init noise (benchmarks/dreambooth_init.md)
    seed: int = 0                                    # root of every identity's random streams

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise W2WError(f"lr_schedule must be constant or cosine, not {self.lr_schedule!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target"] = list(self.target)
        return d


class StepDraw(NamedTuple):
    """What one identity uses at one step: image indices, noise ``[2b, c, h, w]``, timesteps ``[2b]``."""

    instance_idx: torch.Tensor
    class_idx: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


def _keys(keys: int | Sequence[int]) -> list[int]:
    keys = list(range(keys)) if isinstance(keys, int) else [int(k) for k in keys]
    if any(k < 0 for k in keys) or len(set(keys)) != len(keys):
        raise W2WError(f"identity keys must be distinct non-negative integers (identity seeds); got {keys[:10]}")
    return keys


def init_lora_bank(layout: LoraLayout, keys: int | Sequence[int], seed: int = 0, *, shared: bool = False) -> torch.Tensor:
    """Initial ``W [G, D]`` as peft initialises a LoRA (``init_lora_weights=True``).

    ``A`` is ``kaiming_uniform_(a=sqrt(5))`` (uniform in ``±1/sqrt(in_features)``) and ``B`` is zero.
    ``shared=True`` gives every identity the same ``A``, drawn from ``seed`` alone, as a training script
    run with one fixed seed does; otherwise each row's ``A`` is drawn from a generator seeded by
    ``(seed, key)``. Either way a row depends on its key only, never on G or on its position. ``keys``
    is a list of identity keys, or an int G for keys ``0..G-1``.

    >>> W = init_lora_bank(layout, [7, 3], seed=0)                    # doctest: +SKIP
    >>> torch.equal(W[0], init_lora_bank(layout, [7], seed=0)[0])     # doctest: +SKIP
    True
    """
    keys = _keys(keys)
    W = torch.zeros(len(keys), layout.dim)
    for g, key in enumerate(keys):
        gen = generator(seed, _INIT) if shared else generator(seed, key, _INIT)
        for e in layout.entries:
            a = torch.empty(e.a_shape)
            nn.init.kaiming_uniform_(a, a=5 ** 0.5, generator=gen)
            W[g, e.a_slice] = a.reshape(-1)
    return W


def draw_step(cfg: DreamBoothConfig, key: int, step: int, n_instance: int, n_class: int,
              latent_shape: Sequence[int], num_train_timesteps: int) -> StepDraw:
    """Identity ``key``'s draws at ``step``: ``b`` instance and ``b`` class images, noise, timesteps.

    Seeded by ``(cfg.seed, key, step)`` alone, so a solo run (peft, say) can replay them exactly.
    With ``n_class == 0`` (no prior preservation) there are only ``b`` samples.
    """
    b, gen = cfg.batch_per_identity, generator(cfg.seed, key, _STEP, step)
    inst = torch.randperm(n_instance, generator=gen)[:b] if b <= n_instance else \
        torch.randint(0, n_instance, (b,), generator=gen)
    if n_class:
        cls = torch.randperm(n_class, generator=gen)[:b] if b <= n_class else \
            torch.randint(0, n_class, (b,), generator=gen)
    else:
        cls = torch.zeros(0, dtype=torch.long)
    n = b + len(cls)
    noise = torch.randn((n, *latent_shape), generator=gen)
    t = torch.randint(0, num_train_timesteps, (n,), generator=gen)
    return StepDraw(inst, cls, noise, t)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [-1, 1] -> scaled latents ``[N, c, h, w]`` (float32, on the VAE's device).

    We use the posterior **mean** (times ``scaling_factor``), encoded once: it is deterministic, so
    an identity's data do not depend on any shared random state, and it is what the mini world's UNet
    was trained on. diffusers' DreamBooth scripts re-sample ``latent_dist.sample()`` at every step; for
    SD's VAE the posterior std is small next to the mean, so the two objectives are close.
    """
    p = next(vae.parameters())
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = [(vae.encode(images[i:i + batch].to(p.device, p.dtype)).latent_dist.mean - shift)
           * vae.config.scaling_factor for i in range(0, len(images), batch)]
    return torch.cat(out).float()


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Frozen text embeddings ``[len(prompts), L, C]`` (padded to the tokenizer's max length)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(next(text_encoder.parameters()).device))[0].float()


def _latents(x: torch.Tensor, vae, unet, what: str) -> torch.Tensor:
    """Images (3 channels, encoded here) or latents (the UNet's channels, used as they are)."""
    if x.dim() != 4:
        raise W2WError(f"{what} must be [N, C, H, W] images or latents; got shape {tuple(x.shape)}")
    if x.shape[1] == unet.config.in_channels:
        return x.float()
    if vae is not None and x.shape[1] == vae.config.in_channels:
        return encode_images(vae, x)
    img_ch = vae.config.in_channels if vae is not None else "no VAE given"
    raise W2WError(f"{what} have {x.shape[1]} channels: neither images ({img_ch}) nor latents "
                   f"({unet.config.in_channels})")


def _instances(images, keys) -> tuple[torch.Tensor, list[int]]:
    keys = None if keys is None else _keys(keys)
    if isinstance(images, Mapping):
        keys = _keys(list(images)) if keys is None else keys
        missing = [k for k in keys if k not in images]
        if missing or len(keys) != len(images):
            raise W2WError(f"instance images are given for identities {list(images)[:10]} but identity_keys "
                           f"are {keys[:10]}: every key needs its images, and only those")
        sizes = {tuple(images[k].shape) for k in keys}
        if len(sizes) != 1:
            raise W2WError(f"every identity needs the same number and size of instance images; got {sorted(sizes)}")
        images = torch.stack([torch.as_tensor(images[k]) for k in keys])
    images = torch.as_tensor(images)
    if images.dim() != 5:
        raise W2WError(f"instance images must be [G, K, C, H, W]; got shape {tuple(images.shape)}")
    keys = list(range(images.shape[0])) if keys is None else list(keys)
    if len(keys) != images.shape[0]:
        raise W2WError(f"{images.shape[0]} identities of instance images but {len(keys)} identity keys")
    return images, _keys(keys)


class _Frozen:
    """Eval mode and no parameter gradients inside; the models' own settings restored afterwards."""

    def __init__(self, *models):
        self.models = [m for m in models if m is not None]

    def __enter__(self):
        self.saved = [(m.training, [p.requires_grad for p in m.parameters()]) for m in self.models]
        for m in self.models:
            m.eval().requires_grad_(False)

    def __exit__(self, *exc):
        for m, (training, flags) in zip(self.models, self.saved):
            m.train(training)
            for p, f in zip(m.parameters(), flags):
                p.requires_grad_(f)


def train_identities(unet, vae, text_encoder, tokenizer, noise_scheduler, instance_images, class_images,
                     cfg: DreamBoothConfig, *, identity_keys: Sequence[int] | None = None,
                     init: torch.Tensor | None = None, device: torch.device | str | None = None,
                     progress: bool = True, on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Train one DreamBooth-LoRA per identity, all G in one batch; returns ``W [G, D]`` (float32, CPU).

    ``instance_images``: ``[G, K, 3, H, W]`` in [-1, 1] or ``{key: [K, 3, H, W]}`` (latents with the
    UNet's channel count are also accepted). ``class_images``: the shared prior-preservation pool
    ``[M, 3, H, W]`` (or latents), e.g. from :func:`generate_class_images`; ``None`` turns prior
    preservation off. ``identity_keys`` (identity seeds) seed each identity's random streams;
    ``init`` overrides :func:`init_lora_bank`. ``on_step(step, losses)`` gets each identity's loss ``[G]``.

    >>> W = train_identities(unet, vae, te, tok, ddpm, imgs, cls, cfg, identity_keys=[3, 9])  # doctest: +SKIP
    """
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    images, keys = _instances(instance_images, identity_keys)
    layout = LoraLayout.from_unet(unet, cfg.target, cfg.rank, cfg.alpha)
    G, K, b, T = len(keys), images.shape[1], cfg.batch_per_identity, noise_scheduler.config.num_train_timesteps
    with _Frozen(unet, vae, text_encoder):
        inst = _latents(images.flatten(0, 1), vae, unet, "instance images").to(device)
        inst = inst.reshape(G, K, *inst.shape[1:])
        cls = _latents(torch.as_tensor(class_images), vae, unet, "class images").to(device) \
            if class_images is not None and cfg.prior_loss_weight else None
        M = 0 if cls is None else len(cls)
        if K != cfg.images_per_identity or (M and M != cfg.class_images):
            raise W2WError(f"the data have {K} instance images per identity and {M} class images but the config "
                           f"says {cfg.images_per_identity} and {cfg.class_images}: the config is saved with the "
                           f"weights, so make it describe the data")
        check_prediction_type(noise_scheduler)
        emb = encode_prompts(tokenizer, text_encoder, [cfg.instance_prompt, cfg.class_prompt]).to(device)
        W0 = init_lora_bank(layout, keys, cfg.seed, shared=cfg.shared_init) if init is None else init.detach().float()
        if W0.shape != (G, layout.dim):
            raise LayoutError(f"init has shape {tuple(W0.shape)} but {G} identities x D={layout.dim:,} are needed")
        W = W0.to(device).clone().requires_grad_(True)
        # Adam is element-wise and every row gets a gradient at every step: per-row state == per-identity runs.
        # weight_decay 0: no term touches a row from outside; the schedule is shared, as in G solo runs
        opt, sched = adamw([W], lr=cfg.lr, steps=cfg.steps if cfg.lr_schedule == "cosine" else None, warmup=cfg.warmup)
        n = b + (b if M else 0)
        cond = torch.cat([emb[:1].expand(b, -1, -1), emb[1:].expand(n - b, -1, -1)])     # one identity's block
        per_fwd = cfg.identities_per_forward or G
        logger.info("DreamBooth-LoRA: %d identities x %d steps, D=%d, %d instance / %d class images, device %s",
                    G, cfg.steps, layout.dim, K, M, device)
        from tqdm.auto import tqdm

        bar = tqdm(range(cfg.steps), desc=f"dreambooth x{G}", disable=not progress, unit="step")
        with BatchedLora.attached_to(unet, layout) as bank:
            for step in bar:
                draws = [draw_step(cfg, k, step, K, M, inst.shape[2:], T) for k in keys]
                losses = torch.zeros(G, device=device)
                for lo in range(0, G, per_fwd):
                    rows = range(lo, min(G, lo + per_fwd))
                    x0 = torch.cat([torch.cat([inst[g, draws[g].instance_idx]] +
                                              ([cls[draws[g].class_idx]] if M else [])) for g in rows])
                    noise = torch.cat([draws[g].noise for g in rows]).to(device)
                    t = torch.cat([draws[g].timesteps for g in rows]).to(device)
                    index = torch.arange(rows.start, rows.stop, device=device).repeat_interleave(n)
                    err = ddpm_loss(unet, noise_scheduler, x0, noise, t, cond.repeat(len(rows), 1, 1),
                                    bank=bank, W=W, index=index).view(len(rows), n)
                    loss = err[:, :b].mean(1)                                          # instance MSE
                    if M:
                        loss = loss + cfg.prior_loss_weight * err[:, b:].mean(1)       # prior preservation
                    loss.sum().backward()           # sum of per-identity means: row g gets only dL_g/dW[g]
                    losses[rows.start:rows.stop] = loss.detach()
                if cfg.max_grad_norm:
                    norms = W.grad.norm(dim=1, keepdim=True)
                    W.grad.mul_((cfg.max_grad_norm / (norms + 1e-6)).clamp(max=1.0))
                opt.step(), sched.step()
                W.grad = None
                if on_step is not None:
                    on_step(step, losses.cpu())
                bar.set_postfix(loss=f"{losses.mean().item():.4f}", refresh=False)
    return W.detach().cpu()


@torch.no_grad()
def generate_class_images(pipe, n: int, prompt: str = "a photo of a person", seed: int = 0, *,
                          batch_size: int = 16, progress: bool = True, **pipe_kwargs) -> torch.Tensor:
    """Prior-preservation images from the BASE pipeline: float ``[n, 3, H, W]`` in [-1, 1], on the CPU.

    Image ``i`` uses its own generator seeded by ``(seed, i)``, so it does not depend on ``batch_size``.
    ``pipe_kwargs`` (``num_inference_steps``, ``guidance_scale``...) go to the pipeline call.

    >>> cls = generate_class_images(pipe, 200, "a photo of a person", seed=0)   # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if n < 1:
        raise W2WError(f"asked for {n} class images; prior preservation needs at least one")
    out = []
    for i in tqdm(range(0, n, batch_size), desc="class images", disable=not progress):
        m = min(batch_size, n - i)
        gens = [generator(seed, i + j, _CLASS) for j in range(m)]
        imgs = pipe(prompt=[prompt] * m, generator=gens, output_type="pt", **pipe_kwargs).images
        out.append(imgs.float().cpu() * 2 - 1)
    return torch.cat(out)


# --------------------------------------------------------------------------- shards


def shard_name(first: int, last: int) -> str:
    """File name of the shard holding identities ``first..last`` (positions in the seed list)."""
    return f"shard_{first:06d}_{last:06d}.safetensors"


def _shard_meta(path: Path) -> tuple[dict[str, str], torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("kind") != _SHARD_KIND:
            raise W2WError(f"{path} is not a DreamBooth shard (metadata kind {meta.get('kind')!r})")
        return meta, f.get_tensor("seeds")


def train_shards(identity_seeds: Sequence[int], folder: str | os.PathLike, *, unet, vae, text_encoder, tokenizer,
                 noise_scheduler, instance_images: Callable[[list[int]], torch.Tensor] | Mapping,
                 class_images, cfg: DreamBoothConfig, chunk_size: int = 64, state=None,
                 progress: bool = True, dtype: torch.dtype = torch.float32) -> list[Path]:
    """Train ``identity_seeds`` in chunks of ``chunk_size``, split across Accelerate processes; resumable.

    Chunks are cut from the whole list first (so file names do not depend on the number of processes),
    then shared out with ``state.split_between_processes``; ``state`` is an ``Accelerator`` or
    ``PartialState`` (default ``PartialState()``). Each finished chunk is written atomically (temp
    name, then rename) as ``shard_{first:06d}_{last:06d}.safetensors`` holding ``W`` and ``seeds``;
    a chunk whose file exists is skipped after checking its seeds and config. ``W`` is stored as ``dtype``
    (float16 halves a shard; a shard of either dtype resumes and merges). ``instance_images(seeds)``
    returns ``[len(seeds), K, 3, H, W]`` (or pass a mapping seed -> ``[K, 3, H, W]``). Returns this
    process's shard paths; ends with ``state.wait_for_everyone()``. Merge with :func:`merge_shards`.

    >>> train_shards(range(1000), "shards", unet=unet, ..., state=Accelerator())   # doctest: +SKIP
    """
    from safetensors.torch import save_file

    if state is None:
        from accelerate import PartialState

        state = PartialState()
    seeds, folder = _keys(identity_seeds), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layout = LoraLayout.from_unet(unet, cfg.target, cfg.rank, cfg.alpha)
    meta = {"kind": _SHARD_KIND, "total": str(len(seeds)), "config": json.dumps(cfg.to_dict(), sort_keys=True),
            "layout": json.dumps(layout.to_dict())}
    chunks = [list(range(i, min(len(seeds), i + chunk_size))) for i in range(0, len(seeds), chunk_size)]
    with state.split_between_processes(chunks) as mine:
        mine = list(mine)
    logger.info("process %d/%d: %d of %d chunks", state.process_index, state.num_processes, len(mine), len(chunks))
    cls = None
    if class_images is not None:
        with _Frozen(vae):
            cls = _latents(torch.as_tensor(class_images), vae, unet, "class images").to(state.device)
    paths = []
    from tqdm.auto import tqdm

    for pos in tqdm(mine, desc=f"shards of {chunk_size} (process {state.process_index})", unit="shard",
                    disable=not progress):
        path = folder / shard_name(pos[0], pos[-1])
        chunk_seeds = [seeds[p] for p in pos]
        if path.exists():
            old, old_seeds = _shard_meta(path)
            if old_seeds.tolist() != chunk_seeds or any(old.get(k) != meta[k] for k in ("config", "total", "layout")):
                raise W2WError(f"{path} was trained for other seeds or another config; use a fresh folder")
            logger.info("skipping %s: already trained", path.name)
            paths.append(path)
            continue
        imgs = {s: instance_images[s] for s in chunk_seeds} if isinstance(instance_images, Mapping) \
            else instance_images(chunk_seeds)
        W = train_identities(unet, vae, text_encoder, tokenizer, noise_scheduler, imgs, cls, cfg,
                             identity_keys=chunk_seeds, device=state.device, progress=progress)
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        save_file({"W": W.to(dtype).contiguous(), "seeds": torch.tensor(chunk_seeds, dtype=torch.int64)}, str(tmp),
                  metadata={**meta, "first": str(pos[0]), "last": str(pos[-1])})
        os.replace(tmp, path)
        paths.append(path)
    state.wait_for_everyone()
    return paths


def merge_shards(folder: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """All shards of ``folder`` as ``(W [N, D], seeds [N])``, in seed-list order.

    Raises W2WError naming the problem when shards are missing (a gap, or an end short of the
    recorded total), overlap, repeat a seed, or were trained with different configs or layouts.

    >>> W, seeds = merge_shards("shards")          # doctest: +SKIP
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    found = sorted((int(m[1]), int(m[2]), p) for p in folder.glob("shard_*.safetensors")
                   if (m := _SHARD_RE.match(p.name)))
    if not found:
        raise W2WError(f"no shard_*.safetensors in {folder}: run train_shards first")
    Ws, seeds, ref, expect = [], [], None, 0
    for first, last, path in found:
        meta, _ = _shard_meta(path)
        if first < expect:
            raise W2WError(f"{path.name} overlaps the shard before it: identities {first}..{expect - 1} appear twice")
        if first > expect:
            raise W2WError(f"identities {expect}..{first - 1} are missing from {folder} (a gap before {path.name}); "
                           f"rerun train_shards to fill it")
        key = (meta.get("total"), meta.get("config"), meta.get("layout"))
        if ref is not None and key != ref:
            raise W2WError(f"{path.name} was trained with another config, layout or seed list than {found[0][2].name}")
        ref, t = key, load_file(str(path))
        if (int(meta["first"]), int(meta["last"])) != (first, last) or len(t["W"]) != last - first + 1 \
                or len(t["seeds"]) != len(t["W"]):
            raise W2WError(f"{path.name} is inconsistent: its name, metadata and row counts disagree")
        Ws.append(t["W"]), seeds.append(t["seeds"])
        expect = last + 1
    total = int(ref[0])
    if expect != total:
        raise W2WError(f"identities {expect}..{total - 1} are missing from {folder} (the last shards); "
                       f"rerun train_shards to fill them")
    seeds_all = torch.cat(seeds)
    if len(torch.unique(seeds_all)) != len(seeds_all):
        raise W2WError(f"{folder} holds some identity seed more than once")
    return torch.cat([w.float() for w in Ws]), seeds_all
