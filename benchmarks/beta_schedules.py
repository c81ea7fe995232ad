"""When does KL annealing matter? The six β schedules of :mod:`w2wlib.schedules`, in full, with the shipped recipe.

The same VAE (the shipped config and init seed) trained six ways for ``--steps`` steps each: β = 1 and β = D,
constant, warm-up + linear and cyclical, and the ramp with free bits 0.5 at β = D. Writes ``--out`` (JSON: each run's config,
history and informative units; read by the chapter "Training the VAE", which re-runs a few of them live) and prints
a Markdown table. From the repo root (about a minute per run on 2 free cores):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/beta_schedules.py --out benchmarks/beta_schedules.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from w2wlib.profile import load_profile



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spaces", default=str(load_profile().path("spaces_dir")))
    ap.add_argument("--dataset", default=str(load_profile().path("dataset_dir")))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/beta_schedules.json")
    args = ap.parse_args()

    from w2wlib.records import write_record
    from w2wlib.schedules import compare_schedules, schedule_rows, schedule_runs
    from w2wlib.spaces.shipped import open_spaces
    from w2wlib.viz import markdown_table

    S = open_spaces(args.spaces, args.dataset)
    ds, cfg = S.dataset, S.config
    vae_cfg = cfg.vae_config(ds.dim, ds.lora_layout())
    runs = schedule_runs(cfg.train_config(), args.steps, ds.dim)
    t0 = time.perf_counter()
    results = {}
    for name, run in runs.items():
        results.update(compare_schedules(vae_cfg, ds, {name: run}, seed=cfg.seed))
        print(markdown_table(["schedule", "held-out MSE", "KL (nats)", "active units", "units over 0.1 nats"],
                             schedule_rows({name: results[name]})).splitlines()[-1], flush=True)
    out = {"steps": args.steps, "seed": cfg.seed,
           "runs": {name: {**r, "config": dataclasses.asdict(runs[name])} for name, r in results.items()},
           "seconds": round(time.perf_counter() - t0, 1)}
    write_record(args.out, out, S.dataset)
    print(markdown_table(["schedule", "held-out MSE", "KL (nats)", "active units", "units over 0.1 nats"],
                         schedule_rows(results)))


if __name__ == "__main__":
    main()
