"""The VAE trainer: KL schedules, AdamW + cosine LR, Accelerate (DDP, AMP), checkpoints with exact resume.

:func:`train_vae` optimises a :class:`~w2wlib.spaces.WeightVAE` (which computes its own loss) on
standardised rows streamed from a memory-mapped :class:`~w2wlib.data.WeightsDataset` (or a tensor of
standardised rows), so RAM holds one batch at a time.

- **β schedules** (:func:`beta_at`): ``"warmup_linear"`` (β = 0 for ``beta_warmup`` steps, then a linear
  ramp to ``beta_max`` over ``beta_ramp`` steps; Bowman et al. 2016, the seeds' recipe), ``"cyclical"``
  (Fu et al. 2019: ``cycles`` ramps, each rising over the first ``cycle_ratio`` of its cycle) and
  ``"constant"``; free bits are passed to the model's loss.
- **Exact resume**: the batch of step ``s`` and every random draw in it are pure functions of
  ``(seed, s, rank)``, so a checkpoint needs no iterator state. Killing a run and resuming from its last
  checkpoint reaches bit-identical weights (same machine, same number of processes).
- **Validation** holds out whole identities (rows), chosen by ``split_seed``; see :func:`split_rows`.
- **Multi-GPU**: run the same script under ``accelerate launch``; ``batch_size`` is the global batch.

Example:
    >>> from w2wlib.spaces import VAEConfig, VAESpace
    >>> space = VAESpace(VAEConfig.scaled(ds.dim), seed=0)                       # doctest: +SKIP
    >>> history = train_vae(space, ds, TrainConfig(steps=3000), out_dir="runs/vae")  # doctest: +SKIP
    >>> plot_history(history).savefig("loss.png")                                # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ._version import __version__
from .optim import adamw
from .seeding import seed_int
from .errors import W2WError
from .spaces.base import _StdRows
from .stages import write_text_atomic
from .spaces.vae import VAESpace, WeightVAE, kl_to_prior

__all__ = ["TrainConfig", "train_vae", "beta_at", "lr_at", "split_rows", "plot_history", "load_history",
           "CHECKPOINT_FILE"]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
_LOG_ONLY = ("checkpoint_every", "log_every", "val_every")  # fields a resumed run may change
_TRAIN_COLS = ("loss", "recon", "kl", "grad_norm")


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train_vae`; stored in every checkpoint.

    >>> TrainConfig(steps=100, beta_warmup=20, beta_ramp=40).beta_schedule
    'warmup_linear'
    """

    steps: int = 2000                  # optimiser steps in the whole run (the cosine LR ends here)
    batch_size: int = 64               # global batch (split evenly over processes), the seeds' 64
    lr: float = 1e-3                   # peak AdamW learning rate
    weight_decay: float = 1e-4         # AdamW decay of weight matrices (not of biases or norms)
    warmup: int = 100                  # linear LR warm-up steps, then cosine decay
    min_lr_ratio: float = 0.05         # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0             # max global gradient norm; 0 turns clipping off
    beta_schedule: str = "warmup_linear"  # "warmup_linear" | "cyclical" | "constant"
    beta_max: float = 1.0              # final β (1 = the ELBO, see WeightVAE.forward)
    beta_warmup: int = 500             # warmup_linear: steps at β = 0, so reconstruction is learnt first
    beta_ramp: int = 500               # warmup_linear: steps of the linear ramp from 0 to beta_max
    cycles: int = 4                    # cyclical: number of cycles over the run
    cycle_ratio: float = 0.5           # cyclical: share of each cycle spent ramping up
    free_bits: float = 0.0             # per-latent-dimension KL floor in nats (0 = off)
    checkpoint_every: int = 500        # steps between checkpoints (and at the end) when out_dir is given
    log_every: int = 50                # steps between history rows (train metrics averaged over them)
    val_every: int = 250               # steps between validation passes (and at the end)
    val_fraction: float = 0.1          # share of identities held out for validation
    split_seed: int | None = None      # seed of the held-out split (None: seed); fix it to compare runs
    seed: int = 0                      # data order and all noise: a pure function of (seed, step, rank)
    mixed_precision: str = "auto"      # "auto" (bf16 on a CUDA GPU that has it, else off) | "no" | "bf16" | "fp16"

    def __post_init__(self) -> None:
        ints = ("steps", "batch_size", "checkpoint_every", "log_every", "val_every", "cycles")
        bad = [f for f in ints if getattr(self, f) < 1] + [f for f in ("warmup", "beta_warmup", "beta_ramp")
                                                           if getattr(self, f) < 0]
        if bad:
            raise W2WError(f"TrainConfig: {bad} must be >= 1 (warm-ups and ramps >= 0).")
        if self.beta_schedule not in ("warmup_linear", "cyclical", "constant"):
            raise W2WError(f"beta_schedule must be 'warmup_linear', 'cyclical' or 'constant', "
                           f"not {self.beta_schedule!r}.")
        if not 0 < self.cycle_ratio <= 1 or not 0 <= self.val_fraction < 1 or self.free_bits < 0 or self.beta_max < 0:
            raise W2WError("TrainConfig: cycle_ratio must be in (0, 1], val_fraction in [0, 1), free_bits and "
                           "beta_max >= 0.")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise W2WError(f"mixed_precision must be 'auto', 'no', 'bf16' or 'fp16', not {self.mixed_precision!r}.")

    def split(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This run's (train, val) rows of an ``n``-row dataset: :func:`split_rows` with ``split_seed`` (or ``seed``)."""
        return split_rows(n, self.val_fraction, self.seed if self.split_seed is None else self.split_seed)


def beta_at(step: int, cfg: TrainConfig) -> float:
    """The KL weight β at (0-based) optimiser step ``step``.

    >>> cfg = TrainConfig(steps=100, beta_warmup=10, beta_ramp=20, beta_max=0.5)
    >>> [beta_at(s, cfg) for s in (0, 9, 10, 20, 30, 99)]
    [0.0, 0.0, 0.0, 0.25, 0.5, 0.5]
    >>> cyc = TrainConfig(steps=100, beta_schedule="cyclical", cycles=2, cycle_ratio=0.5)
    >>> [beta_at(s, cyc) for s in (0, 25, 49, 50, 75)]
    [0.0, 1.0, 1.0, 0.0, 1.0]
    """
    if cfg.beta_schedule == "constant":
        return cfg.beta_max
    if cfg.beta_schedule == "cyclical":
        period = cfg.steps / cfg.cycles
        tau = (step % period) / period                     # position in the cycle, [0, 1)
        return cfg.beta_max * min(1.0, tau / cfg.cycle_ratio)
    if step < cfg.beta_warmup:
        return 0.0
    if cfg.beta_ramp == 0:
        return cfg.beta_max
    return cfg.beta_max * min(1.0, (step - cfg.beta_warmup) / cfg.beta_ramp)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at step ``step``: linear warm-up, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) row indices, sorted: a held-out split by identity, a pure function of ``seed``.

    >>> tr, va = split_rows(10, 0.2, seed=0)
    >>> len(tr), len(va), sorted(tr.tolist() + va.tolist()) == list(range(10))
    (8, 2, True)
    """
    n_val = 0 if val_fraction <= 0 else max(1, round(val_fraction * n))
    if n - n_val < 1:
        raise W2WError(f"val_fraction={val_fraction} leaves no training rows out of {n}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_int(seed, 0)))
    return torch.sort(perm[n_val:]).values, torch.sort(perm[:n_val]).values


class _Order:
    """Rows of the global batch of step ``s``: epoch ``s // (n // B)`` of seeded permutations, no state."""

    def __init__(self, train_rows: torch.Tensor, batch: int, seed: int):
        self.rows, self.batch, self.seed, self._epoch, self._perm = train_rows, batch, seed, -1, None
        self.per_epoch = train_rows.numel() // batch       # drop_last: every batch is full

    def __call__(self, step: int) -> torch.Tensor:
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(seed_int(self.seed, 1, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.rows.numel(), generator=g)
        return self.rows[self._perm[j * self.batch:(j + 1) * self.batch]]


class _Prefetch:
    """The rows of step ``s + 1`` are read in a background thread while step ``s`` computes.

    Reading a memory-mapped file releases the GIL, so disk and compute overlap; the batch of a step is
    a pure function of the step, so prefetching changes no result.
    """

    def __init__(self, src: _StdRows, order: _Order, rank: int, local: int, pin: bool):
        self.src, self.order, self.rank, self.local, self.pin = src, order, rank, local, pin
        self.pool, self.pending = None, {}

    def _load(self, step: int) -> torch.Tensor:
        x = self.src.get(self.order(step)[self.rank * self.local:(self.rank + 1) * self.local])  # [B / P, D]
        return x.pin_memory() if self.pin else x

    def __call__(self, step: int, next_step: int | None) -> torch.Tensor:
        fut = self.pending.pop(step, None)
        x = fut.result() if fut is not None else self._load(step)
        if next_step is not None:
            self.pending[next_step] = self.pool.submit(self._load, next_step)
        return x

    def __enter__(self) -> "_Prefetch":
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="w2w-prefetch")
        return self

    def __exit__(self, *_: Any) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


def train_vae(space_or_model: VAESpace | WeightVAE, data: Any, cfg: TrainConfig | None = None,
              out_dir: str | os.PathLike | None = None, *, resume: bool = True, progress: bool = True,
              stop_after: int | None = None, accelerator: Any = None) -> list[dict[str, Any]]:
    """Train the VAE in place on ``data`` (a WeightsDataset, or a standardised ``[N, D]`` tensor).

    With ``out_dir`` it writes ``checkpoint.pt`` (atomically, every ``checkpoint_every`` steps),
    ``history.csv``/``history.json``, ``split.json`` (the row indices of each split) and, at the end,
    the trained space in ``out_dir/space``; with ``resume`` it continues from ``checkpoint.pt``.
    ``stop_after=s`` stops after ``s`` steps as if the process were killed (tests, time-boxed runs).
    Returns the history: one dict per logged step.

    >>> history = train_vae(space, ds, TrainConfig(steps=3000), out_dir="runs/vae")   # doctest: +SKIP
    """
    cfg = cfg or TrainConfig()
    space = space_or_model if isinstance(space_or_model, VAESpace) else None
    model = space.model if space is not None else space_or_model
    if not isinstance(model, WeightVAE):
        raise W2WError(f"train_vae trains a VAESpace or WeightVAE, not {type(space_or_model).__name__}.")
    src = _StdRows(data)
    if src.dim != model.config.dim:
        raise W2WError(f"The data have D={src.dim:,} columns but the VAE was built for D={model.config.dim:,}: "
                       f"build it with VAEConfig.scaled({src.dim}) or use the matching dataset.")
    acc = accelerator or _make_accelerator(cfg)
    rank, nproc = acc.process_index, acc.num_processes
    train_rows, val_rows = cfg.split(src.n)
    if cfg.batch_size % nproc or train_rows.numel() < cfg.batch_size:
        raise W2WError(f"batch_size={cfg.batch_size} must divide evenly over {nproc} process(es) and be at most "
                       f"the {train_rows.numel():,} training rows: lower batch_size or val_fraction.")
    if space is not None and src.mean is not None:
        space.set_standardisation(src.mean, src.std)
    out = Path(out_dir) if out_dir is not None else None
    ckpt = _load_checkpoint(out, cfg, model, src) if (out is not None and resume) else None

    opt, sched = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, lr_factor=lambda s: lr_at(s, cfg) / cfg.lr)
    model, opt = acc.prepare(model, opt)
    start, history, elapsed = 0, [], 0.0
    sums, count = torch.zeros(4, dtype=torch.float64, device=acc.device), 0   # train metrics since the last row
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if acc.scaler is not None and ckpt.get("scaler"):
            acc.scaler.load_state_dict(ckpt["scaler"])
        start, history, elapsed = ckpt["step"], ckpt["history"], ckpt["elapsed_s"]
        if ckpt["num_processes"] == nproc:  # the partly filled log window of this rank, so rows match too
            sums, count = ckpt["log_sums"][rank].to(acc.device), ckpt["log_count"]
        logger.info("Resuming %s at step %d of %d", out, start, cfg.steps)
    if out is not None and acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "split.json", json.dumps({"train": train_rows.tolist(), "val": val_rows.tolist()}))

    fetch = _Prefetch(src, _Order(train_rows, cfg.batch_size, cfg.seed), rank, cfg.batch_size // nproc,
                      pin=acc.device.type == "cuda")
    stop = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    t0 = time.perf_counter() - elapsed
    bar = tqdm(total=cfg.steps, initial=start, desc="train VAE", unit="step",
               disable=not (progress and acc.is_main_process))
    devices = [torch.cuda.current_device() if acc.device.index is None else acc.device.index] \
        if acc.device.type == "cuda" else []                     # fork_rng restores the caller's RNG afterwards
    with torch.random.fork_rng(devices=devices), fetch:
        for step in range(start, stop):
            torch.manual_seed(seed_int(cfg.seed, 2, step, rank))   # noise and dropout of this step and rank
            x = fetch(step, step + 1 if step + 1 < stop else None).to(acc.device, non_blocking=True)  # [B / P, D]
            beta = beta_at(step, cfg)
            model.train()
            res = model(x, beta=beta, free_bits=cfg.free_bits)
            acc.backward(res["loss"])
            gnorm = acc.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            sums += torch.stack([res["loss"].detach(), res["recon"], res["kl"], gnorm.detach()]).double()
            count, done = count + 1, step + 1
            bar.update()
            if done % cfg.log_every == 0 or done % cfg.val_every == 0 or done == cfg.steps:
                mean = acc.reduce(sums, reduction="mean").cpu() / count
                row = {"step": done, "lr": lr_at(step, cfg), "beta": beta, **dict(zip(_TRAIN_COLS, mean.tolist()))}
                if done % cfg.val_every == 0 or done == cfg.steps:
                    row.update(_validate(acc, model, src, val_rows, cfg.batch_size, beta))
                history.append({**row, "elapsed_s": round(time.perf_counter() - t0, 3)})
                sums, count = torch.zeros_like(sums), 0
                bar.set_postfix(loss=f"{row['loss']:.4g}", beta=f"{beta:.3g}")
                if out is not None and acc.is_main_process:
                    _write_history(out, history)
            if out is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                _save_checkpoint(out, acc, model, opt, sched, cfg, done, history, time.perf_counter() - t0, src,
                                 (sums, count))
    bar.close()
    unwrapped = acc.unwrap_model(model, keep_fp32_wrapper=False)
    unwrapped.eval()
    finished = stop == cfg.steps
    if space is not None and out is not None and acc.is_main_process and finished:
        space.save(out / "space", overwrite=True)
    acc.wait_for_everyone()
    return history


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if mp != "no" and not cuda:
        raise W2WError(f"mixed_precision={mp!r} needs a CUDA GPU; use 'no' (or 'auto') on the CPU.")
    return Accelerator(cpu=not cuda, mixed_precision=mp)


@torch.no_grad()
def _validate(acc, model, src: _StdRows, val_rows: torch.Tensor, batch: int, beta: float) -> dict[str, Any]:
    """Held-out loss with z = posterior mean: rows shared over processes, sums reduced."""
    m = acc.unwrap_model(model)
    m.eval()
    k, d = m.config.latent, m.config.dim
    sse, kl, n = (torch.zeros((), dtype=torch.float64, device=acc.device) for _ in range(3))
    mu_sum, mu_sq = (torch.zeros(k, dtype=torch.float64, device=acc.device) for _ in range(2))
    mine = val_rows[acc.process_index::acc.num_processes]
    with acc.autocast():
        for blk in src.blocks(mine, batch):
            x = blk.to(acc.device)
            mu, logvar = m.posterior(x)                                      # [b, k]
            sse += (m.decode(mu).float() - x).square().sum().double()
            kl += kl_to_prior(mu, logvar).sum().double()
            mu_sum += mu.double().sum(0)
            mu_sq += mu.double().square().sum(0)
            n += x.shape[0]
    tot = acc.reduce(torch.cat([torch.stack([sse, kl, n]), mu_sum, mu_sq]), reduction="sum").cpu()
    sse, kl, n, mu_sum, mu_sq = tot[0], tot[1], tot[2], tot[3:3 + k], tot[3 + k:]
    m.train()
    if n < 1:
        return {}
    recon, kl = float(sse / (n * d)), float(kl / n)
    var = (mu_sq - mu_sum.square() / n) / (n - 1) if n > 1 else torch.zeros(k)
    return {"val_loss": recon + beta * kl / d, "val_recon": recon, "val_kl": kl,
            "val_active_units": int((var > 0.01).sum())}


# ---------------------------------------------------------------------- checkpoints and history


def _save_checkpoint(out: Path, acc, model, opt, sched, cfg: TrainConfig, step: int, history: list,
                     elapsed: float, src: _StdRows, log_window: tuple[torch.Tensor, int]) -> None:
    log_sums = acc.gather(log_window[0][None].to(acc.device)).cpu()        # [P, 4], one row per rank
    if acc.is_main_process:
        m = acc.unwrap_model(model)
        state = {"format": "w2wlib-vae-checkpoint", "w2wlib_version": __version__, "step": step,
                 "model": {k: v.detach().cpu() for k, v in m.state_dict().items()},
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                 "rng": {"torch": torch.get_rng_state()},  # the run itself reseeds per step: kept for the record
                 "train_config": dataclasses.asdict(cfg), "vae_config": m.config.to_dict(),
                 "data": {"n": src.n, "dim": src.dim}, "num_processes": acc.num_processes,
                 "history": history, "elapsed_s": elapsed, "log_sums": log_sums, "log_count": log_window[1]}
        tmp = out / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
        try:
            torch.save(state, tmp)
            os.replace(tmp, out / CHECKPOINT_FILE)
        finally:
            tmp.unlink(missing_ok=True)
    acc.wait_for_everyone()


def _load_checkpoint(out: Path, cfg: TrainConfig, model: WeightVAE, src: _StdRows) -> dict | None:
    path = out / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file: say what to do
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise W2WError(f"{path} cannot be read ({type(err).__name__}: {first}); delete it to start over, or "
                       f"pass resume=False.") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != "w2wlib-vae-checkpoint":
        raise W2WError(f"{path} is not a w2wlib VAE checkpoint; use another out_dir.")
    diff = [k for k, v in dataclasses.asdict(cfg).items()
            if k not in _LOG_ONLY and ckpt["train_config"].get(k) != v]
    if diff or ckpt["vae_config"] != model.config.to_dict() or ckpt["data"] != {"n": src.n, "dim": src.dim}:
        what = f"TrainConfig fields {diff}" if diff else "the VAE config or the data"
        raise W2WError(f"{path} was written by a different run ({what} differ), so it cannot be resumed exactly: "
                       f"pass resume=False (overwrites it), use another out_dir, or restore the old settings.")
    model.load_state_dict(ckpt["model"])
    return ckpt


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    write_text_atomic(out / "history.json", json.dumps(history, indent=0))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in history for k in row)), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)                  # a row without validation leaves those cells empty
    write_text_atomic(out / "history.csv", buf.getvalue())


def load_history(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The history a run wrote to ``out_dir/history.json``."""
    path = Path(out_dir) / "history.json"
    if not path.is_file():
        raise W2WError(f"No training history at {path}: train with train_vae(..., out_dir='{out_dir}').")
    return json.loads(path.read_text(encoding="utf-8"))


def plot_history(history: Sequence[dict[str, Any]] | str | os.PathLike, *, title: str | None = None):
    """A 3-panel matplotlib figure: reconstruction MSE, KL (train and held out), and the β / LR schedules.

    >>> fig = plot_history(load_history("runs/vae"))   # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    rows = load_history(history) if isinstance(history, (str, os.PathLike)) else list(history)
    if not rows:
        raise W2WError("The history is empty: nothing to plot.")

    def col(name):
        pts = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, label in ((axes[0], "recon", "reconstruction MSE (standardised)"),
                           (axes[1], "kl", "KL (nats / sample)")):
        ax.plot(*col(key), label="train")
        if any(r.get(f"val_{key}") is not None for r in rows):
            ax.plot(*col(f"val_{key}"), "o-", ms=3, label="held out")
        ax.set(xlabel="step", ylabel=label)
        ax.set_yscale("log" if key == "recon" else "linear")
        ax.legend()
    axes[2].plot(*col("beta"), color="C2")
    axes[2].set(xlabel="step", ylabel="β")
    twin = axes[2].twinx()
    twin.plot(*col("lr"), color="C3", ls="--")
    twin.set_ylabel("learning rate", color="C3")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
