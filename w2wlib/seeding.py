"""The project's one seed rule: every random stream is named by a tuple of non-negative ints.

``seed_int(seed, key, step)`` mixes the tuple through numpy's ``SeedSequence`` into one 63-bit
integer, and ``generator(...)`` seeds a ``torch.Generator`` with it. A stream therefore depends on its
name only, never on the batch it falls in, the process that runs it or what ran before: identity
``key`` at ``step`` draws the same noise in a batch of 1 or of 4,096, and image ``j`` of a generation
starts from the same noise whatever the weights. Tags (small constants) keep a module's streams apart.

Example:
    >>> seed_int(0, 7) == seed_int(0, 7) != seed_int(0, 8)
    True
    >>> torch.equal(torch.randn(3, generator=generator(1, 2)), torch.randn(3, generator=generator(1, 2)))
    True
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import W2WError

__all__ = ["seed_int", "generator", "numpy_rng"]


def _entropy(entropy: tuple) -> list[int]:
    out = [int(e) for e in entropy]
    if not out or any(e < 0 for e in out):
        raise W2WError(f"a random stream is named by one or more non-negative ints; got {list(entropy)}")
    return out


def seed_int(*entropy: int) -> int:
    """A 63-bit seed mixed from ``entropy`` (non-negative ints), stable across runs and machines."""
    return int(np.random.SeedSequence(_entropy(entropy)).generate_state(1, np.uint64)[0] >> 1)


def generator(*entropy: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded by :func:`seed_int` of ``entropy``."""
    return torch.Generator(device).manual_seed(seed_int(*entropy))


def numpy_rng(*entropy: int) -> np.random.Generator:
    """A numpy ``Generator`` for the stream named by ``entropy`` (same rule as :func:`generator`)."""
    return np.random.default_rng(_entropy(entropy))
