"""Tests of the identity encoder (w2wlib.world.encoder).

One micro encoder is trained per module (~30-50 s on one core); the other trainings run 2-3 steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import w2wlib.world.encoder_training as T
from w2wlib.errors import ArtifactMissingError, W2WError
from w2wlib.world.encoder import (HELD_OUT_BASE, EncoderConfig, IdentityEncoder, id_score,
                                  load_encoder, pairwise_id_scores, roc_auc, roc_curve,
                                  save_encoder, verification)
from w2wlib.world.encoder_training import train_encoder
from w2wlib.world.render import ATTRIBUTES, render_ids


@pytest.fixture(scope="module")
def trained():
    """The micro encoder, its history and its verification on 200 held-out identities x 4 views."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # restored below: other tests' builds compare bytes at the default thread count
    try:
        enc, hist = train_encoder(EncoderConfig.micro(), progress=False)
        return enc, hist, verification(enc, n_identities=200, n_views=4, seed=0)
    finally:
        torch.set_num_threads(threads)


def tiny(**kw) -> EncoderConfig:
    """A micro config for 2-3 step trainings."""
    kw.setdefault("steps", 2)
    kw.setdefault("batch_size", 16)
    return EncoderConfig.micro(**kw)


# ----------------------------------------------------------------------------- the trained encoder
def test_embeddings_unit_norm_shape_and_input_formats(trained):
    enc = trained[0]
    imgs = render_ids([HELD_OUT_BASE + 5] * 3, [1, 2, 3])                  # uint8 [3, 64, 64, 3]
    z = enc.embed(imgs)
    assert z.shape == (3, enc.config.embed_dim) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1          # float [-1, 1]
    torch.testing.assert_close(enc.embed(x), z)
    big = F.interpolate(x, size=(128, 128), mode="nearest")                      # resized to 64
    assert (enc.embed(big) * z).sum(1).min() > 0.9
    logits = enc.predict_attributes(imgs)
    assert logits.shape == (3, len(ATTRIBUTES))
    assert enc.embed(imgs[:0]).shape == (0, enc.config.embed_dim)
    assert not enc.training


def test_training_history_and_loss_decreases(trained):
    hist = trained[1]
    assert hist and hist[-1]["step"] == EncoderConfig.micro().steps
    assert {"loss", "id_loss", "attr_loss", "lr", "images_per_s"} <= set(hist[0])
    # the margin loss only joins after id_start, so compare its logged value and the attribute BCE
    assert hist[-1]["id_loss"] < 0.7 * hist[0]["id_loss"]          # measured 9.8 -> 4.6
    assert hist[-1]["attr_loss"] < 0.8 * hist[0]["attr_loss"]      # measured 0.50 -> 0.34


def test_verification_auc_on_held_out_identities(trained):
    # measured 0.995 for the micro build (seeds 0 and 1); 0.9 leaves room for platform differences,
    # while an untrained or broken encoder scores ~0.6-0.8 (colours alone separate some people)
    r = trained[2]
    assert r["auc"] >= 0.9, r["auc"]
    assert len(r["same"]) == 200 * 6 and len(r["diff"]) == 800 * 799 // 2 - 200 * 6
    assert r["same_mean"] > r["diff_mean"] + 0.5          # measured ~0.95 vs ~0.01
    assert r["auc"] == pytest.approx(roc_auc(r["same"], r["diff"]))


def test_untrained_encoder_is_clearly_worse(trained):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        raw = IdentityEncoder(EncoderConfig.micro()).eval()
    r = verification(raw, n_identities=50, n_views=2, seed=3)
    assert r["auc"] < trained[2]["auc"] - 0.05


def test_attribute_accuracy_beats_majority_baseline(trained):
    r = trained[2]
    # measured 0.852-0.860 (seeds 0, 1) vs a majority baseline of 0.739
    assert r["attr_acc"] > r["attr_majority"] + 0.05
    assert set(r["attr_acc_per"]) == set(ATTRIBUTES)
    assert r["attr_acc_per"]["Black_Hair"] > 0.9 and r["attr_acc_per"]["Gray_Hair"] > 0.9


# ----------------------------------------------------------------------------- scores
def test_id_score_is_mean_of_all_pairwise_cosines(trained):
    enc = trained[0]
    a = render_ids([HELD_OUT_BASE + 11] * 3, [1, 2, 3])
    b = render_ids([HELD_OUT_BASE + 11] * 5, [4, 5, 6, 7, 8])
    other = render_ids([HELD_OUT_BASE + 12] * 5, [4, 5, 6, 7, 8])
    za, zb = enc.embed(a).double(), enc.embed(b).double()
    za, zb = za / za.norm(dim=1, keepdim=True), zb / zb.norm(dim=1, keepdim=True)
    by_hand = float((za @ zb.T).mean())                      # [3, 5] cosine matrix, all pairs
    assert id_score(enc, a, b) == pytest.approx(by_hand, abs=1e-5)
    assert id_score(enc, a, b) > id_score(enc, a, other) + 0.3
    with pytest.raises(W2WError, match="id_score needs at least one image on each side"):
        id_score(enc, a, b[:0])


def test_pairwise_id_scores(trained):
    enc = trained[0]
    a = render_ids(HELD_OUT_BASE + np.arange(4), [1, 2, 3, 4])
    b = render_ids(HELD_OUT_BASE + np.arange(4), [5, 6, 7, 8])
    s = pairwise_id_scores(enc, a, b)
    assert s.shape == (4,)
    torch.testing.assert_close(s, (enc.embed(a) * enc.embed(b)).sum(1))
    shuffled = pairwise_id_scores(enc, a, b[[1, 2, 3, 0]])
    assert s.mean() > shuffled.mean() + 0.3
    with pytest.raises(W2WError, match="needs as many images on both sides, got 4 and 3"):
        pairwise_id_scores(enc, a, b[:3])


def test_roc_auc_and_curve():
    assert roc_auc([0.9, 0.8], [0.1, 0.8]) == pytest.approx(0.875)     # a tie counts 1/2
    assert roc_auc([1, 2, 3], [0]) == 1.0 and roc_auc([0], [1, 2]) == 0.0
    rng = np.random.default_rng(0)
    same, diff = rng.normal(1, 1, 300), rng.normal(0, 1, 2000).round(1)   # with ties
    fpr, tpr = roc_curve(same, diff)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))       # trapezoids
    assert roc_auc(same, diff) == pytest.approx(area, abs=1e-9)
    with pytest.raises(W2WError, match="roc_auc needs at least one positive and one negative score"):
        roc_auc([], [1.0])


# ----------------------------------------------------------------------------- persistence
def test_save_load_round_trip(trained, tmp_path):
    enc = trained[0]
    save_encoder(enc, tmp_path / "enc")
    meta = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert meta["attributes"] == list(ATTRIBUTES) and "version" in meta
    assert meta["config"]["width"] == enc.config.width
    back = load_encoder(tmp_path / "enc")
    assert not back.training
    imgs = render_ids(HELD_OUT_BASE + np.arange(6), np.arange(6))
    assert torch.equal(back.embed(imgs), enc.embed(imgs))
    assert torch.equal(back.predict_attributes(imgs), enc.predict_attributes(imgs))


def test_load_errors(trained, tmp_path):
    with pytest.raises(ArtifactMissingError, match="w2w world build"):
        load_encoder(tmp_path)
    folder = save_encoder(trained[0], tmp_path / "enc")
    meta = json.loads((folder / "config.json").read_text())
    meta["attributes"] = meta["attributes"][::-1]
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(W2WError, match="attributes"):
        load_encoder(folder)
    (folder / "identity_encoder.safetensors").unlink()
    with pytest.raises(ArtifactMissingError, match="w2w world build"):
        load_encoder(folder)


def test_embed_rejects_wrong_inputs(trained):
    enc = trained[0]
    numpy_msg, torch_msg = r"numpy images must be uint8 \[N, H, W, 3\]", r"torch images must be float \[N, 3, H, W\]"
    for bad, msg in ((np.zeros((2, 64, 64), np.uint8), numpy_msg),            # no channel axis
                     (np.zeros((2, 64, 64, 3), np.float32), numpy_msg),       # float numpy is ambiguous
                     (torch.zeros(2, 64, 64, 3), torch_msg),                  # float channels-last
                     (torch.zeros(3, 64, 64), torch_msg),                     # missing batch axis
                     ("not images", "expected uint8 numpy .* got str")):
        with pytest.raises(W2WError, match=msg):
            enc.embed(bad)
    with pytest.raises(W2WError, match=numpy_msg):
        enc.predict_attributes(np.zeros((1, 64, 64, 4), np.uint8))


# ----------------------------------------------------------------------------- training mechanics
def test_recon_fn_applied_to_a_fraction_of_each_batch():
    shapes = []

    def blur(x: torch.Tensor) -> torch.Tensor:           # stand-in for the autoencoder: 2x2 blur
        shapes.append(tuple(x.shape))
        return F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")

    train_encoder(tiny(steps=3, recon_fraction=0.5), recon_fn=blur, progress=False)
    assert shapes == [(8, 3, 64, 64)] * 3
    shapes.clear()
    train_encoder(tiny(recon_fraction=0.0), recon_fn=blur, progress=False)
    assert shapes == []


def test_training_is_deterministic_and_seeded():
    a, _ = train_encoder(tiny(steps=3, seed=7), progress=False)
    b, _ = train_encoder(tiny(steps=3, seed=7), progress=False)
    c, _ = train_encoder(tiny(steps=3, seed=8), progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_training_never_sees_held_out_identities(monkeypatch):
    seen = []
    real = T._render_batch

    def spy(ids, img_seeds):
        seen.append(np.asarray(ids).copy())
        return real(ids, img_seeds)

    monkeypatch.setattr(T, "_render_batch", spy)
    train_encoder(tiny(steps=3), progress=False)
    ids = np.concatenate(seen)
    assert len(ids) == 3 * 16 and ids.max() < HELD_OUT_BASE
    assert len(np.unique(ids)) == len(ids) // 2                   # fresh identities, 2 views each
    with pytest.raises(W2WError, match="identity_pool must be in .*seeds >= HELD_OUT_BASE are held out"):
        EncoderConfig(identity_pool=HELD_OUT_BASE + 1).validate()


def test_configs():
    full, micro = EncoderConfig(), EncoderConfig.micro()
    assert full.steps * full.ids_per_batch >= 20_000            # the mini build's identity count
    assert micro.steps < full.steps and micro.width < full.width
    with pytest.raises(W2WError, match="batch_size a multiple of views .* got views=3, batch_size=16"):
        train_encoder(EncoderConfig.micro(views=3, batch_size=16), progress=False)
    with pytest.raises(W2WError, match=r"recon_fraction must be in \[0, 1\], got 1.5"):
        EncoderConfig.micro(recon_fraction=1.5).validate()
