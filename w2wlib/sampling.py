"""Models out of a weight space: sampled, interpolated, checked against the dataset, and written as files.

- :func:`sample_models`: ``n`` models from a space's prior (PCA: each coefficient from its own Gaussian,
  as w2w; VAE: N(0, I)), seeded by the project's seed rule;
- :func:`interpolation_path`: latents between two models, linear in either space, or spherical (slerp,
  White 2016, "Sampling generative networks") in the VAE, whose prior is an isotropic Gaussian;
- :func:`nearest_rows`: each model's nearest training row by cosine in the standardised weight space, the
  check that a sampled model is not a copy of a dataset row;
- :func:`sample_to_folders` and :func:`export_to_folder`: ``w2w sample`` and ``w2w export``, through
  :func:`w2wlib.export.export_lora`;
- :func:`interpolation_widget`: the live ipywidget of the chapter "Sampling and interpolation".

Example:
    >>> z, W = sample_models(S.vae, 8, seed=0)            # [8, k] latents, [8, D] raw LoRA rows  # doctest: +SKIP
    >>> path = interpolation_path(S.vae, z[0], z[1], 7, mode="slerp")                          # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import W2WError

__all__ = ["sample_models", "fit_gaussian", "slerp", "interpolation_path", "path_weights", "nearest_rows", "sample_to_folders",
           "export_to_folder", "read_latent", "interpolation_widget", "check_row", "check_count", "check_formats",
           "instance_prompt", "EXPORT_FORMATS", "W2W_FILE"]

EXPORT_FORMATS = ("diffusers", "peft", "w2w")
W2W_FILE = "w2wmodel.pt"   # w2w's own model file: the PCA coefficients [1, k] (its save_model_w2w)
_SAMPLE_TAG = 0x5A3                  # keeps the sampling stream apart from the other streams of a seed


def instance_prompt(ds) -> str:
    """The prompt the dataset's LoRAs were trained with: its DreamBooth record's, else w2w's "sks person" for the
    public files (its train.sh; they record none) and our DreamBooth default for a dataset of ours."""
    default = "sks person" if getattr(ds, "layout", None) == "w2w" else "a photo of sks person"
    return (ds.extra.get("dreambooth") or {}).get("instance_prompt", default)


def check_row(ds, row: int) -> int:
    """``row`` if it indexes the dataset, else a W2WError that gives the range."""
    if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < len(ds):
        raise W2WError(f"--row {row} is not a row of {ds.folder} ({len(ds):,} rows): pick 0 ... {len(ds) - 1}")
    return int(row)


def check_count(n, flag: str = "-n", what: str = "a number of models") -> int:
    """``n`` if it is an int >= 1, else a W2WError naming ``flag``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise W2WError(f"{flag} must be {what} >= 1, not {n!r}")
    return int(n)


def check_formats(formats: Sequence[str]) -> list[str]:
    """``formats`` if each is one of :data:`EXPORT_FORMATS` (and there is one), else a W2WError with the choices."""
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise W2WError(f"unknown --format {unknown[0] if unknown else '(none)'}: choose from "
                       f"{', '.join(EXPORT_FORMATS)}")
    return list(formats)


def fit_gaussian(z: torch.Tensor, *, jitter: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[k]`` and a Cholesky factor ``L [k, k]`` of the sample covariance of latents ``z [N, k]``
    (``L @ L.T`` is ``np.cov(z.T)``, plus ``jitter`` times the mean variance on the diagonal if needed)."""
    z = torch.as_tensor(z).double().cpu()
    if z.dim() != 2 or len(z) < 2 or not torch.isfinite(z).all():
        raise W2WError(f"fitting a Gaussian needs finite latents [N >= 2, k], not {tuple(z.shape)}"
                       f"{'' if torch.isfinite(z).all() else ' with NaN/inf'}: pass more rows")
    mu = z.mean(0)
    cov = torch.cov(z.T).reshape(z.shape[1], z.shape[1])
    L, info = torch.linalg.cholesky_ex(cov)
    if info:                                # rank-deficient (N <= k): regularise, as a Gaussian fit must
        L = torch.linalg.cholesky(cov + jitter * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype))
    return mu, L


@torch.no_grad()
def sample_models(space, n: int, *, seed: int = 0, scale: float = 1.0, fit_rows: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` models from ``space``: latents ``[n, k]`` and raw LoRA rows ``[n, D]`` (CPU).

    By default from the space's prior (PCA: w2w's per-coefficient Gaussians; VAE: N(0, I)). With
    ``fit_rows`` (raw LoRA rows ``[N, D]``, e.g. the training split), from a full-covariance Gaussian fitted
    to their latents, the aggregate posterior: a VAE whose codes spread wider than N(0, I) decodes its prior
    draws to models near the mean identity, and this samples where its data are. ``scale`` multiplies the
    spread either way.

    >>> z, W = sample_models(S.vae, 8, seed=0, fit_rows=ds.rows(S.train_rows))   # doctest: +SKIP
    """
    from .seeding import generator

    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise W2WError(f"scale must be a finite number >= 0, not {scale!r}")
    if fit_rows is None:
        z = space.sample(n, generator(seed, _SAMPLE_TAG), scale=scale)
    else:
        mu, L = fit_gaussian(space.encode_weights(torch.as_tensor(fit_rows).float()))
        eps = torch.randn(check_count(n), len(mu), generator=generator(seed, _SAMPLE_TAG), dtype=torch.float64)
        z = (mu + scale * eps @ L.T).float().to(space.device)
    return z.cpu(), space.decode_weights(z).cpu()


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation ``[T, k]`` from ``a [k]`` (t = 0) to ``b [k]`` (t = 1) at ``t [T]``.

    Moves along the great circle of the angle between ``a`` and ``b``; nearly parallel ends fall back to
    the straight line (the same path in the limit).

    >>> p = slerp(torch.tensor([1., 0.]), torch.tensor([0., 1.]), torch.tensor([0.5]))
    >>> [round(v, 4) for v in p[0].tolist()]
    [0.7071, 0.7071]
    """
    a, b, t = a.double().reshape(-1), b.double().reshape(-1), torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300)
    omega = torch.arccos(cos.clamp(-1, 1))
    if float(omega.sin()) < 1e-6:
        return ((1 - t) * a + t * b).float()
    return ((torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / omega.sin()).float()


def interpolation_path(space, a: torch.Tensor, b: torch.Tensor, steps: int, *, mode: str = "linear") -> torch.Tensor:
    """``steps`` latents ``[steps, k]`` from ``a`` to ``b``, both ends included: ``"linear"``, or ``"slerp"`` (VAE)."""
    if mode == "linear":
        return space.interpolate(a, b, steps)
    if mode != "slerp":
        raise W2WError(f"mode must be 'linear' or 'slerp', not {mode!r}")
    if space.kind != "vae":
        raise W2WError("slerp follows the sphere where an isotropic prior N(0, I) puts its mass: that is the VAE's "
                       "latent, not the PCA's coefficients (each with its own spread); use mode='linear'")
    if steps < 2:
        raise W2WError(f"a path needs steps >= 2 (both ends are included), not {steps}")
    return slerp(a.cpu(), b.cpu(), torch.linspace(0, 1, steps))


@torch.no_grad()
def path_weights(space, wa: torch.Tensor, wb: torch.Tensor, steps: int, *, mode: str = "linear") -> torch.Tensor:
    """Raw LoRA rows ``[steps, D]`` along the path between two models given as raw rows ``[D]`` (encoded into
    ``space`` first: the ends are the space's reconstructions of them)."""
    za, zb = space.encode_weights(torch.stack([torch.as_tensor(wa), torch.as_tensor(wb)]).float())   # [2, k]
    z = interpolation_path(space, za, zb, steps, mode=mode)                                          # [steps, k]
    return space.decode_weights(z.to(space.device)).cpu()


@torch.no_grad()
def nearest_rows(spaces, W: torch.Tensor, *, rows: Sequence[int] | torch.Tensor | None = None,
                 batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each raw row of ``W [n, D]``, the largest cosine ``[n]`` to a dataset row in ``rows`` (default: the
    training split) in the standardised weight space, and that row's index ``[n]``.

    A held-out row (a person no space saw) gives the level of a new model; a copy of a training row gives 1.
    """
    ds = spaces.dataset
    rows = spaces.train_rows if rows is None else torch.as_tensor(rows).reshape(-1)
    x = torch.nn.functional.normalize(ds.standardise(torch.as_tensor(W).float().cpu()), dim=1)   # [n, D]
    best = torch.full((len(x),), -2.0)
    arg = torch.zeros(len(x), dtype=torch.long)
    for i in range(0, len(rows), batch_size):
        r = rows[i:i + batch_size]
        y = torch.nn.functional.normalize(ds.standardise(ds.rows(r)), dim=1)                     # [b, D]
        cos, j = (x @ y.T).max(1)
        better = cos > best
        best[better], arg[better] = cos[better], r[j[better]]
    return best, arg


def read_latent(path: str | os.PathLike) -> tuple[torch.Tensor, str | None]:
    """A ``latent.safetensors`` written by w2w sample/edit/invert: the latent ``[1, k]`` and its space's name."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if p.is_dir():
        p = p / "latent.safetensors"
    if not p.is_file():
        raise W2WError(f"--latent {p} is not a file: give the latent.safetensors of a w2w sample/edit/invert folder")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta, z = f.metadata() or {}, (f.get_tensor("z") if "z" in f.keys() else None)  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise W2WError(f"--latent {p} is not a safetensors file ({err}): give a latent.safetensors") from err
    if z is None or z.dim() != 2 or z.shape[0] != 1 or not z.is_floating_point():
        raise W2WError(f"--latent {p} holds no latent 'z' [1, k]: give the latent.safetensors of a w2w model folder")
    return z.float(), meta.get("space") or None


def _previews(pipe, W: torch.Tensor, layout, ds, n_preview: int, seed: int, progress: bool, draw: dict | None) -> list:
    """One strip ``[H, n_preview * W, 3]`` per row of ``W``: its images over ``n_preview`` noise seeds, drawn with
    ``draw`` (the profile's prompt, steps, guidance; the prompt defaults to the dataset's instance prompt)."""
    from .export import preview_strips

    check_count(n_preview, "--preview", "a number of images")
    return preview_strips(pipe, W, layout, n_preview=n_preview, seed=seed, progress=progress,
                          **{"prompt": instance_prompt(ds), **(draw or {})})


def sample_to_folders(out: str | os.PathLike, *, pipe, spaces, space: str, n: int, seed: int = 0,
                      scale: float = 1.0, n_preview: int = 4, overwrite: bool = False,
                      progress: bool = True, draw: dict | None = None) -> list[Path]:
    """``w2w sample``: ``n`` models from ``space``, one folder each (``out/<space>_<i>``), with a preview strip
    (drawn with ``draw``: the profile's prompt, steps, guidance) and, in ``info.json``, the nearest training
    row's cosine (a copy of a training row scores 1)."""
    from tqdm.auto import tqdm

    from .export import export_lora

    check_count(n)
    check_count(n_preview, "--preview", "a number of images")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise W2WError(f"--out {out} is a file: give a folder (it is created if missing)")
    names = [f"{space}_{i:03d}" for i in range(n)]
    clash = [m for m in names if (out / m).exists()]
    if clash and not overwrite:
        raise W2WError(f"{out / clash[0]} exists: choose another --out, or pass --overwrite")
    sp, ds = spaces.space(space), spaces.dataset
    layout = ds.lora_layout(pipe.unet)
    z, W = sample_models(sp, n, seed=seed, scale=scale)
    strips = _previews(pipe, W, layout, ds, n_preview, seed, progress, draw)
    cos, near = nearest_rows(spaces, W)
    return [export_lora(out / name, W[i], layout, z=z[i], space=space, preview=strips[i], overwrite=overwrite,
                        info={"space": space, "seed": seed, "index": i, "scale": scale, "preview_seed": seed,
                              "nearest_training_row": int(near[i]), "nearest_cosine": float(cos[i])})
            for i, name in enumerate(tqdm(names, desc="export", disable=not progress))]


def export_to_folder(out: str | os.PathLike, *, pipe, spaces, row: int | None = None,
                     latent: str | os.PathLike | None = None, space: str | None = None,
                     formats: Sequence[str] = ("diffusers", "peft"), n_preview: int = 4, seed: int = 0,
                     overwrite: bool = False, progress: bool = True, draw: dict | None = None) -> Path:
    """``w2w export``: a dataset row or a saved latent as model files in ``formats`` (see :data:`EXPORT_FORMATS`).

    ``w2w`` writes :data:`W2W_FILE`, w2w's own model file: the row's coefficients in the PCA (exact for a
    PCA latent, the projection otherwise), which w2w's code loads as ``network.proj``.
    """
    from .export import export_lora

    formats = check_formats(formats)
    check_count(n_preview, "--preview", "a number of images")
    if (row is None) == (latent is None):
        raise W2WError("give exactly one of --row I (a dataset row) or --latent FILE (a latent.safetensors)")
    ds = spaces.dataset
    layout = ds.lora_layout(pipe.unet)
    z = None
    if latent is not None:
        z, saved = read_latent(latent)
        if space and saved and space != saved:
            raise W2WError(f"--latent {latent} is a {saved} latent but --space is {space}: drop --space or give "
                           f"{saved}")
        space = space or saved
        if space is None:
            raise W2WError(f"--latent {latent} does not say its space: pass --space pca or --space vae")
        sp = spaces.space(space)
        if z.shape[1] != sp.latent_dim:
            raise W2WError(f"--latent {latent} has k={z.shape[1]} but the {space} space has k={sp.latent_dim}: "
                           f"it was made with other spaces")
        with torch.no_grad():
            W = sp.decode_weights(z.to(sp.device)).cpu()
        source = str(latent)
    else:
        W, source = ds.rows([check_row(ds, row)]), f"row {row}"
        if space is not None:
            with torch.no_grad():
                z = spaces.space(space).encode_weights(W).cpu()
    strip = _previews(pipe, W, layout, ds, n_preview, seed, progress, draw)[0]
    folder = export_lora(out, W[0], layout, formats=[f for f in formats if f != "w2w"], z=z, space=space,
                         preview=strip, overwrite=overwrite,
                         info={"source": source, "space": space, "formats": list(formats), "preview_seed": seed})
    if "w2w" in formats:
        z_pca = z if space == "pca" else spaces.pca.encode_weights(W).cpu()       # [1, k_pca]
        tmp = folder / f".{W2W_FILE}.tmp"
        torch.save(z_pca.float().contiguous(), tmp)    # a plain tensor: loads with torch.load(weights_only=True)
        os.replace(tmp, folder / W2W_FILE)
    return folder


def interpolation_widget(pipe, spaces, endpoints: dict[str, torch.Tensor], *, seed: int = 0, scale: int = 4, **draw):
    """A live ipywidget: two identities (keys of ``endpoints``, raw rows ``[D]``), a space and a position.

    Each change re-encodes the two identities into the chosen space, decodes the point at that position
    (linear; slerp in the VAE when chosen) and draws it through the kernel; in a static page it shows its
    first image only (the chapter adds :func:`w2wlib.viz.image_slider` frames for that). ``draw`` are the
    keyword arguments of :func:`~w2wlib.generate.generate` (``steps``, ``guidance``, ``prompt``, ``layout``...:
    a chapter passes :attr:`w2wlib.models.Models.draw`); prompt and layout default to the dataset's.
    """
    import ipywidgets as widgets

    from .generate import generate
    from .viz import png_bytes

    names = list(endpoints)
    if len(names) < 2:
        raise W2WError(f"the widget needs at least two identities to go between, got {len(names)}")
    kw = {"layout": spaces.dataset.lora_layout(pipe.unet), "prompt": instance_prompt(spaces.dataset), **draw}
    image = widgets.Image(format="png")

    def draw(a: str, b: str, space: str, position: float) -> None:
        mode = "slerp" if space == "vae (slerp)" else "linear"
        with torch.no_grad():
            sp = spaces.space(space.split()[0])
            za, zb = sp.encode_weights(torch.stack([endpoints[a], endpoints[b]]).float()).cpu()
            t = torch.tensor([float(position)])
            z = slerp(za, zb, t) if mode == "slerp" else (1 - t[:, None]) * za + t[:, None] * zb    # [1, k]
            W = sp.decode_weights(z.to(sp.device)).cpu()
        img = generate(pipe, W, seed=seed, **kw)
        image.value = png_bytes(img[0], scale)

    controls = widgets.interactive(
        draw, a=widgets.Dropdown(options=names, value=names[0], description="from"),
        b=widgets.Dropdown(options=names, value=names[1], description="to"),
        space=widgets.ToggleButtons(options=["pca", "vae", "vae (slerp)"], description="space"),
        position=widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="position",
                                     continuous_update=False))
    return widgets.VBox([controls, image])
