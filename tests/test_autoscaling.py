"""The scaling policy (issue 24, item 3): its range and target from the spec, its warm-up from the
time to ready the plan prints, cooldowns sized from it, a drain bounded by the stack's longest request,
and the HPA's rule for the replicas it asks for."""

from __future__ import annotations

import copy
import math

import pytest

from kimi_fleet import autoscaling, health
from kimi_fleet.autoscaling import Scaler, ScalingPolicy, desired_replicas, scaling_policy
from kimi_fleet.k8s_manifests import pod_cold_start_seconds
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import load_stack_config, stack_file
from kimi_fleet.validation import parse_spec

KUBERNETES_TARGET = {"kind": "kubernetes", "kubernetes": {
    "namespace": "kimi-mi355x", "storageClass": "local-nvme",
    "prometheusUrl": "http://prometheus-operated.monitoring.svc:9090"}}
K26_DRAFT = {"speculative": "eagle3", "speculativeDraftRepo": "lightseekorg/kimi-k2.6-eagle3-mla"}


def variant(stack: str, scaling: dict | None, engine: dict | None = None, **top) -> Resolved:
    """A stack of stacks/ with a scaling range (built here: stacks/ are the lead's)."""
    values = copy.deepcopy(load_stack_config(stack_file(stack)).values)
    if scaling is not None:
        capacity = {k: v for k, v in values.get("capacity", {}).items() if k not in ("onDemandBase",)}
        values["capacity"] = {**capacity, "replicas": max(1, scaling.get("minReplicas", 1)), "scaling": scaling}
    if engine:
        values["engine"] = {**values["engine"], **engine}
    values.update(top)
    return Resolved(parse_spec(values, stack, f"stacks/Pulumi.{stack}.yaml"))


def policy_of(r: Resolved) -> ScalingPolicy:
    p = scaling_policy(r, size(r))
    assert p is not None
    return p


def test_no_scaling_no_policy():
    r = variant("h200-int4-sglang", None)
    assert scaling_policy(r, size(r)) is None


def test_range_and_target_come_from_the_spec():
    p = policy_of(variant("h200-int4-sglang", {"minReplicas": 1, "maxReplicas": 4, "waitingPerReplica": 3}))
    assert (p.min_replicas, p.max_replicas, p.metric, p.target_value, p.target) == (1, 4, "waiting", 3.0, "aws")
    t = policy_of(variant("h200-int4-sglang", {"minReplicas": 2, "maxReplicas": 5, "ttftP99Seconds": 8}))
    assert (t.min_replicas, t.max_replicas, t.metric, t.target_value) == (2, 5, "ttft", 8.0)


def test_an_aws_replicas_warmup_is_the_plans_cold_start_plus_boot_and_image_pull():
    r = variant("h200-int4-sglang", {"minReplicas": 1, "maxReplicas": 4, "waitingPerReplica": 3})
    sizing = size(r)
    p = scaling_policy(r, sizing)
    assert p.instance_warmup_seconds == health.BOOT_SECONDS + health.IMAGE_PULL_SECONDS + sizing.cold_start_seconds
    assert sum(p.warmup_terms.values()) == p.instance_warmup_seconds
    # A slower download is a longer warm-up, second for second: the sizing is the only source.
    slow = variant("h200-int4-sglang", {"minReplicas": 1, "maxReplicas": 4, "waitingPerReplica": 3},
                   weights={"source": "huggingface", "downloadGbps": 1})
    assert (policy_of(slow).instance_warmup_seconds - p.instance_warmup_seconds
            == size(slow).cold_start_seconds - sizing.cold_start_seconds != 0)


def test_a_kubernetes_pods_warmup_is_the_image_pull_and_its_start_from_the_weights_volume():
    r = variant("mi355x-int4-sglang", {"minReplicas": 1, "maxReplicas": 3, "waitingPerReplica": 2},
                target=KUBERNETES_TARGET)
    sizing = size(r)
    p = scaling_policy(r, sizing)
    assert p.target == "kubernetes"
    expected = health.IMAGE_PULL_SECONDS + pod_cold_start_seconds(sizing)
    if r.weights_volume == "host-path":
        expected += sizing.download_seconds + sizing.verify_seconds
    assert p.instance_warmup_seconds == expected


@pytest.mark.parametrize("metric", [{"waitingPerReplica": 4}, {"ttftP99Seconds": 10}])
def test_scale_in_waits_a_whole_time_to_ready_and_longer_than_scale_out(metric):
    p = policy_of(variant("h200-int4-sglang", {"minReplicas": 1, "maxReplicas": 4, **metric}))
    assert p.scale_in_cooldown_seconds >= p.instance_warmup_seconds
    assert p.scale_in_cooldown_seconds - p.instance_warmup_seconds < 60  # rounded up to a minute, no more
    assert p.scale_in_cooldown_seconds % 60 == 0
    if p.metric == "waiting":  # the queue does not compound on starting replicas: one metric period
        assert p.scale_out_cooldown_seconds == autoscaling.METRIC_PERIOD_SECONDS < p.scale_in_cooldown_seconds
    else:  # the TTFT does: one step per time to ready
        assert p.scale_out_cooldown_seconds >= p.instance_warmup_seconds


def test_drain_is_the_longest_request_at_the_matching_facts_slowest_per_user_speed():
    r = variant("h200-int4-vllm", {"minReplicas": 1, "maxReplicas": 3, "waitingPerReplica": 2}, engine=K26_DRAFT)
    p = policy_of(r)
    slowest = 54.86  # dynamo-h200-int4-tp8-chat's per-user speed; the agentic row is 56.06
    assert p.drain_timeout_seconds == math.ceil(262_144 / slowest / 60) * 60
    assert "dynamo-h200-int4-tp8-chat" in p.drain_basis
    shorter = policy_of(variant("h200-int4-vllm", {"minReplicas": 1, "maxReplicas": 3, "waitingPerReplica": 2},
                                engine=K26_DRAFT, contextLength=65_536))
    assert shorter.drain_timeout_seconds == math.ceil(65_536 / slowest / 60) * 60 < p.drain_timeout_seconds


def test_without_a_measured_speed_the_drain_is_the_stated_bound():
    p = policy_of(variant("h200-int4-sglang", {"minReplicas": 1, "maxReplicas": 4, "waitingPerReplica": 3}))
    assert p.drain_timeout_seconds == autoscaling.DRAIN_BOUND_SECONDS == health.LIFECYCLE_HEARTBEAT_MAX_SECONDS
    assert "no measured decode speed" in p.drain_basis


def _policy(**changes) -> ScalingPolicy:
    base = dict(min_replicas=1, max_replicas=8, metric="waiting", target_value=4.0, instance_warmup_seconds=1500,
                scale_out_cooldown_seconds=60, scale_in_cooldown_seconds=1500, drain_timeout_seconds=600,
                replica_concurrency=16)
    return ScalingPolicy(**{**base, **changes})


@pytest.mark.parametrize("total,current,asked", [
    (10, 1, 3),    # ceil(10 / 4)
    (0, 3, 1),     # an empty queue asks for the bottom of the range
    (100, 2, 8),   # clamped to the top
    (8.5, 2, 2),   # 4.25 per replica is within 10% of 4: no change
    (9.0, 2, 3),   # 4.5 per replica is not
])
def test_waiting_asks_for_the_queue_over_the_target_per_replica(total, current, asked):
    assert desired_replicas(_policy(), total, current) == asked


@pytest.mark.parametrize("ttft,current,asked", [
    (20, 2, 4),    # ceil(2 x 20 / 10)
    (10.5, 3, 3),  # within the tolerance
    (2, 4, 1),     # ceil(4 x 0.2)
    (0, 2, 1),     # no traffic: the bottom
    (5, 0, 1),     # no replica yet any traffic wakes one
])
def test_ttft_multiplies_the_replicas_by_the_ratio_to_the_objective(ttft, current, asked):
    assert desired_replicas(_policy(metric="ttft", target_value=10.0), ttft, current) == asked


def test_scale_to_zero_wakes_on_queued_work():
    p = _policy(min_replicas=0)
    assert desired_replicas(p, 0, 0) == 0 and desired_replicas(p, 1, 0) == 1


def test_the_scaler_keeps_replicas_through_a_lull_shorter_than_the_scale_in_cooldown():
    p = _policy(scale_in_cooldown_seconds=1500)
    scaler = Scaler(p)
    assert scaler.step(0, 40, 1) == 8  # a burst: ten replicas' worth of queue, clamped to 8
    replicas = 8
    for minute in range(1, 25):  # 24 quiet minutes: shorter than the 25-minute cooldown
        replicas = scaler.step(minute * 60, 0, replicas)
        assert replicas == 8, minute
    for minute in range(25, 30):
        replicas = scaler.step(minute * 60, 0, replicas)
    assert replicas == 1
    # Scale-out waits its own cooldown: a second rise within the minute is not acted on.
    scaler = Scaler(p)
    assert scaler.step(0, 8, 1) == 2 and scaler.step(30, 16, 2) == 2 and scaler.step(60, 16, 2) == 4


def test_a_floor_from_another_metric_holds_replicas_the_queue_would_give_up():
    """An empty queue with every slot busy: the queue alone asks for the bottom of the range; a second
    metric (the requests running over the per-replica concurrency) keeps the replicas they fill."""
    p = _policy(scale_in_cooldown_seconds=600)
    alone, guarded, kept, held = Scaler(p), Scaler(p), 4, 4
    for minute in range(0, 12):
        kept = alone.step(minute * 60, 0, kept)
        held = guarded.step(minute * 60, 0, held, floor=math.ceil(50 / p.replica_concurrency))
    assert kept == 1 and held == 4
    assert Scaler(p).step(0, 0, 1, floor=20) == p.max_replicas  # never above the range


def test_what_it_absorbs_names_the_time_to_ready_the_replicas_running_and_the_drain():
    p = policy_of(variant("h200-int4-sglang", {"minReplicas": 1, "maxReplicas": 4, "waitingPerReplica": 3}))
    text = p.what_it_absorbs()
    minutes = f"{p.instance_warmup_seconds / 60:.0f} min"
    assert f"a new replica serves about {minutes} after the queue crosses its target" in text
    assert f"1 x {p.replica_concurrency} full-context sequences" in text
    assert f"{p.drain_timeout_seconds // 60} min" in text and "at 0 replicas" not in text
    # Scale to zero (Kubernetes only: its wake front, tests/test_k8s_wake.py) says what a first request waits.
    batch = ScalingPolicy(**{**{k: v for k, v in p.as_dict().items() if k in ScalingPolicy.__dataclass_fields__},
                             "min_replicas": 0})
    assert batch.scales_to_zero and (f"at 0 replicas no engine answers: the first request of a batch waits a whole "
                                     f"time to ready (about {minutes})") in batch.what_it_absorbs()


# --- scripts/bench_autoscale.py: a benchmark; here only proof that it runs and replays what it says ---


def bench():
    import sys

    from kimi_fleet.stackfile import PROJECT_ROOT

    sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
    import bench_autoscale

    return bench_autoscale


def test_the_benchmarks_trace_is_the_seeds_and_follows_its_profile():
    b = bench()
    trace = b.build_trace(24, replica_rate_per_second=1.0, minutes=60)
    assert trace == b.build_trace(24, 1.0, 60) != b.build_trace(25, 1.0, 60)
    assert trace == sorted(trace) and all(0 <= t < 3600 for t in trace)
    per_minute = [sum(1 for t in trace if m * 60 <= t < (m + 1) * 60) for m in range(60)]
    quiet, spike = sum(per_minute[5:15]) / 10, sum(per_minute[20:23]) / 3  # 0.5 and 3.0 replicas' worth
    assert 15 < quiet < 45 and 150 < spike < 210, (quiet, spike)


def test_the_benchmark_runs_against_fake_engines_and_counts_the_late_requests(tmp_path):
    import json
    import subprocess
    import sys

    from kimi_fleet.stackfile import PROJECT_ROOT

    trace = tmp_path / "trace.json"
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "bench_autoscale.py"), "--minutes", "30", "--time-scale", "600",
         "--max-replicas", "3", "--print-every", "1", "--save-trace", str(trace), "--json"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    saved = json.loads(trace.read_text())
    assert summary["requests"] == len(saved["arrivals"]) > 0 and saved["seed"] == 24
    assert summary["answered"] == summary["requests"]  # nothing drains in 30 minutes: every request is served
    assert 0 <= summary["queued_longer_than_objective"] <= summary["waited_longer_than_objective"] <= summary["requests"]
    assert summary["time_scale"] == 600 and summary["objective_seconds"] == 10
    rows = summary["timeline"]
    assert rows and all(1 <= row["asked"] <= 3 for row in rows)
    # The spike at minute 20 asks for more replicas than the one the stack starts with; none serves
    # before the warm-up is over.
    # The load soon asks for more replicas than the one the stack starts with; none serves before the
    # warm-up is over (rows are a real minute apart: the ask may be up to a minute older than its row).
    asked_at = next(row["minute"] for row in rows if row["asked"] > 1)
    warmup_ends = asked_at - 1 + summary["warmup_seconds"] / 60
    assert all(row["serving"] == 1 for row in rows if row["minute"] < warmup_ends)
    assert any(row["serving"] > 1 for row in rows if row["minute"] >= warmup_ends) or rows[-1]["minute"] < warmup_ends + 1
    assert "waited longer than the 10 s TTFT objective" in result.stdout
    assert "time scale 1 s of benchmark = 600 s of real time" in result.stdout


def test_the_benchmark_replays_a_saved_trace_as_recorded(tmp_path):
    import json
    import subprocess
    import sys

    from kimi_fleet.stackfile import PROJECT_ROOT

    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"seed": 7, "arrivals": [0.0, 10.0, 20.0, 30.0, 100.0, 500.0]}))
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "bench_autoscale.py"), "--trace", str(trace), "--minutes", "2",
         "--time-scale", "120", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["requests"] == summary["answered"] == 5  # the arrival at 500 s is past the 2 minutes replayed
    assert f"the trace file {trace} (seed 7)" in result.stdout


def test_the_kv_cache_signal_keeps_busy_replicas_an_empty_queue_would_remove():
    """The benchmark's finding: on the queue alone a fleet whose queue has been empty for a scale-in
    window drops replicas that are still busy. The second signal asks for enough replicas to keep
    their mean KV cache use under the target, and the Scaler keeps the larger ask."""
    import dataclasses
    from kimi_fleet.autoscaling import Scaler, desired_replicas, kv_cache_replicas
    policy = dataclasses.replace(_policy_for_kv_test(), min_replicas=1, max_replicas=4, metric="waiting",
                                 target_value=4.0, kv_cache_target=0.75, scale_in_cooldown_seconds=600)
    assert desired_replicas(policy, 0, 4) == 1  # the queue alone: one replica
    assert kv_cache_replicas(policy, 0.7, 4) == 4  # 4 replicas at 70% (within 10% of 75%): keep them
    assert kv_cache_replicas(policy, 0.9, 3) == 4  # 3 at 90%: ceil(3 x 0.9 / 0.75) = 4
    assert kv_cache_replicas(policy, 0.2, 4) == 2  # 4 at 20%: ceil(4 x 0.2 / 0.75) = 2
    assert kv_cache_replicas(policy, 0.0, 4) == 1  # idle: the range's bottom
    with pytest.raises(ValueError):
        kv_cache_replicas(policy, 1.5, 4)
    scaler = Scaler(policy)
    for minute in range(0, 40):  # an empty queue for 40 min while the 4 replicas run at 70%
        kept = scaler.step(minute * 60.0, 0, 4, floor=kv_cache_replicas(policy, 0.7, 4))
        assert kept == 4
    queue_only = Scaler(policy)
    asks = [queue_only.step(minute * 60.0, 0, 4) for minute in range(0, 40)]
    assert min(asks) == 1  # what the benchmark saw without the signal


def _with_workload(stack: str, workload: str, scaling: dict | None = None) -> Resolved:
    values = copy.deepcopy(load_stack_config(stack_file(stack)).values)
    values["capacity"] = {**values["capacity"], "workload": workload,
                          **({"scaling": scaling} if scaling is not None else {})}
    return Resolved(parse_spec(values, stack, f"stacks/Pulumi.{stack}.yaml"))


def _policy_for_kv_test():
    # The shipped scaling stack (h200-int4-vllm, batch) as an interactive one: the KV signal's stacks.
    policy = policy_of(_with_workload("h200-int4-vllm", "interactive"))
    assert policy.kv_cache_target == 0.75  # the spec's default
    return policy


#: Long contexts: every replica runs its full-context sequences (replica_concurrency of them, each
#: near the stack's context length), so its KV cache is 92% used while nothing waits.
LONG_CONTEXT_KV_USE = 0.92


def _replay_long_contexts(policy: ScalingPolicy, minutes: int, queue_per_replica: float) -> list[int]:
    """The policy over `minutes` (one step per metric period, as the HPA or the group applies it) on a
    stack whose replicas all run long-context requests (KV at LONG_CONTEXT_KV_USE on the replicas that
    hold them) with `queue_per_replica` requests waiting per replica that holds them. New replicas
    serve at once here (the warm-up only delays, it changes no ask): they take queued work only, so
    they add no KV use and the busy ones' cache stays full. Returns the replicas after each step."""
    scaler, current, busy = Scaler(policy), policy.min_replicas + 1, policy.min_replicas + 1
    counts = []
    for minute in range(minutes):
        mean_kv_use = LONG_CONTEXT_KV_USE * busy / current
        waiting = queue_per_replica * busy
        current = scaler.step(minute * 60.0, waiting, current,
                              floor=autoscaling.kv_cache_replicas(policy, mean_kv_use, current))
        busy = min(busy, current)  # a busy replica removed drains: its requests finish there
        counts.append(current)
    return counts


def test_a_batch_stack_follows_its_queue_target_under_long_contexts():
    """Review finding (issue 24): the KV cache signal held a batch stack above its queue target under
    long contexts. The shipped batch stack, and the same stack as interactive, on two hours of long
    requests with the queue exactly at the target: the interactive policy adds a replica that nothing
    waits for and keeps it the whole time (its purpose: headroom for the next request's TTFT); the
    batch policy has no KV signal and keeps what the queue asks."""
    batch = policy_of(Resolved(load_stack_config(stack_file("h200-int4-vllm")).spec()))
    assert batch.kv_cache_target is None
    interactive = policy_of(_with_workload("h200-int4-vllm", "interactive"))
    assert interactive.kv_cache_target == 0.75
    for policy in (batch, interactive):
        assert (policy.min_replicas, policy.max_replicas, policy.target_value) == (1, 4, 16.0)
    at_target = batch.target_value  # 16 waiting on each busy replica: the queue target asks for no change
    assert desired_replicas(batch, at_target * 2, 2) == 2
    assert set(_replay_long_contexts(batch, 120, at_target)) == {2}
    held = _replay_long_contexts(interactive, 120, at_target)
    assert held[0] == 3 and set(held) == {3}  # ceil(2 x 0.92 / 0.75): one more, held for two hours
    # The batch policy still scales out on its queue, and in when the queue empties.
    assert _replay_long_contexts(batch, 10, at_target * 3)[-1] == 4
    assert _replay_long_contexts(batch, 120, 0)[-1] == batch.min_replicas
    # The second signal asks nothing of a batch stack, whatever its cache.
    assert autoscaling.kv_cache_replicas(batch, 1.0, 2) == batch.min_replicas
    assert "no second signal: a batch stack follows its queue target alone" in batch.lines()[1]
    assert interactive.lines()[1].startswith("second signal: never fewer replicas")


def test_kv_cache_per_replica_is_refused_on_a_batch_stack():
    from kimi_fleet.spec import StackSpecError
    with pytest.raises(StackSpecError, match="kvCachePerReplica is for interactive stacks"):
        _with_workload("h200-int4-vllm", "batch", {"minReplicas": 1, "maxReplicas": 4, "waitingPerReplica": 16,
                                                   "kvCachePerReplica": 0.8})
    assert policy_of(_with_workload("h200-int4-vllm", "interactive", {
        "minReplicas": 1, "maxReplicas": 4, "waitingPerReplica": 16, "kvCachePerReplica": 0.8})).kv_cache_target == 0.8
