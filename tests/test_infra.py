"""infra/: the Kubernetes manifests, the compose file, the training image and the sizing page agree with
each other and with the package, and the manifests validate against their schemas offline.

Validators: Kubernetes' own types with ``kubernetes-validate`` (strict: unknown fields are errors, as with
kubectl's strict field validation), KubeRay's RayCluster / RayJob with ``jsonschema`` against the schema
derived from the CRDs in ``infra/k8s/schemas/`` (its embedded pod templates resolve into the same
Kubernetes schema), the compose file against the Compose Specification schema that ``check-jsonschema``
vendors. Each validator is also shown a deliberately broken copy, which it must reject.
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import re
import shlex
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
RAY_SCHEMA = K8S / "schemas" / "ray.io_v1.schema.json"
COMPOSE = INFRA / "docker-compose.yml"
DOCKERFILE = INFRA / "Dockerfile"
K8S_VERSION = "1.35"  # the Kubernetes minor the manifests target (kubernetes-validate's schemas)
RAY_KINDS = {"RayCluster", "RayJob"}
NOT_API_OBJECTS = {"Kustomization"}  # kustomize's own file: checked for its resource list instead
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")


def _module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


pins = _module(INFRA / "pins.py")
sizing = _module(INFRA / "sizing.py")
PROJECT_VERSION = pins.pinned_version("project")


# ------------------------------------------------------------------------------------------ loading
def manifests() -> list[tuple[str, dict[str, Any]]]:
    """``(file name, document)`` for every document of every YAML file in infra/k8s/."""
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc.get("kind") == kind]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in objects(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''} in infra/k8s, found {len(found)}"
    return found[0]


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """``(owner, pod spec)`` of every pod template in the manifests."""
    for _, doc in manifests():
        kind, name, spec = doc.get("kind"), doc.get("metadata", {}).get("name"), doc.get("spec", {})
        if kind in {"Deployment", "StatefulSet"}:
            yield f"{kind}/{name}", spec["template"]["spec"]
        elif kind == "RayCluster":
            yield f"{kind}/{name}/head", spec["headGroupSpec"]["template"]["spec"]
            for group in spec.get("workerGroupSpecs", []):
                yield f"{kind}/{name}/{group['groupName']}", group["template"]["spec"]


def containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for owner, pod in pod_specs():
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            yield f"{owner}/{c['name']}", c


def container_env_names(container: dict[str, Any]) -> set[str]:
    """Variables a container gets: its ``env`` and the keys of the ConfigMaps it takes ``envFrom``."""
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref, f"only configMapRef envFrom is expected here: {source}"
        names |= set(one("ConfigMap", ref["name"])["data"])
    return names


def env_value(container: dict[str, Any], name: str) -> str:
    for e in container.get("env", []):
        if e["name"] == name:
            return str(e["value"])
    for source in container.get("envFrom", []):
        data = one("ConfigMap", source["configMapRef"]["name"])["data"]
        if name in data:
            return str(data[name])
    raise KeyError(name)


def parse_quantity(q: str | int) -> float:
    """A Kubernetes quantity (``72``, ``500m``, ``48Gi``, ``2G``) as a number (bytes for memory)."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    assert m, f"not a quantity: {q!r}"
    factor = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    factor |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(m.group(1)) * factor[m.group(2)]


def dockerfile_stages() -> dict[str, dict[str, Any]]:
    """Per stage of infra/Dockerfile: base image, WORKDIR, COPY sources, EXPOSE, ENV; and the ARG defaults."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    args: dict[str, str] = {}
    stages: dict[str, dict[str, Any]] = {}
    cur: dict[str, Any] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and cur is None and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
        elif op == "FROM":
            m = re.fullmatch(r"(\S+) AS (\S+)", rest.strip(), flags=re.IGNORECASE)
            assert m, f"every stage is named: {line}"
            base = re.sub(r"\$\{(\w+)\}", lambda g: args[g.group(1)], m.group(1))
            cur = stages[m.group(2)] = {"base": base, "workdir": None, "copy": [], "expose": [], "env": {}}
        elif cur is not None and op == "WORKDIR":
            cur["workdir"] = rest.strip()
        elif cur is not None and op == "COPY":
            cur["copy"].append(rest.split())
        elif cur is not None and op == "EXPOSE":
            cur["expose"] += [int(p) for p in rest.split()]
        elif cur is not None and op == "ENV":
            cur["env"] |= dict(kv.split("=", 1) for kv in shlex.split(rest) if "=" in kv)
        elif cur is not None and op == "RUN":
            cur.setdefault("run", []).append(rest)
    return {"args": args, **stages}


def image_parts(image: str) -> tuple[str, str]:
    repo, _, tag = image.rpartition(":")
    assert repo and tag and "/" not in tag, f"image {image!r} must carry an explicit tag"
    return repo, tag


# --------------------------------------------------------------------------------------- validators
def k8s_definitions() -> dict[str, Any]:
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return json.loads((root / f"v{K8S_VERSION}.0-local-strict" / "_definitions.json").read_text())


def ray_validator(kind: str) -> Any:
    import jsonschema
    from referencing import Registry, Resource

    core, ray = k8s_definitions(), json.loads(RAY_SCHEMA.read_text())
    registry = Registry().with_resources(
        [(core["$id"], Resource.from_contents(core)), (ray["$id"], Resource.from_contents(ray))]
    )
    return jsonschema.Draft202012Validator({"$ref": f"{ray['$id']}#/$defs/{kind}"}, registry=registry)


def validate_manifest(doc: dict[str, Any]) -> list[str]:
    """Schema errors of one Kubernetes object, as ``path: message`` lines (empty: valid)."""
    kind = doc.get("kind")
    if kind in RAY_KINDS:
        errors = ray_validator(kind).iter_errors(doc)
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"]
    return []


def validate_compose(data: dict[str, Any]) -> list[str]:
    import jsonschema

    schema_file = (
        importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    )
    validator = jsonschema.Draft202012Validator(json.loads(schema_file.read_text()))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]


# ---------------------------------------------------------------------------------- schema validity
API_OBJECTS = [(f, d) for f, d in manifests() if d.get("kind") not in NOT_API_OBJECTS]


@pytest.mark.parametrize(
    ("file", "doc"), API_OBJECTS, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in API_OBJECTS]
)
def test_manifest_validates_against_its_schema(file: str, doc: dict[str, Any]) -> None:
    assert validate_manifest(doc) == [], f"{file}: {doc['kind']} {doc['metadata']['name']}"


def test_every_kind_in_the_manifests_is_checked() -> None:
    kinds = {d["kind"] for _, d in manifests()}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "StatefulSet", "ConfigMap"} <= kinds
    assert not objects("Secret"), "no Secret objects in infra/k8s: secrets are created by hand, by name"


def test_compose_validates_against_the_compose_spec() -> None:
    assert validate_compose(compose()) == []


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation: set the dotted ``path`` (list indices as numbers) to ``value``."""

    def apply(doc: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = doc
        for p in parents:
            node = node[p]
        node[last] = value

    return apply


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = doc
        for p in parents:
            node = node[p]
        del node[last]

    return apply


WORKER_POD = "spec.workerGroupSpecs.0.template.spec"
MLFLOW_CONTAINER = "spec.template.spec.containers.0"
# case -> (kind, name, mutation, the field the error must name)
BROKEN = {
    "Deployment port as text": (
        "Deployment", "mlflow", _set(f"{MLFLOW_CONTAINER}.ports.0.containerPort", "5000"), "containerPort"
    ),
    "Deployment unknown field": ("Deployment", "mlflow", _set(f"{MLFLOW_CONTAINER}.envFrm", []), "envFrm"),
    "StatefulSet without selector": ("StatefulSet", "postgres", _drop("spec.selector"), "selector"),
    "Service port missing": ("Service", "mlflow", _drop("spec.ports.0.port"), "port"),
    "RayCluster misspelt worker groups": (
        "RayCluster", "multitalent", _set("spec.workerGroupSpec", []), "workerGroupSpec"
    ),
    "RayCluster replicas as text": (
        "RayCluster", "multitalent", _set("spec.workerGroupSpecs.0.maxReplicas", "1"), "maxReplicas"
    ),
    "RayCluster bad auth mode": ("RayCluster", "multitalent", _set("spec.authOptions.mode", "on"), "mode"),
    "RayCluster pod template: unknown emptyDir field": (
        "RayCluster", "multitalent", _set(f"{WORKER_POD}.volumes.0.emptyDir.size", "48Gi"), "size"
    ),
    "RayCluster pod template: image of the wrong type": (
        "RayCluster", "multitalent", _set(f"{WORKER_POD}.containers.0.image", ["x"]), "image"
    ),
    "RayCluster head without template": (
        "RayCluster", "multitalent", _drop("spec.headGroupSpec.template"), "template"
    ),
    "RayJob bad submission mode": ("RayJob", None, _set("spec.submissionMode", "K8sMode"), "submissionMode"),
    "RayJob entrypoint CPUs as text": (
        "RayJob", None, _set("spec.entrypointNumCpus", "1"), "entrypointNumCpus"
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_manifest_is_rejected(case: str) -> None:
    kind, name, mutate, field = BROKEN[case]
    original = one(kind, name)
    broken = copy.deepcopy(original)
    mutate(broken)
    assert validate_manifest(original) == []
    errors = validate_manifest(broken)
    assert errors, f"{case}: the validator accepted a broken {kind}"
    assert any(field in e for e in errors), errors


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_set("services.mlflow.ports", 5000), "ports"),
        (_set("services.postgres.enviroment", {}), "enviroment"),
        (_set("services.mlflow.depends_on.postgres.condition", "service_ready"), "condition"),
    ],
    ids=["ports not a list", "misspelt key", "unknown depends_on condition"],
)
def test_a_broken_compose_file_is_rejected(mutate: Callable[[dict[str, Any]], None], field: str) -> None:
    broken = compose()
    mutate(broken)
    errors = validate_compose(broken)
    assert errors and any(field in e for e in errors), errors


# --------------------------------------------------------------------------------- cross-checks
def test_everything_is_in_one_namespace() -> None:
    ns = one("Namespace")["metadata"]["name"]
    for file, doc in manifests():
        if doc["kind"] not in {"Namespace", *NOT_API_OBJECTS}:
            assert doc["metadata"].get("namespace") == ns, f"{file}: {doc['kind']} {doc['metadata']['name']}"


def test_kustomization_lists_the_platform_and_leaves_the_job_out() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    jobs = {f for f, d in manifests() if d["kind"] == "RayJob"}
    assert jobs == {"rayjob-pretrain.yaml"}
    assert set(kustomization["resources"]) == files - jobs
    assert len(kustomization["resources"]) == len(set(kustomization["resources"]))


def test_images_and_tags_agree() -> None:
    stages = dockerfile_stages()
    built = {}  # image repository -> Dockerfile target, from the build commands in its header
    for m in re.finditer(
        r"docker build -f infra/Dockerfile --target (\w+)\s+-t (\S+) \.", DOCKERFILE.read_text()
    ):
        assert m.group(1) in stages, f"no stage {m.group(1)} in infra/Dockerfile"
        repo, tag = image_parts(m.group(2))
        assert tag == PROJECT_VERSION, f"the Dockerfile's build command tags {m.group(2)}"
        built[repo] = m.group(1)
    assert set(built.values()) == {"train", "mlflow"}
    train_repo = next(r for r, t in built.items() if t == "train")
    mlflow_repo = next(r for r, t in built.items() if t == "mlflow")

    k8s_images = {owner: c["image"] for owner, c in containers()}
    compose_images = {f"compose/{n}": s["image"] for n, s in compose()["services"].items()}
    for owner, image in {**k8s_images, **compose_images}.items():
        repo, tag = image_parts(image)
        assert tag != "latest", f"{owner}: pin a version, not latest"
        if repo in built:
            assert tag == PROJECT_VERSION, f"{owner}: {image} is not the package version {PROJECT_VERSION}"
    for owner, image in k8s_images.items():
        if owner.startswith("RayCluster/"):
            assert image_parts(image)[0] == train_repo, f"{owner} runs {image}, not the training image"
    assert (
        image_parts(one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["image"])[0]
        == mlflow_repo
    )
    services = compose()["services"]
    assert image_parts(services["mlflow"]["image"])[0] == mlflow_repo
    assert services["mlflow"]["build"]["target"] == built[mlflow_repo]
    assert (
        COMPOSE.parent / services["mlflow"]["build"]["context"] / services["mlflow"]["build"]["dockerfile"]
    ).resolve() == DOCKERFILE
    # third-party images: the same tag wherever a service runs in both places
    postgres = one("StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert services["postgres"]["image"] == postgres


def test_torch_and_cuda_of_the_image_come_from_one_place() -> None:
    stages = dockerfile_stages()
    text = DOCKERFILE.read_text()
    for name in ("torch", "ray", "deepspeed", "mlflow"):
        assert not re.search(rf"\b{name}\s*[=<>~]=", text), f"infra/Dockerfile pins {name} itself"
    train = stages["train"]
    assert any("pins.py torch" in r for r in train["run"]), "torch comes from pyproject's pin"
    assert any(r.startswith("pip install .") for r in train["run"]), "the package from pyproject.toml"
    assert any("pins.py mlflow" in r for r in stages["mlflow"]["run"])
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\S*runtime", train["base"])
    index = re.search(r"/whl/cu(\d+)$", stages["args"]["TORCH_INDEX"])
    assert cuda and index, (train["base"], stages["args"]["TORCH_INDEX"])
    assert index.group(1) == cuda.group(1) + cuda.group(2), "the torch wheel index matches the CUDA base"
    assert pins.requirement("torch") == f"torch=={pins.pinned_version('torch')}"


def test_ray_version_everywhere_is_the_package_pin() -> None:
    ray = pins.pinned_version("ray")
    assert one("RayCluster")["spec"]["rayVersion"] == ray
    # the cluster-launcher definition installs the same pins
    launcher = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    setup = " ".join(launcher["setup_commands"])
    assert f'"ray[default]=={ray}"' in setup
    assert f'"torch=={pins.pinned_version("torch")}"' in setup


def test_pins_reads_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["version"] == PROJECT_VERSION
    assert pins.requirement("ray") in project["dependencies"]
    with pytest.raises(ValueError, match="not pinned"):
        pins.pinned_version("mlflow")  # a range, not a pin
    with pytest.raises(KeyError, match="not in"):
        pins.requirement("tensorflow")


def _svc_port(name: str, port_name: str | None = None) -> dict[str, Any]:
    ports = one("Service", name)["spec"]["ports"]
    return ports[0] if port_name is None else next(p for p in ports if p["name"] == port_name)


def _named_container_port(container: dict[str, Any], target: str | int) -> int:
    if isinstance(target, int):
        return target
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == target)


def test_ports_agree() -> None:
    mlflow = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    svc = _svc_port("mlflow")
    port = _named_container_port(mlflow, svc["targetPort"])
    assert svc["port"] == port == int(env_value(mlflow, "MLFLOW_PORT"))
    stages = dockerfile_stages()
    assert stages["mlflow"]["expose"] == [port] and stages["mlflow"]["env"]["MLFLOW_PORT"] == str(port)
    services = compose()["services"]
    assert services["mlflow"]["environment"]["MLFLOW_PORT"] == str(port)
    assert [p.rsplit(":", 1)[1] for p in services["mlflow"]["ports"]] == [str(port)]
    # the probes and the Service reach the container's named port
    for probe in ("readinessProbe", "livenessProbe"):
        assert _named_container_port(mlflow, mlflow[probe]["httpGet"]["port"]) == port

    postgres = one("StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"][0]
    pg = _svc_port("postgres")
    assert pg["port"] == _named_container_port(postgres, pg["targetPort"]) == int(env_value(mlflow, "PGPORT"))
    assert services["mlflow"]["environment"]["PGPORT"] == str(pg["port"])

    # Ray head: the ports of the cluster-launcher definition
    head = one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    launcher = " ".join(yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())["head_start_ray_commands"])
    assert f"--port={head_ports['gcs-server']}" in launcher
    assert f"--dashboard-port={head_ports['dashboard']}" in launcher


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_select_their_pods_and_references_resolve() -> None:
    workloads = objects("Deployment") + objects("StatefulSet")
    for svc in objects("Service"):
        selected = [
            w
            for w in workloads
            if _selects(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(selected) == 1, f"Service {svc['metadata']['name']} selects {len(selected)} workloads"
    for w in workloads:
        assert _selects(w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])
    sts = one("StatefulSet", "postgres")
    assert one("Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    mounts = {m["name"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts == {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}

    mlflow = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert env_value(mlflow, "PGHOST") == sts["metadata"]["name"]
    pg_env = {e["name"]: e.get("value") for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env_value(mlflow, "PGUSER") == pg_env["POSTGRES_USER"]
    assert env_value(mlflow, "PGDATABASE") == pg_env["POSTGRES_DB"]
    # the two read the same password: same Secret and key
    pw = next(e for e in mlflow["env"] if e["name"] == "PGPASSWORD")["valueFrom"]["secretKeyRef"]
    spw = next(
        e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "POSTGRES_PASSWORD"
    )
    assert pw == spw["valueFrom"]["secretKeyRef"]

    # every volume mount has its volume; /dev/shm of the Ray pods is memory
    for owner, pod in pod_specs():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or owner.startswith("StatefulSet"), f"{owner}: {m['name']}"
                if m["mountPath"] == "/dev/shm":
                    assert volumes[m["name"]]["emptyDir"]["medium"] == "Memory"
        if owner.startswith("RayCluster"):
            assert any(m["mountPath"] == "/dev/shm" for c in pod["containers"] for m in c["volumeMounts"])


def test_the_job_runs_on_the_cluster_and_tracks_to_the_server() -> None:
    job, cluster = one("RayJob"), one("RayCluster")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    assert job["spec"]["shutdownAfterJobFinishes"] is False, "KubeRay refuses it with clusterSelector"


def _secret_refs() -> list[tuple[str, str, str]]:
    refs = []
    for owner, c in containers():
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.append((owner, ref["name"], ref["key"]))
    return refs


def test_no_secret_values_and_every_secret_is_documented() -> None:
    readme = (INFRA / "README.md").read_text()
    documented: dict[str, set[str]] = {}
    for m in re.finditer(r"create secret generic (\S+)((?:\s+\\?\s*--from-literal=\w+=\S+)+)", readme):
        documented[m.group(1)] = set(re.findall(r"--from-literal=(\w+)=", m.group(2)))
    refs = _secret_refs()
    assert refs
    for owner, name, key in refs:
        assert key in documented.get(name, set()), (
            f"{owner}: Secret {name} key {key} is not in infra/README.md"
        )
    assert {n for _, n, _ in refs} == set(documented), "infra/README.md creates Secrets nothing uses"
    for owner, c in containers():
        for e in c.get("env", []):
            if SECRETISH.search(e["name"]):
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], f"{owner}: {e['name']}"
    for cm in objects("ConfigMap"):
        assert not [k for k in cm["data"] if SECRETISH.search(k)], cm["metadata"]["name"]
    # compose: secrets only by interpolation from the caller's environment, required (:?)
    for name, service in compose()["services"].items():
        for var, value in (service.get("environment") or {}).items():
            if SECRETISH.search(var) or var in {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}:
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), f"compose {name}: {var}"


def test_env_variable_names_agree() -> None:
    from s3_server import S3Server  # the tests' S3-API server: the names the clients are tested with

    s3_names = set(S3Server(port=1).env())
    configmap = one("ConfigMap", "multitalent-storage")
    s3_secret_keys = {k for _, n, k in _secret_refs() if n == "multitalent-s3"}
    assert set(configmap["data"]) | s3_secret_keys == s3_names
    for owner, c in containers():
        if owner.startswith(("RayCluster", "Deployment/mlflow")):
            missing = s3_names - container_env_names(c)
            assert not missing, f"{owner} lacks {missing}"

    mlflow = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    services = compose()["services"]
    assert container_env_names(mlflow) == set(services["mlflow"]["environment"])
    assert s3_names <= set(services["createbucket"]["environment"])
    postgres = one("StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"][0]
    assert container_env_names(postgres) == set(services["postgres"]["environment"])
    # every variable given to the server is one infra/mlflow-server.sh reads, libpq's password, or the S3
    # client's configuration
    script = (INFRA / "mlflow-server.sh").read_text()
    read = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", script))
    unknown = container_env_names(mlflow) - read - {"PGPASSWORD"} - s3_names
    assert not unknown, f"infra/mlflow-server.sh reads none of {unknown}"


def _entrypoint() -> tuple[Any, list[str]]:
    from multitalent.cli import build_parser

    argv = shlex.split(one("RayJob")["spec"]["entrypoint"])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts, f"{argv[0]} is not a console script of the package"
    return build_parser().parse_args(argv[1:]), argv


def test_job_entrypoint_is_a_real_command_on_a_real_job_file() -> None:
    from multitalent.train.job import load_train_job

    args, argv = _entrypoint()
    assert argv[1] == "train" and args._target == "multitalent.train.cli:run"
    runtime_env = yaml.safe_load(one("RayJob")["spec"]["runtimeEnvYAML"])
    stages = dockerfile_stages()
    train = stages["train"]
    # the job file resolves in the submitted job's working directory: the image's WORKDIR, holding jobs/
    assert runtime_env["working_dir"] == train["workdir"]
    job_dir = Path(args.job).parts[0]
    assert [job_dir, job_dir] in train["copy"], f"the image must COPY {job_dir}/ into {train['workdir']}"
    assert (REPO / args.job).is_file()
    job = load_train_job(REPO / args.job, args.overrides)  # every --set names a real field, right type

    # the cluster has what the job asks for: one GPU per worker, the workers' CPUs on the GPU nodes
    cluster = one("RayCluster")["spec"]
    gpus = cpus = 0.0
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        per_node_gpus = parse_quantity(limits.get("nvidia.com/gpu", 0))
        gpus += group["replicas"] * per_node_gpus
        if per_node_gpus:
            workers_per_node = min(job.workers.num_workers, per_node_gpus)
            cpus = parse_quantity(limits["cpu"])
            assert workers_per_node * job.workers.resources_per_worker.get("CPU", 1) < cpus
    assert job.workers.use_gpu and job.workers.num_workers == gpus, "one worker per GPU of the cluster"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert (
        "nvidia.com/gpu"
        not in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )

    # tracking goes to the MLflow Service; data, runs and artifacts to the bucket compose creates
    mlflow_container = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    uri = urlparse(job.tracking.uri or "")
    svc = one("Service", "mlflow")
    assert uri.hostname == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert uri.port == svc["spec"]["ports"][0]["port"]
    assert uri.netloc in env_value(mlflow_container, "MLFLOW_ALLOWED_HOSTS").split(",")
    buckets = {
        urlparse(u).netloc
        for u in (
            job.shards.path,
            job.run.storage_path,
            env_value(mlflow_container, "MLFLOW_ARTIFACTS_DESTINATION"),
        )
    }
    assert {urlparse(u).scheme for u in (job.shards.path, job.run.storage_path)} == {"s3"}
    script = "\n".join(compose()["services"]["createbucket"]["entrypoint"])
    created = re.findall(r'create_bucket\(Bucket="([^"]+)"\)', script)
    assert buckets == set(created) and len(created) == 1
    assert compose()["services"]["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"] == env_value(
        mlflow_container, "MLFLOW_ARTIFACTS_DESTINATION"
    )


def test_shared_memory_holds_the_object_store_and_the_loaders_batches() -> None:
    from multitalent.train.job import load_train_job

    args, _ = _entrypoint()
    job = load_train_job(REPO / args.job, args.overrides)
    group = one("RayCluster")["spec"]["workerGroupSpecs"][0]
    pod = group["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    shm = next(v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory")
    object_store = int(group["rayStartParams"]["object-store-memory"])
    workers = min(job.workers.num_workers, int(limits["nvidia.com/gpu"]))
    batch = job.micro_batch * sizing.math.prod(sizing.READ_ZYX) * (4 + 1)  # float32 image + uint8 label
    in_flight = workers * job.data.loader_workers * sizing.PREFETCH * batch
    assert parse_quantity(shm["emptyDir"]["sizeLimit"]) >= object_store + in_flight
    assert parse_quantity(limits["memory"]) > parse_quantity(shm["emptyDir"]["sizeLimit"])


# ------------------------------------------------------------------------------------ sizing page
SIZING_BEGIN, SIZING_END = "<!-- sizing:begin (python3 infra/sizing.py) -->", "<!-- sizing:end -->"
# the streaming figure quoted on the sizing page is the one docs/benchmarks.md measured
STREAM_FIGURE = "83 MB/s per loader process"


def test_readme_holds_the_sizing_scripts_output() -> None:
    readme = (INFRA / "README.md").read_text()
    assert readme.count(SIZING_BEGIN) == 1 and readme.count(SIZING_END) == 1
    block = readme.split(SIZING_BEGIN)[1].split(SIZING_END)[0]
    assert block.strip() == sizing.render().strip(), "rerun python3 infra/sizing.py and paste its output"
    assert readme.count(STREAM_FIGURE) == 1
    bench = (REPO / "docs" / "benchmarks.md").read_text()
    assert "| WebDataset stream + decode, S3 | 302 case/s | 83.1 MB/s |" in bench


def test_sizing_inputs_are_the_measured_and_configured_figures() -> None:
    from multitalent.data.augment import AugmentConfig, read_shape_zyx
    from multitalent.train.job import WebDatasetSection, load_train_job

    bench = (REPO / "docs" / "benchmarks.md").read_text()
    for net, figure in (
        ("U-Net", "221.8, 9.7 GiB"),
        ("ResEnc U-Net", "241.6, 10.7 GiB"),
        ("SwinUNETR", "448.4, 17.6 GiB"),
    ):
        assert (
            figure == f"{sizing.STEP_S[net] * 1000:.1f}, {sizing.GPU_PEAK_GIB[net]} GiB" and figure in bench
        )
    for text in (
        f"| {sizing.LOADER_SAMPLES_PER_CPU_S_GPU_AUG} |",
        f"| {sizing.LOADER_SAMPLES_PER_CPU_S_CPU_AUG} |",
        f"**{sizing.WDS_TAR_MB} MB** | 1.54 s (0.92) | 410 ms ({sizing.WDS_DECODE_CPU_S * 1000:.0f})",
        f"| {sizing.WDS_RAW_TAR_MB} MB |",
        f"**{sizing.ZARR_STORE_MB} MB**",
        "read 210×308×308",
    ):
        assert text in bench, text
    pretrain = load_train_job(REPO / "jobs" / "pretrain.yaml")
    assert tuple(pretrain.architecture.patch_zyx) == sizing.PATCH_ZYX
    assert pretrain.micro_batch == sizing.BATCH_PER_GPU
    assert pretrain.data.loader_workers == sizing.LOADER_WORKERS
    assert read_shape_zyx(sizing.PATCH_ZYX, AugmentConfig()) == sizing.READ_ZYX
    defaults = WebDatasetSection()
    assert (defaults.shuffle_buffer, defaults.patches_per_case) == (
        sizing.SHUFFLE_BUFFER,
        sizing.PATCHES_PER_CASE,
    )
    data_readme = (REPO / "data_shards" / "README.md").read_text()
    assert "Chunks " + "×".join(map(str, sizing.CHUNK_ZYX)) in data_readme


def test_sizing_arithmetic_on_a_hand_computed_case() -> None:
    # MSD liver: 432 x 512 x 512 at (1, 0.77, 0.77) mm -> 288 x 394 x 394 at (1.5, 1, 1) mm; the enlarged
    # read 210 x 308 x 308 touches 64 + 210 - 1 = 273 slices and min(128 + 308 - 1, 394) = 394 rows/columns.
    liver = sizing.MULTITALENT13[0]
    assert sizing.resampled_zyx(liver) == (288, 394, 394)
    assert sizing.fetched_zyx(liver) == (273, 394, 394)
    # a dataset of n cases is drawn with probability sqrt(n) / sum(sqrt(n_d))
    c = sizing.Collection(
        "two",
        (sizing.Dataset("a", 4, (1, 1, 1), (1.5, 1, 1)), sizing.Dataset("b", 16, (1, 1, 1), (1.5, 1, 1))),
    )
    assert c.p_dataset(c.datasets[0]) == pytest.approx(2 / 6)
    assert c.wds_bytes_per_sample(3.0) == pytest.approx(1 * 3.0 / sizing.PATCHES_PER_CASE)
