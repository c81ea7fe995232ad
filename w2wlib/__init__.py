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
]
