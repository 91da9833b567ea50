#!/usr/bin/env python3
"""kimi-fleet metrics publisher (kimi-metrics-publish.timer, every 60 s, AWS nodes only): scrape the
node's loopback exporters, turn them into the stack's CloudWatch metrics and put them with
`aws cloudwatch put-metric-data` (namespace KimiFleet/<stack>, from stack.json), each datum twice: with the dimensions
[Stack, Replica] (Replica: this instance's id) and [Stack] (what a fleet's scaling policy and the
stack's alarms read).

Rates and p99s are computed here, from the difference between this scrape and the previous one
(kept in a state file): tokens per second from the engines' token counters, the p99 of time to
first token and inter-token latency from the observations their histograms gained in the period,
the proxy's request, 5xx and 401 rates from Caddy's request histogram by status code.

Why this path rather than the CloudWatch agent's Prometheus scraping: the agent supports the
counter, gauge and summary types only, and drops histogram metrics ("The Prometheus metrics with
the unsupported histogram metric type are dropped by the CloudWatch agent": AWS CloudWatch user
guide, "Prometheus metric type conversion by the CloudWatch Agent", read 2026-12-07); counters
reach CloudWatch Logs as per-scrape deltas in Embedded Metric Format events. TTFT and
inter-token latency are histograms in both pinned engines, and the stack's objective is their
p99: through the agent they would not arrive at all. Here the p99 comes from the histogram's
buckets, rates from the counters, in about 200 lines of standard-library Python, with no agent
package to pin and update, no log group and no EMF ingestion cost, through the AWS CLI the node
already has (apply_release.py fetches releases with it). The node role needs only
cloudwatch:PutMetricData (conditioned on the namespace).

Metrics (per period; a rate or p99 needs two scrapes, so the first run after a boot or a restart of
an exporter publishes only the gauges):
  GeneratedTokensPerSecond, RequestsRunning, RequestsWaiting, KvCacheUsage (0-1, the fullest engine),
  TtftP99Seconds, ItlP99Seconds (omitted in a period with no observation), ProxyRequestsPerSecond,
  Proxy5xxRatio, Proxy401PerSecond, GpuUtilization (%, mean over GPUs), GpuMemoryUsedRatio,
  GpuPowerWatts (sum), GpuXidErrors (XIDs the exporter counted over its window, every GPU and code),
  NodeAdmitted, GatePassed (0/1), EngineStalled (1 when requests run and no token was generated).

usage: metrics_publisher.py [--dry-run]   (--dry-run prints the metric data instead of putting it)
Paths are under $KIMI_ROOT (tests); `aws` is whatever is first on PATH.
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
import metrics_text as prom  # noqa: E402

ROOT = Path(os.environ.get("KIMI_ROOT", "/"))
STACK_JSON = ROOT / "etc/kimi-fleet/stack.json"
NODE_ENV = ROOT / "etc/kimi-fleet/node.env"
LOG = ROOT / "var/log/kimi-fleet/metrics.log"
#: EC2's instance metadata service (IMDSv2), as the watchdog reads it.
IMDS_ENDPOINT = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254").rstrip("/")
#: A previous scrape older than this is not a period (the node was off, the timer stopped).
MAX_PERIOD_SECONDS = 600
AWS_TIMEOUT_SECONDS = 50
QUANTILE = 0.99


def log(message: str) -> None:
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} [kimi-metrics] {message}"
    print(line, file=sys.stderr)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as out:
        out.write(line + "\n")


def instance_id() -> str:
    from watchdog import instance_id as read_instance_id  # the one IMDSv2 reader

    return read_instance_id()


def snapshot(stack: dict) -> dict:
    """What the exporters say now, reduced to what the metrics need (JSON-safe: it is the next
    run's previous scrape)."""
    config = stack["metrics"]
    names = config["engine"]
    engines, answered = {"generated": 0.0, "progress": 0.0, "running": 0.0, "waiting": 0.0, "kv": None,
                         "ttft": {}, "itl": {}}, 0
    for engine in stack["engines"]:
        samples = prom.scrape(f"http://127.0.0.1:{engine['port']}/metrics")
        if samples is None:
            continue
        answered += 1
        for key, name in (("generated", "generated_tokens"), ("progress", "progress_tokens"), ("running", "running"),
                          ("waiting", "waiting")):
            engines[key] += prom.total(samples, names[name]) or 0.0
        usage = [v for _, v in prom.values(samples, names["kv_cache_usage"])]
        if usage:
            engines["kv"] = max([engines["kv"] or 0.0, *usage])
        for key, name in (("ttft", "ttft_histogram"), ("itl", "itl_histogram")):
            for le, count in prom.buckets(samples, names[name]).items():
                engines[key][le] = engines[key].get(le, 0.0) + count
    found: dict = {"engines": engines if answered == len(stack["engines"]) else None}
    proxy = prom.scrape(config["exporters"]["proxy"])
    if proxy is not None:
        histogram = f"{config['proxy']['requests_histogram']}_count"
        code_label = config["proxy"]["code_label"]
        by_code: dict[str, float] = {}
        for labels, value in prom.values(proxy, histogram):
            code = labels.get(code_label, "")
            by_code[code] = by_code.get(code, 0.0) + value
        found["proxy"] = by_code
    gpu_names, gpu_url = config.get("gpu"), config["exporters"].get("gpu")
    if gpu_names and gpu_url:
        gpu = prom.scrape(gpu_url)
        if gpu is not None:
            found["gpu"] = {key: [[labels.get("gpu", labels.get("UUID", "")), value]
                                  for labels, value in prom.values(gpu, gpu_names[key])]
                            for key in ("utilization", "memory_used", "memory_free", "power", "xid_count")}
    node = prom.scrape(config["exporters"]["node"])
    if node is not None:
        found["node"] = {"admitted": prom.total(node, "kimi_fleet_node_admitted"),
                         "gate_passed": prom.total(node, "kimi_fleet_gate_passed")}
    return found


def metrics(now: dict, before: dict | None, seconds: float | None) -> dict[str, tuple[float, str]]:
    """MetricName -> (value, CloudWatch unit), from this scrape and the previous one (`seconds`
    apart; None: no usable previous scrape)."""
    out: dict[str, tuple[float, str]] = {}
    period = seconds is not None and 0 < seconds <= MAX_PERIOD_SECONDS and before is not None
    engines, engines_before = now.get("engines"), (before or {}).get("engines") if period else None
    if engines is not None:
        out["RequestsRunning"] = (engines["running"], "Count")
        out["RequestsWaiting"] = (engines["waiting"], "Count")
        if engines["kv"] is not None:
            out["KvCacheUsage"] = (engines["kv"], "None")
        if engines_before is not None and engines["generated"] >= engines_before["generated"]:
            generated = engines["generated"] - engines_before["generated"]
            out["GeneratedTokensPerSecond"] = (generated / seconds, "Count/Second")
        # Stalled: requests run and the per-iteration counter did not move (SGLang's generation counter
        # moves only when a request finishes: one long generation is not a stall).
        progress_before = (engines_before or {}).get("progress")
        if progress_before is not None and engines["progress"] >= progress_before:
            moved = engines["progress"] - progress_before
            out["EngineStalled"] = (float(engines["running"] > 0 and moved == 0), "None")
        for key, name in (("ttft", "TtftP99Seconds"), ("itl", "ItlP99Seconds")):
            gained = prom.delta_buckets(engines[key], engines_before[key]) if engines_before is not None else None
            p99 = prom.quantile(QUANTILE, gained) if gained else None
            if p99 is not None:
                out[name] = (p99, "Seconds")
    proxy, proxy_before = now.get("proxy"), (before or {}).get("proxy") if period else None
    if proxy is not None and proxy_before is not None:
        gained = {code: count - proxy_before.get(code, 0.0) for code, count in proxy.items()}
        if all(v >= 0 for v in gained.values()):  # else Caddy restarted: no period
            requests = sum(gained.values())
            errors = sum(v for code, v in gained.items() if code.startswith("5"))
            out["ProxyRequestsPerSecond"] = (requests / seconds, "Count/Second")
            out["Proxy5xxRatio"] = (errors / requests if requests else 0.0, "None")
            out["Proxy401PerSecond"] = (gained.get("401", 0.0) / seconds, "Count/Second")
    gpu = now.get("gpu")
    if gpu is not None:
        utilization = [v for _, v in gpu["utilization"]]
        if utilization:
            out["GpuUtilization"] = (sum(utilization) / len(utilization), "Percent")
        used, free = sum(v for _, v in gpu["memory_used"]), sum(v for _, v in gpu["memory_free"])
        if used + free > 0:
            out["GpuMemoryUsedRatio"] = (used / (used + free), "None")
        if gpu["power"]:
            out["GpuPowerWatts"] = (sum(v for _, v in gpu["power"]), "None")
        # The exporter's own count of XIDs over its window (DCGM_EXP_XID_ERRORS_COUNT, one series
        # per GPU and XID code), summed.
        out["GpuXidErrors"] = (sum(v for _, v in gpu["xid_count"]), "Count")
    node = now.get("node")
    if node is not None:
        for key, name in (("admitted", "NodeAdmitted"), ("gate_passed", "GatePassed")):
            if node.get(key) is not None:
                out[name] = (node[key], "None")
    return out


def metric_data(values: dict[str, tuple[float, str]], stack: str, replica: str, at: float) -> list[dict]:
    """Each metric with [Stack, Replica] and with [Stack] alone (the fleet-wide series)."""
    timestamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    data = []
    for name, (value, unit) in sorted(values.items()):
        for dimensions in ([{"Name": "Stack", "Value": stack}, {"Name": "Replica", "Value": replica}],
                           [{"Name": "Stack", "Value": stack}]):
            data.append({"MetricName": name, "Dimensions": dimensions, "Timestamp": timestamp,
                         "Value": round(float(value), 6), "Unit": unit})
    return data


def put(namespace: str, data: list[dict], region: str) -> None:
    result = subprocess.run(["aws", "cloudwatch", "put-metric-data", "--namespace", namespace, "--region", region,
                             "--metric-data", json.dumps(data)], capture_output=True, text=True, check=False,
                            timeout=AWS_TIMEOUT_SECONDS)
    if result.returncode != 0:
        raise RuntimeError((result.stderr or result.stdout).strip()[-300:])


def main(argv: list[str]) -> int:
    stack = json.loads(STACK_JSON.read_text())
    config = stack["metrics"]
    settings = read_settings(str(NODE_ENV))
    if settings.get("TARGET_KIND") != "aws" and "--dry-run" not in argv:
        log(f"target {settings.get('TARGET_KIND') or 'unknown'}: nothing to publish (CloudWatch is for AWS nodes)")
        return 0
    state_file = ROOT / config["state_file"].lstrip("/")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = {}
    replica = state.get("replica") or ("dry-run" if "--dry-run" in argv else instance_id())
    at = time.time()
    now = snapshot(stack)
    seconds = at - state["at"] if "at" in state else None
    values = metrics(now, state.get("snapshot"), seconds)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"at": at, "replica": replica, "snapshot": now}))
    data = metric_data(values, config["stack"], replica, at)
    if not data:
        log("no exporter answered: nothing to publish")
        return 0
    if "--dry-run" in argv:
        print(json.dumps(data, indent=2))
        return 0
    try:
        put(config["namespace"], data, settings.get("AWS_REGION", ""))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
        log(f"put-metric-data failed ({error}); the next run publishes its own period")
        return 1
    missing = sorted({"engines", "proxy", "node"} - {k for k, v in now.items() if v is not None})
    log(f"published {len(values)} metrics for {config['stack']}/{replica}"
        + (f"; not answering: {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
