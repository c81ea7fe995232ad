"""``w2w spaces build``: the shipped PCA (w2w) and VAE (w2w++) spaces of a weights dataset, with a manifest.

Both spaces are fit on the same training identities and leave the same identities out, the split of
:func:`w2wlib.train.split_rows` (by identity, a pure function of the seed). Stages (cached and
resumable, :class:`~w2wlib.stages.Stages`; bookkeeping in ``<out>/_work/``):

1. ``pca``: :meth:`PCASpace.fit` on the training rows, ``pca_k`` components (sweeps truncate it) -> ``pca/``;
2. ``vae``: :func:`~w2wlib.train.train_vae` (checkpointed in ``_work/vae_run``, so a killed build
   resumes) -> ``vae/`` and its training history ``vae_history.json``.

``manifest.json`` records every file's sha256, the command, the configs, the split and stage times.

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

STAGES = ("pca", "vae")


@dataclass
class SpacesConfig:
    """Everything that determines the shipped spaces. Presets: ``mini`` and ``micro`` (tests)."""

    name: str = "mini"
    latent: int = 64             # k of the VAE, and of the PCA it is compared with
    pca_k: int = 512             # components kept in the shipped PCA; smaller k truncate it
    vae: dict[str, Any] = field(default_factory=dict)    # VAEConfig fields over VAEConfig.scaled(D, latent=latent)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields over its defaults
    seed: int = 0                # VAE init, the split and the training stream

    @classmethod
    def preset(cls, name: str) -> "SpacesConfig":
        if name == "mini":  # the seeds' MLP + a linear path + dropout: the best of benchmarks/vae_recipe.md
            return cls(vae={"linear_skip": True, "dropout": 0.2})
        if name == "micro":
            return cls(name="micro", latent=4, pca_k=6, train={"steps": 20, "batch_size": 4, "warmup": 2,
                                                               "beta_warmup": 5, "beta_ramp": 5, "val_every": 10,
                                                               "log_every": 5, "val_fraction": 0.25})
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
        if stage == "pca":
            return {**d, "pca_k": cfg.pca_k, "seed": cfg.seed}
        return {**d, "vae": cfg.vae_config(ds.dim, ds.lora_layout()).to_dict(), "train": dataclasses.asdict(tcfg)}

    st = Stages(out, depends)

    def run(stage: str) -> dict:
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
        (out / "vae_history.json").write_text(json.dumps(history, indent=0))
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
