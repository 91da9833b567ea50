#!/usr/bin/env python3
"""kimi-fleet drain before scale-in (kimi-drain.service, on an Auto Scaling fleet's nodes).

The group's termination lifecycle hook ("kimi-drain", heartbeat = the scaling policy's drain
timeout, default result CONTINUE) holds an instance it scales in at Terminating:Wait. The node
polls its instance metadata (IMDSv2 `autoscaling/target-lifecycle-state`); on "Terminated" it:
  1. stops taking requests: it writes the drain file, and its ready listener answers 503 from then
     on (Caddy checks the file before the ready file), so the load balancer takes it out of rotation;
  2. waits until every engine reports 0 requests running and 0 waiting (its own /metrics, by the
     names stack.json's engines[].metrics give: the engine module's LoadMetrics), checked each poll;
     an engine whose /metrics do not answer is not counted idle (a generation is never cut on a
     guess);
  3. completes the hook with CONTINUE (through the fleet's steward, steward_client.py) once idle, or
     when the drain timeout (node.env DRAIN_TIMEOUT_SECONDS) has run out since the drain began.
The drain's start is kept in a state file, so a restart of this service keeps the deadline.

Before that, while it serves, the node keeps its group from picking it for a scale-in while it has
requests (instance scale-in protection on itself, set by the fleet's steward): once
admitted, it is protected as soon as an engine reports a request running or waiting, and unprotected
after PROTECT_IDLE_READINGS idle readings in a row, so the group scales in an idle replica first.
Under steady traffic no replica is ever idle for long: when the group has waited to scale in (more
InService instances than it desires, read every GROUP_POLL_SECONDS), a busy node gives its protection
up after release_after_seconds (longer the more requests it holds), so the least busy replica is
released first and drained, and a scale-in is delayed minutes, never blocked. An instance refresh
replaces protected instances too (the gate's refresh preference ScaleInProtectedInstances=Refresh;
AWS's default, Wait, would hold the refresh for an hour), through the drain above.

usage: drain.py [--once]     (--once: one poll, for tests; paths under $KIMI_ROOT)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_cache import read_settings  # noqa: E402  (shipped beside this file)
from generation_probe import engine_load  # noqa: E402
import watchdog  # noqa: E402  (IMDSv2 and the AWS CLI, as the watchdog calls them)

ROOT = Path(os.environ.get("KIMI_ROOT", "/"))
STACK_JSON = ROOT / "etc/kimi-fleet/stack.json"
NODE_ENV = ROOT / "etc/kimi-fleet/node.env"
STATE = ROOT / "run/kimi-fleet/drain.json"
LOG = ROOT / "var/log/kimi-fleet/drain.log"
#: The watchdog's ready file: the node was admitted (before that its requests are the admission's own).
READY_FILE = ROOT / "run/kimi-fleet/ready"
LIFECYCLE_STATE_PATH = "/latest/meta-data/autoscaling/target-lifecycle-state"
TERMINATED = "Terminated"
POLL_SECONDS = float(os.environ.get("KIMI_DRAIN_POLL_SECONDS", "5"))
#: Idle readings in a row before the hook completes: one reading can fall between a request's arrival
#: and its first scheduling (still read or tokenised), or before a keep-alive client's next request.
IDLE_READINGS = 3
#: Idle readings in a row (a minute at the default poll) before a serving node gives up its scale-in
#: protection: a pause between one client's requests must not make it the group's pick.
PROTECT_IDLE_READINGS = 12
#: How often a serving node reads its group (a pending scale-in, its own protection as AWS holds it).
GROUP_POLL_SECONDS = float(os.environ.get("KIMI_DRAIN_GROUP_POLL_SECONDS", "60"))
#: A busy node keeps its protection this long per request it holds (plus one) once its group waits to
#: scale in, at most RELEASE_MAX_SECONDS: the least busy replica goes first.
RELEASE_BASE_SECONDS = float(os.environ.get("KIMI_DRAIN_RELEASE_BASE_SECONDS", "60"))
RELEASE_MAX_SECONDS = 15 * 60


def log(message: str) -> None:
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} [kimi-drain] {message}"
    print(line, file=sys.stderr, flush=True)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as out:
        out.write(line + "\n")


def target_lifecycle_state() -> str | None:
    """IMDSv2's target lifecycle state of this instance (None: no answer, or not in a group)."""
    try:
        return watchdog.imds_get(LIFECYCLE_STATE_PATH, timeout=5)
    except (OSError, ValueError):
        return None


def load(engines: list[dict]) -> tuple[bool, str, bool, float]:
    """(idle, what the engines say, whether every engine's /metrics answered, requests running and
    waiting): idle when every engine answers with 0 running and 0 waiting."""
    said, answered, requests = [], True, 0.0
    for engine in engines:
        found = engine_load(f"http://127.0.0.1:{engine['port']}", engine["metrics"])
        if found is None:
            answered = False
            said.append(f"engine {engine['index']}: /metrics do not answer")
            continue
        requests += found["running"] + found["waiting"]
        said.append(f"engine {engine['index']}: {found['running']:.0f} running, {found['waiting']:.0f} waiting")
    return answered and not requests, "; ".join(said), answered, requests


def own_group() -> tuple[str, str]:
    """(this instance's id, its Auto Scaling group's name); RuntimeError when AWS does not say."""
    instance = watchdog.instance_id()
    found = watchdog.aws_autoscaling("describe-auto-scaling-instances", "--instance-ids", instance,
                                     "--output", "json")
    if found.returncode != 0:
        raise RuntimeError((found.stderr or found.stdout).strip()[-300:])
    described = json.loads(found.stdout).get("AutoScalingInstances") or []
    if not described:
        raise RuntimeError(f"{instance} is in no Auto Scaling group")
    return instance, described[0]["AutoScalingGroupName"]


def protect(on: bool, why: str) -> bool:
    """Set this instance's scale-in protection (through the fleet's steward). True once AWS took it."""
    try:
        watchdog.steward("protect" if on else "unprotect")
    except (OSError, RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as error:
        log(f"setting scale-in protection {'on' if on else 'off'} failed ({error}); retried next poll")
        return False
    log(f"scale-in protection {'on' if on else 'off'}: {why}")
    return True


def group_state(instance: str, group: str) -> tuple[bool, bool | None]:
    """(a scale-in is pending: the group holds more InService instances than it desires, whether this
    instance is protected now, None when AWS does not list it)."""
    found = watchdog.aws_autoscaling("describe-auto-scaling-groups", "--auto-scaling-group-names", group,
                                     "--output", "json")
    if found.returncode != 0:
        raise RuntimeError((found.stderr or found.stdout).strip()[-300:])
    (described,) = json.loads(found.stdout)["AutoScalingGroups"]
    instances = described.get("Instances") or []
    in_service = sum(1 for i in instances if i.get("LifecycleState") == "InService")
    mine = next((i for i in instances if i.get("InstanceId") == instance), None)
    return in_service > int(described["DesiredCapacity"]), (bool(mine["ProtectedFromScaleIn"]) if mine else None)


def release_after_seconds(requests: float) -> float:
    """How long a busy node keeps its protection while its group waits to scale in: longer the more
    requests it holds, so the least busy replica is released (and drained) first, and a scale-in is
    never blocked for good."""
    return min(RELEASE_BASE_SECONDS * (1 + requests), RELEASE_MAX_SECONDS)


def guard_while_serving(state: dict, engines: list[dict], now: float) -> dict:
    """Protected from scale-in while the engines have requests, unprotected once idle for a while, and
    released while busy when the group has waited release_after_seconds to scale in. Nothing before
    the node is admitted (its ready file) or while an engine's /metrics do not answer."""
    if not READY_FILE.exists():
        return state
    idle, said, answered, requests = load(engines)
    if not answered:
        return state
    if now - state.get("group_checked_at", 0) >= GROUP_POLL_SECONDS:
        try:  # AWS's word on the protection (a lost state file, a reboot) and on a pending scale-in
            instance, group = own_group()
            pending, protected = group_state(instance, group)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as error:
            log(f"reading the group failed ({error}); retried in {GROUP_POLL_SECONDS:.0f} s")
            state["group_checked_at"] = now
            return state
        state["group_checked_at"] = now
        if protected is not None:
            state["protected"] = protected
        if pending:
            state.setdefault("scale_in_pending_since", now)
        else:
            state.pop("scale_in_pending_since", None)
    protected = state.get("protected", False)
    state["idle_while_serving"] = state.get("idle_while_serving", 0) + 1 if idle else 0
    pending_since = state.get("scale_in_pending_since")
    released = pending_since is not None and now - pending_since >= release_after_seconds(requests)
    if not idle and not released and not protected and protect(True, f"requests in flight ({said})"):
        state["protected"] = True
    elif protected and (released or (idle and state["idle_while_serving"] >= PROTECT_IDLE_READINGS)):
        why = (f"the group waits to scale in ({now - pending_since:.0f} s), least busy first" if released
               else f"idle for {state['idle_while_serving']} readings")
        if protect(False, f"{why} ({said})"):
            state["protected"] = False
    return state


def write_state(state: dict) -> None:
    """The state file, replaced whole (a restart mid-write never leaves half of it)."""
    partial = STATE.with_name(STATE.name + ".partial")
    partial.write_text(json.dumps(state))
    os.replace(partial, STATE)


def complete(hook: str) -> bool:
    """CONTINUE the termination hook (through the fleet's steward): the group terminates the instance.
    True once done."""
    try:
        done = watchdog.steward("complete-drain", "CONTINUE")
    except (OSError, RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as error:
        log(f"completing the lifecycle hook {hook} failed ({error}); retried next poll")
        return False
    log(f"lifecycle hook {hook} completed with CONTINUE: the steward {done}; the group terminates this instance")
    return True


def poll(stack: dict, timeout: float, now: float) -> str:
    """One look: 'serving' (not scaled in), 'draining', or 'completed'."""
    drain = stack["drain"]
    try:
        state = json.loads(STATE.read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("completed"):
        return "completed"
    if "started_at" not in state:
        if target_lifecycle_state() != TERMINATED:
            write_state(guard_while_serving(state, stack["engines"], now))
            return "serving"
        state = {"started_at": now}
        drain_file = ROOT / drain["file"].lstrip("/")
        drain_file.parent.mkdir(parents=True, exist_ok=True)
        drain_file.write_text(f"{now}\n")
        drain_file.chmod(0o644)
        write_state(state)
        log(f"scale-in: this instance is being terminated; the ready listener answers 503 from now on, "
            f"draining for at most {timeout:.0f} s")
    idle, said, _, _ = load(stack["engines"])
    waited = now - state["started_at"]
    state["idle_readings"] = state.get("idle_readings", 0) + 1 if idle else 0
    if idle and state["idle_readings"] < IDLE_READINGS and waited < timeout:
        write_state(state)
        return "draining"
    if idle:
        log(f"drained after {waited:.0f} s ({said}, {IDLE_READINGS} readings in a row)")
    elif waited >= timeout:
        log(f"drain timeout: {waited:.0f} s of {timeout:.0f} s and still {said}; letting the group terminate it")
    else:
        if said != state.get("said"):
            log(f"draining ({waited:.0f} s of {timeout:.0f} s): {said}")
            state["said"] = said
        write_state(state)  # the idle run starts again
        return "draining"
    if complete(drain["hook"]):
        state["completed"] = now
        write_state(state)
        return "completed"
    return "draining"


def main(argv: list[str]) -> int:
    stack = json.loads(STACK_JSON.read_text())
    if not stack.get("drain"):
        log("this node is in no scaling fleet: nothing to drain")
        return 0
    timeout = float(read_settings(str(NODE_ENV))["DRAIN_TIMEOUT_SECONDS"])
    STATE.parent.mkdir(parents=True, exist_ok=True)
    while True:
        outcome = poll(stack, timeout, time.time())
        if outcome == "completed" or argv == ["--once"]:
            return 0
        time.sleep(POLL_SECONDS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
