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

Every profile has the settings of :data:`DEFAULT_SETTINGS` (the world, the base model, the sampler, the
PCA size used, the ID scorer...): their defaults are the mini world's, and a profile's YAML overrides
them, keeping each default's type (a default of None takes any value). ``world`` says which world the
chapters run in; a chapter lists the worlds it supports (see :func:`w2wlib.book.chapter_worlds`).

Profiles are data: code never branches on a profile's *name*, only on its values. Device and dtype
are chosen here, once, and handed down.

Example:
    >>> p = load_profile("smoke", {"seed": 3})
    >>> p.get("seed")
    3
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ProfileError

__all__ = ["Profile", "load_profile", "list_profiles", "project_root", "parse_value", "DEFAULT_SETTINGS",
           "WORLDS"]

_PROFILE_DIR = Path(__file__).parent / "profiles"
_DEVICES = "auto, cpu, cuda, cuda:<index> or mps"

#: The worlds a profile can run the chapters in: the embedded mini world, and Stable Diffusion 1.5 with the
#: public weights2weights files.
WORLDS = ("mini", "sd15")
_SCORERS = ("encoder", "facenet")

#: Settings every profile has, with the mini world's values; a profile's YAML overrides them (nested
#: mappings key by key), so ``smoke`` and ``mini`` need not repeat them and ``sd15`` states its own.
DEFAULT_SETTINGS: dict[str, Any] = {
    "world": "mini",          # the world the chapters run in (one of WORLDS); chapters declare the worlds they support
    "base_model": None,       # the base diffusers pipeline: a hub id or a folder; None = the world's own, <world_dir>/pipeline
    "base_revision": None,    # the hub revision (commit, tag or branch) of base_model; None = its default branch
    "resolution": 64,         # side of generated images in pixels (the mini world renders 64 x 64)
    "sampler": {
        "scheduler": None,    # a diffusers scheduler class name; None = the base model's own scheduler_config
        "steps": 25,          # denoising steps of generated images
        "guidance": None,     # classifier-free guidance scale; None = the world's own (Profile.guidance)
        "prompt": None,       # the identity prompt; None = the dataset's instance prompt (its DreamBooth record)
        "negative_prompt": "",  # the prompt of the unconditional branch of guidance ("" = none)
    },
    "spaces_config": "mini",  # the SpacesConfig preset that builds this world's spaces (w2w spaces build --config)
    "pca_k": None,            # principal components used to sample and edit; None = every stored component
    "scorer": "encoder",      # the ID scorer: encoder (the mini world's identity encoder) or facenet (real photos)
    "scorer_options": {       # facenet only (w2wlib.models.open_scorer -> w2wlib.facenet.load_face_scorer):
        "align": True,        #   MTCNN crops, as w2w++ scored (false: the centre square of each image)
        "pretrained": True,   #   facenet-pytorch's published weights, downloaded on first use (false: random)
        "cache_dir": None,    #   where they are kept (None: w2wlib.facenet.weights.default_cache_dir())
    },
    "w2w_repo": None,         # the hub repo of the public weights2weights files (None: this world has none)
    "w2w_revision": None,     # its revision; None = the default branch
}


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


def _check_type(key: str, old: Any, new: Any, *, what: str = "override", against: str = "the profile's value") -> Any:
    """An override must keep the type of the value it replaces (an int may stand for a float)."""
    if old is None or new is None or isinstance(new, type(old)):
        return new
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    if isinstance(old, str) and not isinstance(new, (dict, list)):
        return str(new)
    raise ProfileError(
        f"{what} {key}={new!r} has type {type(new).__name__}, but {against} {old!r} "
        f"is a {type(old).__name__}; pass a {type(old).__name__}"
    )


def _with_defaults(defaults: Mapping[str, Any], given: Mapping[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """``given`` over ``defaults``: nested mappings merged key by key, each value keeping its default's type.

    A profile may add top-level settings of its own, but not new keys inside a default group (a typo there
    would otherwise be silently ignored).
    """
    out: dict[str, Any] = {}                      # the profile's own order first, then the defaults it left out
    for key, value in given.items():
        name, old = f"{prefix}{key}", defaults.get(key)
        if prefix and key not in defaults:
            raise ProfileError(f"{where}: {prefix.rstrip('.')} has no setting {key!r}; it has {', '.join(sorted(defaults))}")
        if isinstance(old, Mapping):
            if not isinstance(value, Mapping):
                raise ProfileError(f"{where}: setting {name} must be a mapping with keys {sorted(old)}, not {value!r}")
            out[key] = _with_defaults(old, value, where, name + ".")
        else:
            out[key] = _check_type(name, old, value, what=f"{where} sets", against="the default") if key in defaults else value
    out.update({k: copy.deepcopy(v) for k, v in defaults.items() if k not in out})
    return out


def _check_settings(name: str, settings: Mapping[str, Any]) -> None:
    """The values of the shared settings that no type check catches: world, scorer, sizes."""
    def bad(key: str, want: str) -> ProfileError:
        value = _flatten(settings).get(key)
        return ProfileError(f"profile {name!r} has {key}={value!r}; it must be {want}")

    if settings.get("world") not in WORLDS:
        raise bad("world", " or ".join(WORLDS))
    if settings.get("scorer") not in _SCORERS:
        raise bad("scorer", " or ".join(_SCORERS))
    res = settings.get("resolution")
    if isinstance(res, bool) or not isinstance(res, int) or res < 8 or res % 8:
        raise bad("resolution", "a positive multiple of 8 (the latent is 1/8 of the image side)")
    k = settings.get("pca_k")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise bad("pca_k", "an int >= 1, or null for every stored component")
    g = (settings.get("sampler") or {}).get("guidance")
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not g >= 0):
        raise bad("sampler.guidance", "a number >= 0 (1: no guidance), or null for the world's own")
    steps = (settings.get("sampler") or {}).get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise bad("sampler.steps", "an int >= 1")


@dataclass(frozen=True)
class Profile:
    """One world's settings and notebook parameters, loaded from YAML (see the module docstring)."""

    name: str
    description: str
    settings: dict[str, Any]
    notebooks: dict[str, dict[str, Any]] = field(default_factory=dict)
    root: Path = field(default_factory=project_root)
    ref: str = ""              # what load_profile was given: a shipped name, or a YAML file's absolute path

    @property
    def reference(self) -> str:
        """The argument that loads this profile again (for a notebook's ``profile`` parameter)."""
        return self.ref or self.name

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
        _check_settings(self.name, settings)
        return dataclasses.replace(self, settings=settings)

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
    def guidance(self) -> float:
        """``settings.sampler.guidance``; where it is null, the world's own
        (:func:`w2wlib.world.pipeline.world_guidance` of ``world_dir``)."""
        g = self.get("sampler.guidance")
        if g is not None:
            return float(g)
        from .world.pipeline import world_guidance

        return world_guidance(self.path("world_dir"))

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
    settings = _with_defaults(DEFAULT_SETTINGS, data["settings"], f"profile {path.name}")
    _check_settings(path.stem, settings)
    profile = Profile(
        name=path.stem,
        description=str(data.get("description", "")),
        settings=settings,
        notebooks={k: dict(v or {}) for k, v in (data.get("notebooks") or {}).items()},
        root=root or project_root(),
        ref=str(path.resolve()) if Path(name).suffix in (".yaml", ".yml") else str(name),
    )
    return profile.with_overrides(overrides)
