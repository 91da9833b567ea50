#!/usr/bin/env python3
"""Wait until a Kubernetes stack's Deployments run only the new release; undo a rollout that fails
(run by the verification gate before the suite, on the deployer's machine, with kubectl).

    await_k8s_rollout.py --namespace NS [--context CTX] --deployment NAME [--deployment NAME ...] \\
        --release ID --timeout SECONDS --pod-ready-seconds SECONDS --scheduling-grace-seconds SECONDS

Pulumi does not wait for the Deployments (pulumi.com/skipAwait): this script owns the wait, so a bad
release fails `pulumi up` within minutes of the failure, not after the whole deadline. The
Deployment's own history is the rollback: each release is a ReplicaSet whose pod template carries
the release id (kimi-fleet/release), and the previous release's ReplicaSet is still there.

Done (exit 0) when every Deployment's pod template carries the release and all its pods are updated,
available and no other pod is left. Failed, at once, when a pod of the new release:
- has a container that terminated (crashed, OOM-killed, or killed by its startup probe after the
  sizing's window): one start is the pod's whole cold start, a second try doubles the downtime;
- cannot start a container (a bad config or image name), or cannot pull its image for
  PULL_FAILURE_GRACE_SECONDS;
- waits for a node past --scheduling-grace-seconds (no free GPU set: a surge pod on a full cluster);
- is not Ready --pod-ready-seconds after it appeared (pull, startup window and admission);
or the Deployment reports ProgressDeadlineExceeded, or the whole rollout passes --timeout.
Then it prints the pod, its node, the release and the cause with the container's last log lines and
warning events, runs `kubectl rollout undo --to-revision` to the newest ReplicaSet of another
release on every Deployment, waits until that release serves again on every pod and exits 1.
A Deployment whose template is already on another release (an earlier gate undid this one) fails at
once: `pulumi up --refresh` applies the release again.

Kubeconfig: KIMI_KUBECONFIG (a path or the file's content, from the stack's secret `kubeconfig`),
else kubectl's own (KUBECONFIG, ~/.kube/config); --context as the stack's kubeconfigContext.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_fleet.k8s_manifests import RELEASE_ANNOTATION  # noqa: E402

POLL_SECONDS = 15
PROGRESS_SECONDS = 60
#: One kubectl call at most (an API server that does not answer is retried at the next poll).
KUBECTL_TIMEOUT_SECONDS = 60
#: Polls in a row the cluster may not answer before the wait gives up (the rollout is left alone:
#: nothing can be undone through an API server that does not answer).
UNREACHABLE_POLLS = 20
#: A registry hiccup retries on its own; an image that is not there never comes.
PULL_FAILURE_GRACE_SECONDS = 5 * 60
LOG_LINES = 20
EVENT_LINES = 5
REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
#: A container that cannot be created as specified: retrying changes nothing.
START_FAILURES = {"CreateContainerConfigError", "CreateContainerError", "InvalidImageName", "RunContainerError"}
PULL_FAILURES = {"ErrImagePull", "ImagePullBackOff"}


class KubectlError(RuntimeError):
    pass


@dataclass
class Kubectl:
    namespace: str
    context: str | None = None
    kubeconfig: str | None = None
    #: text never printed (the API key, should a log line carry it)
    secrets: tuple[str, ...] = ()

    def argv(self, *args: str) -> list[str]:
        base = ["kubectl"]
        if self.kubeconfig:
            base += ["--kubeconfig", self.kubeconfig]
        if self.context:
            base += ["--context", self.context]
        return [*base, "--namespace", self.namespace, *args]

    def run(self, *args: str) -> str:
        try:
            done = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=KUBECTL_TIMEOUT_SECONDS)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise KubectlError(f"kubectl {' '.join(args[:2])}: {error}") from None
        if done.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args[:2])}: {self.redact(done.stderr.strip())[-500:]}")
        return done.stdout

    def get(self, *args: str) -> dict:
        text = self.run("get", *args, "-o", "json")
        try:
            return json.loads(text)
        except ValueError:
            raise KubectlError(f"kubectl get {' '.join(args)}: not JSON: {text[:200]!r}") from None

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "***")
        return text


def release_of(obj: dict) -> str | None:
    """The release a Deployment's or ReplicaSet's pod template carries, or a pod (from its template)."""
    template = (obj.get("spec") or {}).get("template")
    metadata = template.get("metadata") if template is not None else obj.get("metadata")
    return ((metadata or {}).get("annotations") or {}).get(RELEASE_ANNOTATION)


def selector_of(deployment: dict) -> str:
    labels = deployment["spec"]["selector"]["matchLabels"]
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


@dataclass
class Snapshot:
    deployment: dict
    pods: list[dict]
    replicasets: list[dict]

    @property
    def name(self) -> str:
        return self.deployment["metadata"]["name"]

    def rolled_out(self, release: str) -> bool:
        """Every pod of the Deployment is of this release and available, and no other pod is left."""
        spec, status = self.deployment["spec"], self.deployment.get("status") or {}
        want = spec.get("replicas", 1)
        return (release_of(self.deployment) == release
                and status.get("observedGeneration", 0) >= self.deployment["metadata"].get("generation", 0)
                and status.get("updatedReplicas", 0) == want and status.get("availableReplicas", 0) == want
                and status.get("replicas", 0) == want)

    def deadline_exceeded(self) -> str | None:
        for condition in (self.deployment.get("status") or {}).get("conditions") or []:
            if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
                return f"the Deployment reports ProgressDeadlineExceeded ({condition.get('message', '')})"
        return None

    def previous(self, release: str) -> tuple[int, str] | None:
        """(revision, release) of the newest ReplicaSet of this Deployment on another release."""
        uid = self.deployment["metadata"].get("uid")
        found = []
        for rs in self.replicasets:
            owners = rs["metadata"].get("ownerReferences") or []
            revision = (rs["metadata"].get("annotations") or {}).get(REVISION_ANNOTATION)
            other = release_of(rs)
            if any(o.get("uid") == uid for o in owners) and revision and other and other != release:
                found.append((int(revision), other))
        return max(found) if found else None

    def describe(self, release: str) -> str:
        status = self.deployment.get("status") or {}
        pods = ", ".join(f"{p['metadata']['name']} ({release_of(p) or 'no release'}, {pod_state(p)})"
                         for p in self.pods) or "no pods"
        return (f"deployment {self.name}: {status.get('updatedReplicas', 0)}/{self.deployment['spec'].get('replicas', 1)} "
                f"on release {release}, {status.get('availableReplicas', 0)} available; {pods}")


def read(kubectl: Kubectl, name: str) -> Snapshot:
    deployment = kubectl.get("deployment", name)
    selector = selector_of(deployment)
    pods = kubectl.get("pods", "-l", selector).get("items") or []
    replicasets = kubectl.get("replicasets", "-l", selector).get("items") or []
    return Snapshot(deployment, [p for p in pods if not p["metadata"].get("deletionTimestamp")], replicasets)


def is_ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def pod_state(pod: dict) -> str:
    status = pod.get("status") or {}
    if is_ready(pod):
        return "Ready"
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting:
            return f"{container['name']} {waiting.get('reason', 'waiting')}"
    return status.get("phase", "Pending") + " not Ready"


@dataclass
class Failure:
    pod: str
    node: str
    cause: str
    #: the container whose logs tell why, and whether its previous run is the one that ended
    container: str | None = None
    previous: bool = False


@dataclass
class PodClock:
    """When this script first saw each pod (the deployer's clock: no skew with the API server's)."""
    first_seen: dict[str, float] = field(default_factory=dict)
    pull_failing_since: dict[str, float] = field(default_factory=dict)

    def age(self, pod: dict, now: float) -> float:
        return now - self.first_seen.setdefault(pod["metadata"]["uid"], now)


def pod_failure(pod: dict, now: float, clock: PodClock, args: argparse.Namespace) -> Failure | None:
    """Why a pod of the new release will not serve, or None while it may still."""
    name, status = pod["metadata"]["name"], pod.get("status") or {}
    node = (pod.get("spec") or {}).get("nodeName") or "no node"
    age = clock.age(pod, now)
    if status.get("phase") == "Failed":
        return Failure(name, node, f"the pod failed: {status.get('reason', '')} {status.get('message', '')}".strip())
    # Init containers (a host-path weights download) resume on retry: only the pod's deadline ends them.
    for container in status.get("containerStatuses") or []:
        state, last = container.get("state") or {}, (container.get("lastState") or {}).get("terminated")
        ended = state.get("terminated") or last
        if container.get("restartCount", 0) >= 1 or state.get("terminated"):
            ended = ended or {}
            how = f"{ended.get('reason') or 'terminated'} (exit {ended.get('exitCode', '?')})"
            message = f": {ended['message'].strip()[:300]}" if ended.get("message") else ""
            return Failure(name, node, f"container {container['name']} ended {how}{message}, restarted "
                           f"{container.get('restartCount', 0)} time(s) (a crash, or its startup probe failed "
                           "past the sizing's window: see the events)",
                           container["name"], previous=not state.get("terminated"))
        waiting = state.get("waiting") or {}
        reason = waiting.get("reason")
        key = f"{pod['metadata']['uid']}/{container['name']}"
        if reason in START_FAILURES:
            return Failure(name, node, f"container {container['name']} cannot start: {reason}: "
                           f"{waiting.get('message', '')}".strip())
        if reason in PULL_FAILURES:
            since = clock.pull_failing_since.setdefault(key, now)
            if now - since >= args.pull_failure_grace_seconds:
                return Failure(name, node, f"container {container['name']} image pull failing for "
                               f"{now - since:.0f} s: {reason}: {waiting.get('message', '')}".strip())
        else:
            clock.pull_failing_since.pop(key, None)
    for condition in status.get("conditions") or []:
        if (condition.get("type") == "PodScheduled" and condition.get("status") == "False"
                and age >= args.scheduling_grace_seconds):
            return Failure(name, node, f"not scheduled after {age:.0f} s: {condition.get('reason', '')}: "
                           f"{condition.get('message', '')} (a surge pod needs a free GPU set: add a node or use "
                           "capacity.rollout: one-at-a-time)")
    if not is_ready(pod) and age >= args.pod_ready_seconds:
        return Failure(name, node, f"not Ready {age:.0f} s after it appeared ({pod_state(pod)}; the window is the "
                       "image pull, the sizing's startup window and the admission suite)", "admission")
    return None


def evidence(kubectl: Kubectl, failure: Failure) -> list[str]:
    """The container's last log lines and the pod's last warning events (best effort)."""
    lines = []
    if failure.container:
        args = ["logs", failure.pod, "-c", failure.container, f"--tail={LOG_LINES}"]
        if failure.previous:
            args.append("--previous")
        try:
            logs = kubectl.run(*args).splitlines()[-LOG_LINES:]
            lines.append(f"last {len(logs)} log line(s) of {failure.pod}/{failure.container}"
                         f"{' (its previous run)' if failure.previous else ''}:")
            lines += [f"  | {kubectl.redact(line)}" for line in logs]
        except KubectlError as error:
            lines.append(f"no logs of {failure.pod}/{failure.container}: {error}")
    try:
        events = kubectl.get("events", "--field-selector", f"involvedObject.name={failure.pod}").get("items") or []
        warnings = [e for e in events if e.get("type") == "Warning"][-EVENT_LINES:]
        if warnings:
            lines.append(f"warning events of {failure.pod}:")
            lines += [f"  | {e.get('reason', '')}: {kubectl.redact(e.get('message', ''))}" for e in warnings]
    except KubectlError as error:
        lines.append(f"no events of {failure.pod}: {error}")
    return lines


def undo(kubectl: Kubectl, args: argparse.Namespace, snapshots: dict[str, Snapshot], cause: str, *,
         sleep=time.sleep, clock=time.monotonic) -> int:
    """Put every Deployment back on its newest ReplicaSet of another release, wait until that release
    serves on every pod, and fail naming the release and the cause."""
    release = args.release
    targets: dict[str, tuple[int, str]] = {}
    for name, snapshot in snapshots.items():
        previous = snapshot.previous(release)
        if previous is None:
            print(f"k8s: release {release} failed: {cause}; deployment {name} has no previous release to go back "
                  "to (the stack's first deploy): it stays on the failed release; fix the stack and `pulumi up`",
                  file=sys.stderr)
            continue
        targets[name] = previous
        revision, old = previous
        try:
            kubectl.run("rollout", "undo", f"deployment/{name}", f"--to-revision={revision}")
        except KubectlError as error:
            print(f"k8s: release {release}: rollout undo of deployment {name} to revision {revision} refused: "
                  f"{error}; undo it by hand: kubectl -n {args.namespace} rollout undo deployment/{name} "
                  f"--to-revision={revision}", file=sys.stderr)
            return 1
        print(f"k8s: release {release} failed; deployment {name} undone to revision {revision} (release {old}), "
              "waiting until it serves again", file=sys.stderr, flush=True)
    if not targets:
        return 1
    deadline = clock() + args.timeout
    last_line = clock()
    while True:
        try:
            current = {name: read(kubectl, name) for name in targets}
        except KubectlError as error:
            current = None
            print(f"k8s: release {release}: cannot read the cluster during the undo: {error}", file=sys.stderr)
        if current and all(current[name].rolled_out(old) for name, (_, old) in targets.items()):
            back = ", ".join(f"deployment {name} on release {old}" for name, (_, old) in targets.items())
            print(f"k8s: release {release} rolled back: {cause}; {back} serves again on every pod; fix the stack "
                  "and `pulumi up`", file=sys.stderr)
            return 1
        if clock() >= deadline:
            state = "; ".join(current[name].describe(old) for name, (_, old) in targets.items()) if current else \
                "the cluster does not answer"
            print(f"k8s: release {release}: {cause}; the undo did not bring the previous release back within "
                  f"{args.timeout:.0f} s: {state}; see kubectl -n {args.namespace} rollout status", file=sys.stderr)
            return 1
        if clock() - last_line >= PROGRESS_SECONDS and current:
            print("k8s: undoing: " + "; ".join(current[n].describe(old) for n, (_, old) in targets.items()),
                  file=sys.stderr, flush=True)
            last_line = clock()
        sleep(args.poll)


def wait(kubectl: Kubectl, args: argparse.Namespace, *, sleep=time.sleep, clock=time.monotonic) -> int:
    release = args.release
    start = clock()
    pods = PodClock()
    unreachable = 0
    last_line: float | None = None
    snapshots: dict[str, Snapshot] = {}
    while True:
        try:
            snapshots = {name: read(kubectl, name) for name in args.deployments}
            unreachable = 0
        except KubectlError as error:
            unreachable += 1
            if unreachable >= UNREACHABLE_POLLS:
                print(f"k8s: release {release}: the cluster did not answer {unreachable} times in a row: {error}; "
                      "the rollout is left as it is: check the kubeconfig context and `pulumi up` again",
                      file=sys.stderr)
                return 1
            sleep(args.poll)
            continue
        for name, snapshot in snapshots.items():
            other = release_of(snapshot.deployment)
            if other != release:
                print(f"k8s: release {release} refused: deployment {name}'s pod template is on release {other}, not "
                      f"{release}: an earlier gate undid it after a failure (see that run) or someone changed the "
                      "Deployment; fix the stack and `pulumi up`, or `pulumi up --refresh` to apply it again",
                      file=sys.stderr)
                return 1
        if all(snapshot.rolled_out(release) for snapshot in snapshots.values()):
            print(f"k8s: release {release} on every pod: " + "; ".join(s.describe(release) for s in snapshots.values()),
                  flush=True)
            return 0
        now = clock()
        failure = cause = None
        for snapshot in snapshots.values():
            for pod in snapshot.pods:
                if release_of(pod) == release:
                    failure = pod_failure(pod, now, pods, args)
                    if failure:
                        break
            cause = failure and (f"pod {failure.pod} on node {failure.node} (deployment {snapshot.name}): "
                                 f"{failure.cause}")
            cause = cause or snapshot.deadline_exceeded()
            if cause:
                break
        if not cause and now - start >= args.timeout:
            cause = (f"not on every pod within {args.timeout:.0f} s: "
                     + "; ".join(s.describe(release) for s in snapshots.values()))
        if cause:
            print(f"k8s: release {release} failed: {kubectl.redact(cause)}", file=sys.stderr, flush=True)
            if failure:
                for line in evidence(kubectl, failure):
                    print(line, file=sys.stderr)
            return undo(kubectl, args, snapshots, kubectl.redact(cause), sleep=sleep, clock=clock)
        if last_line is None or now - last_line >= PROGRESS_SECONDS:
            print(f"k8s: waiting for release {release}: " + "; ".join(s.describe(release) for s in snapshots.values()),
                  flush=True)
            last_line = now
        sleep(args.poll)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--context", help="the kubeconfig context (default: the current one)")
    parser.add_argument("--deployment", dest="deployments", action="append", required=True)
    parser.add_argument("--release", required=True)
    parser.add_argument("--timeout", type=float, required=True, help="seconds for the whole rollout (and the undo)")
    parser.add_argument("--pod-ready-seconds", type=float, required=True,
                        help="seconds a new pod may take from appearing to Ready")
    parser.add_argument("--scheduling-grace-seconds", type=float, required=True,
                        help="seconds a new pod may wait for a node")
    parser.add_argument("--pull-failure-grace-seconds", type=float, default=PULL_FAILURE_GRACE_SECONDS)
    parser.add_argument("--poll", type=float, default=POLL_SECONDS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def kubeconfig_file(value: str | None, scratch: Path) -> str | None:
    """A path kubectl can read: the secret may hold a path or the kubeconfig itself."""
    if not value:
        return None
    if "\n" not in value and Path(value).expanduser().is_file():
        return str(Path(value).expanduser())
    path = scratch / "kubeconfig"
    path.touch(mode=0o600)
    path.write_text(value)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kimi-k8s-") as scratch:
        kubectl = Kubectl(args.namespace, args.context or None,
                          kubeconfig_file(os.environ.get("KIMI_KUBECONFIG"), Path(scratch)),
                          secrets=(os.environ.get("KIMI_API_KEY", ""),))
        return wait(kubectl, args)


if __name__ == "__main__":
    sys.exit(main())
