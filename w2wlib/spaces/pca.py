"""The linear weight space of weights2weights (w2w; Dravid et al., NeurIPS 2024): PCA of standardised LoRAs.

w2w standardises every dimension of the ``[N, D]`` weight matrix and keeps its top-k principal
components ``V`` ``[D, k]``. A row's latent is its coefficients ``w_std @ V`` and it is rebuilt as
``coeffs @ V.T``. Sampling draws each coefficient from its own Gaussian, fitted to the training
coefficients and widened by ``scale`` (w2w's ``sampling.py``: ``torch.normal(mean, std)`` of ``proj``).

The SVD is of the standardised matrix itself, with no further centring: standardising with the
dataset's own mean already centres it, and ``decode`` stays the plain product w2w uses.

Two fitting methods (``method="auto"`` picks by size):

- ``"exact"``: ``torch.linalg.svd`` of the whole matrix in float64 (small data only);
- ``"randomized"``: a streaming randomized range finder (Halko, Martinsson & Tropp 2011, alg. 4.4 and
  5.1) on the row space, that reads row blocks and never holds the matrix. Memory is ``O(D (k + oversample))``; it makes
  ``2 + power_iters`` passes over the rows, so 64,974 x 99,648 fits on one GPU box.

Example:
    >>> import torch
    >>> x = torch.randn(200, 30, generator=torch.Generator().manual_seed(0))
    >>> space = PCASpace.fit(x, k=30)            # full rank: an exact round trip
    >>> bool(torch.allclose(space.decode(space.encode(x)), x, atol=1e-4))
    True
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import W2WError
from .base import WeightSpace, _check_sample_args, _StdRows

__all__ = ["PCASpace", "variance_shares"]

logger = logging.getLogger(__name__)

_EXACT_MAX_ELEMENTS = 40_000_000    # below this an exact float64 SVD takes seconds to a minute on a CPU
_EXACT_MAX_BYTES = 1 << 30          # never hold more than 1 GiB of float64 for the exact method


class PCASpace(WeightSpace):
    """Top-k principal components of standardised weights; see the module docstring.

    Attributes (k = latent_dim): ``components`` ``[D, k]`` (orthonormal columns, the w2w ``V``),
    ``singular_values`` ``[k]``, ``explained_variance`` ``[k]`` (``s**2 / (N - 1)``), ``total_variance``
    (the sum over all D dimensions, so ``explained_variance_ratio`` sums to at most 1), ``coeff_mean`` /
    ``coeff_std`` ``[k]`` (the training coefficients' per-component mean and std) and ``n_samples``.
    """

    kind = "pca"

    def __init__(self, components: torch.Tensor, singular_values: torch.Tensor, coeff_mean: torch.Tensor,
                 coeff_std: torch.Tensor, *, n_samples: int, total_variance: float, method: str = "exact"):
        d, k = components.shape
        for name, t in (("singular_values", singular_values), ("coeff_mean", coeff_mean), ("coeff_std", coeff_std)):
            if tuple(t.shape) != (k,):
                raise W2WError(f"{name} has shape {tuple(t.shape)}, expected ({k},) for {k} components.")
        self.components = components.float()             # [D, k]
        self.singular_values = singular_values.float()   # [k]
        self.coeff_mean, self.coeff_std = coeff_mean.float(), coeff_std.float()  # [k] each
        self.n_samples, self.total_variance, self.method = int(n_samples), float(total_variance), method

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, data: Any, k: int, *, method: str = "auto", rows: Sequence[int] | torch.Tensor | None = None,
            batch_size: int = 1024, oversample: int = 10, power_iters: int = 2, seed: int = 0,
            device: str | torch.device = "cpu", progress: bool = False) -> "PCASpace":
        """Fit the top-``k`` components of ``data``: a standardised ``[N, D]`` tensor or a WeightsDataset.

        A dataset is standardised block by block with its own mean/std, which the space keeps (so
        :meth:`encode_weights` takes raw rows). ``rows`` restricts the fit to a training split.
        ``method`` is ``"exact"``, ``"randomized"`` or ``"auto"`` (exact when the matrix is small or
        ``k`` is a large part of its rank); ``oversample``, ``power_iters`` and ``seed`` tune the
        randomized method; ``device`` is where its products run (``"cuda"`` on a GPU box).

        >>> space = PCASpace.fit(open_weights("data/dataset"), k=1000, rows=train_rows)   # doctest: +SKIP
        """
        src = _StdRows(data)
        idx = src.select(rows)
        n, d = idx.numel(), src.dim
        if not isinstance(k, int) or not 1 <= k <= min(n, d):
            raise W2WError(f"k={k} components asked of {n:,} rows x {d:,} dims, but PCA has at most "
                           f"min(N, D) = {min(n, d):,}: choose 1 <= k <= {min(n, d):,}.")
        if n < 2:
            raise W2WError(f"PCA needs at least 2 rows; got {n}.")
        if method == "auto":
            small = n * d <= _EXACT_MAX_ELEMENTS or (k + oversample) * 4 >= min(n, d)
            method = "exact" if small and n * d * 8 <= _EXACT_MAX_BYTES else "randomized"
        if method == "exact":
            out = _exact(src, idx, k, batch_size)
        elif method == "randomized":
            out = _randomized(src, idx, k, batch_size, oversample, power_iters, seed, torch.device(device), progress)
        else:
            raise W2WError(f"method must be 'auto', 'exact' or 'randomized', not {method!r}.")
        comps, sv, cmean, cstd, total = out
        comps, sign = _flip_signs(comps)
        space = cls(comps.cpu(), sv.cpu(), (cmean * sign).cpu(), cstd.cpu(), n_samples=n, total_variance=total,
                    method=method)
        space.set_standardisation(src.mean, src.std)
        logger.info("PCA (%s) of %d x %d: top %d explain %.1f%% of the variance", method, n, d, k,
                    100 * float(space.explained_variance_ratio.sum()))
        return space

    # ------------------------------------------------------------------ the interface
    @property
    def dim(self) -> int:
        return self.components.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.components.shape[1]

    @property
    def device(self) -> torch.device:
        return self.components.device

    @property
    def explained_variance(self) -> torch.Tensor:
        """Variance along each component, ``s**2 / (N - 1)``: ``[k]``."""
        return self.singular_values.double().square().div(self.n_samples - 1).float()

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        """Each component's share of the total variance over all D dimensions: ``[k]``."""
        return self.explained_variance / self.total_variance

    def to(self, device: str | torch.device) -> "PCASpace":
        """Move the components (in place) and return self."""
        for name in ("components", "singular_values", "coeff_mean", "coeff_std"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def encode(self, w_std: torch.Tensor) -> torch.Tensor:
        """Coefficients ``w_std @ V``: ``[N, D]`` -> ``[N, k]``."""
        return self._check_weights(w_std) @ self.components

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z @ V.T``: ``[N, k]`` -> ``[N, D]``."""
        return self._check_latent(z) @ self.components.T

    def sample(self, n: int, generator: torch.Generator | None = None, *, scale: float = 1.0) -> torch.Tensor:
        """``[n, k]`` coefficients, each from ``N(coeff_mean_i, (scale * coeff_std_i)**2)`` as w2w samples."""
        _check_sample_args(n, scale)
        dev = generator.device if generator is not None else self.device
        eps = torch.randn(n, self.latent_dim, generator=generator, device=dev).to(self.device)  # [n, k]
        return self.coeff_mean + scale * self.coeff_std * eps

    def truncated(self, k: int) -> "PCASpace":
        """The same space with only its first ``k`` components (for sweeps over the latent size)."""
        if not 1 <= k <= self.latent_dim:
            raise W2WError(f"truncated(k) needs 1 <= k <= {self.latent_dim}, not {k}.")
        out = PCASpace(self.components[:, :k].clone(), self.singular_values[:k].clone(), self.coeff_mean[:k].clone(),
                       self.coeff_std[:k].clone(), n_samples=self.n_samples, total_variance=self.total_variance,
                       method=self.method)
        out.set_standardisation(self.mean, self.std)
        return out

    # ------------------------------------------------------------------ saving
    def _state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {"dim": self.dim, "k": self.latent_dim, "n_samples": self.n_samples,
                  "total_variance": self.total_variance, "method": self.method}
        tensors = {"components": self.components, "singular_values": self.singular_values,
                   "coeff_mean": self.coeff_mean, "coeff_std": self.coeff_std}
        return config, tensors

    @classmethod
    def _from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "PCASpace":
        space = cls(tensors["components"], tensors["singular_values"], tensors["coeff_mean"], tensors["coeff_std"],
                    n_samples=config["n_samples"], total_variance=config["total_variance"], method=config["method"])
        if (space.dim, space.latent_dim) != (config["dim"], config["k"]):
            raise ValueError(f"components are {tuple(space.components.shape)}, config says "
                             f"({config['dim']}, {config['k']})")
        return space


# ---------------------------------------------------------------------- the two methods


def variance_shares(x: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Each top principal component's share of the total variance of rows ``x [N, D]`` (centred here): ``[k]``.

    Exact, and only the spectrum: the eigenvalues of the smaller Gram matrix (``N x N`` or ``D x D``) in
    float64, which costs a fraction of a full SVD (seconds for 4,096 x 5,376 on one CPU thread).

    >>> x = torch.randn(300, 20, generator=torch.Generator().manual_seed(0))
    >>> s = torch.linalg.svdvals(x - x.mean(0)) ** 2
    >>> bool(torch.allclose(variance_shares(x, 5), (s / s.sum())[:5].float(), atol=1e-6))
    True
    """
    x = torch.as_tensor(x)
    if x.ndim != 2 or len(x) < 2:
        raise W2WError(f"x must be [N, D] rows with N >= 2, not {tuple(x.shape)}")
    a = x.double() - x.double().mean(0)
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a                   # [min(N, D), min(N, D)]
    ev = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)                    # descending
    k = len(ev) if k is None else min(k, len(ev))
    return (ev[:k] / ev.sum()).float()


def _exact(src: _StdRows, idx: torch.Tensor, k: int, batch_size: int):
    a = torch.cat([b.double() for b in src.blocks(idx, batch_size)])          # [N, D] float64
    n = a.shape[0]
    u, s, vh = torch.linalg.svd(a, full_matrices=False)                       # u [N, r], s [r], vh [r, D]
    coeffs = u[:, :k] * s[:k]                                                  # [N, k] = a @ V
    return vh[:k].T, s[:k], coeffs.mean(0), coeffs.std(0), float(a.square().sum() / (n - 1))


def _randomized(src: _StdRows, idx: torch.Tensor, k: int, batch_size: int, oversample: int, power_iters: int,
                seed: int, device: torch.device, progress: bool):
    n, d = idx.numel(), src.dim
    l = min(k + max(oversample, 0), n, d)                                      # sketch width
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(d, l, generator=g).to(device)                              # [D, l] test matrix
    passes = 2 + max(power_iters, 0)
    bar = tqdm(total=passes * ((n + batch_size - 1) // batch_size), desc="randomized PCA", unit="block",
               disable=not progress)
    # Range finder on the row space: Q <- orth(A^T A Q), 1 + power_iters passes, re-orthonormalised each
    # time so the small singular directions survive float32 (Halko et al., alg. 4.4).
    for _ in range(passes - 1):
        acc = torch.zeros(d, l, device=device)                                 # [D, l]
        for blk in src.blocks(idx, batch_size):
            blk = blk.to(device)                                               # [b, D]
            acc += blk.T @ (blk @ q)
            bar.update()
        q = torch.linalg.qr(acc).Q                                             # [D, l]
    # Last pass: C = A Q [N, l] is never stored; its Gram matrix C^T C [l, l] is summed in float64 (as
    # accurate as a QR here, because C itself is float32), with the column sums of C and the total variance.
    gram = torch.zeros(l, l, dtype=torch.float64, device=device)
    csum = torch.zeros(l, dtype=torch.float64, device=device)
    total = 0.0
    for blk in src.blocks(idx, batch_size):
        blk = blk.to(device)
        c = (blk @ q).double()                                                 # [b, l]
        gram += c.T @ c
        csum += c.sum(0)
        total += float(blk.square().sum())                                    # float32 per block is plenty here
        bar.update()
    bar.close()
    evals, evecs = torch.linalg.eigh(gram)                                     # ascending
    s = evals.flip(0).clamp_min(0).sqrt()                                      # singular values of C (and A)
    wh = evecs.flip(1).T                                                       # C = (C W S^-1) S W^T
    w = wh[:k].T                                                               # [l, k]
    comps = q.double() @ w                                                     # [D, k] = V
    cmean = (csum / n) @ w                                                     # [k] mean of A V
    cvar = (s[:k].square() / n - cmean.square()) * n / (n - 1)                 # [k] from E[(AV)^2] = s^2 / N
    return comps.float(), s[:k], cmean, cvar.clamp_min(0).sqrt(), total / (n - 1)


def _flip_signs(comps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make each component's largest-magnitude entry positive, so fits are comparable (sklearn's svd_flip)."""
    comps = comps.float()
    pick = comps.abs().argmax(0)                                               # [k]
    sign = torch.sign(comps[pick, torch.arange(comps.shape[1])])
    sign[sign == 0] = 1
    return comps * sign, sign.to(torch.float64)
