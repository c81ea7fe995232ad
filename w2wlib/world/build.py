"""``w2w world build``: the mini world's artifacts, rebuilt from seeds in resumable, cached stages.

Stages, in order (each is skipped when its outputs exist and were built from the same config):

1. ``teacher``: a small identity encoder, trained on renders only, that gives the autoencoder an identity
   loss (it is independent of the shipped encoder, which then scores the autoencoder honestly);
2. ``autoencoder``: train the AutoencoderKL on fresh renders;
3. ``latents``: cache scaled latents of renders (working file, not shipped);
4. ``unet``: train the UNet and text encoder on the cache; save the whole diffusers pipeline;
5. ``encoder``: train the identity encoder, robust to the autoencoder's reconstructions;
6. ``check``: the quality gates (:mod:`w2wlib.world.check`).

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
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import W2WError
from ..stages import Stages, portable_path, write_manifest
from . import pipeline as P

__all__ = ["WorldConfig", "build_world", "STAGES"]


STAGES = ("teacher", "autoencoder", "latents", "unet", "encoder", "check")


@dataclass
class WorldConfig:
    """Everything that determines the mini world's artifacts. Presets: ``micro`` (tests) and ``mini``."""

    name: str = "mini"
    autoencoder: P.AutoencoderConfig = field(default_factory=P.AutoencoderConfig)
    unet: P.UNetConfig = field(default_factory=P.UNetConfig)
    encoder: dict[str, Any] = field(default_factory=dict)  # EncoderConfig fields over its default preset
    encoder_preset: str = "default"                       # "default" or "micro"
    teacher: dict[str, Any] = field(default_factory=lambda: {"seed": 1, "steps": 400})  # over EncoderConfig.micro()
    check_identities: int = 200                           # held-out identities in the quality gates
    check_samples: int = 256                              # base-model samples in the quality gates
    guidance: float = 7.5                                 # CFG of the gates' samples: SD 1.5's default scale

    @classmethod
    def preset(cls, name: str) -> "WorldConfig":
        if name == "mini":
            # Sized to build in about 2.5 hours on a 2-core CPU (measured with 2 threads: AE 0.6 s/step at
            # batch 16 with its teacher, UNet 1.1 s/step at batch 128). 1,500 UNet steps left the text
            # pathway undertrained (../shared/NOTES.md); 3,000 with full descriptions wake it.
            return cls(name="mini",
                       autoencoder=P.AutoencoderConfig(n_identities=30_000, steps=3_000, batch=16, lr=2e-3),
                       unet=P.UNetConfig(n_identities=20_000, views=5, steps=3_000, batch=128))
        if name == "micro":  # the UNet checkpoints halfway, so that tests can kill and resume it there
            return cls(name="micro",
                       autoencoder=P.AutoencoderConfig(n_identities=500, steps=12, batch=16),
                       unet=P.UNetConfig(n_identities=100, views=2, steps=12, batch=16, checkpoint_every=6),
                       encoder_preset="micro", teacher={"seed": 1, "steps": 6}, check_identities=12, check_samples=8)
        raise W2WError(f"unknown world config {name!r}; choose mini or micro")

    def stage_config(self, stage: str) -> dict:
        """The part of the config a stage depends on (its cache key)."""
        d = dataclasses.asdict(self)
        deps = {"teacher": ["teacher"], "autoencoder": ["autoencoder"], "latents": ["autoencoder", "unet"], "unet": ["autoencoder", "unet"],
                "encoder": ["autoencoder", "encoder", "encoder_preset"],
                "check": ["autoencoder", "unet", "encoder", "encoder_preset", "check_identities", "check_samples",
                          "guidance"]}[stage]
        if "autoencoder" in deps:  # everything downstream of the autoencoder depends on its teacher
            deps = ["teacher", *deps]
        out = {k: d[k] for k in dict.fromkeys(deps)}
        if stage == "latents":  # the cache depends only on which renders it holds, not on how the UNet trains
            out["unet"] = {k: d["unet"][k] for k in ("n_identities", "views", "seed")}
        if "encoder" in deps:  # the resolved encoder config, so that a change of its defaults rebuilds
            out["encoder_resolved"] = dataclasses.asdict(self.encoder_config())
        return out

    def encoder_config(self):
        from .encoder import EncoderConfig

        base = EncoderConfig.micro() if self.encoder_preset == "micro" else EncoderConfig()
        return dataclasses.replace(base, **self.encoder)

    def teacher_config(self):
        from .encoder import EncoderConfig

        return EncoderConfig.micro(**self.teacher)


def build_world(out: Path, cfg: WorldConfig, *, device: torch.device, command: str | None = None,
                progress: bool = True, stages: tuple[str, ...] = STAGES) -> dict:
    """Build (or finish building) the mini world into ``out``; returns the manifest."""
    from . import check, encoder as E
    from .encoder_training import train_encoder

    out = Path(out)
    st = Stages(out, cfg.stage_config)
    pipe_dir, enc_dir, tok_dir = out / "pipeline", out / "identity_encoder", st.work / "tokenizer"
    tokenizer = P.make_tokenizer(tok_dir)

    def vae():
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(st.work / "vae").to(device).eval()

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise W2WError(f"unknown stage {unknown[0]!r}; stages are {STAGES}")

    def run(stage: str) -> dict:
        extra: dict = {}
        if stage == "teacher":
            teacher, _ = train_encoder(cfg.teacher_config(), device=device, progress=progress)
            E.save_encoder(teacher, st.work / "teacher")
        elif stage == "autoencoder":
            model = P.train_autoencoder(cfg.autoencoder, device=device, progress=progress,
                                        checkpoint=st.checkpointer(stage), state=st.resume(stage),
                                        teacher=E.load_encoder(st.work / "teacher", device=device))
            model.save_pretrained(st.work / "vae")
        elif stage == "latents":
            ucfg = cfg.unet
            rng = np.random.default_rng([ucfg.seed, 1])
            ids = np.repeat(rng.choice(P.TRAIN_IDENTITY_SEEDS.stop, ucfg.n_identities, replace=False), ucfg.views)
            lat = P.encode_latents(vae(), ids, rng.integers(0, 2**31, len(ids)), device=device, progress=progress)
            torch.save({"latents": lat, "identity_seeds": torch.from_numpy(ids)}, st.work / "latents.pt")
        elif stage == "unet":
            cache = torch.load(st.work / "latents.pt", weights_only=True)
            from .render import sample_identities

            factors = sample_identities(cache["identity_seeds"].numpy())  # one row per cached latent
            unet, text = P.train_unet(cfg.unet, cache["latents"], factors, tokenizer, device=device, progress=progress,
                                      checkpoint=st.checkpointer(stage), state=st.resume(stage))
            P.save_pipeline(pipe_dir, vae=vae().cpu(), unet=unet.cpu(), text_encoder=text.cpu(), tokenizer=tokenizer)
            extra["train_identity_seeds"] = sorted(set(cache["identity_seeds"].tolist()))[:5]
        elif stage == "encoder":
            ecfg = cfg.encoder_config()
            ae = vae()
            enc, history = train_encoder(ecfg, device=device, recon_fn=lambda x: P.autoencode(ae, x), progress=progress)
            E.save_encoder(enc, enc_dir)
            extra["final_loss"] = history[-1] if history else None
        elif stage == "check":
            metrics = check.quality_gates(out, n_identities=cfg.check_identities, n_samples=cfg.check_samples,
                                          guidance=cfg.guidance, device=device, progress=progress)
            (out / "quality.json").write_text(json.dumps(metrics, indent=1))
        return extra

    seconds = st.run(stages, run)
    return _manifest(out, cfg, seconds, command)


def _manifest(out: Path, cfg: WorldConfig, seconds: dict[str, float], command: str | None) -> dict:
    quality = out / "quality.json"
    return write_manifest(
        out, artifact="the mini world: diffusers pipeline and identity encoder",
        command=command or f"w2w world build --config {cfg.name} --out {portable_path(out)}",
        config=dataclasses.asdict(cfg),
        seeds={"teacher": cfg.teacher_config().seed, "autoencoder": cfg.autoencoder.seed, "unet": cfg.unet.seed,
               "encoder": cfg.encoder_config().seed,
               "training identities": f"seeds in [0, {P.TRAIN_IDENTITY_SEEDS.stop}); held-out >= 10**9"},
        build_seconds={k: round(v, 1) for k, v in seconds.items()},
        quality=json.loads(quality.read_text()) if quality.is_file() else None)
