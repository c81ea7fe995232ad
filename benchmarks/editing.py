"""Editing: PCA against VAE at matched strength, on more models and strengths than the chapter "Editing" runs live.

:func:`w2wlib.edit.edit_comparison`, the chapter's call: each attribute added to the first ``--rows`` held-out models
that lack it, in the PCA and in the VAE, at every strength (in dataset standard deviations along the debiased
direction), drawn with w2w's timestep switch and read by the identity encoder (flip rate, identity kept, other
attributes unchanged). Writes ``--out`` (JSON, read by the chapter) and prints a Markdown table. From the repo root:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/editing.py --out benchmarks/editing.json
"""

from __future__ import annotations

import argparse
import time

from w2wlib.profile import load_profile



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spaces", default=str(load_profile().path("spaces_dir")))
    ap.add_argument("--dataset", default=str(load_profile().path("dataset_dir")))
    ap.add_argument("--world", default=str(load_profile().path("world_dir")))
    ap.add_argument("--attributes", nargs="+", default=["Male", "Beard"])
    ap.add_argument("--rows", type=int, default=24, help="held-out models edited per attribute")
    ap.add_argument("--strengths", type=float, nargs="+", default=[0, 3, 6, 9, 12])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--switch-t", type=int, default=800)
    ap.add_argument("--min-corr", type=float, default=0.2)
    ap.add_argument("--out", default="benchmarks/editing.json")
    args = ap.parse_args()

    from w2wlib.records import write_record
    from w2wlib.world.pipeline import world_guidance
    from w2wlib.edit import comparison_rows, edit_comparison
    from w2wlib.sampling import instance_prompt
    from w2wlib.spaces.shipped import open_spaces
    from w2wlib.viz import markdown_table
    from w2wlib.world.encoder import load_encoder
    from w2wlib.world.pipeline import load_pipeline

    S = open_spaces(args.spaces, args.dataset)
    pipe, enc = load_pipeline(f"{args.world}/pipeline"), load_encoder(f"{args.world}/identity_encoder")
    guidance = world_guidance(args.world)                 # the world's own CFG scale
    pipe.set_progress_bar_config(disable=True)
    ds = S.dataset
    t0 = time.perf_counter()
    results = edit_comparison(pipe, enc, S, args.attributes, args.strengths, n_rows=args.rows, n_images=args.images,
                              seed=0, switch_t=args.switch_t, min_corr=args.min_corr, prompt=instance_prompt(ds),
                              steps=25, guidance=guidance, layout=ds.lora_layout(pipe.unet))
    out = {"attributes": args.attributes, "n_rows": args.rows,
           "n_images": args.images, "strengths": args.strengths, "switch_t": args.switch_t, "min_corr": args.min_corr,
           "results": {f"{a}|{name}": [{k: v for k, v in r.items() if k != "images"} for r in res]
                       for (a, name), res in results.items()},
           "seconds": round(time.perf_counter() - t0, 1)}
    write_record(args.out, out, S.dataset)
    print(markdown_table(["edited attribute", "space", "strength", "flip rate", "ID kept", "others unchanged",
                          "present before", "present after"], comparison_rows(results)))


if __name__ == "__main__":
    main()
