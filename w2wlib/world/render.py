"""Procedural cartoon faces: the stand-in for face photos in the mini world.

An *identity* is a vector of facial factors drawn from its integer seed (:func:`sample_identities`);
CelebA-style binary attributes are thresholds on those factors (:func:`attributes`). An *image* of
an identity adds per-image nuisance drawn from an image seed: shift, scale, rotation, expression,
lighting, background and shirt colour (:func:`render`). Pixels depend only on the pair
(identity seed, image seed), never on batch composition: rendering uses only element-wise
``+ - * / sqrt min max abs`` on per-image parameters, which numpy computes exactly the same way
whatever the batch shape.

Example:
    >>> imgs = render_ids([1, 1, 2], [10, 11, 10])   # two images of identity 1, one of identity 2
    >>> imgs.shape, imgs.dtype
    ((3, 64, 64, 3), dtype('uint8'))
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Sequence

import numpy as np

from w2wlib.errors import W2WError

__all__ = ["FACTOR_NAMES", "ATTRIBUTES", "ATTRIBUTE_PHRASES", "Factors", "sample_identities",
           "attributes", "attribute_prior", "render", "render_ids", "identity_views", "held_out_seeds",
           "EVAL_VIEWS", "HELD_OUT_BASE"]

FACTOR_NAMES: tuple[str, ...] = (
    "sex", "age", "face_width", "face_height", "jaw", "skin_tone", "hair_color", "hair_shade",
    "hair_style", "hair_volume", "eye_color", "eye_size", "eye_spacing", "brow_thickness",
    "brow_tilt", "nose_size", "nose_width", "mouth_width", "lip_size", "lip_color", "beard",
    "mustache", "glasses", "earrings", "wrinkles")
# Categorical codes: sex 1 = male; hair_color 0 black, 1 brown, 2 blond, 3 gray;
# hair_style 0 bald, 1 short, 2 short+bangs, 3 long, 4 long+bangs; eye_color 0 brown, 1 dark,
# 2 blue, 3 green; beard 0 none, 1 goatee, 2 full; glasses 0 none, 1 round, 2 square, 3 thin gold.

ATTRIBUTES: tuple[str, ...] = (
    "Male", "Eyeglasses", "Beard", "Mustache", "Blond_Hair", "Black_Hair", "Brown_Hair",
    "Gray_Hair", "Bald", "Bangs", "Pale_Skin", "Young", "Wearing_Earrings", "Big_Nose",
    "Bushy_Eyebrows", "Big_Lips", "Chubby")
ATTRIBUTE_PHRASES: dict[str, str] = {
    "Male": "man", "Eyeglasses": "glasses", "Beard": "beard", "Mustache": "mustache",
    "Blond_Hair": "blond hair", "Black_Hair": "black hair", "Brown_Hair": "brown hair",
    "Gray_Hair": "gray hair", "Bald": "bald", "Bangs": "bangs", "Pale_Skin": "pale skin",
    "Young": "young", "Wearing_Earrings": "earrings", "Big_Nose": "big nose",
    "Bushy_Eyebrows": "bushy eyebrows", "Big_Lips": "big lips", "Chubby": "chubby"}

_ID_TAG, _IMG_TAG = 0x1D, 0x1A6E      # separate random streams for identity and image seeds
_N_ID_U, _N_IMG_U = 29, 24            # uniforms drawn per identity / per image
_MAX_SHIFT, _SCALE, _ROT = 3.0, 0.08, 0.17   # px, +-relative scale, +-sin(rotation) (~10 deg)
_ZOOM, _DROP = 1.22, 0.06             # base face scale and downward offset in the image
_CHUNK = 32                           # images per internal chunk (keeps arrays in cache)

_SKIN = np.array([[0.99, 0.87, 0.79], [0.90, 0.70, 0.56], [0.70, 0.48, 0.34],
                  [0.42, 0.28, 0.19]], np.float32)
_HAIR = np.array([[0.09, 0.07, 0.07], [0.40, 0.24, 0.13], [0.93, 0.79, 0.47],
                  [0.74, 0.74, 0.76]], np.float32)
_EYES = np.array([[0.42, 0.26, 0.12], [0.16, 0.10, 0.07], [0.25, 0.50, 0.85],
                  [0.27, 0.58, 0.34]], np.float32)


@dataclass(frozen=True)
class Factors:
    """Facial factors of N identities: one float32 array of length N per name in FACTOR_NAMES.

    Categorical factors hold small integer codes (as float32); see the comment on FACTOR_NAMES.
    """

    sex: np.ndarray
    age: np.ndarray
    face_width: np.ndarray
    face_height: np.ndarray
    jaw: np.ndarray
    skin_tone: np.ndarray
    hair_color: np.ndarray
    hair_shade: np.ndarray
    hair_style: np.ndarray
    hair_volume: np.ndarray
    eye_color: np.ndarray
    eye_size: np.ndarray
    eye_spacing: np.ndarray
    brow_thickness: np.ndarray
    brow_tilt: np.ndarray
    nose_size: np.ndarray
    nose_width: np.ndarray
    mouth_width: np.ndarray
    lip_size: np.ndarray
    lip_color: np.ndarray
    beard: np.ndarray
    mustache: np.ndarray
    glasses: np.ndarray
    earrings: np.ndarray
    wrinkles: np.ndarray

    def __len__(self) -> int:
        return len(self.sex)

    def take(self, idx: np.ndarray | Sequence[int] | slice) -> "Factors":
        """The factors of a subset of identities, e.g. ``f.take([0, 3])``."""
        return Factors(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def as_array(self) -> np.ndarray:
        """All factors as one float32 matrix [N, len(FACTOR_NAMES)]."""
        return np.stack([getattr(self, n) for n in FACTOR_NAMES], axis=1)


def _check_seeds(seeds: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(seeds)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise W2WError(f"{what} must be a 1-D sequence of non-negative ints, got {arr.dtype} "
                       f"array of shape {arr.shape}")
    if arr.size and arr.min() < 0:
        raise W2WError(f"{what} must be non-negative, got {int(arr.min())}")
    return arr if arr.size else arr.astype(np.int64)


def _uniforms(seeds: np.ndarray, tag: int, k: int) -> np.ndarray:
    """k uniforms per seed from ``default_rng([seed, tag])``: float64 [N, k]."""
    out = np.empty((len(seeds), k))
    for i, s in enumerate(seeds.tolist()):
        out[i] = np.random.default_rng([s, tag]).random(k)
    return out


def sample_identities(seeds: Sequence[int] | np.ndarray) -> Factors:
    """Draw the facial factors of one identity per seed (deterministic per seed).

    Example:
        >>> f = sample_identities([0, 1, 2]); len(f), f.sex.shape
        (3, (3,))
    """
    u = _uniforms(_check_seeds(seeds, "identity seeds"), _ID_TAG, _N_ID_U).T  # [29, N]
    male = (u[0] < 0.5).astype(float)
    fem = 1.0 - male
    age = u[1] * (0.8 + 0.2 * u[1])                            # 0 ~ 18 years, 1 ~ 80 years
    skin = u[5]
    p_gray = np.clip((age - 0.45) * 1.8, 0.0, 0.92)
    p_blond = 0.28 * np.clip(1.3 - 1.6 * skin, 0.0, 1.0)       # blond rarer on dark skin
    natural = np.where(u[7] < p_blond, 2, np.where(u[7] < p_blond + (1 - p_blond) * 0.5, 0, 1))
    hair_color = np.where(u[6] < p_gray, 3, natural)
    p_bald = male * (0.02 + 0.55 * np.clip(age - 0.35, 0, 1)) + fem * 0.005
    cum_m, cum_f = np.array([0.55, 0.82, 0.95]), np.array([0.12, 0.22, 0.62])
    cum = male[:, None] * cum_m + fem[:, None] * cum_f         # [N, 3] cumulative style probs
    style = 1 + (u[10][:, None] >= cum).sum(1)
    hair_style = np.where(u[9] < p_bald, 0, style)
    eye_color = np.searchsorted(np.array([0.42, 0.62, 0.83]), u[11], side="right")
    beard = np.where(male * u[21] > 0.62, np.where(u[22] < 0.35, 1, 2), 0)
    mustache = male * (u[23] < np.where(beard > 0, 0.7, 0.12))
    glasses = np.where(u[24] < 0.12 + 0.3 * age, 1 + (u[25] * 3).astype(int), 0)
    vals = dict(
        sex=male, age=age, face_width=0.9 + 0.2 * u[2] + 0.03 * male,
        face_height=0.93 + 0.14 * u[3], jaw=np.clip(u[4] + 0.3 * male - 0.15, 0, 1),
        skin_tone=skin, hair_color=hair_color, hair_shade=u[8] * 0.3 - 0.15,
        hair_style=hair_style, hair_volume=u[26], eye_color=eye_color,
        eye_size=0.85 + 0.3 * u[12] + 0.08 * fem, eye_spacing=0.9 + 0.2 * u[13],
        brow_thickness=0.6 + 0.8 * u[14] + 0.25 * male, brow_tilt=2 * u[15] - 1,
        nose_size=0.8 + 0.5 * u[16] + 0.1 * male, nose_width=0.8 + 0.4 * u[17],
        mouth_width=0.85 + 0.3 * u[18], lip_size=0.7 + 0.6 * u[19] + 0.15 * fem,
        lip_color=np.clip(u[20] * 0.7 + 0.3 * fem, 0, 1), beard=beard, mustache=mustache,
        glasses=glasses, earrings=(u[27] < np.where(male > 0, 0.05, 0.55)).astype(float),
        wrinkles=np.clip((age - 0.55) * 2.5 + (u[28] - 0.5) * 0.4, 0, 1))
    return Factors(**{k: np.asarray(v, np.float32) for k, v in vals.items()})


def attributes(factors: Factors) -> np.ndarray:
    """CelebA-style binary attributes [N, len(ATTRIBUTES)] (bool), thresholds on the factors.

    Example:
        >>> a = attributes(sample_identities(range(5))); a.shape
        (5, 17)
    """
    f = factors
    bald = f.hair_style == 0
    cols = {
        "Male": f.sex > 0.5, "Eyeglasses": f.glasses > 0, "Beard": f.beard > 0,
        "Mustache": f.mustache > 0.5, "Blond_Hair": ~bald & (f.hair_color == 2),
        "Black_Hair": ~bald & (f.hair_color == 0), "Brown_Hair": ~bald & (f.hair_color == 1),
        "Gray_Hair": ~bald & (f.hair_color == 3), "Bald": bald,
        "Bangs": (f.hair_style == 2) | (f.hair_style == 4), "Pale_Skin": f.skin_tone < 0.15,
        "Young": f.age < 0.45, "Wearing_Earrings": f.earrings > 0.5, "Big_Nose": f.nose_size > 1.2,
        "Bushy_Eyebrows": f.brow_thickness > 1.25, "Big_Lips": f.lip_size > 1.2,
        "Chubby": f.face_width > 1.06}
    return np.stack([cols[a] for a in ATTRIBUTES], axis=1)


def attribute_prior(n: int = 20000, seed: int = 0) -> dict[str, float]:
    """Frequency of each attribute over n identities sampled with random seeds.

    Example:
        >>> 0.3 < attribute_prior(2000)["Male"] < 0.7
        True
    """
    if n < 1:
        raise W2WError(f"attribute_prior needs n >= 1, got {n}")
    seeds = np.random.default_rng(seed).integers(0, 2**62, n)
    freq = attributes(sample_identities(seeds)).mean(0)
    return {a: float(p) for a, p in zip(ATTRIBUTES, freq)}


# ----------------------------------------------------------------------------- rendering helpers
def _col(a: np.ndarray) -> np.ndarray:
    """Per-image scalars [B] -> float32 [B, 1, 1] for broadcasting over pixels."""
    return np.asarray(a, np.float32)[:, None, None]


def _rgb(b: int, r: float, g: float, bl: float) -> np.ndarray:
    """One colour for every image of a chunk: float32 [b, 3]."""
    return np.tile(np.array([[r, g, bl]], np.float32), (b, 1))


def _clip01(a: np.ndarray) -> np.ndarray:
    return np.clip(a, 0.0, 1.0, out=a)


def _ell(x, y, cx, cy, rx, ry, ppu):
    """Anti-aliased alpha [B,h,w] of an axis-aligned ellipse; all params [B,1,1] or scalars."""
    dx = (x - cx) * (1.0 / rx)
    dy = (y - cy) * (1.0 / ry)
    q = dx * dx
    q += dy * dy
    g = np.minimum(rx, ry) * ppu * 0.5          # alpha slope so the edge is ~1 px wide
    q *= -g
    q += g + 0.5
    return _clip01(q)


def _half(d, ppu):
    """Alpha of the half-space d > 0 (d in face units), ~1 px soft edge."""
    return _clip01(d * ppu + 0.5)


def _paint(img, a, rgb, opacity=None):
    """img[B,3,h,w] <- img + a * (rgb - img); a [B,h,w], rgb [B,3]; optional opacity [B]."""
    if opacity is not None:
        a = a * _col(opacity)
    t = np.asarray(rgb, np.float32)[:, :, None, None] - img
    t *= a[:, None]
    img += t


@lru_cache(maxsize=None)
def _window(size: int, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
    """Pixel rows/cols that can contain the face-frame box under any allowed nuisance."""
    xs, ys = np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1])  # box corners
    us, vs = [], []
    for k in (_ZOOM * (1 - _SCALE), _ZOOM * (1 + _SCALE)):
        for s in (-_ROT, _ROT):
            c = np.sqrt(1 - s * s)
            us.append(k * (c * xs - s * ys))
            vs.append(k * (s * xs + c * ys) + _DROP)
    m = 2 * _MAX_SHIFT / size + 2.0 / size           # shift plus one pixel of margin

    def sl(lo: float, hi: float) -> slice:
        lo, hi = (lo - m + 1) * size / 2, (hi + m + 1) * size / 2      # to pixel indices
        return slice(max(0, int(lo)), min(size, int(hi) + 1))
    return sl(np.min(vs), np.max(vs)), sl(np.min(us), np.max(us))


def _render_chunk(f: Factors, n: np.ndarray, size: int):
    """Render a chunk of B images from factors f and nuisance uniforms n [B, 24].

    Returns the float32 image [B, 3, H, W] in [0, 1] (before quantisation) and the mask [B, H, W].
    """
    B = len(f)
    n = n.T                                                         # [24, B]
    # inverse affine: face frame (x, y) from pixel coords (u, v) in [-1, 1]; v points down
    tx, ty = (2 * n[0] - 1) * (2 * _MAX_SHIFT / size), (2 * n[1] - 1) * (2 * _MAX_SHIFT / size)
    sc = _ZOOM * (1.0 + _SCALE * (2 * n[2] - 1))
    ty = ty + _DROP
    s = _ROT * (2 * n[3] - 1)
    c = np.sqrt(1 - s * s)
    grid = ((np.arange(size) + 0.5) * (2.0 / size) - 1).astype(np.float32)
    U, V = grid[None, None, :], grid[None, :, None]                # [1,1,W], [1,H,1]
    X = U * _col(c / sc) + (V * _col(s / sc) + _col(-(c * tx + s * ty) / sc))      # [B,H,W]
    Y = U * _col(-s / sc) + (V * _col(c / sc) + _col((s * tx - c * ty) / sc))
    ppu = _col(sc * size / 2)                                       # pixels per face unit
    W = lambda *box: _window(size, *box)                             # noqa: E731

    # background: two-colour gradient [B,3,H,W]
    gx = 2 * n[17] - 1
    gy = np.sqrt(1 - gx * gx)
    t = _clip01(U * _col(0.5 * gx) + (V * _col(0.5 * gy) + 0.5))
    c1, c2 = 0.25 + 0.65 * n[11:14].T, 0.25 + 0.65 * n[14:17].T        # [B, 3] each, desaturated:
    c1, c2 = [(0.5 * c + 0.5 * c.mean(1, keepdims=True)).astype(np.float32) for c in (c1, c2)]
    img = c1[:, :, None, None] + t[:, None] * (c2 - c1)[:, :, None, None]

    skin_i = np.clip(f.skin_tone * 3, 0, 2.999)
    k = skin_i.astype(int)
    skin = (_SKIN[k] + (skin_i - k)[:, None] * (_SKIN[k + 1] - _SKIN[k])).astype(np.float32)
    hair = np.clip(_HAIR[f.hair_color.astype(int)] * (1 + f.hair_shade[:, None]), 0, 1)
    shade = (skin * 0.82).astype(np.float32)
    fw, fh = f.face_width, f.face_height
    rx, ry, cy = 0.47 * fw, 0.6 * fh, 0.02
    Rx, Ry, Cy = _col(rx), _col(ry), cy
    vol = 0.03 + 0.09 * f.hair_volume
    style = f.hair_style
    long_ = (style >= 3).astype(np.float32)

    # shirt, long hair behind the head, neck
    shirt = (0.15 + 0.7 * n[18:21]).T.astype(np.float32)
    a = _ell(X, Y, 0.0, 1.12, 0.95, 0.45, ppu)
    mask = a.copy()
    _paint(img, a, shirt)
    hrx, hry = _col(rx + vol + 0.02), _col(ry * 0.95 + vol)
    back = np.maximum(_ell(X, Y, 0.0, Cy - 0.04, hrx, hry, ppu),
                      _ell(X, Y, 0.0, 0.3, _col(rx + vol + 0.05), 0.58, ppu))
    back *= _col(long_)
    fringe = np.minimum(_ell(X, Y, 0.0, Cy, _col(rx + 0.045 + 0.3 * vol), Ry * 0.97, ppu),
                        np.minimum(_half(Y + 0.22, ppu), _half(0.14 - Y, ppu)))  # bald: side rim
    np.maximum(back, fringe * _col(style == 0), out=back)
    _paint(img, back, hair * 0.8)
    a = np.minimum(_half(_col(0.2 * fw) - np.abs(X), ppu), _half(Y - 0.2, ppu))
    np.maximum(mask, np.maximum(a, back), out=mask)
    _paint(img, a, shade)
    # ears (mirrored with |x|), then the face with a jaw taper
    rs, cs = W(-0.62, 0.62, -0.2, 0.2)
    ax, y = np.abs(X[:, rs, cs]), Y[:, rs, cs]
    a = _ell(ax, y, _col(rx * 0.97), 0.0, 0.07, 0.11, ppu)
    _paint(img[:, :, rs, cs], a, shade)
    dy = (Y - Cy) * (1.0 / Ry)
    w = np.maximum(dy, 0)
    w *= w
    taper = 1.0 - _col(0.1 + 0.3 * (1 - f.jaw)) * w
    dx = X / (Rx * taper)
    q = dx * dx + dy * dy
    g = ppu * Rx * 0.5
    a = _clip01(q * -g + (g + 0.5))
    np.maximum(mask, a, out=mask)
    _paint(img, a, skin)
    face = a

    # wrinkles: forehead lines and nasolabial folds
    wr = f.wrinkles * 0.55
    rs, cs = W(-0.3, 0.3, -0.42, 0.36)
    x, y = X[:, rs, cs], Y[:, rs, cs]
    ax = np.abs(x)
    fl = np.minimum(_half(0.014 - np.abs(np.abs(y + 0.33 - 0.4 * x * x) - 0.045), ppu),
                    _half(0.2 - ax, ppu))
    fold = np.minimum(_half(0.012 - np.abs(ax - 0.11 - 0.3 * (y - 0.12)), ppu),
                      np.minimum(_half(y - 0.12, ppu), _half(0.33 - y, ppu)))
    _paint(img[:, :, rs, cs], np.maximum(fl, fold), shade * 0.85, wr)
    # nose: bridge shading, tip shading, nostrils
    ns, nw = f.nose_size, f.nose_width
    rs, cs = W(-0.15, 0.15, -0.05, 0.25)
    x, y, sub = X[:, rs, cs], Y[:, rs, cs], img[:, :, rs, cs]
    yn = _col(0.1 + 0.05 * ns)
    a = _ell(x, y, 0.025, yn - 0.07, _col(0.025 * nw), _col(0.09 * ns), ppu)
    _paint(sub, a, shade, np.full(B, 0.35))
    a = _ell(x, y, 0.0, yn, _col(0.06 * nw * ns), _col(0.035 * ns), ppu)
    _paint(sub, a, shade, np.full(B, 0.7))
    a = _ell(np.abs(x), y, _col(0.03 * nw), yn + 0.012, _col(0.015 * nw), 0.011, ppu)
    _paint(sub, a, shade * 0.6)
    # beard (goatee or full), drawn before the mouth
    rs, cs = W(-0.62, 0.62, -0.05, 0.72)
    x, y, sub = X[:, rs, cs], Y[:, rs, cs], img[:, :, rs, cs]
    xr = x * (1.0 / Rx)
    full = _half(y - 0.2 + 0.25 * xr * xr, ppu)
    goat = np.minimum(_half(y - 0.36, ppu), _half(0.13 - np.abs(x), ppu))
    sel = _col(f.beard == 2)
    a = np.minimum(goat + sel * (full - goat), face[:, rs, cs] * 1.6)
    _paint(sub, _clip01(a), hair * 0.85, (f.beard > 0) * 0.92)
    # mouth: lips bent by the smile, dark opening, teeth
    smile = n[4] * (0.3 + 0.7 * n[4])                                  # no pow: exact
    mw = 0.14 * f.mouth_width * (1 + 0.15 * smile)
    ym, Mw = 0.31, _col(mw)
    rs, cs = W(-0.22, 0.22, 0.2, 0.42)
    x, y, sub = X[:, rs, cs], Y[:, rs, cs], img[:, :, rs, cs]
    xn = x * (1.0 / Mw)
    yc = y + _col(0.07 * smile) * xn * xn
    lip = np.clip(skin * 0.8 * (1 - f.lip_color[:, None]) + f.lip_color[:, None] *
                  np.array([0.75, 0.25, 0.3], np.float32), 0, 1)
    a = _ell(x, yc, 0.0, ym, Mw, _col(0.028 * f.lip_size + 0.01 * smile), ppu)
    _paint(sub, a, lip)
    ho = _col(0.004 + 0.022 * smile)
    _paint(sub, _ell(x, yc, 0.0, ym, Mw * 0.85, ho, ppu), _rgb(B, 0.25, 0.05, 0.07))
    _paint(sub, _ell(x, yc, 0.0, ym - ho * 0.35, Mw * 0.7, ho * 0.55, ppu),
           _rgb(B, 1, 1, 1), (smile > 0.3) * 1.0)
    # mustache
    a = _ell(x, y - 0.05 * xn * xn, 0.0, ym - 0.045, Mw * 1.05, 0.026, ppu)
    _paint(sub, a, hair * 0.8, f.mustache)

    # eyes: dark outline, white, iris and pupil (clipped to the white), gaze from the image seed
    es, sp, op = f.eye_size, f.eye_spacing, 0.55 + 0.5 * n[5]
    rs, cs = W(-0.45, 0.45, -0.16, 0.08)
    ax, y, sub = np.abs(X[:, rs, cs]), Y[:, rs, cs], img[:, :, rs, cs]
    ex, ey = _col(0.18 * sp), -0.04
    erx, ery = _col(0.085 * es), _col(0.05 * es * op)
    _paint(sub, _ell(ax, y, ex, ey, erx + 0.014, ery + 0.014, ppu), shade * 0.45)
    white = _ell(ax, y, ex, ey, erx, ery, ppu)
    _paint(sub, white, _rgb(B, 0.96, 0.96, 0.96))
    gzx, gzy = _col(0.025 * (2 * n[21] - 1)), _col(0.012 * (2 * n[22] - 1))
    ix = ex + gzx * np.sign(X[:, rs, cs])
    a = np.minimum(_ell(ax, y, ix, ey + gzy, _col(0.045 * es), _col(0.045 * es), ppu), white)
    _paint(sub, a, _EYES[f.eye_color.astype(int)])
    a = np.minimum(_ell(ax, y, ix, ey + gzy, _col(0.02 * es), _col(0.02 * es), ppu), white)
    _paint(sub, a, _rgb(B, 0, 0, 0))
    # hair in front: cap above a hairline (low and flat for bangs), long side curtains
    bangs = ((style == 2) | (style == 4)).astype(np.float32)
    outer = _ell(X, Y, 0.0, Cy - 0.03, _col(rx + vol), _col(ry + vol), ppu)
    hy = _col(-0.33 + 0.12 * bangs + 0.04 * (f.hair_volume - 0.5))
    hc = _col(0.45 - 0.38 * bangs)
    xr = X * (1.0 / Rx)
    cap = np.minimum(outer, _half(hy + hc * xr * xr - Y, ppu))
    curtain = np.minimum(_half(np.abs(X) - Rx * 0.86, ppu), _half(0.5 - Y, ppu)) * _col(long_)
    a = np.maximum(cap, curtain * outer) * _col(style > 0)
    np.maximum(mask, a, out=mask)
    _paint(img, a, hair)
    # brows: arched, tilted, raised by expression
    rs, cs = W(-0.45, 0.45, -0.3, -0.05)
    ax, y, sub = np.abs(X[:, rs, cs]), Y[:, rs, cs], img[:, :, rs, cs]
    bx = ax - ex
    yb = y + _col(0.15 + 0.04 * n[6]) + _col(0.12 * f.brow_tilt) * bx + 1.2 * bx * bx
    a = _ell(bx, yb, 0.0, 0.0, 0.085, _col(0.016 * f.brow_thickness), ppu)
    brow = np.where((f.hair_color == 3)[:, None], hair * 0.75, hair * 0.6 + shade * 0.1)
    _paint(sub, a, brow)
    # glasses: round / square / thin-gold frames with a tinted lens, bridge and temples
    gt = f.glasses
    rs2, cs2 = W(-0.6, 0.6, -0.3, 0.1)
    ax, y, sub = np.abs(X[:, rs2, cs2]), Y[:, rs2, cs2], img[:, :, rs2, cs2]
    dx, dy = ax - ex, y - (ey - 0.005)
    circ = np.sqrt(dx * dx + dy * dy) - 0.105
    box = np.maximum(np.abs(dx) - 0.11, np.abs(dy) - 0.075)
    d = np.where(_col(gt == 1), circ, box)
    th = _col(np.where(gt == 3, 0.011, 0.016))
    frame = _half(th - np.abs(d), ppu)
    bar = np.minimum(_half(th - np.abs(dy + 0.02), ppu), _half(_col(rx) - ax, ppu))
    bar *= _half(np.abs(d) - 0.002, ppu) * _half(d, ppu)  # bridge/temples outside the lens
    fcol = np.where((gt == 3)[:, None], [[0.7, 0.55, 0.15]], [[0.08, 0.06, 0.06]])
    on = (gt > 0).astype(np.float32)
    _paint(sub, _half(-d, ppu), _rgb(B, 0.75, 0.85, 0.95), on * 0.18)
    _paint(sub, np.maximum(frame, bar), fcol, on)
    # earrings
    rs, cs = W(-0.62, 0.62, 0.05, 0.25)
    ax, y, sub = np.abs(X[:, rs, cs]), Y[:, rs, cs], img[:, :, rs, cs]
    a = _ell(ax, y, _col(rx * 0.99), 0.15, 0.032, 0.032, ppu)
    _paint(sub, a, _rgb(B, 0.95, 0.8, 0.25), f.earrings)

    # lighting: brightness and a directional gradient over the whole image
    lx = 2 * n[7] - 1
    ly = np.sqrt(1 - lx * lx) * np.where(n[8] < 0.5, -1, 1)
    st, br = 0.3 * n[9], 0.85 + 0.25 * n[10]
    light = U * _col(br * st * lx) + (V * _col(br * st * ly) + _col(br))
    img *= light[:, None]
    return img, mask


def render(factors: Factors, image_seeds: Sequence[int] | np.ndarray, size: int = 64,
           return_mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Render one image per (identity, image seed): uint8 [N, size, size, 3].

    With ``return_mask=True`` also returns the person (foreground) mask, float32 [N, size, size].

    Example:
        >>> f = sample_identities([7, 7]); render(f, [0, 1]).shape
        (2, 64, 64, 3)
    """
    if not isinstance(factors, Factors):
        raise W2WError(f"factors must be a Factors (from sample_identities), got {type(factors)}")
    seeds = _check_seeds(image_seeds, "image seeds")
    if len(seeds) != len(factors):
        raise W2WError(f"got {len(factors)} identities but {len(seeds)} image seeds; "
                       "pass one image seed per identity")
    if not isinstance(size, (int, np.integer)) or size < 32 or size % 8:
        raise W2WError(f"size must be an int >= 32 and a multiple of 8, got {size!r}")
    size = int(size)
    nu = _uniforms(seeds, _IMG_TAG, _N_IMG_U)                         # [N, 24]
    out = np.empty((len(seeds), size, size, 3), np.uint8)
    masks = np.empty((len(seeds), size, size), np.float32)
    chunk = max(1, _CHUNK * 64 * 64 // (size * size))
    for i in range(0, len(seeds), chunk):
        j = min(i + chunk, len(seeds))
        img, m = _render_chunk(factors.take(slice(i, j)), nu[i:j], size)  # [b,3,H,W], [b,H,W]
        img *= 255.0
        img += 0.5
        np.clip(img, 0, 255, out=img)
        out[i:j] = img.transpose(0, 2, 3, 1).astype(np.uint8)
        masks[i:j] = m
    return (out, masks) if return_mask else out


def render_ids(identity_seeds: Sequence[int] | np.ndarray, image_seeds: Sequence[int] | np.ndarray,
               size: int = 64, return_mask: bool = False):
    """Render images from seeds: ``render(sample_identities(identity_seeds), image_seeds, size)``.

    Example:
        >>> render_ids([3, 4], [0, 0]).shape
        (2, 64, 64, 3)
    """
    ids = _check_seeds(identity_seeds, "identity seeds")
    imgs = _check_seeds(image_seeds, "image seeds")
    if len(ids) != len(imgs):
        raise W2WError(f"got {len(ids)} identity seeds but {len(imgs)} image seeds; "
                       "they must have the same length")
    return render(sample_identities(ids), imgs, size, return_mask)


def _bench(n: int = 512) -> None:
    """Print single-process rendering speed in images/s."""
    import time
    render_ids(np.arange(32), np.arange(32))                           # warm-up
    t0 = time.perf_counter()
    render_ids(np.arange(n), np.arange(n) + 10_000)
    dt = time.perf_counter() - t0
    print(f"render: {n / dt:.0f} images/s ({n} images of 64x64 in {dt:.2f} s)")


if __name__ == "__main__":
    _bench()


EVAL_VIEWS = 10**6      # image seeds >= this are evaluation views: no model of this project trains on them
HELD_OUT_BASE = 10**9   # identity seeds >= this are held out: no model of this project trains on them


def held_out_seeds(n: int, rng: int | Sequence[int] | np.random.Generator) -> np.ndarray:
    """``n`` distinct held-out identity seeds (>= :data:`HELD_OUT_BASE`), drawn with ``rng`` (or a seed for one).

    Example:
        >>> bool((held_out_seeds(3, 0) >= HELD_OUT_BASE).all())
        True
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    return HELD_OUT_BASE + rng.choice(HELD_OUT_BASE, n, replace=False)


def identity_views(identity_seeds: Sequence[int] | np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """``n`` images of each identity, image seeds ``start .. start+n-1``: uint8 ``[G * n, 64, 64, 3]``, row-major.

    Training views start at 0; evaluation views at :data:`EVAL_VIEWS`.

    Example:
        >>> identity_views([3, 4], 2).shape
        (4, 64, 64, 3)
    """
    ids = np.asarray(identity_seeds, dtype=np.int64)
    return render_ids(np.repeat(ids, n), np.tile(start + np.arange(n), len(ids)))
