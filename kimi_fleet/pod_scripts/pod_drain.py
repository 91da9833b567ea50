#!/usr/bin/env python3
"""Drain an engine pod before it stops (its engine container's preStop hook): wait until its engine
has no request running and none waiting, by the engine's own /metrics, or until the timeout; then
write the verdict file the proxy container's preStop waits for, so Caddy keeps the streams open
until the engine has finished them.

A pod that is being deleted has already left the Service's endpoints (no new request reaches it),
so the counts only fall. Standard library only: it runs in the engine container beside
generation_probe.py (the probe ConfigMap), whose engine_load reads the metrics.

usage: pod_drain.py METRICS_JSON BASE_URL TIMEOUT_SECONDS DRAINED_FILE
  METRICS_JSON  the engine's own names: {"generated": ..., "running": ..., "waiting": ...}
  BASE_URL      the engine on loopback, e.g. http://127.0.0.1:8000
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generation_probe import engine_load, load_metric_names  # noqa: E402  (beside it in the ConfigMap)

#: How often the engine's /metrics is read while requests remain.
POLL_SECONDS = 5
USAGE = "usage: pod_drain.py METRICS_JSON BASE_URL TIMEOUT_SECONDS DRAINED_FILE"


def drain(base_url: str, metrics: dict, timeout: float, *, clock=time.monotonic, sleep=time.sleep,
          load=engine_load) -> str:
    """Wait for 0 running and 0 waiting; the verdict in words."""
    deadline = clock() + timeout
    while True:
        current = load(base_url, metrics)
        if current is None:
            return "the engine's /metrics does not answer: nothing to wait for"
        busy = current["running"] + current["waiting"]
        if busy == 0:
            return "drained: 0 running, 0 waiting"
        if clock() >= deadline:
            return (f"gave up after {timeout:g} s with {current['running']:g} running and "
                    f"{current['waiting']:g} waiting")
        sleep(min(POLL_SECONDS, max(0.0, deadline - clock())))


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(USAGE, file=sys.stderr)
        return 2
    metrics = load_metric_names(argv[0])
    try:
        timeout = float(argv[2])
    except ValueError:
        timeout = -1.0
    if metrics is None or timeout < 0:
        print(USAGE, file=sys.stderr)
        return 2
    verdict = drain(argv[1], metrics, timeout)
    print(f"[kimi-drain] {verdict}", flush=True)
    done = Path(argv[3])
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"verdict": verdict}) + "\n")
    return 0  # a failed hook only adds an event: the pod stops either way


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
