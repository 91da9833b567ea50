#!/usr/bin/env python3
"""Wait until a Kubernetes stack's Deployments (or its LeaderWorkerSet) run only the new release;
undo a rollout that fails (run by the verification gate before the suite, on the deployer's machine,
with kubectl).

    await_k8s_rollout.py --namespace NS [--context CTX] --deployment NAME [--deployment NAME ...] \\
        --release ID --timeout SECONDS --pod-ready-seconds SECONDS --scheduling-grace-seconds SECONDS
    await_k8s_rollout.py ... --leaderworkerset NAME ...   (a replica over several nodes)

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

A LeaderWorkerSet (one group of pods, one per node, recreated whole when one of its containers
restarts: RecreateGroupOnPodRestart) is done when its template carries the release, the controller
reports every group ready and updated (status.readyReplicas, updatedReplicas, replicas, condition
Available) and every pod of it is of the release and Ready. It fails at once, beyond the pod causes
above, when a rank's fabric check reports TCP sockets (the fabric container's readiness message in
the pod's events names the rank) or when a pod of the new group is deleted or replaced (the group was
recreated: a container restarted, a pod was evicted). Its undo puts the template of the newest
ControllerRevision of another release back (LWS keeps the previous one until a rollout completes).

Kubeconfig: KIMI_KUBECONFIG (a path or the file's content, from the stack's secret `kubeconfig`),
else kubectl's own (KUBECONFIG, ~/.kube/config); --context as the stack's kubeconfigContext.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_fleet.k8s_manifests import (  # noqa: E402
    LWS_GROUP_INDEX_LABEL, LWS_NAME_LABEL, LWS_WORKER_INDEX_LABEL, RELEASE_ANNOTATION,
)

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
LWS_RESOURCE = "leaderworkersets.leaderworkerset.x-k8s.io"
#: fabric_check.py's verdict for a rank on sockets, as the kubelet quotes it in the probe's event.
SOCKET_VERDICT = re.compile(r"rank (\d+): NCCL runs over TCP sockets[^\n]*")
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


class Workload:
    """What one read of a workload gives the wait: its kind, name and label (the message's words)."""
    kind = ""
    workload: dict  # the object itself (a Deployment's is its `deployment`)

    @property
    def name(self) -> str:
        return self.workload["metadata"]["name"]

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass
class Snapshot(Workload):
    deployment: dict
    pods: list[dict]
    replicasets: list[dict]
    kind = "deployment"

    @property
    def workload(self) -> dict:
        return self.deployment

    @property
    def release(self) -> str | None:
        return release_of(self.deployment)

    def new_pods(self, release: str) -> list[dict]:
        """The pods whose failure fails the release."""
        return [p for p in self.pods if release_of(p) == release]

    def undo(self, kubectl: Kubectl, revision: int) -> str:
        """Put the workload back on `revision`; the command an operator would run by hand."""
        kubectl.run("rollout", "undo", f"deployment/{self.name}", f"--to-revision={revision}")
        return f"rollout undo deployment/{self.name} --to-revision={revision}"

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


def group_release(lws: dict) -> str | None:
    """The release a LeaderWorkerSet's (or one of its ControllerRevisions') leader template carries."""
    template = ((lws.get("spec") or {}).get("leaderWorkerTemplate") or {}).get("leaderTemplate") or {}
    return ((template.get("metadata") or {}).get("annotations") or {}).get(RELEASE_ANNOTATION)


def _plain(value):
    """A ControllerRevision's template as the API takes it back: no strategic-merge directives, no nulls."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items() if key != "$patch" and item is not None}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


@dataclass
class GroupSnapshot(Workload):
    """A LeaderWorkerSet, every pod of it (terminating ones too: a group being recreated is a
    failure) and its ControllerRevisions (the previous release's template, for the undo)."""
    workload: dict  # the LeaderWorkerSet
    pods: list[dict]
    revisions: list[dict]
    kind = "leaderworkerset"

    @property
    def release(self) -> str | None:
        return group_release(self.workload)

    @property
    def want(self) -> int:
        return self.workload["spec"].get("replicas", 1)

    def live(self) -> list[dict]:
        return [p for p in self.pods if not p["metadata"].get("deletionTimestamp")]

    def new_pods(self, release: str) -> list[dict]:
        """The release's pods of the groups that stay (a surge group above spec.replicas goes at the end)."""
        return [p for p in self.pods if release_of(p) == release
                and int((p["metadata"].get("labels") or {}).get(LWS_GROUP_INDEX_LABEL, 0)) < self.want]

    def rolled_out(self, release: str) -> bool:
        status = self.workload.get("status") or {}
        size = self.workload["spec"]["leaderWorkerTemplate"].get("size", 1)
        available = any(c.get("type") == "Available" and c.get("status") == "True"
                        for c in status.get("conditions") or [])
        live = self.live()
        return (self.release == release and available
                and status.get("observedGeneration", 0) >= self.workload["metadata"].get("generation", 0)
                and status.get("readyReplicas", 0) == status.get("updatedReplicas", 0) == self.want
                and status.get("replicas", 0) == self.want and len(live) == self.want * size
                and all(release_of(p) == release and is_ready(p) for p in live))

    def deadline_exceeded(self) -> str | None:
        return None  # LWS has no progress deadline: the wait's own windows apply

    def previous(self, release: str) -> tuple[int, str] | None:
        found = [(int(rev.get("revision", 0)), other) for rev in self.revisions
                 if (other := group_release(rev.get("data") or {})) and other != release]
        return max(found) if found else None

    def undo(self, kubectl: Kubectl, revision: int) -> str:
        (data,) = [rev["data"] for rev in self.revisions if int(rev.get("revision", 0)) == revision]
        template = _plain(data["spec"]["leaderWorkerTemplate"])
        patch = json.dumps([{"op": "replace", "path": "/spec/leaderWorkerTemplate", "value": template}])
        kubectl.run("patch", LWS_RESOURCE, self.name, "--type", "json", "-p", patch)
        return (f"patch {LWS_RESOURCE} {self.name} --type json with the leaderWorkerTemplate of ControllerRevision "
                f"revision {revision} (kubectl get controllerrevisions -l {LWS_NAME_LABEL}={self.name})")

    def describe(self, release: str) -> str:
        status = self.workload.get("status") or {}
        pods = ", ".join(f"{p['metadata']['name']} (rank {rank_of(p)}, {release_of(p) or 'no release'}, "
                         f"{'terminating' if p['metadata'].get('deletionTimestamp') else pod_state(p)})"
                         for p in self.pods) or "no pods"
        return (f"leaderworkerset {self.name}: {status.get('updatedReplicas', 0)}/{self.want} group(s) on release "
                f"{release}, {status.get('readyReplicas', 0)} ready; {pods}")


def rank_of(pod: dict) -> str:
    return (pod["metadata"].get("labels") or {}).get(LWS_WORKER_INDEX_LABEL, "?")


def read_group(kubectl: Kubectl, name: str) -> GroupSnapshot:
    lws = kubectl.get(LWS_RESOURCE, name)
    pods = kubectl.get("pods", "-l", f"{LWS_NAME_LABEL}={name}").get("items") or []
    revisions = kubectl.get("controllerrevisions", "-l", f"{LWS_NAME_LABEL}={name}").get("items") or []
    return GroupSnapshot(lws, pods, revisions)


def read(kubectl: Kubectl, name: str) -> Snapshot:
    deployment = kubectl.get("deployment", name)
    selector = selector_of(deployment)
    pods = kubectl.get("pods", "-l", selector).get("items") or []
    replicasets = kubectl.get("replicasets", "-l", selector).get("items") or []
    return Snapshot(deployment, [p for p in pods if not p["metadata"].get("deletionTimestamp")], replicasets)


def read_all(kubectl: Kubectl, workloads: list[tuple[str, str]]) -> dict[tuple[str, str], Snapshot | GroupSnapshot]:
    return {(kind, name): (read_group if kind == GroupSnapshot.kind else read)(kubectl, name)
            for kind, name in workloads}


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


def group_failure(kubectl: Kubectl, snapshot: GroupSnapshot, release: str, seen: dict[str, str]) -> Failure | None:
    """Why a LeaderWorkerSet's new group will not serve, beyond one pod's own causes: a pod of it
    deleted or replaced (the group is being recreated), or a rank whose fabric check found TCP
    sockets (its readiness probe's message in the pod's events; it would never be Ready)."""
    pods = snapshot.new_pods(release)
    current = {p["metadata"]["name"]: p for p in pods}
    for name, uid in seen.items():
        pod = current.get(name)
        if pod is not None and pod["metadata"].get("uid") == uid and not pod["metadata"].get("deletionTimestamp"):
            continue
        how = "is gone" if pod is None else (
            "is being deleted" if pod["metadata"].get("deletionTimestamp") else "was replaced by a new pod")
        node = ((pod or {}).get("spec") or {}).get("nodeName") or "no node"
        return Failure(name, node, f"pod {name} of the new group {how}: the LeaderWorkerSet recreates the whole group "
                       "when a container of one of its pods restarts or a pod is deleted or evicted "
                       "(RecreateGroupOnPodRestart); a second start costs the group's whole cold start again",
                       "engine" if pod is not None else None)
    for pod in pods:
        if not pod["metadata"].get("deletionTimestamp"):
            seen.setdefault(pod["metadata"]["name"], pod["metadata"]["uid"])
    for pod in pods:
        if is_ready(pod) or pod["metadata"].get("deletionTimestamp"):
            continue
        name, uid = pod["metadata"]["name"], pod["metadata"].get("uid")
        events = kubectl.get("events", "--field-selector", f"involvedObject.name={name}").get("items") or []
        for event in events:
            involved = (event.get("involvedObject") or {}).get("uid")
            if involved and involved != uid:  # an earlier pod of the same name (an earlier release's group)
                continue
            if verdict := SOCKET_VERDICT.search(event.get("message", "")):
                node = (pod.get("spec") or {}).get("nodeName") or "no node"
                return Failure(name, node, f"rank {verdict.group(1)}'s collectives run over TCP sockets, not the "
                               f"fabric (its fabric check: {verdict.group(0)})", "fabric")
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


def undo(kubectl: Kubectl, args: argparse.Namespace, snapshots: dict[tuple[str, str], Snapshot | GroupSnapshot],
         cause: str, *, sleep=time.sleep, clock=time.monotonic) -> int:
    """Put every Deployment back on its newest ReplicaSet of another release (a LeaderWorkerSet on its
    newest ControllerRevision of another), wait until that release serves on every pod, and fail
    naming the release and the cause."""
    release = args.release
    targets: dict[tuple[str, str], tuple[int, str]] = {}
    labels = {key: snapshot.label for key, snapshot in snapshots.items()}
    for key, snapshot in snapshots.items():
        previous = snapshot.previous(release)
        if previous is None:
            print(f"k8s: release {release} failed: {cause}; {snapshot.label} has no previous release to go back "
                  "to (the stack's first deploy): it stays on the failed release; fix the stack and `pulumi up`",
                  file=sys.stderr)
            continue
        targets[key] = previous
        revision, old = previous
        try:
            snapshot.undo(kubectl, revision)
        except KubectlError as error:
            by_hand = (f"kubectl -n {args.namespace} rollout undo deployment/{snapshot.name} --to-revision={revision}"
                       if snapshot.kind == Snapshot.kind else
                       f"kubectl -n {args.namespace} get controllerrevisions -l {LWS_NAME_LABEL}={snapshot.name} "
                       f"-o yaml, and put revision {revision}'s leaderWorkerTemplate back")
            print(f"k8s: release {release}: the undo of {snapshot.label} to revision {revision} was refused: "
                  f"{error}; undo it by hand: {by_hand}", file=sys.stderr)
            return 1
        print(f"k8s: release {release} failed; {snapshot.label} undone to revision {revision} (release {old}), "
              "waiting until it serves again", file=sys.stderr, flush=True)
    if not targets:
        return 1
    deadline = clock() + args.timeout
    last_line = clock()
    while True:
        try:
            current = read_all(kubectl, list(targets))
        except KubectlError as error:
            current = None
            print(f"k8s: release {release}: cannot read the cluster during the undo: {error}", file=sys.stderr)
        if current and all(current[name].rolled_out(old) for name, (_, old) in targets.items()):
            back = ", ".join(f"{labels[name]} on release {old}" for name, (_, old) in targets.items())
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
    snapshots: dict[tuple[str, str], Snapshot | GroupSnapshot] = {}
    workloads = [(Snapshot.kind, name) for name in args.deployments] + [
        (GroupSnapshot.kind, name) for name in args.leaderworkersets]
    group_pods: dict[str, dict[str, str]] = {name: {} for name in args.leaderworkersets}
    while True:
        try:
            snapshots = read_all(kubectl, workloads)
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
        for snapshot in snapshots.values():
            other = snapshot.release
            if other != release:
                print(f"k8s: release {release} refused: {snapshot.label}'s pod template is on release {other}, not "
                      f"{release}: an earlier gate undid it after a failure (see that run) or someone changed the "
                      f"{'Deployment' if snapshot.kind == Snapshot.kind else 'LeaderWorkerSet'}; fix the stack and "
                      "`pulumi up`, or `pulumi up --refresh` to apply it again", file=sys.stderr)
                return 1
        if all(snapshot.rolled_out(release) for snapshot in snapshots.values()):
            print(f"k8s: release {release} on every pod: " + "; ".join(s.describe(release) for s in snapshots.values()),
                  flush=True)
            return 0
        now = clock()
        failure = cause = None
        for snapshot in snapshots.values():
            for pod in snapshot.new_pods(release):
                failure = pod_failure(pod, now, pods, args)
                if failure:
                    break
            if not failure and snapshot.kind == GroupSnapshot.kind:
                try:
                    failure = group_failure(kubectl, snapshot, release, group_pods[snapshot.name])
                except KubectlError as error:  # the events are evidence, not the wait: read them next poll
                    print(f"k8s: release {release}: cannot read the group's events: {error}", file=sys.stderr)
            cause = failure and (f"pod {failure.pod} on node {failure.node} ({snapshot.label}): "
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
    parser.add_argument("--deployment", dest="deployments", action="append", default=[])
    parser.add_argument("--leaderworkerset", dest="leaderworkersets", action="append", default=[],
                        help="a multi-node replica's LeaderWorkerSet")
    parser.add_argument("--release", required=True)
    parser.add_argument("--timeout", type=float, required=True, help="seconds for the whole rollout (and the undo)")
    parser.add_argument("--pod-ready-seconds", type=float, required=True,
                        help="seconds a new pod may take from appearing to Ready")
    parser.add_argument("--scheduling-grace-seconds", type=float, required=True,
                        help="seconds a new pod may wait for a node")
    parser.add_argument("--pull-failure-grace-seconds", type=float, default=PULL_FAILURE_GRACE_SECONDS)
    parser.add_argument("--poll", type=float, default=POLL_SECONDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.deployments and not args.leaderworkersets:
        parser.error("name at least one --deployment or --leaderworkerset")
    return args


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
