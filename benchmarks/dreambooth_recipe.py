"""The mini world's DreamBooth recipe: does a LoRA pin its person, against steps, lr, schedule and prior weight?

Trains the same identities with each setting through :func:`w2wlib.dreambooth.train_identities`
(batched, as the dataset build does), then generates each LoRA's images over 6 noise seeds and scores
them against evaluation renders of the identity (:func:`w2wlib.metrics.identity_scores`): the own-LoRA
ID score, another identity's LoRA scored as this one, the share of identities whose own score beats
both the base model and the other LoRA, and identity consistency (within a LoRA's images minus across
LoRAs). These are the pinning targets of the world issue. Prints one row per setting. From the repo root:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dreambooth_recipe.py --identities 8 \\
        --setting 2e-3:300:0 --setting 3e-3:300:0:cosine
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from w2wlib.profile import load_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", default=str(load_profile().path("world_dir")))
    ap.add_argument("--identities", type=int, default=8)
    ap.add_argument("--setting", action="append", default=None,
                    help="LR:STEPS[:PRIOR_WEIGHT[:SCHEDULE]] (prior weight default 0, schedule constant|cosine), repeatable")
    ap.add_argument("--images", type=int, default=8, help="instance images per identity")
    ap.add_argument("--batch-per-identity", type=int, default=1, help="instance images per identity and step")
    ap.add_argument("--class-images", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=6, help="noise seeds per LoRA in the score")
    ap.add_argument("--guidance", type=float, default=7.5, help="CFG of the scored images (SD 1.5's default 7.5)")
    ap.add_argument("--save", help="write each setting's W to this folder (W_<setting>.pt)")
    args = ap.parse_args()

    from w2wlib import dreambooth as D
    from w2wlib.dataset_build import DatasetConfig, training_seeds
    from w2wlib.diffusion import training_scheduler
    from w2wlib.generate import generate
    from w2wlib.metrics import identity_consistency, identity_scores
    from w2wlib.viz import to_tensor
    from w2wlib.world.encoder import load_encoder
    from w2wlib.world.pipeline import load_pipeline
    from w2wlib.world.render import EVAL_VIEWS, identity_views

    pipe = load_pipeline(f"{args.world}/pipeline")
    enc = load_encoder(f"{args.world}/identity_encoder")
    seeds = training_seeds(DatasetConfig())[: args.identities].tolist()
    k, m = args.images, args.seeds
    images = to_tensor(identity_views(seeds, k)).view(len(seeds), k, 3, 64, 64)
    refs = identity_views(seeds, m, EVAL_VIEWS)
    gen = dict(n_per_row=m, seed=0, steps=25, guidance=args.guidance, prompt="a photo of sks person")
    base_imgs = generate(pipe, None, **gen)
    base = identity_scores(enc, np.tile(base_imgs, (len(seeds), 1, 1, 1)), refs, m, m)
    cls = None
    print(f"world {args.world}; {len(seeds)} identities x {k} renders, {args.batch_per_identity} per step; score over {m} noise seeds at CFG {args.guidance}; "
          f"torch threads {torch.get_num_threads()}; base model ID {base.mean():.3f}")
    print("lr | steps | prior weight | schedule | s per identity | own ID | other's LoRA | own > base & other | "
          "consistency within | across | gap")
    print("---|---|---|---|---|---|---|---|---|---|---")
    for setting in args.setting or ["2e-3:300:0"]:
        parts = setting.split(":")
        lr, steps = parts[:2]
        prior, schedule = (parts[2:3] or ["0"])[0], (parts[3:4] or ["constant"])[0]
        if float(prior) and cls is None:
            cls = D.generate_class_images(pipe, args.class_images, seed=0, num_inference_steps=25,
                                          guidance_scale=args.guidance, progress=False)
        cfg = D.DreamBoothConfig(lr=float(lr), steps=int(steps), prior_loss_weight=float(prior), lr_schedule=schedule,
                                 images_per_identity=k, class_images=args.class_images,
                                 batch_per_identity=args.batch_per_identity)
        t0 = time.perf_counter()
        W = D.train_identities(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, training_scheduler(pipe),
                               images, cls if float(prior) else None, cfg, identity_keys=seeds, progress=False)
        per_id = (time.perf_counter() - t0) / len(seeds)
        if args.save:
            torch.save(W, f"{args.save}/W_{setting.replace(':', '_')}.pt")
        imgs = generate(pipe, W, **gen)
        own = identity_scores(enc, imgs, refs, m, m)
        other = identity_scores(enc, np.roll(imgs, m, axis=0), refs, m, m)
        within, across = identity_consistency(enc, imgs, m)
        print(f"{lr} | {steps} | {prior} | {schedule} | {per_id:.1f} | {own.mean():.3f} | {other.mean():.3f} | "
              f"{((own > base) & (own > other)).float().mean():.2f} | {within.mean():.3f} | {across:.3f} | "
              f"{within.mean() - across:.3f}", flush=True)


if __name__ == "__main__":
    main()
