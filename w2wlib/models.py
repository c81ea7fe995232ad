"""The models a profile names, opened the same way in every world: its diffusers pipeline, its ID scorer,
and how images are drawn from them.

A chapter opens them in one call, whatever the world::

    M = open_models(P, steps=inference_steps, guidance=guidance)
    S, pipe, scorer = M.spaces, M.pipe, M.scorer
    images = generate(pipe, W, n_per_row=4, seed=0, **M.draw)

- **The pipeline**: the profile's ``base_model`` (a hub id, with ``base_revision``, or a folder holding a
  diffusers ``StableDiffusionPipeline``), or, where it is null, the world's own ``<world_dir>/pipeline``.
  ``sampler.scheduler`` names a diffusers scheduler class to swap in (null: the model's own).
- **The scorer**: ``scorer: encoder`` is the mini world's identity encoder (``<world_dir>/identity_encoder``:
  ``embed`` and an attribute head); ``scorer: facenet`` is :class:`w2wlib.facenet.FaceScorer` for real
  photos (``embed`` only; ``scorer_options`` are passed to :func:`~w2wlib.facenet.load_face_scorer`:
  ``align``, ``pretrained``, ``cache_dir``). Both score images against reference images.
- **Drawing**: ``M.draw`` holds the keyword arguments of :func:`w2wlib.generate.generate` that the
  profile and the dataset fix: the identity prompt (``sampler.prompt``, or the dataset's instance prompt),
  the negative prompt, the steps, the guidance and the dataset's LoRA layout on this pipeline.

This is world code: it is the one place that knows where a world keeps its models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactMissingError, W2WError
from .profile import Profile

__all__ = ["open_pipeline", "open_scorer", "open_models", "Models", "has_attributes"]


def _base_folder(profile: Profile) -> Path | None:
    """``base_model`` as a folder (absolute, or under the project root), or None for a hub id."""
    name = str(profile.get("base_model"))
    for candidate in (Path(name).expanduser(), profile.root / name):
        if candidate.is_dir():
            return candidate
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ArtifactMissingError(f"profile {profile.name!r} has base_model {name!r}: no such folder, and not a hub id "
                                   f"(owner/name); give a folder holding a diffusers pipeline or a hub id "
                                   f"(-p base_model runwayml/stable-diffusion-v1-5)")
    return None


def open_pipeline(profile: Profile):
    """The profile's ``StableDiffusionPipeline`` on its device and dtype, progress bars off, no safety checker."""
    if profile.get("base_model") is None:
        from .world.pipeline import load_pipeline

        pipe = load_pipeline(profile.path("world_dir") / "pipeline", device=profile.device, dtype=profile.dtype)
    else:
        from diffusers import StableDiffusionPipeline

        folder = _base_folder(profile)
        kw: dict[str, Any] = dict(dtype=profile.dtype, safety_checker=None, requires_safety_checker=False)
        try:
            if folder is not None:
                pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, **kw)
            else:
                pipe = StableDiffusionPipeline.from_pretrained(str(profile.get("base_model")),
                                                               revision=profile.get("base_revision"), **kw)
        except (OSError, ValueError) as err:
            raise ArtifactMissingError(
                f"could not load the base model {profile.get('base_model')!r} of profile {profile.name!r}: {err}. "
                f"It needs network access on first use (the hub caches it), or a folder holding a diffusers "
                f"StableDiffusionPipeline (-p base_model DIR)") from err
        pipe = pipe.to(profile.device)
    name = profile.get("sampler.scheduler")
    if name is not None:
        import diffusers

        cls = getattr(diffusers, str(name), None)
        if cls is None or not hasattr(cls, "from_config") or not str(name).endswith("Scheduler"):
            raise W2WError(f"profile {profile.name!r} has sampler.scheduler {name!r}, which is not a diffusers "
                           f"scheduler class; use e.g. DDIMScheduler, PNDMScheduler or null for the model's own")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def open_scorer(profile: Profile):
    """The profile's ID scorer: the mini world's identity encoder, or the FaceNet scorer for real photos."""
    if profile.get("scorer") == "encoder":
        from .world.encoder import load_encoder

        return load_encoder(profile.path("world_dir") / "identity_encoder", device=profile.device)
    from .facenet import load_face_scorer

    options = {k: v for k, v in dict(profile.get("scorer_options") or {}).items() if v is not None}
    unknown = set(options) - {"align", "pretrained", "cache_dir"}
    if unknown:
        raise W2WError(f"profile {profile.name!r}: scorer_options has {sorted(unknown)}; FaceNet takes align, "
                       f"pretrained and cache_dir")
    return load_face_scorer(profile.device, **options)


def has_attributes(scorer) -> bool:
    """Whether the scorer reads attributes from images (the mini world's encoder does; FaceNet does not)."""
    return callable(getattr(scorer, "predict_attributes", None))


@dataclass
class Models:
    """What a chapter draws and scores with: the spaces (or None), the pipeline, the scorer and ``draw``."""

    profile: Profile
    pipe: Any
    scorer: Any
    spaces: Any = None
    draw: dict = field(default_factory=dict)

    @property
    def dataset(self):
        return None if self.spaces is None else self.spaces.dataset


def open_models(profile: Profile, *, steps: int | None = None, guidance: float | None = None, spaces: bool = True,
                dataset=None, scorer: bool = True, pca_k: bool = True) -> Models:
    """Open the profile's spaces (with their dataset), pipeline and scorer, and the drawing settings.

    ``steps`` and ``guidance`` default to the profile's ``sampler``. ``spaces=False`` opens the dataset
    alone (``dataset=`` gives one already open); ``scorer=False`` skips the scorer. The PCA keeps the profile's
    ``pca_k`` components (w2w samples and edits with 1,000); ``pca_k=False`` keeps every stored one (w2w
    inverts with all 10,000).
    """
    from .sampling import instance_prompt

    S = None
    if spaces:
        from .spaces.shipped import open_spaces

        S = open_spaces(profile.path("spaces_dir"), profile.path("dataset_dir"), device=profile.device,
                        pca_k=profile.get("pca_k") if pca_k else None)
        dataset = S.dataset
    elif dataset is None:
        from .data import open_weights

        dataset = open_weights(profile.path("dataset_dir"))
    pipe = open_pipeline(profile)
    draw = dict(prompt=profile.get("sampler.prompt") or instance_prompt(dataset),
                negative_prompt=profile.get("sampler.negative_prompt") or "",
                steps=int(profile.get("sampler.steps") if steps is None else steps),
                guidance=profile.guidance if guidance is None else float(guidance),
                layout=dataset.lora_layout(pipe.unet))
    return Models(profile, pipe, open_scorer(profile) if scorer else None, S, draw)
