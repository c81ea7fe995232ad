"""Tests of w2wlib.data on small fakes with exactly the public formats (no network, ever)."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from w2wlib.data import (
    W2W_FILES,
    download_w2w,
    export_w2w_layout,
    open_weights,
    save_weights,
    write_attributes_csv,
)
from w2wlib.errors import ArtifactMissingError, LayoutError, W2WError
from w2wlib.lora import LoraLayout

N = 50
MODULES = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 32, 32),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", 32, 32),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q", 64, 64),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", 48, 64),
]


@pytest.fixture(scope="module")
def layout() -> LoraLayout:
    return LoraLayout.from_modules(MODULES, rank=1, alpha=27.0, target_modules=("to_q", "to_v"))


@pytest.fixture(scope="module")
def W(layout) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, layout.dim, generator=g) * 0.05 + torch.linspace(-1, 1, layout.dim)


def w2w_weight_dimensions(layout) -> collections.OrderedDict:
    """Exactly as w2w stores it: peft key -> [[numel], shape], in flat order."""
    wd = collections.OrderedDict()
    for e in layout.entries:
        wd[f"base_model.model.{e.module}.lora_A.weight"] = [[e.rank * e.in_features], torch.Size(e.a_shape)]
        wd[f"base_model.model.{e.module}.lora_B.weight"] = [[e.out_features * e.rank], torch.Size(e.b_shape)]
    return wd


def make_public(folder: Path, W: torch.Tensor, layout, arrangement: str = "hub", std=None, mean=None) -> Path:
    """A fake of the public w2w files: torch.save of plain tensors and an OrderedDict."""
    def where(name):
        sub = ("weights_datasets/identities" if name == "all_weights.pt" else "files") if arrangement == "hub" else ""
        (folder / sub).mkdir(parents=True, exist_ok=True)
        return folder / sub / name
    torch.save(W, where("all_weights.pt"))
    torch.save(W.mean(0) if mean is None else mean, where("mean.pt"))
    torch.save(W.std(0) if std is None else std, where("std.pt"))
    torch.save(w2w_weight_dimensions(layout), where("weight_dimensions.pt"))
    (where("adapter_config.json")).write_text(json.dumps({"r": 1, "lora_alpha": 27}))
    return folder


def mapping_of(t: torch.Tensor) -> str | None:
    """The path of the file mapping that holds ``t``'s data, from /proc/self/maps."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5] if len(parts) == 6 else None
    return None


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


# ---------------------------------------------------------------------- public layout


@pytest.mark.parametrize("arrangement", ["hub", "flat"])
def test_public_layout_opens(tmp_path, W, layout, arrangement):
    make_public(tmp_path, W, layout, arrangement)
    ds = open_weights(tmp_path)
    assert ds.layout == "w2w" and len(ds) == N and ds.dim == layout.dim
    assert torch.equal(ds.rows(slice(None)), W)
    assert torch.equal(ds.rows([3, 0, 3, -1]), W[[3, 0, 3, N - 1]])
    assert ds.rows(7).shape == (1, layout.dim)
    got = ds.lora_layout()
    assert got.dim == layout.dim and got.entries == layout.entries and got.alpha == 27.0
    assert ds.weight_dimensions[1] == (f"base_model.model.{MODULES[0][0]}.lora_B.weight", (32, 1))
    assert ds.identity_seeds is None and ds.attributes is None


@linux_only
def test_weights_are_memory_mapped(tmp_path, W, layout):
    make_public(tmp_path / "pub", W, layout)
    save_weights(tmp_path / "ours", W, layout)
    for sub, name in (("pub", "all_weights.pt"), ("ours", "all_weights.safetensors")):
        ds = open_weights(tmp_path / sub)
        path = mapping_of(ds.weights)
        assert path is not None and path.endswith(name), path
        ds.weights[0, 0] = 123.0          # private mapping: the file never changes
        assert open_weights(tmp_path / sub).rows(0)[0, 0] == W[0, 0]
    assert mapping_of(ds.rows(slice(0, 2))) != mapping_of(ds.weights)  # rows() are copies


def test_readonly_file_still_maps(tmp_path, W, layout):
    save_weights(tmp_path, W, layout)
    (tmp_path / "all_weights.safetensors").chmod(0o444)
    assert torch.equal(open_weights(tmp_path).rows([1, 2]), W[[1, 2]])


# ---------------------------------------------------------------------- ours


def test_ours_round_trip_float32(tmp_path, W, layout):
    seeds = list(range(100, 100 + N))
    male = np.arange(N) % 2
    save_weights(tmp_path, W, layout, attributes={"Male": male, "Smiling": male == 0},
                 identity_seeds=seeds, extra={"held_out_seeds": [1, 2], "steps": 800})
    ds = open_weights(tmp_path)
    assert ds.layout == "ours" and ds.weights.dtype == torch.float32
    assert torch.equal(ds.rows(slice(None)), W)
    assert ds.identity_seeds == seeds and ds.held_out_seeds == [1, 2] and ds.extra["steps"] == 800
    assert np.array_equal(ds.attributes["Male"], male) and ds.attributes["Smiling"].tolist() == (1 - male).tolist()
    assert ds.lora_layout() == layout
    assert torch.allclose(ds.mean, W.double().mean(0).float(), atol=1e-6)
    assert torch.allclose(ds.std, W.double().std(0).float(), rtol=1e-5)
    z = ds.standardise(ds.rows(slice(0, 5)))
    assert torch.allclose(ds.unstandardise(z), W[:5], atol=1e-6)
    # all rows standardised: every column has mean 0 and std 1, up to float32 rounding of (w - mean) / std
    # (eps * |w| / std = 1.2e-7 * 1 / 0.05 ~ 2.4e-6 per entry)
    z_all = ds.standardise(ds.rows(slice(None)))                       # [N, D]
    assert torch.equal(z_all[:5], z)
    torch.testing.assert_close(z_all.mean(0), torch.zeros(layout.dim), atol=1e-5, rtol=0)
    torch.testing.assert_close(z_all.std(0), torch.ones(layout.dim), atol=1e-6, rtol=0)
    from safetensors.torch import load_file  # the file is a standard safetensors file
    assert torch.equal(load_file(tmp_path / "all_weights.safetensors")["weights"], W)
    header = (tmp_path / "attributes.csv").read_text().splitlines()
    assert header[0] == "identity_seed,Male,Smiling" and header[1] == "100,0,1"


def test_ours_float16(tmp_path, W, layout):
    save_weights(tmp_path, W, layout, dtype=torch.float16)
    ds = open_weights(tmp_path)
    assert ds.weights.dtype == torch.float16
    rows = ds.rows(slice(None))
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows, W, rtol=1e-3, atol=1e-4)
    assert torch.equal(rows, W.half().float())
    torch.testing.assert_close(ds.std, rows.double().std(0).float())
    assert (tmp_path / "all_weights.safetensors").stat().st_size < W.numel() * 2 + 1000


def test_iter_batches_cover_every_row_once(tmp_path, W, layout):
    save_weights(tmp_path, W, layout)
    ds = open_weights(tmp_path)
    plain = list(ds.iter_batches(16))
    assert [b.shape[0] for b in plain] == [16, 16, 16, 2] and torch.equal(torch.cat(plain), W)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(3)
        runs.append(list(ds.iter_batches(16, shuffle=True, generator=g, with_index=True)))
    idx = torch.cat([i for i, _ in runs[0]])
    assert sorted(idx.tolist()) == list(range(N)) and not torch.equal(idx, torch.arange(N))
    assert torch.equal(idx, torch.cat([i for i, _ in runs[1]]))
    for i, b in runs[0]:
        assert torch.equal(b, W[i])
    assert len(list(ds.iter_batches(16, drop_last=True))) == 3


def test_ours_exported_to_public_layout_gives_identical_rows(tmp_path, W, layout):
    save_weights(tmp_path / "ours", W, layout, dtype=torch.float16, attributes={"Male": np.arange(N) % 2})
    ours = open_weights(tmp_path / "ours")
    for arrangement in ("hub", "flat"):
        out = export_w2w_layout(ours, tmp_path / arrangement, arrangement=arrangement)
        pub = open_weights(out)
        assert pub.layout == "w2w"
        assert torch.equal(pub.rows(slice(None)), ours.rows(slice(None)))
        assert torch.equal(pub.mean, ours.mean) and torch.equal(pub.std, ours.std)
        assert pub.lora_layout().entries == ours.lora_layout().entries
        assert np.array_equal(pub.attributes["Male"], ours.attributes["Male"])
    assert (tmp_path / "hub/weights_datasets/identities/all_weights.pt").is_file()
    assert (tmp_path / "hub/files/weight_dimensions.pt").is_file()
    with pytest.raises(W2WError, match="overwrite=True"):
        export_w2w_layout(ours, tmp_path / "hub")


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["mean.pt", "std.pt", "weight_dimensions.pt", "all_weights.pt"])
def test_public_missing_file_is_named(tmp_path, W, layout, name):
    make_public(tmp_path, W[:4], layout, "flat")
    (tmp_path / name).unlink()
    with pytest.raises(ArtifactMissingError, match=name.replace(".", r"\.")) as err:
        open_weights(tmp_path, layout="w2w")
    assert "download_w2w" in str(err.value)


@pytest.mark.parametrize("name", ["mean.safetensors", "layout.json", "identities.json"])
def test_ours_missing_file_is_named(tmp_path, W, layout, name):
    save_weights(tmp_path, W[:4], layout)
    (tmp_path / name).unlink()
    with pytest.raises(ArtifactMissingError, match=name.replace(".", r"\.")) as err:
        open_weights(tmp_path)
    assert "w2wlib.data.save_weights" in str(err.value)


def test_empty_folder_and_no_folder(tmp_path):
    with pytest.raises(ArtifactMissingError, match="all_weights"):
        open_weights(tmp_path)
    with pytest.raises(ArtifactMissingError, match="nope"):
        open_weights(tmp_path / "nope")


def test_dim_mismatch_names_both_numbers(tmp_path, W, layout):
    make_public(tmp_path, W[:4], layout, "flat")
    torch.save(W[:4, :-8].clone(), tmp_path / "all_weights.pt")
    with pytest.raises(LayoutError, match=f"{layout.dim - 8:,} columns.*sums to {layout.dim:,}"):
        open_weights(tmp_path)
    make_public(tmp_path, W[:4], layout, "flat")
    torch.save(W[:4, :-8].mean(0), tmp_path / "mean.pt")
    with pytest.raises(LayoutError, match=r"mean has shape"):
        open_weights(tmp_path)
    torch.save(W[0].clone(), tmp_path / "all_weights.pt")
    with pytest.raises(W2WError, match="2-D"):
        open_weights(tmp_path)
    with pytest.raises(LayoutError, match=f"{layout.dim:,}"):
        save_weights(tmp_path / "x", W[:, :-1], layout)


def test_nan_rows_reported_by_index(tmp_path, W, layout):
    bad = W.clone()
    bad[7, 3] = float("nan")
    bad[20, 0] = float("inf")
    make_public(tmp_path, bad, layout, "flat", std=W.std(0), mean=W.mean(0))
    ds = open_weights(tmp_path)  # first and last rows are fine: opening stays cheap
    with pytest.raises(W2WError, match=r"2 row\(s\).*\[7, 20\]"):
        ds.check_finite(batch_size=8)
    bad[N - 1, 0] = float("nan")
    torch.save(bad, tmp_path / "all_weights.pt")
    with pytest.raises(W2WError, match=f"Row {N - 1}.*check_finite"):
        open_weights(tmp_path)
    with pytest.raises(W2WError, match=r"\[7, 20, 49\]"):
        save_weights(tmp_path / "ours", bad, layout)
    assert not (tmp_path / "ours").exists() or not any((tmp_path / "ours").iterdir())


def test_zero_or_nan_std(tmp_path, W, layout):
    std = W.std(0)
    std[5] = 0.0
    make_public(tmp_path, W[:4], layout, "flat", std=std)
    with pytest.raises(W2WError, match=r"std has 1 zero/NaN entries \(first at columns \[5\]\)"):
        open_weights(tmp_path)
    std[5] = float("nan")
    torch.save(std, tmp_path / "std.pt")
    with pytest.raises(W2WError, match="std"):
        open_weights(tmp_path)
    const = W.clone()
    const[:, 9] = 1.0
    with pytest.raises(W2WError, match=r"constant.*\[9\]"):
        save_weights(tmp_path / "ours", const, layout)


def test_overwrite_refused_and_original_untouched(tmp_path, W, layout):
    save_weights(tmp_path, W, layout, attributes={"Male": np.arange(N) % 2})
    before = {p.name: sha(p) for p in tmp_path.iterdir()}
    with pytest.raises(W2WError, match="overwrite=True"):
        save_weights(tmp_path, W * 2, layout)
    with pytest.raises(W2WError, match="shape"):  # bad input, even with overwrite=True
        save_weights(tmp_path, W, layout, attributes={"Male": np.ones(3)}, overwrite=True)
    with pytest.raises(W2WError, match="NaN"):
        save_weights(tmp_path, W * float("nan"), layout, overwrite=True)
    assert {p.name: sha(p) for p in tmp_path.iterdir()} == before  # no temporaries left either
    save_weights(tmp_path, W * 2, layout, overwrite=True)
    ds = open_weights(tmp_path)
    assert torch.equal(ds.rows(slice(None)), W * 2) and ds.attributes is None  # stale CSV removed
    save_weights(tmp_path, ds.weights, layout, dtype=torch.float16, overwrite=True)  # in place, from its own mmap
    assert torch.equal(open_weights(tmp_path).rows(slice(None)), (W * 2).half().float())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_mixed_saves_detected(tmp_path, W, layout):
    save_weights(tmp_path / "a", W, layout)
    save_weights(tmp_path / "b", W + 1, layout)   # other data (two saves of the same data are the same bytes)
    (tmp_path / "b/std.safetensors").replace(tmp_path / "a/std.safetensors")
    with pytest.raises(W2WError, match="different saves"):
        open_weights(tmp_path / "a")


def test_attribute_count_mismatch(tmp_path, W, layout):
    save_weights(tmp_path, W, layout, attributes={"Male": np.arange(N) % 2})
    lines = (tmp_path / "attributes.csv").read_text().splitlines()
    (tmp_path / "attributes.csv").write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(W2WError, match=f"{N - 3:,} identities but all_weights has {N:,}"):
        open_weights(tmp_path)


def test_identity_df_pickle_refused_unless_trusted(tmp_path, W, layout):
    make_public(tmp_path, W, layout)
    signs = np.where(np.arange(N) % 3 == 0, 1, -1)
    torch.save({"Male": signs, "Young": np.ones(N, dtype=np.int64)}, tmp_path / "files/identity_df.pt")
    ds = open_weights(tmp_path)  # opening never touches the pickle
    with pytest.raises(W2WError, match=r"identity_df\.pt is a pickle.*trust_pickles=True"):
        ds.attributes
    attrs = open_weights(tmp_path, trust_pickles=True).attributes
    assert attrs["Male"].tolist() == (signs > 0).astype(int).tolist() and attrs["Young"].all()
    write_attributes_csv(tmp_path / "weights_datasets/identities/attributes.csv", attrs)
    assert np.array_equal(open_weights(tmp_path).attributes["Male"], attrs["Male"])  # CSV, no pickle


def test_identity_df_of_plain_tensors_needs_no_trust(tmp_path, W, layout):
    make_public(tmp_path, W, layout)
    torch.save({"Male": torch.arange(N) % 2}, tmp_path / "files/identity_df.pt")
    assert open_weights(tmp_path).attributes["Male"].sum() == N // 2


def test_lora_layout_checks(tmp_path, W, layout):
    save_weights(tmp_path, W, layout)
    ds = open_weights(tmp_path)
    assert ds.lora_layout([m for m, _, _ in MODULES]) == layout
    with pytest.raises(LayoutError, match="missing"):
        ds.lora_layout(["something.else"])
    with pytest.raises(LayoutError, match="alpha"):
        ds.lora_layout(alpha=8.0)


# ---------------------------------------------------------------------- download


def fake_repo(folder: Path, W, layout) -> Path:
    make_public(folder, W, layout, "hub")
    (folder / "files/V.pt").write_bytes(b"V")
    (folder / "files/identity_df.pt").write_bytes(b"df")
    return folder


def test_download_from_local_repo_copy(tmp_path, W, layout):
    repo = fake_repo(tmp_path / "repo", W, layout)
    out = download_w2w(tmp_path / "dl", repo_id=str(repo))
    assert sorted(p.name for p in (out / "files").iterdir()) == sorted(
        ["mean.pt", "std.pt", "V.pt", "weight_dimensions.pt", "adapter_config.json"])
    assert not (out / "weights_datasets").exists()
    with pytest.raises(ArtifactMissingError, match="all_weights"):
        open_weights(out)
    download_w2w(out, repo_id=str(repo), include_all_weights=True, files=())
    assert torch.equal(open_weights(out).rows(slice(None)), W)
    with pytest.raises(ArtifactMissingError, match="nothing.pt"):
        download_w2w(tmp_path / "dl2", repo_id=str(repo), files=("nothing.pt",))


def test_download_through_huggingface_hub(tmp_path, W, layout, monkeypatch):
    import fnmatch
    import shutil

    import huggingface_hub

    repo, calls = fake_repo(tmp_path / "repo", W, layout), []

    def fake_snapshot_download(repo_id, *, allow_patterns, local_dir, revision=None, **kw):
        calls.append((repo_id, list(allow_patterns), revision))
        for p in repo.rglob("*"):
            rel = p.relative_to(repo).as_posix()
            if p.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, Path(local_dir) / rel)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = download_w2w(tmp_path / "dl", files=("mean.pt", "std.pt", "weight_dimensions.pt", "identity_df.pt"),
                       include_all_weights=True)
    assert calls == [("Snapchat/weights2weights",
                      ["files/mean.pt", "files/std.pt", "files/weight_dimensions.pt", "files/identity_df.pt",
                       "weights_datasets/identities/all_weights.pt"], None)]
    assert not (out / "files/V.pt").exists()
    assert torch.equal(open_weights(out).rows([0, 1]), W[:2])

    def offline(*a, **k):
        raise OSError("offline")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(W2WError, match="repo_id=<that folder>"):
        download_w2w(tmp_path / "dl3")


def test_w2w_file_names_are_public_names():
    assert set(W2W_FILES.values()) == {"all_weights.pt", "mean.pt", "std.pt", "weight_dimensions.pt",
                                       "identity_df.pt"}


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="resident memory is read from /proc (Linux)")
def test_rows_are_read_directly_so_resident_memory_stays_bounded(tmp_path):
    """A pass over 64 MB of rows, in both layouts: rows equal the mapping's, and RSS grows by about one batch."""
    layout = LoraLayout.from_modules([(f"down_blocks.0.attentions.0.transformer_blocks.0.attn{i}.to_q", 8192, 1)
                                      for i in (1, 2)], rank=1, alpha=27.0, target_modules=("to_q",))
    W = torch.randn(1024, layout.dim, generator=torch.Generator().manual_seed(0))            # [1024, 16386] ~64 MB
    ours = open_weights(save_weights(tmp_path / "ours", W, layout))
    public = open_weights(export_w2w_layout(ours, tmp_path / "w2w"))
    del W
    idx = torch.tensor([5, -1, 5, 0, 1000, 7, 6])                  # unsorted, repeated, negative
    for ds in (ours, public):
        assert ds._file is not None                                # the direct reader was located and self-checked
        assert torch.equal(ds.rows(idx), ds.weights[idx % len(ds)].float())
        assert torch.equal(ds.rows(slice(3, 9)), ds.weights[3:9].float())
        before = peak = _rss_bytes()
        for batch in ds.iter_batches(32, shuffle=True, generator=torch.Generator().manual_seed(1)):
            peak = max(peak, _rss_bytes())
        assert peak - before < 16 << 20, f"{ds.layout}: RSS grew by {(peak - before) >> 20} MB over a 64 MB pass"
