"""Scoring inversions as the w2w++ poster proposed: the ID score of the inverted model's images.

A method is scored on the images its model draws over several noise seeds, against **reference images**
of the person (for the mini world, evaluation renders the method never saw; for SD 1.5, other photos),
and, for comparison, against the input image itself. The references are arguments: nothing here knows
which world made them. :func:`single_image_dreambooth` is the unconstrained reference w2w compared
with: a DreamBooth-LoRA trained directly on the one input image, outside any space.

:func:`run_comparison` is the whole comparison of the chapter "Inversion" and ``benchmarks/p3_inversion.py``:
every method of :func:`~w2wlib.invert.comparison_methods` (and the amortised inverters where the spaces
ship them), the floors, the single-image DreamBooth and a DreamBooth ceiling on several views, scored alike.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import W2WError
from ..metrics import bootstrap_ci, identity_scores

__all__ = ["score_models", "summary_row", "single_image_dreambooth", "run_comparison", "Comparison", "merge_records",
           "target_checks"]


def score_models(pipe, encoder, W: torch.Tensor | None, references: np.ndarray, inputs: np.ndarray | None = None, *,
                 n_images: int = 4, n_refs: int = 4, **draw) -> dict[str, object]:
    """ID scores of the models in ``W [G, D]`` (``None``: the base model for every row).

    ``references``: uint8 ``[G * n_refs, H, W, 3]``, row-major by identity; ``inputs``: ``[G, H, W, 3]``;
    ``draw``: :func:`w2wlib.generate.generate`'s settings (``seed``, ``steps``, ``guidance``, ``prompt``, ``layout``...).
    Returns ``{"id": [G], "id_input": [G] or None, "images": uint8 [G * n_images, ...]}``.
    """
    from ..scoring import weights_scores

    G = len(references) // n_refs
    if G * n_refs != len(references) or (W is not None and len(W) != G):
        raise W2WError(f"{len(references)} references do not split into {n_refs} per identity for "
                       f"{'the base model' if W is None else f'{len(W)} models'}")
    ids, images = weights_scores(pipe, encoder, W, references, n_images=n_images, n_refs=n_refs, **draw)
    images = np.tile(images, (G, 1, 1, 1)) if W is None else images
    out: dict[str, object] = {"id": ids, "images": images}
    out["id_input"] = None if inputs is None else identity_scores(encoder, images, inputs, n_images, 1)
    return out


def summary_row(name: str, scores: dict, seconds_per_image: float | None = None, *, seed: int = 0) -> list:
    """One table row: name, mean ID with its bootstrap 95 % CI, ID against the input, seconds per image."""
    m, lo, hi = bootstrap_ci(scores["id"], seed=seed)
    inp = scores.get("id_input")
    return [name, m, f"[{lo:.3f}, {hi:.3f}]", "—" if inp is None else float(torch.as_tensor(inp).mean()),
            "—" if seconds_per_image is None else f"{seconds_per_image:.3g}"]


def single_image_dreambooth(pipe, images: torch.Tensor, *, steps: int, lr: float, keys: Sequence[int] | None = None,
                            cfg=None, progress: bool = False, prompt: str = "a photo of sks person") -> torch.Tensor:
    """A DreamBooth-LoRA per image ``[G, 3, H, W]`` (in [-1, 1]) trained on that image alone, no prior, with the
    instance ``prompt``: ``W [G, D]``."""
    from ..diffusion import training_scheduler
    from ..dreambooth import DreamBoothConfig, train_identities

    cfg = cfg or DreamBoothConfig(steps=steps, lr=lr, images_per_identity=1, prior_loss_weight=0.0, instance_prompt=prompt)
    keys = list(range(len(images))) if keys is None else list(keys)
    return train_identities(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, training_scheduler(pipe),
                            images[:, None], None, cfg, identity_keys=keys, progress=progress)


@dataclass
class Comparison:
    """The scored rows of :func:`run_comparison`: methods first, then floors and references, then the ceiling."""

    results: dict[str, Any]                  # method -> its Inversion of the G inputs
    spaces: dict[str, str]                   # method -> "pca" | "vae"
    scores: dict[str, dict]                  # row -> score_models' output (methods, floors, references)
    seconds: dict[str, float]                # row -> seconds per image (methods, the single-image DreamBooth)
    ceiling: dict | None                     # score_models on the first n_ceiling identities (None: no ceiling)
    n_ceiling: int
    ceiling_name: str
    score_kw: dict = field(default_factory=dict)   # how every row was scored (score_models' keywords)

    @property
    def best(self) -> str:
        """The method with the highest mean ID score against the evaluation views."""
        return max(self.results, key=lambda k: float(self.scores[k]["id"].mean()))

    def best_over_ceiling(self) -> float:
        """The best method's mean ID over the ceiling's, on the ceiling's identities."""
        return float(self.scores[self.best]["id"][:self.n_ceiling].mean() / self.ceiling["id"].mean())

    def rows(self, record: dict | None = None) -> list[list]:
        """:func:`summary_row` of every row, the ceiling last; with ``record`` (a :meth:`record` of another run,
        e.g. ``benchmarks/p3_inversion.json``) a last cell holds its mean ID for the same row ("—" if absent)."""
        rows = [summary_row(name, s, self.seconds.get(name)) for name, s in self.scores.items()]
        rows += [summary_row(self.ceiling_name, self.ceiling)] if self.ceiling is not None else []
        if record is None:
            return rows
        ids = {_row_key(m["name"]): m["id_mean"] for m in record["methods"]}
        ids.update({_row_key(name): r["id_mean"] for name, r in record["references"].items()})
        return [[*r, ids.get(_row_key(r[0]), "—")] for r in rows]

    def record(self, keys: Sequence[int]) -> dict:
        """The JSON record of ``benchmarks/p3_inversion.py`` (read by the chapter "Inversion")."""
        refs = {k: v for k, v in self.scores.items() if k not in self.results}
        refs.update({self.ceiling_name: self.ceiling} if self.ceiling is not None else {})
        return {"n": len(keys), "identity_seeds": [int(k) for k in keys],
                "methods": [{"name": n, "space": self.spaces[n], "config": r.config,
                             "seconds_per_image": self.seconds[n], "id_mean": float(self.scores[n]["id"].mean()),
                             "id": self.scores[n]["id"].tolist(),
                             "id_input_mean": float(self.scores[n]["id_input"].mean())}
                            for n, r in self.results.items()],
                "references": {k: {"id_mean": float(v["id"].mean()), "id": v["id"].tolist()} for k, v in refs.items()},
                "best": self.best, "best_over_ceiling": self.best_over_ceiling() if self.ceiling is not None else None}


def merge_records(records: Sequence[dict]) -> dict:
    """One record of :meth:`Comparison.record` from the records of disjoint identity shards, in order.

    Per-identity scores are concatenated and every mean is recomputed over them; seconds per image are averaged
    over shards weighted by their identities (each shard inverts its identities in one batch). A reference that
    only some shards scored (the ceiling, run on the first identities) keeps its own identities. The best
    method and its ratio to the ceiling are recomputed on the merged scores.

    >>> rec = merge_records([json.load(open(f)) for f in sorted(Path("shards").glob("*.json"))])  # doctest: +SKIP
    """
    if not records:
        raise W2WError("no shard records to merge: run benchmarks/p3_inversion.py to write one")
    names = [m["name"] for m in records[0]["methods"]]
    for r in records[1:]:
        if [m["name"] for m in r["methods"]] != names:
            raise W2WError(f"shard records ran different methods ({[m['name'] for m in r['methods']]} against "
                           f"{names}): re-run the odd shard with the same script version")
    seeds = [k for r in records for k in r["identity_seeds"]]
    if len(set(seeds)) != len(seeds):
        raise W2WError("shard records overlap: an identity appears in two shards")
    n = [r["n"] for r in records]
    methods = []
    for i, name in enumerate(names):
        ms = [r["methods"][i] for r in records]
        ids = [x for m in ms for x in m["id"]]
        methods.append({**ms[0], "id": ids, "id_mean": float(np.mean(ids)),
                        "seconds_per_image": float(np.average([m["seconds_per_image"] for m in ms], weights=n)),
                        "id_input_mean": float(np.average([m["id_input_mean"] for m in ms], weights=n))})
    refs: dict[str, dict] = {}
    for r in records:
        for k, v in r["references"].items():
            key = _row_key(k)
            have = refs.setdefault(key, {"name": k, "id": []})
            have["id"] += v["id"]
    references = {}
    for key, v in refs.items():
        name = v["name"]
        if name.startswith("ceiling:"):
            name = re.sub(r"\(\d+ identities\)$", f"({len(v['id'])} identities)", name)
        references[name] = {"id_mean": float(np.mean(v["id"])), "id": v["id"]}
    best = max(methods, key=lambda m: m["id_mean"])
    ceiling = next((v for k, v in references.items() if k.startswith("ceiling:")), None)
    ratio = None if ceiling is None else float(np.mean(best["id"][:len(ceiling["id"])]) / ceiling["id_mean"])
    extra = {k: v for k, v in records[0].items() if k not in ("n", "identity_seeds", "methods", "references", "best",
                                                               "best_over_ceiling", "dataset", "machine", "torch")}
    return {**extra, "n": len(seeds), "identity_seeds": seeds, "methods": methods, "references": references,
            "best": best["name"], "best_over_ceiling": ratio, "shards": len(records)}


BASELINE = "PCA, gradient (w2w's recipe)"     # issue 13's baseline: w2w's inversion, as its inversion.py


def target_checks(record: dict) -> list[list]:
    """Issue 13's targets, read off a :meth:`Comparison.record` (or a :func:`merge_records`): rows of
    ``[target, measured, met]`` with ``met`` "yes" or "no".

    1. A VAE inversion (gradient or CMA-ES; not w2w++'s recipe, not amortised) at least matches the PCA
       baseline's ID at no more than 1/5 of its time: the VAE method nearest to meeting both is reported.
    2. Each space's amortised inverter is at least 100x faster than that space's gradient method at >= 90 %
       of its ID (alone, and followed by its few gradient steps).
    3. The best method reaches >= 0.8 of the 8-view DreamBooth ceiling on the ceiling's identities.

    >>> rows = target_checks(json.load(open("benchmarks/p3_inversion.json")))      # doctest: +SKIP
    """
    m = {x["name"]: x for x in record["methods"]}
    if BASELINE not in m:
        raise W2WError(f"the record has no {BASELINE!r} row, the baseline of the targets; it has {sorted(m)}")
    base = m[BASELINE]
    rows = []
    vae = [x for n, x in m.items() if x["space"] == "vae" and "amortised" not in n and "w2w++" not in n]
    if vae:
        def ok(x):
            return x["id_mean"] >= base["id_mean"], x["seconds_per_image"] <= base["seconds_per_image"] / 5
        pick = max(vae, key=lambda x: (sum(ok(x)), x["id_mean"]))
        rows.append(["VAE inversion ≥ the PCA baseline's ID at ≤ 1/5 of its time",
                     f"{pick['name']}: ID {pick['id_mean']:.3f} against {base['id_mean']:.3f}, "
                     f"{pick['seconds_per_image']:.2f} s against {base['seconds_per_image']:.2f} s "
                     f"({pick['seconds_per_image'] / base['seconds_per_image']:.2f}×)", "yes" if all(ok(pick)) else "no"])
    for space in ("PCA", "VAE"):
        grad = m.get(f"{space}, gradient (ours)")
        for name, x in m.items():
            if grad is None or not name.startswith(f"{space}, amortised"):
                continue
            speed, share = grad["seconds_per_image"] / max(x["seconds_per_image"], 1e-9), x["id_mean"] / grad["id_mean"]
            rows.append([f"{name}: ≥ 100× faster than {space}'s gradient at ≥ 90 % of its ID",
                         f"{speed:,.0f}× faster, {share:.0%} of the ID ({x['id_mean']:.3f} against {grad['id_mean']:.3f})",
                         "yes" if speed >= 100 and share >= 0.9 else "no"])
    ratio = record.get("best_over_ceiling")
    if ratio is not None:
        rows.append(["the best method ≥ 0.8 of the 8-view DreamBooth ceiling",
                     f"{record['best']}: {ratio:.2f} of the ceiling", "yes" if ratio >= 0.8 else "no"])
    return rows


def _row_key(name: str) -> str:
    """A row's name without the parts that differ between runs: "(unconstrained)", "(16 identities)"."""
    return re.sub(r" \((unconstrained|\d+ identities)\)$", "", name)


def run_comparison(pipe, encoder, spaces, inputs: np.ndarray, masks: np.ndarray | None, references: np.ndarray,
                   keys: Sequence[int], *, steps: int = 150, w2w_steps: int = 400, generations: int = 60,
                   snapshots: int = 0, amortised_steps: int = 20, n_ceiling: int = 16, ceiling_steps: int = 600,
                   n_images: int = 4, inference_steps: int = 25, guidance: float = 4.0, seed: int = 0,
                   layout=None, prompt: str = "a photo of sks person", negative_prompt: str = "") -> Comparison:
    """Invert ``inputs`` (uint8 ``[G, H, W, 3]``, face ``masks [G, H, W]`` or None) by every method and score all alike.

    ``spaces``: the shipped :class:`~w2wlib.spaces.shipped.Spaces`; ``keys``: the identities' seeds (random
    streams, and the views of the ceiling's DreamBooth, :func:`w2wlib.dataset_build.fine_tune`);
    ``references``: ``[G * n_refs, H, W, 3]`` views no method sees. Methods: :func:`~w2wlib.invert.comparison_methods`
    at ``steps`` / ``w2w_steps`` / ``generations``, and each shipped amortised inverter, alone and followed by
    ``amortised_steps`` gradient steps. Floors: the base model, another identity's inversion (the best method's,
    rolled by one). References: a DreamBooth-LoRA on the one input with ``steps`` steps, and on the first
    ``n_ceiling`` identities (0: none) one on their training views for ``ceiling_steps``, without prior.
    ``snapshots``: latents kept along each search (for ID-against-step figures). ``prompt``: the one the space's
    LoRAs were trained with (every inversion and DreamBooth trains with it, and every score draws with it, with
    ``negative_prompt`` on guidance's other branch). The ceiling renders mini-world views: other worlds pass 0.

    >>> cmp = run_comparison(pipe, enc, S, inputs, masks, refs, seeds, steps=3, n_ceiling=1)   # doctest: +SKIP
    >>> print(markdown_table(["method", "ID", "95 % CI", "ID (input)", "s / image"], cmp.rows()))  # doctest: +SKIP
    """
    from ..dataset_build import DatasetConfig, fine_tune
    from ..viz import to_tensor
    from . import InversionConfig, comparison_methods, invert
    from .amortised import invert_amortised

    x, m = to_tensor(inputs), None if masks is None else torch.as_tensor(masks)
    keys = [int(k) for k in keys]
    score = dict(n_images=n_images, n_refs=len(references) // len(inputs), seed=seed, steps=inference_steps,
                 guidance=guidance, prompt=prompt, negative_prompt=negative_prompt)
    results, where = {}, {}
    for name, (space, cfg) in comparison_methods(spaces.vae.latent_dim, steps=steps, w2w_steps=w2w_steps,
                                                 generations=generations, snapshots=snapshots).items():
        cfg = dataclasses.replace(cfg, prompt=prompt)
        results[name] = invert(pipe, spaces.space(space), x, cfg=cfg, masks=m, keys=keys, layout=layout, progress=False)
        where[name] = space
    amortised = spaces.folder / "amortised"
    for space in ("pca", "vae") if amortised.is_dir() else ():
        net = spaces.amortised(space)
        for s in (0, amortised_steps):
            results[f"{space.upper()}, amortised" + (f" + {s} steps" if s else "")] = invert_amortised(
                pipe, spaces.space(space), net, x, steps=s, cfg=InversionConfig(prompt=prompt), masks=m, keys=keys,
                layout=layout, progress=False)
        where[f"{space.upper()}, amortised"] = where[f"{space.upper()}, amortised + {amortised_steps} steps"] = space
    scores = {name: score_models(pipe, encoder, r.W, references, inputs, layout=layout, **score)
              for name, r in results.items()}
    seconds = {name: r.seconds_per_image for name, r in results.items()}
    best = max(scores, key=lambda k: float(scores[k]["id"].mean()))
    scores["floor: base model"] = score_models(pipe, encoder, None, references, inputs, **score)
    scores["floor: another identity's inversion"] = score_models(pipe, encoder, results[best].W.roll(1, 0), references,
                                                                 inputs, layout=layout, **score)
    t0 = time.perf_counter()
    W_single = single_image_dreambooth(pipe, x, steps=steps, lr=2e-3, keys=keys, prompt=prompt)
    name = "DreamBooth on the one input (unconstrained)"
    seconds[name] = (time.perf_counter() - t0) / len(keys)
    scores[name] = score_models(pipe, encoder, W_single, references, inputs, **score)
    recipe = DatasetConfig.preset("mini")
    n_c, ceiling, views = min(n_ceiling, len(keys)), None, recipe.dreambooth_config().images_per_identity
    if n_c:
        W_c = fine_tune(pipe, keys[:n_c], recipe, None, steps=ceiling_steps, prior_loss_weight=0.0, progress=False)
        ceiling = score_models(pipe, encoder, W_c, references[:n_c * score["n_refs"]], inputs[:n_c], **score)
    return Comparison(results, where, scores, seconds, ceiling, n_c,
                      f"ceiling: DreamBooth on {views} views ({n_c} identities)", score_kw=score)
