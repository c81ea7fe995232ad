"""Tests of w2wlib.train: schedules, a loss that falls, exact resume, a 2-process gloo DDP run, errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from w2wlib.data import open_weights, save_weights
from w2wlib.errors import W2WError
from w2wlib.lora import LoraLayout
from w2wlib.spaces import PCASpace, VAEConfig, VAESpace, load_space
from w2wlib.train import CHECKPOINT_FILE, TrainConfig, beta_at, load_history, lr_at, plot_history, split_rows, train_vae

D = 64
VAE = VAEConfig(dim=D, hidden=(48, 24), latent=6)


def low_rank(n: int, d: int = D, rank: int = 4, noise: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Standardised rows of a rank-``rank`` signal plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g) + noise * torch.randn(n, d, generator=g)
    return (x - x.mean(0)) / x.std(0)


def small(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=16, lr=3e-3, warmup=2, beta_warmup=4, beta_ramp=4, checkpoint_every=5,
                log_every=2, val_every=4, val_fraction=0.2, seed=1)
    return TrainConfig(**{**base, **kw})


def params(space: VAESpace) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in space.model.state_dict().items()}


def without_time(history):
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in history]


# ---------------------------------------------------------------------- schedules and split


def test_beta_schedules_at_chosen_steps():
    warm = TrainConfig(steps=100, beta_warmup=10, beta_ramp=40, beta_max=2.0)
    assert [beta_at(s, warm) for s in (0, 9, 10, 30, 50, 99)] == [0.0, 0.0, 0.0, 1.0, 2.0, 2.0]
    assert beta_at(10, TrainConfig(beta_warmup=10, beta_ramp=0, beta_max=0.3)) == 0.3
    cyc = TrainConfig(steps=120, beta_schedule="cyclical", cycles=3, cycle_ratio=0.25, beta_max=1.0)
    assert [beta_at(s, cyc) for s in (0, 5, 10, 20, 39, 40, 45, 119)] == [0.0, 0.5, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0]
    assert beta_at(7, TrainConfig(beta_schedule="constant", beta_max=0.25)) == 0.25
    with pytest.raises(W2WError, match="beta_schedule must be"):
        TrainConfig(beta_schedule="linear")


def test_lr_warms_up_then_follows_a_cosine():
    cfg = TrainConfig(steps=110, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5)) and lr_at(110, cfg) == pytest.approx(1e-4)


def test_split_is_by_row_deterministic_and_disjoint():
    tr, va = split_rows(50, 0.2, seed=3)
    assert len(va) == 10 and not set(tr.tolist()) & set(va.tolist()) and len(tr) + len(va) == 50
    assert torch.equal(split_rows(50, 0.2, seed=3)[1], va) and not torch.equal(split_rows(50, 0.2, seed=4)[1], va)
    assert len(split_rows(50, 0.0, seed=3)[1]) == 0
    # a run's split follows split_seed when it is set, else the run's seed
    assert torch.equal(TrainConfig(seed=3, val_fraction=0.2).split(50)[1], va)
    assert torch.equal(TrainConfig(seed=9, split_seed=3, val_fraction=0.2).split(50)[1], va)


# ---------------------------------------------------------------------- training


def test_loss_falls_and_outputs_are_written(tmp_path):
    x = low_rank(200)
    space = VAESpace(VAE, seed=0)
    _, val = split_rows(200, 0.2, seed=1)
    with torch.no_grad():
        before = float((space.decode(space.encode(x[val])) - x[val]).square().mean())
    history = train_vae(space, x, small(steps=200, lr=1e-2, val_every=100, log_every=25, checkpoint_every=100,
                                        beta_warmup=100, beta_ramp=50, beta_max=0.1), tmp_path, progress=False)
    assert [r["step"] for r in history] == list(range(25, 201, 25))
    assert history[-1]["val_recon"] < 0.1 * before and history[-1]["recon"] < 0.1 * history[0]["recon"]
    assert history[-1]["val_active_units"] >= 1 and history[-1]["beta"] == pytest.approx(0.1)
    assert load_history(tmp_path) == history
    with open(tmp_path / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(history) and float(rows[-1]["val_recon"]) == pytest.approx(history[-1]["val_recon"])
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["val"] == val.tolist() and len(split["train"]) == 160
    ckpt = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert ckpt["step"] == 200 and ckpt["train_config"]["steps"] == 200 and ckpt["w2wlib_version"]
    saved = load_space(tmp_path / "space")
    assert all(torch.equal(v, space.model.state_dict()[k]) for k, v in saved.model.state_dict().items())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_history(tmp_path)
    recon_ax, kl_ax, beta_ax, lr_ax = fig.axes                       # the LR is a twin of the β panel
    steps = [r["step"] for r in history]
    val_rows = [r for r in history if r.get("val_recon") is not None]
    assert [r["step"] for r in val_rows] == [100, 200]
    for ax, key in ((recon_ax, "recon"), (kl_ax, "kl")):             # each panel plots exactly the history
        train_line, val_line = ax.get_lines()
        assert list(train_line.get_xdata()) == steps and list(train_line.get_ydata()) == [r[key] for r in history]
        assert list(val_line.get_xdata()) == [100, 200]
        assert list(val_line.get_ydata()) == [r[f"val_{key}"] for r in val_rows]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "held out"]
    assert recon_ax.get_yscale() == "log" and kl_ax.get_yscale() == "linear"
    (beta_line,), (lr_line,) = beta_ax.get_lines(), lr_ax.get_lines()
    assert list(beta_line.get_xdata()) == steps and list(beta_line.get_ydata()) == [r["beta"] for r in history]
    assert list(lr_line.get_xdata()) == steps and list(lr_line.get_ydata()) == [r["lr"] for r in history]
    assert (beta_ax.get_ylabel(), lr_ax.get_ylabel()) == ("β", "learning rate")
    plt.close(fig)


def test_killed_and_resumed_run_is_bit_identical_to_a_straight_run(tmp_path):
    x = low_rank(120, seed=2)
    cfg = small()
    noisy = VAEConfig(dim=D, hidden=(48, 24), latent=6, dropout=0.1, input_noise=0.05, latent_noise=0.05)
    straight = VAESpace(noisy, seed=0)
    h_straight = train_vae(straight, x, cfg, tmp_path / "a", progress=False)

    killed = VAESpace(noisy, seed=0)
    train_vae(killed, x, cfg, tmp_path / "b", progress=False, stop_after=7)   # checkpoint at 5, then "killed"
    assert torch.load(tmp_path / "b" / CHECKPOINT_FILE, weights_only=True)["step"] == 5
    assert not (tmp_path / "b" / "space").exists()
    resumed = VAESpace(noisy, seed=123)                                      # weights come from the checkpoint
    h_resumed = train_vae(resumed, x, cfg, tmp_path / "b", progress=False)

    a, b = params(straight), params(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_time(h_resumed) == without_time(h_straight)
    again = train_vae(resumed, x, cfg, tmp_path / "b", progress=False)     # finished: nothing left to do
    assert without_time(again) == without_time(h_straight) and all(torch.equal(a[k], params(resumed)[k]) for k in a)


def test_resume_refuses_a_different_config(tmp_path):
    x = low_rank(60)
    train_vae(VAESpace(VAE), x, small(steps=5), tmp_path, progress=False)
    with pytest.raises(W2WError, match=r"different run \(TrainConfig fields \['lr'\].*resume=False"):
        train_vae(VAESpace(VAE), x, small(steps=5, lr=1e-2), tmp_path, progress=False)
    train_vae(VAESpace(VAE), x, small(steps=5, lr=1e-2), tmp_path, progress=False, resume=False)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(W2WError, match="cannot be read.*resume=False"):
        train_vae(VAESpace(VAE), x, small(steps=5, lr=1e-2), tmp_path, progress=False)


def test_streaming_from_a_memory_mapped_dataset_equals_the_in_ram_tensor(tmp_path):
    layout = LoraLayout.from_modules([("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 16, 16),
                                      ("mid_block.attentions.0.transformer_blocks.0.attn1.to_v", 16, 16)],
                                     rank=1, alpha=27.0, target_modules=("to_q", "to_v"))   # D = 64
    raw = low_rank(80, seed=4) * 0.01 + 0.002
    ds = open_weights(save_weights(tmp_path / "ds", raw, layout))
    cfg = small(steps=6)
    from_ds, from_tensor = VAESpace(VAE, seed=0), VAESpace(VAE, seed=0)
    h1 = train_vae(from_ds, ds, cfg, progress=False)
    h2 = train_vae(from_tensor, ds.standardise(ds.rows(slice(None))), cfg, progress=False)
    assert all(torch.equal(v, params(from_tensor)[k]) for k, v in params(from_ds).items())
    assert without_time(h1) == without_time(h2)
    assert torch.equal(from_ds.mean, ds.mean) and from_tensor.mean is None      # raw-weight helpers need stats
    assert from_ds.decode_weights(from_ds.encode_weights(raw[:2])).shape == (2, 64)


def test_bad_inputs_say_how_to_fix():
    x = low_rank(20)
    with pytest.raises(W2WError, match="D=64 columns but the VAE was built for D=10.*VAEConfig.scaled"):
        train_vae(VAESpace(VAEConfig(dim=10, hidden=(8,), latent=2)), x, small(), progress=False)
    with pytest.raises(W2WError, match="batch_size=64 .* at most the 16 training rows"):
        train_vae(VAESpace(VAE), x, small(batch_size=64), progress=False)
    bad = x.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(W2WError, match=r"Row\(s\) \[3\] of the weights have NaN"):
        train_vae(VAESpace(VAE), bad, small(batch_size=20, val_fraction=0.0), progress=False)
    with pytest.raises(W2WError, match="trains a VAESpace or WeightVAE"):
        train_vae(PCASpace.fit(x, 2), x, small(), progress=False)
    with pytest.raises(W2WError, match="must be >= 1"):
        TrainConfig(steps=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_mixed_precision_without_cuda_says_how_to_fix():
    with pytest.raises(W2WError, match=r"mixed_precision='bf16' needs a CUDA GPU; use 'no' \(or 'auto'\) on the CPU"):
        train_vae(VAESpace(VAE), low_rank(20), small(mixed_precision="bf16", batch_size=8), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 mixed precision needs a CUDA GPU")
def test_bf16_on_cuda_keeps_float32_weights_and_trains():
    x = low_rank(80, seed=6)
    space = VAESpace(VAE, seed=0)
    start = params(space)
    history = train_vae(space, x, small(mixed_precision="bf16"), progress=False)
    assert history[-1]["step"] == 12 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    after = params(space)
    assert all(v.dtype == torch.float32 for v in after.values())      # autocast computes in bf16, stores float32
    assert any(not torch.equal(v.cpu(), start[k]) for k, v in after.items())


# ---------------------------------------------------------------------- 2 processes, gloo


def _ddp_worker(folder: str, x: torch.Tensor) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)   # a fork inherits the parent's singletons; start this process's own
    PartialState._reset_state()
    acc = Accelerator(cpu=True)
    space = VAESpace(VAE, seed=0)
    out = Path(folder) / "run"
    history = train_vae(space, x, small(steps=6, checkpoint_every=3), out, progress=False, accelerator=acc)
    torch.save({"n": acc.num_processes, "params": params(space), "history": without_time(history)},
               Path(folder) / f"rank{acc.process_index}.pt")


def test_two_process_gloo_ddp_run_agrees_on_the_weights(request, tmp_path):
    # debug_launcher forks, and libgomp is not fork-safe once its pool ran with 2+ threads: run in a fresh
    # single-threaded interpreter, with a timeout so that a hang fails instead of stalling the suite.
    if os.environ.get("OMP_NUM_THREADS") != "1":
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"{__file__}::{request.node.name}"],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        return
    from accelerate import debug_launcher

    x = low_rank(80, seed=5)
    debug_launcher(_ddp_worker, args=(str(tmp_path), x), num_processes=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["n"] == r1["n"] == 2
    assert all(torch.equal(v, r1["params"][k]) for k, v in r0["params"].items())
    assert r0["history"] == r1["history"] and r0["history"][-1]["step"] == 6
    start = params(VAESpace(VAE, seed=0))
    assert any(not torch.equal(v, start[k]) for k, v in r0["params"].items())   # it did train
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT_FILE, weights_only=True)
    assert ckpt["num_processes"] == 2 and ckpt["step"] == 6
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in r0["params"].items())
