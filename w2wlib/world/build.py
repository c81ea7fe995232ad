"""``w2w world build``: the mini world's artifacts, rebuilt from seeds in resumable, cached stages.

Stages, in order (each is skipped when its outputs exist and were built from the same config):

1. ``autoencoder``: train the AutoencoderKL on fresh renders;
2. ``latents``: cache scaled latents of renders (working file, not shipped);
3. ``unet``: train the UNet and text encoder on the cache; save the whole diffusers pipeline;
4. ``encoder``: train the identity encoder, robust to the autoencoder's reconstructions;
5. ``check``: the quality gates (:mod:`w2wlib.world.check`).

Long stages checkpoint to ``<out>/_work/`` and resume from there after an interruption. The manifest
``<out>/manifest.json`` records every shipped file's sha256, the exact command, the seeds and configs,
each stage's build time, and the quality-gate metrics.

Example:
    >>> cfg = WorldConfig.preset("micro")
    >>> cfg.autoencoder.steps < WorldConfig.preset("mini").autoencoder.steps
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..errors import W2WError
from . import pipeline as P

__all__ = ["WorldConfig", "build_world", "STAGES", "sha256"]

log = logging.getLogger(__name__)

STAGES = ("autoencoder", "latents", "unet", "encoder", "check")


@dataclass
class WorldConfig:
    """Everything that determines the mini world's artifacts. Presets: ``micro`` (tests) and ``mini``."""

    name: str = "mini"
    autoencoder: P.AutoencoderConfig = field(default_factory=P.AutoencoderConfig)
    unet: P.UNetConfig = field(default_factory=P.UNetConfig)
    encoder: dict[str, Any] = field(default_factory=dict)  # EncoderConfig fields over its default preset
    encoder_preset: str = "default"                       # "default" or "micro"
    check_identities: int = 200                           # held-out identities in the quality gates
    check_samples: int = 256                              # base-model samples in the quality gates

    @classmethod
    def preset(cls, name: str) -> "WorldConfig":
        if name == "mini":
            # Sized to build in about 1.5 hours on a shared 2-core CPU (measured: AE 1.3-3.5 s/step at
            # batch 64 and UNet 1-2 s/step at batch 128, depending on contention). More steps improve it.
            return cls(name="mini",
                       autoencoder=P.AutoencoderConfig(n_identities=30_000, steps=700, batch=64),
                       unet=P.UNetConfig(n_identities=20_000, views=5, steps=1_400, batch=128))
        if name == "micro":
            return cls(name="micro",
                       autoencoder=P.AutoencoderConfig(n_identities=500, steps=12, batch=16),
                       unet=P.UNetConfig(n_identities=100, views=2, steps=12, batch=16),
                       encoder_preset="micro", check_identities=12, check_samples=8)
        raise W2WError(f"unknown world config {name!r}; choose mini or micro")

    def stage_config(self, stage: str) -> dict:
        """The part of the config a stage depends on (its cache key)."""
        d = dataclasses.asdict(self)
        deps = {"autoencoder": ["autoencoder"], "latents": ["autoencoder", "unet"], "unet": ["autoencoder", "unet"],
                "encoder": ["autoencoder", "encoder", "encoder_preset"],
                "check": ["autoencoder", "unet", "encoder", "encoder_preset", "check_identities", "check_samples"]}[stage]
        out = {k: d[k] for k in deps}
        if "encoder" in deps:  # the resolved encoder config, so that a change of its defaults rebuilds
            out["encoder_resolved"] = dataclasses.asdict(self.encoder_config())
        return out

    def encoder_config(self):
        from .encoder import EncoderConfig

        base = EncoderConfig.micro() if self.encoder_preset == "micro" else EncoderConfig()
        return dataclasses.replace(base, **self.encoder)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class _Stages:
    """Bookkeeping for one build folder: done-markers, checkpoints, timings."""

    def __init__(self, out: Path, cfg: WorldConfig):
        self.out, self.cfg, self.work = out, cfg, out / "_work"
        self.work.mkdir(parents=True, exist_ok=True)

    def done(self, stage: str) -> dict | None:
        marker = self.work / f"{stage}.done.json"
        if marker.is_file():
            info = json.loads(marker.read_text())
            if info.get("key") == _key(self.cfg.stage_config(stage)):
                return info
        return None

    def finish(self, stage: str, seconds: float, **extra) -> None:
        info = {"key": _key(self.cfg.stage_config(stage)), "seconds": round(seconds, 1), **extra}
        (self.work / f"{stage}.done.json").write_text(json.dumps(info, indent=1))
        (self.work / f"{stage}.ckpt.pt").unlink(missing_ok=True)

    def checkpointer(self, stage: str):
        def save(step: int, state: dict) -> None:
            tmp = self.work / f"{stage}.ckpt.pt.tmp"
            torch.save({"key": _key(self.cfg.stage_config(stage)), **state}, tmp)
            tmp.replace(self.work / f"{stage}.ckpt.pt")  # atomic: a kill never leaves half a checkpoint
            log.info("%s: checkpoint at step %d", stage, step)
        return save

    def resume(self, stage: str) -> dict | None:
        path = self.work / f"{stage}.ckpt.pt"
        if not path.is_file():
            return None
        state = torch.load(path, weights_only=True)
        if state.pop("key", None) != _key(self.cfg.stage_config(stage)):
            log.warning("%s: ignoring a checkpoint from another config", stage)
            return None
        log.info("%s: resuming from step %d", stage, state["step"])
        return state


def build_world(out: Path, cfg: WorldConfig, *, device: torch.device, command: str | None = None,
                progress: bool = True, stages: tuple[str, ...] = STAGES) -> dict:
    """Build (or finish building) the mini world into ``out``; returns the manifest."""
    from . import check, encoder as E

    out = Path(out)
    st = _Stages(out, cfg)
    pipe_dir, enc_dir, tok_dir = out / "pipeline", out / "identity_encoder", st.work / "tokenizer"
    tokenizer = P.make_tokenizer(tok_dir)
    seconds: dict[str, float] = {}

    def vae():
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(st.work / "vae").to(device).eval()

    for stage in stages:
        if stage not in STAGES:
            raise W2WError(f"unknown stage {stage!r}; stages are {STAGES}")
        if (info := st.done(stage)) is not None:
            log.info("%s: cached (%.0f s when built)", stage, info["seconds"])
            seconds[stage] = info["seconds"]
            continue
        t0 = time.perf_counter()
        extra: dict = {}
        if stage == "autoencoder":
            model = P.train_autoencoder(cfg.autoencoder, device=device, progress=progress,
                                        checkpoint=st.checkpointer(stage), state=st.resume(stage))
            model.save_pretrained(st.work / "vae")
        elif stage == "latents":
            ucfg = cfg.unet
            rng = np.random.default_rng([ucfg.seed, 1])
            ids = np.repeat(rng.choice(P.TRAIN_IDENTITY_SEEDS.stop, ucfg.n_identities, replace=False), ucfg.views)
            lat = P.encode_latents(vae(), ids, rng.integers(0, 2**31, len(ids)), device=device, progress=progress)
            torch.save({"latents": lat, "identity_seeds": torch.from_numpy(ids)}, st.work / "latents.pt")
        elif stage == "unet":
            cache = torch.load(st.work / "latents.pt", weights_only=True)
            from .render import attributes, sample_identities

            attrs = attributes(sample_identities(cache["identity_seeds"].numpy()))
            unet, text = P.train_unet(cfg.unet, cache["latents"], attrs, tokenizer, device=device, progress=progress,
                                      checkpoint=st.checkpointer(stage), state=st.resume(stage))
            P.save_pipeline(pipe_dir, vae=vae().cpu(), unet=unet.cpu(), text_encoder=text.cpu(), tokenizer=tokenizer)
            extra["train_identity_seeds"] = sorted(set(cache["identity_seeds"].tolist()))[:5]
        elif stage == "encoder":
            ecfg = cfg.encoder_config()
            ae = vae()
            enc, history = E.train_encoder(ecfg, device=device, recon_fn=lambda x: P.autoencode(ae, x), progress=progress)
            E.save_encoder(enc, enc_dir)
            extra["final_loss"] = history[-1] if history else None
        elif stage == "check":
            metrics = check.quality_gates(out, n_identities=cfg.check_identities, n_samples=cfg.check_samples,
                                          device=device, progress=progress)
            (out / "quality.json").write_text(json.dumps(metrics, indent=1))
        seconds[stage] = time.perf_counter() - t0
        st.finish(stage, seconds[stage], **extra)
        log.info("%s: done in %.0f s", stage, seconds[stage])
    return write_manifest(out, cfg, seconds, command)


def write_manifest(out: Path, cfg: WorldConfig, seconds: dict[str, float], command: str | None) -> dict:
    files = sorted(p for p in out.rglob("*") if p.is_file() and "_work" not in p.parts and p.name != "manifest.json")
    quality = out / "quality.json"
    manifest = {
        "artifact": "the mini world: diffusers pipeline and identity encoder",
        "w2wlib_version": __version__,
        "command": command or f"w2w world build --config {cfg.name} --out {out}",
        "config": dataclasses.asdict(cfg),
        "seeds": {"autoencoder": cfg.autoencoder.seed, "unet": cfg.unet.seed,
                  "training identities": f"seeds in [0, {P.TRAIN_IDENTITY_SEEDS.stop}); held-out >= 10**9"},
        "build_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "torch": torch.__version__, "python": sys.version.split()[0],
        "quality": json.loads(quality.read_text()) if quality.is_file() else None,
        "files": {str(p.relative_to(out)): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_manifest(out: Path) -> list[str]:
    """Files whose sha256 differs from the manifest (empty when the world is intact)."""
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    return [name for name, info in manifest["files"].items()
            if not (Path(out) / name).is_file() or sha256(Path(out) / name) != info["sha256"]]

