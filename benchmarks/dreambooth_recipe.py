"""The mini world's DreamBooth recipe: oracle ID score against steps and learning rate, with the time per identity.

Trains the same identities with each (lr, steps) setting through :func:`w2wlib.dreambooth.train_identities`
(batched, as the dataset build does) and scores each LoRA with :func:`w2wlib.metrics.functional_id_scores`:
its own images against its identity's evaluation renders, next to the base model and another identity's
LoRA. Prints one row per setting. Run from the repo root:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dreambooth_recipe.py --identities 16 \\
        --setting 5e-4:300 --setting 1e-3:150 --setting 2e-3:100
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", default="data/world")
    ap.add_argument("--identities", type=int, default=16)
    ap.add_argument("--setting", action="append", default=None,
                    help="LR:STEPS[:PRIOR_WEIGHT] (prior-preservation weight, default 1), repeatable")
    ap.add_argument("--images", type=int, default=8, help="instance images per identity")
    ap.add_argument("--class-images", type=int, default=200)
    args = ap.parse_args()

    from w2wlib import dreambooth as D
    from w2wlib.dataset_build import DatasetConfig, training_seeds
    from w2wlib.metrics import functional_id_scores
    from w2wlib.viz import to_tensor
    from w2wlib.world.encoder import load_encoder
    from w2wlib.world.pipeline import load_pipeline, make_schedulers
    from w2wlib.world.render import identity_views

    pipe = load_pipeline(f"{args.world}/pipeline")
    pipe.set_progress_bar_config(disable=True)
    enc = load_encoder(f"{args.world}/identity_encoder")
    seeds = training_seeds(DatasetConfig())[: args.identities].tolist()
    k = args.images
    images = to_tensor(identity_views(seeds, k)).view(len(seeds), k, 3, 64, 64)
    t0 = time.perf_counter()
    cls = D.generate_class_images(pipe, args.class_images, seed=0, num_inference_steps=25, guidance_scale=4.0,
                                  progress=False)
    print(f"{args.class_images} class images in {time.perf_counter() - t0:.0f} s; "
          f"{len(seeds)} identities x {k} renders; torch threads {torch.get_num_threads()}")
    score = dict(n_images=4, n_renders=4, seed=0, steps=25, guidance=4.0)
    base = functional_id_scores(pipe, enc, None, seeds, **score).mean().item()
    print(f"base model ('a photo of sks person', no LoRA): ID score {base:.3f}")
    print("lr | steps | prior weight | s per identity | own | other identity's LoRA | own - base | own - other")
    for setting in args.setting or ["5e-4:300"]:
        lr, steps, prior = (setting.split(":") + ["1"])[:3]
        cfg = D.DreamBoothConfig(lr=float(lr), steps=int(steps), prior_loss_weight=float(prior),
                                 images_per_identity=k, class_images=args.class_images)
        t0 = time.perf_counter()
        W = D.train_identities(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, make_schedulers()[0],
                               images, cls, cfg, identity_keys=seeds, progress=False)
        per_id = (time.perf_counter() - t0) / len(seeds)
        own = functional_id_scores(pipe, enc, W, seeds, **score).mean().item()
        other = functional_id_scores(pipe, enc, W.roll(1, 0), seeds, **score).mean().item()
        print(f"{lr} | {steps} | {prior} | {per_id:.1f} | {own:.3f} | {other:.3f} | {own - base:+.3f} | {own - other:+.3f}", flush=True)


if __name__ == "__main__":
    main()
