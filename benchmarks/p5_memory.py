"""P5 (memory): train the VAE, and fit a streaming PCA, from a >= 8 GB float32 ``all_weights.pt`` in the public
w2w layout, with peak resident memory <= 3 GB (issue #5).

Three steps, each in its own process so that each peak RSS is its own:

1. ``make``: a synthetic dataset in the public layout (``all_weights.pt`` [N, 99,648] float32 written by
   ``torch.save``, ``mean.pt``, ``std.pt``, ``weight_dimensions.pt`` of SD 1.5's LoRA layout): low-rank
   identities plus noise, written chunk by chunk through a file-backed tensor;
2. ``train``: :func:`w2wlib.train.train_vae` streams standardised rows from the memory-mapped file
   (read with ``preadv``, :mod:`w2wlib.data`) into a VAE with SD 1.5's input width;
3. ``pca``: :meth:`w2wlib.spaces.PCASpace.fit` with the randomized, streaming SVD.

Run from the repo root (about 20 minutes on 2 cores, 17 GiB of free disk while making the file):

    .venv/bin/python benchmarks/p5_memory.py --dir /tmp/p5 --rows 22000 --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GB = 1 << 30   # sizes are reported in GiB


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB   # ru_maxrss is in KB on Linux


def make(folder: Path, rows: int, rank: int = 64, seed: int = 0) -> dict:
    import collections
    import math

    import torch

    from w2wlib.lora import sd15_layout

    layout = sd15_layout()
    d = layout.dim
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "all_weights.raw"
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g) / math.sqrt(rank)                         # [r, D]
    scale = torch.rand(d, generator=g) * 0.02 + 0.001                                   # per-column scale
    t = torch.from_file(str(raw), shared=True, size=rows * d, dtype=torch.float32).view(rows, d)
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros(d, dtype=torch.float64)
    t0 = time.perf_counter()
    for lo in range(0, rows, 512):
        hi = min(rows, lo + 512)
        block = (torch.randn(hi - lo, rank, generator=g) @ basis + 0.3 * torch.randn(hi - lo, d, generator=g)) * scale
        t[lo:hi] = block
        s1 += block.double().sum(0)
        s2 += block.double().square().sum(0)
    mean = s1 / rows
    std = ((s2 - rows * mean.square()) / (rows - 1)).sqrt()
    torch.save(t, folder / "all_weights.pt")                   # the public format: a pickled tensor in a zip
    del t
    raw.unlink()
    torch.save(mean.float(), folder / "mean.pt")
    torch.save(std.float(), folder / "std.pt")
    wd = collections.OrderedDict()
    for e in layout.entries:
        wd[f"base_model.model.{e.module}.lora_A.weight"] = [[math.prod(e.a_shape)], torch.Size(e.a_shape)]
        wd[f"base_model.model.{e.module}.lora_B.weight"] = [[math.prod(e.b_shape)], torch.Size(e.b_shape)]
    torch.save(wd, folder / "weight_dimensions.pt")
    size = (folder / "all_weights.pt").stat().st_size
    return {"rows": rows, "dim": d, "file_gb": size / GB, "seconds": time.perf_counter() - t0}


def train(folder: Path, steps: int, batch: int) -> dict:
    import torch

    from w2wlib.data import open_weights
    from w2wlib.spaces import VAEConfig, VAESpace
    from w2wlib.train import TrainConfig, train_vae

    ds = open_weights(folder)
    # SD 1.5's input width; narrower hidden layers than the seeds' 4,096 so that parameters, gradients and
    # AdamW moments (16 bytes per parameter) fit next to the data stream in 3 GB on a CPU
    space = VAESpace(VAEConfig.sd15(hidden=(512, 256), latent=128), seed=0)
    n_params = sum(p.numel() for p in space.model.parameters())
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, warmup=20, beta_warmup=steps // 2,
                      beta_ramp=steps // 4, checkpoint_every=steps, log_every=max(1, steps // 10),
                      val_every=steps, val_fraction=0.01)
    t0 = time.perf_counter()
    history = train_vae(space, ds, cfg, out_dir=folder / "run", resume=False, progress=True)
    sec = time.perf_counter() - t0
    return {"dataset": repr(ds), "vae_parameters": n_params, "steps": steps, "batch": batch, "seconds": sec,
            "rows_per_s": steps * batch / sec, "mb_per_s": steps * batch * ds.dim * 4 / sec / 2**20,
            "final": history[-1], "torch_threads": torch.get_num_threads()}


def pca(folder: Path, k: int) -> dict:
    from w2wlib.data import open_weights
    from w2wlib.spaces import PCASpace

    ds = open_weights(folder)
    t0 = time.perf_counter()
    space = PCASpace.fit(ds, k, method="randomized", progress=True)
    sec = time.perf_counter() - t0
    return {"k": k, "seconds": sec, "explained_variance_ratio": float(space.explained_variance_ratio.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", nargs="?", default="all", choices=["all", "make", "train", "pca"])
    ap.add_argument("--dir", default="/tmp/w2w_p5", help="where the synthetic dataset goes (needs ~17 GB while making)")
    ap.add_argument("--rows", type=int, default=22000, help="rows of 99,648 float32: 22,000 = 8.17 GiB (8.77 GB)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=64, help="PCA components")
    args = ap.parse_args()
    folder = Path(args.dir)
    if args.step != "all":
        out = {"make": lambda: make(folder, args.rows), "train": lambda: train(folder, args.steps, args.batch),
               "pca": lambda: pca(folder, args.k)}[args.step]()
        out["peak_rss_gb"] = peak_rss_gb()
        print("RESULT " + json.dumps(out, default=str))
        return
    results = {}
    for step in ("make", "train", "pca"):
        if step == "make" and (folder / "all_weights.pt").is_file():
            print(f"make: reusing {folder / 'all_weights.pt'}")
            continue
        proc = subprocess.run([sys.executable, __file__, step, "--dir", str(folder), "--rows", str(args.rows),
                               "--steps", str(args.steps), "--batch", str(args.batch), "--k", str(args.k)],
                              stdout=subprocess.PIPE, text=True, env=os.environ)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{step} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
        results[step] = json.loads(line[len("RESULT "):])
        print(f"{step}: {json.dumps(results[step], indent=1)}")
    file_gb = (folder / "all_weights.pt").stat().st_size / GB
    print(f"\nP5: all_weights.pt {file_gb:.2f} GiB on disk; peak RSS train {results['train']['peak_rss_gb']:.2f} GiB "
          f"({results['train']['rows_per_s']:.0f} rows/s, {results['train']['mb_per_s']:.0f} MB/s), "
          f"PCA {results['pca']['peak_rss_gb']:.2f} GiB; target <= 3 GB (2.79 GiB): "
          f"{'met' if max(results['train']['peak_rss_gb'], results['pca']['peak_rss_gb']) * GB <= 3e9 else 'NOT met'}")


if __name__ == "__main__":
    main()
