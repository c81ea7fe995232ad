"""The ``w2w`` command: thin argument parsing over the library.

    w2w book [--profile P] [--only NAME ...] [-p KEY VALUE ...]   run every notebook, build the HTML book
    w2w run NOTEBOOK [--profile P] [-p KEY VALUE ...] [-o OUT]    run one notebook in batch
    w2w world build [--config mini|micro] [--out DIR]            build the mini world (resumable)
    w2w world check [--out DIR]                                   its quality gates, as JSON; its files against the manifest
    w2w dataset build [--config mini|micro] [--out DIR] [--world DIR]  train the identity LoRAs (resumable;
                                                                  under `accelerate launch` shards split across processes)
    w2w spaces build [--config mini|micro|sd15] [--out DIR] [--dataset DIR]  fit the PCA, train the VAE (resumable)
    w2w verify [DIR ...]                                          every artifact folder's files against its manifest
                                                                  (default: the profile's data_dir); status 1 if any differs
    w2w invert IMAGE... [--space pca|vae] [--method gradient|cmaes|amortised] [--out DIR]  one model folder per image
    w2w sample --space pca|vae -n N --out DIR                    N sampled models, one folder each
    w2w edit --space pca|vae --attribute NAME --strength S (--row I | --lora FILE) --out DIR  an edited model
    w2w export (--row I | --latent FILE) [--space pca|vae] --format diffusers|peft|w2w --out DIR  model files
    w2w profiles                                                  list profiles and their settings
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import W2WError

__all__ = ["main"]


def _pairs(values: list[list[str]] | None) -> dict:
    from .profile import parse_value

    return {key: parse_value(value) for key, value in (values or [])}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="mini", help="profile name (smoke, mini, sd15) or path to a YAML file (default: mini)")
    p.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="a notebook parameter, or a dotted profile setting, parsed as YAML; repeatable")


def _cmd_book(args: argparse.Namespace) -> int:
    from .book import build_book
    from .profile import load_profile

    index = build_book(load_profile(args.profile), only=args.only, cli=_pairs(args.parameter),
                       out=Path(args.out) if args.out else None)
    print(f"book built: {index}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .book import run_notebook
    from .profile import load_profile

    profile = load_profile(args.profile)
    nb = Path(args.notebook)
    out = Path(args.output) if args.output else profile.root / "_build" / "runs" / profile.name / nb.name
    run = run_notebook(nb, out, profile, _pairs(args.parameter))
    print(f"{nb} ran in {run.seconds:.1f} s under profile {profile.name}; executed copy: {out}")
    return 0


def _cmd_profiles(args: argparse.Namespace) -> int:
    import yaml

    from .profile import list_profiles, load_profile

    for name in list_profiles():
        prof = load_profile(name)
        print(f"{name}: {prof.description}")
        print("  " + yaml.safe_dump(prof.settings, sort_keys=False).replace("\n", "\n  ").rstrip())
    return 0


def _cmd_world(args: argparse.Namespace) -> int:
    import json

    from .profile import load_profile
    from .stages import portable_path
    from .world import build as B

    profile = load_profile(args.profile, {"device": args.device} if args.device else None)
    out = Path(args.out) if args.out else profile.path("world_dir")
    if args.action == "build":
        cfg = B.WorldConfig.preset(args.config)
        command = (f"w2w world build --config {args.config} --out {portable_path(out)}"
                   + (f" --device {args.device}" if args.device else ""))
        manifest = B.build_world(out, cfg, device=profile.device, command=command,
                                 stages=tuple(args.stage) if args.stage else B.STAGES)
        print(json.dumps(manifest["quality"], indent=1))
        print(f"world built in {out}")
    else:
        from .stages import verify_folder
        from .world.check import quality_gates

        print(json.dumps(quality_gates(out, device=profile.device), indent=1))
        report = verify_folder(out)
        if not report.ok:
            print(report, file=sys.stderr)
            return 1
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .profile import load_profile
    from .stages import artifact_folders, portable_path, verify_folder

    dirs = [Path(d) for d in args.dirs] or [Path(portable_path(load_profile(args.profile).path("data_dir")))]
    listed = [artifact_folders(d) for d in dirs]           # every DIR checked before any file is hashed
    ok = True
    for found, without in listed:
        for folder in found:
            report = verify_folder(folder)
            print(report)
            ok &= report.ok
        for folder in without:
            print(f"{folder}: no manifest.json, not checked (not a built artifact, or its build has not finished)")
    return 0 if ok else 1


def _builder_paths(args: argparse.Namespace, out_key: str, input_flag: str, input_key: str):
    """(profile, out, input folder, the exact command) of a `w2w dataset|spaces build` call."""
    from .profile import load_profile
    from .stages import portable_path

    profile = load_profile(args.profile, {"device": args.device} if args.device else None)
    if args.config is None:                    # spaces: the preset the profile names (mini, sd15...)
        args.config = profile.get("spaces_config")
    out = Path(args.out) if args.out else profile.path(out_key)
    given = getattr(args, input_flag)
    source = Path(given) if given else profile.path(input_key)
    command = (f"w2w {args.command} build --config {args.config} --out {portable_path(out)} "
               f"--{input_flag} {portable_path(source)}"
               + (f" --device {args.device}" if args.device else ""))
    return profile, out, source, command


def _cmd_dataset(args: argparse.Namespace) -> int:
    import json

    from .dataset_build import DatasetConfig, build_dataset

    profile, out, world, command = _builder_paths(args, "dataset_dir", "world", "world_dir")
    manifest = build_dataset(out, DatasetConfig.preset(args.config), world, device=profile.device, command=command)
    if manifest:
        print(json.dumps(manifest["oracle"], indent=1))
        print(f"dataset built in {out}")
    return 0


def _cmd_spaces(args: argparse.Namespace) -> int:
    import json

    from .spaces.build import SpacesConfig, build_spaces

    profile, out, dataset, command = _builder_paths(args, "spaces_dir", "dataset", "dataset_dir")
    manifest = build_spaces(out, SpacesConfig.preset(args.config), dataset, device=profile.device, command=command)
    print(json.dumps(manifest["results"], indent=1))
    print(f"spaces built in {out}")
    return 0


def _cmd_invert(args: argparse.Namespace) -> int:
    import dataclasses

    from .invert import InversionConfig
    from .invert.files import invert_files
    from .models import open_models
    from .profile import load_profile

    profile = load_profile(args.profile, {"device": args.device} if args.device else None)
    over = {k: v for k, v in (("steps", args.steps), ("k", args.k), ("lr", args.lr), ("seed", args.seed)) if v is not None}
    amortised_steps = None
    if args.method == "amortised":
        if args.recipe or args.k is not None:
            raise W2WError("--method amortised takes neither --recipe nor --k: the inverter predicts the k dimensions "
                           "it was trained for (drop them, or use --method gradient)")
        amortised_steps = over.pop("steps", 0)
        cfg = InversionConfig(**over)
    else:
        cfg = InversionConfig.w2w(**over) if args.recipe == "w2w" else InversionConfig(method=args.method, **over)
    M = open_models(profile, scorer=False, pca_k=False)     # w2w inverts with every stored component
    cfg = dataclasses.replace(cfg, prompt=M.draw["prompt"])  # the prompt the space's LoRAs were trained with
    for folder in invert_files(args.images, args.out, pipe=M.pipe, spaces=M.spaces, space=args.space, cfg=cfg,
                               amortised_steps=amortised_steps, amortised_scale=args.scale, n_preview=args.preview,
                               overwrite=args.overwrite, draw=_preview_draw(M)):
        print(folder)
    return 0


def _preview_draw(M) -> dict:
    """The profile's drawing settings for a command's previews (the layout is each command's own)."""
    return {k: v for k, v in M.draw.items() if k != "layout"}


def _model_context(args: argparse.Namespace, pca_k: bool = True):
    """(pipeline, spaces, drawing settings) of the profile, for the commands that make models (sample, edit,
    export); the PCA keeps the profile's ``pca_k`` components (``pca_k=False``: all, so that a latent of any
    size decodes)."""
    from .models import open_models
    from .profile import load_profile

    profile = load_profile(args.profile, {"device": args.device} if args.device else None)
    M = open_models(profile, scorer=False, pca_k=pca_k)
    return M.pipe, M.spaces, _preview_draw(M)


def _cmd_sample(args: argparse.Namespace) -> int:
    from .sampling import check_count, sample_to_folders

    check_count(args.n)                                # before loading anything
    check_count(args.preview, "--preview", "a number of images")
    pipe, spaces, draw = _model_context(args)
    for folder in sample_to_folders(args.out, pipe=pipe, spaces=spaces, space=args.space, n=args.n, seed=args.seed,
                                    scale=args.scale, n_preview=args.preview, overwrite=args.overwrite, draw=draw):
        print(folder)
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    from .edit import SWITCH_T, check_edit_args, edit_to_folder

    check_edit_args(args.strength, args.row, args.lora, args.preview)   # before loading anything
    pipe, spaces, draw = _model_context(args)
    debias = "correlated" if args.debias is None else [] if args.debias == ["none"] else args.debias
    print(edit_to_folder(args.out, pipe=pipe, spaces=spaces, space=args.space, attribute=args.attribute,
                         strength=args.strength, row=args.row, lora=args.lora, debias=debias,
                         switch_t=SWITCH_T if args.switch_t is None else args.switch_t, n_preview=args.preview,
                         seed=args.seed, overwrite=args.overwrite, draw=draw))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .sampling import check_count, check_formats, export_to_folder

    if (args.row is None) == (args.latent is None):   # checked before loading anything
        raise W2WError("give exactly one of --row I (a dataset row) or --latent FILE (a latent.safetensors)")
    formats = check_formats(args.format or ["diffusers", "peft"])
    check_count(args.preview, "--preview", "a number of images")
    pipe, spaces, draw = _model_context(args, pca_k=False)
    print(export_to_folder(args.out, pipe=pipe, spaces=spaces, row=args.row, latent=args.latent, space=args.space,
                           formats=formats, n_preview=args.preview, seed=args.seed,
                           overwrite=args.overwrite, draw=draw))
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Options every model-making command shares."""
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preview", type=int, default=4, help="images in each preview.png (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="root seed of the noise (and of sampling)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument("--profile", default="mini")
    p.add_argument("--device", help="override the profile's device (cpu, cuda)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="w2w", description="w2w-book: weight spaces of personalised diffusion models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("book", help="run every notebook in _toc.yml with papermill, then build the HTML book")
    _add_common(p)
    p.add_argument("--only", action="append", metavar="NAME", help="execute only this notebook (file stem); repeatable")
    p.add_argument("--out", help="build folder (default: _build)")
    p.set_defaults(func=_cmd_book)

    p = sub.add_parser("run", help="run one notebook in batch with papermill")
    p.add_argument("notebook")
    _add_common(p)
    p.add_argument("-o", "--output", help="executed copy (default: _build/runs/PROFILE/NAME.ipynb)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("world", help="build or check the mini world (pipeline, identity encoder)")
    p.add_argument("action", choices=["build", "check"])
    p.add_argument("--config", default="mini", choices=["mini", "micro"], help="world size (micro: a tiny world for tests)")
    p.add_argument("--out", help="output folder (default: the profile's world_dir)")
    p.add_argument("--profile", default="mini")
    p.add_argument("--device", help="override the profile's device (cpu, cuda)")
    p.add_argument("--stage", action="append", help="run only this stage (repeatable); finished stages are cached anyway")
    p.set_defaults(func=_cmd_world)

    p = sub.add_parser("verify", help="check every artifact folder's files against the sha256s in its manifest")
    p.add_argument("dirs", nargs="*", metavar="DIR", help="an artifact folder (with manifest.json) or a folder of "
                   "them, searched two levels down (default: the profile's data_dir)")
    p.add_argument("--profile", default="mini")
    p.set_defaults(func=_cmd_verify)

    for name, what, source, func in (
            ("dataset", "build the weights dataset: one DreamBooth-LoRA per identity of the mini world",
             ("world", "the mini world to train on", "world_dir"), _cmd_dataset),
            ("spaces", "fit the PCA (w2w) and train the VAE (w2w++) of a weights dataset",
             ("dataset", "the weights dataset", "dataset_dir"), _cmd_spaces)):
        p = sub.add_parser(name, help=what)
        p.add_argument("action", choices=["build"])
        configs = ["mini", "micro", "sd15"] if name == "spaces" else ["mini", "micro"]
        p.add_argument("--config", default=None if name == "spaces" else "mini", choices=configs,
                       help="sizes (micro: tiny, for tests" + ("; sd15: the public w2w files on a GPU; default: the "
                                                               "profile's spaces_config)" if name == "spaces" else ")"))
        p.add_argument("--out", help=f"output folder (default: the profile's {name}_dir)")
        p.add_argument(f"--{source[0]}", help=f"{source[1]} (default: the profile's {source[2]})")
        p.add_argument("--profile", default="mini")
        p.add_argument("--device", help="override the profile's device (cpu, cuda)")
        p.set_defaults(func=func)

    p = sub.add_parser("invert", help="invert image files into a weight space: one LoRA folder per image")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="square PNG/JPEG face images (resized to the model's size)")
    p.add_argument("--space", default="vae", choices=["pca", "vae"], help="weight space to invert into (default: vae)")
    p.add_argument("--method", default="gradient", choices=["gradient", "cmaes", "amortised"],
                   help="search (default: gradient); amortised: the space's shipped inverter, one forward pass")
    p.add_argument("--recipe", choices=["w2w"], help="w2w's own settings (raw PCA coefficients, Adam lr 0.1, 400 steps)")
    p.add_argument("--steps", type=int, help="optimiser steps or CMA-ES generations; amortised: gradient steps after "
                                             "its answer (default 0)")
    p.add_argument("--k", type=int, help="search the first k latent dimensions (PCA: top-k components)")
    p.add_argument("--scale", type=float, default=1.0, help="amortised: scale its answer away from the mean identity "
                                                            "(benchmarks/amortised_scale.md chose 2.5; default 1)")
    p.add_argument("--lr", type=float, help="Adam learning rate (gradient)")
    p.add_argument("--seed", type=int, help="root seed of the noise draws")
    p.add_argument("--preview", type=int, default=4, help="images of each inverted model in its preview.png")
    p.add_argument("--out", default="inverted", help="output folder (default: ./inverted)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument("--profile", default="mini")
    p.add_argument("--device", help="override the profile's device (cpu, cuda)")
    p.set_defaults(func=_cmd_invert)

    p = sub.add_parser("sample", help="sample models from a weight space: one LoRA folder each")
    p.add_argument("--space", default="vae", choices=["pca", "vae"], help="PCA: per-coefficient Gaussians (w2w); "
                   "VAE: its prior N(0, I) (default: vae)")
    p.add_argument("-n", type=int, default=4, help="how many models (default: 4)")
    p.add_argument("--scale", type=float, default=1.0, help="spread of the prior (< 1 stays nearer its centre)")
    _add_model_options(p)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("edit", help="edit a model along an attribute direction (w2w's least squares, debiased)")
    p.add_argument("--space", default="pca", choices=["pca", "vae"], help="space of the direction (default: pca)")
    p.add_argument("--attribute", required=True, help="attribute label to add (+) or remove (-), e.g. Male, Beard")
    p.add_argument("--strength", type=float, required=True, help="dataset standard deviations along the direction")
    p.add_argument("--row", type=int, help="edit this dataset row")
    p.add_argument("--lora", help="or edit this LoRA file or folder (diffusers or peft; a w2w model folder)")
    p.add_argument("--debias", action="append", metavar="NAME", help="attribute to project out (repeatable; "
                   "default: those correlated with --attribute; 'none' for w2w's raw direction)")
    p.add_argument("--switch-t", type=int, help="timestep from which the edited weights draw the preview "
                   "(w2w's start_noise; default: w2wlib.edit.SWITCH_T)")
    _add_model_options(p)
    p.set_defaults(func=_cmd_edit)

    p = sub.add_parser("export", help="write a dataset row or a saved latent as diffusers, peft or w2w files")
    p.add_argument("--row", type=int, help="a row of the weights dataset")
    p.add_argument("--latent", help="or a latent.safetensors written by w2w sample/edit/invert (or its folder)")
    p.add_argument("--space", choices=["pca", "vae"], help="the latent's space (read from the file when it says)")
    p.add_argument("--format", action="append", metavar="diffusers|peft|w2w",
                   help="repeatable (default: diffusers and peft); w2w writes w2wmodel.pt, the PCA coefficients")
    _add_model_options(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("profiles", help="list the shipped profiles and their settings")
    p.set_defaults(func=_cmd_profiles)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except W2WError as exc:
        print(f"w2w: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
