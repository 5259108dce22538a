"""deploy/k8s renders, validates and keeps its invariants, without a cluster.

Every overlay is rendered with `kubectl kustomize`; built-in kinds are validated by `kubernetes-validate` in
strict mode, the Prometheus Operator kinds by `check-jsonschema` against the schemas vendored in
deploy/k8s/schemas (made from the upstream CRDs). The recording rules are run by `promtool test rules` on two
real scrapes of a running tritonserver. The tools are part of the test set-up (`make test` installs them:
kubectl comes with the machine image, promtool with Debian's `prometheus`, the validators with the dev
extras); a missing tool fails here with the install line instead of skipping.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import tomllib
import yaml
from prometheus_client.parser import text_string_to_metric_families

from build_engine.gpu import pipeline
from build_engine.gpu.settings import PROFILES, TRITON_IMAGE, TRITON_IMAGE_TAG, settings_from_env
from build_engine.render import TARGET_MODELS
from gateway.app import create_app
from gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("gpu", "gpu-tp2", "cpu")
GPU_OVERLAYS = ("gpu", "gpu-tp2")
# The oldest Kubernetes minor still under (extended) support from the big clouds, and the newest.
K8S_VERSIONS = ("1.33.0", "1.37.0")
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PrometheusRule"): K8S / "schemas" / "prometheusrule-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): K8S / "schemas" / "podmonitor-monitoring-v1.json",
}
# GA API versions only: a removed or beta version (autoscaling/v2beta2, policy/v1beta1 ...) fails here.
STABLE_API_VERSIONS = {
    "v1",
    "apps/v1",
    "batch/v1",
    "policy/v1",
    "autoscaling/v2",
    "networking.k8s.io/v1",
    "monitoring.coreos.com/v1",
}
SECRETS = {"gateway-api-keys", "hf-token"}  # created out of band (docs/scale.md)


def _tool(name: str, install: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"`{name}` is needed to check deploy/k8s: {install}")
    return path


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = _tool("kubectl", "install kubectl >= 1.27 (it embeds kustomize v5)")
    res = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@cache
def _rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


def rendered(overlay: str) -> list[dict[str, Any]]:
    return list(_rendered(overlay))


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def environment(docs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it (envFrom ConfigMaps, then env literals and
    ConfigMap keys; secrets stay unresolved)."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(maps[src["configMapRef"]["name"]])
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in (var.get("valueFrom") or {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = maps[ref["name"]][ref["key"]]
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_default(value: str, overrides: dict[str, str] | None = None) -> str:
    """A compose value with its ${VAR:-default} / ${VAR:?msg} references resolved (overrides first; the image
    tag from build_engine/gpu/settings.py)."""
    known = {"TRITON_IMAGE_TAG": TRITON_IMAGE_TAG, **(overrides or {})}

    def sub(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in known:
            return known[name]
        assert op == ":-", f"compose ${{{name}}} has no default to compare with"
        return default

    return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", sub, value)


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# --- rendering and schema validation -------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates(overlay: str, tmp_path: Path) -> None:
    docs = rendered(overlay)
    crds = []
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        assert doc["apiVersion"] in STABLE_API_VERSIONS, key
        if key in CRD_SCHEMAS:
            crds.append(doc)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
                pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} on {version}: {exc}")
    for doc in crds:
        check_crd(doc, tmp_path)
    if overlay in GPU_OVERLAYS:
        assert {d["kind"] for d in crds} == {"PodMonitor", "PrometheusRule"}


def test_monitoring_kustomization_validates() -> None:
    (cm,) = kustomize(K8S / "monitoring")
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(cm, version, strict=True)
    assert cm["metadata"]["namespace"] == "monitoring"


def check_crd(doc: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    schema = CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]
    instance = tmp_path / f"{doc['kind']}-{doc['metadata']['name']}.json"
    instance.write_text(json.dumps(doc))
    res = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema), str(instance)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, f"{doc['kind']}/{doc['metadata']['name']}: {res.stdout}{res.stderr}"
    return res


def test_validators_are_strict(tmp_path: Path) -> None:
    """A misspelt field fails both validators (they would otherwise let it through silently)."""
    docs = rendered("gpu")
    deployment = json.loads(json.dumps(one(docs, "Deployment", "triton")))
    container(deployment, "triton")["readinessProbes"] = container(deployment, "triton")["readinessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    rule = json.loads(json.dumps(one(docs, "PrometheusRule", "triton-autoscaling")))
    rule["spec"]["groups"][0]["rules"][0]["recrod"] = "typo"
    with pytest.raises(AssertionError):
        check_crd(rule, tmp_path)
    hpa = one(docs, "HorizontalPodAutoscaler", "triton")
    removed = {**hpa, "apiVersion": "autoscaling/v2beta2"}  # removed in Kubernetes 1.26
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(removed, K8S_VERSIONS[-1], strict=True)


def test_vendored_schemas_name_their_source() -> None:
    for path in CRD_SCHEMAS.values():
        comment = json.loads(path.read_text())["$comment"]
        assert "prometheus-operator/prometheus-operator" in comment and "crd_to_jsonschema.py" in comment


# --- the gateway and the headless Service --------------------------------------------------------------


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gateway_targets_the_headless_service(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rendered(overlay)
    svc = one(docs, "Service", "triton-grpc")
    assert svc["spec"]["clusterIP"] == "None", "a ClusterIP pins each gateway's connection to one pod"
    grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
    triton = one(docs, "Deployment", "triton")
    labels = triton["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert grpc_port["targetPort"] in {p["name"] for p in container(triton, "triton")["ports"]}
    assert any(p["name"] == "metrics" for p in svc["spec"]["ports"])

    gateway = container(one(docs, "Deployment", "gateway"), "gateway")
    env = environment(docs, gateway)
    ns = svc["metadata"]["namespace"]
    expected = f"dns:///{svc['metadata']['name']}.{ns}.svc.cluster.local:{grpc_port['port']}"
    assert env["TRITON_GRPC_URL"] == expected
    # The gateway reads that variable (its settings, not a name made up here).
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = GatewaySettings()
    assert settings.grpc_url == expected
    # ... and resolves it to one backend per pod (gateway/triton/pool.py).
    from gateway.triton.pool import Targets

    assert Targets.parse(settings.grpc_url).dns_host == f"{svc['metadata']['name']}.{ns}.svc.cluster.local"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_workers_have_cores_and_a_metrics_directory(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several workers need prometheus_client's multiprocess directory on a writable, per-pod volume, and a
    CPU request of at least one core per worker."""
    docs = rendered(overlay)
    deployment = one(docs, "Deployment", "gateway")
    gateway = container(deployment, "gateway")
    env = environment(docs, gateway)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    workers = GatewaySettings().workers
    assert float(gateway["resources"]["requests"]["cpu"]) >= workers
    if workers > 1:
        directory = env["PROMETHEUS_MULTIPROC_DIR"]
        mount = next(m for m in gateway["volumeMounts"] if m["mountPath"] == directory)
        volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"])
        assert "emptyDir" in volume and not mount.get("readOnly")


def test_cpu_overlay_is_the_all_in_one_pod() -> None:
    docs = rendered("cpu")
    kinds = {d["kind"] for d in docs}
    assert not kinds & {
        "Job",
        "PersistentVolumeClaim",
        "PodMonitor",
        "PrometheusRule",
        "HorizontalPodAutoscaler",
    }
    gw = one(docs, "Deployment", "gateway")
    c = container(gw, "gateway")
    assert c["image"].split(":")[0].endswith("/" + compose_image_name("cpu"))
    assert "TRITON_GRPC_URL" not in environment(docs, c), "Triton is inside the pod (stack.serve)"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/dev/shm", "/root/.cache/gemma3-triton"} <= mounts
    assert gw["spec"]["replicas"] == 1


# --- probes ---------------------------------------------------------------------------------------------


def gateway_get_routes() -> set[str]:
    app = create_app(GatewaySettings())
    return {r.path for r in app.routes if "GET" in getattr(r, "methods", set())}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_probes_are_gateway_routes(overlay: str) -> None:
    c = container(one(rendered(overlay), "Deployment", "gateway"), "gateway")
    routes = gateway_get_routes()
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in routes, probe
        assert c[probe]["httpGet"]["port"] in {p["name"] for p in c["ports"]}


TRITON_PROBE_PATHS = {"/v2/health/ready", "/v2/health/live"}  # KServe v2 health, served by tritonserver


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_triton_probes(overlay: str) -> None:
    c = container(one(rendered(overlay), "Deployment", "triton"), "triton")
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} <= (
        TRITON_PROBE_PATHS
    )
    http = next(p["containerPort"] for p in c["ports"] if p["name"] == c["readinessProbe"]["httpGet"]["port"])
    assert f"--http-port={http}" in c["args"]
    # At least compose's start period for the engine load.
    start = c["startupProbe"]
    budget = start["periodSeconds"] * start["failureThreshold"]
    assert budget >= int(compose()["services"]["triton"]["healthcheck"]["start_period"].rstrip("s"))


# --- the Triton tier matches compose ---------------------------------------------------------------------


def compose_image_name(service: str) -> str:
    return compose()["services"][service]["image"].split(":")[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_match_compose(overlay: str) -> None:
    docs = rendered(overlay)
    svc = compose()["services"]
    ngc = compose_default(svc["triton"]["image"])
    assert ngc == compose_default(svc["builder"]["image"]) == TRITON_IMAGE
    version = project_version()
    for d in docs:
        if d["kind"] not in ("Deployment", "Job"):
            continue
        spec = pod_spec(d)
        for c in spec["containers"] + spec.get("initContainers", []):
            image = c["image"]
            if image.startswith("nvcr.io/"):
                assert image == ngc, f"{d['metadata']['name']}/{c['name']}"
            else:  # ours: the compose image name, tagged with the project version
                name, tag = image.rsplit(":", 1)
                assert tag == version, image
                ours = {compose_image_name("gateway"), compose_image_name("cpu"), "gemma3-code"}
                assert name.rsplit("/", 1)[-1] in ours, image


def test_code_image_carries_what_the_gpu_pods_import() -> None:
    """The init container's image holds every first-party package the builder and the GPU models import."""
    copied = set(re.findall(r"^COPY (\S+) /workspace/", (ROOT / "docker/code.Dockerfile").read_text(), re.M))
    first_party = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    imported: set[str] = {"build_engine", "model_repository"}  # `python -m build_engine`, its templates
    for src, _ in TARGET_MODELS["gpu"]:
        for py in (ROOT / "model_repository" / src).rglob("*.py"):
            imported |= set(re.findall(r"^\s*(?:from|import) (\w+)", py.read_text(), re.M)) & first_party
    for py in (ROOT / "build_engine").rglob("*.py"):
        imported |= set(re.findall(r"^(?:from|import) (\w+)", py.read_text(), re.M)) & first_party
    imported.discard("stack")  # the CPU reference engine only (cpu.py), never on the GPU path
    assert imported <= copied, imported - copied


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_triton_runs_what_compose_runs(overlay: str) -> None:
    docs = rendered(overlay)
    triton = container(one(docs, "Deployment", "triton"), "triton")
    env = environment(docs, triton)
    c = compose()["services"]["triton"]
    # Same arguments once both sides' variables are resolved from this overlay's engine config.
    expected = [compose_default(a, env) for a in c["command"]]
    assert [expand(a, env) for a in triton["args"]] == expected
    # The repository path is where the build writes it (build_engine owns that layout).
    settings = settings_from_env(env)
    assert f"--model-repository={settings.repository_dir}" in expected
    # Like compose's depends_on on the builder: the pod waits for the build's last stage.
    assert pipeline.ALL[-1] == "repository"
    (wait,) = [
        c
        for c in pod_spec(one(docs, "Deployment", "triton"))["initContainers"]
        if c["name"] == "wait-for-engines"
    ]
    assert expand(wait["command"][-1], environment(docs, wait)) == str(
        settings.repository_dir / "ensemble" / "config.pbtxt"
    )
    # Every variable compose gives Triton, with compose's default unless the overlay is about changing it.
    changed = {"gpu": {}, "gpu-tp2": {"TRTLLM_ORCHESTRATOR": "1"}}[overlay]
    for name, value in c["environment"].items():
        assert name in env, name
        assert env[name] == changed.get(name, compose_default(str(value))), name
    gpus = int(triton["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == settings.tp_size == int(triton["resources"]["requests"]["nvidia.com/gpu"])
    if settings.tp_size > 1:
        assert env["TRTLLM_ORCHESTRATOR"] == "1"
        assert one(docs, "Deployment", "triton")["spec"]["replicas"] == 1
    shm = next(v for v in pod_spec(one(docs, "Deployment", "triton"))["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert any(m["mountPath"] == "/dev/shm" for m in triton["volumeMounts"])


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_window_size_shares(overlay: str) -> None:
    """TRTLLM_WINDOW_SIZE_SHARES: one share per distinct attention window, ascending windows, summing to
    exactly 1 (TensorRT-LLM asserts it), the split build_engine/gpu/kv_capacity.py computes for the
    overlay's profile (what compose defaults to)."""
    docs = rendered(overlay)
    env = environment(docs, container(one(docs, "Deployment", "triton"), "triton"))
    shares = [float(s) for s in env["TRTLLM_WINDOW_SIZE_SHARES"].split(",")]
    profile = PROFILES[env["ENGINE_PROFILE"]]
    pattern = profile.attention_window()
    windows = sorted(set(pattern))
    assert len(shares) == len(windows)
    assert sum(shares) == 1.0
    from build_engine.gpu.kv_capacity import window_size_shares

    assert shares == window_size_shares(profile)


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_build_job_runs_what_compose_runs(overlay: str) -> None:
    docs = rendered(overlay)
    job = one(docs, "Job", "engine-build")
    builder = container(job, "builder")
    env = environment(docs, builder)
    c = compose()["services"]["builder"]
    assert builder["args"] == c["command"]
    x_build_env = c["environment"]
    assert set(x_build_env) - {"HF_TOKEN"} <= set(env), set(x_build_env) - set(env)
    assert any(v["name"] == "HF_TOKEN" and "secretKeyRef" in v["valueFrom"] for v in builder["env"])
    if overlay == "gpu":
        for name, value in x_build_env.items():
            if name != "HF_TOKEN":
                assert env[name] == compose_default(str(value)), name
    # The gateways read the tokenizer where the build downloads the checkpoint.
    gw_env = environment(docs, container(one(docs, "Deployment", "gateway"), "gateway"))
    settings = settings_from_env(env)
    assert gw_env["GATEWAY_TOKENIZER_DIR"] == str(settings.tokenizer_dir)
    assert gw_env["GATEWAY_MODEL_ID"] == settings.model_id
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(job)["volumes"]
        if "persistentVolumeClaim" in v
    }
    triton_claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(one(docs, "Deployment", "triton"))["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == triton_claims == {one(docs, "PersistentVolumeClaim", "engines")["metadata"]["name"]}


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gateway_settings_match_compose(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateways get compose's settings, except the Triton address (the headless Service, checked above),
    the keys (a Secret instead of GATEWAY_API_KEY in the environment) and the worker count (one per core the
    pod requests, checked above; compose keeps the settings' default)."""
    docs = rendered(overlay)
    gateway = container(one(docs, "Deployment", "gateway"), "gateway")
    env = environment(docs, gateway)
    engine = next(
        d["data"]
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("engine-config")
    )
    for name, value in compose()["services"]["gateway"]["environment"].items():
        if name in ("TRITON_GRPC_URL", "GATEWAY_API_KEY", "GATEWAY_WORKERS"):
            continue
        assert env[name] == compose_default(str(value), {"MODEL_ID": engine["MODEL_ID"]}), name
    assert {"secretRef": {"name": "gateway-api-keys"}} in gateway["envFrom"]
    # The Secret's key (docs/scale.md) is a variable the gateway reads.
    monkeypatch.setenv("GATEWAY_API_KEYS", "key-1,key-2")
    assert GatewaySettings().api_keys == ["key-1", "key-2"]


# --- security, disruption, resources -----------------------------------------------------------------------


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (d for d in docs if d["kind"] in ("Deployment", "Job"))


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_pods_run_non_root(overlay: str) -> None:
    docs = rendered(overlay)
    ns = one(docs, "Namespace", "gemma3")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for w in workloads(docs):
        spec = pod_spec(w)
        assert spec["securityContext"]["runAsNonRoot"] is True, w["metadata"]["name"]
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], c[
                "name"
            ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_and_disruption_budgets(overlay: str) -> None:
    docs = rendered(overlay)
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for w in workloads(docs):
        for c in pod_spec(w)["containers"]:
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
            assert "memory" in c["resources"]["limits"], c["name"]
        if w["kind"] == "Deployment":
            labels = w["spec"]["template"]["metadata"]["labels"]
            assert any(p["spec"]["selector"]["matchLabels"].items() <= labels.items() for p in pdbs), w[
                "metadata"
            ]["name"]


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_only_gateways_reach_triton(overlay: str) -> None:
    docs = rendered(overlay)
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    triton = one(docs, "Deployment", "triton")
    gateway = one(docs, "Deployment", "gateway")
    assert (
        policy["spec"]["podSelector"]["matchLabels"].items()
        <= triton["spec"]["template"]["metadata"]["labels"].items()
    )
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    grpc_rules = [r for r in policy["spec"]["ingress"] if any(p["port"] == "grpc" for p in r["ports"])]
    assert len(grpc_rules) == 1
    (peer,) = grpc_rules[0]["from"]
    assert set(peer) == {"podSelector"}, "same-namespace gateways only"
    assert (
        peer["podSelector"]["matchLabels"].items()
        <= gateway["spec"]["template"]["metadata"]["labels"].items()
    )
    others = [r for r in policy["spec"]["ingress"] if r is not grpc_rules[0]]
    assert all(p["port"] == "metrics" for r in others for p in r["ports"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_the_documented_ones(overlay: str) -> None:
    docs = rendered(overlay)
    names: set[str] = set()
    for w in workloads(docs):
        spec = pod_spec(w)
        for c in spec["containers"] + spec.get("initContainers", []):
            names |= {s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s}
            names |= {
                v["valueFrom"]["secretKeyRef"]["name"]
                for v in c.get("env", [])
                if "secretKeyRef" in (v.get("valueFrom") or {})
            }
    assert names <= SECRETS
    assert "gateway-api-keys" in names
    doc = (ROOT / "docs" / "scale.md").read_text()
    for name in names:
        assert f"kubectl create secret generic {name}" in doc, name


def test_ingress_keeps_long_streams_open() -> None:
    ing = one(rendered("gpu"), "Ingress", "gateway")
    notes = ing["metadata"]["annotations"]
    timeout = GatewaySettings().request_timeout_s
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[f"nginx.ingress.kubernetes.io/{key}"]) >= timeout
    body = notes["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body.endswith("m") and int(body[:-1]) * 2**20 >= GatewaySettings().max_request_bytes


# --- autoscaling: HPA <- adapter <- recording rule ----------------------------------------------------------


def recorded(docs: list[dict[str, Any]]) -> dict[str, str]:
    rule = one(docs, "PrometheusRule", "triton-autoscaling")
    return {r["record"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"] if "record" in r}


def adapter_rules() -> list[dict[str, Any]]:
    (cm,) = kustomize(K8S / "monitoring")
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def test_hpa_metrics_are_recorded_and_exposed() -> None:
    docs = rendered("gpu")
    hpa = one(docs, "HorizontalPodAutoscaler", "triton")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "triton"}
    assert "replicas" not in one(docs, "Deployment", "triton")["spec"], "the HPA owns the replica count"
    records = recorded(docs)
    exposed = {}
    for rule in adapter_rules():
        series = re.match(r"([\w:]+)\{", rule["seriesQuery"]).group(1)
        assert series in records, series
        assert re.fullmatch(rule["name"]["matches"], series)
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        exposed[rule["name"]["as"]] = series
    metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert metrics and set(metrics) <= set(exposed)
    assert "triton:queue_compute:ratio" in metrics
    # Every recorded series is per pod, which a Pods metric needs.
    for expr in records.values():
        assert expr.count("sum by (namespace, pod)") >= 1


def test_gateway_hpa_scales_on_cpu() -> None:
    docs = rendered("gpu")
    hpa = one(docs, "HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gateway"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert "cpu" in container(one(docs, "Deployment", "gateway"), "gateway")["resources"]["requests"]
    assert "replicas" not in one(docs, "Deployment", "gateway")["spec"]


# --- the recording rules, evaluated by promtool on real scrapes ---------------------------------------------


def promtool() -> str:
    return _tool("promtool", "apt-get install prometheus (Debian; `make system-deps` does it)")


def rule_files(tmp_path: Path) -> Path:
    rule = one(rendered("gpu"), "PrometheusRule", "triton-autoscaling")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    res = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return path


def run_promtool_test(
    tmp_path: Path, rules: Path, series: list[dict[str, str]], tests: list[dict[str, Any]]
) -> None:
    spec = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}],
    }
    path = tmp_path / "rules_test.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    res = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr


def labels_text(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))


def test_trtllm_rules_on_the_backend_gauges(tmp_path: Path) -> None:
    """Series shaped like the C++ backend's `nv_trt_llm_request_metrics` gauge (labels model, version,
    request_type; TensorRT-LLM triton_backend custom_metrics_reporter.cc), values chosen here: there is no
    C++ backend on CPU."""
    rules = rule_files(tmp_path)
    pods = {
        "triton-a": {"waiting": 3, "active": 8, "max": 8},
        "triton-b": {"waiting": 0, "active": 2, "max": 8},
    }
    gauge = {"model": "tensorrt_llm", "version": "1"}
    series = [
        {
            "series": "nv_trt_llm_request_metrics{"
            + labels_text({"namespace": "ns", "pod": pod, **gauge, "request_type": kind})
            + "}",
            "values": f"{value} {value}",
        }
        for pod, values in pods.items()
        for kind, value in values.items()
    ]
    tests = [
        {
            "expr": "triton:trtllm_requests_waiting:sum",
            "eval_time": "1m",
            "exp_samples": [
                {
                    "labels": f'triton:trtllm_requests_waiting:sum{{namespace="ns",pod="{pod}"}}',
                    "value": v["waiting"],
                }
                for pod, v in pods.items()
            ],
        },
        {
            "expr": "triton:trtllm_requests_active:ratio",
            "eval_time": "1m",
            "exp_samples": [
                {
                    "labels": f'triton:trtllm_requests_active:ratio{{namespace="ns",pod="{pod}"}}',
                    "value": v["active"] / v["max"],
                }
                for pod, v in pods.items()
            ],
        },
    ]
    run_promtool_test(tmp_path, rules, series, tests)


COUNTERS = ("nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us")
PROMPT = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def scrape(metrics_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The counters' samples by (exposed name, labels). The parser names a counter's samples `<name>_total`;
    Triton exposes them without that suffix, the name Prometheus stores: the family name is used."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=5).text):
        if family.name in COUNTERS:
            for s in family.samples:
                out[(family.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def double_triton(cpu_artifacts: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real tritonserver with the ensemble around the fast engine TEST DOUBLE (no weights to load)."""
    from build_engine import fast_double
    from stack.triton_launcher import TritonPorts, start

    repo = fast_double.render_repository(
        tmp_path_factory.mktemp("k8s_rules") / "model_repository", 2000, max_batch_size=8, max_seq_len=256
    )
    proc = start(repo, ports=TritonPorts.free())
    try:
        proc.wait_ready(timeout=180)
        yield proc
    finally:
        proc.stop()


@pytest.mark.e2e
def test_triton_answers_the_probe_paths(double_triton: Any) -> None:
    for path in TRITON_PROBE_PATHS:
        assert httpx.get(double_triton.http_url + path, timeout=5).status_code == 200, path


@pytest.mark.e2e
def test_queue_compute_rule_on_two_real_scrapes(double_triton: Any, tmp_path: Path) -> None:
    """Two scrapes of a real tritonserver around a burst that queues (one preprocessing and one engine
    instance, 16 concurrent streams), replayed to promtool as one pod's series one minute apart; the recorded
    ratio must equal what the scrapes say: Σ Δqueue / max(Σ Δcompute / 60 s, 1 µs/s) / 60 s over the models
    other than the ensemble."""
    from tests.ensemble_client import ensemble_inputs, stream

    rules = rule_files(tmp_path)
    before = scrape(double_triton.metrics_url)

    async def burst() -> None:
        results = await asyncio.gather(
            *[stream(double_triton.grpc_url, "ensemble", ensemble_inputs(PROMPT, 8)) for _ in range(16)]
        )
        assert all(r.error is None and r.num_output_tokens == 8 for r in results)

    asyncio.run(burst())
    after = scrape(double_triton.metrics_url)

    pod = {"namespace": "gemma3", "pod": "triton-0", "job": "gemma3/triton"}  # what the PodMonitor adds
    series = [
        {
            "series": f"{name}{{{labels_text({**dict(labels), **pod})}}}",
            "values": f"{before.get(key, 0.0)!r} {value!r}",
        }
        for key, value in after.items()
        for name, labels in [key]
    ]

    def delta(counter: str) -> float:
        return sum(
            v - before.get(k, 0.0)
            for k, v in after.items()
            if k[0] == counter and dict(k[1])["model"] != "ensemble"
        )

    queue, compute = delta(COUNTERS[0]) / 60, delta(COUNTERS[1]) / 60
    assert queue > 0, "the burst should have queued"
    expected = queue / max(compute, 1.0)

    def within(value: float) -> list[dict[str, Any]]:
        # promtool compares samples exactly; Prometheus sums the per-series rates in its own order, so the
        # check is a PromQL comparison with a relative tolerance of 1e-9 (1 = within, 0 = not).
        tolerance = abs(value) * 1e-9
        return [
            {
                "expr": f"abs(triton:queue_compute:ratio - {value!r}) < bool {tolerance!r}",
                "eval_time": "1m",
                "exp_samples": [{"labels": '{namespace="gemma3",pod="triton-0"}', "value": 1}],
            }
        ]

    run_promtool_test(tmp_path, rules, series, within(expected))
    # And the check can fail: a value 1 % off is rejected.
    with pytest.raises(AssertionError):
        run_promtool_test(tmp_path, rules, series, within(expected * 1.01))


@pytest.mark.e2e
def test_gateway_client_accepts_a_dns_target(double_triton: Any) -> None:
    """The `dns:///name:port` form the manifests give TRITON_GRPC_URL works with the gateway's own client."""
    from gateway.triton.client import TritonStreamClient

    async def probe() -> tuple[bool, str]:
        client = TritonStreamClient(f"dns:///localhost:{double_triton.ports.grpc}", "ensemble")
        try:
            return await client.ready()
        finally:
            await client.close()

    assert asyncio.run(probe()) == (True, "ready")
