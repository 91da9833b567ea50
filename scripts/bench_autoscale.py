#!/usr/bin/env python3
"""Replay a load against fake engines that a scaling policy adds and removes, and print what it did.

A benchmark, not a test: it measures and prints. The stack's scaling policy
(kimi_fleet.autoscaling.scaling_policy) decides, every metric period, how many replicas to have
(the HPA rule with the policy's cooldowns: autoscaling.Scaler); each replica is a fake engine
(tests/fakes/fake_engine.py) serving at most the per-replica concurrency the sizing allows
(full-context sequences per engine x engines per node); requests beyond every replica's free slots
wait in one queue in arrival order (what the engines' waiting gauges add up to behind a
least-loaded balancer). A replica the policy adds serves only after the policy's warm-up (the
stack's time to ready); one it removes stops taking requests and finishes its own for at most the
drain timeout.

Time is scaled: --time-scale 60 runs one real minute in one second of the benchmark (the script
prints the factor). Every time printed is real time (benchmark time x the factor).

The load is a request-arrival trace built in this script from --seed (nothing is read from disk
unless --trace names a file --save-trace wrote): Poisson arrivals whose rate follows a profile in
units of one replica's capacity (concurrency / request duration): a quiet start, a 3-minute spike
shorter than the time to ready, a one-hour ramp to 3.5 replicas' worth, a plateau, a lull shorter
than the scale-in cooldown, a second peak, then a long quiet end. Every request asks for the chat
workload's 1,024 output tokens (catalog.CHAT), generated at the per-user speed of a matching
Kimi-K2.6 fact, else ASSUMED_TOKENS_PER_SECOND.

What it counts at the end: requests whose first byte came later than the TTFT objective (the
stack's monitoring.ttftP99Seconds, or the policy's own TTFT target), and of those the part the queue
alone explains (arrival to a replica taking the request): the harness's own latency is multiplied by
the time scale too, and the script prints how much that is. A real engine's prefill is not modelled.
The policy's second signal (autoscaling.kv_cache_replicas) is applied as the stacks deploy it (interactive
stacks; a batch stack follows its queue alone): never
fewer replicas than keep their mean KV cache use under capacity.scaling.kvCachePerReplica, a fake
replica's KV use being its busy slots over its concurrency. --queue-only leaves it out, to compare.
--running-guard compares a rule the stacks do not deploy: never fewer replicas than the running
requests need (a second metric), against the queue alone, which gives up busy replicas whose queue
is empty.

    .venv/bin/python scripts/bench_autoscale.py                          # h200-int4-sglang, 1-4 replicas, 4 waiting each
    .venv/bin/python scripts/bench_autoscale.py --stack h200-int4-vllm --ttft-p99-seconds 10
    .venv/bin/python scripts/bench_autoscale.py --minutes 60 --time-scale 600   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import http.client
import json
import math
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from kimi_fleet import catalog  # noqa: E402
from kimi_fleet.autoscaling import (METRIC_PERIOD_SECONDS, Scaler, ScalingPolicy, kv_cache_replicas,  # noqa: E402
                                   scaling_policy)
from kimi_fleet.cost import hourly_usd, matching_facts  # noqa: E402
from kimi_fleet.resolve import Resolved  # noqa: E402
from kimi_fleet.sizing import size  # noqa: E402
from kimi_fleet.stackfile import load_stack_config, stack_file  # noqa: E402
from kimi_fleet.validation import parse_spec  # noqa: E402

FAKE_ENGINE = PROJECT_ROOT / "tests" / "fakes" / "fake_engine.py"
MODEL = "kimi-k2.6"
#: Per-user decode speed when no Kimi-K2.6 fact matches the stack's layout: the order of every
#: published K2.6 per-user figure (catalog.MEASURED_THROUGHPUT: 44 to 56 tok/s). An assumption.
ASSUMED_TOKENS_PER_SECOND = 50.0
#: The load profile, real minutes -> replicas' worth of load (linear between points).
PROFILE = ((0, 0.5), (20, 0.5), (20, 3.0), (23, 3.0), (23, 0.5), (40, 0.5), (100, 3.5), (115, 3.5), (115, 0.3),
           (125, 0.3), (125, 3.0), (140, 3.0), (140, 0.5), (180, 0.5))
#: How often the policy's metric is sampled within a period (the period's mean is what it sees).
SAMPLES_PER_PERIOD = 10
READY_TIMEOUT = 30.0


# --- the trace ----------------------------------------------------------------------------------


def load_at(minute: float) -> float:
    """Replicas' worth of load at a real minute of the profile (linear between its points)."""
    for (t0, v0), (t1, v1) in zip(PROFILE, PROFILE[1:]):
        if t0 <= minute < t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (minute - t0) / (t1 - t0)
    return PROFILE[-1][1]


def build_trace(seed: int, replica_rate_per_second: float, minutes: float) -> list[float]:
    """Arrival times (real seconds): a Poisson process whose rate follows PROFILE (thinning)."""
    rng = random.Random(seed)
    peak = max(v for _, v in PROFILE) * replica_rate_per_second
    arrivals, now, end = [], 0.0, minutes * 60
    while True:
        now += rng.expovariate(peak)
        if now >= end:
            return arrivals
        if rng.random() < load_at(now / 60) * replica_rate_per_second / peak:
            arrivals.append(round(now, 3))


# --- fake replicas and the queue in front of them -----------------------------------------------


@dataclass
class Replica:
    index: int
    process: subprocess.Popen
    port: int | None = None
    state: str = "starting"  # starting -> ready -> draining -> gone
    ready_at: float = 0.0  # benchmark seconds
    drain_deadline: float = 0.0
    running: int = 0
    served: int = 0


@dataclass
class Ticket:
    arrival: float  # benchmark seconds
    event: threading.Event = field(default_factory=threading.Event)
    replica: Replica | None = None
    started: float | None = None  # a replica took it
    first_token: float | None = None
    done: float | None = None
    cut: bool = False


class Fleet:
    """Replicas (fake engines), each taking at most `concurrency` requests, and one FIFO queue."""

    def __init__(self, concurrency: int, hold: float):
        self.concurrency = concurrency
        self.hold = hold
        self.lock = threading.Condition()
        self.queue: deque[Ticket] = deque()
        self.replicas: list[Replica] = []
        self.launched = 0

    def launch(self, ready_at: float) -> Replica:
        # The request holds its slot for its whole duration: the engine's role chunk at once, then one
        # wait (--first-token-delay), then the rest of the reply (no per-token timer: the harness's own
        # CPU would otherwise stretch every request on a busy machine).
        command = [sys.executable, str(FAKE_ENGINE), "--port", "0", "--model", MODEL, "--mode", "good",
                   "--chunk-delay", "0", "--first-token-delay", f"{self.hold:.6f}"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        replica = Replica(self.launched, process, ready_at=ready_at)
        self.launched += 1
        with self.lock:
            self.replicas.append(replica)
        threading.Thread(target=self._announce, args=(replica,), daemon=True).start()
        return replica

    def _announce(self, replica: Replica) -> None:
        ready, _, _ = select.select([replica.process.stdout], [], [], READY_TIMEOUT)
        line = replica.process.stdout.readline() if ready else ""
        if not line.startswith("listening on "):
            raise RuntimeError(f"fake engine {replica.index} did not start: {line!r}")
        with self.lock:
            replica.port = int(line.rsplit(":", 1)[1])
            self.lock.notify_all()

    def wait_ports(self) -> None:
        with self.lock:
            if not self.lock.wait_for(lambda: all(r.port for r in self.replicas), READY_TIMEOUT):
                raise RuntimeError("fake engines did not announce their ports")

    def tick(self, now: float) -> None:
        """Starting replicas whose warm-up is over serve; draining ones past their deadline stop."""
        with self.lock:
            for r in self.replicas:
                if r.state == "starting" and now >= r.ready_at and r.port:
                    r.state = "ready"
                elif r.state == "draining" and now >= r.drain_deadline:
                    self._stop(r)
            self._dispatch()

    def counts(self) -> dict[str, int]:
        with self.lock:
            found = {state: sum(r.state == state for r in self.replicas) for state in ("starting", "ready", "draining")}
            found["queue"] = len(self.queue)
            found["running"] = sum(r.running for r in self.replicas)
            found["running_ready"] = sum(r.running for r in self.replicas if r.state == "ready")
            return found

    def resize(self, wanted: int, now: float, warmup: float, drain: float) -> None:
        """Add replicas (serving after the warm-up) or remove them: a starting one is cancelled first,
        else the ready one with the fewest requests drains."""
        with self.lock:
            live = [r for r in self.replicas if r.state in ("starting", "ready")]
        for _ in range(wanted - len(live)):
            self.launch(now + warmup)
        with self.lock:
            for _ in range(len(live) - wanted):
                starting = [r for r in self.replicas if r.state == "starting"]
                if starting:
                    self._stop(starting[-1])
                    continue
                ready = sorted((r for r in self.replicas if r.state == "ready"), key=lambda r: r.running)
                ready[0].state, ready[0].drain_deadline = "draining", now + drain
                if ready[0].running == 0:
                    self._stop(ready[0])
            self._dispatch()

    def _stop(self, replica: Replica) -> None:
        replica.state = "gone"
        if replica.process.poll() is None:
            replica.process.terminate()

    def _dispatch(self) -> None:
        while self.queue:
            free = [r for r in self.replicas if r.state == "ready" and r.running < self.concurrency]
            if not free:
                return
            replica = min(free, key=lambda r: r.running)
            ticket = self.queue.popleft()
            replica.running += 1
            ticket.replica = replica
            ticket.event.set()

    def submit(self, ticket: Ticket) -> None:
        with self.lock:
            self.queue.append(ticket)
            self._dispatch()

    def release(self, replica: Replica) -> None:
        with self.lock:
            replica.running -= 1
            replica.served += 1
            if replica.state == "draining" and replica.running == 0:
                self._stop(replica)
            self._dispatch()

    def close(self) -> None:
        with self.lock:
            for r in self.replicas:
                self._stop(r)
        for r in self.replicas:
            try:
                r.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                r.process.kill()
            r.process.stdout.close()


def stream(port: int, ticket: Ticket, clock) -> tuple[int, bool]:
    """One streamed chat completion: (data lines read, whether it ended with [DONE]). The ticket's
    first_token is the first data line: the engine sends it the moment it takes the request (its role
    chunk), so the time to it is the queue's wait plus the harness's own latency; a real engine's prefill
    before its first token is not modelled."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    lines, finished = 0, False
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        for raw in response:
            if not raw.startswith(b"data:"):
                continue
            lines += 1
            if lines == 1 and ticket.first_token is None:
                ticket.first_token = clock()
            if raw.strip() == b"data: [DONE]":
                finished = True
    except (OSError, http.client.HTTPException):
        pass
    finally:
        conn.close()
    return lines, finished


def client(fleet: Fleet, ticket: Ticket, clock) -> None:
    fleet.submit(ticket)
    ticket.event.wait()
    replica = ticket.replica
    ticket.started = clock()
    _, finished = stream(replica.port, ticket, clock)
    ticket.done = clock()
    ticket.cut = not finished
    fleet.release(replica)


def calibrate(rounds: int = 5) -> tuple[int, float]:
    """(data lines one benchmark request streams, seconds it takes with no wait): against a fake engine
    of its own, the median of a few requests. The overhead is taken off each request's modelled
    duration, so a request lasts what it models on an idle machine (on a loaded one: printed)."""
    fleet = Fleet(1, 0.0)
    try:
        replica = fleet.launch(0.0)
        fleet.wait_ports()
        timings = []
        for _ in range(rounds):
            started = time.monotonic()
            lines, finished = stream(replica.port, Ticket(0.0), time.monotonic)
            timings.append(time.monotonic() - started)
            if not finished:
                raise RuntimeError("the calibration request did not finish")
        return lines, sorted(timings)[len(timings) // 2]
    finally:
        fleet.close()


# --- the stack and its policy -------------------------------------------------------------------


def resolve(args) -> Resolved:
    """The stack, with the command line's scaling range when given (or when the stack has none)."""
    path = args.stack_file or stack_file(args.stack)
    config = load_stack_config(path)
    values = copy.deepcopy(config.values)
    capacity = dict(values.get("capacity") or {})
    scaling = dict(capacity.get("scaling") or {})
    given = {"minReplicas": args.min_replicas, "maxReplicas": args.max_replicas,
             "waitingPerReplica": args.waiting_per_replica, "ttftP99Seconds": args.ttft_p99_seconds}
    if any(v is not None for v in given.values()) or not scaling:
        if args.waiting_per_replica is not None or args.ttft_p99_seconds is not None:
            scaling.pop("waitingPerReplica", None), scaling.pop("ttftP99Seconds", None)
        defaults = {"minReplicas": 1, "maxReplicas": 4, "waitingPerReplica": 4}
        scaling = {**(defaults if not scaling else {}), **scaling, **{k: v for k, v in given.items() if v is not None}}
        if "waitingPerReplica" in scaling and "ttftP99Seconds" in scaling:
            scaling.pop("waitingPerReplica")
        capacity.pop("onDemandBase", None)
        capacity.update(scaling=scaling, replicas=max(1, scaling["minReplicas"]))
        values["capacity"] = capacity
    return Resolved(parse_spec(values, config.stack, str(path)))


def decode_speed(r: Resolved) -> tuple[float, str]:
    found = [(f.per_user_tokens_per_second, f.name) for f in matching_facts(r).values()
             if f is not None and f.per_user_tokens_per_second]
    if found:
        speed, name = min(found)
        return speed, f"{speed:g} tok/s per user ({name})"
    return ASSUMED_TOKENS_PER_SECOND, (f"{ASSUMED_TOKENS_PER_SECOND:g} tok/s per user (assumed: no Kimi-K2.6 fact "
                                       "matches this layout; the published ones are 44-56)")


# --- the run ------------------------------------------------------------------------------------


def percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def run(args) -> dict:
    r = resolve(args)
    policy: ScalingPolicy = scaling_policy(r, size(r))
    scale = args.time_scale
    speed, speed_basis = decode_speed(r)
    output_tokens = catalog.CHAT.output_tokens
    request_seconds = output_tokens / speed  # real
    objective = policy.target_value if policy.metric == "ttft" else r.spec.monitoring.ttft_p99_seconds
    replica_rate = policy.replica_concurrency / request_seconds  # requests per real second, one replica full
    if args.trace:
        saved = json.loads(Path(args.trace).read_text())
        arrivals = [a for a in saved["arrivals"] if a < args.minutes * 60]
        origin = f"the trace file {args.trace} (seed {saved.get('seed')})"
    else:
        arrivals = build_trace(args.seed, replica_rate, args.minutes)
        origin = f"built in this script from seed {args.seed} (PROFILE: spike, ramp, plateau, lull, peak)"
    if args.save_trace:
        Path(args.save_trace).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_trace).write_text(json.dumps({"seed": args.seed, "profile": PROFILE,
                                                     "replica_rate_per_second": replica_rate,
                                                     "arrivals": arrivals}) + "\n")

    frames, overhead = calibrate()
    hold = max(0.0, request_seconds / scale - overhead)
    period = METRIC_PERIOD_SECONDS / scale
    out = sys.stdout
    print(f"stack {r.spec.stack}: {policy.min_replicas}-{policy.max_replicas} replicas following "
          f"{policy.describe_metric()}; time scale 1 s of benchmark = {scale:g} s of real time "
          f"({scale / 60:g} min); every time below is real", file=out)
    print(f"  policy: warm-up {policy.instance_warmup_seconds / 60:.1f} min, scale-out cooldown "
          f"{policy.scale_out_cooldown_seconds / 60:.0f} min, scale-in cooldown {policy.scale_in_cooldown_seconds / 60:.0f} "
          f"min, drain up to {policy.drain_timeout_seconds / 60:.0f} min", file=out)
    print(f"  each replica: a fake engine taking {policy.replica_concurrency} requests at once (the sizing's "
          f"full-context sequences per replica), each {output_tokens:,} tokens at {speed_basis} = "
          f"{request_seconds:.1f} s", file=out)
    if policy.kv_cache_target is None:
        print("  rule: the queue target alone (a batch stack: no KV cache signal)", file=out)
    elif args.queue_only:
        print("  rule: the queue alone (--queue-only: without the KV cache signal the stack deploys)", file=out)
    else:
        print(f"  rule: the policy's queue target and its KV cache signal (mean use under "
              f"{policy.kv_cache_target:.0%}; a replica's use = its busy slots / its concurrency)", file=out)
    if args.running_guard:
        print("  rule: also never fewer replicas than the running requests need (--running-guard: "
              "not what the stack deploys)", file=out)
    print(f"  load: {len(arrivals):,} requests over {args.minutes:g} min, {origin}; TTFT objective "
          f"{objective:g} s ({'the policy target' if policy.metric == 'ttft' else 'monitoring.ttftP99Seconds'})",
          file=out)

    fleet = Fleet(policy.replica_concurrency, hold)
    try:
        start_replicas = r.spec.capacity.replicas
        for _ in range(start_replicas):
            fleet.launch(0.0)
        fleet.wait_ports()
        scaler = Scaler(policy)
        tickets: list[Ticket] = []
        threads: list[threading.Thread] = []
        t0 = time.monotonic()

        def clock() -> float:
            return time.monotonic() - t0

        def feeder() -> None:
            for arrival in arrivals:
                delay = arrival / scale - clock()
                if delay > 0:
                    time.sleep(delay)
                ticket = Ticket(clock())
                tickets.append(ticket)
                thread = threading.Thread(target=client, args=(fleet, ticket, clock), daemon=True)
                threads.append(thread)
                thread.start()

        feed = threading.Thread(target=feeder, daemon=True)
        feed.start()
        end = args.minutes * 60 / scale
        print(f"\n{'min':>5} {'arrivals':>8} {'queue':>6} {'running':>7} {'p99 TTFT':>9} {'asked':>5} {'serving':>7} "
              f"{'starting':>8} {'draining':>8}", file=out)
        samples: list[int] = []
        asked = start_replicas
        billed_usd = 0.0
        last_print, printed_from, next_period = -math.inf, 0, period
        timeline = []
        tick = period / SAMPLES_PER_PERIOD
        now = 0.0
        while now < end or (fleet.counts()["queue"] or fleet.counts()["running"]) and now < end * 3:
            time.sleep(tick)
            now = clock()
            fleet.tick(now)
            c = fleet.counts()
            samples.append(c["queue"])
            billed = c["starting"] + c["ready"] + c["draining"]
            if billed:  # every replica that exists is paid for, warming up or draining included
                billed_usd += (hourly_usd(r, billed) or 0.0) * tick * scale / 3600
            if now < next_period:
                continue
            next_period += period
            recent = [(t.first_token - t.arrival) * scale for t in list(tickets)
                      if t.first_token is not None and t.first_token > now - period]
            if policy.metric == "waiting":
                value = sum(samples) / len(samples)
            else:  # the p99 of the period's first tokens; a queue with none yet: its oldest wait so far
                waiting = [(now - t.arrival) * scale for t in list(tickets) if t.first_token is None]
                value = percentile(recent, 0.99) if recent else (max(waiting) if waiting else 0.0)
            samples = []
            current = c["starting"] + c["ready"]
            floor = math.ceil(c["running"] / policy.replica_concurrency) if args.running_guard else 0
            serving = c["ready"]
            if not args.queue_only and serving and policy.kv_cache_target is not None:
                mean_kv_use = min(1.0, c["running_ready"] / (serving * policy.replica_concurrency))
                floor = max(floor, kv_cache_replicas(policy, mean_kv_use, current))
            asked = scaler.step(now * scale, value, current, floor=floor)
            if asked != current:
                fleet.resize(asked, now, policy.instance_warmup_seconds / scale, policy.drain_timeout_seconds / scale)
            minute = now * scale / 60
            arrived = sum(1 for t in list(tickets) if t.arrival > last_print) if last_print > -math.inf else len(tickets)
            if minute - printed_from >= args.print_every or not timeline:
                ttft = percentile([(t.first_token - t.arrival) * scale for t in list(tickets)
                                   if t.first_token is not None and t.first_token > max(last_print, 0)], 0.99)
                row = {"minute": round(minute, 1), "arrivals": arrived, "queue": c["queue"], "running": c["running"],
                       "p99_ttft": round(ttft, 1), "asked": asked, "serving": c["ready"], "starting": c["starting"],
                       "draining": c["draining"]}
                timeline.append(row)
                print(f"{row['minute']:>5.0f} {arrived:>8} {c['queue']:>6} {c['running']:>7} {ttft:>8.1f}s {asked:>5} "
                      f"{c['ready']:>7} {c['starting']:>8} {c['draining']:>8}", file=out, flush=True)
                last_print, printed_from = now, minute
        feed.join()
        for thread in threads:
            thread.join(timeout=5)
    finally:
        fleet.close()

    waits = [(t.first_token - t.arrival) * scale for t in tickets if t.first_token is not None]
    late = sum(1 for w in waits if w > objective) + sum(1 for t in tickets if t.first_token is None)
    # The queue's part alone (arrival to a replica taking it): what the policy decides; the rest of a
    # measured first byte is the harness's own latency, multiplied by the time scale.
    queued = [(t.started - t.arrival) * scale for t in tickets if t.started is not None]
    queued_late = sum(1 for w in queued if w > objective) + sum(1 for t in tickets if t.started is None)
    served = [(t.done - t.started) * scale for t in tickets if t.done is not None and t.started is not None]
    fixed_usd = (hourly_usd(r, policy.max_replicas) or 0.0) * args.minutes / 60
    summary = {
        "requests": len(tickets), "answered": len(waits), "cut": sum(t.cut for t in tickets),
        "waited_longer_than_objective": late, "queued_longer_than_objective": queued_late,
        "objective_seconds": objective, "harness_floor_seconds": round(overhead * scale, 1),
        "ttft_p50": round(percentile(waits, 0.5), 1), "ttft_p99": round(percentile(waits, 0.99), 1),
        "ttft_max": round(max(waits, default=0.0), 1), "replicas_launched": fleet.launched,
        "request_seconds_modelled": round(request_seconds, 1),
        "request_seconds_measured": round(sum(served) / max(1, len(served)), 1),
        "warmup_seconds": policy.instance_warmup_seconds,
        "usd": round(billed_usd, 2), "usd_fixed_at_max": round(fixed_usd, 2), "time_scale": scale,
        "timeline": timeline,
    }
    print(f"\n{summary['requests']:,} requests, {summary['answered']:,} answered, {summary['cut']} cut by a drain; "
          f"{late:,} waited longer than the {objective:g} s TTFT objective "
          f"({100 * late / max(1, len(tickets)):.1f}%); TTFT p50 {summary['ttft_p50']} s, p99 {summary['ttft_p99']} s, "
          f"max {summary['ttft_max']} s; in the queue alone (before a replica took it) {queued_late:,} waited longer "
          f"({100 * queued_late / max(1, len(tickets)):.1f}%)", file=out)
    print(f"replicas launched {fleet.launched} (from {start_replicas}); cost ${summary['usd']:,.2f} for the "
          f"{args.minutes:g} min against ${summary['usd_fixed_at_max']:,.2f} for {policy.max_replicas} replicas "
          "throughout (cost.py's prices; a replica is paid from launch to the end of its drain)", file=out)
    print(f"harness: a request took {summary['request_seconds_measured']} s (modelled {request_seconds:.1f} s); a "
          f"whole request with no wait took {overhead * 1000:.0f} ms before the run, {overhead * scale:.1f} s at this "
          "time scale: a first byte's measured time includes up to that much of the harness's own (a lower "
          "--time-scale or an idle machine lowers it)", file=out)
    return summary


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run()'s cleanup: no fake engine outlives the benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_autoscale.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack", default="h200-int4-sglang", help="a stack of stacks/ (default h200-int4-sglang)")
    parser.add_argument("--stack-file", type=Path, help="a stack file outside stacks/")
    parser.add_argument("--min-replicas", type=int)
    parser.add_argument("--max-replicas", type=int)
    parser.add_argument("--waiting-per-replica", type=float)
    parser.add_argument("--ttft-p99-seconds", type=float)
    parser.add_argument("--seed", type=int, default=24)
    parser.add_argument("--minutes", type=float, default=180.0, help="real minutes of the trace to replay")
    parser.add_argument("--time-scale", type=float, default=60.0, help="real seconds per benchmark second")
    parser.add_argument("--print-every", type=float, default=5.0, help="real minutes between timeline rows")
    parser.add_argument("--trace", help="replay a trace file written by --save-trace instead of building one")
    parser.add_argument("--save-trace", help="write the trace replayed (JSON) to this file")
    parser.add_argument("--running-guard", action="store_true",
                        help="compare a rule the stack does not deploy: never ask for fewer replicas than the "
                             "requests running need (ceil(running / per-replica concurrency), as a second HPA "
                             "metric or a second target-tracking policy would)")
    parser.add_argument("--queue-only", action="store_true",
                        help="leave out the policy's KV cache signal (what the queue target alone would do)")
    parser.add_argument("--json", action="store_true", help="also print the summary as JSON (last line)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    summary = run(args)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
