"""PCA against VAE over latent sizes, and in images on many held-out identities (read by the chapter "The latent space").

1. **Over latent sizes**: the held-out reconstruction MSE (standardised; 1.0 = the mean identity) of the shipped PCA
   truncated to each size, and of a VAE trained with the shipped recipe at each size (the shipped VAE at its own).
2. **In images**: :func:`w2wlib.world.scoring.reconstruction_id_scores` on the first ``--identities`` held-out
   identities: the own LoRA (oracle), its PCA and VAE reconstructions at the VAE's size, the base model; per identity.

Writes ``--out`` (JSON) and prints both tables. The chapter recomputes the PCA curve, the shipped VAE's point and the
first identities of part 2 live. From the repo root (about 2 minutes per VAE and 1 per 32 identities on 2 free cores):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/latent_space.py --out benchmarks/latent_space.json
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
    ap.add_argument("--world", default=str(load_profile().path("world_dir")))
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--steps", type=int, default=None, help="steps of each VAE (default: the shipped recipe's)")
    ap.add_argument("--identities", type=int, default=128)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/latent_space.json")
    args = ap.parse_args()

    from w2wlib.records import write_record
    from w2wlib.world.pipeline import world_guidance
    from w2wlib.metrics import reconstruction_mse
    from w2wlib.sampling import instance_prompt
    from w2wlib.spaces import VAESpace
    from w2wlib.spaces.shipped import open_spaces
    from w2wlib.train import train_vae
    from w2wlib.viz import markdown_table
    from w2wlib.world.encoder import load_encoder
    from w2wlib.world.pipeline import load_pipeline
    from w2wlib.world.scoring import reconstruction_id_scores

    S = open_spaces(args.spaces, args.dataset)
    ds, cfg, k = S.dataset, S.config, S.vae.latent_dim
    x_val = ds.standardise(ds.rows(S.val_rows))
    recipe = cfg.train_config()
    recipe = dataclasses.replace(recipe, steps=args.steps or recipe.steps)
    sizes = {}
    for s in sorted(set(args.sizes) | {k}):
        t0 = time.perf_counter()
        if s == k and args.steps is None:
            vae = S.vae                                   # the shipped VAE is this size's recipe run
        else:
            vae = VAESpace(dataclasses.replace(cfg, latent=s).vae_config(ds.dim, ds.lora_layout()), seed=cfg.seed)
            train_vae(vae, ds, recipe, progress=False)
        sizes[s] = {"pca": float(reconstruction_mse(S.pca.truncated(s), x_val).mean()),
                    "vae": float(reconstruction_mse(vae, x_val).mean()), "seconds": round(time.perf_counter() - t0, 1),
                    "vae_shipped": vae is S.vae}
        print(f"k = {s}: PCA {sizes[s]['pca']:.4f}, VAE {sizes[s]['vae']:.4f} ({sizes[s]['seconds']} s)", flush=True)

    pipe, enc = load_pipeline(f"{args.world}/pipeline"), load_encoder(f"{args.world}/identity_encoder")
    guidance = world_guidance(args.world)                 # the world's own CFG scale
    pipe.set_progress_bar_config(disable=True)
    rows = S.val_rows[: args.identities].tolist()
    spaces = {"PCA (w2w)": S.pca.truncated(min(k, S.pca.latent_dim)), "VAE (w2w++)": S.vae}
    t0 = time.perf_counter()
    scores, _, _ = reconstruction_id_scores(pipe, enc, ds, rows, spaces, n_images=args.images, n_renders=args.images,
                                         seed=0, steps=25, guidance=guidance, prompt=instance_prompt(ds),
                                         layout=ds.lora_layout(pipe.unet))
    out = {"sizes": {str(s): v for s, v in sizes.items()},
           "recipe_steps": recipe.steps,
           "functional": {"n": len(rows), "rows": rows, "k": k, "n_images": args.images, "steps": 25, "guidance": guidance,
                          "scores": {name: v.tolist() for name, v in scores.items()},
                          "seconds": round(time.perf_counter() - t0, 1)}}
    write_record(args.out, out, S.dataset)
    print(markdown_table(["k", "PCA", "VAE"], [[s, v["pca"], v["vae"]] for s, v in sizes.items()], digits=4))
    print(markdown_table(["weights", "ID score", "s.e."],
                         [[n, float(v.mean()), float(v.std() / len(v) ** 0.5)] for n, v in scores.items()]))


if __name__ == "__main__":
    main()
