"""MultiTalent: train one CT segmentation network on many partially labelled datasets.

Each subcommand names the module and function that implements it; that module is imported only
when the subcommand runs, so ``multitalent --help`` never pays for torch, ray or mlflow.

One error path for every command (:func:`main`): a mistake the user can fix (a job file, a path, a
preset, a job of another kind, an unknown key) is one ``error:`` line on stderr and exit status 2;
a closed pipe (``multitalent catalog show | head``) ends quietly; anything else is a bug, printed
with its traceback and a request to report it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

Configure = Callable[[argparse.ArgumentParser], None]


def overrides_arg(
    p: argparse.ArgumentParser, *, help_text: str | None = "override a job field, dotted path (repeatable)"
) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``, as every job command takes it."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def _catalog_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="catalog_command", required=True, metavar="{show,list}")
    show_help = "print the datasets and classes (one head each) of a label space"
    show = sub.add_parser("show", help=show_help, description=show_help)
    show.add_argument(
        "--preset",
        default="multitalent13",
        help="preset name (see `multitalent catalog list`) or catalog JSON/YAML file (default: %(default)s)",
    )
    show.add_argument("--json", action="store_true", help="print the catalog as JSON")
    list_help = "list the shipped presets with their dataset and class counts and hash"
    sub.add_parser("list", help=list_help, description=list_help)


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write the raw phantom datasets into")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed writes the same files (default: 0)"
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every dataset's case count, at least 1 case per dataset (default: 1.0)",
    )


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="conversion job YAML (see jobs/convert.yaml)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    overrides_arg(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the cases found per dataset and the problems found without converting; start no Ray",
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
    overrides_arg(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build every component (data, model, loss, DeepSpeed config, tracking), check the cluster's "
        "resources, and take no step",
    )
    p.add_argument(
        "--wait-for-resources",
        action="store_true",
        help="wait instead of failing when the cluster lacks the workers' resources (nodes will be added)",
    )
    output = p.add_mutually_exclusive_group()
    output.add_argument(
        "--quiet", action="store_true", help="print no progress and no result table (errors only)"
    )
    output.add_argument(
        "--jsonl",
        action="store_true",
        help="print progress and the result as JSON lines (one object per line) for scripts",
    )


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", help="a NIfTI scan or a folder of them")
    p.add_argument("-o", "--out", help="output folder: OUT/<case>/<dataset>.nii.gz, predictions.json")
    p.add_argument("--model", help="a training run folder (newest verified checkpoint) or a model package")
    p.add_argument(
        "--datasets", nargs="+", metavar="ID", help="predict these datasets' classes (default all)"
    )
    p.add_argument("--classes", nargs="+", metavar="CLASS", help="or these classes ('<dataset>:<class>')")
    p.add_argument("--masks", action="store_true", help="also write one binary mask per class")
    p.add_argument("--no-mirror", action="store_true", help="no mirroring test-time augmentation (8x faster)")
    p.add_argument("--step", type=float, default=None, help="window step, fraction of the patch (0.5)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    p.add_argument("--overwrite", action="store_true", help="allow OUT holding another model's predictions")
    p.add_argument("--job", help="a predict job (jobs/predict.yaml): cohorts on Ray; flags override it")
    overrides_arg(p, help_text=None)


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", help="predict's output folder")
    p.add_argument("--gt", help="raw data root (the catalog's dataset folders)")
    p.add_argument("--catalog", help="catalog preset or file (default: the model's, from predictions.json)")
    p.add_argument("--datasets", nargs="+", metavar="ID", help="evaluate only these datasets")
    p.add_argument(
        "--splits", help="splits.json of a converted collection: evaluate one fold's validation cases"
    )
    p.add_argument("--fold", type=int, default=None, help="the fold of --splits")
    p.add_argument("--out", help="where to write evaluation.csv/.md/.json (default: PRED)")
    p.add_argument("--mlflow", metavar="RUN_ID", help="log the metrics and tables to this MLflow run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for --mlflow")
    p.add_argument("--job", help="an evaluate job (jobs/evaluate.yaml); flags override it")
    overrides_arg(p, help_text=None)


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
    "predict": (
        "segment scans with a trained model (label maps in each scan's geometry)",
        _predict_args,
        "multitalent.inference.cli:run",
    ),
    "evaluate": (
        "Dice and HD95 of predictions against raw ground truth",
        _evaluate_args,
        "multitalent.evaluation.cli:run",
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
    "demo": (
        "the whole path on the phantom: convert, pre-train, publish, fine-tune, predict, evaluate",
        lambda p: importlib.import_module("multitalent.demo.cli").demo_args(p),
        "multitalent.demo.cli:run",
    ),
    "experiment": (
        "compare MultiTalent, the naive merge and one model per dataset: train, predict, evaluate",
        lambda p: importlib.import_module("multitalent.experiment.cli").experiment_args(p),
        "multitalent.experiment.cli:run",
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


EXIT_USER_ERROR = 2
EXIT_BUG = 1
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command ended by a closed pipe


def is_user_error(e: BaseException) -> bool:
    """A mistake the user can fix (printed as one ``error:`` line), as opposed to a bug: a job, path or
    preset (:class:`~multitalent.jobs.UserError`), a catalog file, or converted data that is missing,
    incomplete or corrupt (convert again), an object-store location that cannot be used or a store that
    failed (:class:`~multitalent.storage.StorageError`)."""
    from multitalent.catalog.model import CatalogError
    from multitalent.jobs import UserError
    from multitalent.preprocess.plan import PlanError
    from multitalent.shards._common import ShardError
    from multitalent.storage import StorageError

    return isinstance(e, (UserError, CatalogError, PlanError, ShardError, StorageError))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = args._target.split(":")
    if not sys.stderr.isatty():  # MLflow's upload/download bars would fill a log file line by line
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        status = int(func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except BrokenPipeError:
        # The reader went away (`| head`): stop writing, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if is_user_error(e):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        import traceback

        traceback.print_exc()
        print(
            f"\nmultitalent {args.command}: internal error ({type(e).__name__}). This is a bug, not a "
            "mistake in your input: please report it to the MultiTalent maintainers with the traceback "
            "above and the command you ran.",
            file=sys.stderr,
        )
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
