"""Tests of the procedural face renderer (w2wlib.world.render)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from w2wlib.errors import W2WError
from w2wlib.world.render import (ATTRIBUTE_PHRASES, ATTRIBUTES, FACTOR_NAMES, Factors,
                                 attribute_prior, attributes, render, render_ids,
                                 sample_identities)


@pytest.fixture(scope="module")
def pop():
    """2000 identities: (factors, attribute matrix [2000, A])."""
    f = sample_identities(np.arange(2000) + 77)
    return f, attributes(f)


def col(a: np.ndarray, name: str) -> np.ndarray:
    return a[:, ATTRIBUTES.index(name)]


# ----------------------------------------------------------------------------- factors
def test_at_least_12_factors_one_array_each():
    assert len(FACTOR_NAMES) >= 12 and len(set(FACTOR_NAMES)) == len(FACTOR_NAMES)
    f = sample_identities([1, 2, 3])
    assert tuple(x.name for x in dataclasses.fields(Factors)) == FACTOR_NAMES
    for name in FACTOR_NAMES:
        v = getattr(f, name)
        assert v.shape == (3,) and v.dtype == np.float32 and np.isfinite(v).all()
    assert f.as_array().shape == (3, len(FACTOR_NAMES))


def test_factors_deterministic_per_seed_and_varied():
    a = sample_identities([5, 9]).as_array()
    b = sample_identities([9, 1, 5]).as_array()
    np.testing.assert_array_equal(a[0], b[2])
    np.testing.assert_array_equal(a[1], b[0])
    many = sample_identities(np.arange(300)).as_array()
    assert (many.std(0) > 0).all(), "every factor must vary across identities"


# ----------------------------------------------------------------------------- attributes
def test_attribute_names_and_phrases():
    for must in ("Male", "Eyeglasses", "Beard", "Blond_Hair", "Black_Hair", "Brown_Hair",
                 "Gray_Hair", "Bald", "Pale_Skin", "Young", "Bangs", "Wearing_Earrings",
                 "Mustache", "Big_Nose"):
        assert must in ATTRIBUTES
    assert "Smiling" not in ATTRIBUTES
    assert set(ATTRIBUTE_PHRASES) == set(ATTRIBUTES)
    for p in ATTRIBUTE_PHRASES.values():
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", p), p
    assert len(set(ATTRIBUTE_PHRASES.values())) == len(ATTRIBUTES)


def test_attributes_consistent_with_factors(pop):
    f, a = pop
    assert a.shape == (2000, len(ATTRIBUTES)) and a.dtype == bool
    male = col(a, "Male")
    assert not (col(a, "Beard") & ~male).any()
    assert not (col(a, "Mustache") & ~male).any()
    bald = col(a, "Bald")
    assert not (bald & col(a, "Bangs")).any()
    n_colour = sum(col(a, c).astype(int) for c in ("Blond_Hair", "Black_Hair", "Brown_Hair",
                                                   "Gray_Hair"))
    assert (n_colour[~bald] == 1).all() and (n_colour[bald] == 0).all()
    np.testing.assert_array_equal(col(a, "Eyeglasses"), f.glasses > 0)
    np.testing.assert_array_equal(col(a, "Male"), f.sex == 1)
    np.testing.assert_array_equal(attributes(f.take(slice(10, 20))), a[10:20])


def test_attribute_frequencies_and_correlations(pop):
    _, a = pop
    freq = a.mean(0)
    for name, p in zip(ATTRIBUTES, freq):
        assert 0.01 < p < 0.99, (name, p)
    young, male = col(a, "Young"), col(a, "Male")
    gray = col(a, "Gray_Hair")
    assert gray[~young].mean() > 2 * gray[young].mean() + 0.05
    assert col(a, "Bald")[male].mean() > 5 * col(a, "Bald")[~male].mean()
    assert col(a, "Wearing_Earrings")[~male].mean() > 3 * col(a, "Wearing_Earrings")[male].mean()


def test_attribute_prior_matches_sampling():
    prior = attribute_prior(n=500, seed=3)
    assert list(prior) == list(ATTRIBUTES)
    assert all(0.0 <= p <= 1.0 for p in prior.values())
    assert prior == attribute_prior(n=500, seed=3)
    assert prior != attribute_prior(n=500, seed=4)


# ----------------------------------------------------------------------------- rendering
def test_render_shape_dtype_and_sizes():
    x = render_ids([1, 2], [3, 4])
    assert x.shape == (2, 64, 64, 3) and x.dtype == np.uint8
    assert render_ids([1], [3], size=32).shape == (1, 32, 32, 3)
    img, mask = render_ids([1], [3], size=48, return_mask=True)
    assert img.shape == (1, 48, 48, 3) and mask.shape == (1, 48, 48)
    assert 0.15 < mask.mean() < 0.8 and x.std() > 20


def test_render_deterministic_regardless_of_batch():
    a = render_ids([3, 7, 11], [100, 200, 300])
    b = render_ids([11, 50, 3], [300, 1, 100])
    np.testing.assert_array_equal(a[0], b[2])
    np.testing.assert_array_equal(a[2], b[0])
    # a batch larger than one internal chunk, and a single-image batch
    big = render_ids(np.arange(70), np.arange(70) + 9)
    np.testing.assert_array_equal(big[66], render_ids([66], [75])[0])
    np.testing.assert_array_equal(big[5], render(sample_identities([5]), [14])[0])


def test_image_seed_changes_nuisance_not_identity():
    x = render_ids([42] * 4, [0, 1, 2, 3]).astype(np.float32)
    for i in range(1, 4):
        assert np.abs(x[0] - x[i]).mean() > 3.0


def test_identity_dominates_nuisance():
    """Mean foreground pixel distance is much lower within an identity than across identities,
    and the nearest neighbour of most images is another image of the same identity."""
    k, m = 40, 4
    ids = np.repeat(np.arange(k), m) + 1000
    imgs, masks = render_ids(ids, np.arange(k * m) + 5000, return_mask=True)
    x = imgs.astype(np.float32) / 255
    d = np.empty((k * m, k * m))
    for i in range(k * m):
        fg = np.maximum(masks[i], masks) > 0.5                           # [n, H, W]
        d[i] = (((x[i] - x) ** 2).sum(-1) * fg).sum((1, 2)) / fg.sum((1, 2))
    same = ids[:, None] == ids[None]
    off = ~np.eye(k * m, dtype=bool)
    within, across = d[same & off].mean(), d[~same].mean()
    assert within < 0.6 * across, (within, across)
    per_image = [d[i, same[i] & off[i]].mean() < d[i, ~same[i]].mean() for i in range(k * m)]
    assert np.mean(per_image) > 0.9
    d[~off] = np.inf
    assert (same[np.arange(k * m), d.argmin(1)]).mean() > 0.3          # chance: 3 / 159


def test_drawn_factors_change_pixels():
    """Changing one identity factor changes the pixels, in the right region of the face."""
    f = sample_identities([123])
    base = render(f, [0]).astype(np.int16)
    for name, value, rows in (("glasses", 2.0, slice(18, 44)), ("beard", 2.0, slice(28, 64)),
                              ("hair_color", (f.hair_color[0] + 1) % 3, slice(0, 64))):
        g = dataclasses.replace(f, **{name: np.array([value], np.float32)})
        if name == "beard":
            g = dataclasses.replace(g, sex=np.array([1.0], np.float32))
        diff = np.abs(render(g, [0]).astype(np.int16) - base).sum(-1)[0]
        assert diff[rows].sum() >= 0.9 * diff.sum() and diff.sum() > 2000, name
    # dark square frames: many pixels around the eyes get much darker
    g = dataclasses.replace(f, glasses=np.array([2.0], np.float32))
    darker = (base - render(g, [0]).astype(np.int16)).sum(-1)[0]
    assert (darker[18:44] > 150).sum() >= 15


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call, message", [
    (lambda: render_ids([1, 2], [1]), "got 2 identity seeds but 1 image seeds; they must have the same length"),
    (lambda: render(sample_identities([1, 2]), [1, 2, 3]), "got 2 identities but 3 image seeds; pass one image"),
    (lambda: render_ids([-1], [0]), "identity seeds must be non-negative, got -1"),
    (lambda: render_ids([1], [-5]), "image seeds must be non-negative, got -5"),
    (lambda: sample_identities([1.5]), r"identity seeds must be a 1-D sequence of non-negative ints, got float64"),
    (lambda: sample_identities([[1, 2]]), r"identity seeds must be a 1-D sequence .* shape \(1, 2\)"),
    (lambda: render_ids([1], [1], size=60), "size must be an int >= 32 and a multiple of 8, got 60"),
    (lambda: render_ids([1], [1], size=24), "size must be an int >= 32 and a multiple of 8, got 24"),
    (lambda: render({"sex": 1}, [1]), r"factors must be a Factors \(from sample_identities\), got <class 'dict'>"),
    (lambda: attribute_prior(n=0), "attribute_prior needs n >= 1, got 0"),
])
def test_bad_input_raises_w2w_error(call, message):
    with pytest.raises(W2WError, match=message):
        call()
