"""Does every identity need the same LoRA init? The mini recipe trained both ways on the same identities.

peft initialises a LoRA with a random ``A`` and ``B = 0``. A training script run with one fixed seed gives
every model the same ``A``; a seed per model gives each its own. For a rank-1 LoRA, ``ΔW = b aᵀ`` is what
the model learns, but the flat vector stores ``a`` and ``b``: if ``a`` starts at a different random point
for every identity, and moves only part of the way in training, the vectors of two similar identities
need not be close. This script trains the first ``--n`` identities of the mini dataset with the mini
recipe both ways (same images, noise and timesteps) and measures, for each:

- how far ``A`` moved from its init (relative L2);
- the rank correlation, over pairs of identities, between how alike two identities look (cosine of the
  identity encoder's mean embedding of 4 evaluation renders) and how alike their weights are (cosine of
  the standardised rows), and their weight changes ``ΔW`` (cosine of the concatenated ``scale · B A``);
- the held-out error of a PCA fit on 3/4 of the identities (standardised MSE; 1.0 = the mean).

Run from the repo root (about 6 minutes on 2 cores at --n 64):

    .venv/bin/python benchmarks/dreambooth_init.py --n 64
"""

from __future__ import annotations

import argparse
import time

import torch

from w2wlib.profile import load_profile


def rank_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (torch.argsort(torch.argsort(x)).double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def delta_w(W: torch.Tensor, layout) -> torch.Tensor:
    parts = [(W[:, e.b_slice].view(len(W), e.out_features, e.rank) @ W[:, e.a_slice].view(len(W), e.rank, e.in_features))
             .flatten(1) for e in layout.entries]
    return layout.scale * torch.cat(parts, 1)


def measure(W: torch.Tensor, W0: torch.Tensor, id_sim: torch.Tensor, layout, split: int) -> dict:
    W, W0 = W.double(), W0.double()
    a = torch.cat([torch.arange(e.a_slice.start, e.a_slice.stop) for e in layout.entries])
    iu = torch.triu_indices(len(W), len(W), 1)
    cos = lambda X: (lambda Y: Y @ Y.T)(torch.nn.functional.normalize(X - X.mean(0), dim=1))
    Z = (W - W[:split].mean(0)) / W[:split].std(0).clamp(min=1e-12)
    V = torch.linalg.svd(Z[:split] - Z[:split].mean(0), full_matrices=False).Vh
    heldout = {k: float(((Z[split:] - Z[:split].mean(0)) @ V[:k].T @ V[:k] + Z[:split].mean(0) - Z[split:])
                        .square().mean()) for k in (4, 16, 32)}
    return {"A moved (relative)": float(((W[:, a] - W0[:, a]).norm(dim=1) / W0[:, a].norm(dim=1)).mean()),
            "rank corr (identity sim, weight cos)": rank_corr(id_sim[iu[0], iu[1]], cos(Z)[iu[0], iu[1]]),
            "rank corr (identity sim, dW cos)": rank_corr(id_sim[iu[0], iu[1]], cos(delta_w(W, layout))[iu[0], iu[1]]),
            **{f"PCA held-out MSE k={k}": v for k, v in heldout.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="identities (the first n training seeds of the mini config)")
    args = ap.parse_args()

    from w2wlib import dataset_build as B
    from w2wlib.dreambooth import init_lora_bank
    from w2wlib.lora import LoraLayout
    from w2wlib.world.encoder import load_encoder
    from w2wlib.world.pipeline import load_pipeline
    from w2wlib.world.render import EVAL_VIEWS, identity_views

    pipe = load_pipeline(load_profile().path("world_dir") / "pipeline", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    enc = load_encoder(load_profile().path("world_dir") / "identity_encoder", device="cpu")
    cfg = B.DatasetConfig.preset("mini")
    db = cfg.dreambooth_config()
    layout = LoraLayout.from_unet(pipe.unet, db.target, db.rank, db.alpha)
    seeds = B.training_seeds(cfg)[: args.n].tolist()
    z = torch.nn.functional.normalize(enc.embed(identity_views(seeds, 4, EVAL_VIEWS)).view(args.n, 4, -1).mean(1), dim=1)
    id_sim = (z @ z.T).double()
    pool = B.class_images(pipe, cfg, progress=False)
    print(f"{args.n} identities, recipe {db.to_dict()}")
    for shared in (False, True):
        t0 = time.perf_counter()
        W = B.fine_tune(pipe, seeds, cfg, pool, progress=False, shared_init=shared)
        W0 = init_lora_bank(layout, seeds, db.seed, shared=shared)
        res = measure(W, W0, id_sim, layout, split=3 * args.n // 4)
        print(f"\nshared init = {shared} ({time.perf_counter() - t0:.0f} s)")
        for k, v in res.items():
            print(f"  {k:40s} {v:8.3f}")


if __name__ == "__main__":
    main()
