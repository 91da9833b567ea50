"""Issue 24, scale to zero on Kubernetes: the wake front (kimi_fleet/k8s_wake.py). Its Caddyfile run by a
real Caddy on loopback (503 with Retry-After and the JSON error for an accepted key, 401 for a wrong one,
404 for an unknown route, and the count KEDA's query reads in its metrics), the query evaluated by
Prometheus' own engine (promtool) on the series Caddy creates, the readiness script under busybox sh,
the objects against the Kubernetes schemas and the published CRDs, who selects and reaches the front,
the component under the mocks, and the plan of a stack file that scales to zero."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kimi_fleet import catalog
from kimi_fleet import k8s_manifests as manifests
from kimi_fleet import k8s_wake as wake
from kimi_fleet.autoscaling import scaling_policy
from kimi_fleet.caddy import PREVIOUS_API_KEY_ENV
from kimi_fleet.launch import render_launch
from kimi_fleet.pod_scripts import pod_script
from kimi_fleet.sizing import size
from kimi_fleet.spec import StackSpecError
from policy.validators import check_resources
from tests.fakes.harness import free_port, start_caddy, validate_caddyfile
from tests.test_k8s_observability import (
    K8S_VERSION, admitted, integral, resolve, scaling_values, source, the,
)
from tooling import monitoring_schema

STACK = "gb200-int4-vllm"
ZERO = {"workload": "batch", "market": "on-demand", "replicas": 1,
        "scaling": {"minReplicas": 0, "maxReplicas": 3, "waitingPerReplica": 4}}
KEY, PREVIOUS = "wake-test-key-0123456789abcdef", "wake-old-key-fedcba9876543210"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def zero_values(**capacity) -> dict:
    given = scaling_values(STACK, capacity={**copy.deepcopy(ZERO), **capacity})
    given["apiKeyRotation"] = {"acceptPrevious": True}
    return given


@pytest.fixture(scope="module")
def stack():
    r = resolve(STACK, zero_values())
    sizing, launch = size(r), render_launch(r)
    return {"r": r, "sizing": sizing, "launch": launch, "policy": scaling_policy(r, sizing),
            "objects": manifests.render_manifests(r, sizing, launch, stack=STACK),
            "wake": wake.render_wake_objects(r, sizing, launch, stack=STACK),
            "monitoring": manifests.render_monitoring(r, sizing, stack=STACK)}


# --- the front's Caddy, for real --------------------------------------------------------------------

def _metric(text: str, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include `labels` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            if labels.items() <= found.items():
                total += float(match.group(2))
    return total


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy needed (Debian's package)")
def test_a_real_caddy_answers_as_the_front_promises_and_counts_only_valid_keys(stack):
    import httpx

    r, policy = stack["r"], stack["policy"]
    https_port, http_port, metrics_port = free_port(), free_port(), free_port()
    front = wake.render_wake_proxy(r, stack["sizing"], stack["launch"], domain="localhost", tls="internal",
                                   https_port=https_port, http_port=http_port, bind_host="127.0.0.1",
                                   metrics_port=metrics_port)
    # The rendered site is the stack's (its routes and Retry-After), only the listeners differ.
    production = wake.render_wake_proxy(r, stack["sizing"], stack["launch"]).text
    assert f'Retry-After "{wake.RETRY_AFTER_SECONDS}"' in production and "bind" not in production
    env = {"KIMI_API_KEY": KEY, PREVIOUS_API_KEY_ENV: PREVIOUS}
    checked = validate_caddyfile(front.text, env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    base = f"https://localhost:{https_port}"
    with start_caddy(front.text, env, ready_url=f"{base}/v1/models") as caddy:
        with httpx.Client(verify=caddy.ssl_context(), timeout=10) as client:
            chat = {"model": "kimi", "messages": [{"role": "user", "content": "hi"}]}
            post = lambda path, key: client.post(f"{base}{path}", json=chat,  # noqa: E731
                                                 headers={"Authorization": f"Bearer {key}"} if key else {})
            waking = [post("/v1/chat/completions", KEY), post("/v1/completions?x=1", PREVIOUS)]
            listing = client.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            refused = [post("/v1/chat/completions", "wrong-key-0123456789abcdef"), post("/v1/chat/completions", None)]
            unknown = post("/flush_cache", KEY)
            wrong_method = client.get(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
            metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
            other = httpx.get(f"http://127.0.0.1:{metrics_port}/v1/models", timeout=10)
    for answer in (*waking, listing):
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == str(wake.RETRY_AFTER_SECONDS) == "60"  # not the whole wake
        assert answer.headers["Content-Type"] == "application/json"
        error = answer.json()["error"]
        assert error["code"] == "scaling_from_zero" and "scales to zero" in error["message"]
        assert f"about {round(policy.instance_warmup_seconds / 60)} min" in error["message"]
    for answer in refused:
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
        assert "Retry-After" not in answer.headers
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_route"
    assert wrong_method.status_code == 405
    assert metrics.status_code == 200 and other.status_code == 404
    # What KEDA's query selects (code 503): the three requests with a valid key, not the 401s, 404 or 405.
    duration = f"{catalog.PROXY_METRICS.request_duration}_count"
    assert _metric(metrics.text, duration, code="503") == 3
    assert _metric(metrics.text, duration, code="401", method="POST") == 2  # (the readiness wait GETs too)


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy needed (Debian's package)")
def test_a_real_caddy_front_forwards_the_cas_challenges_and_nothing_else_on_port_80(stack):
    """A waking engine pod is not in the public Service: the CA's HTTP-01 challenge for the certificate it
    asked for reaches the front. The front (a real Caddy) forwards a GET of a challenge path, with no key,
    to the engine pods' Service (here a fake upstream on loopback, which records what it gets), keeping the
    Host; anything else on port 80 is redirected to HTTPS and never forwarded, and neither counts as
    demand. The production text names the headless Service of every engine pod."""
    import http.server
    import threading

    import httpx

    r = stack["r"]
    production = wake.render_wake_proxy(r, stack["sizing"], stack["launch"]).text
    assert f"reverse_proxy {wake.acme_service_upstream(r)}" in production
    env = {"KIMI_API_KEY": KEY, PREVIOUS_API_KEY_ENV: PREVIOUS}
    checked = validate_caddyfile(production, env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    seen: list[tuple[str, str, str, str | None]] = []

    class Engine(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.command, self.path, self.headers["Host"], self.headers.get("Authorization")))
            body = f"{self.path.rsplit('/', 1)[-1]}.key-authorization".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    https_port, http_port, metrics_port = free_port(), free_port(), free_port()
    try:
        front = wake.render_wake_proxy(r, stack["sizing"], stack["launch"], domain="localhost", tls="internal",
                                       https_port=https_port, http_port=http_port, bind_host="127.0.0.1",
                                       metrics_port=metrics_port,
                                       challenge_upstream=f"127.0.0.1:{upstream.server_address[1]}")
        base, plain = f"https://localhost:{https_port}", f"http://localhost:{http_port}"
        with start_caddy(front.text, env, ready_url=f"{base}/v1/models"), \
                httpx.Client(timeout=10, follow_redirects=False) as client:
            challenge = client.get(f"{plain}/.well-known/acme-challenge/tok-123_abc")
            posted = client.post(f"{plain}/.well-known/acme-challenge/tok-123_abc")
            others = [client.get(f"{plain}{path}", headers={"Authorization": f"Bearer {KEY}"})
                      for path in ("/v1/models", "/.well-known/other", "/health", "/")]
            chat = client.post(f"{plain}/v1/chat/completions", json={"model": "kimi"},
                               headers={"Authorization": f"Bearer {KEY}"})
            metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    finally:
        upstream.shutdown()
        upstream.server_close()
    assert challenge.status_code == 200 and challenge.text == "tok-123_abc.key-authorization"
    assert seen == [("GET", "/.well-known/acme-challenge/tok-123_abc", f"localhost:{http_port}", None)]
    for answer in (posted, *others, chat):
        assert answer.status_code == 308 and answer.headers["Location"].startswith("https://localhost")
    assert _metric(metrics, f"{catalog.PROXY_METRICS.request_duration}_count", code="503") == 0


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy needed (Debian's package)")
def test_a_real_prometheus_scraping_the_front_as_its_pod_monitor_says_reads_the_first_valid_request(stack, tmp_path):
    """Prometheus (Debian's) scrapes the real front's metrics with the relabelings the Operator makes of the
    wake PodMonitor, and KEDA's own query reads 0 with no request and after a wrong key or an unknown
    route, and 1 (active: 0 -> 1) from the first valid request: the series Caddy creates at that request is
    counted from 0."""
    import httpx

    from tests.fakes.harness import wait_for
    from tests.fakes.observed_node import PROMETHEUS, run_prometheus
    from tests.test_k8s_observability import _operator_relabelings

    if PROMETHEUS is None:
        pytest.skip("prometheus binary needed (.ci/run installs it)")
    r = stack["r"]
    monitor = the([o for o in stack["monitoring"] if o["kind"] == "PodMonitor"], "PodMonitor", wake.WAKE_POD_MONITOR)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (trigger,) = [t for t in the(stack["monitoring"], "ScaledObject")["spec"]["triggers"] if t["name"] == "wake"]
    https_port, http_port, metrics_port = free_port(), free_port(), free_port()
    front = wake.render_wake_proxy(r, stack["sizing"], stack["launch"], domain="localhost", tls="internal",
                                   https_port=https_port, http_port=http_port, bind_host="127.0.0.1",
                                   metrics_port=metrics_port)
    pod = {"__meta_kubernetes_namespace": r.spec.target.kubernetes.namespace,
           "__meta_kubernetes_pod_container_name": "wake", "__meta_kubernetes_pod_name": "kimi-wake-5d9f-x2x7q",
           "__meta_kubernetes_pod_container_port_name": wake.WAKE_METRICS_PORT_NAME}
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [{
        "job_name": "podMonitor/kimi-wake", "metrics_path": endpoint["path"], "scheme": endpoint["scheme"],
        "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"], "labels": pod}],
        "relabel_configs": _operator_relabelings(endpoint)}]}
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    base = f"https://localhost:{https_port}"
    chat = {"model": "kimi", "messages": [{"role": "user", "content": "hi"}]}
    env = {"KIMI_API_KEY": KEY, PREVIOUS_API_KEY_ENV: PREVIOUS}
    with start_caddy(front.text, env, ready_url=f"{base}/v1/models") as caddy, \
            run_prometheus(path, tmp_path) as prometheus, \
            httpx.Client(verify=caddy.ssl_context(), timeout=10) as client:
        duration = f"{catalog.PROXY_METRICS.request_duration}_count"
        assert wait_for(lambda: prometheus.values(f'{duration}{{job="{wake.WAKE_JOB}"}}'), 30, 0.2)
        assert prometheus.values(trigger["metadata"]["query"]) == {"": 0.0}
        wrong = client.post(f"{base}/v1/chat/completions", json=chat, headers={"Authorization": "Bearer wrong-key-x"})
        unknown = client.post(f"{base}/flush_cache", json=chat, headers={"Authorization": f"Bearer {KEY}"})
        assert wrong.status_code == 401 and unknown.status_code == 404
        assert wait_for(lambda: prometheus.values(f'{duration}{{code="401",method="POST"}}')
                        and prometheus.values(f'{duration}{{code="404"}}'), 30, 0.2)
        assert prometheus.values(trigger["metadata"]["query"]) == {"": 0.0}  # neither wakes anything
        # The verification gate's wait: a GET of the model list with the key.
        first = client.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert first.status_code == 503
        assert wait_for(lambda: prometheus.values(trigger["metadata"]["query"]) == {"": 1.0}, 30, 0.2), (
            prometheus.values(f'{duration}{{code="503"}}'))
        (series,) = prometheus.query(f'{duration}{{code="503"}}')
        assert series["metric"]["namespace"] == r.spec.target.kubernetes.namespace
        assert series["metric"]["job"] == wake.WAKE_JOB and series["metric"]["replica"] == pod[
            "__meta_kubernetes_pod_name"]


def test_the_front_refuses_what_would_break_its_caddyfile(stack):
    with pytest.raises(ValueError, match="where the front listens only"):
        wake.render_wake_proxy(stack["r"], stack["sizing"], stack["launch"], retry_after_seconds=1)
    from kimi_fleet.caddy import render_wake
    with pytest.raises(ValueError, match="placeholder"):
        render_wake("kimi.example.com", "/health", retry_after_seconds=60, message="{env.KIMI_API_KEY}",
                    metrics_port=9185)
    with pytest.raises(ValueError, match="Retry-After"):
        render_wake("kimi.example.com", "/health", retry_after_seconds=0, message="m", metrics_port=9185)
    for upstream in ("{env.KIMI_API_KEY}:80", "http://kimi-engine-acme:80", "kimi-engine-acme", "a b:80", "x:99999"):
        with pytest.raises(ValueError, match="challenge_upstream|port"):
            render_wake("kimi.example.com", "/health", retry_after_seconds=60, message="m", metrics_port=9185,
                        challenge_upstream=upstream)
    fixed = resolve(STACK, scaling_values(STACK))
    with pytest.raises(ValueError, match="scales to zero"):
        wake.render_wake_proxy(fixed, size(fixed), render_launch(fixed))


# --- the demand query in Prometheus' own engine -----------------------------------------------------

def test_the_wake_query_sees_the_first_request_where_increase_would_not(stack, tmp_path):
    """Caddy creates the 503 series at the first such answer (the real Caddy above shows it only after
    one), so the series' first sample is already 1. promtool evaluates the trigger's own query on that:
    active from the first request, 0 again DEMAND_WINDOW after the last one, and kept active by an engine's
    running request; sum(increase()) over the same window never sees the first request."""
    (trigger,) = [t for t in the(stack["monitoring"], "ScaledObject")["spec"]["triggers"] if t["name"] == "wake"]
    query = trigger["metadata"]["query"]
    ns = stack["r"].spec.target.kubernetes.namespace
    series = (f'{catalog.PROXY_METRICS.request_duration}_count{{namespace="{ns}",job="{wake.WAKE_JOB}",code="503",'
              f'method="POST",replica="kimi-wake-1",server="srv0",handler="static_response"}}')
    get = series.replace('method="POST"', 'method="GET"')
    running = (f'{catalog.ENGINE_METRICS["vllm"].running}{{namespace="{ns}",job="kimi-engine",'
               f'replica="kimi-engine-on-demand-1"}}')
    naive = f'sum(increase({series.split("{")[0]}{{job="{wake.WAKE_JOB}"}}[{wake.DEMAND_WINDOW}]))'
    # one sample a minute: no series for 3 min, the first POST at 3 min, a second at 20 min; an engine
    # runs a request from 30 to 32 min
    tests = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": series, "values": "_ _ _ 1x16 2x20"},
                         # a GET (the gate's wait) at 40 min: a series of its own, counted from 0 too
                         {"series": get, "values": "_x39 1x10"},
                         {"series": running, "values": "_x29 1 1 1 0x5"}],
        "promql_expr_test": [
            {"expr": query, "eval_time": "2m", "exp_samples": [{"labels": "{}", "value": 0}]},
            {"expr": query, "eval_time": "3m", "exp_samples": [{"labels": "{}", "value": 1}]},
            {"expr": query, "eval_time": "7m", "exp_samples": [{"labels": "{}", "value": 1}]},
            {"expr": query, "eval_time": "8m", "exp_samples": [{"labels": "{}", "value": 0}]},
            {"expr": query, "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": 1}]},
            {"expr": query, "eval_time": "26m", "exp_samples": [{"labels": "{}", "value": 0}]},
            {"expr": query, "eval_time": "31m", "exp_samples": [{"labels": "{}", "value": 1}]},
            {"expr": query, "eval_time": "34m", "exp_samples": [{"labels": "{}", "value": 0}]},
            {"expr": query, "eval_time": "40m", "exp_samples": [{"labels": "{}", "value": 1}]},
            {"expr": query, "eval_time": "45m", "exp_samples": [{"labels": "{}", "value": 0}]},
            # what a rate-based query would have read at the first request: nothing
            {"expr": naive, "eval_time": "3m", "exp_samples": []},
            {"expr": naive, "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 0}]},
        ]}]}
    path = tmp_path / "wake_test.yaml"
    path.write_text(yaml.safe_dump(tests))
    done = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _promtool_test(tmp_path, tests: dict, name: str = "wake_test.yaml") -> None:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tests))
    done = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_wake_query_sees_the_first_request_after_caddy_restarted_in_the_same_pod(stack, tmp_path):
    """A restart of the front's Caddy in the same pod (the readiness script's own restart, the liveness
    probe, an OOM kill) resets its counter (or Caddy creates the series again at its next 503): the first
    valid request after it still wakes a replica, at once, where a difference with the value the window
    ago read it as negative (0 for the window). Also: nothing, a wrong key's 401s, and the first request
    ever, each on its own."""
    (trigger,) = [t for t in the(stack["monitoring"], "ScaledObject")["spec"]["triggers"] if t["name"] == "wake"]
    query = trigger["metadata"]["query"]
    ns = stack["r"].spec.target.kubernetes.namespace
    labels = (f'namespace="{ns}",job="{wake.WAKE_JOB}",method="POST",replica="kimi-wake-1",server="srv0",'
              'handler="static_response"')
    count = f"{catalog.PROXY_METRICS.request_duration}_count"
    series = f'{count}{{{labels},code="503"}}'
    unauthorized = f'{count}{{{labels},code="401"}}'
    answered = manifests.wake_answered_series(stack["r"])
    former = f"sum(clamp_min({answered} - ({answered} offset {wake.DEMAND_WINDOW} or {answered} * 0), 0))"

    # the front's own scrapes (every one succeeding unless a case says otherwise)
    up = f'up{{namespace="{ns}",job="{wake.WAKE_JOB}",replica="kimi-wake-1",{manifests.STACK_LABEL}="{STACK}"}}'

    def case(values: str, checks: list[tuple[str, float]], *, extra: tuple = (), expr: str = query,
             scrapes: str = "1x60") -> dict:
        return {"interval": "30s", "input_series": [{"series": series, "values": values},
                                                    {"series": up, "values": scrapes}, *extra],
                "promql_expr_test": [{"expr": expr, "eval_time": at, "exp_samples": [{"labels": "{}", "value": v}]}
                                     for at, v in checks]}

    tests = {"rule_files": [], "evaluation_interval": "30s", "tests": [
        # 4 answered before; Caddy restarts at 10m (the counter reads 0), one valid request at 10.5m
        case("4x19 0 1x10", [("9m", 0), ("10m", 0), ("10m30s", 1), ("11m", 1), ("15m", 1), ("16m", 0)]),
        case("4x19 0 1x10", [("11m", 0), ("15m", 1)], expr=former),  # what the difference read: nothing at once
        # the restarted Caddy has no 503 series until its first 503 (a stale marker in between)
        case("4x19 stale 1x10", [("10m", 0), ("10m30s", 1), ("11m", 1), ("15m", 1), ("16m", 0)]),
        # nothing: no 503 series at all, and wrong keys (401s) growing
        {"interval": "30s", "input_series": [{"series": unauthorized, "values": "1+1x40"}],
         "promql_expr_test": [{"expr": query, "eval_time": at, "exp_samples": [{"labels": "{}", "value": 0}]}
                              for at in ("1m", "10m", "20m")]},
        # the first request ever: the series is born at 5m with its first answer
        case("_x9 1x30", [("4m", 0), ("5m", 1), ("9m", 1), ("10m", 0), ("15m", 0)],
             extra=({"series": unauthorized, "values": "1+1x40"},)),
        # review 2: one old 503 (7, flat), then no scrape for 7 min (Prometheus down: no sample of `up` either;
        # the front's metrics unreachable: `up` 0 and the series marked stale), longer than Prometheus' 5-min
        # lookback, then scrapes again; no new request at all. `unless A offset <window>` alone read it as born
        # from 30m to 32m and woke a replica.
        *({"interval": "1m", "input_series": [{"series": series, "values": values}, {"series": up, "values": scrapes}],
           "promql_expr_test": [{"expr": query, "eval_time": f"{at}m", "exp_samples": [{"labels": "{}", "value": 0}]}
                                for at in (19, 20, 25, 28, 29, 30, 31, 32, 33, 35)]}
          for values, scrapes in (("7x20 _x7 7x15", "1x20 _x7 1x15"), ("7x20 stale _x6 7x15", "1x20 0x7 1x15"))),
        # the same gap, then a first valid request of a new series (another method) at 31m: counted at once
        {"interval": "1m", "input_series": [{"series": series, "values": "7x20 _x7 7x15"},
                                            {"series": up, "values": "1x20 _x7 1x15"},
                                            {"series": series.replace('method="POST"', 'method="GET"'),
                                             "values": "_x31 1x10"}],
         "promql_expr_test": [{"expr": query, "eval_time": f"{at}m", "exp_samples": [{"labels": "{}", "value": v}]}
                              for at, v in ((30, 0), (31, 1), (35, 1), (36, 0))]},
    ]}
    _promtool_test(tmp_path, tests)


def test_the_stuck_at_zero_alert_fires_when_no_wake_ends_and_not_on_a_wake_that_does(stack, tmp_path):
    """promtool runs the stack's PrometheusRule (as the Operator ships it) on the front's 503 answers to a
    client that retries every Retry-After: the woken pod never Ready (Pending for capacity, KEDA down) fires
    KimiStuckAtZero once the time to ready and the margin are past; a wake that ends
    within the time to ready (the front leaves, its answers stop), or a few minutes late, does not; the
    first-ever request's series counts from its birth."""
    from kimi_fleet import observability

    policy, r = stack["policy"], stack["r"]
    rule = the(stack["monitoring"], "PrometheusRule")["spec"]
    (stuck,) = [x for g in rule["groups"] for x in g["rules"] if x.get("alert") == observability.STUCK_AT_ZERO_ALERT]
    ready = -(-policy.instance_warmup_seconds // 60)
    minutes = ready + observability.STUCK_AT_ZERO_MARGIN_MINUTES
    assert stuck["for"] == f"{minutes}m" and stuck["labels"] == {"severity": "critical", "stack": STACK}
    assert wake.RETRY_AFTER_SECONDS == 60  # the input below: one retry a minute
    assert manifests.WAKE_ALERT_WINDOW_SECONDS == 2 * wake.RETRY_AFTER_SECONDS
    ns = r.spec.target.kubernetes.namespace
    series = (f'{catalog.PROXY_METRICS.request_duration}_count{{namespace="{ns}",job="{wake.WAKE_JOB}",code="503",'
              'method="POST",replica="kimi-wake-1",server="srv0",handler="static_response"}')
    firing = [{"exp_labels": stuck["labels"], "exp_annotations": stuck["annotations"]}]

    def case(values: str, checks: list[tuple[int, bool]]) -> dict:
        return {"interval": "1m", "input_series": [{"series": series, "values": values}],
                "alert_rule_test": [{"eval_time": f"{at}m", "alertname": observability.STUCK_AT_ZERO_ALERT,
                                     "exp_alerts": firing if fires else []} for at, fires in checks]}

    def ends(end: int) -> str:
        """A retry a minute answered 503 up to `end` (an engine Ready then), none after."""
        return f"1+1x{end} {end + 1}x80"

    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [
        # stuck: the front answers every retry for 90 minutes
        case("1+1x90", [(minutes - 2, False), (minutes + 1, True), (90, True)]),
        # a wake as planned (an engine Ready at the time to ready), 7 and 12 minutes late (review 2: with the
        # 5-min window a wake ending at ttr + 11 paged at ttr + 15 while the engine served): never fires
        *(case(ends(ready + late), [(at, False) for at in range(ready + late, ready + late + 10)])
          for late in (0, 7, 12)),
        # stuck after an earlier wake that went well (its answers ended): counted from the new wake
        case(f"1+1x{ready - 1} {ready}x30 {ready + 1}+1x90",
             [(ready + 31 + minutes - 2, False), (ready + 31 + minutes + 1, True)]),
    ]}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule))
    _promtool_test(tmp_path, tests, "stuck_test.yaml")
    # Only a stack that scales to zero has it; the rules every target shares (ALERT_NAMES, each with its
    # CloudWatch twin) do not include it.
    assert observability.STUCK_AT_ZERO_ALERT not in observability.ALERT_NAMES
    keeps = resolve(STACK, scaling_values(STACK, capacity={**ZERO, "scaling": {**ZERO["scaling"], "minReplicas": 1}}))
    kept = the(manifests.render_monitoring(keeps, size(keeps), stack=STACK), "PrometheusRule")["spec"]
    assert observability.STUCK_AT_ZERO_ALERT not in [x.get("alert") for g in kept["groups"] for x in g["rules"]]


# --- the readiness: no engine Ready ---------------------------------------------------------------

#: busybox nslookup's answers (busybox 1.35, Debian's, run here: a name with an address, NXDOMAIN, no
#: server reachable; "No answer" is its NODATA line, networking/nslookup.c).
FOUND = ("Server:\t\t10.96.0.10\nAddress:\t10.96.0.10:53\n\nNon-authoritative answer:\n"
         "Name:\tkimi-engine-ready.kimi-gb200.svc.cluster.local\nAddress: 10.244.1.7\n\n")
NXDOMAIN = ("Server:\t\t10.96.0.10\nAddress:\t10.96.0.10:53\n\n** server can't find "
            "kimi-engine-ready.kimi-gb200.svc.cluster.local: NXDOMAIN\n\n")
NO_ANSWER = ("Server:\t\t10.96.0.10\nAddress:\t10.96.0.10:53\n\n*** Can't find "
             "kimi-engine-ready.kimi-gb200.svc.cluster.local: No answer\n\n")
TIMEOUT = ";; connection timed out; no servers could be reached\n\n"


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox needed")
def test_the_readiness_script_under_busybox_sh_is_ready_only_while_no_engine_is(stack, tmp_path):
    (config,) = [o for o in stack["wake"] if o["kind"] == "ConfigMap"]
    script = tmp_path / wake.READY_SCRIPT
    script.write_text(config["data"][wake.READY_SCRIPT])
    assert config["data"][wake.READY_SCRIPT] == pod_script(wake.READY_SCRIPT)
    (deployment,) = [o for o in stack["wake"] if o["kind"] == "Deployment"]
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["sh", f"{wake.WAKE_MOUNT}/{wake.READY_SCRIPT}"]
    assert probe[2] == "kimi-engine-ready.kimi-gb200.svc.cluster.local." and probe[3] == wake.READY_STATE
    domain = stack["r"].spec.domain
    assert probe[4:] == ["/data/caddy/certificates", domain, "1"]  # a public certificate
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answer = tmp_path / "answer"
    stub = bin_dir / "nslookup"
    # The stub checks it is asked what the probe asks, then answers as busybox would.
    stub.write_text(f'#!/bin/sh\n[ "$1" = -type=a ] && [ "$2" = "{probe[2]}" ] || exit 9\n'
                    f'cat {answer}\n[ -n "$(grep Name: {answer})" ]\n')
    stub.chmod(0o755)
    state = tmp_path / "state"

    def probe_once(output: str) -> int:
        answer.write_text(output)
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
        return subprocess.run(["busybox", "sh", str(script), probe[2], str(state)], env=env,
                              capture_output=True, text=True, timeout=30).returncode

    assert probe_once(TIMEOUT) == 1 and not state.exists()  # nothing known yet: stay out
    assert probe_once(NXDOMAIN) == 0 and state.read_text() == "none\n"  # no engine Ready: the front serves
    assert probe_once(TIMEOUT) == 0  # a DNS blip keeps the last verdict
    assert probe_once(FOUND) == 1 and state.read_text() == "engine\n"  # an engine is Ready: the front leaves
    assert probe_once(TIMEOUT) == 1
    assert probe_once(NO_ANSWER) == 0


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox needed")
def test_alone_without_its_certificate_for_ten_minutes_the_front_restarts_caddy(tmp_path):
    """Caddy's ACME attempts back off for hours after failures (the CA's challenge reaches an engine pod
    while the front is not an endpoint): alone and without a certificate 10 minutes after Caddy started
    (or was restarted), the probe restarts Caddy so it asks now; never while an engine is Ready, never
    with a certificate, at most once per 10 minutes."""
    script = tmp_path / wake.READY_SCRIPT
    script.write_text(pod_script(wake.READY_SCRIPT))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answer = tmp_path / "answer"
    (bin_dir / "nslookup").write_text(f"#!/bin/sh\ncat {answer}\n")
    (bin_dir / "nslookup").chmod(0o755)
    certificates = tmp_path / "data" / "caddy" / "certificates"
    state = tmp_path / "state"

    def probe(output: str) -> tuple[int, bool]:
        """(exit status, whether the stand-in for Caddy was signalled)."""
        answer.write_text(output)
        caddy = subprocess.Popen(["sleep", "60"])
        try:
            done = subprocess.run(["busybox", "sh", str(script), "kimi-engine-ready.ns.svc.cluster.local.",
                                   str(state), str(certificates), "kimi.example.com", str(caddy.pid)],
                                  env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
            said = "restarting Caddy" in done.stdout
            # The signal is sent before the script exits: a signalled stand-in is gone at once.
            killed = caddy.wait(timeout=10) is not None if said else caddy.poll() is not None
        finally:
            caddy.kill()
            caddy.wait()
        return done.returncode, killed

    asking = f"{state}.asking"
    old = time.time() - 11 * 60
    assert probe(NXDOMAIN) == (0, False)  # Caddy has just started: it asks by itself first
    assert probe(NXDOMAIN) == (0, False)  # and has 10 minutes for it
    os.utime(asking, (old, old))
    assert probe(FOUND) == (1, False)  # an engine serves: the front is not an endpoint, the CA cannot reach it
    assert probe(NXDOMAIN) == (0, True)  # alone, still without a certificate: Caddy restarts and asks now
    assert probe(NXDOMAIN) == (0, False)  # not again within 10 minutes
    os.utime(asking, (old, old))
    assert probe(NXDOMAIN) == (0, True)  # again after 10 minutes
    os.utime(asking, (old, old))
    issued = certificates / "acme-v02.api.letsencrypt.org-directory" / "kimi.example.com"
    issued.mkdir(parents=True)
    (issued / "kimi.example.com.crt").write_text("certificate")
    assert probe(NXDOMAIN) == (0, False)  # it has one: nothing to do


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck needed")
def test_the_readiness_script_passes_shellcheck_as_posix_sh(tmp_path):
    script = tmp_path / wake.READY_SCRIPT
    script.write_text(pod_script(wake.READY_SCRIPT))
    done = subprocess.run(["shellcheck", "--shell=sh", "--severity=style", str(script)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _resolves(name: str) -> bool:
    import socket

    try:
        return bool(socket.getaddrinfo(name, 443))
    except OSError:
        return False


@pytest.mark.skipif(shutil.which("busybox") is None or not _resolves("pypi.org"),
                    reason="busybox and a working resolver needed")
def test_the_readiness_script_with_busybox_s_own_nslookup_and_a_real_resolver(tmp_path):
    """The same script with busybox's nslookup itself (no stub) against this machine's resolver: a name with
    an address reads as an engine Ready, a name that does not exist as none."""
    script = tmp_path / wake.READY_SCRIPT
    script.write_text(pod_script(wake.READY_SCRIPT))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nslookup").symlink_to(shutil.which("busybox"))

    def probe(name: str) -> int:
        return subprocess.run(["busybox", "sh", str(script), name, str(tmp_path / "state")],
                              env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, capture_output=True, timeout=60).returncode

    assert probe("pypi.org.") == 1 and (tmp_path / "state").read_text() == "engine\n"
    assert probe("kimi-engine-ready.no-such-namespace.invalid.") == 0 and (tmp_path / "state").read_text() == "none\n"


# --- the objects -------------------------------------------------------------------------------------

def test_the_wake_objects_validate_against_the_kubernetes_schemas_and_the_crds(stack):
    kinds = [(o["kind"], o["metadata"]["name"]) for o in stack["wake"]]
    assert kinds == [("ConfigMap", wake.WAKE_CONFIGMAP), ("Service", wake.READY_SERVICE),
                     ("Service", wake.ACME_SERVICE), ("NetworkPolicy", wake.WAKE_INGRESS_POLICY),
                     ("NetworkPolicy", wake.WAKE_EGRESS_POLICY),
                     ("Deployment", wake.WAKE)]
    for obj in stack["wake"]:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    monitors = [o for o in stack["monitoring"] if o["kind"] in monitoring_schema.CRD_FILES]
    assert [o["kind"] for o in monitors] == ["PodMonitor", "PrometheusRule", "PodMonitor", "ScaledObject"]
    for obj in monitors:
        assert monitoring_schema.errors(obj) == [], obj["kind"]
    scaled = the(stack["monitoring"], "ScaledObject")["spec"]
    policy = stack["policy"]
    assert scaled["minReplicaCount"] == 0 and scaled["cooldownPeriod"] == policy.scale_in_cooldown_seconds
    # A client retrying after Retry-After keeps the trigger active through the whole wake (each retry within
    # the demand window of the one before); one that retries only after the time to ready finds it up too.
    assert wake.RETRY_AFTER_SECONDS < manifests.WAKE_DEMAND_WINDOW_SECONDS
    assert manifests.WAKE_DEMAND_WINDOW == f"{manifests.WAKE_DEMAND_WINDOW_SECONDS // 60}m"
    assert scaled["cooldownPeriod"] >= policy.instance_warmup_seconds
    assert [t["name"] for t in scaled["triggers"]] == ["waiting", "wake"]
    (trigger,) = [t for t in scaled["triggers"] if t["name"] == "wake"]
    assert trigger["metricType"] == "AverageValue" and trigger["metadata"]["threshold"] == "1"
    assert trigger["metadata"]["activationThreshold"] == "0" and trigger["metadata"]["query"].startswith("clamp_max(")
    # The YAML a hand-applier gets: the front in its own file (after kubernetes.yaml), the PodMonitor beside
    # the other monitoring objects.
    from kimi_fleet.artifacts import render_artifacts

    artifacts = render_artifacts(stack["r"], stack["sizing"], stack["launch"])
    assert [d for d in yaml.safe_load_all(artifacts["kubernetes-wake.yaml"]) if d] == stack["wake"]
    assert "kimi-wake" not in artifacts["kubernetes.yaml"]
    assert "name: kimi-wake" in artifacts["kubernetes-monitoring.yaml"]


@pytest.mark.parametrize("name, capacity", [
    (STACK, {**ZERO, "market": "spot"}),  # the spot Deployment scales: the ready Service selects its pods
    ("mi355x-int4-sglang", {**ZERO, "scaling": {"minReplicas": 0, "maxReplicas": 2, "ttftP99Seconds": 30}}),
])
def test_other_markets_and_the_ttft_signal_get_the_front_and_the_trigger_too(name, capacity):
    r = resolve(name, scaling_values(name, capacity=capacity))
    sizing, launch = size(r), render_launch(r)
    objects = wake.render_wake_objects(r, sizing, launch, stack=name)
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    market = manifests.scaled_market(r)
    assert the(objects, "Service", wake.READY_SERVICE)["spec"]["selector"]["kimi-fleet/capacity-type"] == market
    scaled = the(manifests.render_monitoring(r, sizing, stack=name), "ScaledObject")
    assert monitoring_schema.errors(scaled) == [] and scaled["spec"]["minReplicaCount"] == 0
    assert [t["name"] for t in scaled["spec"]["triggers"]] == [scaling_policy(r, sizing).metric, "wake"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == manifests.deployment_name(market)


def test_no_wake_front_for_a_stack_that_keeps_a_replica():
    r = resolve(STACK, scaling_values(STACK, capacity={**ZERO, "scaling": {**ZERO["scaling"], "minReplicas": 1}}))
    sizing, launch = size(r), render_launch(r)
    assert wake.render_wake_objects(r, sizing, launch, stack=STACK) == []
    assert wake.plan_lines(r, sizing) == [] and wake.render_wake_artifacts(r, sizing, launch) == {}
    monitoring = manifests.render_monitoring(r, sizing, stack=STACK)
    assert [o["metadata"]["name"] for o in monitoring if o["kind"] == "PodMonitor"] == [manifests.POD_MONITOR]
    assert [t["name"] for t in the(monitoring, "ScaledObject")["spec"]["triggers"]] == ["waiting"]


def _selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def test_the_public_service_selects_the_front_and_only_the_engines_count_as_ready(stack):
    objects, front_objects = stack["objects"], stack["wake"]
    public = the(objects, "Service", manifests.PROXY_SERVICE)["spec"]["selector"]
    ready = the(front_objects, "Service", wake.READY_SERVICE)["spec"]
    front = the(front_objects, "Deployment", wake.WAKE)["spec"]
    engine = the(objects, "Deployment", manifests.deployment_name("on-demand"))["spec"]
    front_pod, engine_pod = front["template"]["metadata"]["labels"], engine["template"]["metadata"]["labels"]
    assert _selects(public, front_pod) and _selects(public, engine_pod)
    assert ready["clusterIP"] == "None" and ready["publishNotReadyAddresses"] is False
    assert _selects(ready["selector"], engine_pod) and not _selects(ready["selector"], front_pod)
    # The CA's challenges go on to every engine pod, Ready or not (a waking one), never back to the front.
    challenges = the(front_objects, "Service", wake.ACME_SERVICE)["spec"]
    assert challenges["clusterIP"] == "None" and challenges["publishNotReadyAddresses"] is True
    assert _selects(challenges["selector"], engine_pod) and not _selects(challenges["selector"], front_pod)
    (port,) = challenges["ports"]
    assert port["port"] == 80 and port["targetPort"] == "http"
    engine_ports = {p["name"]: p["containerPort"] for c in engine["template"]["spec"]["containers"]
                    for p in c.get("ports", [])}
    assert engine_ports["http"] == 80
    assert wake.acme_service_upstream(stack["r"]) == "kimi-engine-acme.kimi-gb200.svc.cluster.local.:80"
    # Neither Deployment adopts the other's pods.
    assert not _selects(engine["selector"]["matchLabels"], front_pod)
    assert not _selects(front["selector"]["matchLabels"], engine_pod)
    # The engines' PodMonitor keeps only pods with its named port: the front has none of that name, and its
    # own PodMonitor selects the front alone, as job kimi-wake.
    front_ports = {p["name"] for c in front["template"]["spec"]["containers"] for p in c["ports"]}
    assert manifests.METRICS_PORT_NAME not in front_ports and wake.WAKE_METRICS_PORT_NAME in front_ports
    (engine_monitor, front_monitor) = [o for o in stack["monitoring"] if o["kind"] == "PodMonitor"]
    assert front_monitor["metadata"]["name"] == wake.WAKE_POD_MONITOR
    assert not _selects(front_monitor["spec"]["selector"]["matchLabels"], engine_pod)
    (endpoint,) = front_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == wake.WAKE_METRICS_PORT_NAME and endpoint["path"] == "/metrics"
    assert {"action": "replace", "targetLabel": "job", "replacement": wake.WAKE_JOB} in endpoint["relabelings"]
    assert front_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_the_front_runs_with_nothing_it_does_not_need(stack):
    pod = the(stack["wake"], "Deployment", wake.WAKE)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"} in pod["securityContext"]["sysctls"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    assert container["image"] == catalog.CADDY_IMAGE and "nvidia.com/gpu" not in json.dumps(pod)
    assert container["resources"] == wake.WAKE_RESOURCES
    # The keys as the engine pods' proxy reads them (the previous one optional: a rotation's overlap).
    keys = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert keys["KIMI_API_KEY"] == {"name": manifests.API_KEY_SECRET, "key": manifests.API_KEY_SECRET_KEY}
    assert keys[PREVIOUS_API_KEY_ENV]["optional"] is True


def test_only_prometheus_reaches_the_fronts_metrics_and_it_reaches_only_dns_pods_and_public_addresses(stack):
    r = stack["r"]
    policies = [o for o in stack["objects"] + stack["wake"] if o["kind"] == "NetworkPolicy"]
    template = the(stack["wake"], "Deployment", wake.WAKE)["spec"]["template"]
    pod = template["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    prometheus = source("monitoring", **{"app.kubernetes.io/name": "prometheus"})
    strangers = [source("tenant-a", app="client"), source("monitoring", **{"app.kubernetes.io/name": "grafana"}),
                 source(r.spec.target.kubernetes.namespace, app="debug")]
    assert admitted(policies, prometheus, pod, ports, wake.WAKE_METRICS_PORT)
    for stranger in strangers:
        assert not admitted(policies, stranger, pod, ports, wake.WAKE_METRICS_PORT)
        assert admitted(policies, stranger, pod, ports, 443) and admitted(policies, stranger, pod, ports, 80)
        assert not admitted(policies, stranger, pod, ports, 2019)  # Caddy's admin port: off, and closed
    # Out: where the front's packets may go, destination AND port. The stack's Service is a LoadBalancer:
    # a public certificate (ACME, OCSP over 80/443 to the CA, a public address) besides DNS (the cluster's
    # DNS pods only).
    assert manifests.proxy_tls(r) == "acme"
    dns = destination("10.244.0.5", "kube-system", **{"k8s-app": "kube-dns"})
    ca = destination("172.65.32.248")  # acme-v02.api.letsencrypt.org
    for port, protocol in ((53, "UDP"), (53, "TCP")):
        assert reaches(policies, pod, dns, port, protocol)
    for port in (80, 443):
        assert reaches(policies, pod, ca, port)
    others = {
        "the node's instance metadata": destination("169.254.169.254"),
        "the API server's Service": destination("10.96.0.1"),
        "an API server endpoint in 172.16/12": destination("172.20.0.10"),
        "a node on a 192.168 network": destination("192.168.1.20"),
        "a CGNAT-range pod": destination("100.64.3.7"),
        "loopback": destination("127.0.0.1"),
        "\"this network\" (RFC 1122)": destination("0.1.2.3"),
        "a pod in the RFC 2544 benchmarking range (EKS custom networking)": destination("198.19.4.5"),
        "the RFC 1112 reserved range": destination("240.0.0.1"),
        "an RFC 6890 IETF protocol assignment": destination("192.0.0.8"),
        "another pod of kube-system": destination("10.244.0.9", "kube-system", **{"k8s-app": "metrics-server"}),
        "a tenant's pod labelled as DNS": destination("10.244.2.3", "tenant-a", **{"k8s-app": "kube-dns"}),
    }
    for what, other in others.items():
        for port, protocol in ((80, "TCP"), (443, "TCP"), (53, "UDP"), (53, "TCP"), (6443, "TCP")):
            assert not reaches(policies, pod, other, port, protocol), (what, port, protocol)
    for port, protocol in ((53, "UDP"), (53, "TCP"), (22, "TCP"), (8000, "TCP")):
        assert not reaches(policies, pod, ca, port, protocol), port  # DNS to the Internet, other ports: no
    assert not reaches(policies, pod, dns, 443)
    # The engine pods: their plain-HTTP port only (the CA's challenges for a waking one), not HTTPS, the
    # engine's port or the metrics gate.
    engine = destination("10.244.1.7", r.spec.target.kubernetes.namespace, **manifests.labels(STACK, "engine"))
    assert reaches(policies, pod, engine, 80)
    for port, protocol in ((443, "TCP"), (8000, "TCP"), (9180, "TCP"), (80, "UDP"), (53, "UDP")):
        assert not reaches(policies, pod, engine, port, protocol), port
    assert not reaches(policies, pod, {**engine, "pod": {**engine["pod"], "namespace": "tenant-a"}}, 80)
    internal = resolve(STACK, {**zero_values(), "target": {**zero_values()["target"], "kubernetes": {
        **zero_values()["target"]["kubernetes"], "proxyServiceType": "ClusterIP"}}})
    objects = wake.render_wake_objects(internal, size(internal), render_launch(internal), stack=STACK)
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert reaches(policies, pod, dns, 53, "UDP")
    assert not reaches(policies, pod, ca, 443) and not reaches(policies, pod, ca, 80)  # no CA to ask
    assert not reaches(policies, pod, engine, 80)  # and no challenge to forward
    assert wake.ACME_SERVICE not in [o["metadata"]["name"] for o in objects]
    assert "acme-challenge" not in wake.render_wake_proxy(internal, size(internal), render_launch(internal)).text


def destination(ip: str, namespace: str | None = None, **labels) -> dict:
    """Where a packet goes: an address, and for a pod its namespace and labels."""
    pod = None if namespace is None else {"namespace": namespace, "labels": labels,
                                           "namespace_labels": {"kubernetes.io/metadata.name": namespace}}
    return {"ip": ip, "pod": pod}


def reaches(policies: list[dict], pod_labels: dict, to: dict, port: int, protocol: str = "TCP") -> bool:
    """NetworkPolicy egress semantics (kubernetes.io/docs/concepts/services-networking/network-policies/):
    a pod selected by any Egress policy sends only what one of their rules allows; a rule allows a peer it
    lists (no `to`: every destination) on a port it lists (none: every port). A peer is an ipBlock (the
    address in cidr and in no except) or a namespaceSelector AND podSelector (a pod's)."""
    import ipaddress

    def peer_allows(peer: dict, policy_ns: str) -> bool:
        if "ipBlock" in peer:
            address, block = ipaddress.ip_address(to["ip"]), peer["ipBlock"]
            return address in ipaddress.ip_network(block["cidr"]) and not any(
                address in ipaddress.ip_network(cidr) for cidr in block.get("except", []))
        if to["pod"] is None:
            return False
        target = to["pod"]
        in_namespace = (_selects(peer["namespaceSelector"]["matchLabels"], target["namespace_labels"])
                        if "namespaceSelector" in peer else target["namespace"] == policy_ns)
        return in_namespace and _selects(peer.get("podSelector", {}).get("matchLabels", {}), target["labels"])

    selecting = [p for p in policies if "Egress" in p["spec"]["policyTypes"]
                 and _selects(p["spec"]["podSelector"]["matchLabels"], pod_labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("egress", []):
            peers = rule.get("to")
            if peers is not None and not any(peer_allows(peer, policy["metadata"]["namespace"]) for peer in peers):
                continue
            ports = rule.get("ports")
            if ports is None or any(p["port"] == port and p["protocol"] == protocol for p in ports):
                return True
    return False


# --- what stays refused --------------------------------------------------------------------------------

def test_scale_to_zero_is_accepted_on_kubernetes_for_a_batch_stack_only():
    assert resolve(STACK, zero_values()).spec.capacity.scaling.min_replicas == 0
    interactive = zero_values(workload="interactive")
    with pytest.raises(StackSpecError) as refused:
        resolve(STACK, interactive)
    assert "minReplicas 0 (scale to zero) is for capacity.workload batch" in str(refused.value)


def test_aws_still_refuses_scale_to_zero_and_points_at_kubernetes():
    from kimi_fleet.stackfile import load_stack_config, stack_file

    given = copy.deepcopy(load_stack_config(stack_file("h200-int4-vllm")).values)
    given["capacity"] = {"workload": "batch", "market": "on-demand", "replicas": 1,
                         "scaling": {"minReplicas": 0, "maxReplicas": 2, "waitingPerReplica": 4}}
    with pytest.raises(StackSpecError) as refused:
        resolve("h200-int4-vllm", given)
    (problem,) = [p for p in refused.value.problems if "minReplicas" in p]
    assert "capacity.scaling.minReplicas (given 0)" in problem and "target kind kubernetes" in problem


# --- the component and the plan ---------------------------------------------------------------------

def test_the_component_applies_the_front_without_await_and_the_gate_does_not_wait_for_it(stack):
    from tests.test_k8s_observability import run_endpoint

    run, _ = run_endpoint(STACK, zero_values())
    deployments = {d["wire"]["metadata"]["name"]: d for d in run.of_type("kubernetes:apps/v1:Deployment")}
    front = deployments[wake.WAKE]
    annotations = front["wire"]["metadata"]["annotations"]
    assert annotations["pulumi.com/skipAwait"] == "true"
    assert manifests.API_KEY_VERSION_ANNOTATION in front["wire"]["spec"]["template"]["metadata"]["annotations"]
    assert any(name.endswith(manifests.API_KEY_SECRET) for name in front["dependencies"])
    # After its own objects (the policies that wall it in), never after the weights' download Job.
    for other in (wake.WAKE_CONFIGMAP, wake.READY_SERVICE, wake.ACME_SERVICE, wake.WAKE_INGRESS_POLICY,
                  wake.WAKE_EGRESS_POLICY):
        assert any(name.endswith(f"-{other}") and "Deployment" not in name for name in front["dependencies"]), other
    assert not any("kimi-weights-" in name for name in front["dependencies"])
    rendered = the(stack["wake"], "Deployment", wake.WAKE)
    assert integral(front["wire"]["spec"]["template"]["spec"]) == rendered["spec"]["template"]["spec"]
    monitors = {m["wire"]["metadata"]["name"] for m in run.of_type("kubernetes:monitoring.coreos.com/v1:PodMonitor")}
    assert monitors == {manifests.POD_MONITOR, wake.WAKE_POD_MONITOR}
    services = {s["wire"]["metadata"]["name"] for s in run.of_type("kubernetes:core/v1:Service")}
    assert services == {manifests.PROXY_SERVICE, wake.READY_SERVICE, wake.ACME_SERVICE}
    # The gate's wait names the engines' Deployment only.
    rollout = manifests.rollout_wait(stack["r"], stack["sizing"])
    assert rollout["deployments"] == [manifests.deployment_name("on-demand")]
    # The policy pack (pinned images, engine ports never exposed, no secret in a spec) passes it all.

    violations = check_resources([{"type": d["type"], "name": d["name"], "props": d["inputs"],
                                   "options": {"protect": d["protect"], "ignoreChanges": d["ignore_changes"]}}
                                  for d in run.resources])
    assert [v for v in violations if v["enforcement"] == "mandatory"] == []
    assert any(d["name"].endswith(wake.WAKE) for d in run.resources)


def test_the_plan_of_a_stack_file_that_scales_to_zero_says_what_zero_means(tmp_path):
    from kimi_fleet.stackfile import stack_file

    text = stack_file(STACK).read_text()
    config = yaml.safe_load(text)
    config["config"]["kimi-fleet:capacity"] = copy.deepcopy(ZERO)
    kubernetes = config["config"]["kimi-fleet:target"]["kubernetes"]
    kubernetes["prometheusUrl"] = "http://prometheus-operated.monitoring.svc:9090"
    path = tmp_path / f"Pulumi.{STACK}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "scripts/plan.py", "--stack-file", str(path), "--no-preflight",
                           "--build-dir", str(tmp_path / "build")], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = " ".join(done.stdout.split())
    r = resolve(STACK, zero_values())
    policy = scaling_policy(r, size(r))
    assert "scaling: 0 to 3 replicas" in out
    assert f"gets 503 with Retry-After {wake.RETRY_AFTER_SECONDS} s" in out and "starts one replica" in out
    assert f"serves about {round(policy.instance_warmup_seconds / 60)} min later" in out
    assert "a client must retry after Retry-After until it serves" in out
    from kimi_fleet import observability
    stuck = observability.stuck_at_zero_minutes(policy.instance_warmup_seconds)
    assert f"fires KimiStuckAtZero once the front has answered retries for {stuck} min" in out
    assert "costs the front's CPU pod only" in out
    written = (tmp_path / "build" / STACK / "kubernetes-wake.yaml").read_text()
    assert "name: kimi-wake" in written and "kimi-engine-ready" in written
