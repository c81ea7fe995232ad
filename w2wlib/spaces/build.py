"""``w2w spaces build``: the shipped PCA (w2w) and VAE (w2w++) spaces of a weights dataset, with a manifest.

Both spaces are fit on the same training identities and leave the same identities out, the split of
:func:`w2wlib.train.split_rows` (by identity, a pure function of the seed). Stages (cached and
resumable, :class:`~w2wlib.stages.Stages`; bookkeeping in ``<out>/_work/``):

1. ``pca``: :meth:`PCASpace.fit` on the training rows, ``pca_k`` components (sweeps truncate it) -> ``pca/``;
   it reads the rows in blocks, so the ``sd15`` preset streams the 26 GB public ``all_weights.pt``;
2. ``vae``: :func:`~w2wlib.train.train_vae` (checkpointed in ``_work/vae_run``, so a killed build
   resumes) -> ``vae/`` and its training history ``vae_history.json`` (without wall times, so that two
   builds give the same bytes);
3. ``amortised``: one :class:`~w2wlib.invert.amortised.AmortisedInverter` per space, trained to map
   views of a training identity (the mini world's renders of its training views) to the space's
   whitened code of its LoRA (the first ``latent`` dimensions) -> ``amortised/pca``, ``amortised/vae``.
   A dataset without mini-world identity seeds (the public w2w files) has no renders: the stage says so
   and ships nothing.

``manifest.json`` records every file's sha256, the command, the configs, the split and stage times
(``build_seconds``: the only timings of a build).

Presets: ``mini`` (the shipped spaces), ``micro`` (tests) and ``sd15`` (the public w2w dataset on one GPU:
w2w's 10,000 components by a streaming randomized PCA, and the seeds' VAE, :meth:`VAEConfig.sd15`, trained
with Accelerate and bf16 autocast). A dataset too small for a config's sizes is refused before any stage
runs, with the sizes that would fit.

Example:
    >>> SpacesConfig.preset("micro").latent
    4
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import W2WError
from ..stages import Stages, portable_path, write_manifest

__all__ = ["SpacesConfig", "build_spaces", "STAGES"]

STAGES = ("pca", "vae", "amortised")
_TIMING = ("elapsed_s",)  # history columns that measure time, left out of vae_history.json
_PCA_OPTIONS = ("method", "batch_size", "oversample", "power_iters")  # what SpacesConfig.pca may set of PCASpace.fit


@dataclass
class SpacesConfig:
    """Everything that determines the shipped spaces. Presets: ``mini``, ``micro`` (tests) and ``sd15``."""

    name: str = "mini"
    latent: int = 64             # k of the VAE, and of the PCA it is compared with
    pca_k: int = 512             # components kept in the shipped PCA; smaller k truncate it
    pca: dict[str, Any] = field(default_factory=dict)    # PCASpace.fit options (method, batch_size, power_iters, oversample)
    vae: dict[str, Any] = field(default_factory=dict)    # VAEConfig fields over VAEConfig.scaled(D, latent=latent)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields over its defaults
    amortised: dict[str, Any] = field(default_factory=dict)  # AmortisedConfig fields over its defaults
    amortised_views: int = 6     # training views rendered per identity for the amortised inverters
    seed: int = 0                # VAE init, the split and the training stream

    def __post_init__(self) -> None:
        unknown = set(self.pca) - set(_PCA_OPTIONS)
        if unknown:
            raise W2WError(f"SpacesConfig.pca has unknown option(s) {sorted(unknown)}; PCASpace.fit takes {list(_PCA_OPTIONS)}")

    @classmethod
    def preset(cls, name: str) -> "SpacesConfig":
        if name == "mini":  # the seeds' MLP + a linear path + dropout: the best of benchmarks/vae_recipe.md
            return cls(vae={"linear_skip": True, "dropout": 0.2})
        if name == "micro":  # the VAE checkpoints halfway, so that tests can kill and resume it there
            return cls(name="micro", latent=4, pca_k=6, train={"steps": 20, "batch_size": 4, "warmup": 2,
                                                               "beta_warmup": 5, "beta_ramp": 5, "val_every": 10,
                                                               "log_every": 5, "val_fraction": 0.25,
                                                               "checkpoint_every": 10},
                       amortised={"steps": 6, "batch": 8, "channels": [8, 8, 8, 8], "val_every": 3,
                                  "checkpoint_every": 3}, amortised_views=2)
        if name == "sd15":
            # The public w2w dataset (64,974 x 99,648) on one GPU. PCA: w2w keeps 10,000 components (V.pt); its
            # fallback for data that do not fit memory is torch.svd_lowrank(q=10000, niter=20), so 20 power
            # iterations: 22 streamed passes over all_weights.pt, 2,048 rows (0.8 GB) at a time. VAE: the seeds'
            # MLP, 99,648 -> 4,096 -> 2,048 -> 1,024 -> 512 (vae_config(99,648) == VAEConfig.sd15()), batch 64, KL
            # warm-up then a linear ramp; about 22 epochs of the ~58k training identities; bf16 autocast on a GPU.
            return cls(name="sd15", latent=512, pca_k=10_000,
                       pca={"method": "randomized", "power_iters": 20, "oversample": 10, "batch_size": 2048},
                       train={"steps": 20_000, "batch_size": 64, "warmup": 500, "beta_warmup": 5_000,
                              "beta_ramp": 5_000, "checkpoint_every": 1_000, "val_every": 1_000, "log_every": 100,
                              "mixed_precision": "auto"})
        raise W2WError(f"unknown spaces config {name!r}; choose mini, micro or sd15")

    def check_fits(self, n_rows: int, dim: int, where: str = "the dataset") -> None:
        """Raise W2WError, before any work, if ``n_rows`` identities of length ``dim`` are too few for these sizes.

        >>> SpacesConfig.preset("sd15").check_fits(50, 99_648)          # doctest: +ELLIPSIS
        Traceback (most recent call last):
        w2wlib.errors.W2WError: spaces config 'sd15' keeps pca_k=10,000 components, but ...
        """
        tcfg = self.train_config()
        train_rows = tcfg.split(n_rows)[0].numel()
        fit = f"use a smaller config (--config micro), or SpacesConfig(...) with pca_k <= {min(train_rows, dim):,}"
        if self.pca_k > min(train_rows, dim):
            raise W2WError(f"spaces config {self.name!r} keeps pca_k={self.pca_k:,} components, but {where} has "
                           f"{train_rows:,} training identities (of {n_rows:,}) of {dim:,} dims, and PCA has at most "
                           f"min(N, D) = {min(train_rows, dim):,}: {fit}.")
        if tcfg.batch_size > train_rows:
            raise W2WError(f"spaces config {self.name!r} trains the VAE in batches of {tcfg.batch_size}, but {where} has "
                           f"only {train_rows:,} training identities (of {n_rows:,}): lower train['batch_size'].")

    @classmethod
    def from_manifest(cls, folder: str | os.PathLike) -> "SpacesConfig":
        """The config a spaces folder was built with (its ``manifest.json``)."""
        path = Path(folder) / "manifest.json"
        if not path.is_file():
            raise W2WError(f"no manifest.json in {folder}: build the spaces with w2w spaces build")
        return cls(**json.loads(path.read_text())["config"])

    def train_config(self):
        from ..train import TrainConfig

        return TrainConfig(**{"seed": self.seed, **self.train})

    def amortised_config(self, space: str):
        from ..invert.amortised import AmortisedConfig

        return AmortisedConfig(**{"seed": self.seed, "k": self.latent, **self.amortised, "space": space})

    def vae_config(self, dim: int, layout=None):
        """The VAE's architecture for rows of length ``dim``; ``arch: tokens`` also needs the rows' LoRA layout."""
        from .vae import VAEConfig

        extra = {}
        if self.vae.get("arch") == "tokens" and "token_sizes" not in self.vae:
            if layout is None:
                raise W2WError("a token VAE needs the dataset's LoRA layout: vae_config(ds.dim, ds.lora_layout())")
            extra["token_sizes"] = [e.numel for e in layout.entries]
        return VAEConfig.scaled(dim, latent=self.latent, **self.vae, **extra)


def build_spaces(out: Path, cfg: SpacesConfig, dataset: Path, *, device: torch.device | str = "cpu",
                 command: str | None = None, progress: bool = True) -> dict:
    """Fit the PCA and train the VAE of the weights dataset in ``dataset`` into ``out``; returns the manifest."""
    from ..data import open_weights
    from ..train import train_vae
    from .pca import PCASpace
    from .vae import VAESpace

    out, dataset = Path(out), Path(dataset)
    ds = open_weights(dataset)
    cfg.check_fits(len(ds), ds.dim, str(dataset))
    tcfg = cfg.train_config()
    train_rows, val_rows = tcfg.split(len(ds))
    # Only the token VAE needs the LoRA layout; public files spelled the kohya way need the UNet to give one.
    layout = ds.lora_layout() if cfg.vae.get("arch") == "tokens" else None
    vae_cfg = cfg.vae_config(ds.dim, layout)

    def depends(stage: str) -> dict:
        d = {"dataset": ds.dataset_id or str(ds.folder.resolve()), "val_rows": val_rows.tolist()}
        pca = {**d, "pca_k": cfg.pca_k, "seed": cfg.seed, **({"fit": cfg.pca} if cfg.pca else {})}
        vae = {**d, "vae": vae_cfg.to_dict(), "train": dataclasses.asdict(tcfg)}
        if stage == "amortised":
            return {"pca": pca, "vae": vae, "views": cfg.amortised_views,
                    "amortised": [cfg.amortised_config(s).to_dict() for s in ("pca", "vae")]}
        return pca if stage == "pca" else vae

    st = Stages(out, depends)

    def run(stage: str) -> dict:
        if stage == "amortised":
            return _amortised(out, st.work, cfg, ds, train_rows, val_rows, device, progress)
        if stage == "pca":
            space = PCASpace.fit(ds, cfg.pca_k, rows=train_rows, seed=cfg.seed, device=device, progress=progress,
                                 **cfg.pca)
            space.save(out / "pca", overwrite=True)
            return {"explained_variance_ratio": float(space.explained_variance_ratio.sum()), "method": space.method}
        space = VAESpace(vae_cfg, seed=cfg.seed).to(device)
        run_dir = st.work / "vae_run"
        history = train_vae(space, ds, tcfg, out_dir=run_dir, progress=progress)
        if (out / "vae").exists():
            shutil.rmtree(out / "vae")
        shutil.copytree(run_dir / "space", out / "vae")
        # per-step wall times would make the file differ on every build: timings live in the manifest only
        untimed = [{k: v for k, v in row.items() if k not in _TIMING} for row in history]
        (out / "vae_history.json").write_text(json.dumps(untimed, indent=0))
        last = next(h for h in reversed(history) if "val_recon" in h)
        return {"val_recon": last["val_recon"], "val_active_units": last["val_active_units"]}

    seconds = st.run(STAGES, run)
    markers = {s: st.done(s) for s in STAGES}
    (out / "split.json").write_text(json.dumps({"train": train_rows.tolist(), "val": val_rows.tolist()}))
    return write_manifest(
        out, artifact=f"the weight spaces ({cfg.name} config) of a weights dataset: PCA (w2w) and VAE (w2w++)",
        command=command or f"w2w spaces build --config {cfg.name} --out {portable_path(out)} --dataset {portable_path(dataset)}",
        config=dataclasses.asdict(cfg), vae=vae_cfg.to_dict(), train=dataclasses.asdict(tcfg),
        dataset=portable_path(dataset), split={"train": len(train_rows), "val": len(val_rows), "by": "identity (row)"},
        build_seconds={k: round(v, 1) for k, v in seconds.items()},
        results={s: {k: v for k, v in (m or {}).items() if k not in ("key", "seconds")} for s, m in markers.items()})


def _amortised(out: Path, work: Path, cfg: SpacesConfig, ds, train_rows, val_rows, device, progress) -> dict:
    """Train and save one amortised inverter per space; returns their final validation errors."""
    from ..invert.amortised import AmortisedInverter, train_amortised
    from ..invert.core import prior_scale
    from .base import load_space

    seeds = ds.identity_seeds
    if not seeds:
        import logging

        logging.getLogger(__name__).warning("amortised: %s has no mini-world identity seeds to render; skipped",
                                            ds.folder)
        return {"skipped": "no identity seeds to render"}
    from ..world.render import identity_views

    v = cfg.amortised_views
    images = identity_views(seeds, v)                                        # [N * V, H, W, 3], row-major
    images = images.reshape(len(seeds), v, *images.shape[1:])                # [N, V, H, W, 3]
    out_dir, result = out / "amortised", {}
    w = ds.rows(slice(0, len(ds)))
    for name in ("pca", "vae"):
        space = load_space(out / name).to(device)
        acfg = cfg.amortised_config(name)
        mean, std = prior_scale(space, acfg.k)
        with torch.no_grad():
            u = ((space.encode_weights(w)[:, :acfg.k] - mean.to(space.device)) / std.to(space.device)).cpu()
        run_dir = work / f"amortised_{name}"
        history = train_amortised(AmortisedInverter(acfg), images, u, train_rows, val_rows, out_dir=run_dir,
                                  device=device, progress=progress)
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)
        AmortisedInverter.load(run_dir).save(out_dir / name)
        result[name] = {"val_mse": history[-1]["val_mse"], "val_mse_of_zero": history[-1]["val_mse_of_zero"]}
    return result
