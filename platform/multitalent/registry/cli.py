"""``multitalent publish RUN_DIR --name NAME [--alias A]`` and ``multitalent pull MODEL_URI --out DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"  # the store of the default storage path ``runs``


def publish_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run directory (<storage_path>/<run name>)")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--alias", default=None, help="alias to point at the new version, e.g. champion")
    p.add_argument(
        "--checkpoint", default=None, help="a checkpoint folder (default: the newest verified one)"
    )
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: the one the run logged to)")


def pull_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or a package folder")
    p.add_argument("--out", required=True, help="new folder to write the verified package into")
    p.add_argument(
        "--tracking-uri", default=DEFAULT_TRACKING_URI, help=f"MLflow store (default: {DEFAULT_TRACKING_URI})"
    )


def publish(args: argparse.Namespace) -> int:
    from multitalent.registry.package import PackageError
    from multitalent.registry.store import RegistryError
    from multitalent.train.publish import publish_run

    try:
        done = publish_run(
            args.run_dir,
            name=args.name,
            alias=args.alias,
            checkpoint=args.checkpoint,
            tracking_uri=args.tracking_uri,
        )
    except (FileNotFoundError, FileExistsError, PackageError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"published {done.name} version {done.version} (run {done.run_id}, artifacts {done.artifact_path})")
    print(f"manifest sha256 {done.digest}")
    print(done.uri)
    if done.alias:
        print(f"models:/{done.name}@{done.alias}")
    return 0


def pull(args: argparse.Namespace) -> int:
    from multitalent.registry.package import PackageError
    from multitalent.registry.store import RegistryError, pull

    try:
        pkg = pull(args.uri, Path(args.out), tracking_uri=args.tracking_uri)
    except (FileNotFoundError, FileExistsError, PackageError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    version = f" = {pkg.source}" if pkg.version is not None and pkg.source != args.uri else ""
    print(f"{args.uri}{version}: verified, {len(pkg.manifest['files']) + 1} files in {pkg.folder}")
    print(
        f"catalog {pkg.catalog.name} ({pkg.catalog.num_classes} classes, hash {pkg.catalog.hash}); "
        f"manifest sha256 {pkg.digest}"
    )
    return 0
