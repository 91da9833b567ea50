"""The deletion-cost controller of a scaling Kubernetes stack (issue 24: scale-in protection for a
replica serving long requests), as plain dicts (pure: no Pulumi).

When KEDA's HPA scales the engine Deployment in, the ReplicaSet controller picks the pod to delete;
among pods equally ready it deletes the lowest `controller.kubernetes.io/pod-deletion-cost` first
(beta and on by default since Kubernetes 1.22). A small CPU-only Deployment
(pod_scripts/deletion_cost.py) sets each engine pod's cost to its running + waiting requests, so the
busiest pod goes last; the one it deletes still drains through the proxy's preStop (k8s_manifests).

Where the load comes from: each engine pod's metrics gate (the port and path the PodMonitor scrapes),
not the cluster's Prometheus. The gate's reading is current, where Prometheus' is a scrape interval
old and then its query's; it names the pod by the IP the API server lists, with no label to match; and
the controller then needs no route out of the namespace but the API server (a Prometheus URL may be
anywhere, and KEDA already depends on it).

Least privilege: the controller has its own ServiceAccount (no other pod mounts its token: the
account itself turns automounting off, its pod turns it on) and a namespaced Role with list/patch on
pods (the script lists and patches; it never gets one pod), nothing else; engine pods keep
automountServiceAccountToken false and gain nothing. NetworkPolicies: nothing reaches the controller;
it reaches the engine pods' metrics port and TCP 443/6443 at any address (the API server's address is
not known when rendering); the engine pods admit it on their metrics port only.

Liveness: the script touches a heartbeat file (an emptyDir: the root stays read-only) after each
cycle that completed; the liveness probe runs the script's `--alive`, which fails when the file is
older than LIVENESS_CYCLES intervals, so a controller stuck failing is restarted and counted.
"""

from __future__ import annotations

import json

import yaml

from kimi_fleet import catalog
from kimi_fleet import k8s_manifests as manifests
from kimi_fleet.autoscaling import scaling_policy
from kimi_fleet.pod_scripts import deletion_cost as deletion_cost_script
from kimi_fleet.pod_scripts import pod_script
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import Sizing

NAME = "kimi-deletion-cost"
COMPONENT = "deletion-cost"
SCRAPE_POLICY = "kimi-deletion-cost-scrape"
SCRIPT = "deletion_cost.py"
CONFIG_KEY = "deletion-cost.json"
MOUNT = "/opt/kimi-fleet/deletion-cost"
ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
#: The HPA controller's default sync period (kube-controller-manager --horizontal-pod-autoscaler-sync-period):
#: a scale-in is decided at most this often, so a fresher cost would buy nothing.
INTERVAL_SECONDS = 15
#: The highest cost set: far above any engine's running + waiting (vLLM's max-num-seqs is 1,024 by
#: default) and inside the annotation's int32; an answer above it is refused as nonsense.
MAX_COST = 1_000_000
#: The API server's secure port as a pod reaches it: 443 (the `kubernetes` Service) and 6443 (the
#: usual endpoint port behind it; NetworkPolicy engines match egress after the Service's DNAT).
API_SERVER_PORTS = (443, 6443)
#: The heartbeat's emptyDir (memory-backed: one empty file) and the file in it.
HEARTBEAT_DIR = "/run/kimi-deletion-cost"
HEARTBEAT_FILE = f"{HEARTBEAT_DIR}/heartbeat"


def enabled(r: Resolved, sizing: Sizing) -> bool:
    """Only a scaling stack's Deployment is scaled in (a fixed stack's pods are never picked)."""
    return scaling_policy(r, sizing) is not None and not r.multi_node


def engine_selector(r: Resolved, stack: str) -> dict[str, str]:
    """The pods of the Deployment KEDA scales (its selector: the on-demand base under spot is not)."""
    return {**manifests.labels(stack, "engine"), "kimi-fleet/capacity-type": manifests.scaled_market(r)}


def controller_config(r: Resolved, stack: str) -> dict:
    """What the controller reads (CONFIG_KEY): where the pods are, how to read their load."""
    names = catalog.ENGINE_METRICS[r.spec.engine.name]
    return {
        "namespace": r.spec.target.kubernetes.namespace,
        "label_selector": ",".join(f"{key}={value}" for key, value in sorted(engine_selector(r, stack).items())),
        "metrics_port": manifests.METRICS_GATE_PORT,
        "metrics_path": manifests.ENGINE_METRICS_PATH,
        "running": names.running,
        "waiting": names.waiting,
        "interval_seconds": INTERVAL_SECONDS,
        "max_cost": MAX_COST,
        "heartbeat_file": HEARTBEAT_FILE,
    }


def _meta(r: Resolved, name: str, stack: str, **extra) -> dict:
    return {"name": name, "namespace": r.spec.target.kubernetes.namespace,
            "labels": manifests.labels(stack, COMPONENT), **extra}


def role(r: Resolved, stack: str) -> dict:
    # RBAC grants verbs on a resource, never on fields: `patch` on pods is the narrowest grant that can
    # set an annotation, and it could change any mutable field of any pod of the namespace (labels, an
    # image). resourceNames cannot narrow it: the ReplicaSet names its pods at random. The controller
    # keeps to the annotation by what it sends (a JSON merge patch of metadata.annotations[ANNOTATION]
    # only, deletion_cost.Api.set_cost); a cluster that wants the API server to enforce that can add a
    # ValidatingAdmissionPolicy for this ServiceAccount (docs/known-limits.md).
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(r, NAME, stack),
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "patch"]}],
    }


def liveness_probe() -> dict:
    """The script's --alive: fails when no cycle completed in LIVENESS_CYCLES intervals. The first
    check waits as long (a controller that never completes one is restarted then)."""
    stale = deletion_cost_script.LIVENESS_CYCLES * INTERVAL_SECONDS
    return {"exec": {"command": ["python3", f"{MOUNT}/{SCRIPT}", f"{MOUNT}/{CONFIG_KEY}", "--alive"]},
            "initialDelaySeconds": stale, "periodSeconds": INTERVAL_SECONDS, "timeoutSeconds": 5,
            "failureThreshold": 1}


def _pod_spec(r: Resolved) -> dict:
    return {
        "serviceAccountName": NAME,
        "automountServiceAccountToken": True,  # the one pod of the stack that holds a token
        "enableServiceLinks": False,  # the API server's KUBERNETES_SERVICE_* come regardless
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "controller",
            "image": catalog.DOWNLOAD_IMAGE,  # the stack's pinned python image: the script is standard library
            "command": ["python3", f"{MOUNT}/{SCRIPT}", f"{MOUNT}/{CONFIG_KEY}"],
            "env": [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
            "resources": {"requests": {"cpu": "20m", "memory": "48Mi"}, "limits": {"memory": "128Mi"}},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "livenessProbe": liveness_probe(),
            "volumeMounts": [{"name": "controller", "mountPath": MOUNT, "readOnly": True},
                             {"name": "heartbeat", "mountPath": HEARTBEAT_DIR}],
        }],
        "volumes": [{"name": "controller", "configMap": {"name": NAME}},
                    {"name": "heartbeat", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}],
    }


def network_policies(r: Resolved, stack: str) -> list[dict]:
    """The controller: no ingress (the namespace's deny-all already says so; this one says it for its
    egress too), egress to the scaled pods' metrics port and the API server's ports. The engine pods:
    ingress from the controller on their metrics port (beside the Prometheus one; policies add up)."""
    controller = {"matchLabels": manifests.labels(stack, COMPONENT)}
    metrics_port = [{"port": manifests.METRICS_PORT_NAME, "protocol": "TCP"}]
    return [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(r, NAME, stack),
            "spec": {
                "podSelector": controller,
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [],
                "egress": [
                    {"to": [{"podSelector": {"matchLabels": engine_selector(r, stack)}}], "ports": metrics_port},
                    # The API server's address is the cluster's (a control-plane endpoint outside the pod
                    # network on managed clusters): by port, with no DNS (the pod reads its IP from env).
                    {"ports": [{"port": port, "protocol": "TCP"} for port in API_SERVER_PORTS]},
                ],
            },
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(r, SCRAPE_POLICY, stack),
            "spec": {
                "podSelector": {"matchLabels": engine_selector(r, stack)},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": controller}], "ports": metrics_port}],
            },
        },
    ]


def render_deletion_cost(r: Resolved, sizing: Sizing, *, stack: str) -> list[dict]:
    """The controller's objects in apply order, or [] for a stack that does not scale."""
    if not enabled(r, sizing):
        return []
    subject = {"kind": "ServiceAccount", "name": NAME, "namespace": r.spec.target.kubernetes.namespace}
    labels = manifests.labels(stack, COMPONENT)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(r, NAME, stack),
         "automountServiceAccountToken": False},
        role(r, stack),
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(r, NAME, stack),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
         "subjects": [subject]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(r, NAME, stack),
         "data": {SCRIPT: pod_script(SCRIPT),
                  CONFIG_KEY: json.dumps(controller_config(r, stack), indent=2, sort_keys=True) + "\n"}},
        *network_policies(r, stack),
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(r, NAME, stack),
            "spec": {
                "replicas": 1,
                # Two at once during a rollout would only write the same values: no need to wait.
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": _pod_spec(r)},
            },
        },
    ]


def render_deletion_cost_yaml(r: Resolved, sizing: Sizing) -> dict[str, str]:
    """File name -> text for build/<stack>/ ({} for a stack that does not scale)."""
    objects = render_deletion_cost(r, sizing, stack=r.spec.stack)
    if not objects:
        return {}
    header = (f"# kimi-fleet stack {r.spec.stack}: the deletion-cost controller (scale-in takes the least busy "
              f"engine pod first); apply after kubernetes.yaml\n")
    documents = yaml.dump_all(objects, Dumper=manifests._NoAliasDumper, sort_keys=False, width=120)
    return {"kubernetes-deletion-cost.yaml": header + documents}
