"""Health windows: when a node is busy, when it is dead, and how long each wait is, from the sizing.

One source for the node's watchdog (stack.json's "watchdog"), the fleet's load balancer health
check, the Auto Scaling group's grace period and the plan. Pure: no Pulumi, no I/O.

What the words mean on a node (kimi_fleet/node_scripts/watchdog.py applies them):
- probe: every probe interval, one tiny generation per engine, at most the probe timeout.
- busy: a probe failed, yet the engine's own /metrics show generated tokens advancing: it serves
  others and the 4-token probe waited behind them. Nothing happens; the node stays in service.
- stalled: a probe failed and no token was generated meanwhile. `stalled_probes` of them in a row
  (minutes, not one probe) take the node out of its load balancer and restart the engine.
- load budget: a (re)started engine must generate within it (image pull + read + load, with
  slack), or it is killed, restarted and reported: a load that hangs never holds a node forever.
- crash loop: `crash_loop_starts` starts of one engine within one load budget: it never gets to
  finish a load.
- dead: no generation for the dead window (the first load, one restart with its full load budget,
  the stall detection, one more probe) or a crash loop. Only then does a fleet node mark itself
  unhealthy for its Auto Scaling group, which replaces it: a restart always comes first.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from kimi_fleet.node_scripts import GENERATION_PROBE_TIMEOUT_SECONDS
from kimi_fleet.sizing import Sizing

#: One tiny generation per engine this often (the watchdog timer).
PROBE_INTERVAL_SECONDS = 30
#: Failed probes with no token generated meanwhile, in a row, before the node leaves its load
#: balancer and the engine is restarted (3 probes that each wait out their 60 s timeout: three minutes
#: of nothing at all).
STALLED_PROBES = 3
#: A (re)started engine's load gets this multiple of its modelled time (pull, read, load).
LOAD_BUDGET_SLACK = 1.5
#: This many starts of one engine within one load budget: a crash loop.
CRASH_LOOP_STARTS = 4
#: Launch, cloud-init and the node's packages before the bootstrap's first phase (a DLAMI boot).
BOOT_SECONDS = 300
#: One engine image (15-25 GB compressed for vLLM/SGLang CUDA images) from its registry.
IMAGE_PULL_SECONDS = 600
#: Over the modelled time to ready before the group may judge a new node at all.
GRACE_MARGIN_SECONDS = 600
#: The load balancer's own check of the ready listener: every interval; a node leaves after
#: `LB_UNHEALTHY_THRESHOLD` failed checks and returns after `LB_HEALTHY_THRESHOLD` good ones.
LB_INTERVAL_SECONDS = 30
LB_UNHEALTHY_THRESHOLD = 3
LB_HEALTHY_THRESHOLD = 2
#: The check's own timeout: the ready listener is Caddy serving a file, never the engine.
LB_TIMEOUT_SECONDS = 10


def stall_detection(probes: int, interval: int, timeout: int) -> int:
    """`probes` stalled probes in a row, in seconds. The watchdog's runs do not overlap: a stalled probe
    waits out its timeout, which delays the next run past the timer interval when the timeout is longer."""
    return probes * max(interval, timeout)


@dataclass(frozen=True)
class HealthWindows:
    probe_interval_seconds: int
    probe_timeout_seconds: int
    stalled_probes: int
    load_budget_seconds: int
    #: What the load budget is made of, by name (seconds).
    load_budget_terms: dict[str, int]
    crash_loop_starts: int
    crash_loop_window_seconds: int
    dead_window_seconds: int
    dead_window_terms: dict[str, int]
    #: A dead fleet node marks itself unhealthy for its Auto Scaling group (only a fleet has one).
    replace_dead_node: bool
    lb_interval_seconds: int
    lb_unhealthy_threshold: int
    lb_healthy_threshold: int
    lb_timeout_seconds: int
    grace_period_seconds: int
    grace_terms: dict[str, int]

    @property
    def stall_detection_seconds(self) -> int:
        """From the first stalled probe to the watchdog's restart (and its ready file gone)."""
        return stall_detection(self.stalled_probes, self.probe_interval_seconds, self.probe_timeout_seconds)

    @property
    def lb_leave_seconds(self) -> int:
        """From a stalled engine to no new traffic: the watchdog's stall detection, then the
        load balancer's failed checks of the ready listener."""
        return self.stall_detection_seconds + self.lb_unhealthy_threshold * self.lb_interval_seconds

    def as_dict(self) -> dict:
        return {**asdict(self), "stall_detection_seconds": self.stall_detection_seconds,
                "lb_leave_seconds": self.lb_leave_seconds}

    def lines(self) -> list[str]:
        """The windows as the plan prints them."""
        def terms(items: dict[str, int]) -> str:
            return " + ".join(f"{name} {seconds} s" for name, seconds in items.items())

        return [
            f"probe: one generation per engine every {self.probe_interval_seconds} s, at most "
            f"{self.probe_timeout_seconds} s; a failed probe while the engine's token counter advances is busy "
            "(no action)",
            f"stalled: {self.stalled_probes} failed probes with no token generated ({self.stall_detection_seconds} s: "
            f"each waits out its {self.probe_timeout_seconds} s timeout) restart the engine"
            + (f" and take the node out; the load balancer stops routing after {self.lb_unhealthy_threshold} x "
               f"{self.lb_interval_seconds} s more ({self.lb_leave_seconds} s in all)" if self.replace_dead_node
               else " (a single node: no load balancer to leave)"),
            f"load budget {self.load_budget_seconds} s = ({terms(self.load_budget_terms)}) x {LOAD_BUDGET_SLACK:g}: "
            "a load still not generating then is killed and restarted",
            f"crash loop: {self.crash_loop_starts} starts within {self.crash_loop_window_seconds} s",
            f"dead after {self.dead_window_seconds} s without a generation = {terms(self.dead_window_terms)}"
            + ("; the node then powers itself off and its Auto Scaling group (EC2 health) replaces it"
               if self.replace_dead_node else "; a single node keeps restarting its engine (nothing replaces it)"),
            f"group health check grace {self.grace_period_seconds} s = {terms(self.grace_terms)}",
        ]


def new_node_terms(sizing: Sizing, fetched: dict[str, int] | None = None) -> dict[str, int]:
    """A new node from launch to its engines loaded, by name (seconds): boot, the image pull, the
    weights' download and verify, the EFA image build (where built), the read and the load, with
    the budgets' loader (Sizing.budget_seconds). `fetched`: the download, verify and read seconds of
    what the node fetches when not the sizing's (sizing.whole_checkpoint_budget_seconds)."""
    fetched = fetched or {"download": sizing.download_seconds, "verify": sizing.verify_seconds,
                          "read": sizing.budget_seconds("read")}
    build = {"image build (estimate)": sizing.image_build_seconds} if sizing.image_build_seconds else {}
    return {"boot": BOOT_SECONDS, "image pull": IMAGE_PULL_SECONDS, "download": fetched["download"],
            "verify": fetched["verify"], **build, "read": fetched["read"],
            "load (compile and warm-up included)": sizing.budget_seconds("load")}


def peer_cold_start_terms(sizing: Sizing, whole_checkpoint: dict[str, int]) -> dict[str, int]:
    """What a rank waits for when its replica's other rank is a new node (a `pulumi up` that
    replaced it): that node's boot to its engine loaded, as the group's grace counts it
    (new_node_terms, the margin), with the whole checkpoint's download, verify and read
    (`whole_checkpoint`: sizing.whole_checkpoint_budget_seconds), since a node's stage share is an
    estimate and it may fetch up to all of it. Its self-verification is not in it: a worker rank
    runs none, and the waiting rank's own admission is counted by its apply."""
    return {**new_node_terms(sizing, whole_checkpoint), "margin": GRACE_MARGIN_SECONDS}


def windows(sizing: Sizing, *, verification_seconds: int, fleet: bool) -> HealthWindows:
    """Every health window of a stack. `verification_seconds`: the node's own run of the suite at
    most (node_files.ADMISSION_DEADLINE_SECONDS); `fleet`: an Auto Scaling group behind a load balancer."""
    # Budgets count the engine's default loader (Sizing.budget_seconds): a faster loader that does not
    # deliver its published speed-up here must not have its loads killed or its nodes replaced.
    read, load = sizing.budget_seconds("read"), sizing.budget_seconds("load")
    # An EFA rank's engine unit builds its image before the engine starts (an estimate: catalog).
    build = {"image build (estimate)": sizing.image_build_seconds} if sizing.image_build_seconds else {}
    load_terms = {"image pull": IMAGE_PULL_SECONDS, **build, "read": read, "load": load}
    load_budget = math.ceil(sum(load_terms.values()) * LOAD_BUDGET_SLACK)
    dead_terms = {"first load budget": load_budget, "one restart's load budget": load_budget,
                  "stall detection": stall_detection(STALLED_PROBES, PROBE_INTERVAL_SECONDS,
                                                     GENERATION_PROBE_TIMEOUT_SECONDS),
                  "one more probe": PROBE_INTERVAL_SECONDS}
    grace_terms = {**new_node_terms(sizing), "self-verification": verification_seconds,
                   "margin": GRACE_MARGIN_SECONDS}
    return HealthWindows(
        probe_interval_seconds=PROBE_INTERVAL_SECONDS,
        probe_timeout_seconds=GENERATION_PROBE_TIMEOUT_SECONDS,
        stalled_probes=STALLED_PROBES,
        load_budget_seconds=load_budget,
        load_budget_terms=load_terms,
        crash_loop_starts=CRASH_LOOP_STARTS,
        crash_loop_window_seconds=load_budget,
        dead_window_seconds=sum(dead_terms.values()),
        dead_window_terms=dead_terms,
        replace_dead_node=fleet,
        lb_interval_seconds=LB_INTERVAL_SECONDS,
        lb_unhealthy_threshold=LB_UNHEALTHY_THRESHOLD,
        lb_healthy_threshold=LB_HEALTHY_THRESHOLD,
        lb_timeout_seconds=LB_TIMEOUT_SECONDS,
        grace_period_seconds=sum(grace_terms.values()),
        grace_terms=grace_terms,
    )


#: A fleet's launch lifecycle hook: a new instance stays out of service (Pending:Wait) until its
#: watchdog admitted it and completes this hook; one that never does is abandoned (terminated) at the
#: heartbeat timeout. An instance refresh therefore waits on real admission, not on EC2 status checks.
ADMISSION_HOOK_NAME = "kimi-fleet-admitted"
#: AWS's ceiling for a lifecycle hook's heartbeat timeout (seconds).
LIFECYCLE_HEARTBEAT_MAX_SECONDS = 7200
#: The refresh's warm-up once an instance is InService: it is already admitted (the hook), so only the
#: load balancer's own health checks to pass (healthy threshold x interval) and a margin.
REFRESH_WARMUP_SECONDS = LB_HEALTHY_THRESHOLD * LB_INTERVAL_SECONDS + 60


def admission_hook_timeout(w: HealthWindows) -> int:
    """The hook's heartbeat timeout: the node's whole grace period, within AWS's ceiling."""
    return min(w.grace_period_seconds, LIFECYCLE_HEARTBEAT_MAX_SECONDS)


#: Per replaced replica, beyond its grace period: AWS finding capacity and launching the instance.
LAUNCH_MARGIN_SECONDS = 600


def fleet_rollout_seconds(w: HealthWindows, replicas: int) -> int:
    """How long a fleet's instance refresh may take before the gate rolls it back: the replicas are
    replaced one after another, each its launch plus its whole grace period (boot to self-verified)."""
    return replicas * (w.grace_period_seconds + LAUNCH_MARGIN_SECONDS)


def watchdog_settings(w: HealthWindows) -> dict:
    """stack.json's "watchdog": what the node's watchdog reads (names it has always read kept)."""
    return {
        "interval_seconds": w.probe_interval_seconds,
        "failures": w.stalled_probes,
        "probe_timeout_seconds": w.probe_timeout_seconds,
        "load_budget_seconds": w.load_budget_seconds,
        "crash_loop_starts": w.crash_loop_starts,
        "crash_loop_window_seconds": w.crash_loop_window_seconds,
        "dead_window_seconds": w.dead_window_seconds,
        "replace_dead_node": w.replace_dead_node,
        # A fleet node completes its launch hook once admitted (the group then puts it in service).
        "admission_hook": ADMISSION_HOOK_NAME if w.replace_dead_node else None,
    }


def shared_node_exposure(engine: str, health_path: str, health_runs_generation: bool, engines_per_node: int,
                         windows: HealthWindows) -> str | None:
    """What a hung engine costs a node whose proxy balances several engines on a liveness-only health
    route (vLLM's /health answers 200 with a dead scheduler: vllm #39863), or None.

    The watchdog probes each engine by a real generation and restarts a stalled one; its restart
    closes the engine's port, and the proxy's health check takes it out of rotation. Until then the
    hung engine keeps its share of new requests: the same window in which a node with one engine
    serves nothing at all."""
    if engines_per_node < 2 or health_runs_generation:
        return None
    share = f"1/{engines_per_node}"
    seconds = hung_engine_window_seconds(windows)
    return (f"{engines_per_node} {engine} engines share each node behind one proxy that balances them on "
            f"{health_path}, which answers 200 while a scheduler is hung (vllm #39863): a hung engine keeps "
            f"{share} of new requests for up to {seconds} s (about {math.ceil(seconds / 60)} min: up to one timer "
            f"interval before the first probe, then {windows.stalled_probes} stalled probes that each wait out their "
            f"{windows.probe_timeout_seconds} s timeout), until the watchdog restarts it and the proxy's health "
            "check drops its closed port; a node with one engine is down for all its requests in that window")


def hung_engine_window_seconds(windows: HealthWindows) -> int:
    """From a scheduler hanging to the watchdog's restart of its engine, at most. The watchdog's runs do not
    overlap: a run whose probe waits out its timeout delays the next one past the timer interval."""
    return windows.probe_interval_seconds + windows.stall_detection_seconds
