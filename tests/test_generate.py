"""Images from weights: ``generate`` against diffusers' own LoRA loading, and the functional ID score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from w2wlib import W2WError, load_profile
from w2wlib.generate import generate, generate_loaded, image_generator
from w2wlib.lora import LoraLayout
from w2wlib.lora_io import save_diffusers_lora
from w2wlib.metrics import identity_scores
from w2wlib.world.scoring import functional_id_scores


@pytest.fixture(scope="module")
def pipe(micro_world):
    from w2wlib.world.pipeline import load_pipeline

    p = load_pipeline(micro_world / "pipeline")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def W(pipe):
    layout = LoraLayout.from_unet(pipe.unet)
    return torch.randn(3, layout.dim, generator=torch.Generator().manual_seed(0)) * 0.05     # [3, D]


def test_each_row_matches_diffusers_load_lora_weights(pipe, W, tmp_path):
    """Row g, generated in a batch of LoRAs, equals a plain pipeline call with that LoRA loaded by diffusers."""
    kw = dict(prompt="a photo of sks person", n_per_row=2, seed=3, steps=3, guidance=3.0)
    out = generate(pipe, W, batch=4, **kw)                                     # [6, 64, 64, 3], row-major
    assert out.shape == (6, 64, 64, 3) and out.dtype == np.uint8
    layout = LoraLayout.from_unet(pipe.unet)
    for g in (0, 2):
        save_diffusers_lora(W[g], layout, tmp_path / f"row{g}")
        pipe.load_lora_weights(str(tmp_path / f"row{g}"), adapter_name=f"row{g}")
        try:
            ref = pipe(["a photo of sks person"] * 2, height=64, width=64, num_inference_steps=3, guidance_scale=3.0,
                       generator=[image_generator(3, j) for j in range(2)], output_type="np").images
        finally:
            pipe.unload_lora_weights()
        diff = np.abs(out[2 * g:2 * g + 2].astype(int) - (ref * 255).round().astype(int))
        assert diff.max() <= 2, f"row {g}: max pixel difference {diff.max()}"
        assert np.array_equal(generate_loaded(pipe, W[g], layout=layout, **kw), (ref * 255).round().astype(np.uint8))
    # batch size does not change anything, and the pipeline is left without hooks
    assert np.array_equal(out, generate(pipe, W, batch=6, **kw))
    base = generate(pipe, None, **kw)
    assert base.shape == (2, 64, 64, 3) and not np.array_equal(base, out[:2])
    assert np.array_equal(base, generate(pipe, None, **kw))


def test_functional_id_scores_pair_images_with_their_identity(pipe, W, micro_world):
    from w2wlib.world.encoder import load_encoder
    from w2wlib.world.render import EVAL_VIEWS, identity_views

    enc = load_encoder(micro_world / "identity_encoder")
    seeds = [10**9 + 1, 10**9 + 2, 10**9 + 3]
    scores = functional_id_scores(pipe, enc, W, seeds, n_images=2, n_renders=2, steps=2)
    assert scores.shape == (3,)
    # the reference: mean cosine between each row's images and its identity's evaluation renders
    imgs = generate(pipe, W, n_per_row=2, steps=2)
    z_i = enc.embed(imgs).view(3, 2, -1)
    z_r = enc.embed(identity_views(seeds, 2, EVAL_VIEWS)).view(3, 2, -1)
    ref = torch.stack([(z_i[g] @ z_r[g].T).mean() for g in range(3)])
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=0)
    again, images = functional_id_scores(pipe, enc, W, seeds, n_images=2, n_renders=2, steps=2, return_images=True)
    assert np.array_equal(images, imgs) and torch.equal(again, scores)       # the images it scored
    # renders scored against themselves: the same-identity similarity of the encoder
    renders = identity_views(seeds, 2, EVAL_VIEWS)
    assert (identity_scores(enc, renders, renders, 2, 2) > 0.5).all()
    with pytest.raises(W2WError, match="one seed per row"):
        functional_id_scores(pipe, enc, W, seeds[:2])


def test_reconstruction_id_scores_score_rows_their_reconstructions_and_the_base(S, shipped_pipe):
    from w2wlib.world.encoder import load_encoder
    from w2wlib.world.scoring import reconstruction_id_scores

    enc = load_encoder(load_profile("mini").path("world_dir") / "identity_encoder")
    rows, pca = S.val_rows[:2].tolist(), S.pca.truncated(8)
    kw = dict(n_images=1, n_renders=1, steps=2, layout=S.dataset.lora_layout(shipped_pipe.unet))
    scores, recon, images = reconstruction_id_scores(shipped_pipe, enc, S.dataset, rows, {"PCA": pca}, **kw)
    assert list(scores) == ["own LoRA (oracle)", "PCA", "base model"] and list(images) == list(scores)
    x = S.dataset.standardise(S.dataset.rows(rows))
    torch.testing.assert_close(recon["PCA"], pca.unstandardise(pca.decode(pca.encode(x))))
    seeds = [S.dataset.identity_seeds[r] for r in rows]
    torch.testing.assert_close(scores["PCA"], functional_id_scores(shipped_pipe, enc, recon["PCA"], seeds, **kw))
    torch.testing.assert_close(scores["base model"], functional_id_scores(shipped_pipe, enc, None, seeds, **kw))
    assert images["own LoRA (oracle)"].shape == (2, 64, 64, 3) and images["base model"].shape == (1, 64, 64, 3)


def test_weights_scores_take_any_reference_images(pipe, W, micro_world):
    """The library's call (references given, no world): the same scores as the world's seed wrapper, and the
    base model scored once against every person's references."""
    from w2wlib.scoring import reconstruction_scores, weights_scores
    from w2wlib.world.encoder import load_encoder
    from w2wlib.world.render import EVAL_VIEWS, identity_views

    enc = load_encoder(micro_world / "identity_encoder")
    seeds = [10**9 + 1, 10**9 + 2, 10**9 + 3]
    refs = identity_views(seeds, 2, EVAL_VIEWS)
    scores, images = weights_scores(pipe, enc, W, refs, n_images=2, n_refs=2, steps=2)
    torch.testing.assert_close(scores, functional_id_scores(pipe, enc, W, seeds, n_images=2, n_renders=2, steps=2))
    assert np.array_equal(images, generate(pipe, W, n_per_row=2, steps=2))
    base, one = weights_scores(pipe, enc, None, refs, n_images=2, n_refs=2, steps=2)
    assert one.shape == (2, 64, 64, 3)
    torch.testing.assert_close(base, identity_scores(enc, np.tile(one, (3, 1, 1, 1)), refs, 2, 2), atol=1e-6, rtol=0)
    with pytest.raises(W2WError, match="not a whole number of sets of n_refs=4"):
        weights_scores(pipe, enc, W, refs, n_refs=4)
    with pytest.raises(W2WError, match="W has 2 rows but the references are of 3 people"):
        weights_scores(pipe, enc, W[:2], refs, n_refs=2)
    # a space's reconstructions scored by the same call; a space that keeps everything reconstructs exactly
    class Exact:
        def encode_weights(self, w):
            return w

        def decode_weights(self, z):
            return z

    got, recon, _ = reconstruction_scores(pipe, enc, W, {"exact": Exact()}, refs, n_images=2, n_refs=2, steps=2)
    assert torch.equal(recon["exact"], W) and list(got) == ["own LoRA (oracle)", "exact", "base model"]
    torch.testing.assert_close(got["exact"], scores)
    torch.testing.assert_close(got["base model"], base)


def test_a_negative_prompt_steers_guidance_and_none_is_the_default(pipe, W):
    kw = dict(n_per_row=2, seed=1, steps=3, guidance=4.0)
    plain = generate(pipe, W[:1], **kw)
    assert np.array_equal(plain, generate(pipe, W[:1], negative_prompt="", **kw))
    neg = generate(pipe, W[:1], negative_prompt="a photo of a man with beard", **kw)
    assert neg.shape == plain.shape and not np.array_equal(neg, plain)
    # the reference: diffusers' own call with the same negative prompt (our bank off: the base model)
    base = generate(pipe, None, negative_prompt="blurry", **kw)
    ref = pipe(["a photo of sks person"] * 2, negative_prompt=["blurry"] * 2, height=64, width=64, num_inference_steps=3,
               guidance_scale=4.0, generator=[image_generator(1, j) for j in range(2)], output_type="np").images
    assert np.abs(base.astype(int) - (ref * 255).round().astype(int)).max() <= 1
