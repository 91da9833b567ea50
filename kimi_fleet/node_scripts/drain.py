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
  3. completes the hook with CONTINUE (`aws autoscaling complete-lifecycle-action`) once idle, or
     when the drain timeout (node.env DRAIN_TIMEOUT_SECONDS) has run out since the drain began.
The drain's start is kept in a state file, so a restart of this service keeps the deadline.

Before that, while it serves, the node keeps its group from picking it for a scale-in while it has
requests (instance scale-in protection, `aws autoscaling set-instance-protection` on itself): it is
protected as soon as an engine reports a request running or waiting, and unprotected after
PROTECT_IDLE_READINGS idle readings in a row, so the group scales in an idle replica, never the
busiest (with every replica busy, AWS keeps the lower desired count and terminates the first that
goes idle). An instance refresh replaces protected instances too (the gate's refresh preference
ScaleInProtectedInstances=Refresh), through the drain above.

usage: drain.py [--once]     (--once: one poll, for tests; paths under $KIMI_ROOT)
"""

from __future__ import annotations

import json
import os
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
LIFECYCLE_STATE_PATH = "/latest/meta-data/autoscaling/target-lifecycle-state"
TERMINATED = "Terminated"
POLL_SECONDS = float(os.environ.get("KIMI_DRAIN_POLL_SECONDS", "5"))
#: Idle readings in a row before the hook completes: one reading can fall between a request's arrival
#: and its first scheduling (still read or tokenised), or before a keep-alive client's next request.
IDLE_READINGS = 3
#: Idle readings in a row (a minute at the default poll) before a serving node gives up its scale-in
#: protection: a pause between one client's requests must not make it the group's pick.
PROTECT_IDLE_READINGS = 12


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


def load(engines: list[dict]) -> tuple[bool, str]:
    """(idle, what the engines say): idle when every engine answers with 0 running and 0 waiting."""
    idle, said, _ = load_read(engines)
    return idle, said


def load_read(engines: list[dict]) -> tuple[bool, str, bool]:
    """(idle, what the engines say, whether every engine's /metrics answered)."""
    said, idle, answered = [], True, True
    for engine in engines:
        found = engine_load(f"http://127.0.0.1:{engine['port']}", engine["metrics"])
        if found is None:
            answered = False
            idle = False
            said.append(f"engine {engine['index']}: /metrics do not answer")
            continue
        if found["running"] or found["waiting"]:
            idle = False
        said.append(f"engine {engine['index']}: {found['running']:.0f} running, {found['waiting']:.0f} waiting")
    return idle, "; ".join(said), answered


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


def protect(on: bool, said: str) -> bool:
    """Set this instance's scale-in protection. True once AWS took it."""
    try:
        instance, group = own_group()
        done = watchdog.aws_autoscaling("set-instance-protection", "--instance-ids", instance,
                                        "--auto-scaling-group-name", group,
                                        "--protected-from-scale-in" if on else "--no-protected-from-scale-in")
        if done.returncode != 0:
            raise RuntimeError((done.stderr or done.stdout).strip()[-300:])
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        log(f"setting scale-in protection {'on' if on else 'off'} failed ({error}); retried next poll")
        return False
    log(f"scale-in protection {'on: requests in flight' if on else 'off: idle'} ({said})")
    return True


def guard_while_serving(state: dict, engines: list[dict]) -> dict:
    """Protected from scale-in while the engines have requests; unprotected once idle for a while.
    An engine whose /metrics do not answer changes nothing (loading, or restarting)."""
    idle, said, answered = load_read(engines)
    if not answered:
        return state
    protected = state.get("protected", False)
    state["idle_while_serving"] = state.get("idle_while_serving", 0) + 1 if idle else 0
    if not idle and not protected and protect(True, said):
        state["protected"] = True
    elif idle and protected and state["idle_while_serving"] >= PROTECT_IDLE_READINGS and protect(False, said):
        state["protected"] = False
    return state


def complete(hook: str) -> bool:
    """CONTINUE the termination hook: the group terminates the instance. True once done."""
    try:
        instance, group = own_group()
        done = watchdog.aws_autoscaling("complete-lifecycle-action", "--auto-scaling-group-name", group,
                                        "--lifecycle-hook-name", hook, "--instance-id", instance,
                                        "--lifecycle-action-result", "CONTINUE")
        if done.returncode != 0:
            raise RuntimeError((done.stderr or done.stdout).strip()[-300:])
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        log(f"completing the lifecycle hook {hook} failed ({error}); retried next poll")
        return False
    log(f"lifecycle hook {hook} completed with CONTINUE: group {group} terminates {instance}")
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
            STATE.write_text(json.dumps(guard_while_serving(state, stack["engines"])))
            return "serving"
        state = {"started_at": now}
        drain_file = ROOT / drain["file"].lstrip("/")
        drain_file.parent.mkdir(parents=True, exist_ok=True)
        drain_file.write_text(f"{now}\n")
        drain_file.chmod(0o644)
        STATE.write_text(json.dumps(state))
        log(f"scale-in: this instance is being terminated; the ready listener answers 503 from now on, "
            f"draining for at most {timeout:.0f} s")
    idle, said = load(stack["engines"])
    waited = now - state["started_at"]
    state["idle_readings"] = state.get("idle_readings", 0) + 1 if idle else 0
    if idle and state["idle_readings"] < IDLE_READINGS and waited < timeout:
        STATE.write_text(json.dumps(state))
        return "draining"
    if idle:
        log(f"drained after {waited:.0f} s ({said}, {IDLE_READINGS} readings in a row)")
    elif waited >= timeout:
        log(f"drain timeout: {waited:.0f} s of {timeout:.0f} s and still {said}; letting the group terminate it")
    else:
        if said != state.get("said"):
            log(f"draining ({waited:.0f} s of {timeout:.0f} s): {said}")
            state["said"] = said
        STATE.write_text(json.dumps(state))  # the idle run starts again
        return "draining"
    if complete(drain["hook"]):
        state["completed"] = now
        STATE.write_text(json.dumps(state))
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
