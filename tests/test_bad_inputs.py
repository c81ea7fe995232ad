"""Issue 15, "bad input never passes silently": every hole found is closed here, with the fix in the message.

Each case feeds one kind of bad input (wrong image range, NaN rows, wrong dtypes, damaged or mismatched files,
wrong devices) and asserts the W2WError and the phrase of its message that says how to fix it. The last
tests check that building the same space twice gives the same bytes. Data are tiny and synthetic.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from w2wlib.data import open_weights, save_weights, write_attributes_csv
from w2wlib.errors import LayoutError, ProfileError, W2WError
from w2wlib.lora import LoraLayout
from w2wlib.profile import load_profile
from w2wlib.spaces import PCASpace, VAEConfig, VAESpace, load_space
from w2wlib.world.encoder import EncoderConfig, IdentityEncoder

N = 20
MODULES = [("down_blocks.0.attn1.to_q", 8, 8), ("down_blocks.0.attn1.to_v", 8, 8)]  # rank 1: D = 32
FILES = "files"


@pytest.fixture(scope="module")
def layout() -> LoraLayout:
    return LoraLayout.from_modules(MODULES, rank=1, alpha=27.0, target_modules=("to_q", "to_v"))


@pytest.fixture(scope="module")
def W(layout) -> torch.Tensor:
    return torch.randn(N, layout.dim, generator=torch.Generator().manual_seed(0)) * 0.1 + 0.5


def weight_dimensions(layout, spell=lambda m, ab: f"base_model.model.{m}.lora_{ab}.weight"):
    """w2w's ``weight_dimensions.pt``: key -> [[numel], shape], in flat order; ``spell`` writes the keys."""
    wd = collections.OrderedDict()
    for e in layout.entries:
        wd[spell(e.module, "A")] = [[e.a_shape[0] * e.a_shape[1]], torch.Size(e.a_shape)]
        wd[spell(e.module, "B")] = [[e.b_shape[0] * e.b_shape[1]], torch.Size(e.b_shape)]
    return wd


def public(folder: Path, W: torch.Tensor, layout, **replace) -> Path:
    """The public w2w files in the hub arrangement; ``replace`` swaps one file's object (by file stem)."""
    defaults = {"all_weights": lambda: W, "mean": lambda: W.mean(0), "std": lambda: W.std(0),
                "weight_dimensions": lambda: weight_dimensions(layout)}
    for stem, make in defaults.items():
        obj = replace[stem] if stem in replace else make()
        sub = folder / ("weights_datasets/identities" if stem == "all_weights" else FILES)
        sub.mkdir(parents=True, exist_ok=True)
        torch.save(obj, sub / f"{stem}.pt")
    return folder


def ours(folder: Path, W: torch.Tensor, layout) -> Path:
    return save_weights(folder, W, layout, attributes={"Male": np.arange(N) % 2},
                        identity_seeds=list(range(100, 100 + N)))


def cut(path: Path, keep: float = 0.5) -> None:
    """Truncate a file as an interrupted download or copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---------------------------------------------------------------------- the identity encoder


@pytest.fixture(scope="module")
def encoder() -> IdentityEncoder:
    return IdentityEncoder(EncoderConfig.micro()).eval()


def faces(n: int = 2) -> torch.Tensor:
    """Float images [n, 3, 64, 64] in [-1, 1], dark and bright pixels both, like real faces."""
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("bad, fix", [
    (lambda x: (x + 1) / 2, r"\[0, 1\] convention: pass x \* 2 - 1"),                   # floats in [0, 1]
    (lambda x: (x + 1) * 127.5, r"looks like \[0, 255\]: pass x / 127.5 - 1"),           # floats in [0, 255]
    (lambda x: x * 1.5, r"span \[-1\.\d+, 1\.\d+\]: clamp them with x.clamp\(-1, 1\)"),  # overshoot
    (lambda x: x.index_fill(0, torch.tensor([1]), float("nan")), r"image\(s\) have NaN/inf pixels \(first at index \[1\]\): drop"),
    (lambda x: x.index_fill(0, torch.tensor([0]), float("inf")), r"NaN/inf pixels \(first at index \[0\]\)"),
    (lambda x: x[:, :, :1, :1], r"1x1 pixels, smaller than the encoder's 64x64 input: pass images of at least 64x64"),
    (lambda x: x[:, :, :32, :], r"32x64 pixels.*at least 64x64"),
], ids=["range-0-1", "range-0-255", "overshoot", "nan", "inf", "1x1-float", "32x64-float"])
def test_encoder_refuses_float_images_it_would_misread(encoder, bad, fix):
    with pytest.raises(W2WError, match=fix):
        encoder.embed(bad(faces()))
    with pytest.raises(W2WError, match=fix):
        encoder.predict_attributes(bad(faces()))


@pytest.mark.parametrize("images", [np.zeros((1, 1, 1, 3), np.uint8), torch.zeros(2, 16, 16, 3, dtype=torch.uint8)],
                         ids=["1x1-numpy", "16x16-torch"])
def test_encoder_refuses_tiny_uint8_images(encoder, images):
    with pytest.raises(W2WError, match=r"smaller than the encoder's 64x64 input: pass images of at least 64x64"):
        encoder.embed(images)


def test_encoder_still_takes_good_images(encoder):
    x = faces()
    assert encoder.embed(x).shape == (2, 64)
    assert encoder.embed(x.clamp(-1, 1) * (1 + 1e-4)).shape == (2, 64)          # rounding overshoot is tolerated
    assert encoder.embed(np.zeros((1, 128, 96, 3), np.uint8)).shape == (1, 64)  # larger images are resized


# ---------------------------------------------------------------------- NaN rows, wrong dtypes


def test_nan_row_in_the_middle_is_named_when_read(tmp_path, W, layout):
    """Public layout: opening reads only the first and last rows, so the middle is checked as it is read."""
    bad = W.clone()
    bad[7, 3] = float("nan")
    ds = open_weights(public(tmp_path, bad, layout, mean=W.mean(0), std=W.std(0)))
    for read in (lambda: ds.rows([2, 7]), lambda: ds.rows(slice(None)), lambda: list(ds.iter_batches(4))):
        with pytest.raises(W2WError, match=r"Row\(s\) \[7\] of all_weights .* run ds.check_finite\(\) to list every bad row"):
            read()
    assert ds.rows([0, 8]).shape == (2, layout.dim)                             # good rows still read
    with pytest.raises(W2WError, match=r"1 row\(s\) .* first rows \[7\]; drop them"):
        ds.check_finite(batch_size=4)


def test_nan_row_in_our_file_is_named_when_read(tmp_path, W, layout):
    """Our layout, through the direct file reads: a NaN written into the middle row of the file."""
    ours(tmp_path, W, layout)
    path = tmp_path / "all_weights.safetensors"
    with open(path, "r+b") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
        f.seek(start + (11 * layout.dim + 5) * 4)
        f.write(np.float32(np.nan).tobytes())
    ds = open_weights(tmp_path)
    with pytest.raises(W2WError, match=r"Row\(s\) \[11\] of all_weights.*check_finite"):
        ds.rows([3, 11, 12])


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_public_weights_of_a_wrong_dtype_are_refused(tmp_path, W, layout, dtype):
    public(tmp_path, W.to(dtype), layout, mean=W.mean(0), std=W.std(0))
    name = str(dtype).replace("torch.", "")
    with pytest.raises(W2WError, match=rf"all_weights in .*all_weights\.pt has dtype {name}, but .* must be float32 or float16"):
        open_weights(tmp_path)


@pytest.mark.parametrize("stem, dtype", [("mean", torch.int64), ("std", torch.complex64)])
def test_public_statistics_of_a_wrong_dtype_are_refused(tmp_path, W, layout, stem, dtype):
    public(tmp_path, W, layout, **{stem: getattr(W, stem)(0).to(dtype)})
    with pytest.raises(W2WError, match=rf"{stem} in .*{stem}\.pt has dtype {str(dtype)[6:]}.*fetch the original with"):
        open_weights(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_save_weights_refuses_non_float_weights(tmp_path, W, layout, dtype):
    with pytest.raises(W2WError, match=rf"weights have dtype {str(dtype)[6:]}.*pass weights.float\(\) if"):
        save_weights(tmp_path, (W * 10).to(dtype), layout)


def test_save_weights_refuses_seeds_that_are_not_ints(tmp_path, W, layout):
    with pytest.raises(W2WError, match="identity_seeds must be ints, one per row"):
        save_weights(tmp_path, W, layout, identity_seeds=[i + 0.5 for i in range(N)])


@pytest.mark.parametrize("call, fix", [
    (lambda s, x: s.encode(x.long()), r"w_std has dtype int64.*pass w_std.float\(\)"),
    (lambda s, x: s.encode(x > 0), r"w_std has dtype bool"),
    (lambda s, x: s.encode_weights(x.to(torch.complex64)), r"w has dtype complex64.*pass w.float\(\)"),
    (lambda s, x: s.decode(torch.zeros(2, 3, dtype=torch.int32)), r"z has dtype int32.*pass z.float\(\)"),
    (lambda s, x: s.interpolate(torch.zeros(3, dtype=torch.long), torch.ones(3), 4), r"a has dtype int64"),
    (lambda s, x: s.set_standardisation(torch.zeros(x.shape[1], dtype=torch.long), torch.ones(x.shape[1])),
     r"mean has dtype int64"),
], ids=["encode-int", "encode-bool", "encode-weights-complex", "decode-int", "interpolate-int", "stats-int"])
def test_spaces_refuse_non_float_inputs(W, call, fix):
    space = PCASpace.fit(W, 3)
    with pytest.raises(W2WError, match=fix):
        call(space, W)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -1.0, "1"])
@pytest.mark.parametrize("kind", ["pca", "vae"])
def test_sample_scale_must_be_finite_and_positive(W, kind, scale):
    space = PCASpace.fit(W, 3) if kind == "pca" else VAESpace(VAEConfig.scaled(W.shape[1], latent=3), seed=0)
    with pytest.raises(W2WError, match=r"scale must be a finite number > 0 \(1.0 samples the prior as fitted"):
        space.sample(2, torch.Generator().manual_seed(0), scale=scale)
    with pytest.raises(W2WError, match="scale must be a finite number > 0"):
        space.sample_weights(2, scale=scale)


def test_sample_needs_a_whole_number_of_samples(W):
    with pytest.raises(W2WError, match=r"sample needs an int n >= 1, not 2.5"):
        PCASpace.fit(W, 3).sample(2.5)


# ---------------------------------------------------------------------- attribute tables


def test_short_attributes_csv_in_files_is_not_ignored(tmp_path, W, layout):
    public(tmp_path, W, layout)
    write_attributes_csv(tmp_path / FILES / "attributes.csv", {"Male": np.arange(15) % 2})
    with pytest.raises(W2WError, match=r"files/attributes.csv has 15 identities but all_weights has 20 rows: .*"
                                       r"write_attributes_csv, or delete it"):
        open_weights(tmp_path)


def test_the_pickle_refusal_names_a_csv_the_loader_reads(tmp_path, W, layout):
    public(tmp_path, W, layout)
    male = np.where(np.arange(N) % 3 == 0, 1, -1)
    torch.save({"Male": male}, tmp_path / FILES / "identity_df.pt")           # numpy inside: a real pickle
    ds = open_weights(tmp_path)
    with pytest.raises(W2WError, match=r"is a pickle.*write_attributes_csv\('[^']+'") as err:
        _ = ds.attributes
    csv = Path(err.value.args[0].split("write_attributes_csv('")[1].split("'")[0])
    assert csv == tmp_path / FILES / "attributes.csv"
    write_attributes_csv(csv, open_weights(tmp_path, trust_pickles=True).attributes)   # what the message says
    assert open_weights(tmp_path).attributes["Male"].tolist() == (male > 0).astype(int).tolist()


def test_ragged_attributes_csv(tmp_path, W, layout):
    ours(tmp_path, W, layout)
    lines = (tmp_path / "attributes.csv").read_text().splitlines()
    lines[4] += ",1"
    (tmp_path / "attributes.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(W2WError, match=r"attributes.csv: line 5 has 3 fields but the header has 2.*save_weights"):
        open_weights(tmp_path)


def test_attributes_csv_in_another_order(tmp_path, W, layout):
    ours(tmp_path, W, layout)
    lines = (tmp_path / "attributes.csv").read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    (tmp_path / "attributes.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(W2WError, match=r"not in the order of identities.json .*write_attributes_csv"):
        open_weights(tmp_path)


# ---------------------------------------------------------------------- damaged files of our layout


@pytest.mark.parametrize("name, text, fix", [
    ("layout.json", "{not json", r"layout.json is not valid JSON .*: the file is damaged; write it again with"),
    ("layout.json", "[1, 2]", r"layout.json holds a JSON list, but layout.json is a LoRA layout"),
    ("layout.json", '{"rank": 1}', r"layout.json is not a LoRA layout \(KeyError: 'entries'\); write it again"),
    ("weight_dimensions.json", "\ufffd\x00", r"weight_dimensions.json is not valid JSON"),
    ("weight_dimensions.json", '{"a": 1}', r"weight_dimensions.json holds a JSON dict, but .* a list of \[key, \[rows, cols\]\]"),
    ("weight_dimensions.json", "[1, 2]", r"weight_dimensions.json entries are not \[key, \[rows, cols\]\] pairs"),
    ("identities.json", "", r"identities.json is not valid JSON"),
    ("identities.json", "[]", r"identities.json holds a JSON list"),
    ("identities.json", "{}", r"identities.json has no dataset_id, so save_weights did not write it"),
], ids=["layout-garbage", "layout-list", "layout-keys", "wd-garbage", "wd-dict", "wd-items", "ids-empty", "ids-list",
        "ids-no-id"])
def test_damaged_json_files_name_the_file_and_the_fix(tmp_path, W, layout, name, text, fix):
    ours(tmp_path, W, layout)
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(W2WError, match=fix):
        open_weights(tmp_path)


def test_identity_seeds_that_are_not_ints(tmp_path, W, layout):
    ours(tmp_path, W, layout)
    info = json.loads((tmp_path / "identities.json").read_text())
    info["identity_seeds"] = ["a"] * N
    (tmp_path / "identities.json").write_text(json.dumps(info))
    with pytest.raises(W2WError, match=r"identity_seeds must be a list of ints .*write it again with"):
        open_weights(tmp_path)


def test_identities_one_seed_short_blames_identities_json(tmp_path, W, layout):
    ours(tmp_path, W, layout)
    info = json.loads((tmp_path / "identities.json").read_text())
    info["identity_seeds"] = info["identity_seeds"][:-1]
    (tmp_path / "identities.json").write_text(json.dumps(info))
    with pytest.raises(W2WError, match=r"identities.json lists 19 identity seeds but all_weights.safetensors has 20 "
                                       r"rows: .*write it again with w2wlib.data.save_weights") as err:
        open_weights(tmp_path)
    assert "attributes.csv" not in str(err.value)


@pytest.mark.parametrize("name", ["mean.safetensors", "std.safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.0005])
def test_truncated_statistics_name_the_file(tmp_path, W, layout, name, keep):
    ours(tmp_path, W, layout)
    cut(tmp_path / name, keep)
    with pytest.raises(W2WError, match=rf"{name} is truncated or corrupt .*write it again with w2wlib.data.save_weights"):
        open_weights(tmp_path)


# ---------------------------------------------------------------------- damaged files of the public layout


@pytest.mark.parametrize("rel, fetch", [
    ("weights_datasets/identities/all_weights.pt", r"download_w2w\(folder, include_all_weights=True\)"),
    ("files/mean.pt", r"download_w2w\(folder\)"),
    ("files/std.pt", r"download_w2w\(folder\)"),
    ("files/weight_dimensions.pt", r"download_w2w\(folder\)"),
])
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_public_files_cut_short_name_the_file(tmp_path, W, layout, rel, fetch, keep):
    public(tmp_path, W, layout)
    cut(tmp_path / rel, keep)
    with pytest.raises(W2WError, match=rf"Could not read .*{rel} .*cut short by an interrupted download: delete it "
                                       rf"and fetch it again with `w2wlib.data.{fetch}`"):
        open_weights(tmp_path)


def test_identity_df_cut_short_is_not_called_a_pickle(tmp_path, W, layout):
    public(tmp_path, W, layout)
    torch.save({"Male": torch.arange(N) % 2}, tmp_path / FILES / "identity_df.pt")
    cut(tmp_path / FILES / "identity_df.pt")
    with pytest.raises(W2WError, match=r"Could not read .*identity_df.pt .*download_w2w\(folder, files=\['identity_df.pt'\]\)"):
        _ = open_weights(tmp_path).attributes


# ---------------------------------------------------------------------- LoRA key spellings


def test_lora_unet_underscore_keys_ask_for_the_unet(tmp_path, W, layout):
    spell = lambda m, ab: f"lora_unet_{m.replace('.', '_')}.lora.{ {'A': 'down', 'B': 'up'}[ab]}.weight"
    ds = open_weights(public(tmp_path, W, layout, weight_dimensions=weight_dimensions(layout, spell)))
    with pytest.raises(LayoutError, match=r"lora_unet_down_blocks_0_attn1_to_q.lora.down.weight' spells its module "
                                          r"with underscores .*pass the UNet \(or its module names\) to lora_layout\(\)"):
        ds.lora_layout()
    assert ds.lora_layout([m for m, _, _ in MODULES]) == layout             # the fix works


def test_dotted_lora_unet_keys_need_no_unet(tmp_path, W, layout):
    spell = lambda m, ab: f"lora_unet.{m}.lora.{ {'A': 'down', 'B': 'up'}[ab]}.weight"
    ds = open_weights(public(tmp_path, W, layout, weight_dimensions=weight_dimensions(layout, spell)))
    assert ds.lora_layout() == layout


def test_keys_of_another_model_say_what_to_check(tmp_path, W, layout):
    ds = open_weights(public(tmp_path, W, layout))
    with pytest.raises(LayoutError, match=r"match no LoRA module .* are these LoRAs of this base model \(pass its UNet"):
        ds.lora_layout(["mid_block.attn1.to_q", "mid_block.attn1.to_v"])


# ---------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", ["banana", "cuda:x", "meta"])
def test_unknown_devices_list_the_valid_ones(device):
    with pytest.raises(ProfileError, match=rf"device '{device}'.*auto, cpu, cuda, cuda:<index> or mps"):
        _ = load_profile("smoke", {"device": device}).device


def test_cpu_devices_still_parse():
    assert load_profile("smoke", {"device": "cpu"}).device == torch.device("cpu")


# ---------------------------------------------------------------------- reproducible to the byte


def folder_bytes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_saving_the_same_space_twice_gives_identical_folders(tmp_path, W):
    x = (W - W.mean(0)) / W.std(0)
    for kind, make in (("pca", lambda: PCASpace.fit(W, 4)),
                       ("vae", lambda: VAESpace(VAEConfig.scaled(W.shape[1], latent=4), seed=0))):
        saved = [folder_bytes(make().save(tmp_path / f"{kind}{i}")) for i in range(3)]  # three saves, three maps
        assert saved[0] == saved[1] == saved[2] and len(saved[0]) == 2
        assert load_space(tmp_path / f"{kind}0").encode(x).shape == (N, 4)
    PCASpace.fit(W[1:], 4).save(tmp_path / "other")                            # other content, other id
    ids = [json.loads((tmp_path / f / "config.json").read_text())["space_id"] for f in ("pca0", "other")]
    assert ids[0] != ids[1]


def test_two_spaces_builds_give_identical_files(tmp_path, W, layout):
    from w2wlib.spaces.build import SpacesConfig, build_spaces

    big = torch.randn(40, layout.dim, generator=torch.Generator().manual_seed(1))
    save_weights(tmp_path / "ds", big, layout)
    cfg = SpacesConfig.preset("micro")
    for out in ("a", "b"):
        manifest = build_spaces(tmp_path / out, cfg, tmp_path / "ds", progress=False)
        assert manifest["build_seconds"].keys() == {"pca", "vae", "amortised"}            # timings: the manifest's only
    a, b = (folder_bytes(tmp_path / o) for o in ("a", "b"))
    shipped = {k for k in a if not k.startswith("_work") and k != "manifest.json"}
    assert shipped >= {"pca/config.json", "vae/tensors.safetensors", "vae_history.json", "split.json"}
    assert {k: a[k] for k in shipped} == {k: b[k] for k in shipped}
    history = json.loads((tmp_path / "a" / "vae_history.json").read_text())
    assert history and not any("elapsed_s" in row for row in history)


def test_two_saves_of_one_dataset_give_identical_files_and_other_data_another_id(tmp_path, W, layout):
    for out in ("a", "b"):
        save_weights(tmp_path / out, W, layout, identity_seeds=range(len(W)), extra={"steps": 3})
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    save_weights(tmp_path / "c", W * 2, layout, identity_seeds=range(len(W)), extra={"steps": 3})
    assert open_weights(tmp_path / "c").dataset_id != open_weights(tmp_path / "a").dataset_id
    # a file from another save is still caught on open
    (tmp_path / "a" / "mean.safetensors").write_bytes((tmp_path / "c" / "mean.safetensors").read_bytes())
    with pytest.raises(W2WError, match="come from different saves"):
        open_weights(tmp_path / "a")
