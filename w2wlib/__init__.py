"""w2wlib: the weight space of personalised diffusion models.

Identity LoRAs are flat vectors; ``w2wlib`` models them with the linear PCA space of weights2weights
(w2w) and the VAE of w2w++, and runs the executable book that compares the two.

Example:
    >>> import w2wlib
    >>> profile = w2wlib.load_profile("smoke")
    >>> profile.name
    'smoke'
"""

from ._version import __version__
from .errors import ArtifactMissingError, LayoutError, NotebookError, ProfileError, W2WError
from .profile import Profile, list_profiles, load_profile, project_root

__all__ = [
    "__version__",
    "W2WError",
    "ProfileError",
    "ArtifactMissingError",
    "NotebookError",
    "LayoutError",
    "Profile",
    "load_profile",
    "list_profiles",
    "project_root",
    "WeightSpace",
    "PCASpace",
    "VAESpace",
    "VAEConfig",
    "load_space",
    "TrainConfig",
    "train_vae",
]

# Imported on first use, so that `import w2wlib` (the CLI, profiles) does not import torch.
_LAZY = {"WeightSpace": "spaces", "PCASpace": "spaces", "VAESpace": "spaces", "VAEConfig": "spaces",
         "load_space": "spaces", "TrainConfig": "train", "train_vae": "train"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'w2wlib' has no attribute {name!r}")
