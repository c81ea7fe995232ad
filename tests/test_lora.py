"""Tests of w2wlib.lora: layouts, the batched LoRA bank, and exact conversions at the edges."""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import UNet2DConditionModel  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict  # noqa: E402
from peft.utils import load_peft_weights  # noqa: E402

from w2wlib.errors import LayoutError  # noqa: E402
from w2wlib.lora import BatchedLora, LoraLayout, sd15_layout  # noqa: E402
from w2wlib.lora_io import (  # noqa: E402
    layout_from_weight_dimensions,
    load_diffusers_lora,
    load_peft_adapter,
    save_diffusers_lora,
    save_peft_adapter,
    state_dict_to_vector,
    vector_to_state_dict,
)

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
)
MINI_WORLD_UNET = dict(
    sample_size=8, block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=64, layers_per_block=1,
)
PEFT_CFG = dict(r=1, lora_alpha=27, target_modules=["to_q", "to_v"])
ATOL = 1e-5


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def layout(unet):
    return LoraLayout.from_unet(unet)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 8, 8, generator=g)
    c = torch.randn(6, 5, 32, generator=g)
    return x, torch.tensor(10), c


@pytest.fixture(scope="module")
def peft_unet(unet):
    """A separate copy of the UNet with peft's own LoRA layers (r=1, alpha=27)."""
    return get_peft_model(copy.deepcopy(unet), LoraConfig(**PEFT_CFG))


def rand_w(layout, g, seed=2):
    return torch.randn(g, layout.dim, generator=torch.Generator().manual_seed(seed)) * 0.1


def peft_forward(peft_unet, layout, w, x, t, c):
    """Peft's LoRA forward for one flat vector w on a batch."""
    sd = vector_to_state_dict(w, layout, prefix="base_model.model.")
    res = set_peft_model_state_dict(peft_unet, sd)
    assert not res.unexpected_keys
    with torch.no_grad():
        return peft_unet(x, t, encoder_hidden_states=c).sample


def bank_forward(unet, layout, W, x, t, c, index=None):
    bank = BatchedLora.attach(unet, layout)
    try:
        with torch.no_grad(), bank.use(W, index=index):
            return unet(x, t, encoder_hidden_states=c).sample
    finally:
        bank.detach()


# --------------------------------------------------------------------------- layouts


def test_sd15_layout_on_meta_device():
    layout = sd15_layout()
    assert layout.dim == 99648
    # 16 transformer blocks x (attn1, attn2) x (to_q, to_v) = 64 Linears = 128 tensors
    assert len(layout.entries) == 64
    mods = [e.module for e in layout.entries]
    assert mods[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert mods[-1] == "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v"
    first_up = next(i for i, m in enumerate(mods) if m.startswith("up_blocks"))
    assert all(m.startswith("mid_block") for m in mods[first_up - 4: first_up])  # down, mid, up
    assert layout.entries[-1].offset + layout.entries[-1].numel == 99648
    assert (layout.rank, layout.alpha, layout.target_modules) == (1, 27.0, ("to_q", "to_v"))


def test_mini_world_layout_on_meta_device():
    with torch.device("meta"):
        mini = UNet2DConditionModel(**MINI_WORLD_UNET)
    layout = LoraLayout.from_unet(mini)
    assert (layout.dim, len(layout.entries)) == (5376, 28)


def test_layout_order_is_peft_file_order(unet, layout, tmp_path):
    model = get_peft_model(copy.deepcopy(unet), LoraConfig(**PEFT_CFG))
    model.save_pretrained(tmp_path)
    keys = list(load_peft_weights(str(tmp_path), device="cpu"))
    expected = [f"base_model.model.{e.module}.lora_{ab}.weight" for e in layout.entries for ab in "AB"]
    assert keys == expected
    # ...which is not the module registration order (diffusers registers up_blocks before mid_block)
    named = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(("to_q", "to_v"))]
    assert sorted(named) == sorted(e.module for e in layout.entries)
    assert named != [e.module for e in layout.entries]
    for e in layout.entries:
        lin = unet.get_submodule(e.module)
        assert (e.in_features, e.out_features) == (lin.in_features, lin.out_features)


def test_layout_dict_roundtrip(layout):
    again = LoraLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again == layout and again.dim == layout.dim
    bad = layout.to_dict()
    bad["dim"] += 1
    with pytest.raises(LayoutError, match=f"Layout dict says dim {layout.dim + 1:,} but its entries sum to "
                                          f"{layout.dim:,}"):
        LoraLayout.from_dict(bad)


# --------------------------------------------------------------------------- batched apply


def test_batched_matches_peft_per_sample(unet, layout, peft_unet, inputs):
    x, t, c = inputs
    W = rand_w(layout, 3)
    out = bank_forward(unet, layout, W, x[:3], t, c[:3])
    with torch.no_grad():
        base = unet(x[:3], t, encoder_hidden_states=c[:3]).sample
    for n in range(3):
        ref = peft_forward(peft_unet, layout, W[n], x[n:n + 1], t, c[n:n + 1])
        torch.testing.assert_close(out[n:n + 1], ref, atol=ATOL, rtol=0)
        assert (ref - base[n:n + 1]).abs().max() > 1e-3  # the LoRA really changes the output


def test_batched_with_index_and_cfg_doubling(unet, layout, peft_unet, inputs):
    x, t, c = inputs
    W = rand_w(layout, 5, seed=3)
    index = [4, 0, 4, 2]
    out = bank_forward(unet, layout, W, x[:4], t, c[:4], index=torch.tensor(index))
    for n, g in enumerate(index):
        ref = peft_forward(peft_unet, layout, W[g], x[n:n + 1], t, c[n:n + 1])
        torch.testing.assert_close(out[n:n + 1], ref, atol=ATOL, rtol=0)
    # CFG: the batch is cat([uncond, cond]) of size 2B, sample n uses W[n % B]
    W3 = W[:3]
    xx, cc = torch.cat([x[:3], x[:3]]), torch.cat([c[3:6], c[:3]])
    out = bank_forward(unet, layout, W3, xx, t, cc)
    for n in range(6):
        ref = peft_forward(peft_unet, layout, W3[n % 3], xx[n:n + 1], t, cc[n:n + 1])
        torch.testing.assert_close(out[n:n + 1], ref, atol=ATOL, rtol=0)


def test_gradient_reaches_only_used_rows(unet, layout, inputs):
    x, t, c = inputs
    W = rand_w(layout, 5, seed=4).requires_grad_(True)
    bank = BatchedLora.attach(unet, layout)
    unet.train()
    try:
        with bank.use(W, index=[1, 3, 1]):
            loss = unet(x[:3], t, encoder_hidden_states=c[:3]).sample.square().mean()
        loss.backward()
    finally:
        unet.eval()
        bank.detach()
    norms = W.grad.norm(dim=1)
    assert norms[1] > 0 and norms[3] > 0
    assert norms[0] == 0 and norms[2] == 0 and norms[4] == 0


def test_attach_detach_restores_exactly(unet, layout, inputs):
    x, t, c = inputs
    before = dict(unet.named_modules())
    keys = list(unet.state_dict())
    with torch.no_grad():
        base = unet(x[:2], t, encoder_hidden_states=c[:2]).sample
    bank = BatchedLora.attach(unet, layout)
    assert BatchedLora.attach(unet, layout) is bank  # idempotent
    mod = unet.get_submodule(layout.entries[0].module)
    assert len(mod._forward_hooks) == 1
    assert list(unet.state_dict()) == keys
    with pytest.raises(LayoutError, match="already carry another LoRA bank; detach it first"):
        BatchedLora.attach(unet, LoraLayout.from_unet(unet, alpha=1.0))
    with torch.no_grad():
        assert torch.equal(unet(x[:2], t, encoder_hidden_states=c[:2]).sample, base)  # outside use(): no delta
        with bank.use(rand_w(layout, 2)):
            assert not torch.allclose(unet(x[:2], t, encoder_hidden_states=c[:2]).sample, base)
    bank.detach()
    after = dict(unet.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert all(len(m._forward_hooks) == 0 for m in after.values())
    with torch.no_grad():
        assert torch.equal(unet(x[:2], t, encoder_hidden_states=c[:2]).sample, base)
    with pytest.raises(LayoutError, match="This LoRA bank was detached; attach it again"):
        with bank.use(rand_w(layout, 1)):
            pass


def test_bank_input_errors(unet, layout, inputs):
    x, t, c = inputs
    bank = BatchedLora.attach(unet, layout)
    try:
        with pytest.raises(LayoutError, match=f"4,096 columns.*{layout.dim:,}"):
            with bank.use(torch.zeros(2, 4096)):
                pass
        with torch.no_grad():
            with pytest.raises(LayoutError, match="multiple"), bank.use(rand_w(layout, 2)):
                unet(x[:3], t, encoder_hidden_states=c[:3])
            with pytest.raises(LayoutError, match="index"), bank.use(rand_w(layout, 2), index=[0, 1]):
                unet(x[:3], t, encoder_hidden_states=c[:3])
        with pytest.raises(LayoutError, match="outside"):
            with bank.use(rand_w(layout, 2), index=[0, 2]):
                pass
    finally:
        bank.detach()


# --------------------------------------------------------------------------- conversions


def test_state_dict_roundtrip_and_errors(layout):
    w = rand_w(layout, 1)[0]
    sd = vector_to_state_dict(w, layout)
    e = layout.entries[0]
    assert sd[f"{e.module}.lora_A.weight"].shape == e.a_shape and sd[f"{e.module}.lora_B.weight"].shape == e.b_shape
    assert torch.equal(state_dict_to_vector(sd, layout), w)
    missing = dict(sd)
    del missing[f"{e.module}.lora_B.weight"]
    with pytest.raises(LayoutError, match="lora_B"):
        state_dict_to_vector(missing, layout)
    with pytest.raises(LayoutError, match="no_such_module"):
        state_dict_to_vector({**sd, "no_such_module.lora_A.weight": torch.zeros(1, 2)}, layout)
    wrong = {**sd, f"{e.module}.lora_A.weight": torch.zeros(1, e.in_features + 1)}
    with pytest.raises(LayoutError, match="wrong shape"):
        state_dict_to_vector(wrong, layout)


def test_peft_folder_roundtrip(unet, layout, peft_unet, inputs, tmp_path):
    x, t, c = inputs
    w = rand_w(layout, 1, seed=5)[0]
    save_peft_adapter(w, layout, tmp_path / "ours")
    model = PeftModel.from_pretrained(copy.deepcopy(unet), str(tmp_path / "ours"))
    assert model.peft_config["default"].lora_alpha == 27
    for e in layout.entries:
        mod = model.base_model.model.get_submodule(e.module)
        assert torch.equal(mod.lora_A["default"].weight, w[e.a_slice].view(e.a_shape))
        assert torch.equal(mod.lora_B["default"].weight, w[e.b_slice].view(e.b_shape))
    with torch.no_grad():
        out = model(x[:2], t, encoder_hidden_states=c[:2]).sample
    torch.testing.assert_close(out, bank_forward(unet, layout, w, x[:2], t, c[:2]), atol=ATOL, rtol=0)
    assert torch.equal(load_peft_adapter(tmp_path / "ours", layout), w)
    # same file as peft's own save_pretrained of the same weights
    peft_forward(peft_unet, layout, w, x[:1], t, c[:1])
    peft_unet.save_pretrained(tmp_path / "theirs")
    ours, theirs = load_peft_weights(str(tmp_path / "ours")), load_peft_weights(str(tmp_path / "theirs"))
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _write_tokenizer(folder):
    from transformers import CLIPTokenizer

    letters = [chr(i) for i in range(ord("a"), ord("z") + 1)]
    vocab = ["!", "<|startoftext|>", "<|endoftext|>"] + letters + [f"{ch}</w>" for ch in letters]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=8)
    ids = tok("ab c").input_ids
    assert ids == [1, 3, 30, 31, 2], ids  # guards against the transformers-5 2-token-vocab trap
    return tok, len(vocab)


@pytest.fixture(scope="module")
def pipe(unet, tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tok, vocab_size = _write_tokenizer(tmp_path_factory.mktemp("tk") / "tokenizer")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=8,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))
    p = StableDiffusionPipeline(vae=vae.eval(), text_encoder=te.eval(), tokenizer=tok, unet=copy.deepcopy(unet),
                                scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def test_diffusers_file_roundtrip_keeps_alpha(unet, layout, pipe, inputs, tmp_path):
    from diffusers import StableDiffusionPipeline

    x, t, c = inputs
    w = rand_w(layout, 1, seed=6)[0]
    save_diffusers_lora(w, layout, tmp_path)
    sd, _ = StableDiffusionPipeline.lora_state_dict(str(tmp_path))
    assert f"unet.{layout.entries[0].module}.lora.down.weight" in sd
    pipe.load_lora_weights(str(tmp_path), adapter_name="w")
    try:
        assert pipe.unet.peft_config["w"].lora_alpha == 27
        with torch.no_grad():
            out = pipe.unet(x[:2], t, encoder_hidden_states=c[:2]).sample
    finally:
        pipe.unload_lora_weights()
    torch.testing.assert_close(out, bank_forward(unet, layout, w, x[:2], t, c[:2]), atol=ATOL, rtol=0)
    assert torch.equal(load_diffusers_lora(tmp_path, layout), w)


def test_diffusers_file_without_alpha_is_rescaled(unet, layout, pipe, inputs, tmp_path):
    """A file saved without metadata loads with alpha = r; the reader folds that into B."""
    from diffusers import StableDiffusionPipeline

    x, t, c = inputs
    w = rand_w(layout, 1, seed=7)[0]
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=vector_to_state_dict(w, layout))
    v = load_diffusers_lora(tmp_path, layout)
    assert not torch.equal(v, w)
    pipe.load_lora_weights(str(tmp_path), adapter_name="noalpha")
    try:
        with torch.no_grad():
            out = pipe.unet(x[:2], t, encoder_hidden_states=c[:2]).sample
    finally:
        pipe.unload_lora_weights()
    torch.testing.assert_close(out, bank_forward(unet, layout, v, x[:2], t, c[:2]), atol=ATOL, rtol=0)


def test_bank_under_cfg_inside_pipeline(layout, pipe):
    W = rand_w(layout, 2, seed=8)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    prompts = ["a cat", "b dog"]
    bank = BatchedLora.attach(pipe.unet, layout)
    try:
        with bank.use(W):
            both = pipe(prompts, num_inference_steps=2, guidance_scale=5.0, latents=latents,
                        output_type="latent").images
        singles = []
        for i in range(2):
            with bank.use(W[i:i + 1]):
                singles.append(pipe(prompts[i], num_inference_steps=2, guidance_scale=5.0,
                                    latents=latents[i:i + 1], output_type="latent").images)
        with bank.use(W.flip(0)):
            swapped = pipe(prompts, num_inference_steps=2, guidance_scale=5.0, latents=latents,
                           output_type="latent").images
    finally:
        bank.detach()
    torch.testing.assert_close(both, torch.cat(singles), atol=1e-4, rtol=0)
    assert not torch.allclose(both, swapped, atol=1e-4)


# --------------------------------------------------------------------------- public w2w files


def _weight_dimensions(layout, spell):
    wd = {}
    for e in layout.entries:
        for ab, shape in (("A", e.a_shape), ("B", e.b_shape)):
            wd[spell(e.module, ab)] = [[shape[0] * shape[1]], torch.Size(shape)]
    return wd


SPELLINGS = {
    "peft": lambda m, ab: f"base_model.model.{m}.lora_{ab}.weight",
    "diffusers": lambda m, ab: f"unet.{m}.lora.{'down' if ab == 'A' else 'up'}.weight",
    "lora_unet": lambda m, ab: f"lora_unet_{m}.lora_{ab}.weight",
    "kohya": lambda m, ab: f"lora_unet_{m.replace('.', '_')}.lora_{'down' if ab == 'A' else 'up'}.weight",
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_w2w_layout_all_spellings(unet, layout, spelling):
    wd = _weight_dimensions(layout, SPELLINGS[spelling])
    assert layout_from_weight_dimensions(wd, unet, expected_dim=layout.dim) == layout
    names = [n for n, _ in unet.named_modules()]
    assert layout_from_weight_dimensions(wd, names) == layout


def test_w2w_layout_follows_file_order(unet, layout):
    wd = _weight_dimensions(layout, SPELLINGS["kohya"])
    items = list(wd.items())
    pairs = [items[i:i + 2] for i in range(0, len(items), 2)][::-1]
    rev = dict(kv for pair in pairs for kv in pair)
    got = layout_from_weight_dimensions(rev, unet)
    assert [e.module for e in got.entries] == [e.module for e in layout.entries][::-1]


def test_w2w_layout_errors(unet, layout):
    wd = _weight_dimensions(layout, SPELLINGS["peft"])
    with pytest.raises(LayoutError, match="something_else"):
        layout_from_weight_dimensions({**wd, "something_else.weight": [[4], torch.Size([2, 2])]}, unet)
    ghost = "base_model.model.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    with pytest.raises(LayoutError, match="down_blocks.7"):
        layout_from_weight_dimensions({**wd, ghost: [[32], torch.Size([1, 32])]}, unet)
    k0 = next(iter(wd))
    with pytest.raises(LayoutError, match="mis-sized"):
        layout_from_weight_dimensions({**wd, k0: [[31], torch.Size([1, 32])]}, unet)
    e = layout.entries[0]
    shifted = {**wd, k0: [[e.in_features + 1], torch.Size([1, e.in_features + 1])]}
    with pytest.raises(LayoutError, match="do not fit"):
        layout_from_weight_dimensions(shifted, unet)
    with pytest.raises(LayoutError, match="99,648"):
        layout_from_weight_dimensions(wd, unet, expected_dim=99648)


def test_delta_norms_match_the_product_of_a_and_b(layout):
    W = torch.randn(3, layout.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = layout.delta_norms(W)
    assert got.shape == (3, len(layout.entries))
    for n in (0, 2):
        for j in (0, len(layout.entries) - 1):
            e = layout.entries[j]
            A, B = W[n, e.a_slice].view(e.a_shape), W[n, e.b_slice].view(e.b_shape)
            assert torch.isclose(got[n, j], layout.scale * torch.linalg.matrix_norm(B @ A), rtol=1e-9)
    with pytest.raises(LayoutError, match="must be"):
        layout.delta_norms(W[:, :-1])
