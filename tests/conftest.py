"""Shared fixtures. Tests run offline: no hub access, ever."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def root() -> Path:
    """The project root (the clone under test)."""
    return ROOT


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory) -> Path:
    """A micro world built by the real CLI, once per test session."""
    from w2wlib.cli import main

    out = tmp_path_factory.mktemp("world")
    assert main(["world", "build", "--config", "micro", "--out", str(out), "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="session")
def micro_dataset(micro_world, tmp_path_factory) -> Path:
    """A micro weights dataset trained on the micro world by the real CLI, once per test session."""
    from w2wlib.cli import main

    out = tmp_path_factory.mktemp("dataset")
    assert main(["dataset", "build", "--config", "micro", "--out", str(out), "--world", str(micro_world),
                 "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="session")
def S():
    """The shipped dataset, spaces and split (data/), opened once."""
    from w2wlib.spaces.shipped import open_spaces

    return open_spaces(ROOT / "data" / "spaces", ROOT / "data" / "dataset")


@pytest.fixture(scope="session")
def shipped_pipe():
    """The shipped mini world's pipeline (data/world/pipeline), loaded once."""
    from w2wlib.world.pipeline import load_pipeline

    return load_pipeline(ROOT / "data" / "world" / "pipeline")
