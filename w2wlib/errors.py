"""The one error family of w2wlib.

Every error a user can cause (bad input, a missing artifact, a wrong profile) is a ``W2WError``.
Its message says what was wrong and how to fix it.
"""

from __future__ import annotations

__all__ = ["W2WError", "ProfileError", "ArtifactMissingError", "NotebookError", "LayoutError"]


class W2WError(Exception):
    """Base class of every user-facing error raised by w2wlib."""


class ProfileError(W2WError):
    """A profile is unknown, malformed, or an override names a key it does not have."""


class ArtifactMissingError(W2WError, FileNotFoundError):
    """A shipped or built artifact is missing; the message names the command that builds it."""


class NotebookError(W2WError):
    """A notebook failed while being executed; the message names the notebook and the cell."""


class LayoutError(W2WError):
    """Weights do not match a LoRA layout (unknown, missing or mis-sized keys, wrong D)."""
