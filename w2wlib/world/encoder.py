"""The identity encoder: the mini world's stand-in for a face-recognition network.

weights2weights scores a personalised model by its *ID score*: the mean cosine similarity between
face embeddings (facenet / ArcFace) of generated images and of reference images of the person. In
the mini world the faces are procedural (:mod:`w2wlib.world.render`), so the embedding network is
a small residual CNN trained here, from rendered images only:

* :class:`IdentityEncoder` maps images ``[N, 3, 64, 64]`` in [-1, 1] to unit-norm embeddings
  ``[N, E]`` and to logits of the CelebA-style attributes (``ATTRIBUTES``) ``[N, A]``.
* :func:`~w2wlib.world.encoder_training.train_encoder` trains it with a margin loss over the identities of each batch, on fresh
  identities every batch (identity seeds < ``HELD_OUT_BASE``), with heavy nuisance augmentation and,
  optionally, a share of each batch passed through the autoencoder's reconstruction (``recon_fn``)
  so that the encoder tolerates decoder blur.
* :func:`verification` measures it on held-out identities (seeds >= ``HELD_OUT_BASE``): ROC AUC of
  same- vs different-identity pairs, and attribute accuracy. :func:`id_score` is the ID score.

Example:
    >>> from w2wlib.world.encoder_training import train_encoder
    >>> enc, history = train_encoder(EncoderConfig.micro(), progress=False)   # doctest: +SKIP
    >>> verification(enc)["auc"] > 0.85                                      # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from w2wlib.errors import ArtifactMissingError, W2WError
from w2wlib.viz import to_tensor
from w2wlib.world.render import (ATTRIBUTES, FACTOR_NAMES, HELD_OUT_BASE, attributes, held_out_seeds, render_ids,
                                 sample_identities)

__all__ = ["HELD_OUT_BASE", "EncoderConfig", "IdentityEncoder", "verification",
           "roc_auc", "roc_curve", "id_score", "pairwise_id_scores", "save_encoder",
           "load_encoder"]

log = logging.getLogger(__name__)

SIZE = 64                    # the encoder's input resolution; other sizes are resized to it
WEIGHTS, CONFIG = "identity_encoder.safetensors", "config.json"
_BUILD = "w2w world build"

# continuous factors regressed by the auxiliary head (categorical codes are left to the attributes)
_REGRESSED = tuple(n for n in FACTOR_NAMES if n not in
                   ("hair_color", "hair_style", "eye_color", "beard", "glasses"))


@dataclass
class EncoderConfig:
    """How to build and train an :class:`IdentityEncoder`. The defaults are the "mini" build.

    Example:
        >>> EncoderConfig.micro().steps < EncoderConfig().steps
        True
    """

    embed_dim: int = 128          # embedding size; like ArcFace's 512, but the world is simpler
    width: int = 32               # channels of the first stage; doubles per stage (x8 at 4x4)
    margin: float = 0.3           # CosFace additive margin on the cosine to the own-identity centre
    scale: float = 20.0           # logit scale s; s*(1-m) must dominate the batch's K-1 negatives
    identity_pool: int = HELD_OUT_BASE  # training identity seeds are drawn from [0, pool): fresh
    views: int = 2                # images per identity in a batch, M >= 2; 2 measured better
                                  # than 4: more distinct identities per batch for the attributes
    batch_size: int = 128         # K*M images; K = batch_size // views identities per batch
    steps: int = 1100             # optimiser steps: 1100 x 64 = 70,400 distinct identities
    lr: float = 2e-3              # AdamW peak learning rate (after warm-up, cosine to 0)
    weight_decay: float = 0.05    # decoupled weight decay
    warmup: int = 50              # linear warm-up steps (BN statistics settle first)
    shift: float = 4.0            # augmentation: +- translation in pixels (renderer adds +-3)
    zoom: float = 0.12            # augmentation: +- relative scale
    rotate: float = 8.0           # augmentation: +- rotation in degrees
    jitter: float = 0.25          # augmentation: brightness / contrast / saturation / colour cast
    blur: float = 0.5             # augmentation: probability of a random-strength blur
    noise: float = 0.06           # augmentation: max std of gaussian pixel noise (in [-1, 1])
    aug_prob: float = 0.5         # share of images augmented; clean ones keep fine details easy
    recon_fraction: float = 0.25  # share of each batch sent through recon_fn (when one is given)
    attr_weight: float = 1.0      # weight of the attribute BCE next to the identity loss
    id_start: float = 0.4         # share of the steps trained on attributes/factors only before
                                  # the margin loss ramps in (over 10% of the steps): its strong
                                  # early gradients otherwise lock the trunk on coarse colours
    factor_weight: float = 1.0    # weight of the auxiliary regression of the continuous factors:
                                  # thresholded attributes (Big_Nose...) learn from dense targets
    seed: int = 0                 # all randomness (init, identities, image seeds, augmentation)
    log_every: int = 25           # steps between history entries

    @classmethod
    def micro(cls, **overrides: Any) -> "EncoderConfig":
        """A tiny build for tests: trains in well under a minute on one core."""
        kw: dict[str, Any] = dict(embed_dim=64, width=16, batch_size=64, steps=120, lr=4e-3,
                                  warmup=10, log_every=20)
        kw.update(overrides)
        return cls(**kw)

    @property
    def ids_per_batch(self) -> int:
        """K, the identities in one batch."""
        return self.batch_size // self.views

    def validate(self) -> None:
        """Raise W2WError when the settings cannot work together."""
        if self.views < 2 or self.batch_size % self.views or self.ids_per_batch < 2:
            raise W2WError(f"need views >= 2 and batch_size a multiple of views with >= 2 "
                           f"identities per batch, got views={self.views}, "
                           f"batch_size={self.batch_size}")
        if not self.ids_per_batch <= self.identity_pool <= HELD_OUT_BASE:
            raise W2WError(f"identity_pool must be in [{self.ids_per_batch}, {HELD_OUT_BASE}], got "
                           f"{self.identity_pool}: seeds >= HELD_OUT_BASE are held out")
        if self.steps < 1 or self.width < 4 or self.embed_dim < 2 or self.lr <= 0:
            raise W2WError(f"bad encoder config: steps={self.steps}, width={self.width}, "
                           f"embed_dim={self.embed_dim}, lr={self.lr}")
        if not 0.0 <= self.recon_fraction <= 1.0:
            raise W2WError(f"recon_fraction must be in [0, 1], got {self.recon_fraction}")


# ----------------------------------------------------------------------------- the network
class _Block(nn.Module):
    """Basic residual block (two 3x3 convs); the first conv may stride 2 and widen."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (nn.Identity() if cin == cout and stride == 1 else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + self.short(x))


class IdentityEncoder(nn.Module):
    """Residual CNN: images ``[N,3,64,64]`` in [-1,1] -> (unit embedding ``[N,E]``, logits ``[N,A]``).

    Stem 3x3/2 (32x32, w) -> blocks at 32x32 (w), 16x16 (2w), 8x8 (4w), 4x4 (8w). Like ArcFace's
    "E" output the 4x4 map is flattened (it keeps the layout of the face, which global pooling
    would throw away): BN -> Linear -> BN1d -> L2 normalise. The attribute head reads the same map.

    Example:
        >>> enc = IdentityEncoder(EncoderConfig.micro()).eval()
        >>> z, logits = enc(torch.zeros(2, 3, 64, 64)); z.shape, logits.shape
        (torch.Size([2, 64]), torch.Size([2, 17]))
    """

    def __init__(self, config: EncoderConfig | None = None):
        super().__init__()
        self.config = cfg = config or EncoderConfig()
        w = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU())
        self.stages = nn.Sequential(_Block(w, w, 1), _Block(w, 2 * w, 2),
                                    _Block(2 * w, 4 * w, 2), _Block(4 * w, 8 * w, 2))
        self.feat_norm = nn.BatchNorm2d(8 * w)
        flat = 8 * w * (SIZE // 16) ** 2
        self.embed_fc = nn.Linear(flat, cfg.embed_dim)
        self.embed_norm = nn.BatchNorm1d(cfg.embed_dim)
        self.attr_fc = nn.Linear(flat, len(ATTRIBUTES))
        self.factor_fc = nn.Linear(flat, len(_REGRESSED))         # training-time auxiliary head
        self.to(memory_format=torch.channels_last)                # ~1.3-2x faster convs on CPU

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, logits, _ = self._forward(x)
        return z, logits                                       # [N, E], [N, A]

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.contiguous(memory_format=torch.channels_last)   # [N, 3, 64, 64]
        h = self.stages(self.stem(x))                          # [N, 8w, 4, 4]
        h = self.feat_norm(h).flatten(1)                       # [N, 128w]
        z = F.normalize(self.embed_norm(self.embed_fc(h)), dim=1)   # [N, E], unit norm
        return z, self.attr_fc(h), self.factor_fc(h)           # [N, E], [N, A], [N, F']

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def _run(self, images, batch: int, head: int) -> torch.Tensor:
        images = _check_images(images)
        was_training = self.training
        self.eval()
        try:
            outs = [self(_to_input(images[i:i + batch]).to(self.device))[head].float().cpu()
                    for i in range(0, len(images), batch)]
        finally:
            self.train(was_training)
        width = self.config.embed_dim if head == 0 else len(ATTRIBUTES)
        return torch.cat(outs) if outs else torch.zeros(0, width)

    def embed(self, images, batch: int = 256) -> torch.Tensor:
        """Unit-norm embeddings ``[N, E]`` (CPU) of uint8 ``[N,H,W,3]`` or float ``[N,3,H,W]`` in [-1,1].

        Example:
            >>> from w2wlib.world.render import render_ids
            >>> IdentityEncoder(EncoderConfig.micro()).embed(render_ids([1, 2], [0, 0])).shape
            torch.Size([2, 64])
        """
        return self._run(images, batch, 0)

    def predict_attributes(self, images, batch: int = 256) -> torch.Tensor:
        """Attribute logits ``[N, len(ATTRIBUTES)]`` (CPU); ``> 0`` means present."""
        return self._run(images, batch, 1)


def _check_images(images) -> np.ndarray | torch.Tensor:
    """The encoder's input rules (:func:`w2wlib.images.check_image_batch`): at least ``SIZE`` a side,
    larger images are resized down to it."""
    from ..images import check_image_batch

    return check_image_batch(images, min_size=SIZE, model="encoder",
                             size_fix=f"input: pass images of at least {SIZE}x{SIZE} (larger ones are resized "
                                      f"to it); upscaling a tiny image cannot give it the detail the encoder reads")


def _to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Checked images -> float [N, 3, 64, 64] in [-1, 1] (other sizes: antialiased resize)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype == torch.uint8:
        x = to_tensor(images)                                           # [N, 3, H, W]
    else:
        x = images.float()
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.contiguous()


# ----------------------------------------------------------------------------- evaluation
def roc_auc(same, diff) -> float:
    """ROC AUC of scores ``same`` (positives) vs ``diff`` (negatives), Mann-Whitney U, ties = 1/2.

    Example:
        >>> roc_auc([0.9, 0.8], [0.1, 0.8])
        0.875
    """
    pos, neg = np.asarray(same, np.float64).ravel(), np.asarray(diff, np.float64).ravel()
    if not len(pos) or not len(neg):
        raise W2WError("roc_auc needs at least one positive and one negative score")
    allv = np.concatenate([pos, neg])
    uniq, inv, cnt = np.unique(allv, return_inverse=True, return_counts=True)
    mid = np.cumsum(cnt) - (cnt - 1) / 2.0                              # average rank per value
    r = mid[inv][: len(pos)].sum()
    return float((r - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def roc_curve(same, diff) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve (fpr, tpr) over all thresholds, from (0, 0) to (1, 1), for plotting.

    Example:
        >>> fpr, tpr = roc_curve([0.9, 0.8], [0.1, 0.8]); fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0])
    """
    pos, neg = np.asarray(same, np.float64).ravel(), np.asarray(diff, np.float64).ravel()
    if not len(pos) or not len(neg):
        raise W2WError("roc_curve needs at least one positive and one negative score")
    s = np.concatenate([pos, neg])
    lab = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    o = np.argsort(-s, kind="stable")
    s, lab = s[o], lab[o]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]                # end of each tie group
    tp, fp = np.cumsum(lab)[last], np.cumsum(1 - lab)[last]
    return np.r_[0.0, fp / len(neg)], np.r_[0.0, tp / len(pos)]


def verification(encoder: IdentityEncoder, n_identities: int = 200, n_views: int = 4,
                 seed: int = 0) -> dict:
    """Verify on fresh held-out identities (seeds >= ``HELD_OUT_BASE``), ``n_views`` images each.

    Returns ``auc`` (same- vs different-identity pair cosines), ``same`` / ``diff`` (the cosine
    arrays), ``same_mean`` / ``diff_mean``, ``tar_at_far_1e-3``, ``attr_acc`` (mean over attributes),
    ``attr_acc_per`` (dict), ``attr_acc_identity`` (from logits averaged over each identity's
    views), ``attr_majority`` (mean accuracy of always predicting each attribute's
    majority class on these images: the baseline to beat).

    Example:
        >>> r = verification(IdentityEncoder(EncoderConfig.micro()), 10, 2); 0 <= r["auc"] <= 1
        True
    """
    if n_identities < 2 or n_views < 2:
        raise W2WError(f"verification needs >= 2 identities and >= 2 views, got "
                       f"{n_identities} and {n_views}")
    rng = np.random.default_rng([seed, 0x5EED])
    ids = held_out_seeds(n_identities, rng)
    ids = np.repeat(ids, n_views)                                       # [N*V]
    imgs = render_ids(ids, rng.integers(0, 2**31, len(ids)))            # [N*V, 64, 64, 3]
    z = encoder.embed(imgs).double()                                    # [N*V, E]
    logits = encoder.predict_attributes(imgs)                           # [N*V, A]
    sim = (z @ z.T).numpy()                                             # [N*V, N*V]
    iu = np.triu_indices(len(ids), 1)
    same_mask = ids[iu[0]] == ids[iu[1]]
    same, diff = sim[iu][same_mask], sim[iu][~same_mask]
    truth = attributes(sample_identities(ids))                          # [N*V, A] bool
    correct = ((logits > 0).numpy() == truth).mean(0)                   # [A]
    per_id = logits.view(n_identities, n_views, -1).mean(1) > 0         # [N, A] views pooled
    id_correct = (per_id.numpy() == truth[::n_views]).mean()
    major = np.maximum(truth.mean(0), 1 - truth.mean(0))
    fpr, tpr = roc_curve(same, diff)
    return dict(auc=roc_auc(same, diff), same=same, diff=diff, same_mean=float(same.mean()),
                diff_mean=float(diff.mean()), **{"tar_at_far_1e-3": float(tpr[fpr <= 1e-3].max())},
                attr_acc=float(correct.mean()), attr_acc_identity=float(id_correct),
                attr_acc_per={a: float(c) for a, c in zip(ATTRIBUTES, correct)},
                attr_majority=float(major.mean()))


def id_score(encoder: IdentityEncoder, images_a, images_b) -> float:
    """The ID score: mean cosine similarity over ALL pairs (a_i, b_j) of embeddings.

    Used as "images of one identity vs reference images of that identity"; with unit embeddings it
    equals the dot product of the two mean embeddings.

    Example:
        >>> enc = IdentityEncoder(EncoderConfig.micro())
        >>> -1 <= id_score(enc, render_ids([5, 5], [0, 1]), render_ids([5], [2])) <= 1
        True
    """
    za, zb = encoder.embed(images_a).double(), encoder.embed(images_b).double()   # [Na,E], [Nb,E]
    if not len(za) or not len(zb):
        raise W2WError("id_score needs at least one image on each side")
    return float(za.mean(0) @ zb.mean(0))


def pairwise_id_scores(encoder: IdentityEncoder, images_a, images_b) -> torch.Tensor:
    """Cosine similarities ``[N]`` of paired images: ``cos(a_i, b_i)``.

    Example:
        >>> enc = IdentityEncoder(EncoderConfig.micro())
        >>> pairwise_id_scores(enc, render_ids([1, 2], [0, 0]), render_ids([1, 2], [1, 1])).shape
        torch.Size([2])
    """
    za, zb = encoder.embed(images_a), encoder.embed(images_b)          # [N, E] each
    if za.shape != zb.shape:
        raise W2WError(f"pairwise_id_scores needs as many images on both sides, got "
                       f"{len(za)} and {len(zb)}")
    return (za * zb).sum(1)


# ----------------------------------------------------------------------------- persistence
def save_encoder(encoder: IdentityEncoder, folder: str | Path) -> Path:
    """Write ``identity_encoder.safetensors`` and ``config.json`` into ``folder``; returns it."""
    from safetensors.torch import save_file
    from w2wlib._version import __version__
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {n: t.detach().cpu().contiguous() for n, t in encoder.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    meta = dict(config=asdict(encoder.config), version=__version__, attributes=list(ATTRIBUTES))
    (folder / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_encoder(folder: str | Path, device: str | torch.device = "cpu") -> IdentityEncoder:
    """Load an encoder written by :func:`save_encoder` (eval mode).

    Example:
        >>> load_encoder("/nonexistent")                     # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        w2wlib.errors.ArtifactMissingError: ...
    """
    from safetensors.torch import load_file
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise ArtifactMissingError(f"identity encoder file {folder / name} is missing; "
                                       f"build it with `{_BUILD}`")
    try:
        meta = json.loads((folder / CONFIG).read_text())
        known = {f.name for f in fields(EncoderConfig)}
        cfg = EncoderConfig(**{k: v for k, v in meta["config"].items() if k in known})
    except (ValueError, KeyError, TypeError) as e:
        raise W2WError(f"{folder / CONFIG} is not an identity-encoder config ({e}); "
                       f"rebuild it with `{_BUILD}`") from e
    if list(meta.get("attributes", [])) != list(ATTRIBUTES):
        raise W2WError(f"the encoder in {folder} was trained for attributes "
                       f"{meta.get('attributes')}, but this w2wlib has {list(ATTRIBUTES)}; "
                       f"rebuild it with `{_BUILD}`")
    model = IdentityEncoder(cfg)
    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
    except RuntimeError as e:
        raise W2WError(f"{folder / WEIGHTS} does not match its config: {e}") from e
    return model.to(device).eval()
