"""Inversion: the objective against peft's one-at-a-time loss, CMA-ES's batched scoring, batch independence,
the exported files against diffusers and peft, the command, and a real inversion on the shipped mini world."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from PIL import Image

from w2wlib import W2WError, load_profile
from w2wlib.diffusion import ddpm_loss, training_scheduler
from w2wlib.dreambooth import encode_images, encode_prompts
from w2wlib.export import export_lora
from w2wlib.generate import generate
from w2wlib.images import load_images
from w2wlib.invert import InversionConfig, InversionObjective, invert, latent_masks
from w2wlib.lora import BatchedLora, LoraLayout
from w2wlib.lora_io import vector_to_state_dict
from w2wlib.spaces import PCASpace
from w2wlib.viz import to_tensor
from w2wlib.world.render import render_ids


@pytest.fixture(scope="module")
def pipe(micro_world):
    from w2wlib.world.pipeline import load_pipeline

    return load_pipeline(micro_world / "pipeline")


@pytest.fixture(scope="module")
def space(pipe):
    """A PCA space of random LoRA rows of the micro pipeline's layout (raw = standardised * 0.05)."""
    layout = LoraLayout.from_unet(pipe.unet)
    x = torch.randn(64, layout.dim, generator=torch.Generator().manual_seed(0))
    s = PCASpace.fit(x, k=8)
    s.set_standardisation(torch.zeros(layout.dim), torch.full((layout.dim,), 0.05))
    return s


@pytest.fixture(scope="module")
def images():
    imgs, masks = render_ids([10**9 + 1, 10**9 + 2, 10**9 + 3], [7, 7, 7], return_mask=True)
    return to_tensor(imgs), torch.from_numpy(masks)


def _objective(pipe, space, images, cfg, keys=(0, 1, 2)):
    x, m = images
    lat = encode_images(pipe.vae, x[:len(keys)])
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [cfg.prompt])
    return InversionObjective(space, pipe.unet, training_scheduler(pipe), lat, cond,
                              masks=latent_masks(m[:len(keys)], lat.shape[-1]), keys=list(keys), cfg=cfg)


def test_objective_equals_peft_one_candidate_at_a_time(pipe, space, images):
    """N candidates scored in one UNet pass == each candidate's LoRA loaded by peft, scored alone."""
    cfg = InversionConfig(timesteps=3)
    obj = _objective(pipe, space, images, cfg)
    u = torch.randn(5, space.latent_dim, generator=torch.Generator().manual_seed(1))
    image = torch.tensor([0, 2, 1, 0, 2])
    with BatchedLora.attached_to(pipe.unet, obj.layout) as bank, torch.no_grad():
        batched = obj.loss(u, image, step=4, bank=bank)                                  # [5]
    t, noise = obj.draws(4)                                                              # [G, T], [G, T, c, h, w]
    peft_unet = get_peft_model(copy.deepcopy(pipe.unet), LoraConfig(r=1, lora_alpha=27, target_modules=["to_q", "to_v"]))
    W = obj.weights(u)
    for n in range(5):
        res = set_peft_model_state_dict(peft_unet, vector_to_state_dict(W[n].detach(), obj.layout, prefix="base_model.model."))
        assert not res.unexpected_keys
        g = int(image[n])
        x0 = obj.latents[g].expand(3, -1, -1, -1)
        noisy = obj.sched.add_noise(x0, noise[g], t[g])
        with torch.no_grad():
            pred = peft_unet(noisy, t[g], encoder_hidden_states=obj.cond.expand(3, -1, -1)).sample
        m = obj.masks[g]
        ref = (((pred - noise[g]) ** 2 * m).sum((1, 2, 3)) / (m.sum() * pred.shape[1])).mean()
        assert float(batched[n]) == pytest.approx(float(ref), rel=1e-4), n
    # and ddpm_loss without a mask is the plain mean
    err = ddpm_loss(pipe.unet, obj.sched, obj.latents[:1], noise[0, :1], t[0, :1], obj.cond)
    with torch.no_grad():
        plain = (pipe.unet(obj.sched.add_noise(obj.latents[:1], noise[0, :1], t[0, :1]), t[0, :1],
                           encoder_hidden_states=obj.cond).sample - noise[0, :1]).pow(2).mean()
    assert float(err.detach()) == pytest.approx(float(plain), rel=1e-5)


def test_cmaes_population_scored_in_one_pass_equals_one_at_a_time(pipe, space, images):
    cfg = InversionConfig(method="cmaes", timesteps=2)
    obj = _objective(pipe, space, images, cfg)
    u = torch.randn(6, space.latent_dim, generator=torch.Generator().manual_seed(2))
    image = torch.tensor([0, 0, 0, 1, 1, 1])
    with BatchedLora.attached_to(pipe.unet, obj.layout) as bank, torch.no_grad():
        together = obj.loss(u, image, 0, bank)
        alone = torch.cat([obj.loss(u[n:n + 1], image[n:n + 1], 0, bank) for n in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["gradient", "cmaes"])
def test_an_image_inverts_the_same_alone_or_in_a_batch(pipe, space, images, method):
    cfg = InversionConfig(method=method, steps=4, timesteps=2, popsize=6, lr=0.3)
    x, m = images
    both = invert(pipe, space, x[:2], cfg=cfg, masks=m[:2], keys=[11, 12], progress=False)
    solo = invert(pipe, space, x[1:2], cfg=cfg, masks=m[1:2], keys=[12], progress=False)
    torch.testing.assert_close(both.z[1:], solo.z, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(both.z[0], both.z[1]) and len(both.history) == 4
    assert both.W.shape == (2, space.dim) and both.seconds > 0
    # the loss history is per image, and the answer moved off the start
    assert len(both.history[0]["loss"]) == 2 and both.z.abs().sum() > 0


def test_exported_files_load_in_diffusers_and_peft(pipe, space, tmp_path):
    layout = LoraLayout.from_unet(pipe.unet)
    z = space.sample(1, torch.Generator().manual_seed(3))
    w = space.decode_weights(z)[0]
    strip = np.zeros((64, 128, 3), np.uint8)
    folder = export_lora(tmp_path / "m", w, layout, z=z[0], space="pca", preview=strip, info={"a": 1})
    assert sorted(p.name for p in folder.iterdir()) == ["info.json", "latent.safetensors", "peft", "preview.png",
                                                       "pytorch_lora_weights.safetensors"]
    assert Image.open(folder / "preview.png").size == (128, 64)
    kw = dict(prompt="a photo of sks person", n_per_row=2, seed=5, steps=3)
    ours = generate(pipe, w[None], layout=layout, **kw)
    pipe.load_lora_weights(str(folder), adapter_name="exported")
    try:
        theirs = generate(pipe, None, **kw)
    finally:
        pipe.unload_lora_weights()
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 2
    peft_model = PeftModel.from_pretrained(copy.deepcopy(pipe.unet), str(folder / "peft"))
    e = layout.entries[0]
    assert torch.equal(peft_model.base_model.model.get_submodule(e.module).lora_B["default"].weight,
                       w[e.b_slice].view(e.b_shape))
    with pytest.raises(W2WError, match="exists: choose another --out"):
        export_lora(folder, w, layout)
    with pytest.raises(W2WError, match="NaN or inf"):
        export_lora(tmp_path / "nan", torch.full_like(w, float("nan")), layout)
    assert not (tmp_path / "nan").exists() and not list(tmp_path.glob(".nan*"))
    with pytest.raises(W2WError, match="wrong base model"):
        export_lora(tmp_path / "short", w[:10], layout)
    with pytest.raises(W2WError, match="unknown format 'onnx'"):
        export_lora(tmp_path / "fmt", w, layout, formats=("onnx",))


def test_load_images_converts_what_is_safe_and_refuses_the_rest(tmp_path):
    face = render_ids([10**9 + 4], [1])[0]
    Image.fromarray(face).resize((128, 128)).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(face).convert("RGBA").save(tmp_path / "rgba.png")
    out = load_images([tmp_path / "gray.png", tmp_path / "rgba.png", face, face.astype(np.float32) / 255], size=64)
    assert out.shape == (4, 64, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out[1], face) and np.array_equal(out[2], face)
    assert (out[0][..., 0] == out[0][..., 1]).all()                    # gray stays gray in RGB
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(face).crop((0, 0, 64, 40)).save(tmp_path / "wide.png")
    for item, msg in ((tmp_path / "text.png", "is not an image that PIL can read"),
                      (tmp_path / "missing.png", "is not a file"),
                      (tmp_path / "wide.png", "not square: crop it"),
                      (face.astype(np.float32), r"floats must lie in \[0, 1\]"),
                      (face.astype(np.int64), "pass uint8"),
                      (np.zeros((5, 64, 64, 3), np.uint8), "expected an image")):
        with pytest.raises(W2WError, match=msg):
            load_images([item], size=64)
    with pytest.raises(W2WError, match="no images given"):
        load_images([], size=64)


def test_invert_refuses_bad_input(pipe, space, images):
    x, _ = images
    for bad, msg in ((x * 2, r"in \[-1, 1\]"), (x[:, :, :32, :32], "this pipeline draws 64x64"),
                     (x[:, 0], "float \\[G, 3, H, W\\]")):
        with pytest.raises(W2WError, match=msg):
            invert(pipe, space, bad, progress=False)
    with pytest.raises(W2WError, match="u0 has shape"):
        invert(pipe, space, x[:1], u0=torch.zeros(2, 3), progress=False)
    with pytest.raises(W2WError, match="choose gradient or cmaes"):
        InversionConfig(method="adam")
    with pytest.raises(W2WError, match="t_range"):
        InversionConfig(t_range=(0, 2000))
    with pytest.raises(W2WError, match="k=99 but this PCASpace has 8"):
        invert(pipe, space, x[:1], cfg=InversionConfig(k=99), progress=False)


def test_gradient_inversion_on_the_mini_world_beats_the_base_model(S, shipped_pipe):
    """On the shipped mini world: two held-out faces, inverted into the PCA, draw their person better than the base."""
    from w2wlib.metrics import identity_scores
    from w2wlib.world.encoder import load_encoder
    from w2wlib.world.render import EVAL_VIEWS, identity_views

    pipe = shipped_pipe
    enc = load_encoder(load_profile("mini").path("world_dir") / "identity_encoder")
    seeds = S.dataset.held_out_seeds[:2]
    imgs, masks = render_ids(seeds, [500, 500], return_mask=True)
    layout = S.dataset.lora_layout(pipe.unet)
    res = invert(pipe, S.pca, to_tensor(imgs), masks=torch.from_numpy(masks), layout=layout, progress=False,
                 cfg=InversionConfig(steps=60, k=64, lr=0.1))
    refs = identity_views(seeds, 4, EVAL_VIEWS)
    kw = dict(n_per_row=4, seed=1, steps=15, layout=layout)
    inverted = identity_scores(enc, generate(pipe, res.W, **kw), refs, 4, 4)
    base = identity_scores(enc, generate(pipe, torch.zeros_like(res.W), **kw), refs, 4, 4)
    assert float(inverted.mean()) > float(base.mean()) + 0.05, (inverted, base)
    first, last = np.mean(res.history[0]["loss"]), np.mean([np.mean(h["loss"]) for h in res.history[-10:]])
    assert last < first


def test_run_comparison_scores_every_row_as_the_separate_calls_do(S, shipped_pipe):
    """The chapter's and the benchmark's one call: its rows equal invert + score_models made by hand."""
    from w2wlib.invert import comparison_methods
    from w2wlib.invert.evaluate import run_comparison, score_models
    from w2wlib.world.encoder import load_encoder
    from w2wlib.world.render import EVAL_VIEWS, identity_views

    pipe, enc = shipped_pipe, load_encoder(load_profile("mini").path("world_dir") / "identity_encoder")
    seeds = S.dataset.held_out_seeds[:2]
    inputs, masks = render_ids(seeds, [500, 500], return_mask=True)
    refs = identity_views(seeds, 1, EVAL_VIEWS)
    layout = S.dataset.lora_layout(pipe.unet)
    sizes = dict(steps=2, w2w_steps=2, generations=1)
    cmp = run_comparison(pipe, enc, S, inputs, masks, refs, seeds, **sizes, n_ceiling=1, ceiling_steps=1,
                         n_images=1, inference_steps=2, layout=layout, amortised_steps=1)
    methods = comparison_methods(S.vae.latent_dim, **sizes)
    amortised = {f"{sp.upper()}, amortised{more}": sp for sp in ("pca", "vae") for more in ("", " + 1 steps")}
    assert list(cmp.results) == [*methods, *amortised]               # the shipped spaces ship both inverters
    assert cmp.spaces == {**{n: sp for n, (sp, _) in methods.items()}, **amortised}
    assert list(cmp.scores)[len(cmp.results):] == ["floor: base model", "floor: another identity's inversion",
                                               "DreamBooth on the one input (unconstrained)"]
    name = "PCA, gradient (w2w's recipe)"
    space, cfg = methods[name]
    res = invert(pipe, S.space(space), to_tensor(inputs), cfg=cfg, masks=torch.from_numpy(masks), keys=seeds,
                 layout=layout, progress=False)
    torch.testing.assert_close(cmp.results[name].W, res.W)
    ref = score_models(pipe, enc, res.W, refs, inputs, layout=layout, **cmp.score_kw)
    torch.testing.assert_close(cmp.scores[name]["id"], ref["id"])
    base = score_models(pipe, enc, None, refs, inputs, **cmp.score_kw)
    torch.testing.assert_close(cmp.scores["floor: base model"]["id"], base["id"])
    rows = cmp.rows()
    assert len(rows) == len(cmp.results) + 4 and rows[-1][0] == cmp.ceiling_name and cmp.n_ceiling == 1
    record = cmp.record(seeds)
    assert record["best"] == cmp.best and [m["name"] for m in record["methods"]] == list(cmp.results)
    assert cmp.ceiling_name in record["references"] and record["n"] == 2
    with_record = cmp.rows(record)                   # a last column: the same row's ID in a recorded run
    assert [r[-1] for r in with_record] == [*(m["id_mean"] for m in record["methods"]),
                                            *(v["id_mean"] for v in record["references"].values())]


def test_w2w_invert_command(tmp_path):
    """`w2w invert` on a render and on a user's grayscale PNG, into the shipped spaces."""
    from w2wlib.cli import main

    face = render_ids([10**9 + 9], [2])[0]
    Image.fromarray(face).save(tmp_path / "render.png")
    Image.fromarray(face).resize((100, 100)).convert("L").save(tmp_path / "mine.png")
    out = tmp_path / "out"
    args = ["invert", str(tmp_path / "render.png"), str(tmp_path / "mine.png"), "--space", "pca", "--steps", "3",
            "--k", "8", "--preview", "2", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    for name in ("render", "mine"):
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == ["info.json", "latent.safetensors", "peft", "preview.png", "pytorch_lora_weights.safetensors"]
        info = json.loads((out / name / "info.json").read_text())
        assert info["space"] == "pca" and info["inversion"]["k"] == 8 and info["inversion"]["steps"] == 3
        assert Image.open(out / name / "preview.png").size == (3 * 65 + 1, 66)
    assert main(args) == 1                                     # the folders exist now
    (tmp_path / "file").write_text("x")
    assert main([*args[:-4], "--out", str(tmp_path / "file"), "--device", "cpu"]) == 1


def test_w2w_invert_amortised_command(tmp_path, capsys):
    """`w2w invert --method amortised`: the shipped inverter's one forward pass (or that answer refined), written
    as the other methods write; without a shipped inverter, or with --k, one line that says the fix."""
    from safetensors.torch import load_file

    from w2wlib.cli import main
    from w2wlib.invert.amortised import AmortisedConfig, AmortisedInverter, predict_inversion
    from w2wlib.spaces.shipped import open_spaces

    shipped = load_profile("mini")
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    for part in ("pca", "vae", "split.json", "manifest.json"):
        (spaces / part).symlink_to(shipped.path("spaces_dir") / part)
    net = AmortisedInverter(AmortisedConfig(space="pca", k=8, channels=(8, 8)))
    net.save(spaces / "amortised" / "pca")
    profile = tmp_path / "p.yaml"
    profile.write_text(f"settings:\n  world_dir: {shipped.path('world_dir')}\n  dataset_dir: {shipped.path('dataset_dir')}\n"
                       f"  spaces_dir: {spaces}\n  device: cpu\n")
    face = render_ids([10**9 + 9], [2])[0]
    Image.fromarray(face).save(tmp_path / "face.png")
    base = ["invert", str(tmp_path / "face.png"), "--space", "pca", "--method", "amortised", "--preview", "2",
            "--profile", str(profile)]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    S = open_spaces(spaces, shipped.path("dataset_dir"))
    want = predict_inversion(S.pca, AmortisedInverter.load(spaces / "amortised" / "pca"), load_images([tmp_path / "face.png"], 64))
    got = load_file(str(tmp_path / "a" / "face" / "latent.safetensors"))
    torch.testing.assert_close(next(iter(got.values())).reshape(1, -1), want.z)
    info = json.loads((tmp_path / "a" / "face" / "info.json").read_text())
    assert info["inversion"]["method"] == "amortised" and info["inversion"]["k"] == 8
    assert main([*base, "--steps", "2", "--out", str(tmp_path / "b")]) == 0          # refined by 2 gradient steps
    info = json.loads((tmp_path / "b" / "face" / "info.json").read_text())
    assert info["inversion"]["method"] == "amortised + 2 gradient steps" and info["inversion"]["steps"] == 2
    refined = next(iter(load_file(str(tmp_path / "b" / "face" / "latent.safetensors")).values())).reshape(1, -1)
    assert not torch.equal(refined, want.z) and torch.equal(refined[:, 8:], want.z[:, 8:])   # only the net's k moved
    capsys.readouterr()
    assert main([*base, "--k", "4", "--out", str(tmp_path / "c")]) == 1
    assert "takes neither --recipe nor --k" in capsys.readouterr().err
    assert main([*base[:3], "vae", *base[4:], "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "no amortised inverter for the vae space" in err and "w2w spaces build" in err
    assert not (tmp_path / "c").exists()
    assert main([*base, "--scale", "2.5", "--out", str(tmp_path / "d")]) == 0       # the answer, scaled
    far = next(iter(load_file(str(tmp_path / "d" / "face" / "latent.safetensors")).values())).reshape(1, -1)
    torch.testing.assert_close(far, predict_inversion(S.pca, AmortisedInverter.load(spaces / "amortised" / "pca"),
                                                      load_images([tmp_path / "face.png"], 64), scale=2.5).z)
    capsys.readouterr()
    assert main(["invert", str(tmp_path / "face.png"), "--scale", "2", "--out", str(tmp_path / "e"),
                 "--profile", str(profile)]) == 1
    assert "--scale applies to --method amortised only" in capsys.readouterr().err and not (tmp_path / "e").exists()


# --------------------------------------------------------------------------- amortised

def _toy(n=40, v=3, k=3, seed=0):
    """Images whose colour encodes the target: a learnable map, [N, V, 16, 16, 3] uint8 and [N, k]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, k, generator=g) * 2 - 1
    base = ((y + 1) * 127.5).round().to(torch.uint8)                               # colour = the targets
    imgs = base[:, None, None, None, :].expand(n, v, 16, 16, 3).clone()
    noise = torch.randint(0, 8, imgs.shape, generator=g, dtype=torch.uint8)
    return (imgs // 2 + noise).numpy(), y


def test_amortised_inverter_learns_and_resumes_exactly(tmp_path, monkeypatch):
    from w2wlib.invert import amortised as A

    images, y = _toy()
    cfg = A.AmortisedConfig(k=3, channels=(8, 8), steps=60, batch=16, lr=1e-2, warmup=5, val_every=20,
                            checkpoint_every=30)
    rows, val = torch.arange(30), torch.arange(30, 40)
    straight = A.AmortisedInverter(cfg)
    hist = A.train_amortised(straight, images, y, rows, val, out_dir=tmp_path / "a", progress=False)
    assert hist[-1]["val_mse"] < 0.5 * hist[-1]["val_mse_of_zero"]               # it learnt the colour map
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    real = A.os.replace

    def die(src, dst):
        real(src, dst)
        raise KeyboardInterrupt("killed after the checkpoint")
    monkeypatch.setattr(A.os, "replace", die)
    with pytest.raises(KeyboardInterrupt, match="killed after the checkpoint"):
        A.train_amortised(A.AmortisedInverter(cfg), images, y, rows, val, out_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(A.os, "replace", real)
    resumed = A.AmortisedInverter(cfg)
    hist_b = A.train_amortised(resumed, images, y, rows, val, out_dir=tmp_path / "b", progress=False)
    assert hist_b == hist
    for (k1, a), (k2, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert k1 == k2 and torch.equal(a, b), k1
    loaded = A.AmortisedInverter.load(tmp_path / "b")
    x = torch.from_numpy(images[:2, 0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(loaded.predict(x), resumed.predict(x)) and loaded.config == cfg
    # the same images as uint8 HWC give the same answer
    assert torch.equal(loaded.predict(images[:2, 0]), loaded.predict(x))
    other = A.AmortisedConfig(k=3, channels=(8, 8), steps=61, batch=16)
    torch.save({"config": "{}"}, tmp_path / "b" / "checkpoint.pt")
    with pytest.raises(W2WError, match="written with another config: remove it"):
        A.train_amortised(A.AmortisedInverter(other), images, y, rows, val, out_dir=tmp_path / "b", progress=False)
    with pytest.raises(W2WError, match=r"targets must be finite \[40, 3\]"):
        A.train_amortised(A.AmortisedInverter(cfg), images, y[:, :2], rows, val, progress=False)
    with pytest.raises(W2WError, match=r"images must be uint8 \[N, V, H, W, 3\]"):
        A.train_amortised(A.AmortisedInverter(cfg), images[:, 0], y, rows, val, progress=False)
    with pytest.raises(W2WError, match="in \\[-1, 1\\]"):
        loaded.predict(x * 3)
    with pytest.raises(W2WError, match="build it with `w2w spaces build`"):
        A.AmortisedInverter.load(tmp_path / "nothing")
    with pytest.raises(W2WError, match="space must be pca or vae"):
        A.AmortisedConfig(space="ica")


def test_amortised_answer_decodes_like_an_inversion_and_seeds_one(pipe, space, images):
    from w2wlib.invert.amortised import AmortisedConfig, AmortisedInverter, predict_inversion

    net = AmortisedInverter(AmortisedConfig(space="pca", k=4, channels=(8, 8)))
    x, m = images
    res = predict_inversion(space, net, x[:2])
    mean, std = space.coeff_mean, space.coeff_std
    assert torch.equal(res.z[:, 4:], mean[4:].expand(2, -1)) and res.u.shape == (2, 4)
    torch.testing.assert_close(res.z[:, :4], mean[:4] + std[:4] * net.predict(x[:2]))
    torch.testing.assert_close(res.W, space.decode_weights(res.z))
    # the same point as a 0-step-like start of a k=4 inversion: its first loss is the amortised answer's
    cfg = InversionConfig(k=4, steps=1, lr=1e-12, timesteps=1)
    seeded = invert(pipe, space, x[:2], cfg=cfg, masks=m[:2], u0=res.u, progress=False)
    torch.testing.assert_close(seeded.z, res.z, atol=1e-5, rtol=1e-5)
    with pytest.raises(W2WError, match="predicts 9 dimensions but the space has 8"):
        predict_inversion(space, AmortisedInverter(AmortisedConfig(k=9, channels=(8,))), x[:1])
    # scale: the whitened answer moves away from the mean identity by that factor, the rest stays at the mean
    far = predict_inversion(space, net, x[:2], scale=2.5)
    torch.testing.assert_close(far.u, 2.5 * res.u)
    torch.testing.assert_close(far.z[:, :4] - mean[:4], 2.5 * (res.z[:, :4] - mean[:4]))
    assert torch.equal(far.z[:, 4:], res.z[:, 4:])
    for bad in (0, -1.0, float("nan"), "2"):
        with pytest.raises(W2WError, match="scale must be a finite number > 0"):
            predict_inversion(space, net, x[:1], scale=bad)


def test_merging_shard_records_equals_scoring_all_identities_at_once():
    """benchmarks/p3_inversion.py's shards: the merged means are the means over every identity, the ceiling keeps
    only the identities it ran on, and mismatched or overlapping shards are refused."""
    from w2wlib.invert.evaluate import merge_records

    rng = np.random.default_rng(0)

    def shard(seeds, ceiling):
        ids = {name: rng.uniform(-0.1, 0.9, len(seeds)).tolist() for name in ("PCA", "VAE", "floor", "ceiling")}
        refs = {"floor: base model": {"id_mean": float(np.mean(ids["floor"])), "id": ids["floor"]}}
        if ceiling:
            refs[f"ceiling: DreamBooth on 8 views ({ceiling} identities)"] = {
                "id_mean": float(np.mean(ids["ceiling"][:ceiling])), "id": ids["ceiling"][:ceiling]}
        methods = [{"name": n, "space": n.lower(), "config": {}, "seconds_per_image": 1.0 + len(seeds),
                    "id_mean": float(np.mean(ids[n])), "id": ids[n], "id_input_mean": 0.5} for n in ("PCA", "VAE")]
        return {"n": len(seeds), "identity_seeds": seeds, "methods": methods, "references": refs}

    a, b = shard([1, 2, 3, 4], 2), shard([5, 6], 0)
    out = merge_records([a, b])
    assert out["n"] == 6 and out["identity_seeds"] == [1, 2, 3, 4, 5, 6] and out["shards"] == 2
    for i, m in enumerate(out["methods"]):
        every = a["methods"][i]["id"] + b["methods"][i]["id"]
        assert m["id"] == every and m["id_mean"] == pytest.approx(np.mean(every))
        assert m["seconds_per_image"] == pytest.approx((4 * 5.0 + 2 * 3.0) / 6)     # weighted by identities
    assert out["references"]["floor: base model"]["id"] == a["references"]["floor: base model"]["id"] + \
        b["references"]["floor: base model"]["id"]
    ceiling = out["references"]["ceiling: DreamBooth on 8 views (2 identities)"]
    best = max(out["methods"], key=lambda m: m["id_mean"])
    assert out["best"] == best["name"]
    assert out["best_over_ceiling"] == pytest.approx(np.mean(best["id"][:2]) / ceiling["id_mean"])
    with pytest.raises(W2WError, match="no shard records"):
        merge_records([])
    with pytest.raises(W2WError, match="overlap"):
        merge_records([a, shard([4, 7], 0)])
    c = shard([8], 0)
    c["methods"] = c["methods"][:1]
    with pytest.raises(W2WError, match="different methods"):
        merge_records([a, c])


def test_target_checks_read_issue_13s_targets_off_a_record():
    """Each target is met exactly when its inequality holds on the record's figures."""
    from w2wlib.invert.evaluate import target_checks

    def rec(vae_id, vae_s, am_s, am_id, ratio):
        row = lambda name, space, i, s: {"name": name, "space": space, "id_mean": i, "seconds_per_image": s}  # noqa: E731
        return {"methods": [row("PCA, gradient (w2w's recipe)", "pca", 0.70, 10.0), row("PCA, gradient (ours)", "pca", 0.72, 5.0),
                            row("VAE, gradient (w2w++: AdamW lr 1e-4)", "vae", 0.99, 0.1),   # never the VAE's pick
                            row("VAE, gradient (ours)", "vae", vae_id, vae_s), row("VAE, amortised", "vae", am_id, am_s)],
                "best": "PCA, gradient (ours)", "best_over_ceiling": ratio}

    met = [r[2] for r in target_checks(rec(0.70, 2.0, 0.02, 0.64, 0.8))]
    assert met == ["yes", "yes", "yes"]
    assert [r[2] for r in target_checks(rec(0.69, 2.0, 0.02, 0.64, 0.8))][0] == "no"     # ID below the baseline's
    assert [r[2] for r in target_checks(rec(0.70, 2.01, 0.02, 0.64, 0.8))][0] == "no"    # more than 1/5 of its time
    assert [r[2] for r in target_checks(rec(0.70, 2.0, 0.021, 0.64, 0.8))][1] == "no"    # under 100x faster
    assert [r[2] for r in target_checks(rec(0.70, 2.0, 0.02, 0.62, 0.8))][1] == "no"     # under 90 % of the ID
    assert [r[2] for r in target_checks(rec(0.70, 2.0, 0.02, 0.64, 0.79))][2] == "no"
    assert "VAE, gradient (ours): ID 0.700" in target_checks(rec(0.70, 2.0, 0.02, 0.64, 0.8))[0][1]
    with pytest.raises(W2WError, match="baseline"):
        target_checks({"methods": [], "best_over_ceiling": None})


def test_load_people_reads_a_folder_of_photos_or_of_people(tmp_path):
    from PIL import Image

    from w2wlib.images import load_people

    rng = np.random.default_rng(0)

    def photo(path, size=80):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)

    for name in ("b.png", "a.jpg"):
        photo(tmp_path / "flat" / name)
    (tmp_path / "flat" / "notes.txt").write_text("not a photo")
    inputs, refs, names = load_people(tmp_path / "flat", 64)
    assert inputs.shape == (2, 64, 64, 3) and names == ["a", "b"] and np.array_equal(refs, inputs)
    for person, n in (("ann", 3), ("bob", 4)):
        for i in range(n):
            photo(tmp_path / "people" / person / f"{i}.png")
    inputs, refs, names = load_people(tmp_path / "people", 64)
    assert names == ["ann", "bob"] and inputs.shape == (2, 64, 64, 3) and refs.shape == (4, 64, 64, 3)   # m = 2 each
    assert np.array_equal(inputs[1], load_images([tmp_path / "people/bob/0.png"], 64)[0])
    assert np.array_equal(refs[2:], load_images([tmp_path / f"people/bob/{i}.png" for i in (1, 2)], 64))
    photo(tmp_path / "people" / "cy" / "0.png")
    with pytest.raises(W2WError, match=r"1 person folder\(s\) .* fewer than 2 images \(cy\)"):
        load_people(tmp_path / "people", 64)
    with pytest.raises(W2WError, match="is not a folder: give a folder of face photos"):
        load_people(tmp_path / "nowhere", 64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(W2WError, match="holds no images"):
        load_people(tmp_path / "empty", 64)
    photo(tmp_path / "wide" / "w.png")
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(tmp_path / "wide" / "w.png")
    with pytest.raises(W2WError, match="not square"):
        load_people(tmp_path / "wide", 64)
