"""``w2w dataset build`` on a micro world: the real CLI, shards, the saved layout, the oracle, resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from w2wlib import ArtifactMissingError, W2WError
from w2wlib.data import open_weights
from w2wlib.dataset_build import DatasetConfig, build_dataset, held_out_seeds, training_seeds
from w2wlib.stages import verify_manifest
from w2wlib.world.render import ATTRIBUTES, attributes, sample_identities


def test_the_dataset_has_the_w2w_layout_seeds_and_attributes(micro_dataset, micro_world):
    cfg = DatasetConfig.preset("micro")
    ds = open_weights(micro_dataset)
    assert len(ds) == cfg.n_train and ds.layout == "ours"
    assert ds.identity_seeds == training_seeds(cfg).tolist()
    held = ds.held_out_seeds
    assert held == held_out_seeds(cfg).tolist() and min(held) >= 10**9 and not set(held) & set(ds.identity_seeds)
    truth = attributes(sample_identities(np.asarray(ds.identity_seeds)))
    assert all(np.array_equal(ds.attributes[a], truth[:, i]) for i, a in enumerate(ATTRIBUTES))
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(micro_world / "pipeline" / "unet")
    assert ds.lora_layout(unet).dim == ds.dim                                 # rows fit the shipped UNet
    assert torch.isfinite(ds.rows(slice(0, len(ds)))).all() and ds.rows([0]).abs().sum() > 0


def test_manifest_oracle_and_a_second_build_is_cached(micro_dataset, micro_world):
    manifest = json.loads((micro_dataset / "manifest.json").read_text())
    assert verify_manifest(micro_dataset) == [] and manifest["command"].startswith("w2w dataset build")
    oracle = json.loads((micro_dataset / "oracle.json").read_text())
    n = DatasetConfig.preset("micro").oracle_identities
    assert oracle["summary"]["n"] == n and all(len(oracle[k]) == n for k in ("own", "base", "other"))
    assert manifest["oracle"] == oracle["summary"]
    before = (micro_dataset / "all_weights.safetensors").stat().st_mtime_ns
    again = build_dataset(micro_dataset, DatasetConfig.preset("micro"), micro_world, device=torch.device("cpu"),
                          progress=False)
    assert (micro_dataset / "all_weights.safetensors").stat().st_mtime_ns == before   # every stage cached
    assert again["files"]["all_weights.safetensors"] == manifest["files"]["all_weights.safetensors"]


def test_errors_name_the_missing_world_and_unknown_configs(tmp_path):
    with pytest.raises(ArtifactMissingError, match="w2w world build"):
        build_dataset(tmp_path / "ds", DatasetConfig.preset("micro"), tmp_path / "no_world", device=torch.device("cpu"))
    with pytest.raises(W2WError, match="unknown dataset config"):
        DatasetConfig.preset("huge")


def test_a_live_fine_tune_gives_back_the_dataset_rows(micro_dataset, micro_world):
    """fine_tune (the chapter's live run) trains exactly as the shards stage did: same rows, any batch."""
    from w2wlib.dataset_build import class_images, fine_tune
    from w2wlib.world.pipeline import load_pipeline

    cfg = DatasetConfig.preset("micro")
    ds = open_weights(micro_dataset)
    pipe = load_pipeline(micro_world / "pipeline", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pool = class_images(pipe, cfg, progress=False)
    assert torch.equal(pool, torch.load(micro_dataset / "_work" / "class_images.pt", weights_only=True))
    assert torch.equal(class_images(pipe, cfg, 2, progress=False), pool[:2])       # a smaller pool is a prefix
    seeds = ds.identity_seeds[1:3]                                              # not a shard's first rows
    W = fine_tune(pipe, seeds, cfg, pool, progress=False)
    torch.testing.assert_close(W, ds.rows([1, 2]), rtol=1e-4, atol=1e-6)
    fewer = fine_tune(pipe, seeds, cfg, pool, progress=False, steps=1)
    assert not torch.allclose(fewer, W)
    with pytest.raises(W2WError, match="class images"):
        fine_tune(pipe, seeds, cfg, pool[:2], progress=False)                 # the config says another pool size
