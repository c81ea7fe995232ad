"""The non-linear weight space of w2w++: a VAE over standardised identity-LoRA vectors.

The seeds describe an MLP encoder that narrows through linear layers with non-linear activations
(99,648 -> 4,096 -> ... -> 512-d latent) and a mirrored decoder, trained with KL annealing. The seeds
do not give the widths between 4,096 and 512; :meth:`VAEConfig.sd15` halves at each layer
(4,096 -> 2,048 -> 1,024 -> latent 512). Normalisation, residual blocks, dropout and the noise
augmentation of p-diff (Wang et al. 2024, "Neural Network Diffusion": noise on input parameters and
latents) are options, off by default. ``arch="tokens"`` replaces the MLP with one token per LoRA module
and a small transformer on each side (the seeds' "transformers to capture weight structure").

The model computes its own loss (:meth:`WeightVAE.forward`); :mod:`w2wlib.train` optimises it.

Example:
    >>> import torch
    >>> space = VAESpace(VAEConfig.scaled(256, latent=8), seed=0)
    >>> space.model.loss(torch.randn(4, 256), beta=1.0)["loss"].shape
    torch.Size([])
    >>> space.decode(space.sample(3, torch.Generator().manual_seed(0))).shape
    torch.Size([3, 256])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import W2WError
from ..lora import SD15_DIM
from .base import WeightSpace, _check_sample_args

__all__ = ["VAEConfig", "WeightVAE", "VAESpace", "SD15_DIM"]

_SD15_HIDDEN = (4096, 2048, 1024)
_SD15_LATENT = 512
_ACTIVATIONS = {"leaky_relu": nn.LeakyReLU, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU,
                "tanh": nn.Tanh}
_LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite in float32 and bf16


@dataclass
class VAEConfig:
    """Architecture of :class:`WeightVAE`.

    >>> VAEConfig.sd15().hidden
    (4096, 2048, 1024)
    >>> mini = VAEConfig.scaled(5376)          # the mini world's D
    >>> mini.hidden, mini.latent
    ((224, 112, 56), 24)
    """

    dim: int                                   # D, the flat LoRA length (99,648 for SD 1.5)
    hidden: tuple[int, ...] = _SD15_HIDDEN     # encoder widths, widest first; the decoder mirrors them
    latent: int = _SD15_LATENT                 # k; the seeds use 512
    activation: str = "leaky_relu"             # the seeds' LeakyReLU (torch's slope 0.01); or relu/gelu/silu/tanh
    norm: str = "none"                         # "layer" adds LayerNorm before each activation (deep stacks)
    residual_blocks: int = 0                   # residual MLP blocks after each hidden layer (the seeds tried these)
    dropout: float = 0.0                       # after each activation; regularises a small dataset
    input_noise: float = 0.0                   # std of Gaussian noise on inputs in training (p-diff augmentation)
    latent_noise: float = 0.0                  # std of Gaussian noise on latents in training (p-diff augmentation)
    linear_skip: bool = False                  # a linear path D -> (mu, logvar) and k -> D beside the MLP (holds pPCA)
    arch: str = "mlp"                          # "mlp" (the seeds'), or "tokens": one token per LoRA module
    token_sizes: tuple[int, ...] = ()          # tokens: numel of each module's slice, in flat order (sums to dim)
    token_width: int = 64                      # tokens: width of each module's token
    token_layers: int = 2                      # tokens: transformer layers in the encoder and in the decoder
    token_heads: int = 4                       # tokens: attention heads

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        self.token_sizes = tuple(int(t) for t in self.token_sizes)
        if self.arch not in ("mlp", "tokens"):
            raise W2WError(f"arch must be 'mlp' or 'tokens', not {self.arch!r}.")
        if self.arch == "tokens" and (sum(self.token_sizes) != self.dim or min(self.token_sizes, default=0) < 1
                                      or self.token_width % self.token_heads or self.token_layers < 1):
            raise W2WError(f"arch='tokens' needs token_sizes (one per LoRA module, from the layout: "
                           f"[e.numel for e in layout.entries]) summing to dim={self.dim:,} (got "
                           f"{sum(self.token_sizes):,}), token_layers >= 1 and token_width divisible by token_heads.")
        if self.dim < 1 or self.latent < 1 or any(h < 1 for h in self.hidden):
            raise W2WError(f"VAEConfig needs positive sizes; got dim={self.dim}, hidden={self.hidden}, "
                           f"latent={self.latent}.")
        if self.activation not in _ACTIVATIONS:
            raise W2WError(f"activation must be one of {sorted(_ACTIVATIONS)}, not {self.activation!r}.")
        if self.norm not in ("none", "layer"):
            raise W2WError(f"norm must be 'none' or 'layer', not {self.norm!r}.")
        if self.residual_blocks < 0 or not 0 <= self.dropout < 1 or self.input_noise < 0 or self.latent_noise < 0:
            raise W2WError("residual_blocks and the noise stds must be >= 0, and dropout in [0, 1).")

    @classmethod
    def sd15(cls, **overrides: Any) -> "VAEConfig":
        """The seeds' VAE for SD 1.5 LoRAs: 99,648 -> 4,096 -> 2,048 -> 1,024 -> 512, LeakyReLU."""
        return cls(**{"dim": SD15_DIM, **overrides})

    @classmethod
    def scaled(cls, dim: int, *, latent: int | None = None, **overrides: Any) -> "VAEConfig":
        """The sd15 architecture with every width scaled by ``dim / 99,648`` (multiples of 8, at least 8).

        The latent scales too unless given; hidden widths never go below the latent.
        """
        f = dim / SD15_DIM
        k = latent if latent is not None else _round8(_SD15_LATENT * f)
        hidden = tuple(max(k, _round8(h * f)) for h in _SD15_HIDDEN)
        return cls(**{"dim": dim, "hidden": hidden, "latent": k, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hidden": list(self.hidden), "token_sizes": list(self.token_sizes)}


def kl_to_prior(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) of each latent of each row, ``[B, k]`` nats (float32 or wider)."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.square() + logvar.exp() - 1 - logvar)


def _round8(x: float) -> int:
    return max(8, int(round(x / 8)) * 8)


class _Residual(nn.Module):
    """``x + Linear(act(norm(x)))``: a pre-norm residual MLP block."""

    def __init__(self, width: int, cfg: VAEConfig):
        super().__init__()
        self.norm = nn.LayerNorm(width) if cfg.norm == "layer" else nn.Identity()
        self.act, self.drop, self.lin = _ACTIVATIONS[cfg.activation](), nn.Dropout(cfg.dropout), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(self.drop(self.act(self.norm(x))))


def _stack(widths: list[int], cfg: VAEConfig) -> nn.Sequential:
    """Linear -> [LayerNorm] -> act -> dropout -> residual blocks, for each consecutive pair of widths."""
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(a, b))
        if cfg.norm == "layer":
            layers.append(nn.LayerNorm(b))
        layers += [_ACTIVATIONS[cfg.activation](), nn.Dropout(cfg.dropout)]
        layers += [_Residual(b, cfg) for _ in range(cfg.residual_blocks)]
    return nn.Sequential(*layers)


class _Tokens(nn.Module):
    """Per-module tokens and a transformer: the "transformers to capture weight structure" of the seeds.

    ``direction="encode"``: ``[B, D]`` is cut into one slice per LoRA module, each projected by its own
    Linear to a token of ``token_width``, plus a learnt embedding of the module; a transformer mixes the
    tokens, which are flattened to ``[B, T * width]``. ``"decode"``: ``[B, k]`` -> T tokens -> transformer
    -> each module's own Linear back to its slice -> ``[B, D]``.
    """

    def __init__(self, cfg: VAEConfig, direction: str):
        super().__init__()
        T, w = len(cfg.token_sizes), cfg.token_width
        self.sizes, self.direction = list(cfg.token_sizes), direction
        self.embed = nn.Parameter(torch.randn(T, w) * 0.02)
        layer = nn.TransformerEncoderLayer(w, cfg.token_heads, 4 * w, dropout=cfg.dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.mix = nn.TransformerEncoder(layer, cfg.token_layers, enable_nested_tensor=False)
        if direction == "encode":
            self.proj = nn.ModuleList(nn.Linear(n, w) for n in self.sizes)
        else:
            self.start = nn.Linear(cfg.latent, T * w)
            self.proj = nn.ModuleList(nn.Linear(w, n) for n in self.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.direction == "encode":
            tokens = torch.stack([p(part) for p, part in zip(self.proj, x.split(self.sizes, dim=1))], 1)
            return self.mix(tokens + self.embed).flatten(1)                   # [B, T * w]
        tokens = self.mix(self.start(x).view(len(x), *self.embed.shape) + self.embed)
        return torch.cat([p(tokens[:, i]) for i, p in enumerate(self.proj)], 1)  # [B, D]


class WeightVAE(nn.Module):
    """VAE over flat LoRAs: ``[B, D]`` -> (mu, logvar) ``[B, k]`` each -> ``[B, D]``; an MLP or per-module tokens.

    ``forward(x, beta, free_bits)`` returns the loss dict, so that DDP and autocast wrap the whole loss.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        if config.linear_skip:  # the linear VAE (probabilistic PCA) as a special case; the MLP adds to it
            self.skip_in = nn.Linear(config.dim, 2 * config.latent, bias=False)
            self.skip_out = nn.Linear(config.latent, config.dim, bias=False)
        if config.arch == "tokens":
            self.encoder = _Tokens(config, "encode")                   # [B, D] -> [B, T * w]
            self.to_stats = nn.Linear(len(config.token_sizes) * config.token_width, 2 * config.latent)
            self.decoder = _Tokens(config, "decode")                   # [B, k] -> [B, D]
            self.out = nn.Identity()
            return
        widths = [config.dim, *config.hidden]
        self.encoder = _stack(widths, config)                          # [B, D] -> [B, h_last]
        self.to_stats = nn.Linear(widths[-1], 2 * config.latent)       # -> [B, 2k] = (mu, logvar)
        self.decoder = _stack([config.latent, *reversed(config.hidden)], config)
        self.out = nn.Linear(widths[1] if len(widths) > 1 else config.latent, config.dim)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z | x), ``[B, k]`` each."""
        stats = self.to_stats(self.encoder(x))
        if self.config.linear_skip:
            stats = stats + self.skip_in(x)
        mu, logvar = stats.chunk(2, dim=-1)
        return mu, logvar.clamp(*_LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, k]`` -> ``[B, D]``."""
        out = self.out(self.decoder(z))
        return out + self.skip_out(z) if self.config.linear_skip else out

    def forward(self, x: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0) -> dict[str, torch.Tensor]:
        """The β-VAE loss of a standardised batch ``x`` ``[B, D]``.

        ``recon`` is the mean squared error per element and ``kl`` is KL(q(z|x) || N(0, I)) in nats per
        sample, summed over the latent. ``loss = recon + beta * kl_term / D``: at β = 1 this is the
        negative ELBO, per dimension, of a Gaussian decoder with variance 1/2, a sensible unit for
        standardised data. With ``free_bits`` λ > 0 the KL term is ``sum_j max(λ, mean_batch KL_j)``
        (Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive Flow"), so no
        latent dimension is pushed below λ nats. In training z is sampled (and the p-diff noises are
        added); in eval mode z is the posterior mean, so ``recon`` is the deterministic reconstruction
        error.
        """
        cfg = self.config
        x = x.float()
        x_in = x + cfg.input_noise * torch.randn_like(x) if self.training and cfg.input_noise else x
        mu, logvar = self.posterior(x_in)                                            # [B, k] each
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu) if self.training else mu
        if self.training and cfg.latent_noise:
            z = z + cfg.latent_noise * torch.randn_like(z)
        recon = F.mse_loss(self.decode(z).float(), x)
        kl_dim = kl_to_prior(mu, logvar).mean(0)                                     # [k]
        kl_term = kl_dim.clamp_min(free_bits).sum() if free_bits > 0 else kl_dim.sum()
        loss = recon + beta * kl_term / cfg.dim
        return {"loss": loss, "recon": recon.detach(), "kl": kl_dim.sum().detach(), "kl_term": kl_term.detach()}

    def loss(self, x: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0) -> dict[str, torch.Tensor]:
        """Same as calling the model: ``{"loss", "recon", "kl", "kl_term"}`` (see :meth:`forward`)."""
        return self(x, beta=beta, free_bits=free_bits)


class VAESpace(WeightSpace):
    """A :class:`WeightVAE` as a :class:`WeightSpace`: encode gives the posterior mean, sample is N(0, I).

    ``seed`` makes the initial weights reproducible. Train it with :func:`w2wlib.train.train_vae`.

    >>> space = VAESpace(VAEConfig.scaled(ds.dim), seed=0)      # doctest: +SKIP
    >>> history = train_vae(space, ds, TrainConfig(steps=2000))  # doctest: +SKIP
    """

    kind = "vae"

    def __init__(self, config: VAEConfig, *, seed: int = 0, model: WeightVAE | None = None):
        self.config = config
        if model is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = WeightVAE(config)
        self.model = model.eval()

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def latent_dim(self) -> int:
        return self.config.latent

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "VAESpace":
        """Move the model (in place) and return self."""
        self.model.to(device)
        return self

    def encode(self, w_std: torch.Tensor) -> torch.Tensor:
        """Posterior means ``[N, k]`` of standardised weights ``[N, D]`` (the model is put in eval mode)."""
        self.model.eval()
        return self.model.posterior(self._check_weights(w_std))[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``[N, k]`` -> standardised weights ``[N, D]``, differentiable in ``z`` (for inversion)."""
        self.model.eval()
        return self.model.decode(self._check_latent(z))

    @torch.no_grad()
    def kl_per_dim(self, w_std: torch.Tensor) -> torch.Tensor:
        """Mean KL(q(z_j | x) || N(0, 1)) of each latent dimension over the rows, ``[k]`` nats.

        A dimension near 0 nats is collapsed: its posterior is the prior whatever the identity.
        """
        self.model.eval()
        return kl_to_prior(*self.model.posterior(self._check_weights(w_std))).mean(0).cpu()

    def sample(self, n: int, generator: torch.Generator | None = None, *, scale: float = 1.0) -> torch.Tensor:
        """``[n, k]`` draws from the prior N(0, I); ``scale`` < 1 is a lower temperature."""
        _check_sample_args(n, scale)
        dev = generator.device if generator is not None else self.device
        return scale * torch.randn(n, self.latent_dim, generator=generator, device=dev).to(self.device)

    def _state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self.config.to_dict(), {f"model.{k}": v for k, v in self.model.state_dict().items()}

    @classmethod
    def _from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "VAESpace":
        cfg = VAEConfig(**config)
        with torch.device("meta"):
            model = WeightVAE(cfg)  # no wasted random init: the weights come from the file
        model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items()}, strict=True, assign=True)
        return cls(cfg, model=model)
