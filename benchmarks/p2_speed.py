"""P2 (speed): time to reach the held-out MSE of the seeds' VAE recipe, our trainer against that recipe (issue #5).

Both runs train the same architecture (the shipped mini VAE: ``SpacesConfig.preset("mini").vae_config``)
on the same data: the standardised mini weights dataset, split by identity as the trainer does (``TrainConfig.split``).

- **Baseline** (the seeds' recipe): a plain loop over an in-RAM tensor, shuffled each epoch, batch 64,
  Adam at lr 1e-4 (constant), no clipping, the same KL annealing (β from :func:`w2wlib.train.beta_at`);
- **Ours**: :func:`w2wlib.train.train_vae` with the shipped mini recipe (AdamW, warm-up + cosine, clipping),
  streaming rows from the memory-mapped file, its schedules stretched to ``--steps``.

Held-out reconstruction MSE (z = posterior mean, standardised space) is measured every ``--val-every``
steps in both, with the wall time. The baseline's best held-out MSE is the target; the speed-up is the
baseline's time to its best over our time to first reach it. Run from the repo root:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/p2_speed.py --dataset data/dataset --steps 6000
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from w2wlib.profile import load_profile


def held_out_mse(model, x_val: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        mu, _ = model.posterior(x_val)
        err = float((model.decode(mu) - x_val).square().mean())
    model.train()
    return err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default=str(load_profile().path("dataset_dir")))
    ap.add_argument("--steps", type=int, default=6000, help="optimiser steps of each run")
    ap.add_argument("--val-every", type=int, default=250)
    args = ap.parse_args()

    from w2wlib.data import open_weights
    from w2wlib.spaces import VAESpace
    from w2wlib.spaces.build import SpacesConfig
    from w2wlib.train import beta_at, train_vae

    ds = open_weights(args.dataset)
    mini = SpacesConfig.preset("mini")
    arch = mini.vae_config(ds.dim, ds.lora_layout())
    recipe = mini.train_config()
    stretch = args.steps / recipe.steps
    cfg = dataclasses.replace(recipe, steps=args.steps, val_every=args.val_every, log_every=args.val_every,
                              warmup=round(recipe.warmup * stretch), beta_warmup=round(recipe.beta_warmup * stretch),
                              beta_ramp=round(recipe.beta_ramp * stretch), checkpoint_every=args.steps)
    tr, va = cfg.split(len(ds))                                     # train_vae's split
    x = ds.standardise(ds.rows(slice(0, len(ds))))                                  # [N, D] in RAM
    x_tr, x_val = x[tr], x[va]
    print(f"{ds}: {len(tr)} train / {len(va)} held-out identities; VAE {arch}; {args.steps} steps each; "
          f"torch threads {torch.get_num_threads()}")

    # --- baseline: the seeds' recipe
    torch.manual_seed(0)
    model = VAESpace(arch, seed=0).model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    base, step, t0 = [], 0, time.perf_counter()
    while step < args.steps:
        for idx in torch.randperm(len(x_tr), generator=g).split(64):
            if step == args.steps:
                break
            loss = model(x_tr[idx], beta=beta_at(step, cfg))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % args.val_every == 0:
                base.append((step, time.perf_counter() - t0, held_out_mse(model, x_val)))
    target_step, t_base, target = min(base, key=lambda r: r[2])

    # --- ours
    t1 = time.perf_counter()
    hist = train_vae(VAESpace(arch, seed=0), ds, cfg, progress=False)
    t_ours_total = time.perf_counter() - t1
    ours = [(h["step"], h["elapsed_s"], h["val_recon"]) for h in hist if "val_recon" in h]
    reach = next(((s, t, m) for s, t, m in ours if m <= target), None)

    print("\nstep | baseline held-out MSE | ours held-out MSE")
    for (s, _, mb), (_, _, mo) in zip(base, ours):
        print(f"{s:5d} | {mb:.4f} | {mo:.4f}")
    print(f"\nbaseline: best held-out MSE {target:.4f} at step {target_step} after {t_base:.1f} s "
          f"(final {base[-1][2]:.4f}, {base[-1][1]:.1f} s)")
    print(f"ours: final held-out MSE {ours[-1][2]:.4f} after {t_ours_total:.1f} s")
    if reach is None:
        print("ours never reached the baseline's best held-out MSE: target NOT met")
    else:
        print(f"ours reached {target:.4f} at step {reach[0]} after {reach[1]:.1f} s: "
              f"{t_base / reach[1]:.1f}x faster (target >= 5x); final MSE lower: {ours[-1][2] < target}")


if __name__ == "__main__":
    main()
