"""The ``w2w`` command: thin argument parsing over the library.

    w2w book [--profile P] [--only NAME ...] [-p KEY VALUE ...]   run every notebook, build the HTML book
    w2w run NOTEBOOK [--profile P] [-p KEY VALUE ...] [-o OUT]    run one notebook in batch
    w2w world build [--config mini|micro] [--out DIR]            build the mini world (resumable)
    w2w world check [--out DIR]                                   its quality gates, as JSON
    w2w dataset build [--config mini|micro] [--out DIR] [--world DIR]  train the identity LoRAs (resumable;
                                                                  under `accelerate launch` shards split across processes)
    w2w spaces build [--config mini|micro] [--out DIR] [--dataset DIR]  fit the PCA, train the VAE (resumable)
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
        from .stages import verify_manifest
        from .world.check import quality_gates

        print(json.dumps(quality_gates(out, device=profile.device), indent=1))
        bad = verify_manifest(out) if (out / "manifest.json").is_file() else ["manifest.json (missing)"]
        if bad:
            print(f"files that do not match the manifest: {bad}", file=sys.stderr)
            return 1
    return 0


def _builder_paths(args: argparse.Namespace, out_key: str, input_flag: str, input_key: str):
    """(profile, out, input folder, the exact command) of a `w2w dataset|spaces build` call."""
    from .profile import load_profile
    from .stages import portable_path

    profile = load_profile(args.profile, {"device": args.device} if args.device else None)
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

    for name, what, source, func in (
            ("dataset", "build the weights dataset: one DreamBooth-LoRA per identity of the mini world",
             ("world", "the mini world to train on", "world_dir"), _cmd_dataset),
            ("spaces", "fit the PCA (w2w) and train the VAE (w2w++) of a weights dataset",
             ("dataset", "the weights dataset", "dataset_dir"), _cmd_spaces)):
        p = sub.add_parser(name, help=what)
        p.add_argument("action", choices=["build"])
        p.add_argument("--config", default="mini", choices=["mini", "micro"], help="sizes (micro: tiny, for tests)")
        p.add_argument("--out", help=f"output folder (default: the profile's {name}_dir)")
        p.add_argument(f"--{source[0]}", help=f"{source[1]} (default: the profile's {source[2]})")
        p.add_argument("--profile", default="mini")
        p.add_argument("--device", help="override the profile's device (cpu, cuda)")
        p.set_defaults(func=func)

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
