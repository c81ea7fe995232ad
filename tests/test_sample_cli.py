"""Sampling, interpolation, the diversity measures and the `w2w sample`, `w2w edit` and `w2w export` commands:
slerp against the rotation it should be, the nearest-row check against brute force, the measures against hand
computations, the commands' files loaded by diffusers and peft, and every bad argument as a one-line error."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from w2wlib import W2WError
from w2wlib.cli import main
from w2wlib.diversity import attribute_frequencies, model_distance, path_steps
from w2wlib.generate import generate
from w2wlib.lora_io import load_diffusers_lora, load_peft_adapter
from w2wlib.sampling import (export_to_folder, interpolation_path, interpolation_widget, nearest_rows, path_weights,
                             read_latent, fit_gaussian, sample_models, sample_to_folders, slerp)
from w2wlib.viz import image_grid
from w2wlib.world.render import ATTRIBUTES


@pytest.fixture(scope="module")
def pipe(shipped_pipe):
    return shipped_pipe


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """One run of each command on the shipped mini world (2 images per preview)."""
    out = tmp_path_factory.mktemp("cmd")
    common = ["--preview", "2", "--device", "cpu"]
    assert main(["sample", "--space", "vae", "-n", "2", "--out", str(out / "s"), "--seed", "4", *common]) == 0
    assert main(["edit", "--space", "pca", "--attribute", "Beard", "--strength", "6", "--row", "7",
                 "--out", str(out / "e"), *common]) == 0
    assert main(["edit", "--space", "vae", "--attribute", "Male", "--strength", "-3", "--lora",
                 str(out / "s" / "vae_001"), "--debias", "none", "--out", str(out / "e2"), *common]) == 0
    assert main(["export", "--row", "11", "--space", "pca", "--format", "w2w", "--format", "diffusers",
                 "--out", str(out / "x"), *common]) == 0
    assert main(["export", "--latent", str(out / "s" / "vae_000" / "latent.safetensors"), "--out", str(out / "y"),
                 *common]) == 0
    return out


def test_slerp_is_the_rotation_between_the_ends():
    a, b = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 2.0])
    t = torch.linspace(0, 1, 7)
    ref = torch.stack([2 * torch.cos(t * math.pi / 2), torch.zeros(7), 2 * torch.sin(t * math.pi / 2)], 1)
    torch.testing.assert_close(slerp(a, b, t), ref, rtol=1e-6, atol=1e-6)
    near = slerp(a, a * 1.5, t)                                # parallel ends: the straight line
    torch.testing.assert_close(near, (1 - t[:, None]) * a + t[:, None] * a * 1.5)


def test_paths_in_both_spaces(S):
    za, zb = S.vae.sample(2, torch.Generator().manual_seed(0))
    zb = zb * za.norm() / zb.norm()                            # ends of one norm: the path keeps it
    sl = interpolation_path(S.vae, za, zb, 5, mode="slerp")
    torch.testing.assert_close(sl[[0, -1]], torch.stack([za, zb]).cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sl.norm(dim=1), za.norm().expand(5), rtol=1e-5, atol=1e-5)
    cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))
    assert cos(sl[0], sl[2]) == pytest.approx(cos(sl[2], sl[4]), abs=1e-5)   # the midpoint halves the angle
    torch.testing.assert_close(interpolation_path(S.vae, za, zb, 5), S.vae.interpolate(za, zb, 5))
    pa, pb = S.pca.sample(2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(interpolation_path(S.pca, pa, pb, 3)[1], (pa + pb) / 2)
    wa, wb = S.dataset.rows(S.val_rows[:2])                   # a path between two LoRAs: encode, walk, decode
    for space, mode in ((S.pca, "linear"), (S.vae, "slerp")):
        with torch.no_grad():
            za, zb = space.encode_weights(torch.stack([wa, wb]))
            ref = space.decode_weights(interpolation_path(space, za, zb, 4, mode=mode).to(space.device)).cpu()
        torch.testing.assert_close(path_weights(space, wa, wb, 4, mode=mode), ref)
    with pytest.raises(W2WError, match="use mode='linear'"):
        interpolation_path(S.pca, pa, pb, 5, mode="slerp")
    with pytest.raises(W2WError, match="mode must be 'linear' or 'slerp'"):
        interpolation_path(S.vae, za, zb, 5, mode="cubic")
    with pytest.raises(W2WError, match="steps >= 2"):
        interpolation_path(S.vae, za, zb, 1, mode="slerp")


def test_sampling_is_seeded_and_no_sample_copies_a_training_row(S):
    z, W = sample_models(S.pca, 3, seed=5)
    z2, W2 = sample_models(S.pca, 3, seed=5)
    assert torch.equal(z, z2) and torch.equal(W, W2) and not torch.equal(sample_models(S.pca, 3, seed=6)[0], z)
    torch.testing.assert_close(W, S.pca.decode_weights(z))
    rows = S.train_rows[:300]
    cos, near = nearest_rows(S, W, rows=rows, batch_size=128)
    x = torch.nn.functional.normalize(S.dataset.standardise(W), dim=1)
    y = torch.nn.functional.normalize(S.dataset.standardise(S.dataset.rows(rows)), dim=1)
    ref_cos, ref_j = (x @ y.T).max(1)                                          # brute force
    torch.testing.assert_close(cos, ref_cos)
    assert torch.equal(near, rows[ref_j])
    own, idx = nearest_rows(S, S.dataset.rows(rows[[3, 200]]), rows=rows, batch_size=128)
    assert torch.equal(idx, rows[[3, 200]]) and torch.allclose(own, torch.ones(2), atol=1e-5)   # a copy scores 1
    assert float(cos.max()) < 0.9


def test_fit_gaussian_matches_numpy_and_the_fitted_sampler_reproduces_it(S):
    z = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) @ torch.tensor(
        [[2., 0, 0, 0], [1, 1, 0, 0], [0, 0, .5, 0], [0, 0, 0, 3]]) + 1.5
    mu, L = fit_gaussian(z)
    np.testing.assert_allclose(mu.numpy(), z.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose((L @ L.T).numpy(), np.cov(z.double().numpy().T), rtol=1e-10)
    few = fit_gaussian(z[:3])[1]                                        # N <= k: regularised, still a factor
    assert torch.isfinite(few).all() and (few.diagonal() > 0).all()
    with pytest.raises(W2WError, match=r"needs finite latents \[N >= 2, k\]"):
        fit_gaussian(z[:1])
    rows = S.dataset.rows(S.train_rows[:200])
    zf, Wf = sample_models(S.vae, 4000, seed=1, fit_rows=rows)
    mu_z, L_z = fit_gaussian(S.vae.encode_weights(rows).detach().cpu())
    torch.testing.assert_close(zf.double().mean(0), mu_z, atol=0.1 * float(L_z.diagonal().max()), rtol=0)
    torch.testing.assert_close(torch.cov(zf.double().T), L_z @ L_z.T, atol=0.15 * float((L_z @ L_z.T).diagonal().max()),
                               rtol=0)
    torch.testing.assert_close(Wf[:3], S.vae.decode_weights(zf[:3].to(S.vae.device)).cpu())
    assert torch.equal(sample_models(S.vae, 3, seed=1, fit_rows=rows)[0], zf[:3])     # seeded, prefix-stable
    with pytest.raises(W2WError, match="scale must be a finite number >= 0"):
        sample_models(S.vae, 3, scale=float("nan"), fit_rows=rows)


class _FakeEncoder:
    def __init__(self, emb, logits=None):
        self.emb, self.logits = torch.nn.functional.normalize(emb, dim=1), logits

    def embed(self, images):
        return self.emb[torch.as_tensor(np.asarray(images)[:, 0, 0, 0].astype(np.int64))]

    def predict_attributes(self, images):
        return self.logits[torch.as_tensor(np.asarray(images)[:, 0, 0, 0].astype(np.int64))]


def _imgs(n):
    return np.stack([np.full((64, 64, 3), i, np.uint8) for i in range(n)])


def test_diversity_measures_against_hand_computations():
    emb = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(6, len(ATTRIBUTES), generator=torch.Generator().manual_seed(2))
    enc = _FakeEncoder(emb, logits)
    e = enc.emb
    m = torch.nn.functional.normalize(e.view(3, 2, 5).mean(1), dim=1)        # 3 models of 2 images
    ref = np.mean([1 - float(m[i] @ m[j]) for i in range(3) for j in range(3) if i != j])
    assert model_distance(enc, _imgs(6), 2) == pytest.approx(ref, rel=1e-6)
    steps = path_steps(enc, _imgs(6), n_per_point=2)                          # 3 points of 2 seeds
    ref_steps = [1 - float((e[2 * p] @ e[2 * p + 2] + e[2 * p + 1] @ e[2 * p + 3]) / 2) for p in range(2)]
    torch.testing.assert_close(steps, torch.tensor(ref_steps), rtol=1e-6, atol=1e-6)
    freq = attribute_frequencies(enc, _imgs(6))
    assert list(freq) == list(ATTRIBUTES)
    assert freq["Male"] == pytest.approx(float((logits[:, 0] > 0).float().mean()))
    with pytest.raises(W2WError, match="not >= 2 models of 4 images"):
        model_distance(enc, _imgs(6), 4)
    with pytest.raises(W2WError, match="n_per_row must be >= 1"):
        path_steps(enc, _imgs(6), 0)


def test_commands_write_files_that_load_in_diffusers_and_peft(S, pipe, commands):
    from peft import PeftModel

    layout = S.dataset.lora_layout(pipe.unet)
    expected = ["info.json", "latent.safetensors", "peft", "preview.png", "pytorch_lora_weights.safetensors"]
    for folder in ("s/vae_000", "s/vae_001", "e", "e2"):
        assert sorted(p.name for p in (commands / folder).iterdir()) == expected, folder
        assert Image.open(commands / folder / "preview.png").size[0] == 2 * 65 + 1
    assert Image.open(commands / "e" / "preview.png").size[1] == 2 * 65 + 1        # source row, edited row
    z, space = read_latent(commands / "s" / "vae_001")
    W = S.vae.decode_weights(z).detach()
    assert space == "vae" and torch.equal(z, sample_models(S.vae, 2, seed=4)[0][1:])
    torch.testing.assert_close(load_diffusers_lora(commands / "s" / "vae_001", layout), W[0])
    # the previews are drawn as the profile draws (the world's CFG 7.5, 25 steps, the dataset's instance prompt),
    # the command's two models in one batch, as it drew them
    drawn = generate(pipe, sample_models(S.vae, 2, seed=4)[1], n_per_row=2, seed=4, steps=25, guidance=7.5,
                     layout=layout, prompt="a photo of sks person")
    for i in range(2):
        got = np.asarray(Image.open(commands / "s" / f"vae_00{i}" / "preview.png").convert("RGB"))
        assert np.array_equal(got, image_grid(drawn[2 * i:2 * i + 2], nrow=2)), i
    kw = dict(prompt="a photo of sks person", n_per_row=2, seed=5, steps=3)
    for folder, w in (("s/vae_001", W[0]), ("e", load_peft_adapter(commands / "e" / "peft", layout))):
        ours = generate(pipe, w[None], layout=layout, **kw)
        pipe.load_lora_weights(str(commands / folder), adapter_name="exported")
        try:
            theirs = generate(pipe, None, **kw)
        finally:
            pipe.unload_lora_weights()
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 2, folder
        model = PeftModel.from_pretrained(copy.deepcopy(pipe.unet), str(commands / folder / "peft"))
        e = layout.entries[0]
        torch.testing.assert_close(model.base_model.model.get_submodule(e.module).lora_B["default"].weight,
                                   w[e.b_slice].view(e.b_shape))
    info = json.loads((commands / "s" / "vae_000" / "info.json").read_text())
    assert info["space"] == "vae" and 0 <= info["nearest_training_row"] < len(S.dataset)
    assert info["nearest_cosine"] < 0.9                                 # not a copy of a training row
    edit = json.loads((commands / "e" / "info.json").read_text())
    assert edit["attribute"] == "Beard" and "Male" in edit["debiased"] and edit["switch_t"] == 800
    assert json.loads((commands / "e2" / "info.json").read_text())["debiased"] == []


def test_export_formats(S, pipe, commands):
    layout = S.dataset.lora_layout(pipe.unet)
    x = commands / "x"
    assert sorted(p.name for p in x.iterdir()) == ["info.json", "latent.safetensors", "preview.png",
                                                   "pytorch_lora_weights.safetensors", "w2wmodel.pt"]
    row = S.dataset.rows([11])
    torch.testing.assert_close(load_diffusers_lora(x, layout), row[0])
    coeffs = torch.load(x / "w2wmodel.pt", weights_only=True)           # w2w's own file: [1, k] PCA coefficients
    torch.testing.assert_close(coeffs, S.pca.encode_weights(row))
    z, space = read_latent(x)
    assert space == "pca" and torch.equal(z, coeffs)
    y = commands / "y"                                                 # a sampled latent, exported again
    torch.testing.assert_close(load_peft_adapter(y / "peft", layout),
                               load_diffusers_lora(commands / "s" / "vae_000", layout))


def test_bad_arguments_are_one_line_errors(S, pipe, commands, tmp_path, capsys):
    sample_dir = str(commands / "s" / "vae_000")
    cases = [
        (["sample", "-n", "0", "--out", str(tmp_path / "a")], "-n must be a number of models >= 1"),
        (["sample", "--space", "pca", "-n", "1", "--out", str(commands / "x" / "info.json")],
         "is a file: give a folder"),
        (["sample", "-n", "2", "--seed", "4", "--out", str(commands / "s")], "vae_000 exists: choose another --out"),
        (["edit", "--attribute", "Smile", "--strength", "1", "--row", "1", "--out", str(tmp_path / "b")],
         "unknown attribute 'Smile': choose from Male"),
        (["edit", "--attribute", "Male", "--strength", "1", "--out", str(tmp_path / "b")], "give exactly one of --row"),
        (["edit", "--attribute", "Male", "--strength", "1", "--row", "2", "--lora", sample_dir, "--out",
          str(tmp_path / "b")], "give exactly one of --row"),
        (["edit", "--attribute", "Male", "--strength", "nan", "--row", "2", "--out", str(tmp_path / "b")],
         "--strength must be a finite number"),
        (["edit", "--attribute", "Male", "--strength", "1", "--row", "-1", "--out", str(tmp_path / "b")],
         "--row -1 is not a row"),
        (["edit", "--attribute", "Male", "--strength", "1", "--lora", str(tmp_path), "--out", str(tmp_path / "b")],
         "neither a .safetensors LoRA file nor a folder"),
        (["edit", "--attribute", "Male", "--strength", "1", "--row", "1", "--debias", "Male", "--out",
          str(tmp_path / "b")], "cannot debias 'Male' against itself"),
        (["export", "--row", "5000", "--out", str(tmp_path / "c")], "--row 5000 is not a row"),
        (["export", "--out", str(tmp_path / "c")], "give exactly one of --row I"),
        (["export", "--row", "1", "--format", "onnx", "--out", str(tmp_path / "c")], "unknown --format onnx"),
        (["export", "--latent", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "c")], "is not a file"),
        (["export", "--latent", sample_dir, "--space", "pca", "--out", str(tmp_path / "c")],
         "is a vae latent but --space is pca"),
        (["export", "--row", "1", "--out", str(commands / "x")], "exists: choose another --out"),
    ]
    early = {0, 4, 5, 6, 11, 12}                 # argument errors, caught before anything is loaded
    for i, (args, msg) in enumerate(cases):
        assert main([*args, "--preview", "1", "--device", "cpu"]) == 1, args
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1]                  # after the loading bars of the pipeline, if it was loaded
        assert last.startswith("w2w: error: ") and msg in last, (args, err)
        assert i not in early or err == last, (args, err)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    # the same paths through the library
    (tmp_path / "z.safetensors").write_bytes(b"junk")
    with pytest.raises(W2WError, match="is not a safetensors file"):
        read_latent(tmp_path / "z.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(W2WError, match="holds no latent 'z'"):
        read_latent(tmp_path / "w.safetensors")
    save_file({"z": torch.zeros(1, 3)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(W2WError, match="does not say its space: pass --space"):
        export_to_folder(tmp_path / "d", pipe=pipe, spaces=S, latent=tmp_path / "k.safetensors")
    with pytest.raises(W2WError, match="has k=3 but the vae space has k=64"):
        export_to_folder(tmp_path / "d", pipe=pipe, spaces=S, latent=tmp_path / "k.safetensors", space="vae")
    with pytest.raises(W2WError, match="unknown --format \\(none\\)"):
        export_to_folder(tmp_path / "d", pipe=pipe, spaces=S, row=1, formats=())
    with pytest.raises(W2WError, match="--preview must be a number of images >= 1"):
        sample_to_folders(tmp_path / "d", pipe=pipe, spaces=S, space="pca", n=1, n_preview=0)
    with pytest.raises(W2WError, match="unknown space 'gan'"):
        sample_to_folders(tmp_path / "d", pipe=pipe, spaces=S, space="gan", n=1)
    with pytest.raises(W2WError, match="at least two identities"):
        interpolation_widget(pipe, S, {"a": S.dataset.rows([0])[0]})
    assert not (tmp_path / "d").exists()


def test_the_live_widget_draws_through_the_kernel(S, pipe):
    ends = {"held-out 0": S.dataset.rows(S.val_rows[:1])[0], "held-out 1": S.dataset.rows(S.val_rows[1:2])[0]}
    box = interpolation_widget(pipe, S, ends, steps=2, guidance=4.0)
    controls, image = box.children
    first = image.value
    assert first[:4] == b"\x89PNG"
    controls.children[3].value = 1.0                       # the position slider: redrawn through the kernel
    assert image.value != first
