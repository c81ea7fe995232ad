"""P3: single-image inversion, every method side by side in one run: ID score against wall time.

Held-out identities of the mini world (never trained by any model), one input render each (image seed
500, not an evaluation view), through :func:`w2wlib.invert.evaluate.run_comparison`, the same call as the
chapter's: each method of :func:`w2wlib.invert.comparison_methods` inverts all of them in one batch; each
inverted model draws ``--images`` images over fixed noise seeds, scored against as many evaluation views
(:func:`w2wlib.invert.evaluate.score_models`). Next to them: the base model, another identity's inversion,
a DreamBooth-LoRA on the one input (the unconstrained reference) and, on ``--ceiling`` identities, a
DreamBooth-LoRA on 8 views (the ceiling). Writes ``--out`` (JSON, read by
the chapter "Inversion") and prints a Markdown table. From the repo root:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/p3_inversion.py --identities 64 --out benchmarks/p3_inversion.json
"""

from __future__ import annotations

import argparse
from w2wlib.profile import load_profile


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

    from w2wlib.records import write_record
    from w2wlib.world.pipeline import world_guidance
    from w2wlib.invert.evaluate import run_comparison
    from w2wlib.spaces.shipped import open_spaces
    from w2wlib.viz import markdown_table
    from w2wlib.world.encoder import load_encoder
    from w2wlib.world.pipeline import load_pipeline
    from w2wlib.world.render import EVAL_VIEWS, identity_views, render_ids

    P = load_profile()   # the shipped mini world, wherever the profile keeps it
    S = open_spaces(P.path("spaces_dir"), P.path("dataset_dir"))
    pipe, enc = load_pipeline(P.path("world_dir") / "pipeline"), load_encoder(P.path("world_dir") / "identity_encoder")
    seeds = S.dataset.held_out_seeds[: args.identities]
    inputs, masks = render_ids(seeds, [500] * len(seeds), return_mask=True)
    refs = identity_views(seeds, args.images, EVAL_VIEWS)
    cmp = run_comparison(pipe, enc, S, inputs, masks, refs, seeds, steps=args.steps, w2w_steps=args.w2w_steps,
                         generations=args.generations, n_images=args.images, n_ceiling=args.ceiling,
                         ceiling_steps=args.ceiling_steps, guidance=world_guidance(P.path("world_dir")),
                         layout=S.dataset.lora_layout(pipe.unet))
    out = cmp.record(seeds)
    write_record(args.out, out, S.dataset)
    print(markdown_table(["method", "ID (eval views)", "95 % CI", "ID (input)", "s / image"], cmp.rows()))
    print(f"best: {cmp.best}, {out['best_over_ceiling']:.2f} of the {cmp.ceiling_name}")


if __name__ == "__main__":
    main()
