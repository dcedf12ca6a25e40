"""deploy/: the Kubernetes and KServe manifests, checked without a cluster.

Every core Kubernetes object is validated offline, in strict mode (unknown fields are
errors), against the Kubernetes JSON schemas that kubernetes-validate ships. Custom resources
(KServe's InferenceService, the Prometheus Operator's ServiceMonitor) are not in those schemas
and get structural checks instead. Then the pieces are checked against each other: the
Service's ports are the container's, the probes hit the HTTP port, the HPA scales the
Deployment on the metric the prometheus-adapter rule publishes, the model repository path is
where the volume is mounted, the image tag is pinned.

The object-store overlay is a JSON patch (RFC 6902), which this file applies itself, so the
patched Deployment is validated like the others; where kubectl is installed, `kubectl
kustomize` renders both kustomizations and must agree.
"""

from __future__ import annotations

import copy
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML reads the manifests (it comes with kubernetes-validate)")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KSERVE = DEPLOY / "kserve"
DOCS = ROOT / "docs" / "deploy.md"

# The newest Kubernetes whose schemas kubernetes-validate 1.37.0 ships, and an older one still
# in service, so that nothing here needs a brand-new cluster.
K8S_VERSIONS = ("1.32.0", "1.37.0")
# API groups of custom resources: checked structurally, not against the core schemas.
CUSTOM_GROUPS = {"monitoring.coreos.com", "serving.kserve.io"}
TRITON_IMAGE = re.compile(r"^nvcr\.io/nvidia/tritonserver:(?P<tag>\d{2}\.\d{2}-py3)$")
PORT_FLAGS = {"http": "--http-port", "grpc": "--grpc-port", "metrics": "--metrics-port"}
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


# -- loading --------------------------------------------------------------------------------


def load_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def load(path: Path):
    (doc,) = load_all(path)
    return doc


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def kind_of(path: Path, doc) -> str:
    """What a YAML document in deploy/ is, which decides how it is checked."""
    if path.name == "kustomization.yaml":
        return "kustomization"
    if path.name.endswith("-values.yaml"):
        return "helm-values"
    if isinstance(doc, list):
        return "json-patch"
    if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
        return "custom" if group in CUSTOM_GROUPS else "core"
    return "unknown"


def documents(kind: str) -> list[tuple[str, object]]:
    return [(f"{p.relative_to(DEPLOY)}#{i}", d) for p in yaml_files()
            for i, d in enumerate(load_all(p)) if kind_of(p, d) == kind]


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


# -- a minimal kustomize: resources and JSON-patch patches, all these files use -------------


def json_pointer(doc, pointer: str):
    """(parent, key) of an RFC 6901 pointer."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    parent = doc
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    key = parts[-1]
    if isinstance(parent, list):
        key = len(parent) if key == "-" else int(key)
    return parent, key


def apply_json_patch(doc: dict, ops: list[dict]) -> dict:
    doc = copy.deepcopy(doc)
    for op in ops:
        parent, key = json_pointer(doc, op["path"])
        if op["op"] == "test":
            assert parent[key] == op["value"], f"patch test failed at {op['path']}: {parent[key]!r}"
        elif op["op"] == "replace":
            parent[key]  # noqa: B018 - replace needs an existing target
            parent[key] = copy.deepcopy(op["value"])
        elif op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(key, copy.deepcopy(op["value"]))
            else:
                parent[key] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del parent[key]
        else:
            raise AssertionError(f"unsupported JSON patch op {op['op']!r}")
    return doc


def build(directory: Path) -> list[dict]:
    """What `kustomize build directory` gives for the features these kustomizations use."""
    kustomization = load(directory / "kustomization.yaml")
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    assert not unsupported, f"{directory}: the test's kustomize does not know {unsupported}"
    docs = []
    for resource in kustomization["resources"]:
        path = directory / resource
        docs += build(path) if path.is_dir() else load_all(path)
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        api = f"{target['group']}/{target['version']}" if target.get("group") else target["version"]
        hits = [i for i, d in enumerate(docs) if (d["apiVersion"], d["kind"], d["metadata"]["name"])
                == (api, target["kind"], target["name"])]
        assert len(hits) == 1, f"patch target {target} matches {len(hits)} objects"
        docs[hits[0]] = apply_json_patch(docs[hits[0]], load(directory / patch["path"]))
    return docs


def keyed(docs: list[dict]) -> dict:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


# -- the pieces ----------------------------------------------------------------------------


def container(deployment: dict) -> dict:
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "tritonserver"]
    return c


def flag(c: dict, name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in c.get("args", []) if a.startswith(name + "=")]
    assert len(values) <= 1, f"{name} given {len(values)} times"
    return values[0] if values else None


def container_ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


def port_problems(deployment: dict, service: dict) -> list[str]:
    """The Service exposes exactly the container's named ports, under the same numbers, and
    Triton listens where the container says."""
    c = container(deployment)
    ports = container_ports(c)
    problems = []
    for p in service["spec"]["ports"]:
        target = p.get("targetPort", p["port"])
        number = ports.get(target) if isinstance(target, str) else target
        if number not in ports.values():
            problems.append(f"service port {p['name']} targets {target!r}, which the container does not open")
        elif number != p["port"]:
            problems.append(f"service port {p['name']} is {p['port']} but the container's is {number}")
    if {p["name"] for p in service["spec"]["ports"]} != set(ports):
        problems.append(f"service ports {[p['name'] for p in service['spec']['ports']]} != container ports {sorted(ports)}")
    for name, option in PORT_FLAGS.items():
        if name not in ports or flag(c, option) != str(ports[name]):
            problems.append(f"{option}={flag(c, option)} but container port {name} is {ports.get(name)}")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"]):
        if not selector.items() <= labels.items():
            problems.append(f"selector {selector} does not match the pod labels {labels}")
    return problems


def probe_problems(deployment: dict) -> list[str]:
    c = container(deployment)
    ports = container_ports(c)
    expected = {"startupProbe": "/v2/health/live", "livenessProbe": "/v2/health/live",
                "readinessProbe": "/v2/health/ready"}
    problems = []
    for probe, path in expected.items():
        get = c.get(probe, {}).get("httpGet")
        if get is None:
            problems.append(f"no HTTP {probe}")
            continue
        port = ports.get(get["port"]) if isinstance(get["port"], str) else get["port"]
        if port != ports["http"]:
            problems.append(f"{probe} hits port {get['port']!r}, not Triton's HTTP port {ports['http']}")
        if get["path"] != path:
            problems.append(f"{probe} asks {get['path']}, not {path}")
    return problems


def repository_problems(deployment: dict, claim: str | None) -> list[str]:
    """--model-repository names either a mounted PersistentVolumeClaim (claim) or a bucket."""
    c = container(deployment)
    spec = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    env = {e["name"]: e for e in c.get("env", [])}
    repository = flag(c, "--model-repository")
    problems = []
    if repository is None:
        return ["no --model-repository"]
    if repository.startswith("/"):
        mount = mounts.get(repository)
        volume = volumes.get(mount["name"], {}) if mount else {}
        if volume.get("persistentVolumeClaim", {}).get("claimName") != claim:
            problems.append(f"--model-repository={repository} is not a mount of the claim {claim}")
        elif not mount.get("readOnly"):
            problems.append(f"the repository mount {repository} is writable")
    elif repository.startswith("s3://"):
        if any("persistentVolumeClaim" in v for v in volumes.values()):
            problems.append("the object-store variant still mounts a PersistentVolumeClaim")
        secrets = {env.get(n, {}).get("valueFrom", {}).get("secretKeyRef", {}).get("name") for n in S3_ENV}
        if None in secrets or len(secrets) != 1:
            problems.append(f"{S3_ENV} do not all come from one Secret")
        cache = env.get("TRITON_AWS_MOUNT_DIRECTORY", {}).get("value")
        mount = mounts.get(cache)
        if not mount or "emptyDir" not in volumes.get(mount["name"], {}):
            problems.append(f"TRITON_AWS_MOUNT_DIRECTORY={cache} is not an emptyDir mount")
    else:
        problems.append(f"--model-repository={repository} is neither a path nor s3://")
    return problems


def adapter_rules() -> tuple[list[dict], list[dict]]:
    config_map = load(KUBERNETES / "monitoring" / "prometheus-adapter-config.yaml")
    values = load(KUBERNETES / "monitoring" / "prometheus-adapter-values.yaml")
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"], values["rules"]["custom"]


@pytest.fixture(scope="module")
def default_build():
    return keyed(build(KUBERNETES))


@pytest.fixture(scope="module")
def object_store_build():
    return keyed(build(KUBERNETES / "overlays" / "object-store"))


# -- schemas -------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails the test: the schemas must come from the package."""
    def refuse(*args, **kwargs):
        raise AssertionError("schema validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def kv(offline):
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate (dev extra) ships the Kubernetes JSON schemas; pip install kubernetes-validate==1.37.0")


def strictly_valid(kv, doc: dict, version: str) -> None:
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as e:  # its str() carries the whole schema: report the point
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {'.'.join(map(str, e.path))}: {e.message}")


def test_every_yaml_file_in_deploy_is_checked():
    kinds = {f"{p.relative_to(DEPLOY)}#{i}": kind_of(p, d) for p in yaml_files() for i, d in enumerate(load_all(p))}
    assert kinds and "unknown" not in kinds.values(), kinds
    # Custom resources must be ones this file has structural checks for.
    custom = {(d["apiVersion"], d["kind"]) for _, d in documents("custom")}
    assert custom == {("monitoring.coreos.com/v1", "ServiceMonitor"), ("serving.kserve.io/v1beta1", "InferenceService")}


def test_the_validator_is_strict_and_offline(kv):
    """The schema checks below can fail: a misspelt field, a wrong type or an unknown kind is refused."""
    good = load(KUBERNETES / "base" / "deployment.yaml")
    assert kv.validate(good, "1.37.0", strict=True) == "1.37"
    misspelt = copy.deepcopy(good)
    container(misspelt)["livenessProbe"]["timeoutSecs"] = 2
    kv.validate(misspelt, "1.37.0", strict=False)  # the lenient schemas let it through...
    with pytest.raises(kv.ValidationError, match="timeoutSecs"):
        kv.validate(misspelt, "1.37.0", strict=True)  # ...the strict ones do not
    wrong_type = copy.deepcopy(good)
    container(wrong_type)["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong_type, "1.37.0", strict=True)
    hpa = load(KUBERNETES / "base" / "hpa.yaml")
    v2beta2 = dict(hpa, apiVersion="autoscaling/v2beta2")  # removed in Kubernetes 1.26
    with pytest.raises(kv.SchemaNotFoundError):
        kv.validate(v2beta2, "1.37.0", strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("where", "doc"), documents("core"), ids=[w for w, _ in documents("core")])
def test_core_manifest_matches_the_kubernetes_schema(kv, where, doc, version):
    strictly_valid(kv, doc, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_object_store_overlay_gives_a_valid_deployment(kv, object_store_build, version):
    for doc in object_store_build.values():
        strictly_valid(kv, doc, version)


# -- kustomize -----------------------------------------------------------------------------


def test_kustomizations(default_build, object_store_build):
    assert set(default_build) == {("Deployment", "attnserve-triton"), ("Service", "attnserve-triton"),
                                  ("HorizontalPodAutoscaler", "attnserve-triton"),
                                  ("PersistentVolumeClaim", "attnserve-model-repository")}
    # The object-store variant drops the claim and touches nothing but the Deployment.
    assert set(object_store_build) == set(default_build) - {("PersistentVolumeClaim", "attnserve-model-repository")}
    for key in object_store_build:
        if key[0] != "Deployment":
            assert object_store_build[key] == default_build[key]


def test_a_json_patch_whose_test_fails_is_refused(default_build):
    ops = load(KUBERNETES / "overlays" / "object-store" / "deployment-patch.yaml")
    moved = copy.deepcopy(default_build["Deployment", "attnserve-triton"])
    container(moved)["args"].insert(1, "--log-verbose=1")  # the repository flag is no longer args[1]
    with pytest.raises(AssertionError, match="patch test failed"):
        apply_json_patch(moved, ops)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (its kustomize renders the overlays)")
@pytest.mark.parametrize("directory", [KUBERNETES, KUBERNETES / "overlays" / "object-store"], ids=["default", "object-store"])
def test_kubectl_kustomize_agrees(directory):
    rendered = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    assert keyed([d for d in yaml.safe_load_all(rendered.stdout) if d]) == keyed(build(directory))


# -- consistency ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["default", "object-store"])
def test_service_ports_and_args_match_the_container(variant, default_build, object_store_build):
    docs = default_build if variant == "default" else object_store_build
    assert port_problems(docs["Deployment", "attnserve-triton"], docs["Service", "attnserve-triton"]) == []


def test_port_mismatches_are_caught(default_build):
    deployment, service = default_build["Deployment", "attnserve-triton"], default_build["Service", "attnserve-triton"]
    renamed = copy.deepcopy(service)
    renamed["spec"]["ports"][2]["targetPort"] = "metric"
    assert any("does not open" in p for p in port_problems(deployment, renamed))
    moved = copy.deepcopy(deployment)
    container(moved)["ports"][2]["containerPort"] = 9002
    assert any("--metrics-port=8002" in p for p in port_problems(moved, service))


def test_probes_hit_triton_health_endpoints_on_the_http_port(default_build):
    deployment = default_build["Deployment", "attnserve-triton"]
    assert probe_problems(deployment) == []
    wrong = copy.deepcopy(deployment)
    container(wrong)["readinessProbe"]["httpGet"]["port"] = "metrics"
    assert probe_problems(wrong) == ["readinessProbe hits port 'metrics', not Triton's HTTP port 8000"]


def test_the_model_repository_is_the_mounted_claim(default_build):
    deployment = default_build["Deployment", "attnserve-triton"]
    claim = default_build["PersistentVolumeClaim", "attnserve-model-repository"]
    # Replicas on different nodes share the claim.
    assert set(claim["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}
    assert repository_problems(deployment, claim["metadata"]["name"]) == []
    elsewhere = copy.deepcopy(deployment)
    container(elsewhere)["args"] = [a.replace("/models", "/srv/models") for a in container(elsewhere)["args"]]
    assert repository_problems(elsewhere, claim["metadata"]["name"]) == [
        "--model-repository=/srv/models is not a mount of the claim attnserve-model-repository"]
    loader = load(KUBERNETES / "tools" / "repository-loader.yaml")
    assert loader["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_the_object_store_variant_reads_a_bucket_with_secret_credentials(object_store_build):
    deployment = object_store_build["Deployment", "attnserve-triton"]
    assert flag(container(deployment), "--model-repository").startswith("s3://")
    assert repository_problems(deployment, None) == []


def image_tag() -> str:
    deployment = load(KUBERNETES / "base" / "deployment.yaml")
    match = TRITON_IMAGE.match(container(deployment)["image"])
    assert match, f"{container(deployment)['image']} is not a pinned NGC Triton image"
    return match["tag"]


def test_images_are_pinned():
    image_tag()
    for _, doc in documents("core"):
        pod = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"] if doc["kind"] == "Pod" else None
        for c in (pod or {}).get("containers", []):
            name, _, tag = c["image"].rpartition(":")
            assert name and "/" not in tag and tag not in ("", "latest"), f"{c['image']} is not pinned"


def test_triton_gets_one_gpu(default_build):
    resources = container(default_build["Deployment", "attnserve-triton"])["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1


def test_the_hpa_scales_the_deployment_on_the_adapters_queue_metric(default_build):
    hpa, deployment = default_build["HorizontalPodAutoscaler", "attnserve-triton"], default_build["Deployment", "attnserve-triton"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    config_rules, helm_rules = adapter_rules()
    assert config_rules == helm_rules, "the ConfigMap and the Helm values must carry the same rule"
    (rule,) = config_rules
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert "nv_inference_queue_duration_us" in rule["seriesQuery"]
    assert "nv_inference_request_success" in rule["metricsQuery"]
    # The adapter maps the series to pods by the labels the ServiceMonitor's targets carry.
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


def test_service_monitor_scrapes_the_metrics_port(default_build):
    (monitor,) = [d for _, d in documents("custom") if d["kind"] == "ServiceMonitor"]
    service = default_build["Service", "attnserve-triton"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["name"]
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in names and endpoint["path"] == "/metrics"
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}


def test_kserve_inference_service():
    (isvc,) = [d for _, d in documents("custom") if d["kind"] == "InferenceService"]
    claim = load(KUBERNETES / "model-repository-pvc.yaml")["metadata"]["name"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", isvc["metadata"]["name"])
    assert set(isvc["spec"]) <= {"predictor", "transformer", "explainer"}
    predictor = isvc["spec"]["predictor"]
    frameworks = {"sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml",
                  "lightgbm", "paddle", "model"}
    assert set(predictor) & frameworks == {"model"}, "exactly one predictor implementation"
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
    assert model["storageUri"] in (f"pvc://{claim}", f"pvc://{claim}/")
    assert model["runtimeVersion"] == image_tag(), "KServe runs the same Triton as deploy/kubernetes"
    assert str(model["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Standard")
    # KServe leaves scaling to deploy/kserve/hpa.yaml, which targets the predictor's Deployment.
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"
    hpa = load(KSERVE / "hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{isvc['metadata']['name']}-predictor"
    assert hpa["spec"]["metrics"] == load(KUBERNETES / "base" / "hpa.yaml")["spec"]["metrics"]


def test_the_docs_follow_the_manifests():
    text = DOCS.read_text()
    assert f"tritonserver:{image_tag()}" in text
    (rule,), _ = adapter_rules()
    for name in (rule["name"]["as"], "nv_inference_queue_duration_us", "nv_inference_request_success",
                 "nv_inference_pending_request_count", "nv_gpu_utilization"):
        assert f"`{name}`" in text, name
    assert "kubectl apply -k deploy/kubernetes" in text


def test_the_cli_docker_command_uses_the_deployed_image():
    from attnserve.serving import NGC_IMAGE

    deployment = (ROOT / "deploy" / "kubernetes" / "base" / "deployment.yaml").read_text()
    assert f"image: {NGC_IMAGE}" in deployment
