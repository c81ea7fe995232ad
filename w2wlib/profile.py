"""Profiles: the paths, sizes and notebook parameters of one world, as data.

A profile is a YAML file under ``w2wlib/profiles/`` (``smoke``, ``mini``, ``sd15``) or any path to a
YAML file of the same shape::

    description: one line
    settings:            # what the library uses; relative paths are under the project root
      data_dir: data
      device: auto       # auto | cpu | cuda | cuda:1 ...
      dtype: float32     # float32 | float16 | bfloat16 (the precision of frozen models on GPU)
      seed: 0
    notebooks:           # papermill parameters per notebook (its file stem), over the notebook's defaults
      mini_world: {n_identities: 4}

Profiles are data: code never branches on a profile's *name*, only on its values. Device and dtype
are chosen here, once, and handed down.

Example:
    >>> p = load_profile("smoke", {"seed": 3})
    >>> p.get("seed")
    3
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ProfileError

__all__ = ["Profile", "load_profile", "list_profiles", "project_root", "parse_value"]

_PROFILE_DIR = Path(__file__).parent / "profiles"
_DEVICES = "auto, cpu, cuda, cuda:<index> or mps"


def list_profiles() -> list[str]:
    """Names of the profiles shipped with w2wlib."""
    return sorted(p.stem for p in _PROFILE_DIR.glob("*.yaml"))


def project_root(start: Path | None = None) -> Path:
    """The project root that relative profile paths hang from.

    ``$W2W_ROOT`` if set; else the nearest folder at or above ``start`` (default: the current folder)
    that holds ``_toc.yml`` and ``w2wlib/``; else the folder above the installed package (a clone
    installed with ``pip install -e .``).
    """
    env = os.environ.get("W2W_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").is_file() and (folder / "w2wlib").is_dir():
            return folder
    return Path(__file__).resolve().parent.parent


def parse_value(text: str) -> Any:
    """Parse a command-line value as YAML, so ``8`` is an int, ``true`` a bool and ``a`` a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _check_type(key: str, old: Any, new: Any) -> Any:
    """An override must keep the type of the value it replaces (an int may stand for a float)."""
    if old is None or new is None or isinstance(new, type(old)):
        return new
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    if isinstance(old, str) and not isinstance(new, (dict, list)):
        return str(new)
    raise ProfileError(
        f"override {key}={new!r} has type {type(new).__name__}, but the profile's value {old!r} "
        f"is a {type(old).__name__}; pass a {type(old).__name__}"
    )


@dataclass(frozen=True)
class Profile:
    """One world's settings and notebook parameters, loaded from YAML (see the module docstring)."""

    name: str
    description: str
    settings: dict[str, Any]
    notebooks: dict[str, dict[str, Any]] = field(default_factory=dict)
    root: Path = field(default_factory=project_root)

    def get(self, key: str) -> Any:
        """A setting by dotted key, e.g. ``get("world.n_identities")``; unknown keys raise."""
        node: Any = self.settings
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ProfileError(
                    f"profile {self.name!r} has no setting {key!r}; it has: {', '.join(sorted(_flatten(self.settings)))}"
                )
            node = node[part]
        return node

    def path(self, key: str) -> Path:
        """A setting that names a path, resolved under the project root (``~`` is expanded)."""
        value = Path(str(self.get(key))).expanduser()
        return value if value.is_absolute() else self.root / value

    def notebook_parameters(self, stem: str) -> dict[str, Any]:
        """The papermill parameters this profile gives notebook ``stem`` (before command-line overrides)."""
        return {**self.notebooks.get("default", {}), **self.notebooks.get(stem, {})}

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "Profile":
        """A copy with dotted-key overrides applied; every key must already exist in ``settings``."""
        if not overrides:
            return self
        settings = copy.deepcopy(self.settings)
        for key, value in overrides.items():
            old = self.get(key)  # raises for an unknown key
            *parents, last = key.split(".")
            node = settings
            for part in parents:
                node = node[part]
            node[last] = _check_type(key, old, value)
        return Profile(self.name, self.description, settings, self.notebooks, self.root)

    # -- the one place where device and dtype are decided ------------------------------------------
    @property
    def device(self) -> "torch.device":  # noqa: F821
        """``settings.device``: ``auto`` picks CUDA when present, else the CPU."""
        import torch

        name = str(self.settings.get("device", "auto"))
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError) as err:
            raise ProfileError(f"profile {self.name!r} has device {name!r}, which is not a device; use one of "
                               f"{_DEVICES} (e.g. --device cpu or -p device cuda:1)") from err
        if device.type not in ("cpu", "cuda", "mps"):
            raise ProfileError(f"profile {self.name!r} has device {name!r}; w2wlib runs on {_DEVICES}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ProfileError(f"profile {self.name!r} asks for device {name!r} but no CUDA device is visible; use device=cpu or auto")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ProfileError(f"profile {self.name!r} asks for device {name!r} but only {torch.cuda.device_count()} "
                               f"CUDA device(s) are visible (cuda:0 ...); choose one of them")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ProfileError(f"profile {self.name!r} asks for device {name!r} but MPS is not available here; "
                               f"use device=cpu or auto")
        return device

    @property
    def dtype(self) -> "torch.dtype":  # noqa: F821
        """The dtype of frozen models: ``settings.dtype`` on GPU, always float32 on the CPU."""
        import torch

        name = str(self.settings.get("dtype", "float32"))
        if not hasattr(torch, name) or not isinstance(getattr(torch, name), torch.dtype):
            raise ProfileError(f"profile {self.name!r} has dtype {name!r}; use float32, float16 or bfloat16")
        return torch.float32 if self.device.type == "cpu" else getattr(torch, name)


def load_profile(name: str | os.PathLike = "mini", overrides: Mapping[str, Any] | None = None, *, root: Path | None = None) -> Profile:
    """Load a shipped profile by name, or a YAML file by path, and apply dotted-key overrides.

    Raises:
        ProfileError: the profile does not exist, is malformed, or an override names an unknown key.
    """
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = _PROFILE_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ProfileError(f"unknown profile {str(name)!r}; choose one of {', '.join(list_profiles())} or pass a path to a .yaml file")
    elif not path.is_file():
        raise ProfileError(f"profile file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"profile {path} is not valid YAML: {exc}") from exc
    unknown = set(data) - {"description", "settings", "notebooks"}
    if unknown or not isinstance(data.get("settings"), dict):
        raise ProfileError(f"profile {path} must have a 'settings' mapping and may have 'description' and 'notebooks'; found keys {sorted(data)}")
    profile = Profile(
        name=path.stem,
        description=str(data.get("description", "")),
        settings=data["settings"],
        notebooks={k: dict(v or {}) for k, v in (data.get("notebooks") or {}).items()},
        root=root or project_root(),
    )
    return profile.with_overrides(overrides)
