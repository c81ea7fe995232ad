"""Batched multi-identity DreamBooth-LoRA: equal to peft solo runs, independent of G, shardable."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from w2wlib import dreambooth as D
from w2wlib.errors import LayoutError, W2WError
from w2wlib.lora import BatchedLora, LoraLayout
from w2wlib.lora_io import state_dict_to_vector, vector_to_state_dict
from w2wlib.world import pipeline as P

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
)
K = 3                     # instance images per identity
KEYS = [7, 11, 23, 31]    # identity seeds


def config(**kw) -> D.DreamBoothConfig:
    return D.DreamBoothConfig(images_per_identity=K, class_images=6, **kw)


def images_of(seeds) -> torch.Tensor:
    """K renders of each identity, [G, K, 3, 64, 64] in [-1, 1]; image seeds depend on the identity only."""
    seeds = np.asarray(list(seeds))
    img_seeds = (seeds[:, None] * 1000 + np.arange(K)[None]).reshape(-1)
    return P.render_batch(np.repeat(seeds, K), img_seeds).reshape(len(seeds), K, 3, 64, 64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.manual_seed(0)
    tok = P.make_tokenizer(tmp_path_factory.mktemp("tok"))
    w = SimpleNamespace(tokenizer=tok, text_encoder=P.make_text_encoder(tok).eval(), vae=P.make_autoencoder().eval(),
                        unet=UNet2DConditionModel(**TINY_UNET).eval(), ddpm=P.make_schedulers()[0])
    w.layout = LoraLayout.from_unet(w.unet)
    w.images = {k: v for k, v in zip(KEYS, images_of(KEYS))}
    w.class_images = P.render_batch(np.arange(500, 506), np.arange(6))       # a stand-in class pool
    return w


def train(world, keys, cfg, class_images="default", **kw):
    cls = world.class_images if class_images == "default" else class_images
    return D.train_identities(world.unet, world.vae, world.text_encoder, world.tokenizer, world.ddpm,
                              {k: world.images[k] for k in keys}, cls, cfg, identity_keys=keys, progress=False, **kw)


def assert_rows_close(got, ref, init, what=""):
    """Equal up to float rounding, measured against the training update ``ref - init``.

    Rounding alone gives |difference| / |update| ~ 1e-5 (L2) for the bulk of the entries, but Adam
    can enlarge it in a handful: after step 1, B ~ lr, so A's gradient (proportional to B) may be
    near Adam's eps, where the step g / (|g| + eps) is sensitive to the last bits of g (the L2 ratio
    then reaches ~2e-4, in <= 10 entries). A wrong loss, clipping, decay, row or seed gives > 1e-2.
    """
    update, diff = ref - init, (got - ref).abs()
    rel_l2 = (diff.norm() / update.norm()).item()
    rel_q99 = (diff.quantile(0.99) / update.abs().max()).item()
    assert update.abs().max() > 0 and rel_l2 <= 1e-3 and rel_q99 <= 1e-4, \
        f"{what}: |difference| / |update| = {rel_l2:.3g} (L2), {rel_q99:.3g} (99th percentile / max)"


def peft_solo(world, key, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity `key` trained alone by peft's own LoRA layers, replaying the same draws (init, final)."""
    model = get_peft_model(copy.deepcopy(world.unet), LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target), init_lora_weights=True))
    w0 = D.init_lora_bank(world.layout, [key], cfg.seed, shared=cfg.shared_init)[0]
    res = set_peft_model_state_dict(model, vector_to_state_dict(w0, world.layout, prefix="base_model.model."))
    assert not res.unexpected_keys
    assert torch.equal(state_dict_to_vector(get_peft_model_state_dict(model), world.layout), w0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    inst = D.encode_images(world.vae, world.images[key])
    cls = D.encode_images(world.vae, world.class_images)
    emb = D.encode_prompts(world.tokenizer, world.text_encoder, [cfg.instance_prompt, cfg.class_prompt])
    b = cfg.batch_per_identity
    cond = torch.cat([emb[:1].expand(b, -1, -1), emb[1:].expand(b, -1, -1)])
    for step in range(cfg.steps):
        d = D.draw_step(cfg, key, step, len(inst), len(cls), inst.shape[1:], 1000)
        x0 = torch.cat([inst[d.instance_idx], cls[d.class_idx]])
        pred = model(world.ddpm.add_noise(x0, d.noise, d.timesteps), d.timesteps, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred[:b], d.noise[:b]) + cfg.prior_loss_weight * F.mse_loss(pred[b:], d.noise[b:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
    return w0, state_dict_to_vector(get_peft_model_state_dict(model), world.layout)


def test_batched_training_equals_peft_solo_runs(world):
    cfg = config(lr=1e-3, steps=5, batch_per_identity=2, max_grad_norm=0.5)
    keys = KEYS[:3]
    W = train(world, keys, cfg)
    for pos in (0, len(keys) - 1):                       # first and last position in the bank
        w0, ref = peft_solo(world, keys[pos], cfg)
        assert (ref - w0).abs().max() > 2 * cfg.lr       # it really trained (B moved off zero, A moved)
        assert_rows_close(W[pos], ref, w0, f"batched vs peft, position {pos}")


def test_a_row_does_not_depend_on_the_bank_it_is_in(world):
    cfg = config(lr=1e-3, steps=3)
    small = train(world, [7, 31], cfg)
    large = train(world, [23, 11, 31, 7], dataclasses.replace(cfg, identities_per_forward=3))  # 2 micro-batches
    init = D.init_lora_bank(world.layout, [31, 7], seed=0, shared=True)
    assert_rows_close(large[3], small[0], init[1], "identity 7 in banks of 2 and 4")
    assert_rows_close(large[2], small[1], init[0], "identity 31 in banks of 2 and 4")
    assert not torch.allclose(large[0], large[1])
    assert torch.equal(init[0], init[1])                               # one init for every identity
    own = D.init_lora_bank(world.layout, [31, 7], seed=0, shared=False)  # each identity's own init
    assert torch.equal(own[1], D.init_lora_bank(world.layout, [7], seed=0, shared=False)[0])
    assert not torch.equal(own[0], own[1]) and not torch.equal(own[0], init[0])
    e = world.layout.entries[0]
    for W0 in (init, own):
        assert W0[:, e.b_slice].abs().max() == 0 and 0 < W0[:, e.a_slice].abs().max() <= e.in_features ** -0.5


def test_loss_on_fixed_noise_decreases(world):
    cfg = config(lr=1e-2, steps=20, batch_per_identity=2)
    losses = []
    W = train(world, [11], cfg, class_images=None, on_step=lambda s, l: losses.append(l))
    assert len(losses) == 20 and losses[0].shape == (1,)
    lat = D.encode_images(world.vae, world.images[11]).repeat(8, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(lat.shape, generator=g), torch.randint(0, 1000, (len(lat),), generator=g)
    cond = D.encode_prompts(world.tokenizer, world.text_encoder, [cfg.instance_prompt]).expand(len(lat), -1, -1)
    bank = BatchedLora.attach(world.unet, world.layout)
    try:
        def loss(w):
            with torch.no_grad(), bank.use(w):
                return F.mse_loss(world.unet(world.ddpm.add_noise(lat, noise, t), t, cond).sample, noise).item()
        before, after = loss(D.init_lora_bank(world.layout, [11], shared=True)), loss(W)
    finally:
        bank.detach()
    assert after < 0.9 * before, (before, after)


def _shard_args(world, cfg):
    return dict(unet=world.unet, vae=world.vae, text_encoder=world.text_encoder, tokenizer=world.tokenizer,
                noise_scheduler=world.ddpm, instance_images=images_of, class_images=world.class_images, cfg=cfg,
                chunk_size=2, progress=False)


def test_shards_resume_merge_and_detect_gaps(world, tmp_path, monkeypatch):
    cfg, seeds = config(lr=1e-3, steps=2), [5, 6, 7, 8, 9]
    paths = D.train_shards(seeds, tmp_path, **_shard_args(world, cfg))
    assert [p.name for p in paths] == [D.shard_name(0, 1), D.shard_name(2, 3), D.shard_name(4, 4)]
    stamps = [p.stat().st_mtime_ns for p in paths]
    monkeypatch.setattr(D, "train_identities", lambda *a, **k: pytest.fail("an existing shard was retrained"))
    assert D.train_shards(seeds, tmp_path, **_shard_args(world, cfg)) == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps and not list(tmp_path.glob(".*"))
    with pytest.raises(W2WError, match="other seeds"):
        D.train_shards([5, 6, 70, 8, 9], tmp_path, **_shard_args(world, cfg))
    monkeypatch.undo()
    W, got = D.merge_shards(tmp_path)
    assert got.tolist() == seeds and W.shape == (5, world.layout.dim)
    solo = D.train_identities(world.unet, world.vae, world.text_encoder, world.tokenizer, world.ddpm,
                              images_of([8]), world.class_images, cfg, identity_keys=[8], progress=False)
    assert_rows_close(W[3], solo[0], D.init_lora_bank(world.layout, [8], shared=True)[0], "identity 8 sharded vs alone")

    (tmp_path / D.shard_name(2, 3)).rename(tmp_path / "kept")
    with pytest.raises(W2WError, match=r"identities 2\.\.3 are missing"):
        D.merge_shards(tmp_path)
    (tmp_path / "kept").rename(tmp_path / D.shard_name(2, 3))
    (tmp_path / D.shard_name(4, 4)).unlink()
    with pytest.raises(W2WError, match=r"identities 4\.\.4 are missing"):
        D.merge_shards(tmp_path)
    (tmp_path / D.shard_name(1, 2)).write_bytes((tmp_path / D.shard_name(2, 3)).read_bytes())
    with pytest.raises(W2WError, match="overlaps"):
        D.merge_shards(tmp_path)
    with pytest.raises(W2WError, match="no shard"):
        D.merge_shards(tmp_path / "empty")


def test_float16_shards_resume_from_float32_ones_and_merge_to_the_rounded_rows(world, tmp_path):
    """A build whose storage is float16 resumes shards written as float32 (and back): the merge is the
    float32 training result rounded once to float16, whichever dtype each shard was written in."""
    from safetensors import safe_open

    cfg, seeds = config(lr=1e-3, steps=2), [5, 6, 7]
    D.train_shards(seeds, tmp_path / "f32", **_shard_args(world, cfg))
    W32, _ = D.merge_shards(tmp_path / "f32")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / D.shard_name(0, 1)).write_bytes((tmp_path / "f32" / D.shard_name(0, 1)).read_bytes())
    paths = D.train_shards(seeds, mixed, **_shard_args(world, cfg), dtype=torch.float16)
    with safe_open(str(paths[0]), "pt") as a, safe_open(str(paths[1]), "pt") as b:
        assert a.get_tensor("W").dtype == torch.float32 and b.get_tensor("W").dtype == torch.float16
    W, got = D.merge_shards(mixed)
    assert got.tolist() == seeds and W.dtype == torch.float32
    assert torch.equal(W.half(), W32.half()) and torch.equal(W[2], W32[2].half().float())


def _two_process_worker(world, folder, seeds, cfg):
    from accelerate import PartialState

    PartialState._reset_state()          # a fork inherits the parent's singleton; start this process's own
    state = PartialState(cpu=True)
    paths = D.train_shards(seeds, folder, state=state, **_shard_args(world, cfg))
    Path(folder, f"rank{state.process_index}.json").write_text(
        json.dumps({"n": state.num_processes, "shards": [p.name for p in paths]}))


def test_two_process_gloo_run_writes_disjoint_shards(request, tmp_path):
    # debug_launcher forks; a parent whose OpenMP pool has run with 2+ threads leaves its forked
    # children deadlocked (libgomp is not fork-safe). So the test runs in a fresh single-threaded
    # interpreter, with a hard timeout so that a hang fails instead of stalling CI.
    if os.environ.get("OMP_NUM_THREADS") != "1":
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{request.node.name}"],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        return
    from accelerate import debug_launcher

    world = request.getfixturevalue("world")

    cfg, seeds = config(lr=1e-3, steps=2), [40, 41, 42, 43, 44, 45]
    debug_launcher(_two_process_worker, args=(world, str(tmp_path), seeds, cfg), num_processes=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["n"] == 2 for r in ranks)
    assert ranks[0]["shards"] and ranks[1]["shards"] and not set(ranks[0]["shards"]) & set(ranks[1]["shards"])
    W, got = D.merge_shards(tmp_path)
    assert got.tolist() == seeds
    # the same chunks trained by one process give the same rows, bit for bit: a shard's rows depend only on
    # its seeds and the config, never on which process trained it
    from accelerate import PartialState

    PartialState._reset_state()
    D.train_shards(seeds, tmp_path / "one_process", state=PartialState(cpu=True), **_shard_args(world, cfg))
    W1, got1 = D.merge_shards(tmp_path / "one_process")
    assert got1.tolist() == seeds and torch.equal(W, W1)
    init = D.init_lora_bank(world.layout, seeds[:1], shared=True)[0]
    assert (W - init).abs().amax(1).min() > 0                          # every row trained


def test_class_images_come_from_the_pipeline_and_ignore_batch_size(world):
    pipe = StableDiffusionPipeline(vae=world.vae, text_encoder=world.text_encoder, tokenizer=world.tokenizer,
                                   unet=world.unet, scheduler=P.make_schedulers()[1], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, guidance_scale=1.0, progress=False)
    a = D.generate_class_images(pipe, 3, "a photo of a person", seed=1, batch_size=3, **kw)
    b = D.generate_class_images(pipe, 3, "a photo of a person", seed=1, batch_size=2, **kw)
    assert a.shape == (3, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert (a[0] - a[1]).abs().max() > 1e-3


def test_input_errors_are_clear(world):
    cfg = config(steps=1)
    imgs = images_of([7, 11])
    with pytest.raises(W2WError, match="2 identities of instance images but 3 identity keys"):
        D.train_identities(
            world.unet, world.vae, world.text_encoder, world.tokenizer, world.ddpm, imgs, None, cfg,
            identity_keys=[7, 11, 23], progress=False)
    with pytest.raises(W2WError, match="every key needs its images"):
        D.train_identities(world.unet, world.vae, world.text_encoder, world.tokenizer, world.ddpm,
                           {7: imgs[0]}, None, cfg, identity_keys=[7, 11], progress=False)
    with pytest.raises(W2WError, match="distinct non-negative"):
        train(world, [7, 7], cfg)
    with pytest.raises(LayoutError, match="D=") as err:
        train(world, [7, 11], cfg, init=torch.zeros(2, world.layout.dim + 1))
    assert isinstance(err.value, W2WError)
    with pytest.raises(W2WError, match="5 channels"):
        train(world, [7], cfg, class_images=torch.zeros(2, 5, 8, 8))
    with pytest.raises(W2WError, match="3 instance images per identity and 6 class images but the config says 8"):
        train(world, [7], D.DreamBoothConfig(steps=1))
