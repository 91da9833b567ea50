#!/usr/bin/env python3
"""A kubectl stand-in for tests of scripts/await_k8s_rollout.py: it records every call and answers
from a scripted scenario, as a cluster whose Deployment (or LeaderWorkerSet) rolls (or fails to) would.

KUBECTL_SCENARIO names a JSON file:
    {"before": [SNAPSHOT, ...],      # what the cluster shows, one step per `get deployment`
     "after_undo": [SNAPSHOT, ...],  # the same after `rollout undo` (the last one repeats)
     "logs": {"POD/CONTAINER[/previous]": "text"}, "events": {"POD": [EVENT, ...]},
     "undo_refused": false}
    SNAPSHOT: {"deployments": {NAME: DEPLOYMENT}, "pods": [POD, ...], "replicasets": [RS, ...]}
              or {"leaderworkersets": {NAME: LWS}, "pods": [...], "controllerrevisions": [REV, ...]}
    A LeaderWorkerSet's undo is a `patch` (its template from a ControllerRevision), as `rollout undo` is.
KUBECTL_CALLS names a file each call is appended to (one JSON list of argv a line). The stub's
position in the scenario lives beside the scenario (KUBECTL_SCENARIO + ".state").
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    with open(os.environ["KUBECTL_CALLS"], "a") as calls:
        calls.write(json.dumps(argv) + "\n")
    scenario_path = os.environ["KUBECTL_SCENARIO"]
    with open(scenario_path) as f:
        scenario = json.load(f)
    state_path = scenario_path + ".state"
    state = {"phase": "before", "step": 0}
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
    args = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--kubeconfig", "--context", "--namespace"):
            skip = True
            continue
        args.append(arg)
    steps = scenario[state["phase"]]
    # `get deployment` starts a read (the script then lists its pods and ReplicaSets): it takes the
    # next step; the lists answer from the step that read took.
    lws = "leaderworkersets.leaderworkerset.x-k8s.io"
    starts_read = args[:2] in (["get", "deployment"], ["get", lws])
    step = state["step"] if starts_read else max(0, state["step"] - 1)
    snapshot = steps[min(step, len(steps) - 1)] if steps else {"deployments": {}, "pods": [], "replicasets": []}

    def answer(obj) -> int:
        print(json.dumps(obj))
        return 0

    if starts_read:
        state["step"] += 1
        with open(state_path, "w") as f:
            json.dump(state, f)
        kind = "deployments" if args[1] == "deployment" else "leaderworkersets"
        workload = snapshot.get(kind, {}).get(args[2])
        if workload is None:
            print(f'Error from server (NotFound): {args[1]} "{args[2]}" not found', file=sys.stderr)
            return 1
        return answer(workload)
    if args[:2] == ["get", "pods"]:
        return answer({"kind": "List", "items": snapshot["pods"]})
    if args[:2] in (["get", "replicasets"], ["get", "controllerrevisions"]):
        return answer({"kind": "List", "items": snapshot.get(args[1], [])})
    if args[:2] == ["get", "events"]:
        pod = args[args.index("--field-selector") + 1].split("=", 1)[1]
        return answer({"kind": "List", "items": scenario.get("events", {}).get(pod, [])})
    if args[0] == "logs":
        key = f"{args[1]}/{args[args.index('-c') + 1]}" + ("/previous" if "--previous" in args else "")
        if key not in scenario.get("logs", {}):
            print(f"Error from server (BadRequest): no logs for {key}", file=sys.stderr)
            return 1
        print(scenario["logs"][key], end="")
        return 0
    if args[:2] == ["rollout", "undo"] or args[:2] == ["patch", lws]:
        if scenario.get("undo_refused"):
            print("error: undo refused by the stub", file=sys.stderr)
            return 1
        with open(state_path, "w") as f:
            json.dump({"phase": "after_undo", "step": 0}, f)
        print(f"{args[2]} rolled back")
        return 0
    print(f"kubectl stub: unexpected call {argv}", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
