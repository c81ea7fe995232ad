"""Metrics that need no model: the attribute probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from w2wlib import W2WError, load_profile
from w2wlib.metrics import attribute_probe


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1, 1, 1, 1])
    y = {"linear": (x[:, 0] + 0.2 * x[:, 1] > 0.5).numpy().astype(np.uint8),       # a half-space of the features
         "noise": (torch.rand(n, generator=g) < 0.3).numpy().astype(np.uint8)}     # unrelated to them
    return x, y


def test_probe_reads_a_linear_attribute_and_not_noise():
    (xt, yt), (xv, yv) = _data(800, 0), _data(400, 1)
    out = attribute_probe(xt, yt, xv, yv)
    assert out["linear"]["accuracy"] > 0.95 and out["linear"]["balanced_accuracy"] > 0.95
    assert abs(out["noise"]["balanced_accuracy"] - 0.5) < 0.08                        # chance
    assert out["noise"]["majority"] == pytest.approx(float((yv["noise"] == 0).mean()))
    assert out["noise"]["accuracy"] <= out["noise"]["majority"] + 0.03                # nothing to learn


def test_probe_errors_name_the_mismatch():
    (xt, yt), (xv, yv) = _data(50, 0), _data(20, 1)
    with pytest.raises(W2WError, match="same F"):
        attribute_probe(xt, yt, xv[:, :3], yv)
    with pytest.raises(W2WError, match="attribute rows"):
        attribute_probe(xt[:10], yt, xv, yv)
    with pytest.raises(W2WError, match="share no attribute"):
        attribute_probe(xt, {"a": yt["linear"]}, xv, {"b": yv["linear"]})


def test_identity_consistency_separates_identities_from_shared_noise():
    """Rows = identities, columns = views: images of one identity agree, those of others do not."""
    from w2wlib.metrics import identity_consistency
    from w2wlib.world.encoder import load_encoder
    from w2wlib.world.render import held_out_seeds, identity_views

    enc = load_encoder(load_profile("mini").path("world_dir") / "identity_encoder")
    images = identity_views(held_out_seeds(5, 3), 3)                        # [5 * 3, 64, 64, 3], row-major
    within, across = identity_consistency(enc, images, 3)
    assert within.shape == (5,) and within.min() > across + 0.5
    # column j of every row is the same image: only the diagonal of each block would see it, and it is left out
    same_cols = np.concatenate([identity_views(held_out_seeds(1, 4), 3)] * 4)
    w2, a2 = identity_consistency(enc, same_cols, 3)
    torch.testing.assert_close(torch.full((4,), a2, dtype=w2.dtype), w2)
    with pytest.raises(W2WError, match="n_per_row >= 2"):
        identity_consistency(enc, images, 1)
    with pytest.raises(W2WError, match="rows of"):
        identity_consistency(enc, images[:4], 3)
