"""Amortised inversion: a small CNN that maps one face image to a space's latent in one forward pass.

HyperDreamBooth predicts a LoRA from a face with a hypernetwork, then fine-tunes briefly; LoRA-diffusion
work trains such predictors on w2w's LoRAs. Here the predictor is trained on the dataset's own
identities: the inputs are images of each identity (for the mini world, renders of its training views;
for SD 1.5, the LoRA's generated images), the targets the space's code of its LoRA, in whitened units
(:func:`~w2wlib.invert.core.prior_scale`). Its answer can start a short gradient inversion
(``invert(..., u0=inverter.predict(images))``), the HyperDreamBooth recipe.

Training keeps the trainer's habits: a config dataclass, one loop, the project's optimiser
(:mod:`w2wlib.optim`) and seed rule (:mod:`w2wlib.seeding`), atomic checkpoints that resume exactly,
and a saved model that carries its config and the library version.

Example:
    >>> net = AmortisedInverter(AmortisedConfig(), k=64)
    >>> net(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 64])
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..errors import ArtifactMissingError, W2WError
from ..optim import adamw
from ..seeding import generator, seed_int

__all__ = ["AmortisedConfig", "AmortisedInverter", "train_amortised", "predict_inversion", "invert_amortised"]

_CONFIG, _WEIGHTS, _CKPT = "config.json", "model.safetensors", "checkpoint.pt"


@dataclass
class AmortisedConfig:
    """The predictor and how it is trained."""

    space: str = "vae"                           # the space whose latent it predicts (pca | vae)
    k: int = 64                                  # predicted dimensions: the space's first k (whitened)
    channels: tuple[int, ...] = (32, 64, 128, 128)  # one stride-2 conv block each: 64 -> 4 pixels
    steps: int = 2000                            # optimiser steps
    batch: int = 128                             # images per step
    lr: float = 2e-3                             # AdamW peak lr, warm-up then cosine
    warmup: int = 100
    weight_decay: float = 1e-4                   # on weight matrices only (w2wlib.optim)
    val_every: int = 250                         # steps between validation rows in the history
    checkpoint_every: int = 500                  # steps between resumable checkpoints
    seed: int = 0

    def __post_init__(self) -> None:
        if self.space not in ("pca", "vae"):
            raise W2WError(f"space must be pca or vae, not {self.space!r}")
        if self.k < 1 or self.steps < 1 or self.batch < 1 or not self.channels:
            raise W2WError(f"need k, steps and batch >= 1 and some channels; got k={self.k}, steps={self.steps}, "
                           f"batch={self.batch}, channels={self.channels}")
        self.channels = tuple(int(c) for c in self.channels)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        return d


def _block(c_in: int, c_out: int) -> nn.Sequential:
    groups = 8 if c_out % 8 == 0 else 1
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU())


class AmortisedInverter(nn.Module):
    """Images ``[N, 3, H, W]`` in [-1, 1] -> whitened latents ``u [N, k]``."""

    def __init__(self, config: AmortisedConfig, k: int | None = None):
        super().__init__()
        self.config = config if k is None else dataclasses.replace(config, k=k)
        chans = (3, *self.config.channels)
        with torch.random.fork_rng(devices=[]):              # the init depends on the config's seed alone
            torch.manual_seed(seed_int(self.config.seed, 3))
            self.features = nn.Sequential(*[_block(a, b) for a, b in zip(chans, chans[1:])])
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * chans[-1], 256), nn.SiLU(),
                                      nn.Linear(256, self.config.k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, images) -> torch.Tensor:
        """``u [N, k]`` for uint8 ``[N, H, W, 3]`` images or float ``[N, 3, H, W]`` in [-1, 1]."""
        from ..viz import to_tensor

        x = to_tensor(images) if (isinstance(images, np.ndarray) or images.dtype == torch.uint8) else images
        if x.dim() != 4 or x.shape[1] != 3 or not torch.isfinite(x).all() or x.min() < -1.001 or x.max() > 1.001:
            raise W2WError(f"predict takes uint8 [N, H, W, 3] or finite float [N, 3, H, W] in [-1, 1]; got "
                           f"{x.dtype} {tuple(x.shape)}")
        self.eval()
        p = next(self.parameters())
        return self(x.to(p.device, p.dtype)).float().cpu()

    def save(self, folder: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _CONFIG).write_text(json.dumps({"config": self.config.to_dict(), "w2wlib_version": __version__},
                                                 indent=1, sort_keys=True))
        save_file({k: v.contiguous().cpu() for k, v in self.state_dict().items()}, str(folder / _WEIGHTS),
                  metadata={"kind": "w2w-amortised-inverter"})
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, device: torch.device | str = "cpu") -> "AmortisedInverter":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / _CONFIG).is_file() or not (folder / _WEIGHTS).is_file():
            raise ArtifactMissingError(f"no amortised inverter in {folder} ({_CONFIG} and {_WEIGHTS}): build it with "
                                       f"`w2w spaces build`")
        try:
            cfg = AmortisedConfig(**json.loads((folder / _CONFIG).read_text())["config"])
            model = cls(cfg)
            model.load_state_dict(load_file(str(folder / _WEIGHTS)))
        except (KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
            raise W2WError(f"{folder} does not hold a readable amortised inverter ({e}); rebuild it with "
                           f"`w2w spaces build`") from e
        return model.to(device).eval()


def _batch(images: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n: int, gen: torch.Generator):
    """``n`` (image, target) pairs: random rows of ``rows``, a random view of each."""
    r = rows[torch.randint(0, len(rows), (n,), generator=gen)]
    v = torch.randint(0, images.shape[1], (n,), generator=gen)
    x = images[r, v].permute(0, 3, 1, 2).float().div(127.5).sub(1.0)                     # [n, 3, H, W]
    return x, targets[r]


def train_amortised(model: AmortisedInverter, images: np.ndarray | torch.Tensor, targets: torch.Tensor,
                    train_rows: torch.Tensor, val_rows: torch.Tensor, *, out_dir: str | os.PathLike | None = None,
                    device: torch.device | str = "cpu", progress: bool = True) -> list[dict]:
    """Fit ``model`` to map views of identity ``i`` to ``targets[i]``; returns the history.

    ``images``: uint8 ``[N, V, H, W, 3]``, V views of each of N identities; ``targets``: ``[N, k]``
    whitened codes. Only ``train_rows`` are trained on; ``val_rows`` give the validation MSE. With
    ``out_dir``, checkpoints go there every ``checkpoint_every`` steps and a rerun resumes from the last
    one (a checkpoint of another config is refused); the finished model is saved there too.
    """
    from tqdm.auto import tqdm

    cfg = model.config
    images = torch.as_tensor(np.asarray(images))
    targets = torch.as_tensor(targets).float()
    if images.dtype != torch.uint8 or images.dim() != 5 or images.shape[-1] != 3:
        raise W2WError(f"images must be uint8 [N, V, H, W, 3]; got {images.dtype} {tuple(images.shape)}")
    if targets.shape != (len(images), cfg.k) or not torch.isfinite(targets).all():
        raise W2WError(f"targets must be finite [{len(images)}, {cfg.k}] (one whitened code per identity); got "
                       f"{tuple(targets.shape)}")
    model.to(device).train()
    opt, sched = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, steps=cfg.steps, warmup=cfg.warmup)
    start, history = 0, []
    ckpt = Path(out_dir) / _CKPT if out_dir is not None else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        if state["config"] != json.dumps(cfg.to_dict(), sort_keys=True):
            raise W2WError(f"{ckpt} was written with another config: remove it to start afresh")
        model.load_state_dict(state["model"]), opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        start, history = state["step"], json.loads(state["history"])
    val_gen = generator(cfg.seed, 1)
    x_val, y_val = _batch(images, targets, val_rows, min(512, 4 * len(val_rows)), val_gen)
    bar = tqdm(range(start, cfg.steps), desc=f"amortised ({cfg.space})", disable=not progress, initial=start,
               total=cfg.steps)
    for step in bar:
        torch.manual_seed(seed_int(cfg.seed, 2, step))                   # nothing random in the model, but exact
        x, y = _batch(images, targets, train_rows, cfg.batch, generator(cfg.seed, 0, step))
        loss = (model(x.to(device)) - y.to(device)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(), sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            model.eval()
            with torch.no_grad():
                val = float((model(x_val.to(device)) - y_val.to(device)).pow(2).mean())
            model.train()
            history.append({"step": step + 1, "train_mse": float(loss.detach()), "val_mse": val,
                            "val_mse_of_zero": float(y_val.pow(2).mean())})
        if ckpt is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step + 1, "history": json.dumps(history),
                        "config": json.dumps(cfg.to_dict(), sort_keys=True)}, tmp)
            os.replace(tmp, ckpt)
    model.eval()
    if out_dir is not None:
        model.save(out_dir)
        if ckpt is not None:
            ckpt.unlink(missing_ok=True)
    return history


def predict_inversion(space, net: AmortisedInverter, images, *, scale: float = 1.0) -> "Inversion":  # noqa: F821
    """The amortised answer as an :class:`~w2wlib.invert.core.Inversion`: one forward pass, then decode.

    ``images`` as :meth:`AmortisedInverter.predict` takes them. The space's dimensions past the net's
    ``k`` stay at their prior mean (as in an inversion with ``InversionConfig(k=net.config.k)``), so the
    answer can seed one: ``invert(..., cfg=InversionConfig(k=net.config.k), u0=result.u)``.

    ``scale`` multiplies the predicted whitened code. A regression to noisy targets predicts their
    conditional mean, which sits closer to the mean identity than any real code; ``scale > 1`` undoes part
    of that shrinkage (``benchmarks/amortised_scale.md`` chooses it on one set of held-out identities and
    measures it on another).
    """
    import time

    from .core import Inversion, prior_scale

    if net.config.k > space.latent_dim:
        raise W2WError(f"the inverter predicts {net.config.k} dimensions but the space has {space.latent_dim}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise W2WError(f"scale must be a finite number > 0 (1: the net's own answer), not {scale!r}")
    t0 = time.perf_counter()
    u = net.predict(images) * scale                                                     # [G, k]
    mean, std = prior_scale(space)
    z = mean.cpu().clone().expand(len(u), -1).clone()
    z[:, :net.config.k] = mean[:net.config.k].cpu() + std[:net.config.k].cpu() * u
    with torch.no_grad():
        W = space.decode_weights(z.to(space.device)).cpu()
    return Inversion(z=z, W=W, seconds=time.perf_counter() - t0, u=u,
                     config={"method": "amortised", "space": type(space).__name__, "k": net.config.k})


def invert_amortised(pipe, space, net: AmortisedInverter, images, *, steps: int = 0, cfg=None, masks=None,
                     keys=None, layout=None, progress: bool = True, scale: float = 1.0) -> "Inversion":  # noqa: F821
    """The amortised answer (``steps=0``), or that answer refined by ``steps`` gradient steps (HyperDreamBooth).

    ``images``: float ``[G, 3, H, W]`` in [-1, 1]. The refinement is :func:`w2wlib.invert.invert` over the
    net's ``k`` dimensions, started at its answer, with ``cfg``'s other settings (default: the gradient
    defaults); its ``seconds`` include the forward pass. ``scale``: as :func:`predict_inversion`.
    """
    from . import InversionConfig, invert

    if steps < 0:
        raise W2WError(f"steps must be >= 0 (0: the forward pass alone); got {steps}")
    first = predict_inversion(space, net, images, scale=scale)
    if steps == 0:
        return first
    cfg = dataclasses.replace(cfg or InversionConfig(), method="gradient", k=net.config.k, steps=steps, init="encoder")
    res = invert(pipe, space, images, cfg=cfg, masks=masks, keys=keys, u0=first.u, layout=layout, progress=progress)
    res.seconds += first.seconds
    res.config["method"] = f"amortised + {steps} gradient steps"
    return res
