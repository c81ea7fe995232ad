"""``w2w spaces build``: the shipped PCA (w2w) and VAE (w2w++) spaces of a weights dataset, with a manifest.

Both spaces are fit on the same training identities and leave the same identities out, the split of
:func:`w2wlib.train.split_rows` (by identity, a pure function of the seed). Stages (cached and
resumable, :class:`~w2wlib.stages.Stages`; bookkeeping in ``<out>/_work/``):

1. ``pca``: :meth:`PCASpace.fit` on the training rows, ``pca_k`` components (sweeps truncate it) -> ``pca/``;
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


@dataclass
class SpacesConfig:
    """Everything that determines the shipped spaces. Presets: ``mini`` and ``micro`` (tests)."""

    name: str = "mini"
    latent: int = 64             # k of the VAE, and of the PCA it is compared with
    pca_k: int = 512             # components kept in the shipped PCA; smaller k truncate it
    vae: dict[str, Any] = field(default_factory=dict)    # VAEConfig fields over VAEConfig.scaled(D, latent=latent)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields over its defaults
    amortised: dict[str, Any] = field(default_factory=dict)  # AmortisedConfig fields over its defaults
    amortised_views: int = 6     # training views rendered per identity for the amortised inverters
    seed: int = 0                # VAE init, the split and the training stream

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
        raise W2WError(f"unknown spaces config {name!r}; choose mini or micro")

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
    tcfg = cfg.train_config()
    train_rows, val_rows = tcfg.split(len(ds))
    if cfg.pca_k > len(train_rows):
        raise W2WError(f"pca_k={cfg.pca_k} exceeds the {len(train_rows)} training identities; lower it")

    def depends(stage: str) -> dict:
        d = {"dataset": ds.dataset_id or str(ds.folder.resolve()), "val_rows": val_rows.tolist()}
        pca = {**d, "pca_k": cfg.pca_k, "seed": cfg.seed}
        vae = {**d, "vae": cfg.vae_config(ds.dim, ds.lora_layout()).to_dict(), "train": dataclasses.asdict(tcfg)}
        if stage == "amortised":
            return {"pca": pca, "vae": vae, "views": cfg.amortised_views,
                    "amortised": [cfg.amortised_config(s).to_dict() for s in ("pca", "vae")]}
        return pca if stage == "pca" else vae

    st = Stages(out, depends)

    def run(stage: str) -> dict:
        if stage == "amortised":
            return _amortised(out, st.work, cfg, ds, train_rows, val_rows, device, progress)
        if stage == "pca":
            space = PCASpace.fit(ds, cfg.pca_k, rows=train_rows, seed=cfg.seed, device=device, progress=progress)
            space.save(out / "pca", overwrite=True)
            return {"explained_variance_ratio": float(space.explained_variance_ratio.sum()), "method": space.method}
        space = VAESpace(cfg.vae_config(ds.dim, ds.lora_layout()), seed=cfg.seed).to(device)
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
        out, artifact="the weight spaces of the mini weights dataset: PCA (w2w) and VAE (w2w++)",
        command=command or f"w2w spaces build --config {cfg.name} --out {portable_path(out)} --dataset {portable_path(dataset)}",
        config=dataclasses.asdict(cfg), vae=cfg.vae_config(ds.dim, ds.lora_layout()).to_dict(), train=dataclasses.asdict(tcfg),
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
