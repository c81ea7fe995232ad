"""The mini world: tokenizer, prompts, and a micro world built end to end by the real build command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from w2wlib import ArtifactMissingError, W2WError
from w2wlib.metrics import frechet_distance
from w2wlib.stages import sha256, verify_manifest
from w2wlib.world import build as B
from w2wlib.world import check
from w2wlib.world import pipeline as P
from w2wlib.world.render import ATTRIBUTES, attributes, render_ids, sample_identities
from w2wlib.world.text import VOCABULARY, attribute_prompt, check_prompt


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return P.make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_every_vocabulary_word_is_one_token(tokenizer):
    assert "sks" in VOCABULARY and "person" in VOCABULARY
    for word in VOCABULARY:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{word!r} splits into {tokenizer.convert_ids_to_tokens(ids)}"
    ids = tokenizer("a photo of sks person").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(set(ids)) == 7
    assert tokenizer.model_max_length == 77


def test_unknown_words_fall_back_and_check_prompt_names_them(tokenizer):
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("a zebra", add_special_tokens=False).input_ids)
    assert pieces[0] == "a</w>" and len(pieces) > 2  # "zebra" falls back to sub-word pieces
    assert check_prompt("A photo of sks person") == "A photo of sks person"
    with pytest.raises(W2WError, match=r"\['zebra'\]"):
        check_prompt("a photo of a zebra")


def test_attribute_prompts_only_name_true_attributes():
    rng = np.random.default_rng(0)
    attrs = attributes(sample_identities(np.arange(300)))
    for a in attrs:
        text = check_prompt(attribute_prompt(a, rng, generic=0.0))
        on = {name for name, flag in zip(ATTRIBUTES, a) if flag}
        assert ("man" in text.split()) == ("Male" in on)
        assert ("glasses" in text) <= ("Eyeglasses" in on) and ("beard" in text) <= ("Beard" in on)


def test_frechet_distance_matches_the_1d_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20000, 1, generator=g) * 2 + 1, torch.randn(20000, 1, generator=g) * 0.5 - 1
    expected = (a.mean() - b.mean()) ** 2 + (a.std() - b.std()) ** 2
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-3)
    with pytest.raises(W2WError, match="equal F"):
        frechet_distance(a, torch.randn(5, 2))


def test_micro_world_loads_with_plain_diffusers_and_generates(micro_world):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(micro_world / "pipeline", local_files_only=True)
    assert pipe.tokenizer("sks", add_special_tokens=False).input_ids.__len__() == 1
    out = pipe("a photo of a person", height=64, width=64, num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all() and out.std() > 0.01
    again = pipe("a photo of a person", height=64, width=64, num_inference_steps=3, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(out, again)  # seeded generation is deterministic


def test_micro_world_manifest_and_gates(micro_world):
    manifest = json.loads((micro_world / "manifest.json").read_text())
    assert manifest["command"].startswith("w2w world build") and "--config micro" in manifest["command"]
    assert set(manifest["build_seconds"]) == set(B.STAGES)
    assert {"pipeline/model_index.json", "identity_encoder/config.json", "quality.json"} <= set(manifest["files"])
    assert verify_manifest(micro_world) == []
    q = manifest["quality"]
    # the recorded AUC is the world's encoder's verification, recomputed here, and it separates identities
    from w2wlib.world.encoder import load_encoder, verification

    enc = load_encoder(micro_world / "identity_encoder")
    ver = verification(enc, n_identities=B.WorldConfig.preset("micro").check_identities, n_views=4, seed=0)
    assert q["identity_encoder"]["verification_auc"] == ver["auc"] > 0.9 and q["samples"]["n"] == 8
    assert q["autoencoder"]["reconstruction_id_score"] > q["autoencoder"]["other_identity_id_score"]
    # the new gates are there and are what they say: shares, a mean and a minimum of them, a ratio
    adh = q["prompt_adherence"]
    assert set(adh["share"]) == set(check.ADHERENCE_PROMPTS) and all(0 <= v <= 1 for v in adh["share"].values())
    assert adh["mean"] == pytest.approx(np.mean(list(adh["share"].values()))) and adh["min"] == min(adh["share"].values())
    assert q["samples"]["sharpness_ratio"] == pytest.approx(q["samples"]["sharpness"] / q["samples"]["sharpness_of_reconstructions"])
    assert q["samples"]["guidance"] == B.WorldConfig.preset("micro").guidance


def test_sharpness_is_the_variance_of_the_laplacian():
    flat = np.full((2, 8, 8, 3), 128, np.uint8)
    assert check.sharpness(flat) == 0.0
    dots = flat.copy()
    dots[:, 4, 4] = 255                                   # one bright pixel: Laplacian -4a at it, a at 4 neighbours
    a = 127 / 255
    lap = np.zeros((6, 6)); lap[3, 3] = -4 * a; lap[2, 3] = lap[4, 3] = lap[3, 2] = lap[3, 4] = a
    assert check.sharpness(dots) == pytest.approx(float(lap.var(ddof=1)), rel=1e-5)


def test_build_is_cached_and_tampering_is_detected(micro_world, tmp_path):

    manifest = B.build_world(micro_world, B.WorldConfig.preset("micro"), device=torch.device("cpu"), progress=False)
    assert manifest["files"]["pipeline/model_index.json"]["sha256"] == sha256(micro_world / "pipeline" / "model_index.json")
    copy = tmp_path / "w"
    import shutil

    shutil.copytree(micro_world, copy)
    (copy / "quality.json").write_text("{}")
    assert verify_manifest(copy) == ["quality.json"]


def test_missing_artifacts_name_the_build_command(tmp_path):
    with pytest.raises(ArtifactMissingError, match="w2w world build"):
        P.load_pipeline(tmp_path / "nowhere")
    from w2wlib.world.encoder import load_encoder

    with pytest.raises(ArtifactMissingError, match="w2w world build"):
        load_encoder(tmp_path / "nowhere")
    with pytest.raises(W2WError, match="unknown world config"):
        B.WorldConfig.preset("huge")


def test_autoencoder_stage_is_deterministic(tmp_path):
    """The same config and seed give the same weights, byte for byte (same machine, same threads)."""
    cfg = B.WorldConfig.preset("micro")
    cfg.autoencoder.steps = 3
    shas = []
    for name in ("a", "b"):
        B.build_world(tmp_path / name, cfg, device=torch.device("cpu"), progress=False, stages=("teacher", "autoencoder"))
        shas.append(sha256(tmp_path / name / "_work" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert shas[0] == shas[1]


def test_the_shipped_mini_world_is_intact_loads_offline_and_generates_faces():
    """The mini profile's world as committed (the rebuild of issue 12): files match the manifest, its recorded
    gates are the ones measured when it was built (benchmarks/world_text.md; not all of the issue's targets:
    bald 0.47 against 0.75, sharpness 0.76 against 0.8), its tokenizer has a token per word of the full
    descriptions, plain diffusers runs it, and the encoder verifies."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from w2wlib import load_profile
    from w2wlib.world import check
    from w2wlib.world.encoder import load_encoder, verification

    world = load_profile("mini").path("world_dir")
    assert (world / "manifest.json").is_file(), f"{world} has no manifest: run `w2w world build --config mini`"
    assert verify_manifest(world) == []
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["config"]["name"] == "mini"
    q = json.loads((world / "quality.json").read_text())
    share = q["prompt_adherence"]["share"]
    assert q["prompt_adherence"]["mean"] >= 0.88 and sorted(share.values())[1] >= 0.85   # five phrases of six
    assert q["samples"]["sharpness_ratio"] >= 0.75 and q["identity_encoder"]["verification_auc"] >= 0.999
    tok = CLIPTokenizer.from_pretrained(world / "pipeline" / "tokenizer")
    ids = tok("a photo of a middle aged man with olive skin and a goatee beard and thin gold glasses").input_ids
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in ("olive", "goatee", "gold", "aged"))
    assert len(ids) < 77
    # a saved pipeline records no build folder of its own (save_pipeline drops it)
    assert all(json.loads(c.read_text()).get("_name_or_path") is None for c in (world / "pipeline").glob("*/config.json"))
    pipe = StableDiffusionPipeline.from_pretrained(world / "pipeline", local_files_only=True)
    images = check.sample_base_model(pipe, 32, steps=10)                      # [32, 64, 64, 3] uint8
    enc = load_encoder(world / "identity_encoder")
    # the samples are faces: in the identity encoder's space they sit as close to fresh renders as other
    # fresh renders do (uniform noise images sit ~4.5x farther, measured when the world was built)
    z_r = enc.embed(render_ids(check.held_out_seeds(32, 0), np.arange(32)))
    floor = frechet_distance(enc.embed(render_ids(check.held_out_seeds(32, 1), np.arange(32))), z_r)
    assert images.std() > 20 and frechet_distance(enc.embed(images), z_r) < 2 * floor
    assert verification(enc, n_identities=40, n_views=3)["auc"] >= 0.99       # fresh held-out identities


def test_an_interrupted_stage_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    """Kill the autoencoder stage right after a checkpoint; the resumed build equals a straight one."""
    from w2wlib.stages import Stages

    cfg = B.WorldConfig.preset("micro")
    cfg.autoencoder.steps, cfg.autoencoder.checkpoint_every = 4, 2
    stages = ("teacher", "autoencoder")
    B.build_world(tmp_path / "straight", cfg, device=torch.device("cpu"), progress=False, stages=stages)
    real = Stages.checkpointer

    def dying(self, stage):
        save = real(self, stage)

        def save_and_die(step, state):
            save(step, state)
            raise KeyboardInterrupt(f"killed after the checkpoint at step {step}")
        return save_and_die

    monkeypatch.setattr(Stages, "checkpointer", dying)
    with pytest.raises(KeyboardInterrupt, match="killed after the checkpoint at step"):
        B.build_world(tmp_path / "cut", cfg, device=torch.device("cpu"), progress=False, stages=stages)
    assert (tmp_path / "cut" / "_work" / "autoencoder.ckpt.pt").is_file()
    monkeypatch.setattr(Stages, "checkpointer", real)
    B.build_world(tmp_path / "cut", cfg, device=torch.device("cpu"), progress=False, stages=stages)
    vae = "_work/vae/diffusion_pytorch_model.safetensors"
    assert sha256(tmp_path / "cut" / vae) == sha256(tmp_path / "straight" / vae)
    assert not (tmp_path / "cut" / "_work" / "autoencoder.ckpt.pt").exists()
