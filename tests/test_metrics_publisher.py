"""The AWS metrics publisher (issue 24, item 1 on AWS): the real script scrapes loopback exporters
twice, computes the contract's CloudWatch metrics (rates and p99s from the difference) and puts
them with the AWS CLI into a real CloudWatch API (moto's server on loopback); get-metric-data gives
back what was published, under [Stack, Replica] and [Stack]."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kimi_fleet import catalog, observability
from kimi_fleet.node_scripts import metrics_text
from tests.fakes.aws_api import moto_server
from tests.fakes.imds import start_imds
from tests.test_node_metrics import _node_root, exporter

PUBLISHER = Path(__file__).resolve().parents[1] / "kimi_fleet" / "node_scripts" / "metrics_publisher.py"
REGION = "us-east-1"
INSTANCE = "i-0123456789abcdef0"
STACK = "h200-int4-vllm"
TTFT_BOUNDS = ("0.25", "0.5", "1.0", "2.5", "+Inf")


def engine_text(generated: float, running: float, waiting: float, kv: float, ttft: tuple[float, ...],
                itl: tuple[float, ...]) -> str:
    names = catalog.ENGINE_METRICS["vllm"]
    labels = 'model_name="kimi-k2.6",engine="0"'
    lines = [f"{names.generated_tokens}{{{labels}}} {generated}", f"{names.running}{{{labels}}} {running}",
             f"{names.waiting}{{{labels}}} {waiting}", f"{names.kv_cache_usage}{{{labels}}} {kv}"]
    for histogram, counts in ((names.ttft_histogram, ttft), (names.itl_histogram, itl)):
        lines += [f'{histogram}_bucket{{{labels},le="{le}"}} {count}' for le, count in zip(TTFT_BOUNDS, counts)]
        lines.append(f"{histogram}_count{{{labels}}} {counts[-1]}")
    return "\n".join(lines) + "\n"


def caddy_text(codes: dict[str, float]) -> str:
    name = f"{catalog.PROXY_METRICS.request_duration}_count"
    return "".join(f'{name}{{code="{code}",handler="subroute",method="POST",server="srv1"}} {count}\n'
                   for code, count in codes.items())


def gpu_text(xids: float) -> str:
    lines = []
    for gpu in range(2):
        labels = f'gpu="{gpu}",UUID="GPU-{gpu}"'
        lines += [f"DCGM_FI_DEV_GPU_UTIL{{{labels}}} {90 + gpu * 10}", f"DCGM_FI_DEV_FB_USED{{{labels}}} 120000",
                  f"DCGM_FI_DEV_FB_FREE{{{labels}}} 24000", f"DCGM_FI_DEV_POWER_USAGE{{{labels}}} 650.5"]
    lines.append(f'DCGM_EXP_XID_ERRORS_COUNT{{gpu="1",UUID="GPU-1",xid="79",window_size_in_ms="300000"}} {xids}')
    return "\n".join(lines) + "\n"


NODE_TEXT = "kimi_fleet_node_admitted 1\nkimi_fleet_gate_passed 1\n"


def _publish(root: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PUBLISHER)], env={**env, "KIMI_ROOT": str(root)}, capture_output=True,
                          text=True, timeout=120)


def _metric(env: dict, name: str, dimensions: list[dict], stat: str = "Average") -> list[float]:
    import boto3

    client = boto3.client("cloudwatch", region_name=REGION, endpoint_url=env["AWS_ENDPOINT_URL"],
                          aws_access_key_id="test", aws_secret_access_key="test")
    now = time.time()
    query = [{"Id": "m", "MetricStat": {"Metric": {"Namespace": observability.cloudwatch_namespace(STACK),
                                                     "MetricName": name, "Dimensions": dimensions},
                                          "Period": 60, "Stat": stat}}]
    answer = client.get_metric_data(MetricDataQueries=query, StartTime=now - 900, EndTime=now + 300)
    return answer["MetricDataResults"][0]["Values"]


def test_the_publisher_puts_rates_p99s_and_gauges_that_cloudwatch_gives_back(tmp_path):
    root = tmp_path / "root"
    _node_root(root, STACK)
    state = {"engine": engine_text(1000, 0, 0, 0.1, (0, 0, 0, 0, 0), (0, 0, 0, 0, 0)),
             "caddy": caddy_text({"200": 10, "401": 1}), "gpu": gpu_text(0)}
    with moto_server(REGION) as env, start_imds({"instance-id": INSTANCE}) as imds, \
            exporter(lambda: state["engine"]) as engine_port, exporter(lambda: state["caddy"]) as caddy_port, \
            exporter(lambda: state["gpu"]) as gpu_port, exporter(lambda: NODE_TEXT) as node_port:
        stack_json = root / "etc/kimi-fleet/stack.json"
        stack = json.loads(stack_json.read_text())
        # The exporters of this test stand where the node's would (the node's fixed loopback ports).
        stack["engines"][0]["port"] = engine_port
        stack["metrics"]["exporters"] = {"gpu": f"http://127.0.0.1:{gpu_port}/metrics",
                                         "proxy": f"http://127.0.0.1:{caddy_port}/metrics",
                                         "node": f"http://127.0.0.1:{node_port}/metrics"}
        stack_json.write_text(json.dumps(stack))
        node_env = root / "etc/kimi-fleet/node.env"
        assert "TARGET_KIND=aws\n" in node_env.read_text()
        env = {**env, "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds}

        first = _publish(root, env)
        assert first.returncode == 0, first.stderr
        # One minute later (the timer's period: the state file's scrape is moved back instead of waiting).
        state_file = root / stack["metrics"]["state_file"].lstrip("/")
        saved = json.loads(state_file.read_text())
        assert saved["replica"] == INSTANCE
        saved["at"] -= 60
        state_file.write_text(json.dumps(saved))
        state.update(engine=engine_text(7000, 3, 5, 0.82, (100, 150, 190, 200, 200), (200, 200, 200, 200, 200)),
                     caddy=caddy_text({"200": 70, "401": 31, "502": 10}), gpu=gpu_text(1))
        second = _publish(root, env)
        assert second.returncode == 0, second.stderr
        assert f"published 16 metrics for {STACK}/{INSTANCE}" in second.stderr

        per_replica = [{"Name": "Stack", "Value": STACK}, {"Name": "Replica", "Value": INSTANCE}]
        stack_only = [{"Name": "Stack", "Value": STACK}]
        # The period as the publisher measured it: from the first scrape (moved back) to the second.
        seconds = json.loads(state_file.read_text())["at"] - saved["at"]
        assert 60 <= seconds < 90
        expected = {
            "GeneratedTokensPerSecond": 6000 / seconds, "RequestsRunning": 3, "RequestsWaiting": 5,
            "KvCacheUsage": 0.82,
            # 200 first tokens, 198th in (1.0, 2.5] holding 190..200: 1.0 + 1.5 * 8/10 (histogram_quantile)
            "TtftP99Seconds": 2.2, "ItlP99Seconds": 0.25 * 198 / 200,
            "ProxyRequestsPerSecond": 100 / seconds, "Proxy5xxRatio": 10 / 100, "Proxy401PerSecond": 30 / seconds,
            "GpuUtilization": 95, "GpuMemoryUsedRatio": 120000 / 144000, "GpuPowerWatts": 1301,
            "GpuXidErrors": 1, "NodeAdmitted": 1, "GatePassed": 1, "EngineStalled": 0,
        }
        for name, value in expected.items():
            got = _metric(env, name, per_replica, "Maximum")
            assert got and got[0] == pytest.approx(value, rel=1e-4), (name, got)
            assert _metric(env, name, stack_only, "Maximum")[0] == pytest.approx(got[0]), name
        # The first run (no previous scrape) published gauges only: two values for a gauge, one for a rate.
        # (Summed over the window's one-minute buckets: the two runs are seconds apart and may fall on
        # either side of a bucket's edge: a clean-clone run saw [1.0, 1.0].)
        assert sum(_metric(env, "RequestsWaiting", stack_only, "SampleCount")) == 2
        assert sum(_metric(env, "GeneratedTokensPerSecond", stack_only, "SampleCount")) == 1


def test_quantile_matches_prometheus_histogram_quantile_and_survives_resets():
    cumulative = {"0.25": 100, "0.5": 150, "1.0": 190, "2.5": 200, "+Inf": 200}
    assert metrics_text.quantile(0.99, cumulative) == pytest.approx(2.2)
    assert metrics_text.quantile(0.5, cumulative) == pytest.approx(0.25)
    assert metrics_text.quantile(0.99, {"1.0": 0, "+Inf": 0}) is None
    assert metrics_text.quantile(0.99, {"1.0": 1, "+Inf": 100}) == 1.0  # in +Inf: the highest finite bound
    # A restarted engine's histogram went back to zero: no period, no p99.
    assert metrics_text.delta_buckets({"1.0": 1, "+Inf": 2}, {"1.0": 5, "+Inf": 9}) is None


def test_a_host_publishes_nothing(tmp_path):
    root = tmp_path / "root"
    _node_root(root, "rtxpro6000-int4-sglang")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text(f"#!/bin/sh\ntouch {tmp_path}/aws-called\n")
    (bin_dir / "aws").chmod(0o755)
    result = _publish(root, {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 0 and "nothing to publish (CloudWatch is for AWS nodes)" in result.stderr
    assert not (tmp_path / "aws-called").exists()


def _publisher_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kimi_metrics_publisher", PUBLISHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _engines(generated: float, running: float, ttft: dict | None = None, progress: float | None = None) -> dict:
    """`progress`: the per-iteration counter (catalog progress_tokens); the generation counter's by default,
    as on vLLM, where they are one counter."""
    return {"generated": generated, "progress": generated if progress is None else progress, "running": running,
            "waiting": 0.0, "kv": 0.5, "ttft": ttft or {}, "itl": {}}


def test_a_stalled_engine_a_restarted_engine_and_a_restarted_caddy():
    publisher = _publisher_module()
    # Requests running and no token generated in the period: stalled.
    stalled = publisher.metrics({"engines": _engines(500, 2)}, {"engines": _engines(500, 2)}, 60)
    assert stalled["EngineStalled"] == (1.0, "None") and stalled["GeneratedTokensPerSecond"] == (0.0, "Count/Second")
    # Idle is not stalled.
    assert publisher.metrics({"engines": _engines(500, 0)}, {"engines": _engines(500, 0)}, 60)["EngineStalled"][0] == 0
    # One long SGLang generation: its generation counter waits for the finish, its per-iteration counter
    # moves: busy, not stalled (review F6).
    long = publisher.metrics({"engines": _engines(500, 1, progress=9000)}, {"engines": _engines(500, 1, progress=3000)}, 60)
    assert long["EngineStalled"] == (0.0, "None") and long["GeneratedTokensPerSecond"] == (0.0, "Count/Second")
    # The engine restarted (its counter and histogram went back): no rate, no p99, no stall verdict; gauges stay.
    restarted = publisher.metrics({"engines": _engines(10, 1, {"1.0": 1, "+Inf": 1})},
                                  {"engines": _engines(900, 1, {"1.0": 50, "+Inf": 60})}, 60)
    assert {"GeneratedTokensPerSecond", "EngineStalled", "TtftP99Seconds"}.isdisjoint(restarted)
    assert restarted["RequestsRunning"] == (1, "Count")
    # Caddy restarted: no proxy rates for that period.
    assert "ProxyRequestsPerSecond" not in publisher.metrics({"proxy": {"200": 3}}, {"proxy": {"200": 90}}, 60)
    # A previous scrape too old to be a period (the node was off): gauges only.
    old = publisher.metrics({"engines": _engines(900, 1)}, {"engines": _engines(500, 1)}, 3600)
    assert "GeneratedTokensPerSecond" not in old and old["RequestsRunning"] == (1, "Count")
