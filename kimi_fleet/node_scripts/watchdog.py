#!/usr/bin/env python3
"""kimi-fleet node watchdog: admission and liveness by real generations (kimi-watchdog.timer).

Each run, per engine: one tiny generation straight to the engine (generation_probe.py), and, when
it fails, the engine's own token counter (its /metrics, under the names stack.json's
engines[].metrics give: the engine module's LoadMetrics) read before and after. The windows come
from the sizing (kimi_fleet/health.py, in stack.json's "watchdog"); every decision is one log line
and lands in the node status ("health").
- An engine is *admitted* the first time it generates after a (re)start (systemd's InvocationID
  tells one start from the next). Before that it is loading: left alone for its load budget, then
  killed and restarted (a load that hangs is reported, never waited on forever).
- *Busy*: an admitted engine whose probe failed while its token counter advanced. It serves
  others; nothing happens and the node stays in service (a load spike must not take replicas out).
- *Stalled*: a failed probe and no token generated meanwhile. `failures` of them in a row take the
  node out of service (the ready file goes) and restart the engine; fewer keep it in.
- *Dead*: no generation for the dead window (longer than a restart and its load budget), or a crash
  loop (`crash_loop_starts` starts within `crash_loop_window_seconds`). A fleet node then powers
  itself off: its group's EC2 health check replaces it (no Auto Scaling permission on the node). A
  single node has nothing to replace it: it keeps restarting its engine.
A rank of a multi-node replica (stack.json's "replica") is also judged by its collectives' transport,
from NCCL's log of the engine's current start (fabric_check.py): over TCP sockets the node is never
ready, and its status says so, naming the rank. A worker rank serves no API (vLLM --headless): it is
admitted once its engine runs and NCCL named the fabric; the leader also by everything above.
Its ranks restart as one unit (replica_epoch.py): each rank publishes its engine's current start on
the replica's private network; once NCCL named a transport for this rank's start, the peer's start
then current is the one its collectives were formed with; when that peer start ends (a new start,
or no process), this rank restarts its own engine, once for that peer start. A rank restarted that
way forms with the peer's new start and has nothing to restart for: two ranks never restart each
other in turn. A peer that does not answer, or answers anything but a start line, changes nothing.
A fleet node also completes its launch lifecycle hook once admitted (through the fleet's steward:
steward_client.py): until then its group keeps it out of service, and an instance refresh waits on
that admission.
The node is *ready* when every engine is admitted, the node's own Caddy, on its loopback listener,
refuses a request without the key and generates with it, and the project's verification suite
(shipped with the release) passed against that listener for this release and these engine starts
(text, thinking and instant modes, tool calls, vision, streaming: stack.json's admission checks).
Then the ready file (stack.json's ready_file, world-readable: Caddy serves it to a load balancer's
health check) holds the release id; it is removed when the node stops serving (see above). The
suite runs once per release and engine start; a failed run is retried on the next timer tick.

Paths are under $KIMI_ROOT when it is set (tests); systemctl and aws are whatever is first on PATH.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from admission import run_suite  # noqa: E402  (shipped beside this file)
from compile_cache import PUBLISH_UNIT, read_settings  # noqa: E402
from fabric_check import Verdict, classify, verdict_line  # noqa: E402
from generation_probe import METRICS_TIMEOUT_SECONDS, engine_load, probe  # noqa: E402
from node_status import read as read_status, start_phase, write as write_status  # noqa: E402
from replica_epoch import PeerUnreadable, read_peer  # noqa: E402
import steward_client  # noqa: E402

ROOT = Path(os.environ.get("KIMI_ROOT", "/"))
STACK_JSON = ROOT / "etc/kimi-fleet/stack.json"
RELEASE = ROOT / "etc/kimi-fleet/release"
NODE_ENV = ROOT / "etc/kimi-fleet/node.env"
STATE_DIR = ROOT / "run/kimi-fleet/watchdog"
LOG = ROOT / "var/log/kimi-fleet/watchdog.log"
#: An engine unit in one of these has no process (systemd gave up, or it was stopped).
PROCESS_GONE = ("failed", "inactive")
#: An AWS CLI call the watchdog makes may not outlast its own unit timeout.
AWS_TIMEOUT_SECONDS = 60
#: EC2's instance metadata service (IMDSv2: a session token first); AWS SDKs read the same variable.
IMDS_ENDPOINT = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254").rstrip("/")
INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")


def log(message: str) -> None:
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} [kimi-watchdog] {message}"
    print(line, file=sys.stderr)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as out:
        out.write(line + "\n")


def setting(name: str) -> str:
    """One KEY=VALUE line of node.env, read as data (never sourced)."""
    settings = read_settings(str(NODE_ENV))
    if name not in settings:
        raise KeyError(f"{name} not in {NODE_ENV}")
    return settings[name]


def unit_state(unit: str) -> tuple[str, str]:
    """(InvocationID, ActiveState) of a unit: the start it is on, and whether it has a process."""
    shown = subprocess.run(["systemctl", "show", "-p", "InvocationID", "-p", "ActiveState", unit],
                           capture_output=True, text=True, check=False)
    values = dict(line.partition("=")[::2] for line in shown.stdout.splitlines() if "=" in line)
    return values.get("InvocationID", "").strip(), values.get("ActiveState", "").strip()


def invocation(unit: str) -> str:
    return unit_state(unit)[0]


def restart(unit: str) -> bool:
    """Queue a restart of `unit`; whether systemd took the job (its refusal is logged)."""
    try:
        done = subprocess.run(["systemctl", "restart", "--no-block", unit], capture_output=True, text=True,
                              check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        log(f"{unit}: restart not queued ({error.__class__.__name__})")
        return False
    if done.returncode != 0:
        log(f"{unit}: restart not queued (systemctl exit {done.returncode}: {done.stderr.strip()[:200]})")
    return done.returncode == 0


def refuses_without_key(base_url: str, timeout: float) -> bool:
    request = urllib.request.Request(f"{base_url}/v1/models")
    try:
        urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        return error.code == 401
    except OSError:
        return False
    return False


def _load_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_state(path: Path, state: dict) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))


#: Fabric check verdicts under which a rank of a multi-node replica is never ready.
OFF_FABRIC = ("socket", "unknown")
#: Verdicts under which an admitted engine still serves (the node stays in service).
SERVING = ("serving", "busy", "stalled")


def _tracked_start(engine: dict, watchdog: dict, now: float, **fresh) -> tuple[str, Path, str, str, dict]:
    """(unit, state file, its current start, ActiveState, state): the engine's state, begun afresh
    (with `fresh`) on a new start, with the starts within the crash-loop window."""
    unit = f"kimi-engine@{engine['index']}.service"
    state_file = STATE_DIR / f"engine-{engine['index']}.json"
    current, active = unit_state(unit)
    state = _load_state(state_file)
    starts = [t for t in state.get("starts", []) if now - t <= watchdog["crash_loop_window_seconds"]]
    if current and state.get("invocation") != current:  # a new start: admit again
        starts.append(now)
        # The last generation outlives a start: the dead window spans restarts.
        kept = {"last_generation_at": state["last_generation_at"]} if "last_generation_at" in state else {}
        state = {"invocation": current, "admitted": False, "started_at": now, **fresh, **kept}
    state["starts"] = starts
    return unit, state_file, current, active, state


def check_engine(engine: dict, model: str, watchdog: dict, now: float) -> dict:
    """Probe one engine and decide. Returns {"unit", "verdict", "reason", "dead"}: verdict one of
    serving, busy, stalled, restarted, loading, not started, over budget, gone; dead a reason or None."""
    unit, state_file, current, active, state = _tracked_start(engine, watchdog, now, stalls=0)
    window, starts = watchdog["crash_loop_window_seconds"], state["starts"]
    last_generation = state.get("last_generation_at")
    if current and last_generation is None:
        last_generation = now  # the dead window counts from the first start the watchdog saw
    state["last_generation_at"] = last_generation
    base_url = f"http://127.0.0.1:{engine['port']}"
    verdict, reason = _judge(unit, state, base_url, model, engine["metrics"], watchdog, now, current, active)
    dead = None
    if len(starts) >= watchdog["crash_loop_starts"]:
        dead = f"crash loop: {len(starts)} starts within {window} s"
    elif last_generation is not None and now - state["last_generation_at"] > watchdog["dead_window_seconds"]:
        dead = (f"no generation for {now - state['last_generation_at']:.0f} s (dead window "
                f"{watchdog['dead_window_seconds']} s), now {verdict}")
    _save_state(state_file, state)
    return {"unit": unit, "verdict": verdict, "reason": reason, "dead": dead}


def engine_log(invocation_id: str) -> str | None:
    """The engine's log since its current start (an older start's lines would decide for this one);
    None when the journal does not answer."""
    try:
        shown = subprocess.run(["journalctl", f"_SYSTEMD_INVOCATION_ID={invocation_id}", "-o", "cat", "--no-pager"],
                               capture_output=True, text=True, check=False, timeout=AWS_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as error:
        log(f"fabric: the journal did not answer ({error})")
        return None
    return shown.stdout if shown.returncode == 0 else None


def engine_fabric(engine: dict, replica: dict, current: str):
    """One engine's verdict for its current start. A decided one (a fabric, or sockets) is kept for
    that start: NCCL says it once, at start-up, and a vacuumed or silent journal later must neither
    unsay it nor turn an admitted rank back into a loading one."""
    kept_file = STATE_DIR / f"fabric-{engine['index']}.json"
    kept = _load_state(kept_file)
    if kept.get("invocation") == current and kept.get("transport") not in (None, "unknown"):
        return Verdict(kept["transport"], kept["evidence"])
    text = engine_log(current)
    transports = replica["transports"]
    verdict = classify(text or "", transports["fabric"], transports["socket"])
    if verdict.transport != "unknown":
        _save_state(kept_file, {"invocation": current, "transport": verdict.transport, "evidence": verdict.evidence})
    return verdict


def fabric_verdict(engines: list[dict], replica: dict) -> tuple[str, str, list[str]]:
    """(transport, the line that says so, the engine starts judged) over this rank's engines:
    sockets anywhere win."""
    verdicts, starts = [], []
    for engine in engines:
        current = invocation(f"kimi-engine@{engine['index']}.service")
        if not current:
            return "unknown", verdict_line(replica["rank"], Verdict("unknown", "")), starts
        starts.append(current)
        verdicts.append(engine_fabric(engine, replica, current))
    worst = next((v for v in verdicts if v.transport == "socket"), None) or next(
        (v for v in verdicts if v.transport == "unknown"), None) or verdicts[0]
    return worst.transport, verdict_line(replica["rank"], worst), starts


def record_fabric(transport: str, line: str, starts: list[str], now: float) -> None:
    """The node status's "fabric": what the apply and the gate read (a socket verdict fails them),
    with the engine starts it judged (an apply ignores a verdict on the starts it is replacing)."""
    status = read_status()
    if status.get("fabric", {}).get("verdict") != line:
        log(f"fabric: {line}")
    status["fabric"] = {"transport": transport, "verdict": line, "engine_starts": starts, "at": now}
    write_status(status)


def replica_epoch(engines: list[dict], replica: dict) -> str | None:
    """Restart this rank's engines when the peer start their collectives were formed with has ended;
    the reason when it did (once per peer start: a rank restarted for it forms anew), else None.
    stack.json's replica "peers" (rank and private address) and "epoch_port" say where each peer
    publishes; without them (a planner's rendering) there is nothing to follow."""
    port, peers = replica.get("epoch_port"), replica.get("peers") or []
    if not port or not peers:
        return None
    index = engines[0]["index"]
    unit = f"kimi-engine@{index}.service"
    own = invocation(unit)
    kept = _load_state(STATE_DIR / f"fabric-{index}.json")
    # NCCL named a transport for this start: its communicators are up, so the whole world met.
    formed = bool(own) and kept.get("invocation") == own and kept.get("transport") not in (None, "unknown")
    reasons, due = [], []
    for peer in peers:
        state_file = STATE_DIR / f"replica-peer-{int(peer['rank'])}.json"
        state = _load_state(state_file)
        if state.get("own") != own:
            state = {"own": own}  # a new start of this rank's engine: formed with no peer start yet
        try:
            start, active = read_peer(peer["address"], int(port))
        except PeerUnreadable as error:
            if state.get("unreadable") != str(error):
                log(f"replica: rank {peer['rank']} ({peer['address']}): {error}; nothing to act on")
            state["unreadable"] = str(error)
            _save_state(state_file, state)
            continue
        state.pop("unreadable", None)
        partner = state.get("partner")
        if partner is None:
            if formed and start != "-" and active not in PROCESS_GONE:
                state["partner"] = start
                log(f"replica: {unit} (start {own}) formed its collectives with rank {peer['rank']}'s start {start}")
        elif (start != partner or active in PROCESS_GONE) and not state.get("restarted_for"):
            ended = f"has no process ({active})" if start == partner else f"was replaced by start {start} ({active})"
            reasons.append(f"rank {peer['rank']}'s engine start {partner}, the one this rank's collectives were "
                           f"formed with, {ended}")
            due.append((state_file, state))
        _save_state(state_file, state)
    if not reasons:
        return None
    units = [f"kimi-engine@{engine['index']}.service" for engine in engines]
    log(f"replica: {'; '.join(reasons)}: restarting {', '.join(units)} once for it")
    # Every restart queued (no short cut: each engine gets its own), then recorded as done; a restart
    # systemd refused is tried again on the next run.
    if not all([restart(restarted) for restarted in units]):
        return f"{'; '.join(reasons)} (the restart failed: tried again on the next run)"
    for state_file, state in due:
        state["restarted_for"] = state["partner"]
        _save_state(state_file, state)
    return "; ".join(reasons)


def check_headless(engine: dict, watchdog: dict, now: float, transport: str, line: str) -> dict:
    """A worker rank's engine serves nothing to probe: it is up while its unit runs and NCCL says the
    fabric carries its collectives; it is restarted when its load runs over budget or it is gone."""
    unit, state_file, current, active, state = _tracked_start(engine, watchdog, now)
    window, starts = watchdog["crash_loop_window_seconds"], state["starts"]
    if not current:
        verdict, reason = "not started", "no start yet (the bootstrap has not started it)"
    elif active in PROCESS_GONE:
        log(f"{unit}: engine process gone (ActiveState {active}); restarting it")
        restart(unit)
        state.update(admitted=False, started_at=now)
        verdict, reason = "gone", f"process gone (ActiveState {active})"
    elif transport == "socket":
        verdict, reason = "wrong fabric", line
    elif transport == "unknown" and state["admitted"]:
        # Admitted on the fabric for this start (a decided verdict is kept per start): a journal
        # that stopped answering is no reason to restart a serving rank.
        verdict, reason = "serving", f"admitted for this start; {line}"
    elif transport == "unknown":
        loading = now - state["started_at"]
        budget = watchdog["load_budget_seconds"]
        if loading <= budget:
            verdict, reason = "loading", f"loading for {loading:.0f} s of its {budget} s budget ({line})"
        else:
            log(f"{unit}: load over budget: started {loading:.0f} s ago, its load budget is {budget} s, "
                f"and {line}; killing and restarting it")
            restart(unit)
            state.update(started_at=now)
            verdict, reason = "over budget", f"load over its {budget} s budget"
    else:
        if not state["admitted"]:
            log(f"{unit}: runs on the fabric, admitted ({line})")
        state["admitted"] = True
        verdict, reason = "serving", line
    dead = f"crash loop: {len(starts)} starts within {window} s" if len(starts) >= watchdog["crash_loop_starts"] else None
    _save_state(state_file, state)
    return {"unit": unit, "verdict": verdict, "reason": reason, "dead": dead}


def _judge(unit: str, state: dict, base_url: str, model: str, metrics: dict, watchdog: dict, now: float,
           current: str, active: str) -> tuple[str, str]:
    if not current:
        return "not started", "no start yet (the bootstrap has not started it)"
    if state["admitted"] and active in PROCESS_GONE:
        log(f"{unit}: engine process gone (ActiveState {active}); restarting it")
        restart(unit)
        state.update(admitted=False, stalls=0)
        return "gone", f"process gone (ActiveState {active})"
    before = engine_load(base_url, metrics, METRICS_TIMEOUT_SECONDS) if state["admitted"] else None
    failure = probe(base_url, model, watchdog["probe_timeout_seconds"])
    if failure is None:
        if not state["admitted"]:
            log(f"{unit}: generates, admitted")
        state.update(admitted=True, stalls=0, last_generation_at=now)
        return "serving", "generates"
    if not state["admitted"]:
        loading = now - state["started_at"]
        budget = watchdog["load_budget_seconds"]
        if loading <= budget:
            return "loading", f"loading for {loading:.0f} s of its {budget} s budget"
        log(f"{unit}: load over budget: started {loading:.0f} s ago, its load budget is {budget} s, still not "
            f"generating ({failure}); killing and restarting it")
        restart(unit)
        state.update(started_at=now)  # the restart's own budget starts now (its new InvocationID too)
        return "over budget", f"load over its {budget} s budget ({failure})"
    after = engine_load(base_url, metrics, METRICS_TIMEOUT_SECONDS)
    if before and after and after["generated"] > before["generated"]:
        state.update(stalls=0, last_generation_at=now)
        log(f"{unit}: busy: probe failed ({failure}) but the engine generated "
            f"{after['generated'] - before['generated']:.0f} tokens meanwhile ({after['running']:.0f} running, "
            f"{after['waiting']:.0f} queued); stays in service")
        return "busy", f"busy ({after['running']:.0f} running, {after['waiting']:.0f} queued)"
    state["stalls"] += 1
    progress = "its /metrics do not answer" if after is None else "no token generated meanwhile"
    log(f"{unit}: stalled: probe failed ({failure}) and {progress} "
        f"({state['stalls']}/{watchdog['failures']} in a row)")
    if state["stalls"] < watchdog["failures"]:
        return "stalled", f"stalled {state['stalls']}/{watchdog['failures']}"
    log(f"{unit}: restarting: it stopped generating after admission; node out of service until it is back")
    restart(unit)
    state.update(admitted=False, stalls=0, started_at=now)
    return "restarted", f"restarted after {watchdog['failures']} stalled probes"


def imds_get(path: str, timeout: float = 10) -> str:
    """One IMDSv2 read (a session token first, as the node's metadata options require), stripped."""
    token_request = urllib.request.Request(f"{IMDS_ENDPOINT}/latest/api/token", method="PUT",
                                           headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    with urllib.request.urlopen(token_request, timeout=timeout) as response:
        token = response.read().decode()
    request = urllib.request.Request(f"{IMDS_ENDPOINT}{path}", headers={"X-aws-ec2-metadata-token": token})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode().strip()


def instance_id() -> str:
    """This instance's id from IMDSv2."""
    found = imds_get("/latest/meta-data/instance-id")
    if not INSTANCE_ID.fullmatch(found):
        raise RuntimeError(f"the instance metadata service gave {found[:40]!r} as the instance id")
    return found


def aws(argv: list[str]) -> subprocess.CompletedProcess:
    """The AWS CLI (its own credential chain: the instance profile), bounded by AWS_TIMEOUT_SECONDS."""
    return subprocess.run(["aws", *argv], capture_output=True, text=True, check=False, timeout=AWS_TIMEOUT_SECONDS)


def aws_autoscaling(*args: str) -> subprocess.CompletedProcess:
    region = read_settings(str(NODE_ENV)).get("AWS_REGION", "")
    return aws(["autoscaling", *args, "--region", region])


def steward(action: str, result: str | None = None) -> str:
    """Ask the fleet's steward to act on this instance (the node's role may not: steward_client.py);
    what it did, or steward_client.StewardError."""
    settings = read_settings(str(NODE_ENV))
    return steward_client.call(action, result, parameter=settings.get("STEWARD_URL_PARAMETER", ""),
                               region=settings.get("AWS_REGION", ""), imds_get=imds_get, aws=aws)


def complete_admission_hook(hook: str) -> bool:
    """A fleet node, once admitted: let its group put it in service (its launch lifecycle hook waits
    for this; a node that never gets here is abandoned by the group at the hook's timeout). True once
    done, or when there is nothing to complete (already in service)."""
    try:
        instance = instance_id()
        found = aws_autoscaling("describe-auto-scaling-instances", "--instance-ids", instance, "--output", "json")
        if found.returncode != 0:
            raise RuntimeError((found.stderr or found.stdout).strip()[-300:])
        described = json.loads(found.stdout).get("AutoScalingInstances") or []
    except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as error:
        log(f"admitted, but the launch hook could not be looked up ({error}); retried next run")
        return False
    if not described or described[0].get("LifecycleState") != "Pending:Wait":
        return True
    group = described[0]["AutoScalingGroupName"]
    try:
        done = steward("complete-admission", "CONTINUE")
    except (OSError, subprocess.TimeoutExpired, steward_client.StewardError) as error:
        log(f"admitted, but completing the launch hook failed ({error}); retried next run")
        return False
    log(f"admitted: launch hook {hook} completed; group {group} puts {instance} in service (steward: {done})")
    return True


def power_off(reason: str) -> None:
    """A dead fleet node stops itself: its group's EC2 health check sees a stopped instance and
    replaces it. No Auto Scaling permission is needed (one that could mark this node unhealthy could
    mark every node of the group)."""
    log(f"node dead ({reason}): powering off; its Auto Scaling group replaces it")
    subprocess.run(["systemctl", "poweroff"], check=False, capture_output=True, text=True)


def record_health(verdict: str, engines: list[dict], now: float) -> None:
    """The node status's "health": the node's verdict and each engine's, as the watchdog decided."""
    status = read_status()
    status["health"] = {"verdict": verdict, "at": now,
                        "engines": {e["unit"]: {"verdict": e["verdict"], "reason": e["reason"],
                                                **({"dead": e["dead"]} if e["dead"] else {})} for e in engines}}
    write_status(status)


def proven(stack: dict, key: str) -> bool:
    """Run the verification suite against the node's own Caddy, once per release and engine starts."""
    admission = stack["admission"]
    release = RELEASE.read_text().strip()
    starts = [invocation(f"kimi-engine@{engine['index']}.service") for engine in stack["engines"]]
    proof = json.dumps({"release": release, "engine_starts": starts})
    proof_file = STATE_DIR / "admission.json"
    if proof_file.exists() and proof_file.read_text() == proof:
        return True
    start_phase("verifying")
    passed, message = run_suite(
        base_url=stack["local_proxy"], model=stack["model"], engine=admission["engine"], checks=admission["checks"],
        release=release, suite_path=str(ROOT / admission["path"].lstrip("/")),
        python=os.environ.get("KIMI_VERIFY_PYTHON") or admission["python"],
        report=ROOT / admission["report"].lstrip("/"), key=key, timeout=admission["request_timeout_seconds"],
        concurrency=admission["concurrency"], deadline=admission["deadline_seconds"])
    log(f"admission: {message}" + ("" if passed else "; not ready, retried next run"))
    if passed:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        proof_file.write_text(proof)
        share_compile_cache()
    return passed


def share_compile_cache() -> None:
    """The engines compiled and warmed up for the suite: let the next node of this launch reuse the
    kernels (the publish unit uploads them once per launch, in the background; managed mirror only)."""
    archive = read_settings(str(NODE_ENV)).get("COMPILE_CACHE_ARCHIVE")
    if archive:
        log(f"compile cache: publishing to {archive} ({PUBLISH_UNIT})")
        subprocess.run(["systemctl", "start", "--no-block", PUBLISH_UNIT], check=False)


def main() -> int:
    stack = json.loads(STACK_JSON.read_text())
    watchdog = stack["watchdog"]
    now = time.time()
    replica = stack.get("replica")
    transport, fabric_line = "none", ""  # a single-node replica has no fabric to judge
    epoch = None
    if replica is not None:
        transport, fabric_line, starts = fabric_verdict(stack["engines"], replica)
        record_fabric(transport, fabric_line, starts, now)
        epoch = replica_epoch(stack["engines"], replica)
    if epoch is not None:
        # Restarted for the replica: judged afresh on the next run (a new start, loading again).
        engines = [{"unit": f"kimi-engine@{engine['index']}.service", "verdict": "replica restart", "reason": epoch,
                    "dead": None} for engine in stack["engines"]]
    elif replica is not None and not replica["serves_api"]:
        engines = [check_headless(engine, watchdog, now, transport, fabric_line) for engine in stack["engines"]]
    else:
        engines = [check_engine(engine, stack["model"], watchdog, now) for engine in stack["engines"]]
    node_file = STATE_DIR / "node.json"
    node = _load_state(node_file)
    release = RELEASE.read_text().strip()
    ready_file = ROOT / stack["ready_file"].lstrip("/")
    verdicts = {e["verdict"] for e in engines}
    # True: ready; False: not ready; None: hold (an engine busy or stalled fewer times than
    # `failures`: the node stays as it was, in service if it was).
    ready: bool | None = False
    if transport in OFF_FABRIC:
        # Never ready off the fabric (sockets: an order of magnitude slower) or before NCCL said.
        if ready_file.exists():
            log(f"node not ready: {fabric_line}")
            ready_file.unlink()
    elif replica is not None and not replica["serves_api"]:
        ready = verdicts == {"serving"}
    elif verdicts <= set(SERVING) and verdicts != {"serving"}:
        ready = None
    elif verdicts == {"serving"}:
        local = stack["local_proxy"]
        key = (ROOT / setting("API_KEY_FILE").lstrip("/")).read_text().strip()
        failure = probe(local, stack["model"], watchdog["probe_timeout_seconds"], key)
        if failure is not None:
            node["proxy_failures"] = node.get("proxy_failures", 0) + 1
            log(f"local proxy {local}: {failure} ({node['proxy_failures']}/{watchdog['failures']} in a row)")
            ready = None if node["proxy_failures"] < watchdog["failures"] else False
        elif not refuses_without_key(local, watchdog["probe_timeout_seconds"]):
            log(f"local proxy {local}: answers without the key; not ready")
        else:
            node["proxy_failures"] = 0
            ready = proven(stack, key)
    dead = [f"{e['unit']}: {e['dead']}" for e in engines if e["dead"]]
    if ready:
        if not ready_file.exists() or ready_file.read_text().strip() != release:
            log(f"node ready: release {release}")
        ready_file.parent.mkdir(parents=True, exist_ok=True)
        ready_file.write_text(release + "\n")
        ready_file.chmod(0o644)
        start_phase("ready")
        node.pop("dead", None)
        if watchdog.get("admission_hook") and not node.get("hook_completed"):
            node["hook_completed"] = complete_admission_hook(watchdog["admission_hook"])
    elif ready is None:
        if ready_file.exists():
            held = ", ".join(f"{e['unit']} {e['reason']}" for e in engines if e["verdict"] != "serving")
            log(f"node stays in service: {held or 'local proxy probe failed'}")
    elif ready_file.exists():
        why = "; ".join(f"{e['unit']} {e['reason']}" for e in engines if e["verdict"] not in SERVING)
        log(f"node not ready: {why or 'its own proxy does not serve'}")
        ready_file.unlink()
        if read_status().get("phase") == "ready":
            start_phase("loading")  # an engine is being restarted
    if dead:
        reason = "; ".join(dead)
        start_phase("failed")
        if node.get("dead") is None:
            node["dead"] = reason
            if not watchdog["replace_dead_node"]:
                log(f"node dead ({reason}); a single node has no group to replace it: its engines keep "
                    "being restarted")
            else:
                record_health("dead", engines, now)
                _save_state(node_file, node)
                power_off(reason)
    verdict = "dead" if dead else {True: "ready", None: "in service, held", False: "not ready"}[ready]
    record_health(verdict, engines, now)
    _save_state(node_file, node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
