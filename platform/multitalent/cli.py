"""The ``multitalent`` command.

Each subcommand names the module and function that implements it; that module is imported only
when the subcommand runs, so ``multitalent --help`` never pays for torch, ray or mlflow.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

Configure = Callable[[argparse.ArgumentParser], None]


def _catalog_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="catalog_command", required=True, metavar="{show,list}")
    show = sub.add_parser("show", help="print datasets and classes of a label space")
    show.add_argument("--preset", default="multitalent13", help="preset name or catalog file")
    show.add_argument("--json", action="store_true", help="print the catalog as JSON")
    sub.add_parser("list", help="list the shipped presets")


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write the raw phantom datasets into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply case counts (>= 1 case per dataset)")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="conversion job YAML (see jobs/convert.yaml)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job field, dotted path (repeatable)",
    )


def _augment_preview_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="converted output folder (with plan.json)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--n", type=int, default=8, help="number of patches")
    p.add_argument("--patch", default="48,96,96", help="patch size z,y,x")
    p.add_argument("--seed", type=int, default=0)


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="training job YAML (see jobs/pretrain.yaml)")
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: local Ray, or the submitted job's)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job field, dotted path (repeatable)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build every component (data, model, loss, DeepSpeed config, tracking) and take no step",
    )


# name -> (help, argument setup, "module:function" taking the parsed namespace, returning exit code)
COMMANDS: dict[str, tuple[str, Configure, str]] = {
    "catalog": ("inspect label spaces", _catalog_args, "multitalent.catalog.cli:run"),
    "synth": ("write the synthetic phantom CT collection", _synth_args, "multitalent.synth.cli:run"),
    "convert": (
        "raw datasets -> preprocessed Zarr + WebDataset shards",
        _convert_args,
        "multitalent.convert.cli:run",
    ),
    "train": (
        "train a job with Ray Train + DeepSpeed (MLflow tracking, resumable)",
        _train_args,
        "multitalent.train.cli:run",
    ),
    "publish": (
        "package a run's newest verified checkpoint and register it in MLflow",
        lambda p: importlib.import_module("multitalent.registry.cli").publish_args(p),
        "multitalent.registry.cli:publish",
    ),
    "pull": (
        "download and verify a model package (models:/NAME@ALIAS, models:/NAME/VERSION)",
        lambda p: importlib.import_module("multitalent.registry.cli").pull_args(p),
        "multitalent.registry.cli:pull",
    ),
    "augment-preview": (
        "PNG grid of augmented patches with label overlays",
        _augment_preview_args,
        "multitalent.data.preview:run",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from multitalent import __version__

    parser = argparse.ArgumentParser(prog="multitalent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"multitalent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, target) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.set_defaults(_target=target)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = args._target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
