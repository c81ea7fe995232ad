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
    with pytest.raises(W2WError, match="storage must be float32 or float16, not 'int8'"):
        DatasetConfig(storage="int8")


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


def test_the_shipped_dataset_loads_both_ways_and_its_rows_generate_their_identities(tmp_path):
    """The mini profile's dataset as committed (issue 12's rebuild): intact, built on the shipped world's UNet
    with today's mini preset, stored in float16, readable through the public-layout path; the pinning its
    oracle measured at build time (256 identities x 6 unseen noise seeds and evaluation views; never
    recomputed here: the issue's targets are own ID >= 0.6, gap >= 0.5, >= 98 % above both floors, and the
    floors asserted are the measured figures, data/README.md); and a live check that rows loaded by diffusers'
    own loader draw their identities, at the world's CFG."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from w2wlib import load_profile
    from w2wlib.data import export_w2w_layout
    from w2wlib.generate import image_generator
    from w2wlib.lora_io import save_diffusers_lora
    from w2wlib.metrics import identity_scores
    from w2wlib.world.encoder import load_encoder
    from w2wlib.world.pipeline import world_guidance
    from w2wlib.world.render import EVAL_VIEWS, identity_views

    P = load_profile("mini")
    folder, world = P.path("dataset_dir"), P.path("world_dir")
    assert verify_manifest(folder) == []
    manifest = json.loads((folder / "manifest.json").read_text())
    unet = "pipeline/unet/diffusion_pytorch_model.safetensors"
    assert manifest["world_unet_sha256"] == json.loads((world / "manifest.json").read_text())["files"][unet]["sha256"]
    cfg = DatasetConfig.preset("mini")
    assert DatasetConfig(**manifest["config"]) == cfg and cfg.storage == "float16"
    with safe_open(str(folder / "all_weights.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    ds = open_weights(folder)
    assert len(ds) == cfg.n_train == 4096 and len(ds.held_out_seeds) == cfg.n_held_out == 256
    assert ds.identity_seeds == training_seeds(cfg).tolist() and ds.extra["dreambooth"]["shared_init"]
    o = json.loads((folder / "oracle.json").read_text())["summary"]
    assert o == manifest["oracle"] and o["n"] == 256 and o["images_per_identity"] == 6
    assert o["own_mean"] >= 0.56 and o["consistency_gap"] >= 0.40 and o["own_above_both"] >= 0.99   # measured: 0.561, 0.410, 0.996
    assert o["margin_over_base"] > 0.3 and o["margin_over_other"] > 0.3
    pub = open_weights(export_w2w_layout(ds, tmp_path / "w2w", arrangement="flat"), layout="w2w")
    rows = [0, 1234, len(ds) - 1]
    assert torch.equal(pub.rows(rows), ds.rows(rows)) and pub.lora_layout().entries == ds.lora_layout().entries
    pipe = StableDiffusionPipeline.from_pretrained(world / "pipeline", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    enc = load_encoder(world / "identity_encoder")
    prompt, n, ids = ds.extra["dreambooth"]["instance_prompt"], 4, [0, 1, 2, 3]
    kw = dict(height=64, width=64, num_inference_steps=10, guidance_scale=world_guidance(world), output_type="np")

    def images():
        out = pipe([prompt] * n, generator=[image_generator(0, j) for j in range(n)], **kw).images
        return (out * 255).round().astype(np.uint8)

    base = images()
    own, floor = [], []
    for i in ids:
        save_diffusers_lora(ds.rows([i])[0], ds.lora_layout(pipe.unet), tmp_path / f"row{i}")
        pipe.load_lora_weights(str(tmp_path / f"row{i}"), adapter_name=f"row{i}")   # diffusers' own loader
        try:
            gen = images()
        finally:
            pipe.unload_lora_weights()
        renders = identity_views([ds.identity_seeds[i]], n, EVAL_VIEWS)
        own.append(float(identity_scores(enc, gen, renders, n, n)[0]))
        floor.append(float(identity_scores(enc, base, renders, n, n)[0]))
    print("own", np.round(own, 3), "base", np.round(floor, 3))
    assert np.mean(own) > np.mean(floor) + 0.3, (own, floor)


def test_the_shipped_spaces_were_fit_on_the_shipped_dataset_with_the_mini_preset():
    """The mini profile's spaces open against its dataset (their standardisation is that dataset's), with
    today's preset and both amortised inverters."""
    from w2wlib import load_profile
    from w2wlib.spaces.build import SpacesConfig
    from w2wlib.spaces.shipped import open_spaces

    P = load_profile("mini")
    folder, spaces = P.path("dataset_dir"), P.path("spaces_dir")
    assert verify_manifest(spaces) == []
    S = open_spaces(spaces, folder)                      # the spaces' standardisation is this dataset's
    assert SpacesConfig.from_manifest(spaces) == SpacesConfig.preset("mini")
    for name in ("pca", "vae"):
        assert S.amortised(name).config.space == name


def test_describe_oracle_states_every_summary_figure():
    from w2wlib.dataset_build import describe_oracle

    s = {"n": 256, "own_mean": 0.5613, "base_mean": -0.0071, "other_mean": 0.001, "margin_over_base": 0.5683,
         "margin_over_other": 0.5603, "own_above_both": 0.99609375}
    text = describe_oracle(s)
    for figure in ("256 identities", "**0.561**", "-0.007", "0.001", "**0.568**", "**0.560**", "99.6 % of identities"):
        assert figure in text, figure
    assert "gap" not in text                                      # an older oracle without consistency figures
    full = describe_oracle({**s, "consistency_within": 0.399, "consistency_across": -0.011, "consistency_gap": 0.410})
    assert full.startswith(text) and "(identity consistency 0.399)" in full and "(-0.011)" in full and "**0.410**" in full
