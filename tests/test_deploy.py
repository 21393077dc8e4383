"""The Kubernetes manifests render, validate, and agree with the server and the image.

No cluster needed. Each kustomization is rendered with `kubectl kustomize` when kubectl
is on PATH, else with the Python renderer in tests/deploy_kustomize.py (force it with
CNNSERVE_KUSTOMIZE=python); the test ids name the renderer. Objects are validated
against the Kubernetes JSON schemas of kubernetes-validate, offline, and custom
resources against the schemas in tests/deploy_schemas.py.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy_kustomize import kubectl, render_in_python, render_with_kubectl
from tests.deploy_promql import load_metric_names
from tests.deploy_schemas import CUSTOM_RESOURCES

Obj = dict[str, Any]
ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# The oldest Kubernetes we support (native gRPC probes are GA since 1.27) and the newest
# whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
KUBECTL = kubectl()
RENDERER = os.environ.get("CNNSERVE_KUSTOMIZE") or ("kubectl" if KUBECTL else "python")
TARGETS = ("cpu", "gpu", "gpu+keda+models-pvc", "grafana")
SERVERS = ("cpu", "gpu", "gpu+keda+models-pvc")


def _ids(names: tuple[str, ...]) -> list[str]:
    return [f"{name}-{RENDERER}" for name in names]


@pytest.fixture(scope="session")
def kustomizations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Our overlays, plus one that switches on both optional components."""
    combo = tmp_path_factory.mktemp("overlay")
    rel = os.path.relpath(K8S, combo)
    (combo / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"resources: [{rel}/overlays/gpu]\n"
        f"components: [{rel}/components/keda, {rel}/components/models-pvc]\n"
    )
    return {
        "cpu": K8S / "overlays" / "cpu",
        "gpu": K8S / "overlays" / "gpu",
        "gpu+keda+models-pvc": combo,
        "grafana": DEPLOY / "grafana",
    }


class Renders:
    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self._cache: dict[tuple[str, str], list[Obj]] = {}

    def get(self, name: str, renderer: str = RENDERER) -> list[Obj]:
        key = (name, renderer)
        if key not in self._cache:
            if renderer == "kubectl":
                assert KUBECTL, "kubectl is not on PATH"
                self._cache[key] = render_with_kubectl(self.paths[name], KUBECTL)
            else:
                self._cache[key] = render_in_python(self.paths[name])
        return copy.deepcopy(self._cache[key])


@pytest.fixture(scope="session")
def renders(kustomizations: dict[str, Path]) -> Renders:
    return Renders(kustomizations)


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_container(objs: list[Obj]) -> Obj:
    spec = one(objs, "Deployment", "cnnserve")["spec"]["template"]["spec"]
    containers: list[Obj] = spec["containers"]
    return next(c for c in containers if c["name"] == "cnnserve")


def settings(objs: list[Obj]) -> dict[str, str]:
    """The CNNSERVE_* variables the server container gets from its ConfigMap."""
    ref = server_container(objs)["envFrom"][0]["configMapRef"]["name"]
    data: dict[str, str] = one(objs, "ConfigMap", ref)["data"]
    return data


def pod_containers(objs: list[Obj]) -> Iterator[Obj]:
    spec = one(objs, "Deployment", "cnnserve")["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- rendering and schemas ---------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS, ids=_ids(TARGETS))
def test_kustomization_renders(renders: Renders, target: str, record_property: Any) -> None:
    record_property("kustomize_renderer", RENDERER)
    objs = renders.get(target)
    assert objs
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


@pytest.mark.parametrize("target", TARGETS, ids=_ids(TARGETS))
def test_every_object_passes_schema_validation(renders: Renders, target: str) -> None:
    for obj in renders.get(target):
        custom = CUSTOM_RESOURCES.get((obj["apiVersion"], obj["kind"]))
        if custom is not None:
            jsonschema.validate(obj, custom)
            continue
        for version in K8S_VERSIONS:
            # strict: unknown fields are errors, as `kubectl apply` reports them.
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH: nothing to compare with")
@pytest.mark.parametrize("target", TARGETS)
def test_python_renderer_matches_kubectl(renders: Renders, target: str) -> None:
    def by_id(objs: list[Obj]) -> dict[tuple[str, str, str], Obj]:
        return {(o["apiVersion"], o["kind"], o["metadata"]["name"]): o for o in objs}

    assert by_id(renders.get(target, "python")) == by_id(renders.get(target, "kubectl"))


# --- the Deployment agrees with the server -----------------------------------------


@pytest.mark.parametrize("target", SERVERS, ids=_ids(SERVERS))
def test_probes_and_ports_are_the_servers(renders: Renders, target: str) -> None:
    objs = renders.get(target)
    env = settings(objs)
    grpc_port, metrics_port = int(env["CNNSERVE_GRPC_PORT"]), int(env["CNNSERVE_METRICS_PORT"])
    assert (grpc_port, metrics_port) == (8001, 8002)
    container = server_container(objs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": grpc_port, "service": ""}, probe
    # The startup probe leaves minutes for loading and warm-up.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180


def test_configmap_names_only_settings_the_server_has(renders: Renders) -> None:
    if importlib.util.find_spec("cnnserve.server.config") is None:
        pytest.skip("cnnserve.server.config is not written yet")
    import dataclasses

    from cnnserve.server.config import Settings

    known = {f"CNNSERVE_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    for target in SERVERS:
        unknown = set(settings(renders.get(target))) - known
        assert not unknown, f"{target}: the server has no setting {sorted(unknown)}"


@pytest.mark.parametrize("target", SERVERS, ids=_ids(SERVERS))
def test_grace_period_outlasts_prestop_and_server_drain(renders: Renders, target: str) -> None:
    objs = renders.get(target)
    pod = one(objs, "Deployment", "cnnserve")["spec"]["template"]["spec"]
    drain = float(settings(objs)["CNNSERVE_GRACE_PERIOD_SECS"])
    command = server_container(objs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop >= 5, "too short for endpoints and DNS to drop the pod"
    from cnnserve.server.app import CLOSE_MARGIN_S, DRAIN_LEAD_S

    shutdown = DRAIN_LEAD_S + drain + CLOSE_MARGIN_S  # the server's own, at most
    assert pod["terminationGracePeriodSeconds"] > pre_stop + shutdown


@pytest.mark.parametrize("target", SERVERS, ids=_ids(SERVERS))
def test_pods_run_non_root_on_a_read_only_filesystem(renders: Renders, target: str) -> None:
    objs = renders.get(target)
    pod = one(objs, "Deployment", "cnnserve")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # Service links would put CNNSERVE_SERVICE_HOST etc. among the server's settings.
    assert pod["enableServiceLinks"] is False
    for c in pod_containers(objs):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert "memory" in c["resources"]["limits"], c["name"]
    mounts = {m["mountPath"]: m for m in server_container(objs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    repository = mounts[settings(objs)["CNNSERVE_REPOSITORY"]]
    assert repository["readOnly"] is True


def test_init_container_fills_the_repository_volume(renders: Renders) -> None:
    objs = renders.get("gpu")
    pod = one(objs, "Deployment", "cnnserve")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    repository = settings(objs)["CNNSERVE_REPOSITORY"]
    server_volume = next(
        m["name"] for m in server_container(objs)["volumeMounts"] if m["mountPath"] == repository
    )
    init_mount = next(m for m in init["volumeMounts"] if m["name"] == server_volume)
    assert init["image"].startswith("cnnserve-models:")
    # The copy reads the path the Dockerfile bakes the repository into.
    assert init["command"] == [
        "cp",
        "-R",
        "/opt/cnnserve/model_repository/.",
        init_mount["mountPath"] + "/",
    ]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "COPY --from=export /opt/cnnserve/model_repository /opt/cnnserve/model_repository" in (
        dockerfile
    )


def test_overlays_pick_their_hardware(renders: Renders) -> None:
    gpu, cpu = server_container(renders.get("gpu")), server_container(renders.get("cpu"))
    assert gpu["image"].endswith("-gpu")
    assert cpu["image"].endswith("-cpu")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    tolerations = one(renders.get("gpu"), "Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_rollout_never_drops_below_capacity(renders: Renders) -> None:
    deployment = one(renders.get("gpu"), "Deployment", "cnnserve")
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # The HPA owns the replica count; a value here would reset it on every apply.
    assert "replicas" not in deployment["spec"]


# --- Services, monitoring, autoscaling -----------------------------------------------


@pytest.mark.parametrize("target", SERVERS, ids=_ids(SERVERS))
def test_services_reach_the_pods(renders: Renders, target: str) -> None:
    objs = renders.get(target)
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in server_container(objs)["ports"]}
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    assert set(services) == {"cnnserve", "cnnserve-headless"}
    assert services["cnnserve-headless"]["spec"]["clusterIP"] == "None"
    for service in services.values():
        assert selects(service["spec"]["selector"], pod_labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
            if port["name"] == "grpc":
                assert (port["port"], port["appProtocol"]) == (8001, "grpc")
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        spec = one(objs, kind)["spec"]
        selector = spec.get("selector") or spec["podSelector"]
        assert selects(selector["matchLabels"], pod_labels), kind
    ingress_ports = {
        p["port"] for rule in one(objs, "NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]
    }
    assert ingress_ports == {8001, 8002}


@pytest.mark.parametrize("target", SERVERS, ids=_ids(SERVERS))
def test_service_monitor_scrapes_each_pod_once(renders: Renders, target: str) -> None:
    objs = renders.get(target)
    monitor = one(objs, "ServiceMonitor")["spec"]
    services = [o for o in objs if o["kind"] == "Service"]
    chosen = [
        s for s in services if selects(monitor["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in chosen] == ["cnnserve"]
    service_ports = {p["name"]: p["port"] for p in chosen[0]["spec"]["ports"]}
    (endpoint,) = monitor["endpoints"]
    assert service_ports[endpoint["port"]] == int(settings(objs)["CNNSERVE_METRICS_PORT"])
    assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("target", ["cpu", "gpu"], ids=_ids(("cpu", "gpu")))
def test_hpa_scales_on_pending_requests_with_cpu_fallback(renders: Renders, target: str) -> None:
    objs = renders.get(target)
    hpa = one(objs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "cnnserve",
    }
    kinds = {m["type"]: m for m in hpa["metrics"]}
    metric = kinds["Pods"]["pods"]["metric"]["name"]
    exported = load_metric_names(DEPLOY / "metric_names.txt")
    assert metric in exported, f"the server does not export {metric}"
    assert exported[metric].type == "gauge"
    assert kinds["Pods"]["pods"]["target"]["type"] == "AverageValue"
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    # CPU utilisation is relative to requests, so every container must request CPU.
    assert all("cpu" in c["resources"]["requests"] for c in pod_containers(objs))
    assert 1 < hpa["minReplicas"] < hpa["maxReplicas"]


def test_keda_component_replaces_the_hpa(renders: Renders) -> None:
    objs = renders.get("gpu+keda+models-pvc")
    assert not [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    scaled = one(objs, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == one(objs, "Deployment")["metadata"]["name"]
    prometheus = next(t for t in scaled["triggers"] if t["type"] == "prometheus")
    assert prometheus["metricType"] == "AverageValue"
    assert "cnnserve_inference_pending_requests" in prometheus["metadata"]["query"]
    assert {t["type"] for t in scaled["triggers"]} == {"prometheus", "cpu"}


def test_models_pvc_component_mounts_the_claim_and_polls(renders: Renders) -> None:
    objs = renders.get("gpu+keda+models-pvc")
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    claim = one(objs, "PersistentVolumeClaim")["metadata"]["name"]
    volume = next(v for v in pod["volumes"] if v["name"] == "models")
    assert volume["persistentVolumeClaim"]["claimName"] == claim
    assert settings(objs)["CNNSERVE_MODEL_CONTROL_MODE"] == "poll"


def test_dashboard_configmap_carries_the_dashboard(renders: Renders) -> None:
    config_map = one(renders.get("grafana"), "ConfigMap", "cnnserve-dashboard")
    assert config_map["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert config_map["data"]["cnnserve.json"] == (DEPLOY / "grafana" / "cnnserve.json").read_text()
