"""What every inversion method shares: its config, the objective on a batch of images, and the result.

Inversion looks for the point of a weight space whose LoRA makes the base model draw the person of one
image. The objective is w2w's: the DDPM loss of the base UNet, with the candidate's LoRA, on the
image's latent (:func:`~w2wlib.diffusion.ddpm_loss`), optionally masked to the face. Methods differ
only in how they search: Adam on the latent (:mod:`.gradient`), CMA-ES (:mod:`.cmaes`), or a network
that predicts the latent in one pass (:mod:`.amortised`).

**Units.** Methods search in *whitened* units ``u``: ``z = prior_mean + prior_std * u``, so ``u = 0``
is the mean identity, ``u ~ N(0, I)`` is a draw from the space's own prior (a VAE's N(0, I); PCA's
per-coefficient Gaussians, as w2w samples), and one step size or σ0 means the same in PCA and VAE.
w2w's own inversion optimises the raw PCA coefficients; ``InversionConfig(whiten=False)`` reproduces it.

**Common random numbers.** Each evaluation draws, per image, ``timesteps`` pairs (t, ε) from the
stream ``(seed, image key, step)`` (:mod:`w2wlib.seeding`), shared by every candidate of that image:
CMA-ES then ranks candidates on the same noise, and an image's result does not depend on the batch.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..diffusion import ddpm_loss
from ..errors import W2WError
from ..lora import BatchedLora, LoraLayout
from ..seeding import generator

__all__ = ["InversionConfig", "Inversion", "InversionObjective", "prior_scale", "comparison_methods"]

_DRAWS = 0x1417   # tag of the (t, noise) streams of inversion


@dataclass
class InversionConfig:
    """How to invert. Defaults suit the mini world; the ``w2w`` preset is w2w's own recipe."""

    method: str = "gradient"            # gradient | cmaes
    steps: int = 200                    # Adam steps, or CMA-ES generations
    k: int | None = None                # use the space's first k dimensions (PCA: top-k PCs); None = all
    whiten: bool = True                 # search u with z = prior_mean + prior_std * u (see the module doc)
    init: str = "mean"                  # mean (u = 0: w2w's zero coefficients) | encoder (amortised start)
    timesteps: int = 4                  # (t, eps) draws averaged per evaluation (common random numbers)
    t_range: tuple[int, int] = (0, 1000)  # t ~ U[lo, hi): w2w draws from the whole schedule
    prompt: str = "a photo of sks person"  # the prompt the dataset's LoRAs were trained with
    masked: bool = True                 # weight the loss with the given masks (w2w: the face)
    # gradient
    lr: float = 0.05                    # Adam lr, in the searched units
    weight_decay: float = 0.0           # w2w: 1e-10
    schedule: str = "cosine"            # cosine | constant
    prior_weight: float = 0.0           # + prior_weight * |u|^2 / k: keeps u in the prior's typical set
    max_norm: float | None = None       # project u onto |u| <= max_norm * sqrt(k) after each step
    # cmaes
    popsize: int | None = None          # None: cma's default 4 + 3 ln k
    sigma0: float = 0.5                 # initial step size, in the searched units
    bounds: float | None = 3.0          # box |u_i| <= bounds (w2w++: 1.3 on z)
    diagonal: bool = False              # separable CMA (cheap for large k)
    snapshots: int = 0                  # keep this many evenly spaced latents along the way (for ID-vs-step plots)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("gradient", "cmaes"):
            raise W2WError(f"method {self.method!r} is not an optimiser: choose gradient or cmaes "
                           f"(amortised inversion is w2wlib.invert.amortised.AmortisedInverter)")
        if self.init not in ("mean", "encoder"):
            raise W2WError(f"init must be mean or encoder, not {self.init!r}")
        if self.schedule not in ("cosine", "constant"):
            raise W2WError(f"schedule must be cosine or constant, not {self.schedule!r}")
        lo, hi = self.t_range
        if not 0 <= lo < hi <= 1000 or self.steps < 1 or self.timesteps < 1:
            raise W2WError(f"need steps >= 1, timesteps >= 1 and 0 <= t_range[0] < t_range[1] <= 1000; got "
                           f"steps={self.steps}, timesteps={self.timesteps}, t_range={self.t_range}")

    @classmethod
    def w2w(cls, **overrides: Any) -> "InversionConfig":
        """w2w's ``inversion.py``: raw PCA coefficients from zero, Adam lr 0.1 (weight decay 1e-10),
        400 steps, one fresh (t, eps) per step over the whole schedule, a constant lr, masked loss."""
        base = dict(method="gradient", whiten=False, steps=400, lr=0.1, weight_decay=1e-10, timesteps=1,
                    schedule="constant", masked=True)
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["t_range"] = list(self.t_range)
        return d


@dataclass
class Inversion:
    """The result for G images: latents ``z [G, k]``, raw LoRA rows ``W [G, D]``, the loss along the way."""

    z: torch.Tensor
    W: torch.Tensor
    history: list[dict] = field(default_factory=list)   # per step: {"step", "loss": [G], ...}
    snapshots: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (steps done, z [G, k])
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    u: torch.Tensor | None = None                        # [G, k] the searched (whitened) units of z
    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(1, len(self.z))


def prior_scale(space, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [k], std [k])`` of the space's prior: PCA's coefficient Gaussians, or N(0, I) for a VAE."""
    k = space.latent_dim if k is None else k
    if hasattr(space, "coeff_mean"):
        return space.coeff_mean[:k].float(), space.coeff_std[:k].float()
    return torch.zeros(k, device=space.device), torch.ones(k, device=space.device)


class InversionObjective:
    """The masked DDPM loss of candidate latents on G images, one UNet pass for any number of candidates.

    ``latents [G, c, h, w]``: the images' scaled VAE latents; ``masks [G, 1, h, w]`` or None;
    ``cond [1, L, C]``: the prompt's embedding; ``keys``: one non-negative int per image naming its
    random streams. :meth:`loss` takes latents ``z [N, k]`` with ``image[n]`` the image of candidate n.
    """

    def __init__(self, space, unet, noise_scheduler, latents: torch.Tensor, cond: torch.Tensor, *,
                 masks: torch.Tensor | None, keys: Sequence[int], cfg: InversionConfig, layout: LoraLayout | None = None):
        self.space, self.unet, self.sched, self.cfg = space, unet, noise_scheduler, cfg
        self.device = next(unet.parameters()).device
        self.latents = latents.to(self.device).float()                               # [G, c, h, w]
        self.masks = None if masks is None or not cfg.masked else masks.to(self.device).float()
        self.cond, self.keys = cond.to(self.device), [int(k) for k in keys]
        if len(self.keys) != len(self.latents):
            raise W2WError(f"{len(self.latents)} images but {len(self.keys)} keys")
        self.k = space.latent_dim if cfg.k is None else cfg.k
        if not 1 <= self.k <= space.latent_dim:
            raise W2WError(f"k={cfg.k} but this {type(space).__name__} has {space.latent_dim} dimensions")
        mean, std = prior_scale(space, self.k)
        self.mean, self.std = (mean, std) if cfg.whiten else (torch.zeros_like(mean), torch.ones_like(std))
        self.layout = layout or LoraLayout.from_unet(unet)
        self.evaluations = 0

    def z_of(self, u: torch.Tensor) -> torch.Tensor:
        """Searched units ``u [N, k]`` -> the space's full latent ``[N, latent_dim]`` (unused dims at their mean)."""
        z = self.mean.to(u) + self.std.to(u) * u
        if self.k < self.space.latent_dim:
            rest = prior_scale(self.space)[0][self.k:].to(u).expand(len(u), -1)
            z = torch.cat([z, rest], 1)
        return z

    def weights(self, u: torch.Tensor) -> torch.Tensor:
        """Raw LoRA rows ``[N, D]`` of searched units ``u [N, k]`` (differentiable)."""
        return self.space.decode_weights(self.z_of(u))

    def snapshot_steps(self) -> set[int]:
        """Steps after which the searched latent is kept: ``cfg.snapshots`` of them, evenly spaced, the last included."""
        n = self.cfg.snapshots
        return set() if n <= 0 else {round(self.cfg.steps * (i + 1) / n) for i in range(n)}

    def draws(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, ``timesteps`` pairs (t, eps): ``t [G, T]``, ``noise [G, T, c, h, w]``."""
        lo, hi = self.cfg.t_range
        ts, ns = [], []
        for key in self.keys:
            gen = generator(self.cfg.seed, _DRAWS, key, step)
            ts.append(torch.randint(lo, hi, (self.cfg.timesteps,), generator=gen))
            ns.append(torch.randn((self.cfg.timesteps, *self.latents.shape[1:]), generator=gen))
        return torch.stack(ts).to(self.device), torch.stack(ns).to(self.device)

    def loss(self, u: torch.Tensor, image: torch.Tensor, step: int, bank: BatchedLora) -> torch.Tensor:
        """Mean DDPM loss ``[N]`` of candidates ``u [N, k]`` on their images (``image [N]``) at ``step``'s draws."""
        T = self.cfg.timesteps
        t, noise = self.draws(step)
        W = self.weights(u)                                                           # [N, D]
        img = image.to(self.device)
        rows = torch.arange(len(u), device=self.device).repeat_interleave(T)           # [N*T]
        x0 = self.latents[img].repeat_interleave(T, 0)                                 # [N*T, c, h, w]
        err = ddpm_loss(self.unet, self.sched, x0, noise[img].flatten(0, 1), t[img].flatten(), 
                        self.cond.expand(len(rows), -1, -1), bank=bank, W=W, index=rows,
                        weight=None if self.masks is None else self.masks[img].repeat_interleave(T, 0))
        self.evaluations += len(u)
        return err.view(len(u), T).mean(1)


class _Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def comparison_methods(vae_latent: int, *, steps: int = 150, w2w_steps: int = 400, generations: int = 60,
                       snapshots: int = 0) -> dict[str, tuple[str, InversionConfig]]:
    """The methods the book and ``benchmarks/p3_inversion.py`` compare: name -> (space, config).

    w2w's own recipe in the PCA; our gradient (whitened units, 4 (t, eps) draws per step, cosine lr) in
    both spaces, and in the PCA's top ``vae_latent`` coefficients (the VAE's size); w2w++'s gradient in the VAE (AdamW on z, lr 1e-4); CMA-ES in the VAE latent and in the
    PCA's top ``vae_latent`` coefficients (the same size).
    """
    ours = dict(steps=steps, lr=0.1, snapshots=snapshots)
    return {
        "PCA, gradient (w2w's recipe)": ("pca", InversionConfig.w2w(steps=w2w_steps)),
        "PCA, gradient (ours)": ("pca", InversionConfig(**ours)),
        "VAE, gradient (w2w++: AdamW lr 1e-4)": ("vae", InversionConfig(whiten=False, lr=1e-4, steps=steps, timesteps=1,
                                                                        schedule="constant")),
        f"PCA top-{vae_latent}, gradient (ours)": ("pca", InversionConfig(**ours, k=vae_latent)),
        "VAE, gradient (ours)": ("vae", InversionConfig(**ours)),
        "VAE, CMA-ES": ("vae", InversionConfig(method="cmaes", steps=generations)),
        f"PCA top-{vae_latent}, CMA-ES": ("pca", InversionConfig(method="cmaes", steps=generations, k=vae_latent)),
    }
