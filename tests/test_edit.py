"""Attribute editing: the least-squares direction against torch.linalg.lstsq, debiasing against the projection
formula, edits in both spaces, w2w's timestep switch against a step-end-callback reference, the edit scores
against hand counts, and every error path."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from w2wlib import W2WError, load_profile
from w2wlib.edit import (AttributeDirections, Direction, debias_direction, edit_scores, edit_weights,
                         least_squares_direction, read_lora)
from w2wlib.generate import generate, image_generator
from w2wlib.lora import BatchedLora
from w2wlib.world.render import ATTRIBUTES


@pytest.fixture(scope="module")
def pipe(shipped_pipe):
    return shipped_pipe


@pytest.fixture(scope="module")
def dirs(S):
    """Directions fit on the first 600 training rows of each shipped space (the full split in the chapter)."""
    return {name: AttributeDirections.fit(S, name, rows=S.train_rows[:600]) for name in ("pca", "vae")}


def _data(n=300, k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64)
    labels = {"A": (z[:, 0] + 0.3 * torch.randn(n, generator=g, dtype=torch.float64) > 0).numpy().astype(np.uint8),
              "B": (z[:, 0] + z[:, 1] > 0).numpy().astype(np.uint8),
              "C": (z[:, 2] - z[:, 0] > 0.2).numpy().astype(np.uint8)}
    return z, labels


def test_least_squares_direction_equals_lstsq():
    z, labels = _data()
    for y in labels.values():
        ref = torch.linalg.lstsq(z, torch.as_tensor(y, dtype=torch.float64)[:, None]).solution[:, 0]
        torch.testing.assert_close(least_squares_direction(z, y), ref, rtol=1e-9, atol=1e-10)
    d = AttributeDirections("pca", z, labels)           # one pseudo-inverse serves every attribute
    ref = torch.linalg.lstsq(z, torch.as_tensor(labels["B"], dtype=torch.float64)[:, None]).solution[:, 0]
    torch.testing.assert_close(d.raw("B"), ref, rtol=1e-9, atol=1e-10)
    raw = d.direction("B", None)
    assert raw.debiased == () and torch.equal(raw.vector, d.raw("B"))
    assert raw.unit_std == pytest.approx(float((z @ (ref / ref.norm())).std()), rel=1e-9)


def test_debiasing_leaves_the_direction_orthogonal_to_the_debiased_ones():
    z, labels = _data()
    d = AttributeDirections("vae", z, labels)
    one = d.direction("A", ["B"])
    a, b = d.raw("A"), d.raw("B")
    torch.testing.assert_close(one.vector, a - (a @ b) / (b @ b) * b)     # w2w's formula for one attribute
    both = d.direction("A", ["B", "C"])
    for other in ("B", "C"):
        assert abs(float(both.vector @ d.raw(other))) < 1e-10 * float(both.vector.norm() * d.raw(other).norm())
    assert both.debiased == ("B", "C") and d.direction("A", "B").debiased == ("B",)
    # a dependent other direction adds nothing to project out
    torch.testing.assert_close(debias_direction(a, torch.stack([b, 2 * b])), one.vector)
    torch.testing.assert_close(debias_direction(a, torch.zeros(0, len(a))), a)
    assert set(d.correlated("A", 0.3)) >= {"B"} and "A" not in d.correlated("A", 0.0)


def test_directions_of_the_shipped_spaces_predict_their_label(S, dirs):
    val = S.val_rows[:200]
    y = S.dataset.attributes["Male"][val.numpy()]
    for name, d in dirs.items():
        direction = d.direction("Male")
        assert d.z.shape == (600, S.space(name).latent_dim) and "Beard" in direction.debiased
        z_val = S.space(name).encode_weights(S.dataset.rows(val)).detach().double().cpu()
        score = (z_val @ direction.unit).numpy()
        assert score[y == 1].mean() > score[y == 0].mean(), name   # held-out rows: men score higher


def test_an_edit_moves_the_latent_by_strength_dataset_stds(S, dirs):
    W = S.dataset.rows(S.val_rows[:3])
    for name, d in dirs.items():
        space, direction = S.space(name), d.direction("Beard")
        same, _ = edit_weights(space, W, direction, 0.0)
        assert torch.equal(same, W)                                              # strength 0 is the model itself
        W_edit, z_edit = edit_weights(space, W, direction, torch.tensor([1.0, -2.0, 3.0]))
        z = space.encode_weights(W).cpu()
        moved = (z_edit - z).double()
        torch.testing.assert_close(moved, torch.tensor([[1.0], [-2.0], [3.0]], dtype=torch.float64)
                                   * direction.unit_std * direction.unit[None], rtol=1e-4, atol=1e-4)
        dec = space.decode_weights
        torch.testing.assert_close(W_edit, W + dec(z_edit).cpu() - dec(z).cpu())
        W_proj, _ = edit_weights(space, W, direction, 1.0, keep_residual=False)
        torch.testing.assert_close(W_proj, dec(z + direction.step(1.0).float()).cpu())
    # the PCA is linear: the edit adds the direction mapped back to raw weights
    pca, direction = S.pca, dirs["pca"].direction("Beard")
    W_edit, _ = edit_weights(pca, W, direction, 2.0)
    delta = (direction.step(2.0).float() @ pca.components.T) * pca.std
    torch.testing.assert_close(W_edit - W, delta.expand_as(W), rtol=1e-4, atol=1e-5)


class _Reference:
    """The timestep switch by another mechanism: the pipeline's step-end callback swaps the rows."""

    def __init__(self, pipe, bank, edited, switch_t):
        self.pipe, self.bank, self.edited, self.switch_t = pipe, bank, edited, switch_t
        self.stack, self.on = contextlib.ExitStack(), False

    def __call__(self, pipe, i, t, kwargs):
        ts = pipe.scheduler.timesteps
        if not self.on and i + 1 < len(ts) and int(ts[i + 1]) <= self.switch_t:
            self.stack.enter_context(self.bank.use(self.edited))
            self.on = True
        return kwargs


def test_timestep_switch_equals_the_edited_or_original_weights_at_the_extremes(S, pipe, dirs):
    layout = S.dataset.lora_layout(pipe.unet)
    W = S.dataset.rows(S.val_rows[:2])
    W_edit, _ = edit_weights(S.vae, W, dirs["vae"].direction("Beard"), 12.0)
    kw = dict(n_per_row=2, steps=4, seed=3, layout=layout)
    original, edited = generate(pipe, W, **kw), generate(pipe, W_edit, **kw)
    assert not np.array_equal(original, edited)
    assert np.array_equal(generate(pipe, W, edited=W_edit, switch_t=1000, **kw), edited)   # every step edited
    assert np.array_equal(generate(pipe, W, edited=W_edit, switch_t=0, **kw), original)    # no step (last t is 1)
    switched = generate(pipe, W, edited=W_edit, switch_t=600, **kw)                       # t = 751 original only
    assert not np.array_equal(switched, original) and not np.array_equal(switched, edited)
    # the reference: the same switch made by a step-end callback, one row at a time
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with BatchedLora.attached_to(pipe.unet, layout) as bank:
        for g in range(2):
            for j in range(2):
                ref = _Reference(pipe, bank, W_edit[g:g + 1], 600)
                pipe.scheduler.set_timesteps(4)
                first = int(pipe.scheduler.timesteps[0])
                with bank.use(W[g:g + 1]), ref.stack:
                    assert first > 600                                      # the first step stays original
                    img = pipe(prompt="a photo of sks person", num_inference_steps=4, height=size, width=size,
                               guidance_scale=4.0, output_type="np", generator=image_generator(3, j),
                               callback_on_step_end=ref).images[0]
                assert ref.on
                img = (img * 255).round().astype(np.uint8)
                assert np.abs(img.astype(int) - switched[g * 2 + j].astype(int)).max() <= 1
    assert not any(getattr(m, BatchedLora._ATTR, None) for m in pipe.unet.modules())   # nothing left attached


def test_edit_comparison_edits_held_out_models_that_lack_it_and_strength_0_is_the_unedited_model(S, pipe, dirs):
    from w2wlib.edit import comparison_rows, edit_comparison, plot_tradeoff
    from w2wlib.world.encoder import load_encoder

    enc = load_encoder(load_profile("mini").path("world_dir") / "identity_encoder")
    layout = S.dataset.lora_layout(pipe.unet)
    res = edit_comparison(pipe, enc, S, ["Beard"], [0, 6], n_rows=2, n_images=1, directions=dirs, steps=3,
                          layout=layout)
    assert sorted(res) == [("Beard", "pca"), ("Beard", "vae")]
    val = S.val_rows.numpy()
    rows = [int(r) for r in S.val_rows[S.dataset.attributes["Beard"][val] == 0][:2]]
    unedited = generate(pipe, S.dataset.rows(rows), n_per_row=1, steps=3, seed=0, layout=layout)
    for name in ("pca", "vae"):
        zero, six = res["Beard", name]
        assert np.array_equal(zero["images"], unedited)                          # strength 0 draws the unedited rows
        assert zero["others_kept"] == 1.0 and zero["after_rate"] == zero["before_rate"]
        assert six["strength"] == 6.0 and not np.array_equal(six["images"], unedited)
    table = comparison_rows(res, " (live)")
    assert len(table) == 4 and table[0][:3] == ["Beard (live)", "PCA", "0"]
    assert len(plot_tradeoff(res, res).axes) == 1


class _FakeEncoder:
    """Attribute logits and unit embeddings looked up by image value (image i is filled with the value i)."""

    def __init__(self, logits, emb):
        self.logits, self.emb = logits, torch.nn.functional.normalize(emb, dim=1)

    def _idx(self, images):
        return torch.as_tensor(np.asarray(images)[:, 0, 0, 0].astype(np.int64))

    def predict_attributes(self, images):
        return self.logits[self._idx(images)]

    def embed(self, images):
        return self.emb[self._idx(images)]


def test_edit_scores_against_hand_counts():
    A = len(ATTRIBUTES)
    j, o = ATTRIBUTES.index("Beard"), ATTRIBUTES.index("Male")
    logits = -torch.ones(12, A)
    logits[[1, 5], j] = 1                           # before: images 0-3 (image 1 has a beard already)
    logits[[4, 5, 6], j] = 1                        # after: images 4-7 (4, 5, 6 bearded)
    logits[7, o] = 1                                # image 7 also turns male
    emb = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    enc = _FakeEncoder(logits, emb)
    imgs = lambda ids: np.stack([np.full((64, 64, 3), i, np.uint8) for i in ids])
    before, after, refs = imgs(range(4)), imgs(range(4, 8)), imgs(range(8, 12))
    s = edit_scores(enc, before, after, refs, "Beard", 1, n_per_row=2)
    assert s["flip_rate"] == pytest.approx(2 / 3)            # of 0, 2, 3 (no beard before): 4 and 6 flipped
    assert s["before_rate"] == 0.25 and s["after_rate"] == 0.75
    assert s["others_kept"] == pytest.approx(1 - 1 / (4 * (A - 1)))
    e = enc.emb
    ref_id = torch.stack([(e[4:6] @ e[8:10].T).mean(), (e[6:8] @ e[10:12].T).mean()]).mean()
    assert s["id_kept"] == pytest.approx(float(ref_id), rel=1e-6)
    removed = edit_scores(enc, before, after, refs, "Beard", 0, n_per_row=2)   # target: no beard
    assert removed["flip_rate"] == 0.0                  # image 1 kept its beard (image 5)
    with pytest.raises(W2WError, match="reads no attribute 'Halo'"):
        edit_scores(enc, before, after, refs, "Halo", 1, n_per_row=2)
    # a face scorer (no attribute head, as FaceNet for real photos): the identity kept alone, no readings
    class FaceOnly:
        embed = enc.embed

    face = edit_scores(FaceOnly(), before, after, refs, "Beard", 1, n_per_row=2)
    assert face["id_kept"] == s["id_kept"]
    assert all(np.isnan(face[k]) for k in ("flip_rate", "before_rate", "after_rate", "others_kept"))


def test_editing_refuses_bad_input(S, pipe, dirs, tmp_path):
    from w2wlib.edit import edit_to_folder

    z, labels = _data()
    with pytest.raises(W2WError, match="labels must be 0/1"):
        least_squares_direction(z, labels["A"] * 2.0)
    with pytest.raises(W2WError, match="latents \\[N, k\\] and N labels"):
        least_squares_direction(z, labels["A"][:10])
    with pytest.raises(W2WError, match="attribute 'A' has \\(5,\\) labels for 300 latents"):
        AttributeDirections("pca", z, {"A": labels["A"][:5]})
    d = AttributeDirections("pca", z, labels)
    with pytest.raises(W2WError, match="unknown attribute 'Smile': choose from A, B, C"):
        d.direction("Smile")
    with pytest.raises(W2WError, match="unknown attribute 'Smile'"):
        d.direction("A", ["Smile"])
    with pytest.raises(W2WError, match="cannot debias 'A' against itself"):
        d.direction("A", ["A", "B"])
    same = AttributeDirections("pca", z, {"A": labels["A"], "A2": labels["A"]})
    with pytest.raises(W2WError, match="vanishes once \\['A2'\\] are projected out"):
        same.direction("A", ["A2"])
    W = S.dataset.rows([0, 1])
    beard = dirs["pca"].direction("Beard")
    with pytest.raises(W2WError, match="strength must be one finite number or one per row \\(2\\)"):
        edit_weights(S.pca, W, beard, float("nan"))
    with pytest.raises(W2WError, match="one per row"):
        edit_weights(S.pca, W, beard, [1.0, 2.0, 3.0])
    with pytest.raises(W2WError, match="fit the direction in this space"):
        edit_weights(S.vae, W, beard, 1.0)
    layout = S.dataset.lora_layout(pipe.unet)
    with pytest.raises(W2WError, match="pass edited= and switch_t= together"):
        generate(pipe, W, edited=W, layout=layout)
    with pytest.raises(W2WError, match="pass edited= and switch_t= together"):
        generate(pipe, W, switch_t=500, layout=layout)
    with pytest.raises(W2WError, match="the base model has no weights to edit"):
        generate(pipe, None, edited=W, switch_t=500)
    with pytest.raises(W2WError, match="give one edited row per original row"):
        generate(pipe, W, edited=W[:1], switch_t=500, layout=layout)
    with pytest.raises(W2WError, match="switch_t must be a timestep number"):
        generate(pipe, W, edited=W, switch_t="late", layout=layout)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(W2WError, match="neither a .safetensors LoRA file nor a folder"):
        read_lora(tmp_path / "notes.txt", layout)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(W2WError, match="could not be read"):
        read_lora(tmp_path / "bad.safetensors", layout)
    kw = dict(pipe=pipe, spaces=S, space="pca", attribute="Beard")
    with pytest.raises(W2WError, match="give exactly one of --row I"):
        edit_to_folder(tmp_path / "e", strength=1.0, row=1, lora=tmp_path, **kw)
    with pytest.raises(W2WError, match="give exactly one of --row I"):
        edit_to_folder(tmp_path / "e", strength=1.0, **kw)
    with pytest.raises(W2WError, match="--strength must be a finite number"):
        edit_to_folder(tmp_path / "e", strength=float("inf"), row=1, **kw)
    with pytest.raises(W2WError, match="--preview must be a number of images >= 1"):
        edit_to_folder(tmp_path / "e", strength=1.0, row=1, n_preview=0, **kw)
    with pytest.raises(W2WError, match="--row 4096 is not a row"):
        edit_to_folder(tmp_path / "e", strength=1.0, row=4096, **kw)
    with pytest.raises(W2WError, match="unknown space 'gan'"):
        edit_to_folder(tmp_path / "e", strength=1.0, row=1, **{**kw, "space": "gan"})
    assert not (tmp_path / "e").exists()
    assert isinstance(beard, Direction) and beard.space == "pca"
