"""Does storing the weights dataset in float16 change the images? (data/README.md: `dataset/` storage.)

Generates the same rows stored as float32 and as float16 (rounded, then read back as float32), with the
same noise, and compares: the pixel difference, and the identity encoder's cosine between paired images
next to the cosine between two noise seeds of one LoRA (what "a different picture" means here).

    python benchmarks/float16_storage.py [--dataset data/dataset] [--world data/world] [--rows 16]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from w2wlib.data import open_weights
from w2wlib.generate import generate
from w2wlib.world.encoder import load_encoder
from w2wlib.world.pipeline import load_pipeline
from w2wlib.profile import load_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=str(load_profile().path("dataset_dir")))
    ap.add_argument("--world", default=str(load_profile().path("world_dir")))
    ap.add_argument("--rows", type=int, default=16)
    a = ap.parse_args()
    ds, pipe = open_weights(a.dataset), load_pipeline(f"{a.world}/pipeline", device="cpu")
    enc = load_encoder(f"{a.world}/identity_encoder", device="cpu")
    W = ds.rows(slice(0, a.rows)).float()
    W16 = W.half().float()
    rel = ((W16 - W).norm(dim=1) / W.norm(dim=1)).max().item()
    kw = dict(layout=ds.lora_layout(pipe.unet), n_per_row=2, guidance=7.5, steps=25, seed=0)
    x32, x16 = generate(pipe, W, **kw), generate(pipe, W16, **kw)
    diff = np.abs(x32.astype(np.int16) - x16.astype(np.int16))
    z32, z16 = enc.embed(x32), enc.embed(x16)
    paired = (z32 * z16).sum(1)
    seeds = (z32[0::2] * z32[1::2]).sum(1)
    print(f"rows {a.rows} x 2 noise seeds, {a.dataset}")
    print(f"max relative weight error of float16 rounding: {rel:.2e}")
    print(f"pixel |diff| (0..255): mean {diff.mean():.3f}, 99th percentile {np.percentile(diff, 99):.0f}, max {diff.max()}")
    print(f"identity cosine float32 vs float16 images: mean {paired.mean():.4f}, min {paired.min():.4f}")
    print(f"for scale, identity cosine between two noise seeds of one LoRA: mean {seeds.mean():.4f}")
    print(f"float32 rows take {W.numel() * 4 * len(ds) // a.rows / 2**20:.0f} MiB, float16 half of it")


if __name__ == "__main__":
    main()
