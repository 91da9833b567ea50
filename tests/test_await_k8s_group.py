"""The gate's wait for a multi-node replica's LeaderWorkerSet (scripts/await_k8s_rollout.py
--leaderworkerset), run as the gate runs it against the stubbed kubectl: the group is done when the
controller and every pod say so; a rank on TCP sockets, a restarted container or a recreated group
fails it at once, naming the pod and the rank, and the previous release's template comes back from
the LeaderWorkerSet's ControllerRevision."""

from __future__ import annotations

import json

import pytest

from components.verification_gate import VerificationGateArgs, verify_command
from kimi_fleet import k8s_manifests as manifests
from kimi_fleet.node_scripts.fabric_check import Verdict, verdict_line
from tests.test_await_k8s_rollout import NEW, NODE, OLD, OLDER, run_wait, verbs

pytestmark = pytest.mark.timeout(120)

GROUP = manifests.LWS_NAME
LWS = "leaderworkersets.leaderworkerset.x-k8s.io"
ROLLOUT = {"kind": "kubernetes", "namespace": "kimi-h100", "context": "", "deployments": [],
           "leaderworkersets": [GROUP], "timeout_seconds": 30, "pod_ready_seconds": 30, "scheduling_grace_seconds": 30}
SOCKETS = verdict_line(1, Verdict("socket", "kimi-engine-0-1:413:531 [4] NCCL INFO NET/Socket : Using [0]eth0"))


def template(release: str) -> dict:
    return {"size": 2, "restartPolicy": "RecreateGroupOnPodRestart",
            "leaderTemplate": {"metadata": {"annotations": {manifests.RELEASE_ANNOTATION: release}},
                               "spec": {"containers": [{"name": "engine", "image": "vllm"}]}},
            "workerTemplate": {"metadata": {"annotations": {manifests.RELEASE_ANNOTATION: release}},
                               "spec": {"containers": [{"name": "engine", "image": "vllm"}]}}}


def group(release: str, *, ready: int = 0, updated: int = 0, replicas: int = 1, available: bool = False) -> dict:
    return {"apiVersion": manifests.LWS_API_VERSION, "kind": "LeaderWorkerSet",
            "metadata": {"name": GROUP, "namespace": "kimi-h100", "generation": 3},
            "spec": {"replicas": 1, "leaderWorkerTemplate": template(release)},
            "status": {"observedGeneration": 3, "replicas": replicas, "readyReplicas": ready, "updatedReplicas": updated,
                       "conditions": [{"type": "Available" if available else "Progressing", "status": "True"}]}}


def revision(number: int, release: str) -> dict:
    """What LWS stores: the template as a strategic-merge patch, with the Go serialisation's nulls."""
    stored = template(release)
    stored["$patch"] = "replace"
    stored["leaderTemplate"]["metadata"]["creationTimestamp"] = None
    return {"apiVersion": "apps/v1", "kind": "ControllerRevision", "revision": number,
            "metadata": {"name": f"{GROUP}-{release[:6]}-{number}", "labels": {manifests.LWS_NAME_LABEL: GROUP}},
            "data": {"spec": {"leaderWorkerTemplate": stored,
                              "networkConfig": {"$patch": "replace", "subdomainPolicy": "Shared"}}}}


HISTORY = [revision(3, OLD), revision(4, NEW)]


def gpod(rank: int, release: str, *, ready: bool = False, uid: str | None = None, group_index: int = 0,
         engine: dict | None = None, deleting: bool = False) -> dict:
    name = f"{GROUP}-{group_index}" + (f"-{rank}" if rank else "")
    metadata = {"name": name, "uid": uid or f"uid-{name}-{release[:4]}",
                "labels": {manifests.LWS_NAME_LABEL: GROUP, manifests.LWS_WORKER_INDEX_LABEL: str(rank),
                           manifests.LWS_GROUP_INDEX_LABEL: str(group_index)},
                "annotations": {manifests.RELEASE_ANNOTATION: release}}
    if deleting:
        metadata["deletionTimestamp"] = "2026-12-07T12:00:00Z"
    containers = ["engine", "proxy", "admission", "fabric"] if rank == 0 else ["engine", "fabric"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": {"nodeName": f"{NODE}-{rank}"},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                       "containerStatuses": [{"name": c, "restartCount": 0, "state": {"running": {}},
                                              **(engine if engine and c == "engine" else {})} for c in containers]}}


def snap(lws: dict, *pods: dict, revisions=HISTORY) -> dict:
    return {"leaderworkersets": {GROUP: lws}, "pods": list(pods), "controllerrevisions": revisions}


RESTORED = [snap(group(OLD, replicas=1), gpod(0, OLD), gpod(1, OLD)),
            snap(group(OLD, ready=1, updated=1, available=True), gpod(0, OLD, ready=True), gpod(1, OLD, ready=True))]


def patches(calls):
    return [c for c in verbs(calls) if c[:2] == ["patch", LWS]]


def test_a_good_group_rollout_passes_without_an_undo(tmp_path):
    # one-at-a-time: the old group goes, the new one loads (both ranks), then serves.
    scenario = {"before": [
        snap(group(NEW, replicas=1), gpod(0, OLD, ready=True, deleting=True), gpod(1, OLD, ready=True, deleting=True)),
        snap(group(NEW, updated=1), gpod(0, NEW), gpod(1, NEW)),
        snap(group(NEW, updated=1), gpod(0, NEW), gpod(1, NEW, ready=True)),
        # The controller says ready before the last pod does: the wait asks the pods too.
        snap(group(NEW, ready=1, updated=1, available=True), gpod(0, NEW), gpod(1, NEW, ready=True)),
        snap(group(NEW, ready=1, updated=1, available=True), gpod(0, NEW, ready=True), gpod(1, NEW, ready=True)),
    ], "after_undo": []}
    result, calls = run_wait(tmp_path, scenario, rollout=ROLLOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"release {NEW} on every pod" in result.stdout and f"leaderworkerset {GROUP}: 1/1 group(s)" in result.stdout
    assert not patches(calls)
    gets = [c for c in verbs(calls) if c[:2] == ["get", LWS]]
    assert len(gets) == 5 and all(c[2] == GROUP for c in gets)


def test_a_worker_on_tcp_sockets_fails_at_once_naming_its_rank_and_is_undone(tmp_path):
    scenario = {
        "before": [snap(group(NEW, updated=1), gpod(0, NEW), gpod(1, NEW))],
        "after_undo": RESTORED,
        "events": {f"{GROUP}-0-1": [
            # An earlier pod of the same name (the previous group) does not count...
            {"type": "Warning", "reason": "Unhealthy", "involvedObject": {"uid": "an-earlier-pod"},
             "message": "Readiness probe failed: rank 1: NCCL runs over TCP sockets, not the fabric (old)"},
            {"type": "Warning", "reason": "Unhealthy", "involvedObject": {"uid": f"uid-{GROUP}-0-1-{NEW[:4]}"},
             "message": f"Readiness probe failed: {SOCKETS}"}]},
        "logs": {f"{GROUP}-0-1/fabric": f"2026-12-07T11:59:00Z [kimi-fabric] {SOCKETS}\n"},
    }
    result, calls = run_wait(tmp_path, scenario, rollout=ROLLOUT)
    assert result.returncode == 1, result.stdout + result.stderr
    first = next(line for line in result.stderr.splitlines() if "failed:" in line)
    assert f"pod {GROUP}-0-1 on node {NODE}-1 (leaderworkerset {GROUP})" in first
    assert "rank 1's collectives run over TCP sockets, not the fabric" in first and "NET/Socket" in first
    assert "(old)" not in first
    assert f"[kimi-fabric] {SOCKETS}" in result.stderr  # the fabric container's own log
    # The previous release's template comes back from its ControllerRevision, as the API takes it.
    (patch,) = patches(calls)
    assert patch[:5] == ["patch", LWS, GROUP, "--type", "json"] and patch[5] == "-p"
    (operation,) = json.loads(patch[6])
    assert operation["op"] == "replace" and operation["path"] == "/spec/leaderWorkerTemplate"
    assert operation["value"] == template(OLD)  # no $patch directive, no nulls
    assert f"undone to revision 3 (release {OLD})" in result.stderr
    assert f"leaderworkerset {GROUP} on release {OLD} serves again" in result.stderr.splitlines()[-1]


def test_a_restarted_rank_fails_the_group_with_its_previous_log(tmp_path):
    crashed = {"restartCount": 1, "state": {"running": {}},
               "lastState": {"terminated": {"reason": "Error", "exitCode": 1}}}
    scenario = {"before": [snap(group(NEW, updated=1), gpod(0, NEW), gpod(1, NEW, engine=crashed))],
                "after_undo": RESTORED,
                "logs": {f"{GROUP}-0-1/engine/previous": "torch.distributed.DistNetworkError: connect to leader\n"}}
    result, calls = run_wait(tmp_path, scenario, rollout=ROLLOUT)
    assert result.returncode == 1
    assert f"pod {GROUP}-0-1" in result.stderr and "container engine ended Error (exit 1)" in result.stderr
    assert "DistNetworkError" in result.stderr
    assert patches(calls)


@pytest.mark.parametrize("later, says", [
    ((gpod(0, NEW, uid="second"), gpod(1, NEW, uid="second-1")), "was replaced by a new pod"),
    ((gpod(0, NEW, deleting=True), gpod(1, NEW, deleting=True)), "is being deleted"),
    ((), "is gone"),
])
def test_a_recreated_group_fails_the_release(tmp_path, later, says):
    """LWS recreates the whole group when one container restarts: the restart itself may never be
    seen (the pods go first), the replaced pods are."""
    scenario = {"before": [snap(group(NEW, updated=1), gpod(0, NEW), gpod(1, NEW)),
                           snap(group(NEW, updated=1), *later)],
                "after_undo": RESTORED}
    result, calls = run_wait(tmp_path, scenario, rollout=ROLLOUT)
    assert result.returncode == 1
    assert says in result.stderr and "RecreateGroupOnPodRestart" in result.stderr
    assert patches(calls)


def test_a_surge_group_that_goes_at_the_end_is_no_failure(tmp_path):
    surge = lambda rank, **kw: gpod(rank, NEW, group_index=1, **kw)  # noqa: E731
    scenario = {"before": [
        snap(group(NEW, updated=1, replicas=2), gpod(0, OLD, ready=True), gpod(1, OLD, ready=True), surge(0), surge(1)),
        snap(group(NEW, ready=1, updated=1, replicas=2), gpod(0, NEW), gpod(1, NEW), surge(0, ready=True),
             surge(1, ready=True)),
        snap(group(NEW, ready=2, updated=2, replicas=2, available=True), gpod(0, NEW, ready=True),
             gpod(1, NEW, ready=True), surge(0, ready=True, deleting=True), surge(1, ready=True, deleting=True)),
        snap(group(NEW, ready=1, updated=1, available=True), gpod(0, NEW, ready=True), gpod(1, NEW, ready=True)),
    ], "after_undo": []}
    result, calls = run_wait(tmp_path, scenario, rollout=ROLLOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not patches(calls)


def test_the_first_group_has_nothing_to_go_back_to(tmp_path):
    crashed = {"restartCount": 1, "state": {"running": {}}, "lastState": {"terminated": {"reason": "Error"}}}
    first = snap(group(NEW, updated=1), gpod(0, NEW, engine=crashed), gpod(1, NEW), revisions=[revision(1, NEW)])
    result, calls = run_wait(tmp_path, {"before": [first], "after_undo": []}, rollout=ROLLOUT)
    assert result.returncode == 1 and "no previous release to go back to" in result.stderr
    assert not patches(calls)


def test_a_group_an_earlier_gate_undid_is_refused_at_once(tmp_path):
    back = snap(group(OLD, ready=1, updated=1, available=True), gpod(0, OLD, ready=True), gpod(1, OLD, ready=True),
                revisions=[revision(2, OLDER), revision(3, OLD)])
    result, calls = run_wait(tmp_path, {"before": [back], "after_undo": []}, rollout=ROLLOUT)
    assert result.returncode == 1
    assert f"leaderworkerset {GROUP}'s pod template is on release {OLD}, not {NEW}" in result.stderr
    assert not patches(calls)


def test_the_gate_names_the_group_to_the_wait():
    args = VerificationGateArgs(stack="k8s-test", base_url="unused", api_key="unused", model="kimi-k2.6",
                                engine="vllm", ready_timeout_seconds=30, request_timeout_seconds=30, release=NEW)
    command = verify_command(args, "https://kimi.example.com/v1", ROLLOUT)
    wait = next(step for step in command.split(" && ") if "scripts/await_k8s_rollout.py" in step)
    assert f"--leaderworkerset {GROUP}" in wait and "--deployment" not in wait
