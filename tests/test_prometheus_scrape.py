"""A real Prometheus (Debian's) scrapes a node's rendered scrape targets on loopback while a load
runs through a real Caddy into fake engines serving the pinned engines' metric names, and the
dashboard's own PromQL (observability.DASHBOARD_PANELS) comes back with plausible values; the
stack's alert rules load and evaluate without error, the stalled-engine rule's expression picks out
an engine whose generation hangs, and a healthy node under load leaves every alert inactive.

What is real: Prometheus, its scrape of the rendered configuration, Caddy and its metrics, the
PromQL, the rules. What is not: the engine (tests/fakes/fake_engine.py, serving vLLM's or SGLang's
names and buckets, its counters moved by the requests it streams), and, stated as such, the GPU
exporter and the node-state exporter: tiny endpoints in this test serving the catalog's DCGM names
and the node-state names with fixed values (no GPU here). Each target's port is remapped from the
stack's (engine ports, 9400, 9182, 9183) to a free one; everything else is the rendered config.
"""

from __future__ import annotations

import math
import shutil
import threading
import time

import httpx
import pytest

from kimi_fleet import catalog, observability
from kimi_fleet.stackfile import load_stack_config, stack_file
from tests.fakes.harness import wait_for
from tests.fakes.observed_node import (API_KEY, FB_FREE, FB_USED, GPU_UTIL, GPUS, POWER, PROMETHEUS, RELEASE, load,
                                       observed_node, stack_for)

pytestmark = [
    pytest.mark.skipif(PROMETHEUS is None or shutil.which("caddy") is None,
                       reason="prometheus and caddy binaries needed (.ci/run installs them)"),
    pytest.mark.timeout(120),
]


def _post_and_wait(proxy_url: str) -> None:
    """A generation that will hang: its client waits until the engine is stopped."""
    try:
        httpx.post(f"{proxy_url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": "kimi-k2.6", "messages": [{"role": "user", "content": "hang"}]}, timeout=60)
    except httpx.HTTPError:
        pass


@pytest.mark.parametrize("engine", sorted(catalog.ENGINE_METRICS))
def test_prometheus_scrapes_the_rendered_targets_and_answers_the_dashboards_queries(engine, tmp_path):
    stack = stack_for(engine)
    spec = load_stack_config(stack_file(stack)).spec()
    hang_file = tmp_path / "hang"
    # three slots: the hung request keeps one, two serve the load
    with observed_node(stack, tmp_path, max_running=3, hang_file=hang_file) as node:
        prometheus = node.prometheus
        # First the engine stalls: a generation hangs (running 1, no token yet). The stalled rule's own
        # expression picks out that engine from the real scrapes (the alert goes pending: `for` runs).
        # The hung request keeps one of the two slots for the rest of the test.
        hang_file.touch()
        hung = threading.Thread(target=lambda: _post_and_wait(node.proxy_url), daemon=True)
        hung.start()
        stalled_rule = next(r for r in observability.alert_rules(spec) if r.name == "KimiEngineStalled")
        assert wait_for(lambda: prometheus.values(stalled_rule.expr), 15, 0.5), stalled_rule.expr
        (key, value), = prometheus.values(stalled_rule.expr).items()
        assert value == 1 and "replica=0" in key
        assert wait_for(lambda: [a for a in prometheus.get("/api/v1/alerts")["data"]["alerts"]
                                 if a["labels"]["alertname"] == "KimiEngineStalled" and a["state"] == "pending"], 10, 0.5)
        hang_file.unlink()
        panels = {p.title: p for p in observability.DASHBOARD_PANELS}
        running_q, waiting_q = (q.promql(engine, stack) for q in panels["Requests running and waiting"].queries)
        seen = {"running": 0.0, "waiting": 0.0}

        def watch():
            while not done.is_set():
                for key, q in (("running", running_q), ("waiting", waiting_q)):
                    for value in prometheus.values(q).values():
                        seen[key] = max(seen[key], value)
                time.sleep(0.5)
        done = threading.Event()
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            counts = load(node.proxy_url, seconds=8, workers=7)
        finally:
            done.set()
            watcher.join()
        assert counts["ok"] > 10 and counts["unauthorized"] > 3 and counts["other"] == 0, counts
        # Requests ran, and beyond the two slots per engine they waited: the gauges moved under load;
        # tokens flowing again, the stalled alert went back to inactive (checked with the others below).
        assert seen["running"] >= 2 and seen["waiting"] >= 1, seen
        time.sleep(2.5)  # two more scrapes after the load

        answers = {}
        for panel in observability.DASHBOARD_PANELS:
            for query in panel.queries:
                result = prometheus.values(query.promql(engine, stack))
                assert result, (panel.title, query.promql(engine, stack))
                assert all(not math.isnan(v) for v in result.values()), panel.title
                answers[(panel.title, query.legend)] = result
        # The engine's own labels survive the scrape (vLLM's `engine` is not renamed exported_engine)
        # beside the node's: stack, replica, engine_index.
        names = catalog.ENGINE_METRICS[engine]
        (series,) = prometheus.query(f'{names.running}{{stack="{stack}"}}')
        assert {"stack", "replica", observability.ENGINE_INDEX_LABEL, "model_name", *names.labels} <= set(series["metric"])
        assert not any(label.startswith("exported_") for label in series["metric"]), series["metric"]
        # The stack's rules were loaded and evaluated against these series without error.
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rule_health = {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
        firing = [a["labels"]["alertname"] for a in prometheus.get("/api/v1/alerts")["data"]["alerts"]]


    def one(title: str, legend: str = "{{replica}}") -> float:
        (key, value), = answers[(title, legend)].items()
        assert key.startswith("replica=0"), key
        return value

    assert one("Generated tokens per second") > 0
    ttft50, ttft99 = one("Time to first token (p50, p99)", "p50 {{replica}}"), one("Time to first token (p50, p99)",
                                                                                        "p99 {{replica}}")
    # first token after the 0.05 s delay plus queueing behind the two slots: seconds at most
    assert 0.05 <= ttft50 <= ttft99 <= 30, (ttft50, ttft99)
    itl50 = one("Inter-token latency (p50, p99)", "p50 {{replica}}")
    assert 0.01 <= itl50 <= 0.5, itl50  # chunks every 0.02 s (loaded CI: slower, not 10x)
    assert 0 <= one("KV cache use") <= 1
    # The panels' rates span 5 minutes; this history is seconds long, so rate x 300 s is the count.
    # Caddy counted the tenant listener's requests only (the scrapes of its metrics site are not).
    sent = counts["ok"] + counts["unauthorized"]
    assert 0.6 * sent <= one("Proxy requests per second") * 300 <= 1.4 * sent, (sent, counts)
    assert one("Proxy 5xx ratio") == 0
    assert 0.6 * counts["unauthorized"] <= one("Proxy 401 per second") * 300 <= 1.4 * counts["unauthorized"]
    assert one("GPU utilisation") == GPU_UTIL
    assert one("GPU memory used") == pytest.approx(FB_USED / (FB_USED + FB_FREE))
    assert one("GPU power") == GPUS * POWER
    assert one("GPU XID errors (last window)") == 0
    assert one("Admitted and gate passed", "admitted {{replica}}") == 1
    assert one("Admitted and gate passed", "gate {{replica}}") == 1
    (key, value), = answers[("Release per replica", "{{replica}} {{release}}")].items()
    assert f"release={RELEASE}" in key and value == 1
    assert sorted(rule_health) == sorted(observability.ALERT_NAMES)
    assert set(rule_health.values()) == {"ok"}, rule_health
    # A healthy node under load: nothing pending or firing, except the TTFT alert exactly when the
    # queue behind the two slots pushed the p99 over the stack's objective.
    expected = {"KimiTtftAboveObjective"} if ttft99 > spec.monitoring.ttft_p99_seconds else set()
    assert set(firing) == expected, (firing, ttft99)
