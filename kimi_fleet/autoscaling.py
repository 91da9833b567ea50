"""Replicas that follow the queue (issue 24, item 3): the scaling policy of a stack, from its spec, its
sizing and its time to ready. Pure: no Pulumi, no I/O. The AWS group's scaling policy and drain hook,
the Kubernetes KEDA ScaledObject, the plan and scripts/bench_autoscale.py all read `scaling_policy`.

The numbers and their rules:
- time to ready of a new replica (`instance_warmup_seconds`): what the plan already prints, never
  derived again here. AWS: a new instance boots and pulls the engine image (health.BOOT_SECONDS,
  health.IMAGE_PULL_SECONDS, the terms replacement.py counts for a replaced node), then runs the
  sizing's cold start (download, verify, read, load: `Sizing.cold_start_seconds`, the plan's
  "cold ... (new node)"). Kubernetes: a new engine pod pulls the image and starts from the shared
  weights volume (k8s_manifests.pod_cold_start_seconds), after a download onto the node's own disk
  when the weights are a hostPath. Not counted: the replica's own verification before admission
  (bounded by node_files.ADMISSION_DEADLINE_SECONDS, usually minutes) and, on Kubernetes, the time
  the cluster takes to find a GPU node.
- the scaling rule (`desired_replicas`): Kubernetes' Horizontal Pod Autoscaler algorithm, which
  KEDA's ScaledObject drives and AWS target tracking approximates:
  desiredReplicas = ceil(currentReplicas * currentMetricValue / desiredMetricValue), skipped while
  the ratio is within 10% of 1 (kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/,
  "Algorithm details"; the 10% is --horizontal-pod-autoscaler-tolerance's default). With "waiting"
  the metric is the stack's total queue as an average per replica (KEDA's default AverageValue), so
  the rule is ceil(total waiting / waiting per replica). With "ttft" it is the replicas' p99 time to
  first token against the objective (a Value), which multiplies the current replicas.
- scale-out cooldown: "waiting": one metric period (SCALE_OUT_COOLDOWN_SECONDS, the published
  metric's 60 s resolution). The rule reads the queue, which replicas still starting do not change:
  acting again only asks for what the queue needs now. "ttft": the time to ready. The rule
  multiplies the current replicas, and the TTFT does not fall before the added replicas serve:
  acting again sooner multiplies on replicas that have had no effect yet and runs to the maximum.
- scale-in cooldown: the time to ready (rounded up to a minute), never less than the HPA's own
  default scale-down window (300 s). Rule: a replica removed and added back is billed for a whole
  time to ready without serving anything, so removing it only pays when the lull outlasts its time
  to ready; a 5-minute lull never drops a replica that takes 25 minutes to come back.
- the second signal, the KV cache (`kv_cache_target`, capacity.scaling.kvCachePerReplica): never fewer
  replicas than keep their mean KV cache use under the target. Interactive stacks only. A full cache
  already shows in the queue (an engine that cannot place a request's KV keeps it waiting: vLLM's
  and SGLang's waiting gauges, the queue signal), so what the KV signal adds is headroom: room to
  admit a new request at once (its TTFT), and the busy replicas an empty queue would remove. A batch
  stack states its objective as the queue (waitingPerReplica): it accepts waiting, and its throughput
  per GPU is the batch its cache holds. Under long contexts KV use follows the contexts, not the
  load: a replica running its few full-context sequences sits above 0.75 with nothing queued, and the
  signal asked ceil(n x use / 0.75) replicas, an idle one added and kept for as long as those
  requests ran (test_autoscaling: 2 replicas at 92% hold 3 with an empty queue), i.e. the stack
  above what its queue target asks and its cache capped at 75%. So a batch stack follows its queue
  target alone; removing one of its busy replicas loses no request (it drains first).
- drain timeout: how long a replica being removed may finish its requests. The longest request a
  stack can serve generates at most its context length; at the slowest per-user decode speed of a
  Kimi-K2.6 throughput fact that matches the stack's layout (cost.matching_facts: the same fact the
  plan prices $/M from) that is context / speed. Without a matching fact: DRAIN_BOUND_SECONDS, AWS's
  ceiling for a lifecycle hook's heartbeat. Either way at most that ceiling (the drain hook's
  heartbeat is this value). A replica with nothing running ends its drain at once: a long bound costs
  only when a long request is really running.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from kimi_fleet import health
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import Sizing

#: The published queue metric's resolution (CloudWatch standard resolution, KEDA's default polling is
#: 30 s): the scale-out cooldown of a "waiting" policy, and the lag before any policy sees a change.
METRIC_PERIOD_SECONDS = 60
SCALE_OUT_COOLDOWN_SECONDS = METRIC_PERIOD_SECONDS
#: The HPA's default scale-down stabilization window (kubernetes.io HPA docs, "Stabilization window"):
#: the floor of the scale-in cooldown.
HPA_DEFAULT_SCALE_DOWN_WINDOW_SECONDS = 300
#: The HPA's default tolerance: no change while the metric is within 10% of its target.
HPA_TOLERANCE = 0.1
#: What a replica being removed may take to finish when no measured decode speed bounds it: AWS's
#: ceiling for a lifecycle hook's heartbeat timeout (the drain hook's heartbeat is the drain timeout).
DRAIN_BOUND_SECONDS = health.LIFECYCLE_HEARTBEAT_MAX_SECONDS
#: The scaling rule's source.
HPA_ALGORITHM = ("kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/#algorithm-details: "
                 "desiredReplicas = ceil[currentReplicas * (currentMetricValue / desiredMetricValue)]")


@dataclass(frozen=True)
class ScalingPolicy:
    min_replicas: int
    max_replicas: int
    #: "waiting" (requests queued per replica) or "ttft" (the replicas' p99 time to first token)
    metric: str
    #: waiting requests per replica, or the TTFT p99 objective in seconds
    target_value: float
    #: a new replica's time to ready, from the decision to serving (see time_to_ready_terms)
    instance_warmup_seconds: int
    scale_out_cooldown_seconds: int
    scale_in_cooldown_seconds: int
    drain_timeout_seconds: int
    #: what instance_warmup_seconds is made of, by name (seconds)
    warmup_terms: dict[str, int] = field(default_factory=dict)
    #: full-context sequences one replica serves at once (the sizing: per engine x engines per node)
    replica_concurrency: int = 1
    #: how drain_timeout_seconds was reached, in words
    drain_basis: str = ""
    #: "aws" or "kubernetes"
    target: str = ""
    #: the second signal: the replicas' mean KV cache use (0-1) the policy keeps them under
    #: (capacity.scaling.kvCachePerReplica); the larger of the two asks wins. None: no second signal
    #: (a batch stack follows its queue target alone: the module's docstring says why)
    kv_cache_target: float | None = 0.75

    @property
    def scales_to_zero(self) -> bool:
        return self.min_replicas == 0

    def as_dict(self) -> dict:
        return {**asdict(self), "scales_to_zero": self.scales_to_zero, "absorbs": self.what_it_absorbs()}

    def describe_metric(self) -> str:
        if self.metric == "waiting":
            return f"{self.target_value:g} requests waiting per replica"
        return f"a p99 time to first token of {self.target_value:g} s"

    def what_it_absorbs(self) -> str:
        """What the scaling can and cannot follow, in words (one string)."""
        return "; ".join(self.absorbs_lines())

    def lines(self) -> list[str]:
        """The policy as the plan prints it: the time to ready, the cooldowns and their rules, the drain,
        then what it absorbs."""
        terms = " + ".join(f"{name} {_min(seconds)} min" for name, seconds in self.warmup_terms.items())
        ready = _min(self.instance_warmup_seconds)
        if self.metric == "waiting":
            out = (f"scale out at most every {_min(self.scale_out_cooldown_seconds)} min (one metric period: the "
                   "queue is not changed by replicas still starting, so asking again asks only for what it needs now)")
        else:
            out = (f"scale out at most every {_min(self.scale_out_cooldown_seconds)} min (one time to ready: the "
                   "TTFT falls only once the added replicas serve, and the rule multiplies the replicas it has)")
        if self.kv_cache_target is None:
            second = ("no second signal: a batch stack follows its queue target alone (a full KV cache shows as "
                      "waiting requests; KV use under long contexts would hold replicas nothing waits for)")
        else:
            second = (f"second signal: never fewer replicas than keep their mean KV cache use under "
                      f"{self.kv_cache_target:.0%} (the larger ask wins: a busy replica with an empty queue is not "
                      "removed, and a filling cache adds replicas before requests queue)")
        return [
            f"a new replica needs about {ready} min to serve: {terms}",
            second,
            f"cooldowns: {out}; scale in only after {_min(self.scale_in_cooldown_seconds)} min below the target "
            f"(one time to ready: a replica removed is billed {ready} min before it serves again, so removing it "
            "pays only when the lull outlasts that)",
            f"drain: a replica removed stops taking requests and finishes its running ones for up to "
            f"{_min(self.drain_timeout_seconds)} min ({self.drain_basis})",
            *(f"absorbs: {line}" for line in self.absorbs_lines()),
        ]

    def absorbs_lines(self) -> list[str]:
        """What the scaling can and cannot follow, in words: the plan prints it."""
        ready, conc = _min(self.instance_warmup_seconds), self.replica_concurrency
        crossed = "the queue crosses its target" if self.metric == "waiting" else "the p99 TTFT crosses its objective"
        low, high = self.min_replicas, self.max_replicas
        lines = [
            f"a new replica serves about {ready} min after {crossed} (plus up to "
            f"{METRIC_PERIOD_SECONDS} s for the metric): a spike shorter than that is absorbed only by the "
            f"replicas already running ({low} x {conc} full-context sequences at the bottom of the range, "
            f"{high} x {conc} = {high * conc} at the top), the rest waits in their queues",
        ]
        if self.metric == "waiting":
            lines.append(
                f"a ramp is followed {ready} min late: load that grows by more than what the running replicas "
                f"hold ({conc} in flight and {self.target_value:g} queued each) within {ready} min waits for "
                f"the replicas the queue asked for; the policy may ask again every "
                f"{_min(self.scale_out_cooldown_seconds)} min, as many replicas as the queue needs at once")
        else:
            lines.append(
                f"a ramp is followed one step per {_min(self.scale_out_cooldown_seconds)} min (the time to ready): "
                "each step multiplies the replicas by the p99 TTFT over the objective as it was when the step was "
                f"taken, so load that keeps growing during the {ready} min the added replicas take waits for the "
                "next step; the queue (waitingPerReplica) follows faster")
        lines.append(
            f"a lull shorter than {_min(self.scale_in_cooldown_seconds)} min removes no replica (a replica "
            f"removed is {ready} min from serving again); a replica removed may finish its running requests "
            f"for up to {_min(self.drain_timeout_seconds)} min")
        if self.scales_to_zero:
            # Only Kubernetes accepts minReplicas 0 (its wake front: kimi_fleet/k8s_wake.py, whose plan lines
            # say what it answers and costs); the other targets refuse it.
            lines.append(
                f"at 0 replicas no engine answers: the first request of a batch waits a whole time to ready "
                f"(about {ready} min) after the scaler sees it, answered 503 with Retry-After meanwhile: only a "
                "client that retries keeps it until then")
        return lines


def _min(seconds: int) -> str:
    return f"{seconds / 60:.0f}" if seconds >= 60 else f"{seconds / 60:.1f}"


def _round_up_minute(seconds: float) -> int:
    return int(math.ceil(seconds / 60) * 60)


def time_to_ready_terms(r: Resolved, sizing: Sizing) -> dict[str, int]:
    """A new replica's time from the scaler's decision to serving, term by term (seconds): the terms
    the plan and the replacement lines already use, added, never modelled again here."""
    if r.target.renders_manifests:
        terms = {"image pull": health.IMAGE_PULL_SECONDS}
        if r.weights_volume == "host-path":  # a node that never held the weights downloads them first
            terms["download"] = sizing.download_seconds
            terms["verify"] = sizing.verify_seconds
        # k8s_manifests.pod_cold_start_seconds is this (a new pod starts from the weights volume with a cold
        # page cache); the manifests read this module, not the other way round
        terms["read and load from the weights volume"] = sizing.volume_start_seconds
        return terms
    return {"boot": health.BOOT_SECONDS, "image pull": health.IMAGE_PULL_SECONDS,
            "cold start (download, verify, read, load)": sizing.cold_start_seconds}


def drain_timeout(r: Resolved) -> tuple[int, str]:
    """(seconds, basis): the longest request at the stack's context length and the slowest matching
    per-user decode speed, within AWS's hook ceiling; the ceiling itself when no fact matches."""
    from kimi_fleet.cost import matching_facts

    speeds = [(fact.per_user_tokens_per_second, fact.name) for fact in matching_facts(r).values()
              if fact is not None and fact.per_user_tokens_per_second]
    context = r.spec.context_length
    if not speeds:
        return DRAIN_BOUND_SECONDS, (f"no measured decode speed for this layout: the {DRAIN_BOUND_SECONDS // 60}-min "
                                     "bound, AWS's ceiling for a lifecycle hook's heartbeat, on every target")
    speed, fact = min(speeds)
    seconds = _round_up_minute(context / speed)
    if seconds > DRAIN_BOUND_SECONDS:
        return DRAIN_BOUND_SECONDS, (f"{context:,} tokens at {speed:g} tok/s per user ({fact}) would take "
                                     f"{_min(seconds)} min: cut to AWS's {DRAIN_BOUND_SECONDS // 60}-min hook ceiling")
    return seconds, f"{context:,} tokens at {speed:g} tok/s per user ({fact})"


def scaling_policy(r: Resolved, sizing: Sizing) -> ScalingPolicy | None:
    """The stack's scaling policy; None when capacity.scaling is not set."""
    scaling = r.spec.capacity.scaling
    if scaling is None:
        return None
    terms = time_to_ready_terms(r, sizing)
    warmup = sum(terms.values())
    metric = scaling.target_metric
    target = scaling.waiting_per_replica if metric == "waiting" else scaling.ttft_p99_seconds
    out = SCALE_OUT_COOLDOWN_SECONDS if metric == "waiting" else _round_up_minute(warmup)
    drain, basis = drain_timeout(r)
    return ScalingPolicy(
        min_replicas=scaling.min_replicas,
        max_replicas=scaling.max_replicas,
        metric=metric,
        target_value=float(target),
        instance_warmup_seconds=warmup,
        scale_out_cooldown_seconds=out,
        scale_in_cooldown_seconds=max(_round_up_minute(warmup), HPA_DEFAULT_SCALE_DOWN_WINDOW_SECONDS),
        drain_timeout_seconds=drain,
        warmup_terms=terms,
        replica_concurrency=max(1, sizing.concurrent_sequences_per_engine * sizing.engines_per_node),
        drain_basis=basis,
        target=r.spec.target.kind,
        # Interactive stacks only (the module's docstring): a batch stack follows its queue target alone.
        kv_cache_target=scaling.kv_cache_per_replica if r.spec.capacity.workload == "interactive" else None,
    )


def kv_cache_replicas(policy: ScalingPolicy, mean_kv_use: float, current: int) -> int:
    """The replicas the second signal asks for: the HPA rule on the replicas' mean KV cache use
    (a Value per replica: ceil(current x use / target), 10% tolerance), within the range. With no
    replica there is no cache to read: it asks for none (the queue decides); nor without the signal
    (a batch stack's policy)."""
    if not 0 <= mean_kv_use <= 1 or current < 0:
        raise ValueError(f"KV cache use {mean_kv_use} must be within 0-1 and current replicas {current} >= 0")
    if current == 0 or policy.kv_cache_target is None:
        return policy.min_replicas
    ratio = mean_kv_use / policy.kv_cache_target
    wanted = current if abs(ratio - 1) <= HPA_TOLERANCE else math.ceil(current * ratio)
    return max(policy.min_replicas, min(policy.max_replicas, wanted))


def desired_replicas(policy: ScalingPolicy, value: float, current: int) -> int:
    """The replicas the policy asks for, given the metric and the replicas the stack has now (starting
    ones included): the HPA rule (HPA_ALGORITHM) with its 10% tolerance, within the range.

    `value`: for "waiting" the stack's total of waiting requests (every replica's queue, summed); for
    "ttft" the replicas' p99 time to first token in seconds (0 with no traffic)."""
    if value < 0 or current < 0:
        raise ValueError(f"metric {value} and current replicas {current} cannot be negative")
    if policy.metric == "waiting":
        # AverageValue: the total over the target per replica; the tolerance compares the per-replica average.
        wanted = math.ceil(value / policy.target_value)
        if current and abs(value / (current * policy.target_value) - 1) <= HPA_TOLERANCE:
            wanted = current
    else:
        ratio = value / policy.target_value
        if current == 0:  # no replica, no TTFT: any traffic seen wakes one
            wanted = 1 if value > 0 else 0
        elif abs(ratio - 1) <= HPA_TOLERANCE:
            wanted = current
        else:
            wanted = math.ceil(current * ratio)
    return max(policy.min_replicas, min(policy.max_replicas, wanted))


@dataclass
class Scaler:
    """The policy over time, as the group or the HPA applies it: `step` is called every metric period
    with the metric and the replicas the stack has (starting ones included) and returns the replicas
    to have. Scale-out waits scale_out_cooldown_seconds after the last scale-out; scale-in takes the
    highest ask of the last scale_in_cooldown_seconds (the HPA's stabilization window) and waits as
    long after any change."""
    policy: ScalingPolicy
    last_out: float = -math.inf
    last_change: float = -math.inf
    asks: list[tuple[float, int]] = field(default_factory=list)

    def step(self, now: float, value: float, current: int, floor: int = 0) -> int:
        """`floor`: a lower bound on the ask from another metric (the HPA takes the largest ask of its
        metrics; a group with two target-tracking policies scales in only when both agree)."""
        if self.last_change == -math.inf:  # the deploy itself is the first change: no scale-in before a window
            self.last_change = now
        ask = min(self.policy.max_replicas, max(desired_replicas(self.policy, value, current), floor))
        window = self.policy.scale_in_cooldown_seconds
        self.asks = [(t, a) for t, a in self.asks if now - t < window] + [(now, ask)]
        if ask > current:
            if now - self.last_out >= self.policy.scale_out_cooldown_seconds:
                self.last_out = self.last_change = now
                return ask
            return current
        stable = max(a for _, a in self.asks)
        if stable < current and now - self.last_change >= window:
            self.last_change = now
            return stable
        return current
