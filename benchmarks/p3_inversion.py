"""P3: single-image inversion, every method side by side in one run: ID score against wall time.

Held-out identities of the mini world (never trained by any model), one input render each (image seed
500, not an evaluation view). Each method of :func:`w2wlib.invert.comparison_methods` inverts all of
them in one batch; each inverted model draws ``--images`` images over fixed noise seeds, scored against
as many evaluation views (:func:`w2wlib.invert.evaluate.score_models`). Next to them: the base model,
another identity's inversion, a DreamBooth-LoRA on the one input (the unconstrained reference) and, on
``--ceiling`` identities, a DreamBooth-LoRA on 8 views (the ceiling). Writes ``--out`` (JSON, read by
the chapter "Inversion") and prints a Markdown table. From the repo root:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/p3_inversion.py --identities 64 --out benchmarks/p3_inversion.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--identities", type=int, default=64)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--w2w-steps", type=int, default=400)
    ap.add_argument("--generations", type=int, default=60)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--ceiling", type=int, default=16, help="identities given the 8-view DreamBooth ceiling")
    ap.add_argument("--ceiling-steps", type=int, default=600, help="its steps (lr 2e-3, no prior)")
    ap.add_argument("--out", default="benchmarks/p3_inversion.json")
    args = ap.parse_args()

    from w2wlib.dataset_build import DatasetConfig, fine_tune
    from w2wlib.invert import comparison_methods, invert
    from w2wlib.invert.evaluate import score_models, single_image_dreambooth, summary_row
    from w2wlib.spaces.shipped import open_spaces
    from w2wlib.viz import markdown_table, to_tensor
    from w2wlib.world.encoder import load_encoder
    from w2wlib.world.pipeline import load_pipeline
    from w2wlib.world.render import EVAL_VIEWS, identity_views, render_ids

    S = open_spaces("data/spaces", "data/dataset")
    pipe, enc = load_pipeline("data/world/pipeline"), load_encoder("data/world/identity_encoder")
    layout = S.dataset.lora_layout(pipe.unet)
    seeds = S.dataset.held_out_seeds[: args.identities]
    inputs, masks = render_ids(seeds, [500] * len(seeds), return_mask=True)
    refs = identity_views(seeds, args.images, EVAL_VIEWS)
    x, m = to_tensor(inputs), torch.from_numpy(masks)
    score = dict(n_images=args.images, n_refs=args.images, seed=0, steps=25, guidance=4.0)
    methods = comparison_methods(S.vae.latent_dim, steps=args.steps, w2w_steps=args.w2w_steps, generations=args.generations)
    rows, record = [], []
    for name, (space, cfg) in methods.items():
        res = invert(pipe, S.space(space), x, cfg=cfg, masks=m, keys=seeds, layout=layout, progress=False)
        s = score_models(pipe, enc, res.W, refs, inputs, layout=layout, **score)
        rows.append(summary_row(name, s, res.seconds_per_image))
        record.append({"name": name, "space": space, "config": res.config, "seconds_per_image": res.seconds_per_image,
                       "id_mean": float(s["id"].mean()), "id": s["id"].tolist(), "id_input_mean": float(s["id_input"].mean())})
        print(markdown_table(["method", "ID", "95 % CI", "ID (input)", "s / image"], rows[-1:]).splitlines()[-1], flush=True)
    refs_rows = {"floor: base model": score_models(pipe, enc, None, refs, inputs, **score)}
    t0 = time.perf_counter()
    W1 = single_image_dreambooth(pipe, x, steps=args.steps, lr=2e-3, keys=seeds)
    single_s = (time.perf_counter() - t0) / len(seeds)
    refs_rows["DreamBooth on the one input"] = score_models(pipe, enc, W1, refs, inputs, **score)
    n_c = min(args.ceiling, len(seeds))
    W_c = fine_tune(pipe, seeds[:n_c], DatasetConfig.preset("mini"), None, steps=args.ceiling_steps,
                    prior_loss_weight=0.0, progress=False)
    ceiling = score_models(pipe, enc, W_c, refs[: n_c * args.images], inputs[:n_c], **score)
    refs_rows[f"ceiling: DreamBooth on 8 views ({n_c} identities)"] = ceiling
    for name, s in refs_rows.items():
        rows.append(summary_row(name, s, single_s if "one input" in name else None))
    best = max(record, key=lambda r: r["id_mean"])
    out = {"n": len(seeds), "identity_seeds": [int(s) for s in seeds], "methods": record,
           "references": {k: {"id_mean": float(v["id"].mean()), "id": v["id"].tolist()} for k, v in refs_rows.items()},
           "best": best["name"], "best_over_ceiling": float(torch.tensor(best["id"][:n_c]).mean() / ceiling["id"].mean()),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(markdown_table(["method", "ID (eval views)", "95 % CI", "ID (input)", "s / image"], rows))
    print(f"best: {best['name']}, {out['best_over_ceiling']:.2f} of the 8-view ceiling on {n_c} identities")


if __name__ == "__main__":
    main()
