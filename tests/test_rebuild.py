"""Rebuilt artifacts are byte-identical and verify against their manifests, also after a SIGKILL and a resume.

Each builder (world, dataset, spaces; micro configs) is compared with the session's clean build
(``conftest``'s ``micro_world``, ``micro_dataset``, ``micro_spaces``) file by file. The dataset and spaces
are built a second time from scratch; every builder is also killed partway in a subprocess and resumed. For
the world, the killed and resumed build is its only second build: a micro world takes minutes, and a
resumed build equal to a clean one is both proofs at once (every stage ran from scratch, in two processes).
Builds compared here run at the same torch thread count: a Conv2d's gradients differ bitwise between 1
and 2 threads.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import NamedTuple

import pytest

from w2wlib.cli import main
from w2wlib.stages import sha256, verify_folder


class Builder(NamedTuple):
    fixture: str                    # the session's clean build
    source: tuple[str, str] | None  # the input flag and its fixture
    stage: str                      # the stage the kill lands in
    partway: str                    # a file under <out> that appears inside that stage
    resumed: str                    # what the rerun logs when it picks the stage up from there


BUILDERS = {
    "world": Builder("micro_world", None, "unet", "_work/unet.ckpt.pt", r"unet: resuming from step 6"),
    "dataset": Builder("micro_dataset", ("--world", "micro_world"), "shards",
                       "_work/shards/shard_000000_000003.safetensors",    # the first of two shards
                       r"skipping shard_000000_000003\.safetensors: already trained"),
    "spaces": Builder("micro_spaces", ("--dataset", "micro_dataset"), "vae", "_work/vae_run/checkpoint.pt",
                      r"Resuming \S+vae_run at step 10 of 20"),
}
_RUN_FIELDS = ("build_seconds", "command")        # what a manifest may record differently for the same bytes


def shipped_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every shipped file: outside ``_work/``, and not ``manifest.json`` (it records build times)."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and "_work" not in p.relative_to(folder).parts and p.name != "manifest.json"}


def assert_same_build(first: Path, second: Path) -> None:
    """Same files with the same bytes, equal manifests up to build times and command, and both verify."""
    a, b = shipped_hashes(first), shipped_hashes(second)
    assert sorted(a) == sorted(b), f"file lists differ: {sorted(set(a) ^ set(b))}"
    assert [name for name in a if a[name] != b[name]] == [], "files whose bytes differ between the two builds"
    ma, mb = (json.loads((f / "manifest.json").read_text()) for f in (first, second))
    assert set(ma["files"]) == set(a) and ma["files"] == mb["files"]          # every shipped file is listed
    assert {k: v for k, v in ma.items() if k not in _RUN_FIELDS} == {k: v for k, v in mb.items() if k not in _RUN_FIELDS}
    for folder in (first, second):
        report = verify_folder(folder)
        assert report.ok and report.n_files == len(a), str(report)


def build_args(builder: str, out: Path, request) -> list[str]:
    source = BUILDERS[builder].source
    extra = [source[0], str(request.getfixturevalue(source[1]))] if source else []
    return [builder, "build", "--config", "micro", "--out", str(out), *extra, "--device", "cpu"]


@pytest.mark.parametrize("builder", ["dataset", "spaces"])
def test_a_second_clean_build_is_byte_identical_and_verifies(builder, tmp_path, request):
    first = request.getfixturevalue(BUILDERS[builder].fixture)
    assert main(build_args(builder, tmp_path / builder, request)) == 0
    assert_same_build(first, tmp_path / builder)


@pytest.mark.parametrize("builder", list(BUILDERS))
def test_a_build_killed_partway_resumes_to_the_same_bytes(builder, tmp_path, request, kill_cli, caplog):
    """SIGKILL `w2w BUILDER build` the moment a checkpoint or shard lands in `_work/`, then rerun the same
    command: it picks the stage up from there and ends with the clean build's bytes."""
    b = BUILDERS[builder]
    first = request.getfixturevalue(b.fixture)
    out = tmp_path / builder
    args = build_args(builder, out, request)
    kill_cli(args, out / b.partway)
    assert not (out / "_work" / f"{b.stage}.done.json").exists()   # killed inside the stage
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert re.search(b.resumed, caplog.text), f"the rerun did not resume {b.stage}:\n{caplog.text[-2000:]}"
    assert_same_build(first, out)
