"""One replica over several Kubernetes nodes (issue 22, Kubernetes): a LeaderWorkerSet group,
validated against LWS v0.10.0's published CRD, its pods against the core/v1 schemas, and the fabric
check that keeps a rank on TCP sockets out of service."""

import copy
import json
import os
import re
import subprocess
import sys

import kubernetes_validate
import pulumi
import pytest

from kimi_fleet import catalog
from kimi_fleet import k8s_manifests as manifests
from kimi_fleet.artifacts import render_artifacts
from kimi_fleet.launch import render_launch
from kimi_fleet.node_scripts import node_script
from kimi_fleet.node_scripts.fabric_check import Verdict, verdict_line
from kimi_fleet.pod_scripts import pod_script
from kimi_fleet.resolve import Resolved
from kimi_fleet.rules import check_rules
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import load_stack_config, stack_file
from kimi_fleet.spec import StackSpecError
from kimi_fleet.validation import parse_spec
from tests.matrix import K8S_MULTI_NODE_STACKS, PLANNED_STACKS
from tooling import lws_schema

STACK = "k8s-h100-int4-vllm"
K8S_VERSION = kubernetes_validate.latest_version()
LEADER_ADDRESS = f"{manifests.LWS_NAME}-0.{manifests.LWS_NAME}.kimi-h100"


#: What an operator sets after building and pushing the image scripts/efa_engine_dockerfile.py prints.
EFA_ENGINE_IMAGE = "registry.example.com/kimi-engine-efa@sha256:" + "5e" * 32


def shipped_values() -> dict:
    return copy.deepcopy(load_stack_config(stack_file(STACK)).values)


def resolved(**overrides) -> Resolved:
    """The stack with its EFA engine image built and named (the shipped file cannot name it)."""
    values = shipped_values()
    values["target"]["kubernetes"]["efaEngineImage"] = EFA_ENGINE_IMAGE
    values.update(overrides)
    return Resolved(parse_spec(values, STACK, f"stacks/Pulumi.{STACK}.yaml"))


def refusals(**overrides) -> list[str]:
    """Every reason the stack with these changes is refused (none: [])."""
    try:
        r = resolved(**overrides)
    except StackSpecError as refused:
        return refused.problems
    return check_rules(r)[0]


def rendered(**overrides):
    r = resolved(**overrides)
    sizing = size(r)
    return r, sizing, manifests.render_manifests(r, sizing, render_launch(r), stack=STACK)


def the(objects, kind, name=None):
    (found,) = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return found


def group(objects):
    return the(objects, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]


def container(template, name):
    return next(c for c in template["spec"]["containers"] if c["name"] == name)


def expand(args, **env):
    """The kubelet's $(VAR) expansion of a container's args (LWS puts its variables first in env)."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in args]


@pytest.fixture(scope="module")
def stack():
    return rendered()


def test_the_shipped_stack_is_planned_but_deploys_only_with_its_efa_engine_image():
    """The cluster cannot build the image with the EFA userspace: until the stack names it by digest,
    the plan refuses it, saying how to build it (the Dockerfile the script prints)."""
    shipped = Resolved(parse_spec(shipped_values(), STACK, f"stacks/Pulumi.{STACK}.yaml"))
    missing = shipped.target.multi_node_missing(shipped)
    assert "target.kubernetes.efaEngineImage" in missing and f"scripts/efa_engine_dockerfile.py {STACK}" in missing
    assert STACK not in PLANNED_STACKS and K8S_MULTI_NODE_STACKS == [STACK]
    printed = subprocess.run([sys.executable, "scripts/efa_engine_dockerfile.py", STACK], capture_output=True,
                             text=True, timeout=60, cwd=stack_file(STACK).parents[1])
    assert printed.returncode == 0 and printed.stdout.startswith("# kimi-fleet: vllm/vllm-openai:v0.22.1")
    assert catalog.EFA_INSTALLER.sha256 in printed.stdout
    with pytest.raises(StackSpecError, match="by digest"):
        resolved(target={**shipped_values()["target"], "kubernetes": {
            **shipped_values()["target"]["kubernetes"], "efaEngineImage": "registry.example.com/efa:latest"}})


def test_the_stack_with_its_efa_image_deploys(stack):
    r, sizing, objects = stack
    assert r.multi_node and r.nodes_per_replica == 2 and r.pipeline_parallel == 2 and r.tensor_parallel == 8
    assert r.target.multi_node_missing(r) is None
    for role in ("leaderTemplate", "workerTemplate"):
        assert container(group(objects)[role], "engine")["image"] == EFA_ENGINE_IMAGE
    assert check_rules(r)[0] == []
    files = render_artifacts(r, sizing, render_launch(r))  # no refusal: the stack deploys
    assert "kind: LeaderWorkerSet" in files["kubernetes.yaml"]
    assert f"--server-side -f https://github.com/kubernetes-sigs/lws/releases/download/{manifests.LWS_RELEASE}/" \
           "manifests.yaml" in stack_file(STACK).read_text()


def test_the_leader_worker_set_validates_against_the_published_crd(stack):
    _, _, objects = stack
    lws = the(objects, "LeaderWorkerSet")
    assert lws["apiVersion"] == manifests.LWS_API_VERSION == "leaderworkerset.x-k8s.io/v1"
    assert lws_schema.errors(lws) == []
    # The pod templates are core/v1 pod templates: the current release's schemas, strictly.
    for role in ("leaderTemplate", "workerTemplate"):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()},
                        "template": group(objects)[role]}
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
    # Everything else is a built-in kind.
    for obj in objects:
        if obj["kind"] != "LeaderWorkerSet":
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _mutated(lws, path, value):
    obj = copy.deepcopy(lws)
    *parents, last = path
    node = obj
    for key in parents:
        node = node[key]
    node[last] = value
    return obj


TEMPLATE = ["spec", "leaderWorkerTemplate"]
ENGINE = [*TEMPLATE, "leaderTemplate", "spec", "containers", 0]
ROLLOUT = ["spec", "rolloutStrategy", "rollingUpdateConfiguration"]


@pytest.mark.parametrize("path, value, says", [
    ([*TEMPLATE, "restartPolicy"], "RecreateGroup", "is not one of"),
    (["spec", "startupPolicy"], "WhenReady", "is not one of"),
    (["spec", "networkConfig", "subdomainPolicy"], "PerPod", "is not one of"),
    (["spec", "bogus"], 1, "'bogus' was unexpected"),
    ([*ENGINE, "imagePullPolicee"], "Always", "'imagePullPolicee' was unexpected"),
    ([*TEMPLATE, "leaderTemplate", "metadata", "label"], {}, "'label' was unexpected"),
    ([*TEMPLATE, "size"], "2", "is not of type 'integer'"),
    ([*ENGINE, "env"], [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}], "duplicate entry"),
    ([*ENGINE, "resources", "limits", "memory"], "lots", "does not match"),
    (["metadata", "name"], "9-engine", "does not match"),
    (["apiVersion"], "leaderworkerset.x-k8s.io/v1alpha1", "was expected"),
    # The webhook's rules, which the CRD does not carry.
    ([*TEMPLATE, "size"], 0, "size must be equal or greater than 1"),
    (ROLLOUT, {"maxSurge": 0, "maxUnavailable": 0}, "must not be 0 when `maxSurge` is 0"),
    (ROLLOUT, {"maxSurge": "150%", "maxUnavailable": 1}, "greater than 100%"),
])
def test_the_validation_refuses_what_the_api_server_would(stack, path, value, says):
    """Negative cases: the schema is strict and carries the enums, so a pass is not vacuous."""
    lws = the(stack[2], "LeaderWorkerSet")
    found = lws_schema.errors(_mutated(lws, path, value))
    assert any(says in error for error in found), found


def test_the_crd_is_the_tags_and_holds_the_fields_we_render():
    text = lws_schema.CRD_FILE.read_text()
    import hashlib

    assert hashlib.sha256(text.encode()).hexdigest() == (
        "c5dcad8ed943e495490241f00b9a1b45d51203b6d484020db3636d5bf553568e")
    spec = lws_schema.json_schema()["properties"]["spec"]["properties"]
    assert spec["leaderWorkerTemplate"]["properties"]["restartPolicy"]["enum"] == [
        "Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"]
    assert sorted(spec["startupPolicy"]["enum"]) == ["LeaderCreated", "LeaderReady"]


@pytest.mark.parametrize("rollout, update", [("one-at-a-time", {"maxSurge": 0, "maxUnavailable": 1}),
                                             ("surge", {"maxSurge": 1, "maxUnavailable": 0})])
def test_one_group_of_one_pod_per_node_recreated_whole(rollout, update):
    r, sizing, objects = rendered(capacity={"workload": "interactive", "rollout": rollout})
    assert not [o for o in objects if o["kind"] == "Deployment"]
    lws = the(objects, "LeaderWorkerSet")
    spec = lws["spec"]
    assert spec["replicas"] == 1 and spec["leaderWorkerTemplate"]["size"] == r.nodes_per_replica == 2
    assert spec["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert spec["startupPolicy"] == "LeaderCreated"  # the leader is Ready only after every rank joined
    assert spec["networkConfig"] == {"subdomainPolicy": "Shared"}
    assert spec["rolloutStrategy"] == {"type": "RollingUpdate", "rollingUpdateConfiguration": update}
    assert lws_schema.errors(lws) == []
    # A surge rollout starts the surge group, then recreates the group itself: two cold starts.
    wait = manifests.rollout_wait(r, sizing)
    assert wait["deployments"] == [] and wait["leaderworkersets"] == [manifests.LWS_NAME]
    assert wait["timeout_seconds"] == wait["pod_ready_seconds"] * (2 if rollout == "surge" else 1)
    cost = manifests.rollout_cost(r, sizing)
    assert ("no downtime" in cost and "16 GPUs" in cost) if rollout == "surge" else "without service" in cost


def test_each_rank_runs_the_line_the_parser_checked(stack):
    """The kubelet's expansion of LWS's variables gives each rank exactly its launch line (the line
    scripts/engine_flags.py parses in vLLM's own parser), with no shell in between."""
    r, _, objects = stack
    templates = group(objects)
    for rank, role in ((0, "leaderTemplate"), (1, "workerTemplate")):
        engine = container(templates[role], "engine")
        argv = [*engine["command"], *engine["args"]]
        assert "sh" not in engine["command"][0]
        expanded = expand(argv, LWS_LEADER_ADDRESS=LEADER_ADDRESS, LWS_WORKER_INDEX=str(rank))
        assert expanded == list(render_launch(r, rank, LEADER_ADDRESS).instances[0].argv)
        # LWS drops a container's own variables of its names: none here.
        assert not [e for e in engine["env"] if e["name"].startswith("LWS_")]
    worker = container(templates["workerTemplate"], "engine")
    assert "--headless" in worker["args"] and manifests.LWS_WORKER_INDEX in worker["args"]


def test_three_nodes_share_one_worker_template():
    r, _, objects = rendered(parallelism={"nodes": 3})
    assert group(objects)["size"] == 3
    worker = container(group(objects)["workerTemplate"], "engine")
    for rank in (1, 2):
        assert expand([*worker["command"], *worker["args"]], LWS_LEADER_ADDRESS=LEADER_ADDRESS,
                      LWS_WORKER_INDEX=str(rank)) == list(render_launch(r, rank, LEADER_ADDRESS).instances[0].argv)


def test_every_pod_takes_its_nodes_gpus_and_fabric(stack):
    r, _, objects = stack
    for role in ("leaderTemplate", "workerTemplate"):
        pod = group(objects)[role]
        engine = container(pod, "engine")
        requests, limits = engine["resources"]["requests"], engine["resources"]["limits"]
        for resources in (requests, limits):
            assert resources["nvidia.com/gpu"] == "8"
            assert resources["vpc.amazonaws.com/efa"] == "32"  # every EFA interface of a p5.48xlarge
            assert resources["hugepages-2Mi"] == "5120Mi"  # the EKS EFA docs' request
        assert engine["securityContext"]["capabilities"] == {"add": ["IPC_LOCK"]}  # RDMA pins its buffers
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in engine["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
        # Each pod fills its own node's disk (the RWO claim cannot reach both nodes).
        assert volumes["weights"]["hostPath"]["path"] == "/mnt/k8s-disks/0/kimi-fleet"
        assert [c["name"] for c in pod["spec"]["initContainers"]] == ["download-weights"]
        declared = set(volumes)
        for c in pod["spec"]["containers"] + pod["spec"]["initContainers"]:
            assert {m["name"] for m in c.get("volumeMounts", [])} <= declared, c["name"]


def test_infiniband_takes_its_resource_without_efa_settings():
    target = copy.deepcopy(load_stack_config(stack_file(STACK)).values["target"])
    target["kubernetes"].update(rdmaResource="rdma/rdma_shared_device_a", rdmaDevices=1)
    _, _, objects = rendered(target=target)
    engine = container(group(objects)["workerTemplate"], "engine")
    assert engine["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
    assert "hugepages-2Mi" not in engine["resources"]["limits"]
    env = {e["name"]: e["value"] for e in engine["env"]}
    assert "FI_PROVIDER" not in env and env["NCCL_DEBUG"] == "INFO"
    assert lws_schema.errors(the(objects, "LeaderWorkerSet")) == []


def test_the_leader_serves_and_is_probed_with_the_sizings_window(stack):
    r, sizing, objects = stack
    templates = group(objects)
    leader, worker = templates["leaderTemplate"], templates["workerTemplate"]
    assert [c["name"] for c in leader["spec"]["containers"]] == ["engine", "proxy", "admission", "metrics", "fabric"]
    assert [c["name"] for c in worker["spec"]["containers"]] == ["engine", "fabric"]
    startup = container(leader, "engine")["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] == manifests.startup_window_seconds(sizing)
    assert sizing.volume_start_seconds <= manifests.startup_window_seconds(sizing) < 2 * sizing.volume_start_seconds
    assert "generation_probe.py" in container(leader, "engine")["livenessProbe"]["exec"]["command"][1]
    # A headless worker has no API to probe: the leader's generations cross both stages.
    assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(container(worker, "engine"))
    # The Service reaches the leader's proxy only.
    service = the(objects, "Service")
    assert service["spec"]["selector"][manifests.LWS_WORKER_INDEX_LABEL] == "0"
    assert service["spec"]["selector"].items() >= manifests.labels(STACK, "engine").items()
    assert leader["metadata"]["labels"].items() >= manifests.labels(STACK, "engine").items()
    release = leader["metadata"]["annotations"][manifests.RELEASE_ANNOTATION]
    assert worker["metadata"]["annotations"][manifests.RELEASE_ANNOTATION] == release


def test_the_groups_pods_reach_each_other_and_nothing_else_is_opened(stack):
    _, _, objects = stack
    policies = {p["metadata"]["name"]: p["spec"] for p in objects if p["kind"] == "NetworkPolicy"}
    assert set(policies) == {manifests.DENY_ALL_POLICY, manifests.PROXY_POLICY, manifests.METRICS_POLICY,
                             manifests.PEERS_POLICY}
    group_selector = {"matchLabels": {manifests.LWS_NAME_LABEL: manifests.LWS_NAME}}
    assert policies[manifests.PEERS_POLICY] == {
        "podSelector": group_selector, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": group_selector}]}]}
    kinds = [o["kind"] for o in objects]
    assert max(i for i, k in enumerate(kinds) if k == "NetworkPolicy") < kinds.index("LeaderWorkerSet")


def test_every_rank_logs_nccls_transport_where_its_fabric_check_reads_it(stack):
    _, _, objects = stack
    config = the(objects, "ConfigMap", manifests.FABRIC_CONFIGMAP)["data"]
    assert config["fabric_check.py"] == node_script("fabric_check.py")  # the nodes' check, as it is
    assert config["fabric_probe.py"] == pod_script("fabric_probe.py")
    assert json.loads(config["transports.json"]) == {"fabric": catalog.NCCL_FABRIC_TRANSPORTS,
                                                     "socket": list(catalog.NCCL_SOCKET_TRANSPORTS)}
    for role in ("leaderTemplate", "workerTemplate"):
        pod = group(objects)[role]
        env = {e["name"]: e["value"] for e in container(pod, "engine")["env"]}
        assert env["NCCL_DEBUG"] == "INFO" and "NET" in env["NCCL_DEBUG_SUBSYS"].split(",")
        assert env["NCCL_DEBUG_FILE"] == f"{manifests.NCCL_LOG_DIR}/%h.%p.log"  # one file per process
        assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
        fabric = container(pod, "fabric")
        probe = fabric["readinessProbe"]["exec"]["command"]
        assert probe == ["python3", f"{manifests.FABRIC_MOUNT}/fabric_probe.py",
                         f"{manifests.FABRIC_MOUNT}/transports.json", manifests.NCCL_LOG_DIR]
        assert "livenessProbe" not in fabric and "startupProbe" not in fabric  # a restart recreates the group
        shared = {m["name"] for m in container(pod, "engine")["volumeMounts"]} & {
            m["name"] for m in fabric["volumeMounts"]}
        assert shared == {"nccl-log"}


@pytest.fixture()
def shipped(stack, tmp_path):
    """The fabric ConfigMap's files as the pod mounts them."""
    mount = tmp_path / "fabric"
    mount.mkdir()
    for key, text in the(stack[2], "ConfigMap", manifests.FABRIC_CONFIGMAP)["data"].items():
        (mount / key).write_text(text)
    logs = tmp_path / "nccl"
    logs.mkdir()
    return mount, logs


def run_probe(mount, logs, rank):
    env = {**os.environ, "LWS_WORKER_INDEX": str(rank)}
    return subprocess.run([sys.executable, str(mount / "fabric_probe.py"), str(mount / "transports.json"), str(logs)],
                          capture_output=True, text=True, env=env, timeout=30)


EFA_LINE = "kimi-engine-0-1:412:530 [3] NCCL INFO NET/OFI Using network AWS Libfabric"
SOCKET_LINE = "kimi-engine-0-1:413:531 [4] NCCL INFO NET/Socket : Using [0]eth0:10.0.3.7<0>"


def test_the_fabric_probe_reads_every_process_and_names_the_rank(shipped):
    """The probe as shipped (the ConfigMap's files, run as the readiness probe runs them): not ready
    while NCCL has not spoken, ready on EFA, and never ready when one process of the rank is on
    sockets, with the verdict naming the rank (the message kubelet puts in the pod's events)."""
    mount, logs = shipped
    done = run_probe(mount, logs, 1)
    assert done.returncode == 3 and "rank 1: NCCL has not named its transport yet" in done.stdout
    (logs / "kimi-engine-0-1.412.log").write_text(f"kimi-engine-0-1:412:412 NCCL INFO Bootstrap\n{EFA_LINE}\n")
    done = run_probe(mount, logs, 1)
    assert done.returncode == 0 and done.stdout.strip() == f"rank 1: NCCL over efa ({EFA_LINE})"
    (logs / "kimi-engine-0-1.413.log").write_text(f"{SOCKET_LINE}\n")
    done = run_probe(mount, logs, 1)
    assert done.returncode == 1
    assert done.stdout.startswith("rank 1: NCCL runs over TCP sockets, not the fabric (") and SOCKET_LINE in done.stdout


def test_the_fabric_container_logs_each_new_verdict_and_never_ends(shipped, capsys, monkeypatch):
    mount, logs = shipped
    sys.path.insert(0, str(mount))
    try:
        import fabric_probe
    finally:
        sys.path.remove(str(mount))
    monkeypatch.setenv("LWS_WORKER_INDEX", "0")
    writes = iter([lambda: None, lambda: (logs / "a.log").write_text(EFA_LINE), lambda: None,
                   lambda: (logs / "b.log").write_bytes(b"\xff" + SOCKET_LINE.encode())])
    assert fabric_probe.watch(0, str(mount / "transports.json"), str(logs), rounds=5,
                              sleep=lambda _: next(writes, lambda: None)()) == 0
    lines = [line.split("[kimi-fabric] ")[1] for line in capsys.readouterr().out.splitlines()]
    assert lines == ["rank 0: NCCL has not named its transport yet (NCCL_DEBUG=INFO; the communicators are not up)",
                     f"rank 0: NCCL over efa ({EFA_LINE})",
                     verdict_line(0, Verdict("socket", "\ufffd" + SOCKET_LINE))]
    # An unreadable directory is reported, not a crash (the container's restart would recreate the group).
    assert fabric_probe.watch(0, str(mount / "missing.json"), str(logs), rounds=1, sleep=lambda _: None) == 0
    assert "cannot read" in capsys.readouterr().out


@pytest.mark.parametrize("change, field", [
    ({"rdmaResource": None, "rdmaDevices": None}, "target.kubernetes.rdmaResource (not set)"),
    ({"rdmaDevices": None}, "target.kubernetes.rdmaDevices (not set)"),
])
def test_a_group_without_its_fabric_devices_is_refused_naming_the_field(change, field):
    target = copy.deepcopy(load_stack_config(stack_file(STACK)).values["target"])
    target["kubernetes"].update(change)
    target["kubernetes"] = {k: v for k, v in target["kubernetes"].items() if v is not None}
    found = refusals(target=target)
    assert len(found) == 1 and field in found[0], found


def test_the_node_local_weights_claim_is_refused_for_a_group():
    found = refusals(weights={"volume": "pvc"})
    assert len(found) == 1 and "weights.volume (given 'pvc')" in found[0] and "host-path" in found[0], found


def test_spot_is_refused_for_a_group():
    found = refusals(capacity={"market": "spot"})
    assert any("capacity.market (given 'spot')" in p for p in found), found


def test_fabric_devices_on_a_one_node_replica_are_refused():
    found = refusals(parallelism={"nodes": 1})
    assert any("target.kubernetes.rdmaResource (given 'vpc.amazonaws.com/efa'" in p for p in found), found


@pytest.mark.parametrize("bad", ["efa", "kubernetes.io/efa", "vpc.amazonaws.com/", "VPC.com/efa", "a/b c"])
def test_the_fabric_resource_has_an_extended_resource_shape(bad):
    target = copy.deepcopy(load_stack_config(stack_file(STACK)).values["target"])
    target["kubernetes"]["rdmaResource"] = bad
    (found,) = refusals(target=target)
    assert "target.kubernetes.rdmaResource" in found, found


# --- under the Pulumi mocks --------------------------------------------------------------------

def integral(value):
    """The mocks carry numbers as floats (a protobuf Struct): back to the integers rendered."""
    if isinstance(value, dict):
        return {key: integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [integral(item) for item in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


@pytest.fixture(scope="module")
def mocked():
    from tests.test_k8s_component import run_kubernetes_endpoint

    return run_kubernetes_endpoint(STACK, r=resolved())


def test_the_component_declares_the_group_as_a_custom_resource_not_awaited(mocked, stack):
    from components.kubernetes_endpoint import SKIP_AWAIT_ANNOTATION

    r, sizing, objects = stack
    (lws,) = mocked.of_type("kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet")
    assert not mocked.of_type("kubernetes:apps/v1:Deployment")
    wire = lws["wire"]
    assert wire["apiVersion"] == manifests.LWS_API_VERSION and wire["kind"] == "LeaderWorkerSet"
    assert wire["metadata"]["annotations"] == {SKIP_AWAIT_ANNOTATION: "true"}
    assert not lws["timeouts"]
    applied = integral({key: wire[key] for key in ("apiVersion", "kind", "metadata", "spec")})
    assert lws_schema.errors(applied) == []
    leader = applied["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["annotations"]
    assert manifests.API_KEY_VERSION_ANNOTATION in leader  # a rotated key rolls the proxy's pod
    assert leader[manifests.RELEASE_ANNOTATION] == manifests.manifest_release(r, sizing, render_launch(r), stack=STACK)
    expected = {**the(objects, "LeaderWorkerSet")["spec"]}
    expected["leaderWorkerTemplate"] = copy.deepcopy(expected["leaderWorkerTemplate"])
    expected["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["annotations"][
        manifests.API_KEY_VERSION_ANNOTATION] = leader[manifests.API_KEY_VERSION_ANNOTATION]
    assert applied["spec"] == expected
    # The group starts once the verified weights' init path, the ConfigMaps and the secrets exist.
    # Every one of them, not the last registered of each type (the mocks' order varies: a clean-clone
    # run picked the Grafana dashboard's ConfigMap, which is monitoring and no workload waits for).
    for prerequisite in ("kubernetes:core/v1:ConfigMap", "kubernetes:core/v1:Secret",
                         "kubernetes:networking.k8s.io/v1:NetworkPolicy"):
        wanted = [reg["name"] for reg in mocked.of_type(prerequisite)
                  if reg["wire"]["metadata"]["name"] != manifests.DASHBOARD_CONFIGMAP]
        assert wanted and all(name in lws["dependencies"] for name in wanted), (prerequisite, wanted)
    (dashboard,) = [reg for reg in mocked.of_type("kubernetes:core/v1:ConfigMap")
                    if reg["wire"]["metadata"]["name"] == manifests.DASHBOARD_CONFIGMAP]
    assert dashboard["name"] not in lws["dependencies"]
    # The gate waits for the group as applied.
    assert mocked.outputs["fleet_rollout"] == {**manifests.rollout_wait(r, sizing), "deployments": [],
                                               "leaderworkersets": [manifests.LWS_NAME]}
    assert mocked.outputs["node_ids"] == [manifests.LWS_NAME]
    assert pulumi.runtime is not None


# --- each pod fetches its own pipeline stage's shards (as the AWS nodes do) -----------------------

def test_each_pods_init_container_takes_its_stage_from_its_worker_index_label(stack):
    """Both templates carry the stage script, the worker index through the downward API and every
    stage's layers from the plan (integers); the group still validates against LWS's CRD and core/v1."""
    r, _, objects = stack
    assert r.stage_fetch and r.stage_ranges == ((0, 31), (31, 61))
    lws = the(objects, "LeaderWorkerSet")
    for role in ("leaderTemplate", "workerTemplate"):
        (download,) = group(objects)[role]["spec"]["initContainers"]
        assert download["command"] == ["/bin/sh", "-ec", manifests.STAGE_DOWNLOAD_SCRIPT]
        env = {e["name"]: e for e in download["env"]}
        assert env["PP_STAGE"] == {"name": "PP_STAGE", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.labels['leaderworkerset.sigs.k8s.io/worker-index']"}}}
        values = {name: e["value"] for name, e in env.items() if name.startswith("PP_") and "value" in e}
        assert values == {"PP_STAGES": "2", "PP_FIRST_LAYER_0": "0", "PP_END_LAYER_0": "31",
                          "PP_FIRST_LAYER_1": "31", "PP_END_LAYER_1": "61"}
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()},
                        "template": group(objects)[role]}
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
    assert lws_schema.errors(lws) == []


def test_a_single_pod_stack_and_the_shared_claims_job_still_fetch_the_whole_checkpoint():
    from tests.test_k8s_manifests import HOST_PATH_WEIGHTS
    from tests.test_k8s_manifests import rendered as rendered_single

    for stack_name, overrides in (("gb200-int4-vllm", {}), ("gb200-int4-vllm", HOST_PATH_WEIGHTS)):
        _, _, objects = rendered_single(stack_name, **overrides)
        scripts = [c["command"][2] for o in objects if o["kind"] in ("Deployment", "Job")
                   for c in o["spec"]["template"]["spec"].get("initContainers", []) + o["spec"]["template"]["spec"][
                       "containers"] if c["name"] == "download-weights"]
        assert scripts == [manifests.DOWNLOAD_SCRIPT]


@pytest.mark.skipif(not __import__("shutil").which("shellcheck"), reason="shellcheck not installed")
def test_the_stage_download_script_passes_shellcheck(tmp_path):
    script = tmp_path / "download.sh"
    script.write_text(manifests.STAGE_DOWNLOAD_SCRIPT)
    checked = subprocess.run(["shellcheck", "-s", "sh", "--severity=style", str(script)], capture_output=True,
                             text=True)
    assert checked.returncode == 0, checked.stdout


def _pod_download(stack, tmp_path, hub: str, weights, index: str) -> tuple[subprocess.CompletedProcess, list]:
    """The worker template's init container script run as the pod would (POSIX sh), its index what
    the downward API would give it, against the fake Hub of the AWS stage tests: the 4-layer staged
    checkpoint, so each stage's layers are that checkpoint's (the plan's ranges are K2.6's 61 layers)."""
    from tests.test_weights_mirror import REPO, REVISION, STAGES, STUB_HF_STAGED

    _, _, objects = stack
    (download,) = group(objects)["workerTemplate"]["spec"]["initContainers"]
    script = download["command"][2]
    verifier = tmp_path / "verifier"
    if not verifier.exists():
        verifier.mkdir()
        (config,) = [c for c in objects if c["kind"] == "ConfigMap"
                     and c["metadata"]["name"] == manifests.VERIFIER_CONFIGMAP]
        for key, text in config["data"].items():
            (verifier / key).write_text(text)
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "hf").write_text(STUB_HF_STAGED)
        # pip installs nothing here (the packages and the pinned hf CLI are the image's business).
        (bin_dir / "python3").write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then exit 0; fi\n'
                                         f'exec {sys.executable} "$@"\n')
        for tool in ("hf", "python3"):
            (bin_dir / tool).chmod(0o755)
        (tmp_path / "packages").mkdir()
        (tmp_path / "packages" / manifests.PACKAGES_COMPLETE_MARKER).touch()
    script = (script.replace(manifests.VERIFIER_MOUNT, str(verifier))
              .replace(f"--root {manifests.WEIGHTS_MOUNT}", f"--root {weights.parent.parent}"))
    env = {e["name"]: e["value"] for e in download["env"] if "value" in e}
    env.update({f"PP_{bound}_{stage}": STAGES[stage][f"PP_{bound}"] for stage in (0, 1)
                for bound in ("FIRST_LAYER", "END_LAYER")})
    calls = tmp_path / "hf-calls"
    calls.unlink(missing_ok=True)
    env.update({"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path), "HF_ENDPOINT": hub,
                "REPO": REPO, "REVISION": REVISION, "TARGET_DIR": str(weights), "CHECKPOINT_BYTES": "1",
                "PACKAGES_DIR": str(tmp_path / "packages"), "HF_CALLS": str(calls), "PP_STAGE": index})
    result = subprocess.run(["/bin/sh", "-ec", script], env=env, capture_output=True, text=True, timeout=120)
    made = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return result, made


def test_each_pod_fetches_and_verifies_exactly_its_stages_shards_from_the_hub(stack, tmp_path):
    from tests.test_node_files import serve_hub
    from tests.test_weights_mirror import REPO, REVISION, SMALL, STAGE_SHARDS, STAGED, StagedHub, held

    hub = serve_hub(StagedHub)
    url = next(hub)
    try:
        root = tmp_path / "node"
        for index in (0, 1):
            weights = root / f"{index}" / "moonshotai--Kimi-K2.6" / REVISION
            result, calls = _pod_download(stack, tmp_path, url, weights, str(index))
            assert result.returncode == 0, result.stdout + result.stderr
            small, shards = calls
            assert small[:2] == ["download", REPO] and small[small.index("--exclude") + 1] == "*.safetensors"
            # The stage's shards, each its own argv element, exact names.
            assert shards[:2] == ["download", REPO]
            assert shards[2:2 + len(STAGE_SHARDS[index])] == sorted(STAGE_SHARDS[index])
            assert shards[2 + len(STAGE_SHARDS[index])] == "--revision"
            assert held(weights) == {p: STAGED[p] for p in SMALL | STAGE_SHARDS[index]}
            layers = "0-1" if index == 0 else "2-3"
            assert (weights / manifests.VERIFIED_MARKER).read_text() == f"{REVISION} stage {index}/2 layers {layers}\n"
            assert "expected by the Hub's tree" in result.stdout
            again, calls = _pod_download(stack, tmp_path, url, weights, str(index))
            assert again.returncode == 0 and "already verified" in again.stdout and calls == []
        # A re-layout: the node that held stage 0 now holds stage 1's pod: it fetches, and keeps no stage 0 shard.
        weights = root / "0" / "moonshotai--Kimi-K2.6" / REVISION
        relaid, _ = _pod_download(stack, tmp_path, url, weights, "1")
        assert relaid.returncode == 0, relaid.stdout + relaid.stderr
        assert held(weights) == {p: STAGED[p] for p in SMALL | STAGE_SHARDS[1]}
        assert (weights / manifests.VERIFIED_MARKER).read_text() == f"{REVISION} stage 1/2 layers 2-3\n"
        # A marker of the revision alone (the whole checkpoint verified) satisfies any stage.
        whole = root / "whole" / "moonshotai--Kimi-K2.6" / REVISION
        whole.mkdir(parents=True)
        (whole / manifests.VERIFIED_MARKER).write_text(f"{REVISION}\n")
        for index in ("0", "1"):
            kept, calls = _pod_download(stack, tmp_path, url, whole, index)
            assert kept.returncode == 0 and "already verified" in kept.stdout and calls == []
    finally:
        next(hub, None)


@pytest.mark.parametrize("index", ["", "x", "01", "1 ", "-1", "1;touch pwned", "$(id)", "2", "99999"])
def test_a_worker_index_that_is_not_one_of_the_stages_is_refused_before_anything_is_fetched(stack, tmp_path,
                                                                                           index):
    from tests.test_weights_mirror import REVISION

    weights = tmp_path / "node" / "moonshotai--Kimi-K2.6" / REVISION
    result, calls = _pod_download(stack, tmp_path, "http://127.0.0.1:9", weights, index)
    assert result.returncode == 1 and calls == [] and not weights.exists()
    assert "small integer" in result.stderr or "is not one of 2" in result.stderr
    assert not (tmp_path / "pwned").exists()
