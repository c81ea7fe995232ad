"""Shared fixtures. Tests run offline: no hub access, ever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
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
def micro_spaces(micro_dataset, tmp_path_factory) -> Path:
    """Micro PCA and VAE spaces of the micro dataset, built by the real CLI, once per test session."""
    from w2wlib.cli import main

    out = tmp_path_factory.mktemp("spaces")
    assert main(["spaces", "build", "--config", "micro", "--out", str(out), "--dataset", str(micro_dataset),
                 "--device", "cpu"]) == 0
    return out


def kill_cli_when(argv: list[str], path: Path, *, timeout: float = 600) -> None:
    """Run ``w2w ARGV`` in a subprocess and SIGKILL it the moment ``path`` exists (polled every 5 ms).

    The subprocess runs at this process's torch thread count: a Conv2d's gradients differ bitwise between
    1 and 2 threads, and its bytes are compared with builds made in this process. Fails when the command
    ends before ``path`` appears, or outlives ``timeout`` seconds.
    """
    import torch

    code = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); from w2wlib.cli import main; "
            "sys.exit(main(sys.argv[2:]))")
    with tempfile.TemporaryFile() as err:                 # a pipe would fill with progress bars and block
        proc = subprocess.Popen([sys.executable, "-c", code, str(torch.get_num_threads()), *argv],
                                stdout=subprocess.DEVNULL, stderr=err)
        t0 = time.monotonic()
        while proc.poll() is None and not path.exists() and time.monotonic() - t0 < timeout:
            time.sleep(0.005)
        proc.kill()
        rc = proc.wait()
        if rc != -signal.SIGKILL:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            pytest.fail(f"`w2w {' '.join(argv)}` ended by itself (status {rc}) before it was killed at {path}:\n{tail}")
        if not path.exists():
            pytest.fail(f"`w2w {' '.join(argv)}` ran {timeout} s and {path} never appeared")


@pytest.fixture(scope="session")
def kill_cli():
    """:func:`kill_cli_when`: ``kill_cli(argv, path)`` runs ``w2w ARGV`` in a subprocess, killed when ``path`` appears."""
    return kill_cli_when


@pytest.fixture(scope="session")
def S():
    """The shipped dataset, spaces and split (the mini profile's), opened once."""
    from w2wlib.profile import load_profile
    from w2wlib.spaces.shipped import open_spaces

    P = load_profile("mini")
    return open_spaces(P.path("spaces_dir"), P.path("dataset_dir"))


@pytest.fixture(scope="session")
def shipped_pipe():
    """The shipped mini world's pipeline (the mini profile's world), loaded once."""
    from w2wlib.profile import load_profile
    from w2wlib.world.pipeline import load_pipeline

    return load_pipeline(load_profile("mini").path("world_dir") / "pipeline")
