"""Tests of w2wlib.stages.portable_path: manifests record paths relative to the working directory."""

from __future__ import annotations

import json
import os

import pytest
import torch

from w2wlib.stages import portable_path


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """A fresh working directory with a sibling folder outside it."""
    (tmp_path / "work" / "data").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "work"


def test_a_path_inside_the_working_directory_is_recorded_relative(cwd):
    assert portable_path(cwd / "data" / "world") == os.path.join("data", "world")   # need not exist yet
    assert portable_path(str(cwd / "data")) == "data"
    assert portable_path("data/world") == os.path.join("data", "world")
    assert portable_path(cwd / "data" / ".." / "data" / "spaces") == os.path.join("data", "spaces")
    assert portable_path(cwd) == "."


def test_a_path_outside_the_working_directory_is_kept_as_given(cwd):
    outside = cwd.parent / "elsewhere" / "world"
    assert portable_path(outside) == str(outside)
    assert portable_path("../elsewhere/world") == os.path.join("..", "elsewhere", "world")


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_a_symlinked_working_directory_still_gives_relative_paths(tmp_path, monkeypatch):
    (tmp_path / "real" / "data").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    monkeypatch.chdir(tmp_path / "link")
    assert portable_path(tmp_path / "link" / "data") == "data"
    assert portable_path(tmp_path / "real" / "data") == "data"


def test_a_built_manifest_holds_no_absolute_path(cwd):
    """`w2w spaces build` with absolute --out and --dataset, then the library default: both record relative paths."""
    from w2wlib.cli import main
    from w2wlib.data import save_weights
    from w2wlib.lora import LoraLayout
    from w2wlib.spaces.build import SpacesConfig, build_spaces

    layout = LoraLayout.from_modules([("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 16, 16),
                                      ("mid_block.attentions.0.transformer_blocks.0.attn1.to_v", 16, 16)],
                                     rank=1, alpha=27.0, target_modules=("to_q", "to_v"))      # D = 64
    w = torch.randn(12, layout.dim, generator=torch.Generator().manual_seed(0)) * 0.01
    dataset = save_weights(cwd / "data" / "dataset", w, layout)
    out = cwd / "data" / "spaces"
    assert main(["spaces", "build", "--config", "micro", "--out", str(out), "--dataset", str(dataset),
                 "--device", "cpu"]) == 0
    text = (out / "manifest.json").read_text()
    manifest = json.loads(text)
    rel = {name: os.path.join("data", name) for name in ("spaces", "dataset")}
    assert manifest["command"] == f"w2w spaces build --config micro --out {rel['spaces']} --dataset {rel['dataset']} " \
                                  f"--device cpu"
    assert manifest["dataset"] == rel["dataset"]
    assert str(cwd) not in text and str(cwd.resolve()) not in text
    again = build_spaces(out, SpacesConfig.preset("micro"), dataset, progress=False)   # both stages cached
    assert again["command"] == f"w2w spaces build --config micro --out {rel['spaces']} --dataset {rel['dataset']}"
    assert str(cwd) not in (out / "manifest.json").read_text()
