"""Attribute editing in a weight space: w2w's least-squares directions, debiased, applied at a matched strength.

weights2weights (Dravid et al. 2024, sec. 3.2 and its ``editing.py``) labels every identity model with
binary attributes and finds, per attribute, the direction of PCA coefficients that predicts the label by
least squares: ``d = pinv(Z) @ y``, with ``Z [N, k]`` the training models' coefficients and ``y [N]`` the
0/1 labels. Directions of other attributes are then projected out of ``d`` ("debiasing"), so that adding
a beard does not also make the face male. The same code runs in the VAE's latent (``Z``: posterior means).

An edit moves a model's latent along the unit direction by ``strength`` times the standard deviation of
the training latents projected on that direction: strength 1 is one dataset standard deviation of the
attribute's axis in either space, the matched scale at which the PCA and the VAE are compared. Images of
an edit are drawn with w2w's timestep switch (:func:`w2wlib.generate.generate`'s ``edited=``/``switch_t=``).

Example:
    >>> dirs = AttributeDirections.fit(S, "pca")                                    # doctest: +SKIP
    >>> d = dirs.direction("Beard", debias=["Male"])                               # doctest: +SKIP
    >>> W_edit, z_edit = edit_weights(S.pca, ds.rows([0]), d, strength=2.0)        # doctest: +SKIP
    >>> imgs = generate(pipe, ds.rows([0]), edited=W_edit, switch_t=SWITCH_T)      # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import W2WError

__all__ = ["Direction", "AttributeDirections", "least_squares_direction", "debias_direction", "edit_weights",
           "edit_scores", "edit_sweep", "edit_comparison", "comparison_rows", "plot_tradeoff", "edit_to_folder",
           "check_edit_args", "read_lora", "SWITCH_T"]

SWITCH_T = 800  # timestep from which the edited weights draw (out of 1,000): the first fifth keeps the layout


def least_squares_direction(z: torch.Tensor, labels, pinv: torch.Tensor | None = None) -> torch.Tensor:
    """w2w's direction ``pinv(z) @ labels``: the least-squares ``d [k]`` minimising ``|z @ d - labels|``.

    ``z`` ``[N, k]`` latents, ``labels`` ``[N]`` 0/1; ``pinv`` ``[k, N]`` is ``torch.linalg.pinv(z)``
    precomputed once for many attributes (as w2w ships ``pinverse_1000pc.pt``). Computed in float64.

    >>> z = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    >>> y = (z[:, 0] > 0).double()
    >>> d = least_squares_direction(z, y)
    >>> bool(d.abs().argmax() == 0)
    True
    """
    z = torch.as_tensor(z, dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float64).reshape(-1)
    if z.dim() != 2 or len(y) != len(z):
        raise W2WError(f"least squares needs latents [N, k] and N labels; got {tuple(z.shape)} and {len(y)} labels")
    if not torch.isin(y, torch.tensor([0.0, 1.0], dtype=torch.float64)).all():
        raise W2WError("labels must be 0/1 (CelebA's -1/1 are mapped to 0/1 by the dataset's attributes)")
    pinv = torch.linalg.pinv(z) if pinv is None else pinv.to(torch.float64)   # [k, N]
    return pinv @ y                                                          # [k]


def debias_direction(direction: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """``direction [k]`` with the span of ``others [m, k]`` projected out: orthogonal to every other direction.

    w2w subtracts each other direction's projection in turn, which leaves the result orthogonal only to the
    last one when the others are not orthogonal to each other; projecting out their span at once (an
    orthonormal basis by QR) is the same for one attribute and exact for several.
    """
    d = torch.as_tensor(direction, dtype=torch.float64)
    o = torch.as_tensor(others, dtype=torch.float64).reshape(-1, d.numel())
    if o.shape[0] == 0:
        return d.clone()
    q, r = torch.linalg.qr(o.T)                                   # q [k, m]: a basis of the others' span
    q = q[:, r.diagonal().abs() > 1e-12 * r.diagonal().abs().max().clamp_min(1e-300)]  # drop dependent ones
    return d - q @ (q.T @ d)


@dataclass(frozen=True)
class Direction:
    """One attribute's edit direction in one space's latent."""

    space: str                  # "pca" or "vae": which latent the vector lives in
    attribute: str              # the label it predicts (present = +)
    vector: torch.Tensor        # [k] the (debiased) least-squares direction, float64
    unit_std: float             # std over the training latents of their projection on the unit direction
    debiased: tuple[str, ...]   # the attributes projected out

    @property
    def unit(self) -> torch.Tensor:
        """The direction with unit length ``[k]``."""
        return self.vector / self.vector.norm()

    def step(self, strength: float) -> torch.Tensor:
        """The latent offset ``[k]`` of an edit of ``strength`` dataset standard deviations."""
        return float(strength) * self.unit_std * self.unit


class AttributeDirections:
    """The training models' latents in one space with their attribute labels: fits :class:`Direction`s.

    ``z`` ``[N, k]`` and ``labels`` (attribute -> 0/1 ``[N]``) are the same rows. The pseudo-inverse is
    computed once and serves every attribute.
    """

    def __init__(self, space_name: str, z: torch.Tensor, labels: dict[str, np.ndarray]):
        self.space_name, self.z = space_name, torch.as_tensor(z, dtype=torch.float64).cpu()   # [N, k]
        self.labels = {k: np.asarray(v) for k, v in labels.items()}
        bad = [k for k, v in self.labels.items() if v.shape != (len(self.z),)]
        if bad:
            raise W2WError(f"attribute {bad[0]!r} has {self.labels[bad[0]].shape} labels for {len(self.z)} latents")
        self.pinv = torch.linalg.pinv(self.z)                                               # [k, N]
        self._cache: dict[str, torch.Tensor] = {}

    @classmethod
    @torch.no_grad()
    def fit(cls, spaces, space: str, rows: Sequence[int] | torch.Tensor | None = None,
            batch_size: int = 1024) -> "AttributeDirections":
        """Encode ``rows`` of the dataset (default: the spaces' training split) into ``spaces.space(space)``."""
        ds, sp = spaces.dataset, spaces.space(space)
        if not ds.attributes:
            raise W2WError(f"{ds.folder} has no attribute labels (attributes.csv): editing needs them")
        rows = spaces.train_rows if rows is None else torch.as_tensor(rows).reshape(-1)
        z = torch.cat([sp.encode_weights(ds.rows(rows[i:i + batch_size])).cpu()
                       for i in range(0, len(rows), batch_size)])                       # [N, k]
        return cls(space, z, {k: v[rows.numpy()] for k, v in ds.attributes.items()})

    def _check(self, name: str) -> None:
        if name not in self.labels:
            raise W2WError(f"unknown attribute {name!r}: choose from {', '.join(self.labels)}")

    def raw(self, attribute: str) -> torch.Tensor:
        """The least-squares direction of ``attribute`` before debiasing ``[k]``."""
        self._check(attribute)
        if attribute not in self._cache:
            self._cache[attribute] = least_squares_direction(self.z, self.labels[attribute], self.pinv)
        return self._cache[attribute]

    def correlated(self, attribute: str, min_corr: float = 0.2) -> list[str]:
        """The other attributes whose labels correlate with ``attribute``'s by ``|r| >= min_corr``."""
        self._check(attribute)
        y = self.labels[attribute].astype(float)
        out = []
        for k, v in self.labels.items():
            v = v.astype(float)
            if k != attribute and v.std() > 0 and y.std() > 0 and abs(np.corrcoef(y, v)[0, 1]) >= min_corr:
                out.append(k)
        return out

    def direction(self, attribute: str, debias: Sequence[str] | str | None = "correlated", *,
                  min_corr: float = 0.2) -> Direction:
        """``attribute``'s direction with ``debias`` projected out: names, ``"correlated"`` (those that
        :meth:`correlated` finds) or ``None`` (w2w's raw direction)."""
        if isinstance(debias, str) and debias != "correlated":
            debias = [debias]                                     # one attribute's name
        names = self.correlated(attribute, min_corr) if debias == "correlated" else list(debias or [])
        for n in names:
            self._check(n)
        if attribute in names:
            raise W2WError(f"cannot debias {attribute!r} against itself: leave it out of the debias list")
        d = self.raw(attribute)
        if names:
            d = debias_direction(d, torch.stack([self.raw(n) for n in names]))
        if float(d.norm()) < 1e-12:
            raise W2WError(f"{attribute!r}'s direction vanishes once {names} are projected out: debias fewer")
        unit_std = float((self.z @ (d / d.norm())).std())
        return Direction(self.space_name, attribute, d, unit_std, tuple(names))


@torch.no_grad()
def edit_weights(space, W: torch.Tensor, direction: Direction, strength, *,
                 keep_residual: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Edit raw LoRA rows ``W [G, D]`` by ``strength`` (a number or ``[G]``): ``(W_edit [G, D], z_edit [G, k])``.

    The latent moves by ``strength`` dataset standard deviations along the unit direction. With
    ``keep_residual`` the rows keep what the space does not reconstruct: ``W + decode(z_edit) - decode(z)``
    (strength 0 returns ``W`` itself); without it the edit is ``decode(z_edit)``, as w2w, whose models all
    live in the space.
    """
    W = torch.as_tensor(W).float().reshape(-1, space.dim).cpu()
    s = torch.as_tensor(strength, dtype=torch.float64).reshape(-1, 1)                     # [G or 1, 1]
    if not torch.isfinite(s).all() or len(s) not in (1, len(W)):
        raise W2WError(f"strength must be one finite number or one per row ({len(W)}), not {strength!r}")
    if direction.vector.numel() != space.latent_dim:
        raise W2WError(f"the {direction.attribute!r} direction has k={direction.vector.numel()} but this space's "
                       f"latent has k={space.latent_dim}: fit the direction in this space")
    z = space.encode_weights(W).cpu()                                                      # [G, k]
    z_edit = (z.double() + s * direction.step(1.0)).float()                                # [G, k]
    dec = lambda t: space.decode_weights(t.to(space.device)).cpu()
    W_edit = W + (dec(z_edit) - dec(z)) if keep_residual else dec(z_edit)
    return W_edit, z_edit


def edit_scores(encoder, before: np.ndarray, after: np.ndarray, references: np.ndarray, attribute: str,
                target: int, n_per_row: int) -> dict[str, float]:
    """How an edit did, from images of ``G`` models (row-major, ``n_per_row`` each).

    ``before``/``after``: the unedited and edited models' images with the same noise; ``references``: the
    unedited models' images with other noise (the identity to keep, not the picture). Returns
    ``flip_rate`` (of the image pairs whose unedited image lacks ``target``, as the encoder's attribute
    head reads it, the share whose edited image has it), ``id_kept`` (mean ID score of the edited images
    against the references), ``others_kept`` (the share of the other attributes' readings left unchanged),
    and ``before_rate``/``after_rate`` (the share of images showing ``target``). A scorer without an attribute
    head (FaceNet, for real photos) gives ``id_kept`` alone, the attribute readings NaN.
    """
    from .metrics import identity_scores
    from .models import has_attributes
    from .world.render import ATTRIBUTES

    id_kept = float(identity_scores(encoder, after, references, n_per_row, n_per_row).mean())
    if not has_attributes(encoder):
        nan = float("nan")
        return {"flip_rate": nan, "before_rate": nan, "after_rate": nan, "id_kept": id_kept, "others_kept": nan}
    if attribute not in ATTRIBUTES:
        raise W2WError(f"the encoder reads no attribute {attribute!r}: choose from {', '.join(ATTRIBUTES)}")
    j = ATTRIBUTES.index(attribute)
    pb, pa = encoder.predict_attributes(before) > 0, encoder.predict_attributes(after) > 0     # [G*n, A]
    want = bool(target)
    lacked = pb[:, j] != want
    flip = float((pa[lacked, j] == want).float().mean()) if lacked.any() else float("nan")
    others = torch.ones(pb.shape[1], dtype=torch.bool)
    others[j] = False
    return {"flip_rate": flip, "before_rate": float((pb[:, j] == want).float().mean()),
            "after_rate": float((pa[:, j] == want).float().mean()),
            "id_kept": id_kept,
            "others_kept": float((pb[:, others] == pa[:, others]).float().mean())}


def edit_sweep(pipe, encoder, space, W: torch.Tensor, direction: Direction, strengths: Sequence[float], *,
               n_images: int = 4, seed: int = 0, steps: int = 25, guidance: float = 4.0, switch_t: int = SWITCH_T,
               layout=None, prompt: str = "a photo of sks person", negative_prompt: str = "",
               progress: bool = False) -> list[dict]:
    """:func:`edit_scores` of the rows ``W [G, D]`` edited at each strength: one dict per strength.

    The unedited images use noise ``seed``, the references noise ``seed + 1``; every edit is drawn with
    the timestep switch at ``switch_t``. The sign of a strength sets the target (+: the attribute present).
    Strength 0 is the unedited model (:func:`edit_weights` returns ``W`` itself): its images are the unedited ones.
    """
    from tqdm.auto import tqdm

    from .generate import generate

    kw = dict(n_per_row=n_images, steps=steps, guidance=guidance, layout=layout, prompt=prompt,
              negative_prompt=negative_prompt)
    before = generate(pipe, W, seed=seed, **kw)
    refs = generate(pipe, W, seed=seed + 1, **kw)
    out = []
    for s in tqdm(strengths, desc=f"edit {direction.attribute} ({direction.space})", disable=not progress):
        W_edit, _ = edit_weights(space, W, direction, s)
        after = before if s == 0 else generate(pipe, W, seed=seed, edited=W_edit, switch_t=switch_t, **kw)
        out.append({"strength": float(s), **edit_scores(encoder, before, after, refs, direction.attribute,
                                                          int(s >= 0), n_images), "images": after})
    return out


def edit_comparison(pipe, encoder, spaces, attributes: Sequence[str], strengths: Sequence[float], *, n_rows: int = 8,
                    n_images: int = 3, seed: int = 0, switch_t: int = SWITCH_T, min_corr: float = 0.2,
                    directions: dict | None = None, **draw) -> dict[tuple[str, str], list[dict]]:
    """PCA against VAE at matched strength: each attribute added to the first ``n_rows`` held-out models that
    lack it (by their labels), in each space, at every strength (:func:`edit_sweep`).

    ``spaces``: the shipped :class:`~w2wlib.spaces.shipped.Spaces`; ``directions``: ``{"pca": ..., "vae": ...}``
    :class:`AttributeDirections` (fit here when ``None``), debiased against attributes correlated above
    ``min_corr``; ``draw``: ``prompt``, ``steps``, ``guidance``, ``layout`` of the images. Returns
    ``{(attribute, space): [one dict per strength]}``. The chapter "Editing" and ``benchmarks/editing.py`` call it.
    """
    directions = directions or {name: AttributeDirections.fit(spaces, name) for name in ("pca", "vae")}
    ds, val = spaces.dataset, spaces.val_rows
    out = {}
    for a in attributes:
        rows = [int(r) for r in val[ds.attributes[a][val.numpy()] == 0][:n_rows]]
        for name, dirs in directions.items():
            d = dirs.direction(a, min_corr=min_corr)
            out[a, name] = edit_sweep(pipe, encoder, spaces.space(name), ds.rows(rows), d, strengths,
                                      n_images=n_images, seed=seed, switch_t=switch_t, **draw)
    return out


def comparison_rows(results: dict, label: str = "") -> list[list]:
    """Table rows of :func:`edit_comparison`'s results: attribute (+ ``label``), space, strength, then the scores."""
    return [[a + label, name.upper(), f"{r['strength']:g}", r["flip_rate"], r["id_kept"], r["others_kept"],
             r["before_rate"], r["after_rate"]] for (a, name), res in results.items() for r in res]


def plot_tradeoff(recorded: dict, live: dict | None = None):
    """Flip rate against identity kept, one panel per attribute: ``recorded`` results as lines (strengths
    annotated), ``live`` ones as crosses; both ``{(attribute, space): [per strength]}``."""
    import matplotlib.pyplot as plt

    live = live or {}
    attrs = list(dict.fromkeys([a for a, _ in recorded] + [a for a, _ in live]))
    fig, axes = plt.subplots(1, len(attrs), figsize=(5.5 * len(attrs), 3.8), squeeze=False)
    for ax, a in zip(axes[0], attrs):
        for i, name in enumerate(("pca", "vae")):
            for res, style, tag in ((recorded.get((a, name)), "o-" if i == 0 else "s-", "recorded"),
                                    (live.get((a, name)), "x--", "live")):
                if not res:
                    continue
                x, y = [r["id_kept"] for r in res], [r["flip_rate"] for r in res]
                ax.plot(x, y, style, color=f"C{i}", ms=8 if tag == "live" else 5, label=f"{name.upper()}, {tag}")
                for r in res:
                    ax.annotate(f"{r['strength']:g}", (r["id_kept"], r["flip_rate"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        ax.set(xlabel="ID kept (edited vs unedited model)", ylabel=f"flip rate: {a}", title=a)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def read_lora(path: str | os.PathLike, layout) -> torch.Tensor:
    """A LoRA file or folder as a raw row ``[D]``: a diffusers file (or a folder holding one) or a peft folder."""
    from .lora import DIFFUSERS_WEIGHT_NAME
    from .lora_io import load_diffusers_lora, load_peft_adapter

    p = Path(path)
    try:
        if p.is_file() and p.suffix == ".safetensors":
            return load_diffusers_lora(p.parent, layout, weight_name=p.name)
        if (p / DIFFUSERS_WEIGHT_NAME).is_file():
            return load_diffusers_lora(p, layout)
        if (p / "adapter_config.json").is_file():
            return load_peft_adapter(p, layout)
        if (p / "peft" / "adapter_config.json").is_file():
            return load_peft_adapter(p / "peft", layout)
    except W2WError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise W2WError(f"--lora {p} could not be read ({type(err).__name__}: {err}): give a diffusers "
                       f"{DIFFUSERS_WEIGHT_NAME} or a peft adapter folder made for this base model") from err
    raise W2WError(f"--lora {p} is neither a .safetensors LoRA file nor a folder holding "
                   f"{DIFFUSERS_WEIGHT_NAME} or a peft adapter_config.json: give one (w2w sample/invert folders work)")


def check_edit_args(strength: float, row: int | None, lora, n_preview: int = 1) -> None:
    """The checks of ``w2w edit``'s own arguments, before anything is loaded."""
    from .sampling import check_count

    if (row is None) == (lora is None):
        raise W2WError("give exactly one of --row I (a dataset row) or --lora FILE (a LoRA file or folder)")
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise W2WError(f"--strength must be a finite number of dataset standard deviations, not {strength}")
    check_count(n_preview, "--preview", "a number of images")


def edit_to_folder(out: str | os.PathLike, *, pipe, spaces, space: str, attribute: str, strength: float,
                   row: int | None = None, lora: str | os.PathLike | None = None,
                   debias: Sequence[str] | str | None = "correlated", switch_t: int = SWITCH_T, n_preview: int = 4,
                   seed: int = 0, overwrite: bool = False, progress: bool = True, draw: dict | None = None) -> Path:
    """``w2w edit``: edit a dataset row or a LoRA file along ``attribute`` and export the edited model.

    The preview's first row is the source model's images, the second the edited model's with the timestep
    switch, over the same ``n_preview`` noise seeds, drawn with ``draw`` (the profile's prompt, steps, guidance).
    """
    from .export import export_lora
    from .generate import generate
    from .sampling import check_row, instance_prompt
    from .viz import image_grid

    check_edit_args(strength, row, lora, n_preview)
    ds = spaces.dataset
    layout = ds.lora_layout(pipe.unet)
    W = ds.rows([check_row(ds, row)]) if row is not None else read_lora(lora, layout)[None]
    d = AttributeDirections.fit(spaces, space).direction(attribute, debias)
    W_edit, z_edit = edit_weights(spaces.space(space), W, d, strength)
    kw = {"prompt": instance_prompt(ds), **(draw or {}), "n_per_row": n_preview, "seed": seed, "layout": layout,
          "progress": progress}
    imgs = np.concatenate([generate(pipe, W, **kw), generate(pipe, W, edited=W_edit, switch_t=switch_t, **kw)])
    info = {"source": f"row {row}" if row is not None else str(lora), "space": space, "attribute": attribute,
            "strength": strength, "strength_unit": f"{d.unit_std:.4g} (std of the training latents along it)",
            "debiased": list(d.debiased), "switch_t": switch_t, "preview_seed": seed,
            "latent": "the edited latent; the LoRA also keeps what the space does not reconstruct of the source"}
    return export_lora(out, W_edit[0], layout, z=z_edit[0], space=space, preview=image_grid(imgs, nrow=n_preview),
                       info=info, overwrite=overwrite)
