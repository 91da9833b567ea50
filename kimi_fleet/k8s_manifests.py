"""The Kubernetes objects of one stack, as plain dicts (pure: no Pulumi).

The KubernetesEndpoint component builds typed resources from these dicts and `plan` writes them as
YAML, so this module is the single source of both. Secrets are referenced by name only: the
component creates them from secret config, and the YAML tells a hand-applier how to.

Layout: one weights volume filled once and verified by a download Job, mounted read-only by every
engine pod; one pod per engine (launch.instances[0]'s argv on gpus_per_engine devices), so
engines_per_node > 1 becomes more pods. The engine binds 127.0.0.1, so the authenticating Caddy
runs as a sidecar in the same pod and the Service reaches only Caddy.

A replica over several nodes (parallelism.nodes) is one LeaderWorkerSet group instead of the
Deployments: a leader pod (rank 0: the API, Caddy, the admission suite) and headless worker pods,
each with its node's GPUs and fabric devices and a fabric check on NCCL's own log.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

import yaml

from kimi_fleet import catalog, observability
from kimi_fleet.autoscaling import ScalingPolicy, scaling_policy
from kimi_fleet.caddy import (
    HTTP_PORT, HTTPS_PORT, METRICS_PATH, PREVIOUS_API_KEY_ENV, WAKE_STATUS, RenderedProxy, render_proxy,
)
from kimi_fleet.launch import MODEL_MOUNT, Launch, render_launch
from kimi_fleet.node_files import (
    ADMISSION_DEADLINE_SECONDS, HF_CLI_PYTHON, HF_CLI_REQUIREMENTS, LOCAL_PROXY_PORT, VERIFIER_REQUIREMENTS_TEXT,
    admission_settings, verifier_sources,
)
from kimi_fleet.paths import COMPILE_CACHE_MOUNT
from kimi_fleet.node_scripts import GENERATION_PROBE_SCRIPT, GENERATION_PROBE_TIMEOUT_SECONDS, node_script
from kimi_fleet.node_scripts.generation_probe import ALIVE_WHILE_GENERATING, METRICS_TIMEOUT_SECONDS
from kimi_fleet.node_scripts.weights_room import CHECKPOINT_MARKER, POD_VERIFIED_MARKER
from kimi_fleet.pod_scripts import FABRIC_PROBE_SCRIPT, pod_script
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import Sizing

API_KEY_SECRET = "kimi-api-key"
API_KEY_SECRET_KEY = "api-key"
#: During a key rotation that accepts it, the key clients used before (same Secret).
PREVIOUS_API_KEY_SECRET_KEY = "api-key-previous"
HF_TOKEN_SECRET = "kimi-hf-token"
HF_TOKEN_SECRET_KEY = "token"
WEIGHTS_PVC = "kimi-weights"
CADDYFILE_CONFIGMAP = "kimi-proxy-caddyfile"
GPU_CLAIM_TEMPLATE = "kimi-gpus"
GPU_CLAIM = "gpus"
PROXY_SERVICE = "kimi-proxy"
DENY_ALL_POLICY = "kimi-deny-ingress"
#: The pod template's release id: a new release is a new template, so the pods roll.
RELEASE_ANNOTATION = "kimi-fleet/release"
#: Set by the component from the API key Secret's resourceVersion (known only at deploy time).
API_KEY_VERSION_ANNOTATION = "kimi-fleet/api-key-version"
PROXY_POLICY = "kimi-proxy-ingress"

WEIGHTS_MOUNT = "/weights"
#: The node's weights verifier (every file's size and content against the Hub's tree), for the Job.
WEIGHTS_VERIFIER_SCRIPT = "weights_manifest.py"
#: Removes older checkpoints from the volume when the new one would not fit beside them.
WEIGHTS_ROOM_SCRIPT = "weights_room.py"
#: What the download runs, beside each other in the verifier ConfigMap (the room tool imports node_status).
WEIGHTS_JOB_SCRIPTS = (WEIGHTS_VERIFIER_SCRIPT, WEIGHTS_ROOM_SCRIPT, "node_status.py")
VERIFIER_CONFIGMAP = "kimi-weights-verifier"
VERIFIER_MOUNT = "/opt/kimi-fleet"
VERIFIED_MARKER = POD_VERIFIED_MARKER
VERIFIER_REQUIREMENTS_KEY = "verify-requirements.txt"
#: The `hf` CLI and its whole closure, hash-pinned (node_files.HF_CLI_PINS, as the mirror's fill
#: instance installs it): the download installs nothing unpinned.
HF_CLI_REQUIREMENTS_KEY = "hf-requirements.txt"
#: The suite's pinned packages, installed once per (pins, image) by the weights download (the Job or
#: the init container) onto the weights volume: pods then start their admission without PyPI.
VERIFIER_PACKAGES_DIR = "{}/.kimi-fleet/verify-packages/{}".format(
    WEIGHTS_MOUNT, hashlib.sha256(f"{VERIFIER_REQUIREMENTS_TEXT}{catalog.DOWNLOAD_IMAGE}".encode()).hexdigest()[:16])
PACKAGES_COMPLETE_MARKER = ".complete"

#: Probe cadence. Every probe is a tiny real generation (node_scripts/generation_probe.py): a green
#: /health with a dead scheduler must not count as ready or alive.
PROBE_PERIOD_SECONDS = 10
#: The startup window covers a new pod's cold path (issue 20): the weights are on the volume (the Job
#: or the init container downloaded and verified them before the engine starts) but not in this
#: node's page cache, so the engine reads them cold, then loads, compiles and warms up: the sizing's
#: read + load. The seeds measured that cold load at 10-15 min around the 12.5 min the sizing takes
#: (x1.2 at the top); x1.5 leaves room for a busier volume and still kills a load that never finishes
#: well before twice its expected time (the kubelet restarts the container: the pod's restart count
#: and events say so).
STARTUP_MARGIN = 1.5
#: A startup probe never runs longer than its period, so a hung engine that accepts connections and
#: never answers uses up the window at the same pace as one that refuses them (the kubelet runs one
#: probe at a time: a 60 s probe every 10 s would stretch the window six-fold). A freshly loaded
#: engine has no traffic yet (the pod is not Ready): a 4-token answer takes well under this.
STARTUP_PROBE_PERIOD_SECONDS = 30
#: Out of rotation after this many failed generations in a row.
READINESS_FAILURES = 3
#: Liveness restarts an engine that stopped generating for several minutes. A busy engine (its probe
#: queued behind clients' requests past the timeout while its token counter advanced) passes: only a
#: stalled one is restarted (generation_probe.py --alive-while-generating, the watchdog's "busy").
LIVENESS_PERIOD_SECONDS = 30
LIVENESS_FAILURES = 6
#: The liveness probe reads the engine's /metrics before and after its generation.
LIVENESS_TIMEOUT_SECONDS = GENERATION_PROBE_TIMEOUT_SECONDS + 2 * METRICS_TIMEOUT_SECONDS
PROBE_CONFIGMAP = "kimi-generation-probe"
PROBE_MOUNT = "/opt/kimi-fleet/probe"
#: The admission container: the project's verification suite against the pod's own proxy, then a
#: generation every PROBE_PERIOD_SECONDS; the pod is Ready only while it says so (ADMISSION_PASSED).
ADMISSION_CONFIGMAP = "kimi-admission"
ADMISSION_MOUNT = "/opt/kimi-fleet/admission"
ADMISSION_STATE = "/run/kimi-admission"
ADMISSION_PASSED = f"{ADMISSION_STATE}/passed"
ADMISSION_SCRIPTS = ("admission.py", "pod_admission.py", GENERATION_PROBE_SCRIPT)
#: The pod's proxy on loopback (plain HTTP, same key): what the admission container checks.
POD_LOCAL_PROXY_PORT = LOCAL_PROXY_PORT
#: Engine images are 10-30 GB: pulling one onto a fresh node takes minutes.
IMAGE_PULL_SECONDS = 15 * 60
#: How long a new pod may wait for a node before the gate calls the rollout failed: a cluster
#: autoscaler brings a GPU node within minutes; a cluster with no free GPU set never does (a surge
#: pod needs a whole second set).
SCHEDULING_GRACE_SECONDS = 10 * 60
#: A hub download can stall and resume: allow three times the estimate before giving up.
DOWNLOAD_MARGIN = 3
DOWNLOAD_SETUP_SECONDS = 10 * 60
#: Room for the checkpoint plus hf's resume metadata.
WEIGHTS_HEADROOM = 1.25
#: NCCL/RCCL/HCCL segments and the engines' multiprocess queues (image tensors) live in /dev/shm;
#: a pod's default 64 MB breaks TP (seed 003). tmpfs pages count against the pod's memory, so at
#: most a quarter of it.
SHM_GIB = 64

#: Extended resource of each vendor's device plugin (Ascend: MindCluster's Ascend Device Plugin
#: advertises the 910-family dies, A3 included, as huawei.com/Ascend910).
VENDOR_RESOURCE = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu", "huawei": "huawei.com/Ascend910"}

# --- one replica over several nodes: a LeaderWorkerSet group (kubernetes-sigs/lws v0.10.0) ---------
#: The LeaderWorkerSet API. Its CRD and controller are the cluster operator's (kubectl apply
#: --server-side -f https://github.com/kubernetes-sigs/lws/releases/download/v0.10.0/manifests.yaml);
#: tooling/schemas/lws-v0.10.0/ holds the CRD the rendering is validated against.
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_RELEASE = "v0.10.0"
#: Also the headless Service LWS creates for the group's DNS names (a DNS-1035 label).
LWS_NAME = "kimi-engine"
#: Labels LWS puts on every pod of a group (api/leaderworkerset/v1/leaderworkerset_types.go).
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
#: LWS injects LWS_LEADER_ADDRESS (<lws>-<group>.<lws>.<namespace>, resolvable before the leader is
#: Ready: its Service publishes not-ready addresses) and LWS_WORKER_INDEX first in every container's
#: env, so the kubelet expands $(VAR) in the engine's args: the argv stays a list, no shell.
LWS_LEADER_ADDRESS = "$(LWS_LEADER_ADDRESS)"
LWS_WORKER_INDEX = "$(LWS_WORKER_INDEX)"
#: NCCL writes its log here, one file per process (NCCL expands %h to the host, %p to the pid), on
#: a volume the fabric container reads.
NCCL_LOG_DIR = "/var/log/nccl"
NCCL_DEBUG_FILE = f"{NCCL_LOG_DIR}/%h.%p.log"
FABRIC_CONFIGMAP = "kimi-fabric-check"
FABRIC_MOUNT = "/opt/kimi-fleet/fabric"
FABRIC_TRANSPORTS_KEY = "transports.json"
FABRIC_SCRIPTS = (FABRIC_PROBE_SCRIPT, "fabric_check.py")
#: The group's pods reach each other on every port (torch's rendezvous, NCCL's bootstrap and socket
#: ports, vLLM's ZMQ channels): nothing else is admitted beyond the proxy's ports.
PEERS_POLICY = "kimi-replica-peers"
EFA_RESOURCE = catalog.EFA_K8S_RESOURCE

# --- metrics and scaling (issue 24) ----------------------------------------------------------------
#: The Prometheus Operator's API (its CRDs are the cluster's: kube-prometheus-stack installs them);
#: tooling/schemas/prometheus-operator-v0.93.0/ holds the PodMonitor and PrometheusRule CRDs the
#: rendering is validated against.
PROMETHEUS_OPERATOR_API_VERSION = "monitoring.coreos.com/v1"
PROMETHEUS_OPERATOR_RELEASE = "v0.93.0"
#: KEDA's API (its CRDs and operator are the cluster's); tooling/schemas/keda-v2.20.2/.
KEDA_API_VERSION = "keda.sh/v1alpha1"
KEDA_RELEASE = "v2.20.2"
POD_MONITOR = "kimi-fleet"
PROMETHEUS_RULE = "kimi-fleet-alerts"
SCALED_OBJECT = "kimi-engine"
METRICS_POLICY = "kimi-metrics-ingress"
#: The engine binds 127.0.0.1 and Caddy's metrics site too (observability.PROXY_METRICS_PORT): in a
#: pod, loopback is the pod. The metrics gate, a second Caddy in the engine pod, is the one listener
#: Prometheus reaches: this named port on the pod IP, GET only, two paths, each to one loopback
#: /metrics, and nothing else (no API route, no key: the NetworkPolicy admits only the monitoring
#: namespace's Prometheus pods to it). Not the node exporters' ports (9180-9183, 9400).
METRICS_PORT_NAME = "metrics"
METRICS_GATE_PORT = 9184
METRICS_GATE_CONFIGMAP = "kimi-metrics-gate"
METRICS_GATE_MOUNT = "/etc/kimi-metrics-gate"
ENGINE_METRICS_PATH = "/engine/metrics"
PROXY_METRICS_PATH = "/proxy/metrics"
#: Labels every scraped series carries beside job (catalog.EngineMetricNames.labels: "the scrape adds
#: stack/replica/instance on top"): the stack's name and the pod that served it.
STACK_LABEL = observability.STACK_LABEL
REPLICA_LABEL = observability.REPLICA_LABEL
#: What the Prometheus Operator labels its Prometheus server pods with (makeSelectorLabels in
#: pkg/prometheus/server/operator.go at v0.93.0: app.kubernetes.io/name: prometheus): the
#: NetworkPolicy admits these pods of the monitoring namespace, no other pod, no other namespace.
PROMETHEUS_POD_LABELS = {"app.kubernetes.io/name": "prometheus"}
#: The Grafana dashboard as a ConfigMap the Grafana sidecar imports: kube-prometheus-stack's values
#: (prometheus-community/helm-charts, charts/kube-prometheus-stack/values.yaml, grafana.sidecar.dashboards:
#: label grafana_dashboard, labelValue "1", searchNamespace ALL: every namespace's ConfigMaps).
DASHBOARD_CONFIGMAP = "kimi-grafana-dashboard"
GRAFANA_DASHBOARD_LABEL = "grafana_dashboard"
GRAFANA_DASHBOARD_LABEL_VALUE = "1"
#: The stack's alerts (observability.render_prometheus_rules) whose series nothing in a Kubernetes stack
#: exports, so they are left out of its PrometheusRule rather than shipped never to fire.
UNSERVED_ALERTS = {
    "KimiGpuXidErrors": "the GPUs' DCGM exporter is the cluster's (the GPU Operator's DaemonSet), not the stack's: "
                        "its series carry no stack label",
    "KimiNodeNotAdmitted": "the node-state exporter runs on AWS and host nodes; a pod's admission is its "
                           "readiness (the admission container), which the rollout gate waits for",
    "KimiGateFailed": "as KimiNodeNotAdmitted: a pod that fails its admission suite is never Ready and the gate "
                      "(scripts/await_k8s_rollout.py) fails the deploy and undoes it",
}
#: The drain a scaling stack's engine container runs before it stops (kimi_fleet/pod_scripts/), beside
#: the generation probe it reads the engine's /metrics with.
DRAIN_SCRIPT = "pod_drain.py"
#: A draining pod: the drain's verdict beside the proxy, which waits for it before Caddy stops.
DRAIN_STATE = "/run/kimi-drain"
DRAINED_FILE = f"{DRAIN_STATE}/drained"
#: The drain gives up this long before the grace period ends: the engine and Caddy still stop cleanly.
DRAIN_STOP_SECONDS = 30
#: The HPA's own limits (autoscaling/v2 validation): a stabilization window of at most an hour, a
#: policy period of at most 30 minutes.
HPA_MAX_STABILIZATION_SECONDS = 3600
HPA_MAX_POLICY_PERIOD_SECONDS = 1800
#: The window the TTFT quantile is read over, as the alert rules read it.
TTFT_RATE_WINDOW = "5m"

#: Both download scripts begin so (a format string: {complete}, {requirements}).
_PACKAGES_PRELUDE = """\
# The admission containers' packages first (every pod needs them, even when the weights are there).
if [ ! -f "$PACKAGES_DIR/{complete}" ]; then
  rm -rf "$PACKAGES_DIR.partial"
  mkdir -p "${{PACKAGES_DIR%/*}}"
  python3 -m pip install --quiet --no-cache-dir --disable-pip-version-check --only-binary=:all: \\
    --target "$PACKAGES_DIR.partial" -r {requirements}
  touch "$PACKAGES_DIR.partial/{complete}"
  rm -rf "$PACKAGES_DIR"
  mv "$PACKAGES_DIR.partial" "$PACKAGES_DIR"
fi
"""

DOWNLOAD_SCRIPT = (_PACKAGES_PRELUDE + """\
if [ "$(cat "$TARGET_DIR/{marker}" 2>/dev/null)" = "$REVISION" ]; then
  touch "$TARGET_DIR/{marker}"
  echo "weights $REPO@$REVISION already verified"; exit 0
fi
# Room for a new revision: older checkpoints go first only when the volume cannot hold both.
mkdir -p "$TARGET_DIR"
python3 {room} --root {root} --target "$TARGET_DIR" --need "$CHECKPOINT_BYTES"
echo "$REPO@$REVISION" > "$TARGET_DIR/{checkpoint_marker}"
# Only hash-pinned wheels, the requirements file complete (--no-deps: nothing pip would add unpinned).
python3 -m pip install --quiet --no-cache-dir --disable-pip-version-check --require-hashes --no-deps \\
  --only-binary=:all: -r {hf_requirements}
hf download "$REPO" --revision "$REVISION" --local-dir "$TARGET_DIR"
python3 {verifier} verify --dir "$TARGET_DIR" --hub "$REPO" "$REVISION"
echo "$REVISION" > "$TARGET_DIR/{marker}"
""").format(marker=VERIFIED_MARKER, hf_requirements=f"{VERIFIER_MOUNT}/{HF_CLI_REQUIREMENTS_KEY}",
           root=WEIGHTS_MOUNT,
           room=f"{VERIFIER_MOUNT}/{WEIGHTS_ROOM_SCRIPT}", checkpoint_marker=CHECKPOINT_MARKER,
           verifier=f"{VERIFIER_MOUNT}/{WEIGHTS_VERIFIER_SCRIPT}", complete=PACKAGES_COMPLETE_MARKER,
           requirements=f"{VERIFIER_MOUNT}/{VERIFIER_REQUIREMENTS_KEY}")

#: A LeaderWorkerSet pod's init container where each pod fetches only its pipeline stage's shards
#: (Resolved.stage_fetch), as an AWS node's download_weights.sh does from the Hub, through the same
#: weights_manifest.py: the small files, then the shards `stage-files` picks from the checkpoint's
#: own index (exact names, each its own argv element: never a pattern, never word-split), verified
#: with `verify --stage` (which removes another stage's shards left by a re-layout). The pod's stage
#: is its LWS worker index (PP_STAGE, the downward API from its label); both templates carry every
#: stage's layers (PP_FIRST_LAYER_<i>, PP_END_LAYER_<i>) and the script takes its own: integers only,
#: else refused. The marker holds the stage's line ("REV stage i/n layers a-b"); a marker of the
#: revision alone (the whole checkpoint, as before stages) satisfies any stage.
STAGE_DOWNLOAD_SCRIPT = (_PACKAGES_PRELUDE + """\
# This pod's pipeline stage (its worker index) and that stage's layers: small integers, or refused.
small_integer() {{
  case "$2" in
    0 | [1-9] | [1-9][0-9] | [1-9][0-9][0-9] | [1-9][0-9][0-9][0-9]) ;;
    *) echo "weights: $1 must be a small integer for a pipeline stage" >&2; exit 1 ;;
  esac
}}
small_integer PP_STAGE "${{PP_STAGE:-}}"
small_integer PP_STAGES "${{PP_STAGES:-}}"
if [ "$PP_STAGE" -ge "$PP_STAGES" ]; then
  echo "weights: stage $PP_STAGE is not one of $PP_STAGES" >&2; exit 1
fi
# PP_STAGE is digits only here: the names it makes are this stage's settings, nothing else.
eval "PP_FIRST_LAYER=\\${{PP_FIRST_LAYER_$PP_STAGE:-}} PP_END_LAYER=\\${{PP_END_LAYER_$PP_STAGE:-}}"
small_integer PP_FIRST_LAYER "$PP_FIRST_LAYER"
small_integer PP_END_LAYER "$PP_END_LAYER"
VERIFIED_AS="$REVISION stage $PP_STAGE/$PP_STAGES layers $PP_FIRST_LAYER-$((PP_END_LAYER - 1))"
MARKER="$TARGET_DIR/{marker}"
# A line of the marker is this stage's, or the revision alone (the whole checkpoint: any stage's superset).
if [ -f "$MARKER" ] && grep -qxF -e "$VERIFIED_AS" -e "$REVISION" -- "$MARKER"; then
  touch "$MARKER"
  echo "weights $REPO@$VERIFIED_AS already verified"; exit 0
fi
rm -f "$MARKER"  # another stage's (a re-layout): nothing may start on it while this one downloads
# Room for a new revision: older checkpoints go first only when the volume cannot hold both.
mkdir -p "$TARGET_DIR"
python3 {room} --root {root} --target "$TARGET_DIR" --need "$CHECKPOINT_BYTES"
echo "$REPO@$REVISION" > "$TARGET_DIR/{checkpoint_marker}"
# Only hash-pinned wheels, the requirements file complete (--no-deps: nothing pip would add unpinned).
python3 -m pip install --quiet --no-cache-dir --disable-pip-version-check --require-hashes --no-deps \\
  --only-binary=:all: -r {hf_requirements}
# The small files (the index among them), then the shards the index says this stage loads, each
# its own argument (the positional parameters: never a pattern, never word-split).
hf download "$REPO" --revision "$REVISION" --local-dir "$TARGET_DIR" --exclude '*.safetensors'
listed=$(python3 {verifier} stage-files --dir "$TARGET_DIR" --hub "$REPO" "$REVISION" --stage "$PP_STAGE" \\
  --stages "$PP_STAGES" --first-layer "$PP_FIRST_LAYER" --end-layer "$PP_END_LAYER")
set --
while IFS= read -r shard; do
  if [ -n "$shard" ]; then set -- "$@" "$shard"; fi
done <<EOF
$listed
EOF
if [ "$#" -eq 0 ]; then
  echo "weights: the index names no shard for stage $PP_STAGE" >&2; exit 1
fi
echo "weights: stage $PP_STAGE/$PP_STAGES: $# shard(s)"
hf download "$REPO" "$@" --revision "$REVISION" --local-dir "$TARGET_DIR"
python3 {verifier} verify --dir "$TARGET_DIR" --hub "$REPO" "$REVISION" --stage "$PP_STAGE" --stages "$PP_STAGES" \\
  --first-layer "$PP_FIRST_LAYER" --end-layer "$PP_END_LAYER"
printf '%s\\n' "$VERIFIED_AS" > "$MARKER.tmp"
mv -f "$MARKER.tmp" "$MARKER"
echo "weights verified: $REPO@$VERIFIED_AS"
""").format(marker=VERIFIED_MARKER, hf_requirements=f"{VERIFIER_MOUNT}/{HF_CLI_REQUIREMENTS_KEY}",
           root=WEIGHTS_MOUNT,
           room=f"{VERIFIER_MOUNT}/{WEIGHTS_ROOM_SCRIPT}", checkpoint_marker=CHECKPOINT_MARKER,
           verifier=f"{VERIFIER_MOUNT}/{WEIGHTS_VERIFIER_SCRIPT}", complete=PACKAGES_COMPLETE_MARKER,
           requirements=f"{VERIFIER_MOUNT}/{VERIFIER_REQUIREMENTS_KEY}")


def stage_env(r: Resolved) -> list[dict]:
    """A stage-fetching pod's stage: its LWS worker index from its label (the downward API), and every
    stage's layers from the plan (Resolved.stage_ranges), integers, for the script to take its own."""
    env = [{"name": "PP_STAGE", "valueFrom": {"fieldRef": {
        "fieldPath": f"metadata.labels['{LWS_WORKER_INDEX_LABEL}']"}}},
           {"name": "PP_STAGES", "value": str(len(r.stage_ranges))}]
    for stage, (first, end) in enumerate(r.stage_ranges):
        if not all(type(v) is int and v >= 0 for v in (first, end)) or end <= first:
            raise ValueError(f"stage {stage}'s layers {first}-{end} are not a range of non-negative integers")
        env += [{"name": f"PP_FIRST_LAYER_{stage}", "value": str(first)},
                {"name": f"PP_END_LAYER_{stage}", "value": str(end)}]
    return env


#: Every file of the pinned revision present with the size the Hub lists (hf can stop early).


def weights_pvc_gib(r: Resolved) -> int:
    """The weights claim's size: one checkpoint with headroom."""
    return math.ceil(r.checkpoint.size_bytes * WEIGHTS_HEADROOM / catalog.GiB)


def labels(stack: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kimi-fleet",
        "app.kubernetes.io/instance": stack,
        "app.kubernetes.io/component": component,
    }


def pod_cold_start_seconds(sizing: Sizing) -> int:
    """A new engine pod's start with the weights on the volume and nothing in the page cache: the
    plan's "from its volume" time (the download and its verify belong to the Job or init container)."""
    return sizing.volume_start_seconds


def startup_failure_threshold(sizing: Sizing) -> int:
    return math.ceil(pod_cold_start_seconds(sizing) * STARTUP_MARGIN / STARTUP_PROBE_PERIOD_SECONDS)


def startup_window_seconds(sizing: Sizing) -> int:
    """How long the engine may take to generate its first answer before the kubelet restarts it."""
    return startup_failure_threshold(sizing) * STARTUP_PROBE_PERIOD_SECONDS


def download_deadline_seconds(sizing: Sizing) -> int:
    return sizing.download_seconds * DOWNLOAD_MARGIN + DOWNLOAD_SETUP_SECONDS


def job_timeout_seconds(sizing: Sizing) -> int:
    """How long `pulumi up` waits for the download Job: its own deadline plus scheduling and pull."""
    return download_deadline_seconds(sizing) + IMAGE_PULL_SECONDS


def engine_pod_count(r: Resolved) -> int:
    return r.spec.capacity.replicas * r.engines_per_node


def deployment_timeout_seconds(r: Resolved, sizing: Sizing, *, rolling: bool) -> int:
    """How long `pulumi up` waits for the engines: a pull and a startup window per pod.

    Creation starts every pod at once; a rolling update replaces one pod at a time (no spare GPUs).
    With hostPath weights each pod's init container may download on its node first.
    """
    # Then the pod proves itself with the verification suite before it counts as Ready.
    per_pod = IMAGE_PULL_SECONDS + startup_window_seconds(sizing) + ADMISSION_DEADLINE_SECONDS
    if r.weights_volume == "host-path":
        per_pod += download_deadline_seconds(sizing)
    if not rolling:
        return per_pod
    policy = scaling_policy(r, sizing)
    if policy is not None:
        # A scaling stack's old pod drains before it stops (up to the drain timeout), and its GPUs are
        # what the next new pod waits for.
        per_pod += policy.drain_timeout_seconds
    return per_pod * rollout_starts(r)


def old_pod_drain_seconds(r: Resolved, sizing: Sizing) -> int:
    """How long a rolling update may wait for an old pod's drain before the new pod gets its GPUs: the
    scaling policy's drain timeout (0 for a stack that does not scale: its pods stop at once)."""
    policy = scaling_policy(r, sizing)
    return policy.drain_timeout_seconds if policy is not None else 0


def rollout_starts(r: Resolved) -> int:
    """Cold starts one after the other in a rollout: a pod at a time; a LeaderWorkerSet's one group
    starts once, or twice on surge (the surge group, then the group itself on the new release; its
    pods start together)."""
    if r.multi_node:
        return 2 if r.spec.capacity.rollout == "surge" else 1
    # A scaling stack may be rolling as many pods as its range's top.
    return r.spec.capacity.most_replicas * r.engines_per_node


def rollout_cost(r: Resolved, sizing: Sizing) -> str:
    """What a new release costs the running endpoint, in words (the plan and the manifests' header).

    A Deployment keeps the previous release serving only where the cluster has room: `surge` needs a
    spare GPU set for one more pod (nothing here can know the cluster has one: a surge pod that finds
    none stays Pending and the gate calls the rollout failed after SCHEDULING_GRACE_SECONDS);
    one-at-a-time stops an old pod first."""
    minutes = max(1, math.ceil(pod_cold_start_seconds(sizing) / 60))
    pods = engine_pod_count(r)
    if r.multi_node:
        return _group_rollout_cost(r, minutes)
    back = (f"a failed release is undone by the gate (kubectl rollout undo), which costs the previous release "
            f"its own cold start again (about {minutes} min)")
    if r.spec.capacity.rollout == "surge":
        return (f"rollout surge: each new pod starts beside the old ones on a spare set of {r.gpus_per_engine} "
                f"GPUs ({_surge_needs('one', 'pod')}); no pod of the previous release stops "
                f"before its replacement is Ready, so it serves throughout and a failed release costs no downtime")
    if pods == 1:
        return (f"rollout one-at-a-time with one pod: the only pod stops first, so every new release is about "
                f"{minutes} min without service (the new pod's cold start from the volume); {back}. "
                f"capacity.rollout: surge avoids it if the cluster has a second set of {r.gpus_per_engine} GPUs")
    return (f"rollout one-at-a-time: one of {pods} pods out at a time for about {minutes} min each "
            f"({pods - 1}/{pods} capacity meanwhile; the others serve the previous release); {back} for the "
            "pod that failed")


def _surge_needs(spare: str, surge: str) -> str:
    return (f"the cluster must have {spare} free, else the surge {surge} stays Pending and the gate fails the "
            f"rollout after {SCHEDULING_GRACE_SECONDS // 60} min")


def _group_rollout_cost(r: Resolved, minutes: int) -> str:
    """A LeaderWorkerSet's release: its one group of nodes_per_replica pods replaced as a whole."""
    nodes, gpus = r.nodes_per_replica, r.nodes_per_replica * r.gpus_per_engine
    back = (f"a failed release is undone by the gate (the LeaderWorkerSet's template put back from its previous "
            f"ControllerRevision), which costs the previous release its own cold start again (about {minutes} min)")
    if r.spec.capacity.rollout == "surge":
        return (f"rollout surge: a second group of {nodes} pods starts on a spare set of {gpus} GPUs ({nodes} nodes; "
                f"{_surge_needs('them', 'group')}), then the serving group is recreated on the new release while "
                f"the surge group serves, then the surge group goes: no downtime, two cold starts of about "
                f"{minutes} min each")
    return (f"rollout one-at-a-time with one group of {nodes} pods: the group stops first, so every new release is "
            f"about {minutes} min without service (the group's cold start from the nodes' disks); {back}. "
            f"capacity.rollout: surge avoids it if the cluster has a second set of {gpus} GPUs")


def rollout_wait(r: Resolved, sizing: Sizing) -> dict:
    """What the gate's scripts/await_k8s_rollout.py waits with (the Deployment or LeaderWorkerSet names
    are added by the component): the whole rollout, one pod's (or group's) start to Ready, a pod's wait
    for a node."""
    k8s = r.spec.target.kubernetes
    return {
        "kind": "kubernetes",
        "namespace": k8s.namespace,
        "context": k8s.kubeconfig_context or "",
        "deployments": [] if r.multi_node else [deployment_name(market) for market, _ in market_groups(r)],
        "leaderworkersets": [LWS_NAME] if r.multi_node else [],
        "timeout_seconds": deployment_timeout_seconds(r, sizing, rolling=True),
        "pod_ready_seconds": deployment_timeout_seconds(r, sizing, rolling=False),
        # A new pod stays Pending while the old one drains (its GPUs are the ones it needs): not a
        # cluster without room, so the grace counts the drain.
        "scheduling_grace_seconds": SCHEDULING_GRACE_SECONDS + old_pod_drain_seconds(r, sizing),
    }


def market_groups(r: Resolved) -> list[tuple[str, int]]:
    """(capacity type, engine pods): on spot, the on-demand base stays on on-demand nodes. A scaling
    stack always has the Deployment KEDA scales (scaled_market), even when it starts with no pod."""
    capacity = r.spec.capacity
    per_replica = r.engines_per_node
    on_demand = capacity.effective_on_demand_base
    groups = [("on-demand", on_demand * per_replica), ("spot", (capacity.replicas - on_demand) * per_replica)]
    scaled = scaled_market(r)
    return [(market, pods) for market, pods in groups if pods > 0 or market == scaled]


def scaled_market(r: Resolved) -> str | None:
    """The capacity type of the Deployment KEDA scales (None: the stack does not scale). On spot the
    on-demand base stays fixed (capacity.onDemandBase <= scaling.minReplicas) and the spot pods scale."""
    if r.spec.capacity.scaling is None:
        return None
    return "spot" if r.spec.capacity.effective_market == "spot" else "on-demand"


def scaled_deployment_start(r: Resolved) -> tuple[str, int] | None:
    """(name, pods) of the Deployment KEDA scales and the pods it is created with (None: the stack does
    not scale): capacity.replicas' share (inside the range, its minimum unless the stack file asks for
    more: "the count a first deploy starts with"), less the fixed on-demand base under spot. The YAML
    leaves spec.replicas out (a `kubectl apply` of a count resets the HPA's); `pulumi up` sets it on
    create only and ignores it after (components/kubernetes_endpoint.py)."""
    market = scaled_market(r)
    if market is None:
        return None
    return deployment_name(market), dict(market_groups(r))[market]


def deployment_name(market: str) -> str:
    return f"kimi-engine-{market}"


def weights_job_name(r: Resolved) -> str:
    return f"kimi-weights-{r.revision[:12]}"


def proxy_tls(r: Resolved) -> str:
    """A public certificate needs ports 80/443 reachable at the domain: only a LoadBalancer gives that."""
    return "acme" if r.spec.target.kubernetes.proxy_service_type == "LoadBalancer" else "internal"


def render_proxy_caddyfile(r: Resolved, launch: Launch, release: str | None = None) -> str:
    return render_pod_proxy(r, launch, release).text


def render_pod_proxy(r: Resolved, launch: Launch, release: str | None = None) -> RenderedProxy:
    """The sidecar's Caddyfile and its facts (what AuthProxy registers for the policy pack). Caddy's
    metrics are on the pod's loopback (observability.PROXY_METRICS_PORT), as on a node: the metrics
    gate is what reaches them."""
    instance = launch.instances[0]
    return render_proxy(
        r.spec.domain, [instance.upstream], instance.probe.path,
        tls=proxy_tls(r), acme_email=r.spec.acme_email, release=release, local_port=POD_LOCAL_PROXY_PORT,
        previous_key_env=PREVIOUS_API_KEY_ENV if r.spec.api_key_rotation.accept_previous else None,
        metrics_port=observability.PROXY_METRICS_PORT,
    )


def _meta(name: str, namespace: str, stack: str, component: str, **extra) -> dict:
    return {"name": name, "namespace": namespace, "labels": labels(stack, component), **extra}


def _secret_env(name: str, secret: str, key: str, *, optional: bool = False) -> dict:
    ref = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _weights_volume(r: Resolved) -> dict:
    if r.weights_volume == "host-path":
        return {"name": "weights", "hostPath": {"path": r.spec.weights.host_path, "type": "DirectoryOrCreate"}}
    return {"name": "weights", "persistentVolumeClaim": {"claimName": WEIGHTS_PVC}}


def _verifier_volume() -> dict:
    return {"name": "verifier", "configMap": {"name": VERIFIER_CONFIGMAP}}


#: An official python image's tag starts with the Python it runs (python:3.12.12-slim: 3.12).
_PYTHON_IMAGE = re.compile(r"(?:[\w.-]+/)*python:(\d+)\.(\d+)\b")


def image_python(image: str) -> str | None:
    """The Python minor version a python image runs ("3.12"), or None for any other image."""
    match = _PYTHON_IMAGE.match(image)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _download_container(r: Resolved) -> dict:
    python = image_python(catalog.DOWNLOAD_IMAGE)
    if python != HF_CLI_PYTHON:
        # pip would refuse the pinned cp312 wheels at deploy time, inside the Job: say it at plan time.
        raise ValueError(f"download image {catalog.DOWNLOAD_IMAGE} refused: it runs Python {python or 'unknown'}, the "
                         f"hash-pinned hf CLI (node_files.HF_CLI_PINS) is for Python {HF_CLI_PYTHON}; use a "
                         f"python:{HF_CLI_PYTHON}.x image or pin the hf CLI's wheels for that Python")
    # A LeaderWorkerSet pod on its node's disk fetches its own stage (a shared claim's Job: the whole).
    stages = r.stage_fetch and r.multi_node and r.weights_volume == "host-path"
    return {
        "name": "download-weights",
        "image": catalog.DOWNLOAD_IMAGE,
        "command": ["/bin/sh", "-ec", STAGE_DOWNLOAD_SCRIPT if stages else DOWNLOAD_SCRIPT],
        "env": [
            {"name": "REPO", "value": r.repo},
            {"name": "REVISION", "value": r.revision},
            {"name": "TARGET_DIR", "value": f"{WEIGHTS_MOUNT}/{r.weights_dir_name}"},
            {"name": "CHECKPOINT_BYTES", "value": str(r.checkpoint.size_bytes)},
            {"name": "PACKAGES_DIR", "value": VERIFIER_PACKAGES_DIR},
            {"name": "HF_XET_HIGH_PERFORMANCE", "value": "1"},
            {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
            {"name": "HOME", "value": "/tmp"},
            # Optional: public repos need no token, and the component creates the Secret only if given.
            _secret_env("HF_TOKEN", HF_TOKEN_SECRET, HF_TOKEN_SECRET_KEY, optional=True),
            *(stage_env(r) if stages else []),
        ],
        "resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "16Gi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "weights", "mountPath": WEIGHTS_MOUNT},
                         {"name": "verifier", "mountPath": VERIFIER_MOUNT, "readOnly": True}],
    }


def _scheduling(r: Resolved, market: str) -> dict:
    """nodeSelector and tolerations that put a pod on the stack's GPU nodes of one capacity type."""
    k8s = r.spec.target.kubernetes
    return {
        "nodeSelector": {**k8s.node_selector, k8s.capacity_type_label: market},
        "tolerations": [
            {"key": k8s.capacity_type_label, "operator": "Equal", "value": market, "effect": "NoSchedule"},
            # GPU node pools are commonly tainted with the device resource name.
            {"key": VENDOR_RESOURCE[r.accelerator.vendor], "operator": "Exists", "effect": "NoSchedule"},
        ],
    }


def _generation_probe(r: Resolved, launch: Launch, timeout: int = GENERATION_PROBE_TIMEOUT_SECONDS, *,
                      alive_while_generating: bool = False) -> dict:
    # The engine listens on 127.0.0.1 only and kubelet's httpGet dials the pod IP: probe from inside.
    mode = []
    probe_timeout = timeout
    if alive_while_generating:
        # The engine's own metric names (its module's LoadMetrics); two /metrics reads fit the timeout.
        mode = [ALIVE_WHILE_GENERATING, json.dumps(r.adapter.load_metrics.as_dict(), separators=(",", ":"))]
        probe_timeout = timeout + 2 * METRICS_TIMEOUT_SECONDS
    command = ["python3", f"{PROBE_MOUNT}/{GENERATION_PROBE_SCRIPT}", *mode, f"http://{launch.instances[0].upstream}",
               r.spec.model.served_name, str(timeout - 5)]
    return {"exec": {"command": command}, "timeoutSeconds": probe_timeout}


def _engine_container(r: Resolved, sizing: Sizing, launch: Launch) -> dict:
    instance = launch.instances[0]
    k8s = r.spec.target.kubernetes
    resources = {
        "requests": {"cpu": str(k8s.pod_cpus), "memory": f"{k8s.pod_memory_gib}Gi"},
        # No CPU limit: the MoE weight load is CPU-bound and throttling stretches it.
        "limits": {"memory": f"{k8s.pod_memory_gib}Gi"},
    }
    if k8s.gpu_claim == "dra":
        resources["claims"] = [{"name": GPU_CLAIM}]
    else:
        resource = VENDOR_RESOURCE[r.accelerator.vendor]
        resources["requests"][resource] = str(r.gpus_per_engine)
        resources["limits"][resource] = str(r.gpus_per_engine)
    security = {"allowPrivilegeEscalation": False}
    if "--security-opt=seccomp=unconfined" in instance.docker_args:
        security["seccompProfile"] = {"type": "Unconfined"}  # ROCm, as the docker launch (seed 001)
    if r.multi_node:
        resources, security = _with_fabric(r, resources, security)
    return {
        "name": "engine",
        "image": launch.image,
        "command": [instance.argv[0]],
        "args": list(instance.argv[1:]),
        "env": [{"name": key, "value": value} for key, value in sorted(instance.env.items())],
        "resources": resources,
        "securityContext": security,
        "volumeMounts": [
            {"name": "weights", "mountPath": MODEL_MOUNT, "subPath": r.weights_dir_name, "readOnly": True},
            # Compiled kernels beside the weights: the next pod of the same release reuses them.
            {"name": "weights", "mountPath": COMPILE_CACHE_MOUNT, "subPath": f"compile-cache/{r.compile_cache_dir_name}"},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "probe", "mountPath": PROBE_MOUNT, "readOnly": True},
        ],
        "startupProbe": {
            **_generation_probe(r, launch, timeout=STARTUP_PROBE_PERIOD_SECONDS),
            "periodSeconds": STARTUP_PROBE_PERIOD_SECONDS,
            "failureThreshold": startup_failure_threshold(sizing),
        },
        # Readiness takes a pod that does not generate out of the Service, busy or not.
        "readinessProbe": {**_generation_probe(r, launch), "periodSeconds": PROBE_PERIOD_SECONDS,
                           "failureThreshold": READINESS_FAILURES},
        "livenessProbe": {
            **_generation_probe(r, launch, alive_while_generating=True),
            "periodSeconds": LIVENESS_PERIOD_SECONDS,
            "failureThreshold": LIVENESS_FAILURES,
        },
    }


def _proxy_container() -> dict:
    # The previous key whether or not a rotation is open, optional: the template never changes with
    # the rotation, and a proxy (re)started from any ReplicaSet reads the keys the Secret holds now,
    # as the Caddyfile it reads now expects (it names the previous key only while it is accepted).
    env = [_secret_env("KIMI_API_KEY", API_KEY_SECRET, API_KEY_SECRET_KEY),
           _secret_env(PREVIOUS_API_KEY_ENV, API_KEY_SECRET, PREVIOUS_API_KEY_SECRET_KEY, optional=True)]
    return {
        "name": "proxy",
        "image": catalog.CADDY_IMAGE,
        "command": ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"],
        "env": env,
        "ports": [{"name": "https", "containerPort": HTTPS_PORT}, {"name": "http", "containerPort": HTTP_PORT}],
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        # The image's caddy runs as root; it keeps only the right to bind 80/443.
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
        },
        "readinessProbe": {"tcpSocket": {"port": HTTPS_PORT}, "periodSeconds": 10},
        "volumeMounts": [
            {"name": "caddyfile", "mountPath": "/etc/caddy", "readOnly": True},
            {"name": "caddy-data", "mountPath": "/data"},
            {"name": "caddy-config", "mountPath": "/config"},
        ],
    }


def _admission_key(path: str) -> str:
    """A ConfigMap key for a file path (keys are flat: [-._a-zA-Z0-9]+)."""
    return path.replace("/", ".")


def _admission_files(r: Resolved, sizing: Sizing, launch: Launch, release: str | None) -> dict[str, str]:
    """Path under ADMISSION_MOUNT -> content: the suite (as shipped to nodes), the scripts, the config."""
    files = {f"suite/kimi_fleet/{module}": source for module, source in verifier_sources().items()}
    files.update({script: node_script(script) for script in ADMISSION_SCRIPTS})
    files[VERIFIER_REQUIREMENTS_KEY] = VERIFIER_REQUIREMENTS_TEXT
    files["admission.json"] = json.dumps({
        "local_proxy": f"http://127.0.0.1:{POD_LOCAL_PROXY_PORT}", "model": r.spec.model.served_name,
        # The digest pass renders without a release: any fixed placeholder keeps it deterministic.
        "release": release or "0" * 16,
        "suite_path": f"{ADMISSION_MOUNT}/suite", "requirements": f"{ADMISSION_MOUNT}/{VERIFIER_REQUIREMENTS_KEY}",
        "prebuilt_dependencies_dir": VERIFIER_PACKAGES_DIR, "prebuilt_marker": PACKAGES_COMPLETE_MARKER,
        "dependencies_dir": f"{ADMISSION_STATE}/packages", "report": f"{ADMISSION_STATE}/report.json",
        "passed_file": ADMISSION_PASSED, "interval_seconds": PROBE_PERIOD_SECONDS, "failures": READINESS_FAILURES,
        "probe_timeout_seconds": GENERATION_PROBE_TIMEOUT_SECONDS, **admission_settings(r, launch, sizing),
    }, indent=2) + "\n"
    return files


def _admission_container() -> dict:
    return {
        "name": "admission",
        "image": catalog.DOWNLOAD_IMAGE,
        "command": ["python3", f"{ADMISSION_MOUNT}/pod_admission.py", f"{ADMISSION_MOUNT}/admission.json"],
        "env": [_secret_env("KIMI_API_KEY", API_KEY_SECRET, API_KEY_SECRET_KEY),
                {"name": "PIP_DISABLE_PIP_VERSION_CHECK", "value": "1"}],
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        # Ready only after the suite passed against the pod's proxy, and while it keeps generating.
        "readinessProbe": {"exec": {"command": ["test", "-f", ADMISSION_PASSED]},
                           "periodSeconds": PROBE_PERIOD_SECONDS},
        "volumeMounts": [
            {"name": "admission", "mountPath": ADMISSION_MOUNT, "readOnly": True},
            {"name": "admission-state", "mountPath": ADMISSION_STATE},
            # The packages the weights download installed (no PyPI at pod start).
            {"name": "weights", "mountPath": WEIGHTS_MOUNT, "readOnly": True},
            # The root file system is read-only: a fallback pip install unpacks wheels under /tmp.
            {"name": "admission-tmp", "mountPath": "/tmp"},
        ],
    }


def rolling_update(rollout: str) -> dict:
    """surge: a new pod starts (on a spare replica's GPUs) before an old one stops: no capacity lost.
    one-at-a-time: no spare GPUs, so an old pod stops first and its replacement loads meanwhile."""
    if rollout == "surge":
        return {"maxSurge": 1, "maxUnavailable": 0}
    return {"maxSurge": 0, "maxUnavailable": 1}


def _pod_spec(r: Resolved, sizing: Sizing, launch: Launch, market: str, release: str | None,
              containers: list[dict], *, serves: bool) -> dict:
    """An engine pod: its containers, the weights and /dev/shm, and (`serves`: the pod behind the
    Service) the proxy's, probes' and admission's volumes."""
    k8s = r.spec.target.kubernetes
    shm_gib = min(SHM_GIB, k8s.pod_memory_gib // 4)
    volumes = [
        _weights_volume(r),
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib}Gi"}},
    ]
    if serves:
        volumes += [
            {"name": "caddyfile", "configMap": {"name": CADDYFILE_CONFIGMAP}},
            {"name": "probe", "configMap": {"name": PROBE_CONFIGMAP}},
            {"name": "admission", "configMap": {"name": ADMISSION_CONFIGMAP, "items": [
                {"key": _admission_key(path), "path": path}
                for path in sorted(_admission_files(r, sizing, launch, release))]}},
            {"name": "admission-state", "emptyDir": {}},
            {"name": "admission-tmp", "emptyDir": {}},
            {"name": "caddy-data", "emptyDir": {}},
            {"name": "caddy-config", "emptyDir": {}},
        ]
    if serves:
        volumes.append({"name": "metrics-gate", "configMap": {"name": METRICS_GATE_CONFIGMAP}})
        volumes.append({"name": "metrics-gate-tmp", "emptyDir": {}})
    policy = scaling_policy(r, sizing)
    if policy is not None and serves:
        volumes.append({"name": "drain", "emptyDir": {}})
    pod_spec = {
        # A Service named e.g. `vllm` would inject VLLM_PORT, which vLLM reads as its own setting.
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        # Let streaming answers finish; a scaling stack's pod drains first (termination_grace_seconds).
        "terminationGracePeriodSeconds": termination_grace_seconds(policy),
        **_scheduling(r, market),
        "containers": containers,
        "volumes": volumes,
    }
    if r.weights_volume == "host-path":
        # One Job cannot reach every node's disk: each pod fills its node once (the marker skips it after).
        pod_spec["initContainers"] = [_download_container(r)]
        pod_spec["volumes"].append(_verifier_volume())
    if k8s.gpu_claim == "dra":
        pod_spec["resourceClaims"] = [{"name": GPU_CLAIM, "resourceClaimTemplateName": GPU_CLAIM_TEMPLATE}]
    return pod_spec


def _deployment(r: Resolved, sizing: Sizing, launch: Launch, stack: str, market: str, pods: int,
                release: str | None) -> dict:
    k8s = r.spec.target.kubernetes
    selector = {**labels(stack, "engine"), "kimi-fleet/capacity-type": market}
    containers = _with_drain(r, sizing, [_engine_container(r, sizing, launch), _proxy_container(),
                                         _admission_container(), _metrics_gate_container()])
    pod_spec = _pod_spec(r, sizing, launch, market, release, containers, serves=True)
    # KEDA's HPA owns a scaled Deployment's replicas: the YAML leaves the field out, so a `kubectl apply`
    # does not reset it to a count (the Kubernetes HPA docs' advice, kubernetes/website#29739). Pulumi
    # sets it on create and ignores it after (scaled_deployment_start, components/kubernetes_endpoint.py):
    # without the field, server-side apply releases it and the Deployment drops to its default, 1.
    count = {} if market == scaled_market(r) else {"replicas": pods}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(deployment_name(market), k8s.namespace, stack, "engine"),
        "spec": {
            **count,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling_update(r.spec.capacity.rollout)},
            # The 600 s default marks a loading engine as a failed rollout (and Pulumi fails with it); an old
            # pod's drain comes first when the stack scales (the new pod waits for its GPUs).
            "progressDeadlineSeconds": deployment_timeout_seconds(r, sizing, rolling=False)
            + old_pod_drain_seconds(r, sizing),
            "template": {
                "metadata": {"labels": selector, **({"annotations": {RELEASE_ANNOTATION: release}} if release else {})},
                "spec": pod_spec,
            },
        },
    }


def _on_efa(r: Resolved) -> bool:
    return r.spec.target.kubernetes.rdma_resource == EFA_RESOURCE


def fabric_env(r: Resolved) -> dict[str, str]:
    """A rank's NCCL settings on Kubernetes: its INFO log (INIT and NET: the transport line the
    fabric check reads) into NCCL_LOG_DIR, and on EFA libfabric's provider (the plugin is on the EFA
    engine image's own library path)."""
    env = dict(catalog.EFA_ENGINE_ENV) if _on_efa(r) else dict(catalog.NCCL_LOG_ENV)
    return {**env, "NCCL_DEBUG_FILE": NCCL_DEBUG_FILE}


def fabric_transports() -> dict:
    """NCCL's words for each transport (the catalog's), as fabric_check.py reads them."""
    return {"fabric": dict(catalog.NCCL_FABRIC_TRANSPORTS), "socket": list(catalog.NCCL_SOCKET_TRANSPORTS)}


def _with_fabric(r: Resolved, resources: dict, security: dict) -> tuple[dict, dict]:
    """An engine of a multi-node replica: every fabric device its pod is given (requests = limits),
    EFA's huge pages, and IPC_LOCK: RDMA pins the buffers it registers (ibv_reg_mr) past the
    container's memlock limit (the NVIDIA Network Operator's RDMA pods add it; the kubelet's
    containers get no unlimited memlock as `docker run --ulimit memlock=-1` does on nodes)."""
    k8s = r.spec.target.kubernetes
    extra = {k8s.rdma_resource: str(k8s.rdma_devices)} if k8s.rdma_resource and k8s.rdma_devices else {}
    if _on_efa(r):
        extra["hugepages-2Mi"] = catalog.EFA_K8S_HUGEPAGES_2MI
    resources = {**resources, "requests": {**resources["requests"], **extra}, "limits": {**resources["limits"], **extra}}
    security = {**security, "capabilities": {"add": ["IPC_LOCK"]}}
    return resources, security


def worker_argv(r: Resolved) -> list[str]:
    """Every worker's engine line in one template: rank 1's line with its rank from LWS_WORKER_INDEX
    (the only place ranks 1 and 2 differ), the leader's address from LWS_LEADER_ADDRESS."""
    one, two = (render_launch(r, rank, LWS_LEADER_ADDRESS).instances[0].argv for rank in (1, 2))
    differ = [i for i, (a, b) in enumerate(zip(one, two)) if a != b]
    if len(one) != len(two) or [(one[i], two[i]) for i in differ] != [("1", "2")]:
        raise ValueError(f"{r.spec.engine.name}'s worker line carries its rank other than as one argument: "
                         "one LeaderWorkerSet worker template cannot serve every rank")
    return [LWS_WORKER_INDEX if i in differ else arg for i, arg in enumerate(one)]


def _rank_engine(r: Resolved, sizing: Sizing, launch: Launch, *, leader: bool) -> dict:
    """One rank's engine container: the node launch's container with NCCL's log on the shared
    volume. A worker serves no API (headless): no probes; the leader's generation probes cover the
    whole replica (a generation crosses every stage), and a worker that dies ends its container,
    which recreates the group."""
    engine = _engine_container(r, sizing, launch)
    env = {**launch.instances[0].env, **fabric_env(r)}
    engine["env"] = [{"name": key, "value": value} for key, value in sorted(env.items())]
    engine["volumeMounts"] = [*engine["volumeMounts"], {"name": "nccl-log", "mountPath": NCCL_LOG_DIR}]
    if _on_efa(r):
        # The pinned image plus the EFA userspace (efa_engine_image: built from the rendered Dockerfile).
        engine["image"] = r.spec.target.kubernetes.efa_engine_image
    if not leader:
        engine["args"] = worker_argv(r)[1:]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            del engine[probe]
        engine["volumeMounts"] = [m for m in engine["volumeMounts"] if m["name"] != "probe"]
    return engine


def _fabric_container() -> dict:
    """Reads NCCL's log of the pod's rank: not Ready until NCCL named a fabric (sockets: never;
    the probe's message, in the pod's events, names the rank and the transport), and logs each
    verdict (kubectl logs POD -c fabric). No liveness: a restart would recreate the group."""
    script, transports = f"{FABRIC_MOUNT}/{FABRIC_PROBE_SCRIPT}", f"{FABRIC_MOUNT}/{FABRIC_TRANSPORTS_KEY}"
    return {
        "name": "fabric",
        "image": catalog.DOWNLOAD_IMAGE,
        "command": ["python3", script, "--watch", str(PROBE_PERIOD_SECONDS), transports, NCCL_LOG_DIR],
        "env": [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "readinessProbe": {"exec": {"command": ["python3", script, transports, NCCL_LOG_DIR]},
                           "periodSeconds": PROBE_PERIOD_SECONDS, "timeoutSeconds": PROBE_PERIOD_SECONDS},
        "volumeMounts": [{"name": "fabric", "mountPath": FABRIC_MOUNT, "readOnly": True},
                         {"name": "nccl-log", "mountPath": NCCL_LOG_DIR, "readOnly": True}],
    }


#: NCCL's INIT and NET lines are written at start-up; room for every process's file with margin
#: (a full volume would evict the pod, and with it the group).
NCCL_LOG_LIMIT = "2Gi"


def _rank_pod(r: Resolved, sizing: Sizing, launch: Launch, market: str, stack: str, release: str | None, *,
              leader: bool) -> dict:
    """The leader's or the workers' pod template of the group."""
    rank_launch = render_launch(r, 0 if leader else 1, LWS_LEADER_ADDRESS)
    containers = [_rank_engine(r, sizing, rank_launch, leader=leader)]
    if leader:
        containers += [_proxy_container(), _admission_container(), _metrics_gate_container()]
    containers.append(_fabric_container())
    spec = _pod_spec(r, sizing, launch, market, release, containers, serves=leader)
    spec["volumes"] += [{"name": "nccl-log", "emptyDir": {"sizeLimit": NCCL_LOG_LIMIT}},
                        {"name": "fabric", "configMap": {"name": FABRIC_CONFIGMAP}}]
    metadata = {"labels": labels(stack, "engine"), **({"annotations": {RELEASE_ANNOTATION: release}} if release else {})}
    return {"metadata": metadata, "spec": spec}


def leader_worker_set(r: Resolved, sizing: Sizing, launch: Launch, stack: str, release: str | None) -> dict:
    """The replica as one LeaderWorkerSet group of nodes_per_replica pods, one per node.

    restartPolicy RecreateGroupOnPodRestart: a container that restarts, or a pod that goes, recreates
    the whole group (a TP x PP group cannot re-admit one rank: the others' communicators are dead).
    startupPolicy LeaderCreated: the workers start with the leader, not after it is Ready (it cannot
    be Ready before every rank joined its rendezvous). subdomainPolicy Shared: one headless Service
    (publishing not-ready addresses) names every pod, LWS_LEADER_ADDRESS among them. The rollout is
    the stack's (rolling_update): one-at-a-time stops the only group first (maxUnavailable 1), surge
    starts a second group of the same size first (maxSurge 1: as many more GPUs)."""
    k8s = r.spec.target.kubernetes
    ((market, _),) = market_groups(r)  # one replica, never on spot (rules)
    return {
        "apiVersion": LWS_API_VERSION,
        "kind": "LeaderWorkerSet",
        "metadata": _meta(LWS_NAME, k8s.namespace, stack, "engine"),
        "spec": {
            "replicas": r.spec.capacity.replicas,
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {"type": "RollingUpdate",
                                "rollingUpdateConfiguration": rolling_update(r.spec.capacity.rollout)},
            "networkConfig": {"subdomainPolicy": "Shared"},
            "leaderWorkerTemplate": {
                "size": r.nodes_per_replica,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": _rank_pod(r, sizing, launch, market, stack, release, leader=True),
                "workerTemplate": _rank_pod(r, sizing, launch, market, stack, release, leader=False),
            },
        },
    }


def _network_policies(ns: str, stack: str, prometheus_ns: str) -> list[dict]:
    """Nothing reaches a pod of the namespace (the weights Job, an engine's own port) except the
    proxy's two named ports, from anywhere, and the metrics gate's port, from the Prometheus pods of
    the monitoring namespace only. Enforced by the cluster's CNI (Calico, Cilium, the VPC CNI with
    network policy on); the engine and Caddy's metrics also bind loopback, so this is the second
    wall, not the only one."""
    return [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(DENY_ALL_POLICY, ns, stack, "network"),
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(PROXY_POLICY, ns, stack, "network"),
            "spec": {
                "podSelector": {"matchLabels": labels(stack, "engine")},
                "policyTypes": ["Ingress"],
                # From anywhere (clients, the load balancer), but only to the proxy's ports.
                "ingress": [{"ports": [{"port": "https", "protocol": "TCP"}, {"port": "http", "protocol": "TCP"}]}],
            },
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(METRICS_POLICY, ns, stack, "network"),
            "spec": {
                "podSelector": {"matchLabels": labels(stack, "engine")},
                "policyTypes": ["Ingress"],
                # One peer: the namespace AND the pod labels (both in one element), so neither another
                # pod of the monitoring namespace nor a Prometheus elsewhere (a tenant's) is admitted.
                # kubernetes.io/metadata.name: the label the API server sets on every namespace (1.22+).
                "ingress": [{
                    "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": prometheus_ns}},
                              "podSelector": {"matchLabels": dict(PROMETHEUS_POD_LABELS)}}],
                    "ports": [{"port": METRICS_PORT_NAME, "protocol": "TCP"}],
                }],
            },
        },
    ]


# --- metrics, alerts, scaling (issue 24) ----------------------------------------------------------

def prometheus_namespace(r: Resolved) -> str:
    """The namespace of the Prometheus that scrapes the stack (target.kubernetes.prometheusNamespace)."""
    return r.spec.target.kubernetes.prometheus_namespace


def render_metrics_gate(engine_upstream: str, *, listen_port: int = METRICS_GATE_PORT,
                        proxy_metrics_port: int = observability.PROXY_METRICS_PORT) -> str:
    """The metrics gate's Caddyfile: on the pod's interfaces, GET ENGINE_METRICS_PATH is the engine's
    loopback /metrics, GET PROXY_METRICS_PATH Caddy's (the proxy's loopback metrics site), anything
    else 404. No admin API, no TLS, HTTP/1.1 only; its autosaved config goes to an emptyDir (the
    container's root file system is read-only)."""
    for name, upstream in (("engine", engine_upstream), ("proxy metrics", f"127.0.0.1:{proxy_metrics_port}")):
        if not re.fullmatch(r"127\.0\.0\.1:[0-9]{1,5}", upstream):
            raise ValueError(f"the metrics gate reaches the {name} on loopback only, not {upstream!r}")
    routes = []
    for name, path, upstream in (("engine", ENGINE_METRICS_PATH, engine_upstream),
                                 ("proxy", PROXY_METRICS_PATH, f"127.0.0.1:{proxy_metrics_port}")):
        routes += [
            f"\t@{name} {{",
            "\t\tmethod GET",
            f"\t\tpath {path}",
            "\t}",
            f"\thandle @{name} {{",
            "\t\trewrite * /metrics",
            f"\t\treverse_proxy {upstream}",
            "\t}",
        ]
    return "\n".join([
        "{",
        "\tadmin off",
        "\tauto_https off",
        "\tservers {",
        "\t\tprotocols h1",
        "\t}",
        "}",
        "",
        f"http://:{listen_port} {{",
        *routes,
        "\thandle {",
        '\t\trespond "not found" 404',
        "\t}",
        "}",
    ]) + "\n"


def _metrics_gate_container() -> dict:
    """The second Caddy of an engine pod (render_metrics_gate): the one listener Prometheus reaches."""
    return {
        "name": "metrics",
        "image": catalog.CADDY_IMAGE,
        "command": ["caddy", "run", "--config", f"{METRICS_GATE_MOUNT}/Caddyfile", "--adapter", "caddyfile"],
        # The image's Caddy keeps its data and config under /data and /config: a writable emptyDir here.
        "env": [{"name": "XDG_DATA_HOME", "value": "/tmp/data"}, {"name": "XDG_CONFIG_HOME", "value": "/tmp/config"}],
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": METRICS_GATE_PORT}],
        "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
        # An unprivileged port: no effective capability, and not root (nobody), unlike the proxy that binds
        # 80/443. The image's file capability stays in the bounding set, or the caddy binary cannot be
        # executed at all (catalog.CADDY_IMAGE_FILE_CAPABILITIES).
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
                            "capabilities": {"drop": ["ALL"], "add": list(catalog.CADDY_IMAGE_FILE_CAPABILITIES)}},
        "volumeMounts": [{"name": "metrics-gate", "mountPath": METRICS_GATE_MOUNT, "readOnly": True},
                         {"name": "metrics-gate-tmp", "mountPath": "/tmp"}],
    }


def termination_grace_seconds(policy: ScalingPolicy | None) -> int:
    """How long a stopping pod has: a scaling stack's is its policy's drain timeout (KEDA removes pods
    that may be serving long requests); otherwise 120 s for streaming answers to finish."""
    return policy.drain_timeout_seconds if policy is not None else 120


#: How long the proxy's drain waits for one answer of the engine's /metrics (a hung engine's socket
#: accepts and never answers: that is not "gone", the loop asks again).
PROXY_DRAIN_PROBE_SECONDS = 5


def proxy_drain_wait(engine_port: int) -> str:
    """The proxy container's preStop (busybox sh, wget and timeout of the Caddy image): wait for the
    engine's drain verdict (DRAINED_FILE), or return at once when the engine's port refuses a
    connection: its container is not running (no preStop of its own will write the verdict) or its
    server never started (nothing to drain). busybox wget prints "Connection refused" (strerror) for
    a refused connect and exits 1, as it does for an HTTP error, which is why the words are read."""
    probe = (f"timeout {PROXY_DRAIN_PROBE_SECONDS} wget -O /dev/null http://127.0.0.1:{engine_port}/metrics 2>&1 "
             "| grep -q 'Connection refused'")
    return f"until [ -f {DRAINED_FILE} ]; do if {probe}; then break; fi; sleep 2; done"


def _with_drain(r: Resolved, sizing: Sizing, containers: list[dict]) -> list[dict]:
    """A scaling stack's serving pod drains before it stops: the engine container's preStop waits for
    0 running and 0 waiting on its engine's /metrics (pod_drain.py, up to the drain timeout less
    DRAIN_STOP_SECONDS) and writes DRAINED_FILE; the proxy's preStop waits for that file, so Caddy
    keeps the streams open until then. The pod left the Service's endpoints when its deletion began:
    no new request reaches it meanwhile.

    A container that is not running gets no preStop (the kubelet runs a hook only in a running
    container): an engine that crashed, or is waiting out its restart back-off, never writes the
    file. So the proxy's wait also ends when nothing listens on the engine's loopback port (a
    refused connection: proxy_drain_wait), instead of holding the pod's GPUs for the whole grace
    period; a slow answer is not a refusal and keeps it waiting."""
    policy = scaling_policy(r, sizing)
    if policy is None:
        return containers
    engine_port = r.engine.port
    drain_seconds = max(0, policy.drain_timeout_seconds - DRAIN_STOP_SECONDS)
    hooks = {
        "engine": ["python3", f"{PROBE_MOUNT}/{DRAIN_SCRIPT}",
                   json.dumps(r.adapter.load_metrics.as_dict(), separators=(",", ":")),
                   f"http://127.0.0.1:{engine_port}", str(drain_seconds), DRAINED_FILE],
        # The Caddy image's busybox shell; the engine's drain ends first (or the grace period does, or
        # the engine is not running at all).
        "proxy": ["/bin/sh", "-c", proxy_drain_wait(engine_port)],
    }
    drained = []
    for container in containers:
        if container["name"] in hooks:
            container = {**container, "lifecycle": {"preStop": {"exec": {"command": hooks[container["name"]]}}},
                         "volumeMounts": [*container["volumeMounts"], {"name": "drain", "mountPath": DRAIN_STATE}]}
        drained.append(container)
    return drained


def _scrape_endpoint(stack: str, job: str, path: str) -> dict:
    """One path of the metrics gate, its series labelled with the job the rules read, the stack and
    the pod that served them (replica)."""
    return {
        "port": METRICS_PORT_NAME,
        "path": path,
        "scheme": "http",
        "relabelings": [
            {"action": "replace", "targetLabel": "job", "replacement": job},
            {"action": "replace", "targetLabel": STACK_LABEL, "replacement": stack},
            {"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": REPLICA_LABEL},
        ],
    }


def _monitoring_meta(r: Resolved, name: str, stack: str) -> dict:
    """The Operator selects monitors and rules by prometheusLabels (its podMonitorSelector and
    ruleSelector): they go beside the stack's own labels."""
    meta = _meta(name, r.spec.target.kubernetes.namespace, stack, "metrics")
    meta["labels"] = {**r.spec.target.kubernetes.prometheus_labels, **meta["labels"]}
    return meta


def pod_monitor(r: Resolved, stack: str) -> dict:
    """The Prometheus Operator's scrape of the stack's engine pods: each serving pod's metrics gate,
    the engine's metrics as job kimi-engine and Caddy's as kimi-proxy. A multi-node replica's pods
    are all selected; only the leader serves metrics (a headless worker runs no API server and so no
    /metrics, and no proxy): the Operator keeps only pods with the named port, and applies the
    endpoint's relabelings after its own job label, so job is ours (generatePodMonitorConfig in
    pkg/prometheus/promcfg.go at v0.93.0)."""
    k8s = r.spec.target.kubernetes
    return {
        "apiVersion": PROMETHEUS_OPERATOR_API_VERSION,
        "kind": "PodMonitor",
        "metadata": _monitoring_meta(r, POD_MONITOR, stack),
        "spec": {
            "selector": {"matchLabels": labels(stack, "engine")},
            "namespaceSelector": {"matchNames": [k8s.namespace]},
            "podMetricsEndpoints": [
                _scrape_endpoint(stack, observability.ENGINE_JOB, ENGINE_METRICS_PATH),
                _scrape_endpoint(stack, observability.PROXY_JOB, PROXY_METRICS_PATH),
            ],
        },
    }


def metrics_location(r: Resolved) -> str:
    """Where the stack's metrics are described (the stack output metricsLocation)."""
    return f"podmonitor://{r.spec.target.kubernetes.namespace}/{POD_MONITOR}"


def _stack_selector(r: Resolved) -> str:
    return f'namespace="{r.spec.target.kubernetes.namespace}",job="{observability.ENGINE_JOB}"'


def scaling_query(r: Resolved, policy: ScalingPolicy) -> tuple[str, str, float]:
    """(PromQL, KEDA metricType, threshold) of the stack's trigger, per pod of the scaled Deployment.

    waiting: the stack's total queue (every engine pod's, the engine's own gauge) as an AverageValue,
    so the HPA asks ceil(total / per pod) pods; a replica is engines_per_node pods, so the per-pod
    target is the per-replica one over engines_per_node; pods that do not scale (the on-demand base
    under spot) take their share first. ttft: the stack's p99 time to first token over TTFT_RATE_WINDOW
    (the engine's histogram) as a Value against the objective."""
    selector = _stack_selector(r)
    if policy.metric == "waiting":
        per_pod = policy.target_value / r.engines_per_node
        waiting = r.adapter.load_metrics.waiting
        fixed = sum(pods for market, pods in market_groups(r) if market != scaled_market(r))
        query = f"sum({waiting}{{{selector}}})"
        if fixed:
            query = f"clamp_min({query} - {fixed * per_pod:g}, 0)"
        return query, "AverageValue", per_pod
    histogram = catalog.ENGINE_METRICS[r.spec.engine.name].ttft_histogram
    # No traffic gives NaN (no observation in the window): KEDA's Prometheus scaler reads NaN, Inf and an
    # empty result as 0 with ignoreNullValues (its default; pkg/scalers/prometheus_scaler.go:298 at v2.20.2).
    query = (f"histogram_quantile(0.99, sum by (le) (rate({histogram}_bucket{{{selector}}}"
             f"[{TTFT_RATE_WINDOW}])))")
    return query, "Value", policy.target_value


def kv_cache_query(r: Resolved, policy: ScalingPolicy) -> tuple[str, str, float]:
    """(PromQL, metricType, threshold) of the policy's second signal (autoscaling's kv_cache_target;
    interactive stacks only): the engines' KV cache use (0-1, the engine's own gauge) summed as an AverageValue
    against the per-pod target, so the HPA asks ceil(total use / target) pods: never fewer than keep
    their mean under it. The HPA takes the larger of its metrics' asks, as the policy does. The fixed
    pods (the on-demand base under spot) take their share first."""
    kv = catalog.ENGINE_METRICS[r.spec.engine.name].kv_cache_usage
    fixed = sum(pods for market, pods in market_groups(r) if market != scaled_market(r))
    query = f"sum({kv}{{{_stack_selector(r)}}})"
    if fixed:
        query = f"clamp_min({query} - {fixed * policy.kv_cache_target:g}, 0)"
    return query, "AverageValue", policy.kv_cache_target


def hpa_behavior(r: Resolved, policy: ScalingPolicy) -> dict:
    """The HPA's behaviour from the policy (kimi_fleet/autoscaling.py): scale-in only after a lull of
    scale_in_cooldown_seconds (the scale-down stabilization window takes the highest ask in it);
    scale-out at once, at most once per scale_out_cooldown_seconds: for the queue (an absolute ask,
    ceil(total / target)) as many pods as it asks within a period; for the TTFT (a multiplier of the
    current replicas, which compounds while new replicas start) at most doubling per period, the
    HPA's nearest form of one step per time to ready. Within the HPA's own limits (an hour's window,
    a 30-minute period)."""
    most = policy.max_replicas * r.engines_per_node
    period = min(policy.scale_out_cooldown_seconds, HPA_MAX_POLICY_PERIOD_SECONDS)
    step = ({"type": "Pods", "value": most, "periodSeconds": period} if policy.metric == "waiting"
            else {"type": "Percent", "value": 100, "periodSeconds": period})
    return {
        "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max", "policies": [step]},
        "scaleDown": {"stabilizationWindowSeconds": min(policy.scale_in_cooldown_seconds,
                                                        HPA_MAX_STABILIZATION_SECONDS)},
    }


def scaled_object(r: Resolved, sizing: Sizing, stack: str) -> dict | None:
    """KEDA's ScaledObject for a scaling stack (None otherwise): the scaled Deployment's pods between
    the policy's range (less the fixed on-demand base under spot), Prometheus triggers at
    target.kubernetes.prometheusUrl (the Kubernetes target refuses a scaling stack without it) on the
    queue or the TTFT and, on an interactive stack, on the KV cache use (the policy's second signal), the HPA behaviour from
    the policy."""
    policy = scaling_policy(r, sizing)
    if policy is None:
        return None
    k8s = r.spec.target.kubernetes
    market = scaled_market(r)
    fixed = sum(pods for m, pods in market_groups(r) if m != market)
    query, metric_type, threshold = scaling_query(r, policy)
    triggers_kv = []
    if policy.kv_cache_target is not None:  # a batch stack follows its queue alone (autoscaling.py)
        kv_query, kv_type, kv_target = kv_cache_query(r, policy)
        triggers_kv = [{"type": "prometheus", "name": "kv-cache", "metricType": kv_type,
                        "metadata": {"serverAddress": k8s.prometheus_url, "query": kv_query,
                                     "threshold": f"{kv_target:g}"}}]
    per_replica = r.engines_per_node
    if policy.scales_to_zero:  # the wake front's demand brings the first pod back (kimi_fleet/k8s_wake.py)
        triggers_kv.append(wake_trigger(r))
    trigger_metadata = {"serverAddress": k8s.prometheus_url, "query": query, "threshold": f"{threshold:g}"}
    if policy.metric == "ttft":
        # From zero pods (batch) a p99 above the objective wakes the first one.
        trigger_metadata["activationThreshold"] = f"{threshold:g}"
    return {
        "apiVersion": KEDA_API_VERSION,
        "kind": "ScaledObject",
        "metadata": _meta(SCALED_OBJECT, k8s.namespace, stack, "scaling"),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment_name(market)},
            "minReplicaCount": policy.min_replicas * per_replica - fixed,
            "maxReplicaCount": policy.max_replicas * per_replica - fixed,
            # KEDA's cooldownPeriod applies to the last step to zero; the HPA window to every other.
            "cooldownPeriod": policy.scale_in_cooldown_seconds,
            # No scale to zero before a first pod could have started.
            "initialCooldownPeriod": policy.instance_warmup_seconds,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": hpa_behavior(r, policy)}},
            "triggers": [
                {"type": "prometheus", "name": policy.metric, "metricType": metric_type, "metadata": trigger_metadata},
                *triggers_kv,
            ],
        },
    }


# --- scale to zero: what KEDA reads of the wake front (its objects: kimi_fleet/k8s_wake.py) ---------
#: The wake front's pods carry the public Service's selector labels and this role; its Caddy's series
#: are scraped as job WAKE_JOB by its own PodMonitor (never mixed with the engines' kimi-proxy series).
WAKE_ROLE_LABEL = "kimi-fleet/role"
WAKE_ROLE = "wake"
WAKE_POD_MONITOR = "kimi-wake"
WAKE_JOB = "kimi-wake"
WAKE_METRICS_PORT_NAME = "wake-metrics"
#: How long one request with a valid key keeps the wake trigger active (a PromQL offset): longer than
#: Prometheus' scrape interval plus KEDA's polling interval (30 s each by default), so it is read at least once.
WAKE_DEMAND_WINDOW_SECONDS = 300
WAKE_DEMAND_WINDOW = f"{WAKE_DEMAND_WINDOW_SECONDS // 60}m"
#: The front's Retry-After (k8s_wake.RETRY_AFTER_SECONDS, why it is a minute there): here because the
#: stuck-at-zero alert's window is derived from it.
WAKE_RETRY_AFTER_SECONDS = 60
#: The window KimiStuckAtZero reads the front's 503s over: two retries (one may fall between scrapes), so
#: the alert's expression ends at most this long after the last 503 (the 5-min demand window kept it true 5
#: minutes after a wake had ended: review 2).
WAKE_ALERT_WINDOW_SECONDS = 2 * WAKE_RETRY_AFTER_SECONDS
#: The wake PodMonitor's scrape interval (rendered, not left to the Prometheus' default): the wake query
#: reads the front's `up` over two of them.
WAKE_SCRAPE_INTERVAL_SECONDS = 30
#: How far before a window a 503 series must have no sample at all to count as born within it without a
#: successful scrape of the front just before the window (wake_answered_growth). A scrape gap longer than
#: this, or Prometheus' storage lost, still reads once as demand (docs/known-limits.md).
WAKE_SERIES_LOOKBACK = "1h"


def wake_pod_labels(stack: str) -> dict[str, str]:
    """The public Service's selector labels (so it selects the front) and the role that sets it apart."""
    return {**labels(stack, "engine"), WAKE_ROLE_LABEL: WAKE_ROLE}


def wake_demand_query(r: Resolved) -> str:
    """PromQL: how many requests with a valid key the wake front answered WAKE_STATUS within
    WAKE_DEMAND_WINDOW (any promised route: the verification gate's wait is a GET of the model list, and
    a release at zero is verified on a replica it wakes), plus the engines' running requests. Caddy
    creates a code/method series at its first such answer, so rate()/increase() would read the first
    request as no increase (a series' first sample has nothing before it): a series born within the
    window counts its whole value. An older series counts its increase() over the window, which takes a
    counter reset (Caddy restarted in the same pod: the readiness script's own restart, the liveness
    probe, an OOM kill) as growth from 0; a difference with the value the window ago would read the
    first request after a restart as negative (tests/test_k8s_wake.py: increase() alone misses the
    first request, a difference misses the first one after a restart, this sees both)."""
    answered = wake_answered_series(r)
    running = catalog.ENGINE_METRICS[r.spec.engine.name].running
    return (f"(sum({wake_answered_growth(answered, r.spec.target.kubernetes.namespace)}) or vector(0)) + "
            f"(sum({running}{{{_stack_selector(r)}}}) or vector(0))")


def wake_answered_series(r: Resolved) -> str:
    """PromQL selector: the wake front's WAKE_STATUS answers (requests with a valid key at zero)."""
    duration, code = catalog.PROXY_METRICS.request_duration, catalog.PROXY_METRICS.code_label
    return (f'{duration}_count{{namespace="{r.spec.target.kubernetes.namespace}",job="{WAKE_JOB}",'
            f'{code}="{WAKE_STATUS}"}}')


def _promql_duration(seconds: int) -> str:
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


def wake_answered_growth(answered: str, namespace: str, window_seconds: int = WAKE_DEMAND_WINDOW_SECONDS) -> str:
    """PromQL, per series of `answered`: how many it grew by within the window. A series born within the
    window counts its value; any other its increase(), resets included. Born: absent the window ago while
    the front's last scrape before the window start succeeded (so it was not in that scrape: Caddy had
    not answered it yet, or restarted since), or never seen in the WAKE_SERIES_LOOKBACK before the window
    (a new pod, a new Prometheus). Absent the window ago alone is not enough (review 2): after a scrape gap
    longer than Prometheus' 5-min lookback (Prometheus restarted, the front's metrics unreachable: a failed
    scrape also marks its series stale) every old series would read as born and wake a replica with no
    request. `or` keeps the born series' value where both exist (label sets match without the name)."""
    window = _promql_duration(window_seconds)
    up = f'up{{namespace="{namespace}",job="{WAKE_JOB}"}}'
    scraped = (f"on(namespace, job, {REPLICA_LABEL}) "
               f"(last_over_time({up}[{_promql_duration(2 * WAKE_SCRAPE_INTERVAL_SECONDS)}] offset {window}) == 1)")
    never_seen = f"last_over_time({answered}[{WAKE_SERIES_LOOKBACK}] offset {window})"
    return (f"(({answered} unless {answered} offset {window}) and {scraped}) or ({answered} unless {never_seen}) "
            f"or increase({answered}[{window}])")


def wake_trigger(r: Resolved) -> dict:
    """KEDA's `wake` trigger: active (> 0) while the front answered a request with a valid key within the
    window or an engine runs a request: it scales 0 -> 1 and keeps the stack from 0. As an HPA metric it
    asks for at most one pod (clamped to 1 against an AverageValue of 1): the queue trigger asks for more. KEDA
    v2.20.2 (kedacore/keda): active is value > activationThreshold (pkg/scalers/prometheus_scaler.go:319);
    an active trigger at 0 replicas scales to 1 (pkg/scaling/executor/scale_scaledobjects.go:63-73,
    240-254); with none active and minReplicaCount 0 it scales to 0 once the last active time is
    cooldownPeriod ago (scale_scaledobjects.go:98-101, 211-214). No `fallback`: at 0 replicas it cannot act
    (the HPA is off at zero, scale_scaledobjects.go:86-91), and without it a scaler error keeps the current
    count (93-97; the HPA holds on a metric error) where a static fallback would force one on a running
    batch. A wake that does not end is observability.STUCK_AT_ZERO_ALERT's."""
    return {"type": "prometheus", "name": "wake", "metricType": "AverageValue",
            "metadata": {"serverAddress": r.spec.target.kubernetes.prometheus_url,
                         "query": f"clamp_max({wake_demand_query(r)}, 1)", "threshold": "1",
                         "activationThreshold": "0"}}


def wake_pod_monitor(r: Resolved, stack: str) -> dict:
    """The wake front's Caddy metrics as job WAKE_JOB (the engines' PodMonitor skips the front: it has no
    port named METRICS_PORT_NAME)."""
    endpoint = {**_scrape_endpoint(stack, WAKE_JOB, METRICS_PATH), "port": WAKE_METRICS_PORT_NAME,
                "interval": _promql_duration(WAKE_SCRAPE_INTERVAL_SECONDS)}
    return {"apiVersion": PROMETHEUS_OPERATOR_API_VERSION, "kind": "PodMonitor",
            "metadata": _monitoring_meta(r, WAKE_POD_MONITOR, stack),
            "spec": {"selector": {"matchLabels": wake_pod_labels(stack)},
                     "namespaceSelector": {"matchNames": [r.spec.target.kubernetes.namespace]},
                     "podMetricsEndpoints": [endpoint]}}


def prometheus_rule(r: Resolved, stack: str, policy: ScalingPolicy | None = None) -> dict:
    """The stack's alerts (observability.render_prometheus_rules: the same rules and thresholds as the
    node targets' and the CloudWatch alarms), less UNSERVED_ALERTS, for the Operator's ruleSelector; with
    a `policy` that scales to zero, also observability.STUCK_AT_ZERO_ALERT on the wake front's answers
    (Kubernetes only: no other target scales to zero)."""
    rules = yaml.safe_load(observability.render_prometheus_rules(r.spec))
    unknown = set(UNSERVED_ALERTS) - set(observability.ALERT_NAMES)
    if unknown:
        raise ValueError(f"UNSERVED_ALERTS names alerts observability no longer has: {sorted(unknown)}")
    for group in rules["groups"]:
        group["rules"] = [rule for rule in group["rules"] if rule.get("alert") not in UNSERVED_ALERTS]
    if policy is not None and policy.scales_to_zero:
        rules["groups"][0]["rules"].append(observability.stuck_at_zero_rule(
            stack, wake_answered_growth(wake_answered_series(r), r.spec.target.kubernetes.namespace,
                                 WAKE_ALERT_WINDOW_SECONDS),
            policy.instance_warmup_seconds))
    return {
        "apiVersion": PROMETHEUS_OPERATOR_API_VERSION,
        "kind": "PrometheusRule",
        "metadata": _monitoring_meta(r, PROMETHEUS_RULE, stack),
        "spec": rules,
    }


def grafana_dashboard(r: Resolved) -> dict:
    """observability.render_grafana_dashboard as the sidecar provisions it: a provisioned dashboard's
    ${DS_PROMETHEUS} is not resolved from __inputs (an import does that), so it names a data-source
    variable of that name (the first Prometheus data source by default, chosen in the dashboard)."""
    dashboard = observability.render_grafana_dashboard(r.spec)
    variables = dashboard.setdefault("templating", {}).setdefault("list", [])
    if not any(v.get("name") == "DS_PROMETHEUS" for v in variables):
        variables.insert(0, {"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                             "query": "prometheus", "hide": 0, "current": {}})
    return dashboard


def _dashboard_config_map(r: Resolved, stack: str) -> dict:
    meta = _meta(DASHBOARD_CONFIGMAP, r.spec.target.kubernetes.namespace, stack, "metrics")
    meta["labels"][GRAFANA_DASHBOARD_LABEL] = GRAFANA_DASHBOARD_LABEL_VALUE
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
            "data": {f"kimi-fleet-{stack}.json": json.dumps(grafana_dashboard(r), indent=2, sort_keys=True) + "\n"}}


def render_monitoring(r: Resolved, sizing: Sizing, *, stack: str) -> list[dict]:
    """The stack's monitoring objects, applied after render_manifests' (the Prometheus Operator's and
    KEDA's custom resources): the PodMonitor, the PrometheusRule, the Grafana dashboard's ConfigMap,
    and the ScaledObject of a scaling stack."""
    policy = scaling_policy(r, sizing)
    objects = [pod_monitor(r, stack), prometheus_rule(r, stack, policy), _dashboard_config_map(r, stack)]
    if policy is not None and policy.scales_to_zero:
        objects.append(wake_pod_monitor(r, stack))
    scaled = scaled_object(r, sizing, stack)
    if scaled is not None:
        objects.append(scaled)
    return objects


def manifest_release(r: Resolved, sizing: Sizing, launch: Launch, *, stack: str) -> str:
    """The release id: the digest of every object without its own stamp. A change to the engine,
    the Caddyfile or the pod spec gives a new id, and the id in the pod template rolls the pods
    (a ConfigMap change alone restarts nothing)."""
    objects = _render(r, sizing, launch, stack=stack, release=None)
    return hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()[:16]


def _peers_policy(ns: str, stack: str) -> dict:
    """The pods of the replica's group reach each other on every port (rendezvous, NCCL's bootstrap,
    the engine's own channels); nothing else is admitted to them beyond the proxy's ports."""
    group = {"matchLabels": {LWS_NAME_LABEL: LWS_NAME}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(PEERS_POLICY, ns, stack, "network"),
        "spec": {"podSelector": group, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": group}]}]},
    }


def render_manifests(r: Resolved, sizing: Sizing, launch: Launch, *, stack: str) -> list[dict]:
    """Every object in apply order: Namespace, ConfigMap, NetworkPolicies, weights, GPU claim, Deployments
    (or the LeaderWorkerSet of a multi-node replica), Service, stamped with the stack's release. The
    monitoring objects come apart (render_monitoring): they are not in the release's digest (a new
    alert threshold or scaling range restarts no pod) and they need the Prometheus Operator's and
    KEDA's CRDs in the cluster."""
    return _render(r, sizing, launch, stack=stack, release=manifest_release(r, sizing, launch, stack=stack))


def _render(r: Resolved, sizing: Sizing, launch: Launch, *, stack: str, release: str | None) -> list[dict]:
    k8s = r.spec.target.kubernetes
    ns = k8s.namespace
    objects: list[dict] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels(stack, "namespace")}},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(CADDYFILE_CONFIGMAP, ns, stack, "proxy"),
            "data": {"Caddyfile": render_proxy_caddyfile(r, launch, release)},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(PROBE_CONFIGMAP, ns, stack, "engine"),
            "data": {GENERATION_PROBE_SCRIPT: node_script(GENERATION_PROBE_SCRIPT),
                     **({DRAIN_SCRIPT: pod_script(DRAIN_SCRIPT)} if r.spec.capacity.scaling else {})},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(METRICS_GATE_CONFIGMAP, ns, stack, "metrics"),
            "data": {"Caddyfile": render_metrics_gate(launch.instances[0].upstream)},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(VERIFIER_CONFIGMAP, ns, stack, "weights"),
            "data": {**{script: node_script(script) for script in WEIGHTS_JOB_SCRIPTS},
                     VERIFIER_REQUIREMENTS_KEY: VERIFIER_REQUIREMENTS_TEXT,
                     HF_CLI_REQUIREMENTS_KEY: HF_CLI_REQUIREMENTS},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(ADMISSION_CONFIGMAP, ns, stack, "engine"),
            "data": {_admission_key(path): text
                     for path, text in sorted(_admission_files(r, sizing, launch, release).items())},
        },
        *_network_policies(ns, stack, prometheus_namespace(r)),
    ]
    if r.multi_node:
        objects[-3:-3] = [{
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(FABRIC_CONFIGMAP, ns, stack, "engine"),
            "data": {**{script: (pod_script(script) if script == FABRIC_PROBE_SCRIPT else node_script(script))
                        for script in FABRIC_SCRIPTS},
                     FABRIC_TRANSPORTS_KEY: json.dumps(fabric_transports(), indent=2) + "\n"},
        }]
        objects.append(_peers_policy(ns, stack))
    if r.weights_volume == "pvc":
        size_gib = weights_pvc_gib(r)
        # ReadWriteOnce: local-NVMe classes are node-local. Every pod on that node mounts the one
        # claim, and the volume's node affinity draws the replicas to the node holding the weights.
        pvc_spec = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": f"{size_gib}Gi"}}}
        if k8s.storage_class:
            pvc_spec["storageClassName"] = k8s.storage_class
        first_market = market_groups(r)[0][0]
        objects += [
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": _meta(WEIGHTS_PVC, ns, stack, "weights"), "spec": pvc_spec},
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": _meta(weights_job_name(r), ns, stack, "weights"),
                "spec": {
                    "backoffLimit": 4,  # each retry resumes the download
                    "activeDeadlineSeconds": download_deadline_seconds(sizing),
                    "template": {
                        "metadata": {"labels": labels(stack, "weights")},
                        "spec": {
                            "restartPolicy": "Never",
                            "automountServiceAccountToken": False,
                            # WaitForFirstConsumer binds the local volume where this pod lands: a GPU node.
                            **_scheduling(r, first_market),
                            "containers": [_download_container(r)],
                            "volumes": [_weights_volume(r),
                                        _verifier_volume()],
                        },
                    },
                },
            },
        ]
    if k8s.gpu_claim == "dra":
        objects.append({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaimTemplate",
            "metadata": _meta(GPU_CLAIM_TEMPLATE, ns, stack, "engine"),
            "spec": {"spec": {"devices": {"requests": [{
                "name": GPU_CLAIM,
                "exactly": {"deviceClassName": k8s.device_class, "allocationMode": "ExactCount",
                            "count": r.gpus_per_engine},
            }]}}},
        })
    if r.multi_node:
        objects.append(leader_worker_set(r, sizing, launch, stack, release))
    else:
        objects += [_deployment(r, sizing, launch, stack, market, pods, release) for market, pods in market_groups(r)]
    annotations = {"external-dns.alpha.kubernetes.io/hostname": r.spec.domain} if k8s.external_dns else {}
    objects.append({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(PROXY_SERVICE, ns, stack, "proxy", **({"annotations": annotations} if annotations else {})),
        "spec": {
            "type": k8s.proxy_service_type,
            # Keep the client's address (no SNAT to a node's): the proxy logs failed keys by who sent them.
            **({"externalTrafficPolicy": "Local"} if k8s.proxy_service_type != "ClusterIP" else {}),
            # A multi-node replica's API is its leader's (worker index 0): workers run headless.
            "selector": {**labels(stack, "engine"), **({LWS_WORKER_INDEX_LABEL: "0"} if r.multi_node else {})},
            # Only Caddy: the engine port is never exposed.
            "ports": [
                {"name": "https", "port": HTTPS_PORT, "targetPort": "https", "protocol": "TCP"},
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
            ],
        },
    })
    return objects


class _NoAliasDumper(yaml.SafeDumper):
    """Shared dicts (a selector reused as pod labels) print in full, not as &id001 anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


def render_k8s_artifacts(r: Resolved, sizing: Sizing, launch: Launch) -> dict[str, str]:
    """File name -> text for build/<stack>/: the objects as one multi-document YAML."""
    ns = r.spec.target.kubernetes.namespace
    header = [
        f"# kimi-fleet stack {r.spec.stack}: apply after creating the secrets it references:",
        f"#   kubectl -n {ns} create secret generic {API_KEY_SECRET} --from-file={API_KEY_SECRET_KEY}=API_KEY_FILE"
        + (f" --from-file={PREVIOUS_API_KEY_SECRET_KEY}=PREVIOUS_API_KEY_FILE"
           if r.spec.api_key_rotation.accept_previous else ""),
        f"#   kubectl -n {ns} create secret generic {HF_TOKEN_SECRET} --from-file={HF_TOKEN_SECRET_KEY}=HF_TOKEN_FILE"
        "  (gated repos only)",
        f"# {rollout_cost(r, sizing)}",
    ]
    documents = yaml.dump_all(
        render_manifests(r, sizing, launch, stack=r.spec.stack), Dumper=_NoAliasDumper, sort_keys=False, width=120
    )
    monitoring_header = [
        f"# kimi-fleet stack {r.spec.stack}: its metrics, alerts and scaling; apply after kubernetes.yaml, in a "
        "cluster with the Prometheus Operator's CRDs",
        f"#   (kube-prometheus-stack; the PodMonitor and PrometheusRule of prometheus-operator "
        f"{PROMETHEUS_OPERATOR_RELEASE})" + (f" and KEDA {KEDA_RELEASE} (its ScaledObject)"
                                              if r.spec.capacity.scaling else ""),
        f"# Prometheus reaches each engine pod's port {METRICS_PORT_NAME!r} ({METRICS_GATE_PORT}) from the "
        f"namespace {prometheus_namespace(r)} only (NetworkPolicy {METRICS_POLICY}).",
    ]
    monitoring = yaml.dump_all(render_monitoring(r, sizing, stack=r.spec.stack), Dumper=_NoAliasDumper,
                               sort_keys=False, width=120)
    return {"kubernetes.yaml": "\n".join(header) + "\n" + documents,
            "kubernetes-monitoring.yaml": "\n".join(monitoring_header) + "\n" + monitoring}

