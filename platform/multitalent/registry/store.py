"""Model packages in an MLflow model registry: publish (log + register + alias + tags) and pull.

A package is logged as plain artifacts of a run (``packages/<digest>/``) and registered with
``MlflowClient.create_model_version`` pointing at that folder: no ``MLmodel`` file, no pyfunc, nothing
MLflow would unpickle. Publishing uploads every file but ``manifest.json`` first and the manifest last,
checks the upload, and only then registers a version: an interrupted publish leaves at most an
unregistered artifact folder (without a manifest, so it never verifies), never a version pointing at
incomplete files.

Pulling resolves an alias to a version once (the version is reported), downloads that version's folder
and verifies it (:func:`multitalent.registry.package.verify_package`) before anything is read.

Store errors become :class:`RegistryError` with one line naming the URI.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multitalent.registry.package import MANIFEST, ModelPackage, PackageError, open_package, verify_package

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

TAG_DIGEST = "multitalent.manifest_sha256"
TAG_CATALOG = "multitalent.catalog_hash"
TAG_PLAN = "multitalent.plan_sha256"
TAG_PARENT = "multitalent.parent"
ARTIFACT_DIR = "packages"


class RegistryError(RuntimeError):
    """The registry cannot do what was asked (unreachable, unknown name/alias/version); one line."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed package URI: a local folder, ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``."""

    uri: str
    folder: Path | None = None
    name: str | None = None
    version: str | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, uri: str) -> ModelRef:
        if not uri.startswith("models:/"):
            return cls(uri, folder=Path(uri).expanduser())
        rest = uri.removeprefix("models:/").strip("/")
        if "@" in rest:
            name, _, alias = rest.partition("@")
            if name and alias and "/" not in alias:
                return cls(uri, name=name, alias=alias)
        else:
            name, _, version = rest.rpartition("/")
            if name and version.isdigit():
                return cls(uri, name=name, version=version)
        raise RegistryError(f"{uri}: expected models:/NAME/VERSION, models:/NAME@ALIAS or a package folder")


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


@contextmanager
def _client(tracking_uri: str, *, what: str) -> Iterator[MlflowClient]:
    """A client of ``tracking_uri``; store failures inside become one-line :class:`RegistryError` s."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_file():  # MLflow would create an empty store there
            raise RegistryError(f"{what}: no MLflow store at {tracking_uri} ({db} does not exist)")
    if _is_remote(tracking_uri):
        # MLflow's defaults (7 retries, 120 s) turn a wrong address into minutes of silence.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        yield MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    except (RegistryError, PackageError):
        raise
    except MlflowException as e:
        _raise_if_refused(e, what=what, tracking_uri=tracking_uri)
        code = getattr(e, "error_code", "")
        first = str(e.message if hasattr(e, "message") else e).strip().splitlines()[0][:300]
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS"):
            raise RegistryError(f"{what}: {first}") from None
        raise RegistryError(f"{what}: the MLflow store at {tracking_uri} failed: {first}") from None
    except OSError as e:  # requests' errors, e.g. an artifact download the server refused
        _raise_if_refused(e, what=what, tracking_uri=tracking_uri)
        raise RegistryError(
            f"{what}: cannot reach the MLflow store at {tracking_uri} ({type(e).__name__})"
        ) from None
    except Exception as e:  # requests' errors subclass OSError; anything else from the store lands here
        name = type(e).__name__
        raise RegistryError(
            f"{what}: cannot use the MLflow store at {tracking_uri} ({name}: {str(e)[:200]})"
        ) from None


def _raise_if_refused(error: BaseException, *, what: str, tracking_uri: str) -> None:
    from multitalent.tracking.credentials import refused_credentials

    reason = refused_credentials(error)
    if reason:
        raise RegistryError(
            f"{what}: the MLflow server at {tracking_uri} refused the request: {reason}"
        ) from None


# ------------------------------------------------------------------------------------------ publish
@dataclass(frozen=True)
class Published:
    name: str
    version: str
    alias: str | None
    run_id: str
    artifact_path: str
    digest: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def publish_package(
    folder: str | Path,
    *,
    name: str,
    run_id: str,
    tracking_uri: str,
    alias: str | None = None,
    parent: str | None = None,
    description: str = "",
) -> Published:
    """Log the verified package ``folder`` as artifacts of ``run_id`` and register a new version of ``name``.

    Every call creates a new version (publishing the same package twice gives two versions of the same
    files). ``alias`` then points at it; the version is tagged with the manifest digest, the catalog hash,
    the plan's sha256 and ``parent`` (the model it was initialised from).

    Raises:
        PackageError: the folder is not a valid package.
        RegistryError: the store is unreachable, the run does not exist, or the upload did not verify.
    """
    pkg = open_package(folder)
    files = sorted(pkg.manifest["files"])
    artifact_path = f"{ARTIFACT_DIR}/{pkg.digest[:16]}-{uuid.uuid4().hex[:8]}"
    with _client(tracking_uri, what=f"publish {name}") as client:
        run = client.get_run(run_id)
        # Everything but the manifest, then the manifest: a folder without one never verifies.
        for rel in files:
            sub = "/".join([artifact_path, *Path(rel).parts[:-1]])
            client.log_artifact(run_id, str(pkg.folder / rel), sub)
        uploaded = {
            a.path.removeprefix(artifact_path + "/"): a.file_size
            for a in client.list_artifacts(run_id, artifact_path)
        }
        for rel in files:
            want = pkg.manifest["files"][rel]["bytes"]
            if uploaded.get(rel) not in (want, None):
                raise RegistryError(
                    f"publish {name}: {rel} arrived with {uploaded.get(rel)} bytes, not {want}"
                )
            if rel not in uploaded:
                raise RegistryError(f"publish {name}: {rel} is missing from the uploaded artifacts")
        client.log_artifact(run_id, str(pkg.folder / MANIFEST), artifact_path)
        try:
            client.get_registered_model(name)
        except Exception as e:
            if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            client.create_registered_model(
                name, description="MultiTalent model packages (multitalent publish)"
            )
        tags = {TAG_DIGEST: pkg.digest, TAG_CATALOG: pkg.catalog.hash, TAG_PLAN: pkg.plan.sha256}
        if parent:
            tags[TAG_PARENT] = parent
        version = client.create_model_version(
            name,
            source=f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}",
            run_id=run_id,
            tags=tags,
            description=description or None,
        )
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
        client.set_tag(run_id, f"multitalent.published.{name}", str(version.version))
    return Published(name, str(version.version), alias, run_id, artifact_path, pkg.digest)


# ------------------------------------------------------------------------------------------ pull
@dataclass(frozen=True)
class Resolved:
    name: str
    version: str
    alias: str | None
    tags: Mapping[str, str]


def resolve(ref: ModelRef, *, tracking_uri: str) -> Resolved:
    """The version a registry URI names now (an alias is resolved here, once).

    Raises:
        RegistryError: unknown model, version or alias (the message lists the existing aliases).
    """
    assert ref.name is not None
    with _client(tracking_uri, what=ref.uri) as client:
        if ref.alias is not None:
            try:
                mv = client.get_model_version_by_alias(ref.name, ref.alias)
            except Exception as e:
                if getattr(e, "error_code", "") not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise
                model = client.get_registered_model(ref.name)  # raises for an unknown model
                aliases = sorted(model.aliases) if isinstance(model.aliases, dict) else []
                listed = ", ".join(f"@{a} -> v{model.aliases[a]}" for a in aliases) or "none"
                raise RegistryError(
                    f"{ref.uri}: alias {ref.alias!r} not found; {ref.name} has aliases: {listed}"
                ) from None
        else:
            mv = client.get_model_version(ref.name, str(ref.version))
        return Resolved(ref.name, str(mv.version), ref.alias, dict(mv.tags or {}))


def pull(uri: str, out: str | Path, *, tracking_uri: str) -> ModelPackage:
    """Download the package ``uri`` names into the new folder ``out`` and verify it.

    ``uri``: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a local package folder (copied).
    The download lands in a hidden sibling of ``out`` and is renamed only once it verifies.

    Raises:
        FileExistsError: ``out`` exists and is not empty.
        PackageError: the downloaded files do not verify (the file is named; nothing is kept).
        RegistryError: see :func:`resolve`; an unreachable store.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty")
    ref = ModelRef.parse(uri)
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")
    version: str | None = None
    source = uri
    try:
        if ref.folder is not None:
            verify_package(ref.folder)
            got = tmp / "package"
            shutil.copytree(ref.folder, got)
        else:
            resolved = resolve(ref, tracking_uri=tracking_uri)
            version, source = resolved.version, f"models:/{resolved.name}/{resolved.version}"
            tmp.mkdir(parents=True)
            got = _download(source, tmp, tracking_uri=tracking_uri)
        verify_package(got)
        if out.exists():
            out.rmdir()
        got.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_package(out, source=source, version=version)


def _download(models_uri: str, dst: Path, *, tracking_uri: str) -> Path:
    import mlflow.artifacts

    name, _, version = models_uri.removeprefix("models:/").rpartition("/")
    with _client(tracking_uri, what=models_uri) as client:
        # The version's own artifact folder (the registry's models:/ resolution reads the process-wide
        # registry URI, not this store's).
        source = client.get_model_version_download_uri(name, version)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri
        )
    return Path(local)


def load_package(
    uri: str, *, tracking_uri: str | None = None, cache_dir: str | Path | None = None
) -> ModelPackage:
    """The verified package at ``uri`` (a folder is opened in place; a registry URI is downloaded).

    Registry downloads go to ``cache_dir/<name>/<version>`` (reused when it verifies), or to a new
    temporary folder when ``cache_dir`` is ``None``.

    Raises:
        PackageError, RegistryError: as :func:`pull`; ``tracking_uri`` missing for a registry URI.
    """
    ref = ModelRef.parse(uri)
    if ref.folder is not None:
        return open_package(ref.folder, source=uri)
    if not tracking_uri:
        raise RegistryError(f"{uri}: a registry URI needs a tracking URI (e.g. sqlite:///runs/mlflow.db)")
    resolved = resolve(ref, tracking_uri=tracking_uri)
    source = f"models:/{resolved.name}/{resolved.version}"
    if cache_dir is not None:
        target = Path(cache_dir) / resolved.name / resolved.version
        if target.is_dir():
            try:
                return open_package(target, source=source, version=resolved.version)
            except PackageError:
                shutil.rmtree(target)
    else:
        target = Path(tempfile.mkdtemp(prefix="multitalent-package-")) / "package"
    try:
        return pull(source, target, tracking_uri=tracking_uri)
    except OSError:
        # Another worker of the run filled the same cache folder first (its rename won): use its copy.
        if cache_dir is None or not target.is_dir():
            raise
        return open_package(target, source=source, version=resolved.version)


def registered_versions(name: str, *, tracking_uri: str) -> list[dict[str, Any]]:
    """``[{version, source, tags}]`` of every version of ``name`` (tests and the CLI's listing)."""
    with _client(tracking_uri, what=f"models:/{name}") as client:
        return [
            {"version": str(v.version), "source": v.source, "tags": dict(v.tags or {})}
            for v in client.search_model_versions(f"name='{name}'")
        ]
