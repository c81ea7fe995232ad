"""Does the mini world's text steer it? Prompt adherence, diversity and sharpness of a pipeline, at several CFG scales.

Probes a world's pipeline folder, or a UNet checkpoint of a running ``w2w world build`` (its
``_work/unet.ckpt.pt``, assembled with that build's autoencoder), with the quality gates' own functions
(:mod:`w2wlib.world.check`): the share of samples of each adherence prompt that the identity encoder's
attribute head sees with the named attribute, the mean absolute gap between the attribute frequencies of
"a photo of a person" and the renderer's prior, and the sharpness of samples over that of the
autoencoder's reconstructions of renders. From the repo root:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/world_text.py data/world/pipeline --guidance 4 7.5
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/world_text.py runs/world/_work/unet.ckpt.pt --vae runs/world/_work/vae
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from w2wlib.profile import load_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", help="a pipeline folder, or a UNet checkpoint (.pt) of a world build")
    ap.add_argument("--vae", help="the build's autoencoder folder (for a checkpoint)")
    ap.add_argument("--encoder", default=str(load_profile().path("world_dir") / "identity_encoder"))
    ap.add_argument("--guidance", type=float, nargs="+", default=[4.0, 7.5])
    ap.add_argument("-n", type=int, default=32, help="samples per prompt")
    args = ap.parse_args()

    from w2wlib.world import encoder as E
    from w2wlib.world import pipeline as P
    from w2wlib.world.check import prompt_adherence, reconstruct, sample_base_model, sharpness
    from w2wlib.world.render import ATTRIBUTES, attribute_prior, held_out_seeds, render_ids

    src, step = args.source, None
    if src.endswith(".pt"):
        from diffusers import AutoencoderKL

        state = torch.load(src, weights_only=True)
        step = state["step"]
        tmp = Path(tempfile.mkdtemp())
        tok = P.make_tokenizer(tmp / "tok")
        unet, text = P.make_unet(), P.make_text_encoder(tok)
        unet.load_state_dict(state["unet"]), text.load_state_dict(state["text"])
        P.save_pipeline(tmp / "pipeline", vae=AutoencoderKL.from_pretrained(args.vae), unet=unet.eval(),
                        text_encoder=text.eval(), tokenizer=tok)
        src = str(tmp / "pipeline")
    pipe, enc = P.load_pipeline(src), E.load_encoder(args.encoder)
    prior = attribute_prior(20000, 0)
    renders = render_ids(held_out_seeds(64, 1), np.arange(64))
    recon_sharpness = sharpness(reconstruct(pipe.vae, renders))
    for g in args.guidance:
        adherence = prompt_adherence(pipe, enc, args.n, seed=4, guidance=g)
        person = sample_base_model(pipe, 64, seed=0, guidance=g)
        freq = (torch.sigmoid(enc.predict_attributes(person)) > 0.5).float().mean(0)
        gap = float(np.mean([abs(float(f) - prior[a]) for a, f in zip(ATTRIBUTES, freq)]))
        print(json.dumps({"source": args.source, "step": step, "guidance": g,
                          "adherence": {k: round(v, 3) for k, v in adherence.items()},
                          "adherence_mean": round(float(np.mean(list(adherence.values()))), 3),
                          "adherence_min": round(min(adherence.values()), 3),
                          "person_attribute_gap": round(gap, 3),
                          "sharpness_ratio": round(sharpness(person) / recon_sharpness, 3)}), flush=True)
    if src != args.source:
        shutil.rmtree(Path(src).parent, ignore_errors=True)


if __name__ == "__main__":
    main()
