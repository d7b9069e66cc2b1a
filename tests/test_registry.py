"""Model packages and the MLflow registry, for real: safetensors files, a sqlite store and an
``mlflow server`` process on 127.0.0.1 (started once for the module; slow on the shared machine).

Packages here are written straight from a tiny network (no training); publishing from a training run's
checkpoint is tested in ``test_finetune.py``.
"""

from __future__ import annotations

import json
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from multitalent.catalog import load_preset
from multitalent.models import build_network
from multitalent.preprocess.plan import Plan
from multitalent.registry import PackageError, RegistryError, load_package, open_package, pull
from multitalent.registry.package import MANIFEST, WEIGHTS, ModelCard, write_package
from multitalent.registry.store import TAG_CATALOG, TAG_DIGEST, TAG_PLAN, publish_package, registered_versions

PATCH = (16, 32, 32)


def tiny_model(catalog, seed: int = 0):
    torch.manual_seed(seed)
    return build_network("unet", catalog.classes_per_dataset(), size="tiny", patch_size_zyx=PATCH)


def make_package(out: Path, seed: int = 0) -> Path:
    catalog = load_preset("phantom")
    model = tiny_model(catalog, seed)
    card = ModelCard(
        cases={"train": {"P01": 4}}, validation={"val/dice/P01/liver": 0.5}, training={"lr": 0.01}
    )
    return write_package(
        out,
        model=model,
        state_dict=model.state_dict(),
        plan=Plan.for_catalog(catalog),
        catalog=catalog,
        card=card,
    )


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return make_package(tmp_path_factory.mktemp("pkg") / "package")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("sqlite")
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def server_store(tmp_path_factory):
    """A real ``mlflow server`` process (sqlite backend, proxied artifacts)."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def new_run(uri: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    exp = client.get_experiment_by_name("registry-test")
    exp_id = (
        exp.experiment_id if exp else client.create_experiment("registry-test", artifact_location=location)
    )
    return client.create_run(exp_id, run_name="train").info.run_id


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / WEIGHTS))


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_publish_pull_load_round_trip_is_bitwise(store, request, package, tmp_path):
    uri = request.getfixturevalue(f"{store}_store")
    run_id = new_run(uri)
    first = publish_package(package, name="phantom-net", run_id=run_id, tracking_uri=uri)
    second = publish_package(package, name="phantom-net", run_id=run_id, tracking_uri=uri, alias="champion")
    assert int(second.version) == int(first.version) + 1  # publishing twice: two versions
    versions = {v["version"]: v for v in registered_versions("phantom-net", tracking_uri=uri)}
    src = open_package(package)
    assert versions[second.version]["tags"][TAG_DIGEST] == src.digest
    assert versions[second.version]["tags"][TAG_CATALOG] == src.catalog.hash
    assert versions[second.version]["tags"][TAG_PLAN] == src.plan.sha256

    got = pull("models:/phantom-net@champion", tmp_path / "pulled", tracking_uri=uri)
    assert got.version == second.version and got.source == f"models:/phantom-net/{second.version}"
    a, b = tensors(package), tensors(got.folder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in b.values())
    for name in ("plan.json", "labels.json", "architecture.json", "MODEL_CARD.md", MANIFEST):
        assert (got.folder / name).read_bytes() == (package / name).read_bytes()
    assert got.catalog == src.catalog and got.plan == src.plan
    assert sorted(p.name for p in got.folder.iterdir()) == sorted(p.name for p in package.iterdir())

    # The loaded network computes what the original did.
    original = tiny_model(load_preset("phantom")).eval()
    loaded = load_package(f"models:/phantom-net/{first.version}", tracking_uri=uri).load_network()
    x = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        assert all(torch.equal(p, q) for p, q in zip(original(x), loaded(x)))


def test_unknown_alias_lists_the_existing_ones(sqlite_store, package, tmp_path):
    run_id = new_run(sqlite_store)
    publish_package(package, name="aliased", run_id=run_id, tracking_uri=sqlite_store, alias="champion")
    with pytest.raises(RegistryError, match=r"alias 'best' not found; aliased has aliases: @champion -> v1"):
        pull("models:/aliased@best", tmp_path / "x", tracking_uri=sqlite_store)
    assert not (tmp_path / "x").exists()
    with pytest.raises(RegistryError, match="models:/nosuchmodel/1"):
        pull("models:/nosuchmodel/1", tmp_path / "y", tracking_uri=sqlite_store)


def test_unreachable_server_is_one_line_naming_the_uri(tmp_path, capsys, monkeypatch):
    from multitalent.cli import main

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(RegistryError) as e:
        pull("models:/m@champion", tmp_path / "out", tracking_uri=uri)
    assert uri in str(e.value) and "\n" not in str(e.value)
    assert main(["pull", "models:/m@champion", "--out", str(tmp_path / "o"), "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and uri in err and "Traceback" not in err


def _damage(folder: Path, how: str) -> str:
    """Damage a package copy; returns the file name the error must name."""
    manifest = json.loads((folder / MANIFEST).read_text())
    if how == "missing":
        (folder / "labels.json").unlink()
        return "labels.json"
    if how == "extra":
        (folder / "notes.txt").write_text("hi")
        return "notes.txt"
    if how == "truncated":
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
        return WEIGHTS
    if how == "altered":
        data = bytearray((folder / "plan.json").read_bytes())
        data[-2] ^= 1
        (folder / "plan.json").write_bytes(bytes(data))
        return "plan.json"
    if how == "outside":
        manifest["files"]["../outside.txt"] = {"bytes": 2, "sha256": "0" * 64}
        (folder / MANIFEST).write_text(json.dumps(manifest))
        return "../outside.txt"
    if how == "no-manifest":
        (folder / MANIFEST).unlink()
        return MANIFEST
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "extra", "truncated", "altered", "outside", "no-manifest"])
def test_damaged_packages_are_refused_naming_the_file(how, package, tmp_path, sqlite_store):
    copy = tmp_path / "copy"
    shutil.copytree(package, copy)
    name = _damage(copy, how)
    with pytest.raises(PackageError, match=name.replace(".", r"\.")):
        load_package(str(copy))
    with pytest.raises(PackageError, match=name.replace(".", r"\.")):
        pull(str(copy), tmp_path / "out", tracking_uri=sqlite_store)
    assert not (tmp_path / "out").exists()


def test_damaged_download_from_the_registry_is_refused(package, sqlite_store, tmp_path):
    run_id = new_run(sqlite_store)
    done = publish_package(package, name="tampered", run_id=run_id, tracking_uri=sqlite_store)
    stored = Path(sqlite_store.removeprefix("sqlite:///")).parent / "mlartifacts" / run_id / "artifacts"
    weights = stored / done.artifact_path / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=rf"{WEIGHTS}: SHA-256 differs"):
        pull(done.uri, tmp_path / "out", tracking_uri=sqlite_store)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


class _Boom:
    """Unpickling this runs ``_explode``: a test fails loudly if any loader unpickles."""

    def __reduce__(self):
        return (_explode, ())


def _explode():
    raise AssertionError("a pickle was executed")


def test_loading_never_unpickles(package, tmp_path):
    # 1. A listed pickle beside the weights: the package verifies and loads; the pickle is never read.
    copy = tmp_path / "with-pickle"
    shutil.copytree(package, copy)
    (copy / "model.pt").write_bytes(pickle.dumps(_Boom()))
    manifest = json.loads((copy / MANIFEST).read_text())
    from multitalent.registry.package import _sha256

    manifest["files"]["model.pt"] = {
        "bytes": (copy / "model.pt").stat().st_size,
        "sha256": _sha256(copy / "model.pt"),
    }
    (copy / MANIFEST).write_text(json.dumps(manifest))
    load_package(str(copy)).load_network()
    # 2. The weights file itself replaced by a pickle (manifest updated to match): refused, not executed.
    (copy / WEIGHTS).write_bytes(pickle.dumps({"backbone.x": _Boom()}))
    manifest["files"][WEIGHTS] = {"bytes": (copy / WEIGHTS).stat().st_size, "sha256": _sha256(copy / WEIGHTS)}
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="not a readable safetensors file"):
        load_package(str(copy)).load_network()


def test_an_interrupted_publish_registers_nothing(package, sqlite_store, tmp_path):
    """What a publish killed during the upload leaves (every file but the manifest, which goes last):
    no registered version, and the artifact folder never verifies."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sqlite_store)
    run_id = new_run(sqlite_store)
    for f in sorted(p for p in package.iterdir() if p.name != MANIFEST):
        client.log_artifact(run_id, str(f), "packages/partial")
    partial = Path(sqlite_store.removeprefix("sqlite:///")).parent / "mlartifacts" / run_id / "artifacts"
    with pytest.raises(PackageError, match=r"manifest\.json: missing"):
        load_package(str(partial / "packages" / "partial"))
    assert registered_versions("never-published", tracking_uri=sqlite_store) == []


def test_package_layout_and_card(package):
    names = sorted(p.name for p in package.iterdir())
    assert names == sorted(
        ["weights.safetensors", "architecture.json", "plan.json", "labels.json", "MODEL_CARD.md", MANIFEST]
    )
    pkg = open_package(package)
    labels = pkg.labels
    assert labels["outputs"][0] == {
        "dataset": "P01",
        "channels": [0, 2],
        "classes": ["liver", "liver tumour"],
    }
    assert labels["classes"][0]["region"] and labels["num_classes"] == pkg.catalog.num_classes
    keys = set(tensors(package))
    assert all(k.startswith(("backbone.", "heads.")) for k in keys)
    model = pkg.build_network()
    assert keys == {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    card = (package / "MODEL_CARD.md").read_text()
    assert "| P01 Phantom liver (MSD) | 0-1 | 2 | 4 | 0 |" in card and "P01/liver | 0.5000" in card
    assert Plan.load(package / "plan.json") == pkg.plan


def test_a_package_predicts_through_the_inference_path(package):
    """``multitalent predict --model PACKAGE`` rebuilds the network from the package's JSON and loads
    its safetensors (no pickle): the same outputs as the packaged network; laterality follows it."""
    from multitalent.catalog import lateral_swap
    from multitalent.inference.cli import resolve_model
    from multitalent.inference.cohort import mirroring_for
    from multitalent.inference.model import load_model
    from multitalent.inference.predictor import PredictSettings
    from multitalent.registry import open_package

    files = resolve_model(str(package))
    assert files.source["kind"] == "model package" and files.source["laterality"] == "naive"
    loaded = load_model(files)
    reference = open_package(package).load_network()
    x = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        expected = reference(x)
        expected = expected[0] if isinstance(expected, list | tuple) else expected
        torch.testing.assert_close(loaded.network(x), expected, rtol=0, atol=0)
    settings, swap = mirroring_for(files, PredictSettings())
    assert swap is None and settings.mirror_axes == (0, 1, 2)  # naive: flip x, no channel swap
    from dataclasses import replace

    files = replace(files, source={**files.source, "laterality": "swap"})
    _, swap = mirroring_for(files, PredictSettings())
    assert swap == [int(k) for k in lateral_swap(files.catalog)] and swap != sorted(swap)
    files = replace(files, source={**files.source, "laterality": "off"})
    settings, _ = mirroring_for(files, PredictSettings())
    assert settings.mirror_axes == (0, 1)
