"""Benchmark records are read only on the dataset they were measured on."""

from __future__ import annotations

import json
import shutil

import pytest

from w2wlib import W2WError
from w2wlib.data import open_weights
from w2wlib.records import dataset_key, read_record, write_record


def test_a_record_is_read_back_on_its_dataset_only(micro_dataset, tmp_path, capsys):
    ds = open_weights(micro_dataset)
    sha = json.loads((micro_dataset / "manifest.json").read_text())["files"]["all_weights.safetensors"]["sha256"]
    assert dataset_key(ds) == {"n": len(ds), "dim": ds.dim, "sha256": sha}
    path = write_record(tmp_path / "sweep.json", {"results": [1, 2]}, ds)
    rec = read_record(path, ds)
    assert rec["results"] == [1, 2] and rec["dataset"]["sha256"] == sha and "torch threads" in rec["machine"]
    assert not list(tmp_path.glob("*.tmp"))
    # the same size, other weights: the record of the first dataset is not this one's
    other = tmp_path / "other"
    shutil.copytree(micro_dataset, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["files"]["all_weights.safetensors"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert read_record(path, open_weights(other)) is None
    out = capsys.readouterr().out
    assert "recorded on another dataset" in out and "re-run benchmarks/sweep.py" in out
    # an old record without the weights' sha256 is not taken for this dataset either
    path.write_text(json.dumps({"dataset": {"n": len(ds), "dim": ds.dim}, "results": []}))
    assert read_record(path, ds) is None
    assert read_record(tmp_path / "missing.json", ds) is None
    assert "no record at" in capsys.readouterr().out
    path.write_text("{cut sho")
    with pytest.raises(W2WError, match=r"sweep.json is not valid JSON .* re-run benchmarks/sweep.py"):
        read_record(path, ds)


def test_a_dataset_without_a_manifest_is_keyed_by_its_size(micro_dataset, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(micro_dataset, bare)
    (bare / "manifest.json").unlink()
    ds = open_weights(bare)
    assert dataset_key(ds) == {"n": len(ds), "dim": ds.dim, "sha256": None}
    (bare / "manifest.json").write_text("[]")
    with pytest.raises(W2WError, match="not a readable manifest .*w2w verify"):
        dataset_key(ds)
