"""The gate's Kubernetes rollout wait (scripts/await_k8s_rollout.py), run for real as the gate runs
it, against a stubbed kubectl on PATH that records its calls and answers with scripted cluster
states (tests/fakes/kubectl_stub.py): a good rollout passes without an undo; a failing one ends with
`kubectl rollout undo` to the previous release, waits until it serves again, and exits 1 naming the
release, the pod, its node and the cause."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from components.verification_gate import VerificationGateArgs, k8s_rollout_argv, verify_command
from kimi_fleet import k8s_manifests as manifests
from kimi_fleet.stackfile import PROJECT_ROOT

pytestmark = pytest.mark.timeout(120)

NEW, OLD, OLDER = "a" * 16, "b" * 16, "c" * 16
DEPLOYMENT = "kimi-engine-on-demand"
NODE = "gpu-node-7"
API_KEY = "sk-test-not-a-real-key-0123456789"
SELECTOR = {"app.kubernetes.io/instance": "gb200-int4-vllm", "app.kubernetes.io/component": "engine"}
STUB = PROJECT_ROOT / "tests" / "fakes" / "kubectl_stub.py"
#: What the gate passes for gb200 (k8s_manifests.rollout_wait), with windows a test can reach.
ROLLOUT = {"kind": "kubernetes", "namespace": "kimi-gb200", "context": "gpu-cluster", "deployments": [DEPLOYMENT],
           "timeout_seconds": 30, "pod_ready_seconds": 30, "scheduling_grace_seconds": 30}


def deployment(release: str, *, updated: int = 0, available: int = 0, replicas: int = 1, want: int = 1,
               deadline_exceeded: bool = False) -> dict:
    conditions = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                   "message": f'ReplicaSet "{DEPLOYMENT}-new" has timed out progressing.'}] if deadline_exceeded else []
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": DEPLOYMENT, "namespace": "kimi-gb200", "uid": "deployment-uid", "generation": 5},
        "spec": {"replicas": want, "selector": {"matchLabels": SELECTOR},
                 "template": {"metadata": {"labels": SELECTOR,
                                           "annotations": {manifests.RELEASE_ANNOTATION: release}}}},
        "status": {"observedGeneration": 5, "replicas": replicas, "updatedReplicas": updated,
                   "availableReplicas": available, "readyReplicas": available, "conditions": conditions},
    }


def replicaset(revision: int, release: str) -> dict:
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": f"{DEPLOYMENT}-{release[:6]}", "uid": f"rs-{revision}",
                         "annotations": {"deployment.kubernetes.io/revision": str(revision)},
                         "ownerReferences": [{"kind": "Deployment", "name": DEPLOYMENT, "uid": "deployment-uid"}]},
            "spec": {"template": {"metadata": {"annotations": {manifests.RELEASE_ANNOTATION: release}}}}}


HISTORY = [replicaset(2, OLDER), replicaset(3, OLD), replicaset(4, NEW)]


def pod(name: str, release: str, *, ready: bool = False, engine: dict | None = None,
        scheduled: dict | None = None) -> dict:
    engine = engine or {"restartCount": 0, "state": {"running": {}}}
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if scheduled:
        conditions.append({"type": "PodScheduled", "status": "False", **scheduled})
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "uid": f"uid-{name}", "labels": SELECTOR,
                     "annotations": {manifests.RELEASE_ANNOTATION: release}},
        "spec": {"nodeName": None if scheduled else NODE},
        "status": {"phase": "Pending" if scheduled else "Running", "conditions": conditions,
                   "containerStatuses": [] if scheduled else [
                       {"name": "engine", **engine},
                       {"name": "proxy", "restartCount": 0, "state": {"running": {}}},
                       {"name": "admission", "restartCount": 0, "state": {"running": {}}}]},
    }


def snapshot(dep: dict, *pods: dict) -> dict:
    return {"deployments": {DEPLOYMENT: dep}, "pods": list(pods), "replicasets": HISTORY}


#: The previous release back on its pod after the undo: loading first, then serving.
RESTORED = [snapshot(deployment(OLD, replicas=1), pod("engine-old-2", OLD)),
            snapshot(deployment(OLD, updated=1, available=1), pod("engine-old-2", OLD, ready=True))]


def run_wait(tmp_path: Path, scenario: dict, *, rollout: dict | None = None, env: dict | None = None,
             release: str = NEW, extra: list[str] = ()) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """The gate's own argv for the wait (verification_gate.k8s_rollout_argv), with kubectl stubbed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(STUB))} \"$@\"\n")
    kubectl.chmod(0o755)
    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    calls = tmp_path / "calls.jsonl"
    args = VerificationGateArgs(stack="k8s-test", base_url="unused", api_key="unused", model="kimi-k2.6",
                                engine="vllm", ready_timeout_seconds=30, request_timeout_seconds=30, release=release)
    argv = k8s_rollout_argv(args, rollout or ROLLOUT) + ["--poll", "0.01", *extra]
    result = subprocess.run(
        argv, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=90,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "KUBECTL_SCENARIO": str(tmp_path / "scenario.json"),
             "KUBECTL_CALLS": str(calls), "KIMI_API_KEY": API_KEY, **(env or {})})
    recorded = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return result, recorded


def verbs(calls: list[list[str]]) -> list[list[str]]:
    """The calls without kubectl's global flags."""
    out = []
    for call in calls:
        rest, skip = [], False
        for arg in call:
            if skip:
                skip = False
            elif arg in ("--kubeconfig", "--context", "--namespace"):
                skip = True
            else:
                rest.append(arg)
        out.append(rest)
    return out


def undo_calls(calls):
    return [c for c in verbs(calls) if c[:2] == ["rollout", "undo"]]


def test_a_good_rollout_passes_without_an_undo(tmp_path):
    # one-at-a-time on one pod: the old pod goes, the new one loads, then serves.
    scenario = {"before": [
        snapshot(deployment(NEW, replicas=1), pod("engine-old", OLD, ready=True)),
        snapshot(deployment(NEW, updated=1, replicas=1), pod("engine-new", NEW)),
        snapshot(deployment(NEW, updated=1, replicas=1), pod("engine-new", NEW)),
        snapshot(deployment(NEW, updated=1, available=1), pod("engine-new", NEW, ready=True)),
    ], "after_undo": []}
    result, calls = run_wait(tmp_path, scenario)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"release {NEW} on every pod" in result.stdout
    assert not undo_calls(calls)
    # Every call went to the stack's context and namespace.
    assert all(call[call.index("--context") + 1] == "gpu-cluster" and
               call[call.index("--namespace") + 1] == "kimi-gb200" for call in calls)


def test_a_crash_looping_pod_is_undone_to_the_previous_release(tmp_path):
    crashed = {"restartCount": 1,
               "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s restarting"}},
               "lastState": {"terminated": {"reason": "Error", "exitCode": 1}}}
    scenario = {
        "before": [snapshot(deployment(NEW, updated=1, replicas=1), pod("engine-new", NEW)),
                   snapshot(deployment(NEW, updated=1, replicas=1), pod("engine-new", NEW, engine=crashed))],
        "after_undo": RESTORED,
        "logs": {"engine-new/engine/previous": f"loading shards\ntorch.OutOfMemoryError: CUDA out of memory\n"
                                               f"api key was {API_KEY}\n"},
        "events": {"engine-new": [{"type": "Normal", "reason": "Pulled", "message": "image pulled"},
                                  {"type": "Warning", "reason": "BackOff", "message": "Back-off restarting"}]},
    }
    result, calls = run_wait(tmp_path, scenario)
    assert result.returncode == 1, result.stdout + result.stderr
    # Undone to the newest ReplicaSet of another release (revision 3: OLD), not merely "the one before".
    assert undo_calls(calls) == [["rollout", "undo", f"deployment/{DEPLOYMENT}", "--to-revision=3"]]
    err = result.stderr
    first = next(line for line in err.splitlines() if "failed:" in line)
    assert f"release {NEW} failed" in first and "pod engine-new" in first and f"node {NODE}" in first
    assert "container engine ended Error (exit 1)" in first
    # The container's last log lines (its previous run: the one that ended) and warning events.
    assert ["logs", "engine-new", "-c", "engine", "--tail=20", "--previous"] in verbs(calls)
    assert "torch.OutOfMemoryError: CUDA out of memory" in err and "BackOff: Back-off restarting" in err
    assert "image pulled" not in err  # only warnings
    assert API_KEY not in err + result.stdout
    # It waited until the previous release served again before failing.
    assert "rolled back" in err.splitlines()[-1] and f"on release {OLD} serves again" in err.splitlines()[-1]
    assert len([c for c in verbs(calls) if c[:2] == ["get", "deployment"]]) >= 2 + len(RESTORED)


def test_a_pod_killed_by_its_startup_probe_fails_at_once(tmp_path):
    killed = {"restartCount": 1, "state": {"running": {}},
              "lastState": {"terminated": {"reason": "Error", "exitCode": 137}}}
    scenario = {"before": [snapshot(deployment(NEW, updated=1, replicas=1), pod("engine-new", NEW, engine=killed))],
                "after_undo": RESTORED, "logs": {"engine-new/engine/previous": "Loading safetensors 40/64\n"},
                "events": {"engine-new": [{"type": "Warning", "reason": "Unhealthy",
                                           "message": "Startup probe failed: generation probe: TimeoutError"}]}}
    result, calls = run_wait(tmp_path, scenario)
    assert result.returncode == 1
    assert "ended Error (exit 137)" in result.stderr and "Startup probe failed" in result.stderr
    assert undo_calls(calls)


def test_a_surge_pod_with_no_free_gpus_fails_after_the_scheduling_grace(tmp_path):
    unschedulable = {"reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}
    scenario = {"before": [snapshot(deployment(NEW, updated=1, available=1, replicas=2),
                                    pod("engine-old", OLD, ready=True), pod("engine-new", NEW, scheduled=unschedulable))],
                "after_undo": RESTORED}
    result, calls = run_wait(tmp_path, scenario, rollout={**ROLLOUT, "scheduling_grace_seconds": 0})
    assert result.returncode == 1
    assert "not scheduled" in result.stderr and "Insufficient nvidia.com/gpu" in result.stderr
    assert "pod engine-new on node no node" in result.stderr  # never placed
    assert undo_calls(calls)


def test_a_pod_that_never_gets_ready_fails_after_its_window_with_the_admission_logs(tmp_path):
    scenario = {"before": [snapshot(deployment(NEW, updated=1, replicas=1), pod("engine-new", NEW))],
                "after_undo": RESTORED, "logs": {"engine-new/admission": "suite: tool_call FAILED\n"}}
    result, calls = run_wait(tmp_path, scenario, rollout={**ROLLOUT, "pod_ready_seconds": 0.2})
    assert result.returncode == 1
    assert "not Ready" in result.stderr and "suite: tool_call FAILED" in result.stderr
    assert undo_calls(calls)


def test_progress_deadline_exceeded_is_a_failed_rollout(tmp_path):
    scenario = {"before": [snapshot(deployment(NEW, updated=1, replicas=1, deadline_exceeded=True),
                                    pod("engine-new", NEW))], "after_undo": RESTORED}
    result, calls = run_wait(tmp_path, scenario)
    assert result.returncode == 1 and "ProgressDeadlineExceeded" in result.stderr
    assert undo_calls(calls)


def test_a_rollout_past_its_deadline_is_undone(tmp_path):
    scenario = {"before": [snapshot(deployment(NEW, updated=1, replicas=1), pod("engine-new", NEW))],
                "after_undo": RESTORED}
    result, calls = run_wait(tmp_path, scenario, rollout={**ROLLOUT, "timeout_seconds": 0.3})
    assert result.returncode == 1 and "not on every pod within" in result.stderr
    assert undo_calls(calls)


def test_an_undo_that_does_not_come_back_says_so(tmp_path):
    crashed = {"restartCount": 2, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
               "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}
    stuck = snapshot(deployment(OLD, replicas=1), pod("engine-old-2", OLD))
    scenario = {"before": [snapshot(deployment(NEW, updated=1, replicas=1), pod("engine-new", NEW, engine=crashed))],
                "after_undo": [stuck]}
    result, calls = run_wait(tmp_path, scenario, rollout={**ROLLOUT, "timeout_seconds": 0.5})
    assert result.returncode == 1
    assert "OOMKilled" in result.stderr and "the undo did not bring the previous release back" in result.stderr


def test_the_first_release_has_nothing_to_go_back_to(tmp_path):
    crashed = {"restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
               "lastState": {"terminated": {"reason": "Error", "exitCode": 2}}}
    first = snapshot(deployment(NEW, updated=1, replicas=1), pod("engine-new", NEW, engine=crashed))
    first["replicasets"] = [replicaset(1, NEW)]
    result, calls = run_wait(tmp_path, {"before": [first], "after_undo": []})
    assert result.returncode == 1
    assert "no previous release to go back to" in result.stderr
    assert not undo_calls(calls)


def test_a_release_an_earlier_gate_undid_is_refused_at_once(tmp_path):
    """The gate failed and undid NEW; a plain `pulumi up` runs the gate again while the Deployment
    serves OLD: waiting would only time out."""
    scenario = {"before": [snapshot(deployment(OLD, updated=1, available=1), pod("engine-old", OLD, ready=True))],
                "after_undo": []}
    result, calls = run_wait(tmp_path, scenario)
    assert result.returncode == 1
    assert f"on release {OLD}, not {NEW}" in result.stderr and "pulumi up --refresh" in result.stderr
    assert not undo_calls(calls)


def test_an_image_that_cannot_be_pulled_fails_after_the_pull_grace(tmp_path):
    pulling = {"restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff",
                                                        "message": "manifest unknown: vllm/vllm-openai:v9.9.9"}}}
    scenario = {"before": [snapshot(deployment(NEW, updated=1, replicas=1), pod("engine-new", NEW, engine=pulling))],
                "after_undo": RESTORED}
    # Within the grace a pull failure is a registry hiccup that retries: only the deadline ends it.
    (tmp_path / "in-grace").mkdir()
    result, _ = run_wait(tmp_path / "in-grace", scenario, rollout={**ROLLOUT, "timeout_seconds": 0.3})
    assert result.returncode == 1 and "not on every pod within" in result.stderr
    assert "image pull failing" not in result.stderr
    result, calls = run_wait(tmp_path, scenario, extra=["--pull-failure-grace-seconds", "0"])
    assert result.returncode == 1
    assert "image pull failing" in result.stderr and "manifest unknown" in result.stderr
    assert undo_calls(calls)


def test_the_kubeconfig_secret_reaches_kubectl_as_a_private_file(tmp_path):
    content = "apiVersion: v1\nkind: Config\nclusters: []\n"
    scenario = {"before": [snapshot(deployment(NEW, updated=1, available=1), pod("engine-new", NEW, ready=True))],
                "after_undo": []}
    result, calls = run_wait(tmp_path, scenario, env={"KIMI_KUBECONFIG": content})
    assert result.returncode == 0, result.stderr
    paths = {call[call.index("--kubeconfig") + 1] for call in calls}
    assert len(paths) == 1
    (path,) = paths
    assert not Path(path).exists()  # removed when the wait ends
    assert content not in result.stdout + result.stderr


def test_the_gate_waits_for_the_k8s_rollout_before_the_suite():
    args = VerificationGateArgs(stack="k8s-test", base_url="unused", api_key="unused", model="kimi-k2.6",
                                engine="vllm", ready_timeout_seconds=30, request_timeout_seconds=30, release=NEW)
    command = verify_command(args, "https://kimi.example.com/v1", ROLLOUT)
    steps = command.split(" && ")
    wait = next(i for i, step in enumerate(steps) if "scripts/await_k8s_rollout.py" in step)
    suite = next(i for i, step in enumerate(steps) if "scripts/verify.py" in step)
    assert wait < suite
    assert "await_fleet_release" not in command
    assert f"--release {NEW}" in steps[wait] and f"--deployment {DEPLOYMENT}" in steps[wait]
