"""Which VAE for the mini weights? Variants the field suggests, against the PCA at the same latent size.

Every variant trains with the shipped mini recipe (``SpacesConfig.preset("mini").train_config()``, or
``--steps``) on the same identity split, and is scored on the held-out identities by its
reconstruction MSE in the standardised space (z = posterior mean; 1.0 = predicting the mean identity)
and its active latent units. The PCA is fitted on the same training identities. Variants:

- ``seeds``: the seeds' MLP, widths scaled to D (``VAEConfig.scaled``);
- ``wide``: a wider first layer (1,024, 512, 256);
- ``residual``: ``wide`` with two pre-norm residual blocks per layer and LayerNorm;
- ``noise``: ``wide`` with p-diff's noise augmentation (inputs 0.001, latents 0.1);
- ``tokens``: one token per LoRA module and a 2-layer transformer on each side;
- ``*-beta0.1``: the same with β capped at 0.1 (a weaker pull to the prior);
- ``linear``: no hidden layers, a linear VAE (probabilistic PCA learnt by gradient): the trainer's check;
- ``*-skip``: a linear path beside the MLP or the tokens (``linear_skip``), so the VAE holds the linear
  model and its non-linear part adds to it (``seeds-skip-dropout``: with dropout 0.2 after each activation).

"train MSE" is the same error on as many training identities as are held out: the gap between the two
is overfitting.

Run from the repo root (a few minutes per variant on 2 cores):

    .venv/bin/python benchmarks/vae_recipe.py --dataset data/dataset [--only seeds,wide] [--steps 2000]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from w2wlib.profile import load_profile

VARIANTS = {
    "seeds": {},
    "wide": {"hidden": (1024, 512, 256)},
    "residual": {"hidden": (1024, 512, 256), "residual_blocks": 2, "norm": "layer"},
    "noise": {"hidden": (1024, 512, 256), "input_noise": 0.001, "latent_noise": 0.1},
    "tokens": {"arch": "tokens", "token_width": 64, "token_layers": 2, "token_heads": 4},
    "wide-beta0.1": ({"hidden": (1024, 512, 256)}, {"beta_max": 0.1}),
    "tokens-beta0.1": ({"arch": "tokens", "token_width": 64, "token_layers": 2, "token_heads": 4}, {"beta_max": 0.1}),
    "linear": {"hidden": ()},
    "seeds-skip": {"linear_skip": True},
    "seeds-skip-dropout": {"linear_skip": True, "dropout": 0.2},
    "tokens-skip": {"arch": "tokens", "token_width": 64, "token_layers": 2, "token_heads": 4, "linear_skip": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default=str(load_profile().path("dataset_dir")))
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the mini recipe's)")
    args = ap.parse_args()

    from w2wlib.data import open_weights
    from w2wlib.metrics import reconstruction_mse
    from w2wlib.spaces import PCASpace, VAESpace
    from w2wlib.spaces.build import SpacesConfig
    from w2wlib.train import train_vae

    ds = open_weights(args.dataset)
    mini = SpacesConfig.preset("mini")
    recipe = mini.train_config()
    if args.steps:
        recipe = dataclasses.replace(recipe, steps=args.steps)
    tr, va = recipe.split(len(ds))
    x_val = ds.standardise(ds.rows(va))
    x_fit = ds.standardise(ds.rows(tr[: len(va)]))
    pca = PCASpace.fit(ds, mini.latent, rows=tr, method="exact")       # the reference: the optimal linear fit
    print(f"{ds}; {len(tr)} train / {len(va)} held-out identities; latent {mini.latent}; {recipe.steps} steps; "
          f"torch threads {torch.get_num_threads()}")
    print(f"PCA k={mini.latent}: held-out MSE {float(reconstruction_mse(pca, x_val).mean()):.4f}, "
          f"train MSE {float(reconstruction_mse(pca, x_fit).mean()):.4f}\n")
    print("| variant | parameters | held-out MSE | train MSE | active units | KL (nats) | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.only.split(","):
        arch, train = VARIANTS[name] if isinstance(VARIANTS[name], tuple) else (VARIANTS[name], {})
        cfg = dataclasses.replace(mini, vae={**mini.vae, **arch})
        space = VAESpace(cfg.vae_config(ds.dim, ds.lora_layout()), seed=mini.seed)
        t0 = time.perf_counter()
        hist = train_vae(space, ds, dataclasses.replace(recipe, **train), progress=False)
        sec = time.perf_counter() - t0
        last = next(h for h in reversed(hist) if "val_recon" in h)
        mse, fit = (float(reconstruction_mse(space, x).mean()) for x in (x_val, x_fit))
        n = sum(p.numel() for p in space.model.parameters())
        print(f"| {name} | {n:,} | {mse:.4f} | {fit:.4f} | {last['val_active_units']} | {last['val_kl']:.1f} | {sec:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
