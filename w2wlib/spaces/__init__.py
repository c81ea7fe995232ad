"""Weight spaces: maps between standardised identity-LoRA vectors ``[N, D]`` and latents ``[N, k]``.

- :class:`PCASpace`: the linear space of weights2weights (w2w), exact or streaming randomized SVD;
- :class:`VAESpace`: the non-linear space of w2w++, an MLP VAE (:class:`VAEConfig`, :class:`WeightVAE`),
  trained by :func:`w2wlib.train.train_vae`.

Both implement :class:`WeightSpace` (``encode``, ``decode``, ``sample``, ``interpolate``, ``save``/``load``)
and work in the standardised space of :mod:`w2wlib.data`: pass ``ds.standardise(w)``.

Example:
    >>> import torch
    >>> from w2wlib.spaces import PCASpace
    >>> x = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    >>> space = PCASpace.fit(x, k=3)
    >>> space.interpolate(space.encode(x[:1]), space.encode(x[1:2]), 5).shape
    torch.Size([5, 3])
"""

from .base import CONFIG_FILE, TENSORS_FILE, WeightSpace, active_units, load_space
from .pca import PCASpace, variance_shares
from .vae import SD15_DIM, VAEConfig, VAESpace, WeightVAE

__all__ = ["WeightSpace", "PCASpace", "VAESpace", "VAEConfig", "WeightVAE", "load_space", "active_units",
           "variance_shares", "SD15_DIM", "CONFIG_FILE", "TENSORS_FILE"]
