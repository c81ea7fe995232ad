"""Tests of w2wlib.stages: manifests record paths relative to the working directory; `verify_folder` and
`w2w verify` check artifact folders against their manifests."""

from __future__ import annotations

import json
import os
import re

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


# ---------------------------------------------------------------------- verify_folder, artifact_folders, w2w verify


def artifact(folder, files: dict[str, bytes], command: str = "w2w x build --out X"):
    """A folder holding ``files`` (and a ``_work/`` file, never shipped), with its manifest."""
    from w2wlib.stages import write_manifest

    for name, data in {**files, "_work/state.pt": b"work"}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    write_manifest(folder, command=command)
    return folder


def test_verify_folder_names_each_file_that_differs_or_is_missing(tmp_path):
    import hashlib

    from w2wlib.stages import verify_folder, verify_manifest

    folder = artifact(tmp_path / "a", {"a.txt": b"alpha", "sub/b.bin": bytes(range(256))})
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"] == {"a.txt": {"sha256": hashlib.sha256(b"alpha").hexdigest(), "bytes": 5},
                                 "sub/b.bin": {"sha256": hashlib.sha256(bytes(range(256))).hexdigest(), "bytes": 256}}
    report = verify_folder(folder)
    assert report.ok and (report.n_files, report.differ, report.missing) == (2, [], [])
    assert str(report) == f"{folder}: OK, 2 files (rebuild with: w2w x build --out X)"
    (folder / "_work" / "state.pt").write_bytes(b"changed")                  # not shipped: not checked
    assert verify_manifest(folder) == []
    (folder / "a.txt").write_bytes(b"alphA")                                 # same size, other bytes
    (folder / "sub" / "b.bin").unlink()
    report = verify_folder(folder)
    assert not report.ok and report.differ == ["a.txt"] and report.missing == ["sub/b.bin"]
    assert str(report) == (f"{folder}: 1 of 2 files differ (a.txt); 1 of 2 files missing (sub/b.bin); "
                           "rebuild with: w2w x build --out X")
    assert verify_manifest(folder) == ["a.txt", "sub/b.bin"]


def test_verify_errors_name_the_folder_and_the_fix(tmp_path):
    from w2wlib import ArtifactMissingError, W2WError
    from w2wlib.stages import artifact_folders, verify_folder

    with pytest.raises(ArtifactMissingError, match=r"nowhere is not a folder: give an artifact folder"):
        verify_folder(tmp_path / "nowhere")
    with pytest.raises(ArtifactMissingError, match=r"nowhere is not a folder"):
        artifact_folders(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ArtifactMissingError, match=r"no manifest\.json in \S+empty: it is not a built artifact"):
        verify_folder(tmp_path / "empty")
    with pytest.raises(ArtifactMissingError, match=r"no manifest\.json in \S+empty or in its folders 2 levels down"):
        artifact_folders(tmp_path / "empty")
    folder = artifact(tmp_path / "a", {"a.txt": b"alpha"})
    (folder / "manifest.json").write_text('{"files": {"a.txt": ')           # cut short
    with pytest.raises(W2WError, match=r"manifest\.json is not valid JSON \(.*line 1 column 21.*\): restore it"):
        verify_folder(folder)
    (folder / "manifest.json").write_text('{"files": ["a.txt"]}')
    with pytest.raises(W2WError, match=r"manifest\.json has no 'files' table of sha256s"):
        verify_folder(folder)


def test_artifact_folders_look_two_levels_down_and_name_the_folders_without_a_manifest(tmp_path):
    from w2wlib.stages import artifact_folders

    for name in ("a", "a/inner", "b/c", "_work/g", ".hidden", "x/y/z"):
        artifact(tmp_path / name, {"f": name.encode()})
    for name in ("b/d", "e/f"):
        (tmp_path / name).mkdir(parents=True)
    found, without = artifact_folders(tmp_path)
    assert found == [tmp_path / "a", tmp_path / "b" / "c"]                  # not a/inner, _work, .hidden, x/y/z
    assert without == [tmp_path / "b" / "d", tmp_path / "e", tmp_path / "x"]
    assert artifact_folders(tmp_path / "a") == ([tmp_path / "a"], [])
    assert artifact_folders(tmp_path, depth=3)[0][-1] == tmp_path / "x" / "y" / "z"


def test_w2w_verify_prints_a_line_per_folder_and_fails_on_a_changed_file(tmp_path, capsys):
    from w2wlib.cli import main

    root = tmp_path / "data"
    artifact(root / "world", {"w.bin": b"w"}, command="w2w world build --out data/world")
    artifact(root / "spaces", {"s.json": b"{}", "pca/t.bin": b"t"}, command="w2w spaces build --out data/spaces")
    (root / "next" / "dataset").mkdir(parents=True)
    assert main(["verify", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{root / 'spaces'}: OK, 2 files (rebuild with: w2w spaces build --out data/spaces)",
        f"{root / 'world'}: OK, 1 file (rebuild with: w2w world build --out data/world)",
        f"{root / 'next'}: no manifest.json, not checked (not a built artifact, or its build has not finished)"]
    (root / "spaces" / "pca" / "t.bin").write_bytes(b"T")
    assert main(["verify", str(root / "world"), str(root / "spaces")]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{root / 'world'}: OK, 1 file (rebuild with: w2w world build --out data/world)",
        f"{root / 'spaces'}: 1 of 2 files differ (pca/t.bin); rebuild with: w2w spaces build --out data/spaces"]
    # the default DIR is the profile's data_dir
    profile = tmp_path / "p.yaml"
    profile.write_text(f"settings:\n  data_dir: {root / 'world'}\n")
    assert main(["verify", "--profile", str(profile)]) == 0
    assert capsys.readouterr().out == f"{root / 'world'}: OK, 1 file (rebuild with: w2w world build --out data/world)\n"
    # a DIR that does not exist, or a broken manifest: an error that names it, before any folder is checked
    assert main(["verify", str(root / "world"), str(root / "wrold")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"w2w: error: {root / 'wrold'} is not a folder: give an artifact folder (one with " \
                                "manifest.json), or a folder of them such as data/\n"
    (root / "world" / "manifest.json").write_text("not json")
    assert main(["verify", str(root)]) == 1
    assert re.match(rf"w2w: error: {re.escape(str(root / 'world' / 'manifest.json'))} is not valid JSON",
                    capsys.readouterr().err)
