"""Issue 24 on Kubernetes: the PodMonitor, the KEDA ScaledObject (and the PrometheusRule and dashboard
once observability renders them) validated against the published CRDs of the pinned releases, the
metrics gate (a real Caddy in front of the fake engine's /metrics), the NetworkPolicy that admits only
the monitoring namespace's Prometheus to it, the drain before a pod stops, and the component."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kubernetes_validate
import pytest
import yaml

from kimi_fleet import catalog, observability
from kimi_fleet import k8s_manifests as manifests
from kimi_fleet.autoscaling import scaling_policy
from kimi_fleet.launch import render_launch
from kimi_fleet.pod_scripts import pod_script
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.spec import StackSpecError
from kimi_fleet.stackfile import load_stack_config, stack_file, stack_names
from kimi_fleet.validation import parse_spec
from tests.fakes.harness import free_port, start_caddy, start_fake_engine, wait_for
from tooling import crd_schema, monitoring_schema

K8S_VERSION = kubernetes_validate.latest_version()
KUBERNETES_STACKS = [name for name in stack_names()
                     if load_stack_config(stack_file(name)).values["target"]["kind"] == "kubernetes"]
#: The shipped stacks with a fixed replica count (the others scale: a ScaledObject each).
FIXED_STACKS = [name for name in KUBERNETES_STACKS
                if "scaling" not in load_stack_config(stack_file(name)).values.get("capacity", {})]
MULTI_NODE = "k8s-h100-int4-vllm"
#: What the multi-node stack's operator sets after building its EFA engine image (test_k8s_multi_node).
EFA_ENGINE_IMAGE = "registry.example.com/kimi-engine-efa@sha256:" + "5e" * 32
PROMETHEUS_URL = "http://kube-prometheus-stack-prometheus.observability.svc.cluster.local:9090"


def values(stack: str) -> dict:
    found = copy.deepcopy(load_stack_config(stack_file(stack)).values)
    if stack == MULTI_NODE:
        found["target"]["kubernetes"]["efaEngineImage"] = EFA_ENGINE_IMAGE
    return found


def scaling_values(stack: str, *, target: dict | None = None, capacity: dict | None = None,
                   url: str | None = PROMETHEUS_URL) -> dict:
    found = values(stack)
    found["capacity"] = capacity or {"replicas": 2, "scaling": {"minReplicas": 1, "maxReplicas": 4,
                                                                **(target or {"waitingPerReplica": 8})}}
    if url:
        found["target"]["kubernetes"]["prometheusUrl"] = url
    found["target"]["kubernetes"]["prometheusLabels"] = {"release": "kube-prometheus-stack"}
    return found


def resolve(stack: str, given: dict) -> Resolved:
    return Resolved(parse_spec(given, stack, f"stacks/Pulumi.{stack}.yaml"))


def rendered(stack: str, given: dict | None = None):
    r = resolve(stack, given or values(stack))
    sizing = size(r)
    launch = render_launch(r)
    return (r, sizing, manifests.render_manifests(r, sizing, launch, stack=stack),
            manifests.render_monitoring(r, sizing, stack=stack))


def the(objects, kind, name=None):
    (found,) = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return found


def pod_templates(objects) -> list[dict]:
    """Every engine pod template: the Deployments', or the LeaderWorkerSet's leader and worker."""
    templates = [o["spec"]["template"] for o in objects if o["kind"] == "Deployment"]
    for lws in (o for o in objects if o["kind"] == "LeaderWorkerSet"):
        group = lws["spec"]["leaderWorkerTemplate"]
        templates += [group["leaderTemplate"], group["workerTemplate"]]
    return templates


def container(template, name):
    return next((c for c in template["spec"]["containers"] if c["name"] == name), None)


SCALING_VARIANTS = [
    ("gb200-int4-vllm", scaling_values("gb200-int4-vllm")),
    ("mi355x-int4-sglang", scaling_values("mi355x-int4-sglang", target={"ttftP99Seconds": 4})),
    # Spot with an on-demand base: the base stays fixed, the spot pods scale.
    ("mi355x-int4-sglang", scaling_values("mi355x-int4-sglang", capacity={
        "market": "spot", "replicas": 2, "onDemandBase": 1,
        "scaling": {"minReplicas": 1, "maxReplicas": 5, "waitingPerReplica": 4}})),
    ("gb200-int4-vllm", scaling_values("gb200-int4-vllm", capacity={
        "workload": "batch", "market": "on-demand", "replicas": 1,
        "scaling": {"minReplicas": 1, "maxReplicas": 3, "ttftP99Seconds": 30}})),
    # The shipped stacks that scale, as they are.
    *[(name, values(name)) for name in KUBERNETES_STACKS if name not in FIXED_STACKS],
]


# --- the vendored CRDs ---------------------------------------------------------------------------

def test_the_crds_are_the_tags_files_and_serve_the_versions_rendered():
    digests = {
        "PodMonitor": "45a93443daa687d3654f7e9631909ff7edcdf3ec09c5e60251b74aa2722aee5d",
        "PrometheusRule": "78be98554b9c8506ab2b4f4feb91c5f3a56e536a0a510f3a8e876a459970d56d",
        "ScaledObject": "af35555862a83933b074af14ad439c4b4ceabaf4daa3e9338e9b23e36d308d80",
    }
    for kind, (path, api_version) in monitoring_schema.CRD_FILES.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digests[kind], path
        schema = monitoring_schema.json_schema(kind)
        assert schema["properties"]["apiVersion"]["const"] == api_version
        assert schema["properties"]["kind"]["const"] == kind
        assert (path.parent / "README.md").read_text().count(digests[kind]) == 1
    assert manifests.PROMETHEUS_OPERATOR_API_VERSION == "monitoring.coreos.com/v1"
    assert manifests.KEDA_API_VERSION == "keda.sh/v1alpha1"
    endpoint = monitoring_schema.json_schema("PodMonitor")["properties"]["spec"]["properties"][
        "podMetricsEndpoints"]["items"]["properties"]
    assert "replace" in endpoint["relabelings"]["items"]["properties"]["action"]["enum"]


# --- every object validates ----------------------------------------------------------------------

@pytest.mark.parametrize("stack", KUBERNETES_STACKS)
def test_every_monitoring_object_validates_against_its_crd(stack):
    r, _, objects, monitoring = rendered(stack)
    assert [o["kind"] for o in monitoring] == ["PodMonitor", "PrometheusRule", "ConfigMap",
                                               *(["ScaledObject"] if r.spec.capacity.scaling else [])]
    for obj in monitoring:
        if obj["kind"] in monitoring_schema.CRD_FILES:
            assert monitoring_schema.errors(obj) == [], obj["kind"]
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    # The metrics gate's ConfigMap and the new NetworkPolicy are built-in kinds.
    for obj in objects:
        if obj["kind"] in ("ConfigMap", "NetworkPolicy", "Deployment"):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("stack, given", SCALING_VARIANTS)
def test_a_scaling_stacks_objects_validate(stack, given):
    r, sizing, objects, monitoring = rendered(stack, given)
    kinds = [o["kind"] for o in monitoring]
    assert kinds == ["PodMonitor", "PrometheusRule", "ConfigMap", "ScaledObject"]
    for obj in monitoring:
        if obj["kind"] in monitoring_schema.CRD_FILES:
            assert monitoring_schema.errors(obj) == [], obj["kind"]
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    for obj in objects:
        if obj["kind"] != "LeaderWorkerSet":
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    # The Prometheus Operator selects by the stack's prometheusLabels.
    assert the(monitoring, "PodMonitor")["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def _mutated(obj, path, value):
    obj = copy.deepcopy(obj)
    *parents, last = path
    node = obj
    for key in parents:
        node = node[key]
    node[last] = value
    return obj


@pytest.fixture(scope="module")
def scaled():
    return rendered(*SCALING_VARIANTS[0])


@pytest.mark.parametrize("kind, path, value, says", [
    ("PodMonitor", ["spec", "podMetricsEndpoints", 0, "prot"], "metrics", "'prot' was unexpected"),
    ("PodMonitor", ["spec", "podMetricsEndpoints", 0, "relabelings", 0, "action"], "set", "is not one of"),
    ("PodMonitor", ["spec", "podMetricsEndpoints", 0, "scheme"], "ftp", "is not one of"),
    ("PodMonitor", ["spec", "selector", "matchLabels"], "engine", "is not of type 'object'"),
    ("PodMonitor", ["metadata", "labels", "release"], "x" * 64, "is too long"),
    ("ScaledObject", ["spec", "maxReplicaCount"], 0, "less than the minimum of 1"),
    ("ScaledObject", ["spec", "triggers"], [], "should be non-empty"),
    ("ScaledObject", ["spec", "triggers", 0, "metadata", "threshold"], 8, "is not of type 'string'"),
    ("ScaledObject", ["spec", "scaleTargetRef", "name"], "", "should be non-empty"),
    ("ScaledObject", ["spec", "fallback"], {"replicas": 1}, "'failureThreshold' is a required property"),
    # The CRD's CEL rule and KEDA's webhook, which the schema does not carry.
    ("ScaledObject", ["spec", "minReplicaCount"], 5, "minReplicaCount must be less than or equal to maxReplicaCount"),
    ("ScaledObject", ["metadata", "name"], "k" * 60, "HPA name"),
])
def test_the_validation_refuses_what_the_api_server_would(scaled, kind, path, value, says):
    """Negative cases: the schemas are strict and carry the enums, so a pass is not vacuous."""
    found = monitoring_schema.errors(_mutated(the(scaled[3], kind), path, value))
    assert any(says in error for error in found), found


# --- the PodMonitor and the metrics gate ---------------------------------------------------------

@pytest.mark.parametrize("stack", KUBERNETES_STACKS)
def test_the_pod_monitor_scrapes_each_serving_pods_gate_as_the_rules_jobs(stack):
    r, _, objects, monitoring = rendered(stack)
    monitor = the(monitoring, "PodMonitor")["spec"]
    assert monitor["namespaceSelector"] == {"matchNames": [r.spec.target.kubernetes.namespace]}
    endpoints = {e["path"]: e for e in monitor["podMetricsEndpoints"]}
    assert set(endpoints) == {manifests.ENGINE_METRICS_PATH, manifests.PROXY_METRICS_PATH}
    for path, job in ((manifests.ENGINE_METRICS_PATH, observability.ENGINE_JOB),
                      (manifests.PROXY_METRICS_PATH, observability.PROXY_JOB)):
        endpoint = endpoints[path]
        assert endpoint["port"] == manifests.METRICS_PORT_NAME
        relabel = {x["targetLabel"]: x for x in endpoint["relabelings"]}
        assert relabel["job"]["replacement"] == job
        assert relabel[manifests.STACK_LABEL]["replacement"] == stack
        assert relabel[manifests.REPLICA_LABEL]["sourceLabels"] == ["__meta_kubernetes_pod_name"]
    # Every engine pod is selected (a multi-node replica's leader and workers); the ones that serve
    # carry the gate with the named port, and only the gate binds beyond loopback.
    selector = monitor["selector"]["matchLabels"]
    templates = pod_templates(objects)
    assert templates
    serving = 0
    for template in templates:
        assert selector.items() <= template["metadata"]["labels"].items()
        gate = container(template, "metrics")
        if container(template, "proxy") is None:
            assert gate is None  # a headless worker: no API server, no /metrics, no proxy
            continue
        serving += 1
        assert gate["ports"] == [{"name": manifests.METRICS_PORT_NAME, "containerPort": manifests.METRICS_GATE_PORT}]
        assert gate["image"] == catalog.CADDY_IMAGE
        # Nothing beyond the image's own file capability, which must stay in the bounding set for execve.
        assert gate["securityContext"]["runAsNonRoot"] and gate["securityContext"]["capabilities"] == {
            "drop": ["ALL"], "add": list(catalog.CADDY_IMAGE_FILE_CAPABILITIES)}
        assert gate["securityContext"]["allowPrivilegeEscalation"] is False
        assert gate["securityContext"]["readOnlyRootFilesystem"]
        engine = container(template, "engine")
        assert "ports" not in engine
        assert engine["args"][engine["args"].index("--host") + 1] == "127.0.0.1"
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounted = {m["name"] for m in gate["volumeMounts"]}
        assert mounted <= set(volumes)
        assert volumes["metrics-gate"]["configMap"]["name"] == manifests.METRICS_GATE_CONFIGMAP
    assert serving >= 1
    config = the(objects, "ConfigMap", manifests.METRICS_GATE_CONFIGMAP)["data"]["Caddyfile"]
    assert config == manifests.render_metrics_gate(render_launch(r).instances[0].upstream)
    assert f"reverse_proxy 127.0.0.1:{r.engine.port}" in config
    assert f"reverse_proxy 127.0.0.1:{observability.PROXY_METRICS_PORT}" in config
    # ...where the pod's proxy serves Caddy's metrics, on the pod's loopback only.
    proxy = manifests.render_pod_proxy(r, render_launch(r))
    assert proxy.facts["metricsSite"]["address"] == f"http://127.0.0.1:{observability.PROXY_METRICS_PORT}"
    assert proxy.facts["metricsSite"]["bind"] == "127.0.0.1"
    caddyfile = the(objects, "ConfigMap", manifests.CADDYFILE_CONFIGMAP)["data"]["Caddyfile"]
    assert f"http://127.0.0.1:{observability.PROXY_METRICS_PORT} {{" in caddyfile
    assert manifests.metrics_location(r) == f"podmonitor://{r.spec.target.kubernetes.namespace}/kimi-fleet"


def test_the_gate_refuses_an_upstream_off_loopback():
    with pytest.raises(ValueError, match="loopback only"):
        manifests.render_metrics_gate("10.0.0.5:8000")


def _get(url: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class _CaddyMetrics(BaseHTTPRequestHandler):
    """Stands in for the proxy's loopback metrics site (Caddy's own /metrics)."""

    def do_GET(self):  # noqa: N802 - stdlib signature
        body = b'caddy_http_requests_total{server="srv0",handler="reverse_proxy"} 7\n'
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_the_gate_serves_only_the_two_metrics_paths_with_a_real_caddy(engine):
    """The rendered gate, run by a real Caddy in front of the fake engine (the pinned releases' metric
    names) and a stand-in for Caddy's loopback metrics site: the two paths answer, the engine's API,
    other methods and other paths do not."""
    proxy_metrics = ThreadingHTTPServer(("127.0.0.1", 0), _CaddyMetrics)
    threading.Thread(target=proxy_metrics.serve_forever, daemon=True).start()
    port = free_port()
    try:
        with start_fake_engine("good", engine=engine) as fake:
            text = manifests.render_metrics_gate(fake.upstream, listen_port=port,
                                                 proxy_metrics_port=proxy_metrics.server_address[1])
            with start_caddy(text.replace(f"http://:{port}", f"http://127.0.0.1:{port}"), {}):
                base = f"http://127.0.0.1:{port}"
                status, body = _get(base + manifests.ENGINE_METRICS_PATH)
                names = catalog.ENGINE_METRICS[engine]
                assert status == 200 and f"{names.waiting}" in body and f"{names.ttft_histogram}_bucket" in body
                assert _get(base + manifests.PROXY_METRICS_PATH) == (
                    200, 'caddy_http_requests_total{server="srv0",handler="reverse_proxy"} 7\n')
                for path in ("/metrics", "/v1/models", "/health", "/engine/metrics/x", "/engine"):
                    assert _get(base + path)[0] == 404, path
                assert _get(base + "/v1/chat/completions", "POST")[0] == 404
                assert _get(base + manifests.ENGINE_METRICS_PATH, "POST")[0] == 404
    finally:
        proxy_metrics.shutdown()


def test_the_pods_proxy_metrics_reach_prometheus_only_through_the_gate():
    """The pod's whole path with real Caddys: the proxy as render_pod_proxy renders it (render_proxy
    with the pod's metrics_port; its public ports moved to free loopback ports, tls internal) in front
    of the fake engine, and the gate in front of both. A request through the public site shows up in
    the gate's /proxy/metrics, and the proxy's public site itself answers /metrics and /engine/metrics
    with 401 (the tenants' route never serves metrics)."""
    from kimi_fleet.caddy import render_proxy

    key = "sk-test-not-a-real-key-0123456789"
    with start_fake_engine("good", engine="vllm") as fake:
        https_port, http_port, local_port, metrics_port, gate_port = (free_port() for _ in range(5))
        proxy = render_proxy("localhost", [fake.upstream], fake.health_uri, tls="internal", https_port=https_port,
                             http_port=http_port, bind_host="127.0.0.1", local_port=local_port,
                             metrics_port=metrics_port)
        gate = manifests.render_metrics_gate(fake.upstream, listen_port=gate_port, proxy_metrics_port=metrics_port)
        public = f"https://localhost:{https_port}"
        with start_caddy(proxy.text, {"KIMI_API_KEY": key}, ready_url=f"{public}/v1/models") as caddy, \
                start_caddy(gate.replace(f"http://:{gate_port}", f"http://127.0.0.1:{gate_port}"), {}):
            context = caddy.ssl_context()
            request = urllib.request.Request(f"{public}/v1/models", headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                assert response.status == 200

            def counted() -> list[str]:
                status, text = _get(f"http://127.0.0.1:{gate_port}{manifests.PROXY_METRICS_PATH}")
                assert status == 200
                scraped.append(text)
                return [line for line in text.splitlines()
                        if line.startswith(f"{catalog.PROXY_METRICS.request_duration}_count{{") and 'code="200"' in line]
            # Caddy counts a request once its handler returns, which can be just after the client has
            # the response (a loaded CI machine showed it): poll the gate briefly.
            scraped: list[str] = []
            assert wait_for(counted, 5, 0.1), scraped[-1][-2000:]
            for path in ("/metrics", manifests.ENGINE_METRICS_PATH, manifests.PROXY_METRICS_PATH):
                try:
                    urllib.request.urlopen(f"{public}{path}", timeout=10, context=context)
                    raise AssertionError(f"{path} answered without a key")
                except urllib.error.HTTPError as refused:
                    assert refused.code == 401, path


# --- the NetworkPolicy ----------------------------------------------------------------------------

def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions are not rendered
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_admits(peer: dict, source: dict, policy_ns: str) -> bool:
    """One `from` element: namespaceSelector AND podSelector (either missing: the policy's namespace,
    or every pod)."""
    if "ipBlock" in peer:
        return False  # not rendered; a pod-to-pod check never matches one here
    if "namespaceSelector" in peer:
        in_namespace = _selects(peer["namespaceSelector"], source["namespace_labels"])
    else:
        in_namespace = source["namespace"] == policy_ns
    return in_namespace and _selects(peer.get("podSelector", {}), source["labels"])


def admitted(policies: list[dict], source: dict, pod_labels: dict, named_ports: dict, port: int) -> bool:
    """NetworkPolicy semantics (kubernetes.io/docs/concepts/services-networking/network-policies/): a
    pod selected by any Ingress policy takes only what one of their rules admits; a rule admits a peer
    it lists (none: every source) on a port it lists (none: every port; a name is the pod's port)."""
    selecting = [p for p in policies if "Ingress" in p["spec"]["policyTypes"]
                 and _selects(p["spec"]["podSelector"], pod_labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            if peers is not None and not any(_peer_admits(peer, source, policy["metadata"]["namespace"])
                                             for peer in peers):
                continue
            ports = rule.get("ports")
            if ports is None or any(named_ports.get(p["port"], p["port"]) == port and p["protocol"] == "TCP"
                                    for p in ports):
                return True
    return False


def source(namespace: str, **labels) -> dict:
    return {"namespace": namespace, "namespace_labels": {"kubernetes.io/metadata.name": namespace},
            "labels": labels}


@pytest.mark.parametrize("stack, given", [(s, None) for s in KUBERNETES_STACKS] + [
    ("gb200-int4-vllm", scaling_values("gb200-int4-vllm"))])
def test_only_the_monitoring_namespaces_prometheus_reaches_the_metrics_port(stack, given):
    r, _, objects, _ = rendered(stack, given)
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    monitoring = manifests.prometheus_namespace(r)
    assert monitoring == "monitoring"  # the default: kube-prometheus-stack's usual namespace
    prometheus = source(monitoring, **{"app.kubernetes.io/name": "prometheus", "prometheus": "kube-prometheus"})
    strangers = {
        "a tenant's pod": source("tenant-a", app="client"),
        "a Prometheus in another namespace": source("tenant-a", **{"app.kubernetes.io/name": "prometheus"}),
        "another pod of the monitoring namespace": source(monitoring, **{"app.kubernetes.io/name": "grafana"}),
        "a pod of the stack's own namespace": source(r.spec.target.kubernetes.namespace, app="debug"),
    }
    for template in pod_templates(objects):
        if container(template, "metrics") is None:
            continue
        pod = template["metadata"]["labels"]
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        gate = manifests.METRICS_GATE_PORT
        assert admitted(policies, prometheus, pod, ports, gate)
        for who, stranger in strangers.items():
            assert not admitted(policies, stranger, pod, ports, gate), who
            assert admitted(policies, stranger, pod, ports, 443), who  # the tenants' route stays open
        # Prometheus reaches the gate, nothing else beyond the public proxy: not the engine's port,
        # not the loopback exporters' ports.
        for port in (r.engine.port, observability.PROXY_METRICS_PORT, observability.NODE_STATE_PORT,
                     manifests.POD_LOCAL_PROXY_PORT):
            assert not admitted(policies, prometheus, pod, ports, port), port
    # The Service (the tenants' route) never carries the metrics port.
    service = the(objects, "Service")
    assert manifests.METRICS_PORT_NAME not in {p["targetPort"] for p in service["spec"]["ports"]}
    metrics_policy = the(objects, "NetworkPolicy", manifests.METRICS_POLICY)["spec"]
    (rule,) = metrics_policy["ingress"]
    assert rule["ports"] == [{"port": manifests.METRICS_PORT_NAME, "protocol": "TCP"}]
    # Applied before anything that runs a pod.
    kinds = [o["kind"] for o in objects]
    assert kinds.index("NetworkPolicy") < min(i for i, k in enumerate(kinds)
                                              if k in ("Job", "Deployment", "LeaderWorkerSet"))


def test_the_monitoring_namespace_is_the_stacks_prometheus_namespace():
    given = scaling_values("gb200-int4-vllm")
    given["target"]["kubernetes"]["prometheusNamespace"] = "kube-prometheus"
    r, _, objects, _ = rendered("gb200-int4-vllm", given)
    peer = the(objects, "NetworkPolicy", manifests.METRICS_POLICY)["spec"]["ingress"][0]["from"]
    assert peer == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-prometheus"}},
                     "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]


# --- the alerts and the dashboard ----------------------------------------------------------------

@pytest.mark.parametrize("stack", KUBERNETES_STACKS)
def test_the_prometheus_rule_carries_the_stacks_alerts_that_its_pods_can_fire(stack, tmp_path):
    r, _, _, monitoring = rendered(stack)
    rule = the(monitoring, "PrometheusRule")
    assert rule["metadata"]["name"] == manifests.PROMETHEUS_RULE
    shipped = [x["alert"] for group in rule["spec"]["groups"] for x in group["rules"]]
    assert shipped == [name for name in observability.ALERT_NAMES if name not in manifests.UNSERVED_ALERTS]
    assert set(manifests.UNSERVED_ALERTS) < set(observability.ALERT_NAMES)
    # The same rules, thresholds included, as the node targets' rules file.
    everything = {x["alert"]: x for g in yaml.safe_load(observability.render_prometheus_rules(r.spec))["groups"]
                  for x in g["rules"]}
    for group in rule["spec"]["groups"]:
        for x in group["rules"]:
            assert x == everything[x["alert"]]
    # The spec is a rules file Prometheus' own parser takes (as the Operator's admission webhook does).
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_alerts_fire_on_series_labelled_as_the_pod_monitor_labels_them(tmp_path):
    """promtool test rules: the engine's series with the labels the PodMonitor's relabelings give them
    (job, stack, replica = the pod, instance = the pod's gate, namespace) fire the stalled-engine and
    growing-queue alerts of the stack's PrometheusRule."""
    stack = "gb200-int4-vllm"
    r, _, _, monitoring = rendered(stack)
    spec = the(monitoring, "PrometheusRule")["spec"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(spec))
    annotations = {x["alert"]: x["annotations"] for group in spec["groups"] for x in group["rules"]}
    names = catalog.ENGINE_METRICS[r.spec.engine.name]
    pod, instance = "kimi-engine-on-demand-7d9f-abcde", f"10.0.3.7:{manifests.METRICS_GATE_PORT}"
    labels = (f'job="{observability.ENGINE_JOB}",{manifests.STACK_LABEL}="{stack}",{manifests.REPLICA_LABEL}="{pod}",'
              f'instance="{instance}",namespace="{r.spec.target.kubernetes.namespace}",container="metrics",'
              f'endpoint="{manifests.METRICS_PORT_NAME}"')
    m = r.spec.monitoring
    minutes = m.queue_growing_minutes + 10
    tests = {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": f"{names.running}{{{labels}}}", "values": f"2x{minutes}"},
            {"series": f"{names.generated_tokens}{{{labels}}}", "values": f"500x{minutes}"},  # no token
            {"series": f"{names.waiting}{{{labels}}}", "values": f"1+1x{minutes}"},  # and a queue that grows
        ],
        "alert_rule_test": [
            {"eval_time": f"{minutes}m", "alertname": "KimiEngineStalled", "exp_alerts": [{"exp_labels": {
                "severity": "critical", "stack": stack, "replica": pod, "instance": instance},
                "exp_annotations": annotations["KimiEngineStalled"]}]},
            {"eval_time": f"{minutes}m", "alertname": "KimiQueueGrowing", "exp_alerts": [{"exp_labels": {
                "severity": "warning", "stack": stack, "replica": pod, "instance": instance},
                "exp_annotations": annotations["KimiQueueGrowing"]}]},
        ],
    }]}
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests))
    done = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


@pytest.mark.parametrize("stack", KUBERNETES_STACKS)
def test_the_dashboard_ships_as_a_configmap_the_grafana_sidecar_imports(stack):
    r, _, _, monitoring = rendered(stack)
    config_map = the(monitoring, "ConfigMap", manifests.DASHBOARD_CONFIGMAP)
    assert config_map["metadata"]["labels"][manifests.GRAFANA_DASHBOARD_LABEL] == "1"
    assert config_map["metadata"]["namespace"] == r.spec.target.kubernetes.namespace
    ((key, text),) = config_map["data"].items()
    assert key.endswith(".json")
    dashboard = json.loads(text)
    assert [p["title"] for p in dashboard["panels"]] == [p.title for p in observability.DASHBOARD_PANELS]
    original = observability.render_grafana_dashboard(r.spec)
    assert dashboard["panels"] == original["panels"]  # the same queries: only the data source is provisioned
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    uses = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uses == {"${DS_PROMETHEUS}"}
    kubernetes_validate.validate(config_map, K8S_VERSION, strict=True)


# --- scaling -------------------------------------------------------------------------------------

def selector_of(r: Resolved) -> str:
    return f'namespace="{r.spec.target.kubernetes.namespace}",job="{observability.ENGINE_JOB}"'


@pytest.mark.parametrize("stack, given", SCALING_VARIANTS)
def test_the_scaled_object_follows_the_policy(stack, given):
    r, sizing, objects, monitoring = rendered(stack, given)
    policy = scaling_policy(r, sizing)
    scaled = the(monitoring, "ScaledObject")["spec"]
    market = manifests.scaled_market(r)
    deployments = {d["metadata"]["name"]: d for d in objects if d["kind"] == "Deployment"}
    target = deployments[scaled["scaleTargetRef"]["name"]]
    assert scaled["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": manifests.deployment_name(market)}
    # KEDA's HPA owns the scaled Deployment's count; a fixed one (the on-demand base) keeps its own.
    assert "replicas" not in target["spec"]
    fixed = [d for name, d in deployments.items() if d is not target]
    fixed_pods = sum(d["spec"]["replicas"] for d in fixed)
    per = r.engines_per_node
    assert scaled["minReplicaCount"] + fixed_pods == policy.min_replicas * per
    assert scaled["maxReplicaCount"] + fixed_pods == policy.max_replicas * per
    assert scaled["cooldownPeriod"] == policy.scale_in_cooldown_seconds
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == min(policy.scale_in_cooldown_seconds, 3600)
    (step,) = behavior["scaleUp"]["policies"]
    assert step["periodSeconds"] == min(policy.scale_out_cooldown_seconds, 1800)
    trigger, *kvs = scaled["triggers"]
    assert trigger["type"] == "prometheus" and trigger["name"] == policy.metric
    if r.spec.capacity.workload == "batch":
        # A batch stack follows its queue (or TTFT) target alone: no KV cache trigger (autoscaling.py).
        assert kvs == [] and policy.kv_cache_target is None
    else:
        # The second signal: the HPA takes the larger ask of its metrics, as the policy does.
        (kv,) = kvs
        kv_query = f"sum({catalog.ENGINE_METRICS[r.spec.engine.name].kv_cache_usage}{{{selector_of(r)}}})"
        assert kv["type"] == "prometheus" and kv["name"] == "kv-cache" and kv["metricType"] == "AverageValue"
        assert (float(kv["metadata"]["threshold"]) == policy.kv_cache_target
                == r.spec.capacity.scaling.kv_cache_per_replica)
        assert kv["metadata"]["serverAddress"] == r.spec.target.kubernetes.prometheus_url
        fixed_share = sum(d["spec"]["replicas"] for d in deployments.values() if "replicas" in d["spec"])
        assert kv["metadata"]["query"] == (f"clamp_min({kv_query} - {fixed_share * policy.kv_cache_target:g}, 0)"
                                           if fixed_share else kv_query)
    meta = trigger["metadata"]
    assert meta["serverAddress"] == r.spec.target.kubernetes.prometheus_url
    selector = selector_of(r)
    names = catalog.ENGINE_METRICS[r.spec.engine.name]
    if policy.metric == "waiting":
        # The engine's own queue gauge (its adapter's and the catalog's name agree).
        assert names.waiting == r.adapter.load_metrics.waiting
        assert f"sum({names.waiting}{{{selector}}})" in meta["query"]
        assert trigger["metricType"] == "AverageValue"
        assert float(meta["threshold"]) == policy.target_value / per
        if fixed_pods:
            assert meta["query"] == (f"clamp_min(sum({names.waiting}{{{selector}}}) - "
                                     f"{fixed_pods * policy.target_value / per:g}, 0)")
        assert step == {"type": "Pods", "value": policy.max_replicas * per,
                        "periodSeconds": policy.scale_out_cooldown_seconds}
    else:
        assert meta["query"] == (f"histogram_quantile(0.99, sum by (le) (rate({names.ttft_histogram}_bucket"
                                 f"{{{selector}}}[5m])))")
        assert trigger["metricType"] == "Value" and float(meta["threshold"]) == policy.target_value
        assert step["type"] == "Percent" and step["value"] == 100


def test_the_trigger_queries_are_promql_promtool_accepts(tmp_path):
    """KEDA sends the query as written: each parses in Prometheus' own parser (as a rule's expr)."""
    rules = {"groups": [{"name": "keda", "rules": []}]}
    for index, (stack, given) in enumerate(SCALING_VARIANTS):
        _, _, _, monitoring = rendered(stack, given)
        for number, trigger in enumerate(the(monitoring, "ScaledObject")["spec"]["triggers"]):
            rules["groups"][0]["rules"].append({"record": f"kimi:keda_query_{index}_{number}",
                                                "expr": trigger["metadata"]["query"]})
    path = tmp_path / "rules.yaml"
    path.write_text(json.dumps(rules))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules['groups'][0]['rules'])} rules found" in done.stdout
    # One trigger per stack for the batch ones (the queue or TTFT alone), two for the interactive ones.
    batch = sum(resolve(stack, given).spec.capacity.workload == "batch" for stack, given in SCALING_VARIANTS)
    assert len(rules["groups"][0]["rules"]) == 2 * len(SCALING_VARIANTS) - batch and batch >= 1


def _operator_relabelings(endpoint: dict) -> list[dict]:
    """What the Prometheus Operator v0.93.0 makes of a podMetricsEndpoint (pkg/prometheus/promcfg.go,
    generatePodMonitorConfig): keep the pods' container ports of the endpoint's name, namespace and pod
    labels, job = <namespace>/<podmonitor>, endpoint = the port's name, then the endpoint's own
    relabelings (camelCase fields as Prometheus' snake_case), in that order."""
    rename = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [
        {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": endpoint["port"]},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "job", "replacement": f"kimi-gb200/{manifests.POD_MONITOR}"},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
        *[{rename.get(key, key): value for key, value in relabel.items()} for relabel in endpoint["relabelings"]],
    ]


def test_a_real_prometheus_scrapes_the_gate_as_the_pod_monitor_says_and_answers_kedas_query(tmp_path):
    """Prometheus (Debian's) scrapes the metrics gate in front of the fake engine with the relabelings
    the Operator generates from the PodMonitor (a pod without the named port, a headless worker, is
    dropped), and the ScaledObject's own query returns the stack's queue: the number KEDA divides by
    its per-pod threshold."""
    from tests.fakes.observed_node import PROMETHEUS, run_prometheus

    if PROMETHEUS is None:
        pytest.skip("prometheus binary needed (.ci/run installs it)")
    stack, given = SCALING_VARIANTS[0]
    r, _, _, monitoring = rendered(stack, given)
    namespace = r.spec.target.kubernetes.namespace
    (endpoint,) = [e for e in the(monitoring, "PodMonitor")["spec"]["podMetricsEndpoints"]
                   if e["path"] == manifests.ENGINE_METRICS_PATH]
    query = the(monitoring, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    hang = tmp_path / "hang"
    hang.touch()
    gate_port = free_port()
    waiting = 3
    with start_fake_engine("good", engine="vllm", options=("--max-running", "1", "--hang-file", str(hang))) as fake:
        def hung_request():
            body = json.dumps({"model": fake.model, "messages": [{"role": "user", "content": "hang"}]}).encode()
            request = urllib.request.Request(f"{fake.url}/v1/chat/completions", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
            except OSError:
                pass  # the engine stops under it

        threads = [threading.Thread(target=hung_request, daemon=True) for _ in range(waiting + 1)]
        for thread in threads:
            thread.start()
        gate = manifests.render_metrics_gate(fake.upstream, listen_port=gate_port)
        pod_meta = {"__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_container_name": "metrics"}
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [{
            "job_name": "podMonitor/kimi", "metrics_path": endpoint["path"], "scheme": endpoint["scheme"],
            "static_configs": [
                {"targets": [f"127.0.0.1:{gate_port}"], "labels": {
                    **pod_meta, "__meta_kubernetes_pod_name": "kimi-engine-on-demand-1",
                    "__meta_kubernetes_pod_container_port_name": manifests.METRICS_PORT_NAME}},
                {"targets": ["127.0.0.1:9"], "labels": {  # a worker: its container ports carry no such name
                    **pod_meta, "__meta_kubernetes_pod_name": "kimi-engine-0-1",
                    "__meta_kubernetes_pod_container_port_name": ""}},
            ],
            "relabel_configs": _operator_relabelings(endpoint),
        }]}
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        checked = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        with start_caddy(gate.replace(f"http://:{gate_port}", f"http://127.0.0.1:{gate_port}"), {}), \
                run_prometheus(path, tmp_path) as prometheus:
            assert wait_for(lambda: prometheus.values(query) == {"": float(waiting)}, 30, 0.5), (
                prometheus.values(query), prometheus.get("/api/v1/targets"))
            (up,) = prometheus.query("up")
            assert up["metric"] == {"__name__": "up", "job": observability.ENGINE_JOB, "stack": stack,
                                    "replica": "kimi-engine-on-demand-1", "instance": f"127.0.0.1:{gate_port}",
                                    "namespace": namespace, "container": "metrics", "pod": "kimi-engine-on-demand-1",
                                    "endpoint": manifests.METRICS_PORT_NAME}
            # The second trigger's query finds the engine's KV cache gauge under the same labels.
            kv_query = the(monitoring, "ScaledObject")["spec"]["triggers"][1]["metadata"]["query"]
            kv_name = catalog.ENGINE_METRICS["vllm"].kv_cache_usage
            assert prometheus.values(kv_query) == prometheus.values(f"sum({kv_name})") != {}
            dropped = prometheus.get("/api/v1/targets?state=any")["data"]["droppedTargets"]
            assert [t["discoveredLabels"]["__meta_kubernetes_pod_name"] for t in dropped] == ["kimi-engine-0-1"]
        hang.unlink()


def test_a_scaling_stack_without_prometheus_url_is_refused_naming_the_field():
    with pytest.raises(StackSpecError) as refused:
        resolve("gb200-int4-vllm", scaling_values("gb200-int4-vllm", url=None))
    (problem,) = refused.value.problems
    assert "target.kubernetes.prometheusUrl (not set)" in problem and "KEDA" in problem
    assert "http://prometheus-operated.monitoring.svc:9090" in problem


# Scale to zero (a batch stack, minReplicas 0) is served by the wake front: tests/test_k8s_wake.py.


def test_a_multi_node_replica_is_monitored_and_never_scaled():
    r, _, objects, monitoring = rendered(MULTI_NODE)
    assert [o["kind"] for o in monitoring] == ["PodMonitor", "PrometheusRule", "ConfigMap"]
    given = scaling_values(MULTI_NODE)
    with pytest.raises(StackSpecError, match="capacity.scaling"):
        resolve(MULTI_NODE, given)


# --- the drain before a pod stops ----------------------------------------------------------------

@pytest.mark.parametrize("stack, given", SCALING_VARIANTS[:2])
def test_a_scaling_stacks_pods_drain_before_they_stop(stack, given):
    r, sizing, objects, _ = rendered(stack, given)
    policy = scaling_policy(r, sizing)
    probe = the(objects, "ConfigMap", manifests.PROBE_CONFIGMAP)["data"]
    assert probe[manifests.DRAIN_SCRIPT] == pod_script(manifests.DRAIN_SCRIPT)
    for template in pod_templates(objects):
        spec = template["spec"]
        assert spec["terminationGracePeriodSeconds"] == policy.drain_timeout_seconds
        engine, proxy = container(template, "engine"), container(template, "proxy")
        command = engine["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["python3", f"{manifests.PROBE_MOUNT}/{manifests.DRAIN_SCRIPT}"]
        assert json.loads(command[2]) == r.adapter.load_metrics.as_dict()
        assert command[3] == f"http://127.0.0.1:{r.engine.port}" and command[5] == manifests.DRAINED_FILE
        assert int(command[4]) == policy.drain_timeout_seconds - manifests.DRAIN_STOP_SECONDS
        assert manifests.DRAINED_FILE in proxy["lifecycle"]["preStop"]["exec"]["command"][2]
        for c in (engine, proxy):
            (mount,) = [m for m in c["volumeMounts"] if m["name"] == "drain"]
            assert mount["mountPath"] == manifests.DRAIN_STATE
        assert {"name": "drain", "emptyDir": {}} in spec["volumes"]


@pytest.mark.parametrize("stack, given", SCALING_VARIANTS[:2])
def test_the_gate_waits_for_a_rollout_at_the_ranges_top_with_each_pods_drain(stack, given):
    r, sizing, _, _ = rendered(stack, given)
    policy = scaling_policy(r, sizing)
    wait = manifests.rollout_wait(r, sizing)
    pods = policy.max_replicas * r.engines_per_node
    assert pods > r.spec.capacity.replicas * r.engines_per_node
    assert wait["timeout_seconds"] == (wait["pod_ready_seconds"] + policy.drain_timeout_seconds) * pods


def test_the_shipped_stacks_include_a_fixed_and_a_scaling_one():
    assert FIXED_STACKS and set(FIXED_STACKS) < set(KUBERNETES_STACKS)


@pytest.mark.parametrize("stack", FIXED_STACKS)
def test_a_fixed_stack_keeps_its_count_and_no_drain(stack):
    r, _, objects, _ = rendered(stack)
    for template in pod_templates(objects):
        assert template["spec"]["terminationGracePeriodSeconds"] == 120
        assert all("lifecycle" not in c for c in template["spec"]["containers"])
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        assert deployment["spec"]["replicas"] >= 1


class _Metrics(BaseHTTPRequestHandler):
    """An engine's /metrics whose queue empties after `busy_reads` reads."""
    reads = 0
    busy_reads = 2

    def do_GET(self):  # noqa: N802
        type(self).reads += 1
        _answer_load(self, busy=type(self).reads <= type(self).busy_reads)

    def log_message(self, *args):
        pass


def _answer_load(handler: BaseHTTPRequestHandler, busy: bool) -> None:
    """vLLM's load gauges as its /metrics shows them: 1 running and 2 waiting when busy, else none."""
    body = (f"vllm:generation_tokens_total 10\nvllm:num_requests_running{{engine=\"0\"}} {1 if busy else 0}\n"
            f"vllm:num_requests_waiting {2 if busy else 0}\n").encode()
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.mark.parametrize("busy_reads, timeout, verdict", [
    (2, 60, "drained: 0 running, 0 waiting"),
    (10_000, 0, "gave up after 0 s with 1 running and 2 waiting"),
])
def test_the_drain_as_shipped_waits_for_the_engines_queue(tmp_path, busy_reads, timeout, verdict, monkeypatch):
    """pod_drain.py as the ConfigMap ships it (beside generation_probe.py), run as the hook runs it."""
    r, _, objects, _ = rendered(*SCALING_VARIANTS[0])
    for key, text in the(objects, "ConfigMap", manifests.PROBE_CONFIGMAP)["data"].items():
        (tmp_path / key).write_text(text)
    handler = type("Metrics", (_Metrics,), {"reads": 0, "busy_reads": busy_reads})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    done_file = tmp_path / "state" / "drained"
    try:
        sys.path.insert(0, str(tmp_path))
        import pod_drain  # noqa: PLC0415 - the shipped file
        monkeypatch.setattr(pod_drain, "POLL_SECONDS", 0.05)
        assert pod_drain.main([json.dumps(r.adapter.load_metrics.as_dict()),
                               f"http://127.0.0.1:{server.server_address[1]}", str(timeout), str(done_file)]) == 0
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("pod_drain", None)
        sys.modules.pop("generation_probe", None)
        server.shutdown()
    assert json.loads(done_file.read_text()) == {"verdict": verdict}
    if busy_reads == 2:
        assert handler.reads == 3  # it waited through both busy reads
    # A bad argument is refused, not a silent drain.
    done = subprocess.run([sys.executable, str(tmp_path / "pod_drain.py"), "{}", "http://127.0.0.1:1", "5",
                           str(done_file)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage" in done.stderr


class _Engine(BaseHTTPRequestHandler):
    """An engine's /metrics, busy (1 running, 2 waiting) until `idle` is set; `proxy_probes` counts the
    proxy's reads (busybox wget's User-Agent), `probed` is set on each."""
    idle: threading.Event
    probed: threading.Event
    proxy_probes = 0

    def do_GET(self):  # noqa: N802
        if "Wget" in self.headers.get("User-Agent", ""):
            type(self).proxy_probes += 1
            type(self).probed.set()
        _answer_load(self, busy=not type(self).idle.is_set())

    def log_message(self, *args):
        pass


BUSYBOX = shutil.which("busybox")


@pytest.mark.skipif(BUSYBOX is None, reason="busybox not installed (the Caddy image's shell and tools)")
@pytest.mark.parametrize("engine", ["not running", "busy"])
def test_a_deleted_pod_waits_for_a_busy_engine_and_not_for_one_that_is_not_running(tmp_path, engine, monkeypatch):
    """The pod's deletion as the kubelet runs it: every running container's preStop at once, the pod
    gone when the last returns. The proxy's hook as rendered, under busybox (the Caddy image's sh, wget,
    timeout); the engine's (pod_drain.py as shipped) only when its container runs. An engine container
    that is not running (crashed, in back-off) runs no hook: the proxy's returns at once instead of
    holding the GPUs for the whole grace period; a busy engine keeps the pod until its drain ends."""
    r, sizing, objects, _ = rendered(*SCALING_VARIANTS[0])
    grace = scaling_policy(r, sizing).drain_timeout_seconds
    (template,) = pod_templates(objects)
    engine_hook = container(template, "engine")["lifecycle"]["preStop"]["exec"]["command"]
    shell, flag, script = container(template, "proxy")["lifecycle"]["preStop"]["exec"]["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    port, done_file = free_port(), tmp_path / "drain" / "drained"
    # The pod's loopback port and drain volume, here: the test's own.
    script = script.replace(f"127.0.0.1:{r.engine.port}/", f"127.0.0.1:{port}/").replace(
        manifests.DRAINED_FILE, str(done_file))
    assert str(port) in script and str(done_file) in script
    tools = tmp_path / "bin"
    tools.mkdir()
    for applet in ("sh", "wget", "timeout", "grep", "sleep", "["):
        (tools / applet).symlink_to(BUSYBOX)
    done_file.parent.mkdir()
    if engine == "not running":
        start = time.monotonic()
        proxy = subprocess.Popen([BUSYBOX, "sh", "-c", script], env={"PATH": str(tools)})
        try:
            assert proxy.wait(timeout=10) == 0
        finally:
            proxy.kill()
        elapsed = time.monotonic() - start
        assert elapsed < manifests.PROXY_DRAIN_PROBE_SECONDS < grace  # at once, not the grace period
        assert not done_file.exists()
        return

    for key, text in the(objects, "ConfigMap", manifests.PROBE_CONFIGMAP)["data"].items():
        (tmp_path / key).write_text(text)
    handler = type("Engine", (_Engine,), {"idle": threading.Event(), "probed": threading.Event(), "proxy_probes": 0})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.path.insert(0, str(tmp_path))
    try:
        import pod_drain  # noqa: PLC0415 - the shipped file
        monkeypatch.setattr(pod_drain, "POLL_SECONDS", 0.05)
        drain = threading.Thread(target=pod_drain.main, args=(
            [engine_hook[2], f"http://127.0.0.1:{port}", engine_hook[4], str(done_file)],), daemon=True)
        drain.start()
        proxy = subprocess.Popen([BUSYBOX, "sh", "-c", script], env={"PATH": str(tools)})
        try:
            # Two probes of the busy engine, a sleep between them: the proxy went on waiting.
            while handler.proxy_probes < 2:
                assert handler.probed.wait(10), "the proxy's drain did not probe the engine"
                handler.probed.clear()
            assert proxy.poll() is None and drain.is_alive() and not done_file.exists()
            handler.idle.set()  # the last request finished
            drain.join(10)
            assert json.loads(done_file.read_text()) == {"verdict": "drained: 0 running, 0 waiting"}
            assert proxy.wait(timeout=10) == 0  # the proxy follows the engine's verdict
        finally:
            proxy.kill()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("pod_drain", None)
        sys.modules.pop("generation_probe", None)
        server.shutdown()
        server.server_close()


# --- the YAML a hand-applier uses ------------------------------------------------------------------

@pytest.mark.parametrize("stack", KUBERNETES_STACKS)
def test_the_monitoring_yaml_is_its_own_file(stack):
    r, sizing, objects, monitoring = rendered(stack)
    files = manifests.render_k8s_artifacts(r, sizing, render_launch(r))
    assert list(yaml.safe_load_all(files["kubernetes-monitoring.yaml"])) == monitoring
    assert list(yaml.safe_load_all(files["kubernetes.yaml"])) == objects
    header = files["kubernetes-monitoring.yaml"].split("\n---")[0]
    assert manifests.PROMETHEUS_OPERATOR_RELEASE in header and manifests.METRICS_POLICY in header
    assert "pulumi.com/" not in json.dumps(monitoring)


def test_crd_schema_closes_objects_and_refuses_an_open_one():
    closed = crd_schema.closed({"type": "object", "properties": {"a": {"type": "string", "nullable": True}}})
    assert closed["additionalProperties"] is False and closed["properties"]["a"]["type"] == ["string", "null"]
    with pytest.raises(ValueError, match="preserve-unknown-fields"):
        crd_schema.closed({"type": "object", "x-kubernetes-preserve-unknown-fields": True})


# --- the component under the mocks ---------------------------------------------------------------

def integral(value):
    """The mocks carry numbers as floats (a protobuf Struct): back to the integers rendered."""
    if isinstance(value, dict):
        return {key: integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [integral(item) for item in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


def run_endpoint(stack: str, given: dict):
    import pulumi

    from components.kubernetes_endpoint import KubernetesEndpoint, KubernetesEndpointArgs
    from tooling.mock_run import run_components

    seen = {}

    def declare():
        r = resolve(stack, given)
        endpoint = KubernetesEndpoint("kimi", KubernetesEndpointArgs(
            resolved=r, sizing=size(r), launch=render_launch(r),
            api_key=pulumi.Output.secret("sk-test-not-a-real-key-0123456789"), hf_token=None))
        seen.update(metrics_location=endpoint.metrics_location, dashboard_url=endpoint.dashboard_url)
        return {"node_ids": endpoint.node_ids}

    return run_components(declare, stack), seen


def test_the_component_declares_the_monitoring_and_scaling_objects():
    stack, given = SCALING_VARIANTS[0]
    run, seen = run_endpoint(stack, given)
    _, _, objects, monitoring = rendered(stack, given)
    assert seen == {"metrics_location": "podmonitor://kimi-gb200/kimi-fleet", "dashboard_url": None}
    (monitor,) = run.of_type("kubernetes:monitoring.coreos.com/v1:PodMonitor")
    (scaled,) = run.of_type("kubernetes:keda.sh/v1alpha1:ScaledObject")
    (rule,) = run.of_type("kubernetes:monitoring.coreos.com/v1:PrometheusRule")
    for declared, kind in ((monitor, "PodMonitor"), (scaled, "ScaledObject"), (rule, "PrometheusRule")):
        applied = integral({key: declared["wire"][key] for key in ("apiVersion", "kind", "metadata", "spec")})
        assert applied == the(monitoring, kind)  # as rendered, nothing added
        assert monitoring_schema.errors(applied) == []
    (deployment,) = [d for d in run.of_type("kubernetes:apps/v1:Deployment")
                     if d["wire"]["metadata"]["name"] != "kimi-deletion-cost"]  # test_deletion_cost_manifests
    # Created at capacity.replicas (2, inside the 1-4 range: the count a first deploy starts with), which
    # KEDA's HPA owns after: ignored on every update (test_k8s_component).
    assert deployment["wire"]["spec"]["replicas"] == 2 >= scaled["wire"]["spec"]["minReplicaCount"]
    assert deployment["ignore_changes"] == ["spec.replicas"]
    assert deployment["name"] in scaled["dependencies"]  # the scaled Deployment exists first
    (component,) = run.of_type("kimi-fleet:kubernetes:KubernetesEndpoint")
    assert monitor["parent"] == scaled["parent"] == rule["parent"] == component["name"]
    dashboards = [c for c in run.of_type("kubernetes:core/v1:ConfigMap")
                  if c["wire"]["metadata"]["name"] == manifests.DASHBOARD_CONFIGMAP]
    assert len(dashboards) == 1 and dashboards[0]["wire"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    # No engine pod waits for a monitoring object (a cluster's Operator may take its time).
    for declared in (monitor, rule, dashboards[0]):
        assert declared["name"] not in deployment["dependencies"], declared["name"]
    policies = {p["wire"]["metadata"]["name"] for p in run.of_type("kubernetes:networking.k8s.io/v1:NetworkPolicy")}
    assert manifests.METRICS_POLICY in policies
