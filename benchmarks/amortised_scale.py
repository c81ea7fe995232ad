"""Undoing the amortised inverter's shrinkage: its answer scaled up, chosen on one held-out set, measured on another.

The amortised inverter regresses a LoRA's code from an image; with noisy targets a regression predicts their
conditional mean, which lies nearer the mean identity than any real code, and the mean identity draws nobody.
:func:`w2wlib.invert.amortised.predict_inversion` takes a ``scale`` for the predicted whitened code. This script
picks the scale of each space on ``--calibrate`` held-out identities (from the end of the held-out list) by the
ID score of the models they give, then scores the chosen scale and the net's own answer (scale 1) on the first
``--identities`` held-out identities (the first shard of ``benchmarks/p3_inversion.py``, scored the same way:
one input render, image seed 500; 4 images against 4 evaluation views). From the repo root:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/amortised_scale.py --out benchmarks/amortised_scale.json
"""

from __future__ import annotations

import argparse
import time

from w2wlib.profile import load_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--identities", type=int, default=16, help="held-out identities the chosen scale is measured on")
    ap.add_argument("--calibrate", type=int, default=16, help="other held-out identities the scale is chosen on")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0, 2.5, 3.0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/amortised_scale.json")
    args = ap.parse_args()

    from w2wlib.invert.amortised import predict_inversion
    from w2wlib.invert.evaluate import score_models
    from w2wlib.metrics import bootstrap_ci
    from w2wlib.records import write_record
    from w2wlib.spaces.shipped import open_spaces
    from w2wlib.viz import markdown_table
    from w2wlib.world.encoder import load_encoder
    from w2wlib.world.pipeline import load_pipeline, world_guidance
    from w2wlib.world.render import EVAL_VIEWS, identity_views, render_ids

    t0 = time.perf_counter()
    P = load_profile()
    S = open_spaces(P.path("spaces_dir"), P.path("dataset_dir"))
    world = P.path("world_dir")
    pipe, enc = load_pipeline(world / "pipeline"), load_encoder(world / "identity_encoder")
    held = S.dataset.held_out_seeds
    sets = {"calibration": held[len(held) - args.calibrate:], "test": held[:args.identities]}
    if set(sets["calibration"]) & set(sets["test"]):
        raise SystemExit("the calibration and test identities overlap: ask for fewer")
    score = dict(n_images=args.images, n_refs=args.images, guidance=world_guidance(world),
                 layout=S.dataset.lora_layout(pipe.unet))

    def ids(space, seeds, scale):
        inputs = render_ids(seeds, [500] * len(seeds))
        W = predict_inversion(S.space(space), S.amortised(space), inputs, scale=scale).W
        return score_models(pipe, enc, W, identity_views(seeds, args.images, EVAL_VIEWS), inputs, **score)["id"]

    out = {"scales": args.scales, "calibration_seeds": [int(s) for s in sets["calibration"]],
           "test_seeds": [int(s) for s in sets["test"]], "spaces": {}}
    rows = []
    for space in ("pca", "vae"):
        cal = {s: float(ids(space, sets["calibration"], s).mean()) for s in args.scales}
        best = max(cal, key=cal.get)
        test = {s: ids(space, sets["test"], s) for s in sorted({1.0, best})}
        out["spaces"][space] = {"calibration": cal, "chosen": best, "test": {str(s): v.tolist() for s, v in test.items()}}
        for s, v in test.items():
            m, lo, hi = bootstrap_ci(v)
            rows.append([space.upper(), s, "chosen" if s == best else "the net's own", cal[s], m, f"[{lo:.3f}, {hi:.3f}]"])
        print(f"{space}: calibration ID by scale " + ", ".join(f"{s:g}: {v:.3f}" for s, v in cal.items()), flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    write_record(args.out, out, S.dataset)
    print(markdown_table(["space", "scale", "", "ID, calibration set", "ID, test set", "95 % CI"], rows))


if __name__ == "__main__":
    main()
