"""The host's scrape endpoint as the host component declares it (issue 24, item 1 on a host): its
URL as the metrics location, no dashboard, and its own generated key, shipped only through stdin."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from kimi_fleet import node_metrics
from kimi_fleet.launch import render_launch
from kimi_fleet.sizing import size
from tests.test_node_metrics import API_KEY, resolved


def test_the_host_endpoint_publishes_its_scrape_url_and_ships_its_key_only_through_stdin():
    import pulumi

    from components.endpoint_outputs import TargetSecrets
    from components.host_endpoint import HostEndpoint, HostEndpointArgs
    from tests.test_host_target import SSH_HOST, SSH_KEY, commands, host_bundle, plain
    from tooling.mock_run import run_components, secret_paths

    r = resolved("rtxpro6000-int4-sglang")

    def declare():
        endpoint = HostEndpoint("kimi", HostEndpointArgs(
            resolved=r, sizing=size(r), launch=render_launch(r), api_key=pulumi.Output.secret(API_KEY),
            target_secrets=TargetSecrets(ssh_host=pulumi.Output.secret(SSH_HOST),
                                         ssh_private_key=pulumi.Output.secret(SSH_KEY))))
        assert endpoint.dashboard_url is None
        return {"metrics_location": endpoint.metrics_location, "metrics_key": endpoint.metrics_key}

    run = run_components(declare, r.spec.stack)
    assert run.outputs["metrics_location"] == f"https://{r.spec.domain}:{node_metrics.HOST_METRICS_PORT}/metrics/"
    (password,) = [res for res in run.of_type("random:index/randomPassword:RandomPassword")
                   if res["name"] == "kimi-metrics-key"]
    assert password["wire"]["special"] is False  # Caddy's key rule: letters and digits only
    key = run.outputs["metrics_key"]
    assert isinstance(key, str) and len(key) >= 32
    declared = commands(run)
    wire = declared["kimi-secret-metrics-key"]["wire"]
    assert ".stdin" in list(secret_paths(wire)) and "umask 077" in wire["create"] and "chmod 600" in wire["create"]
    assert "/var/lib/kimi-fleet/incoming-secrets/metrics-key" in wire["create"]
    for command in declared.values():
        assert key not in plain({k: v for k, v in command["wire"].items() if k != "stdin"}), command["name"]
    node_env = next(f["content"] for f in host_bundle(run)["files"] if f["path"] == "/etc/kimi-fleet/node.env")
    assert f"METRICS_KEY_FILE={node_metrics.METRICS_KEY_FILE}\n" in node_env
    assert key not in json.dumps(host_bundle(run))


@pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("caddy") is None,
                    reason="prometheus or caddy missing (.ci/run installs them)")
def test_a_real_prometheus_scrapes_the_host_through_its_scrape_endpoint(tmp_path):
    """Debian's Prometheus, configured as node_metrics.host_prometheus_config says, scrapes the
    node-state exporter and an engine through the host's Caddy (TLS, the scrape key from a file);
    a wrong key leaves the targets down."""
    from kimi_fleet import observability
    from tests.fakes.harness import free_port, start_caddy, wait_for
    from tests.test_node_metrics import (METRICS_KEY, _loopback_proxy, _node_root, exporter,
                                         node_state_exporter)

    root = tmp_path / "root"
    _node_root(root, "rtxpro6000-int4-sglang")
    with exporter(lambda: "sglang:num_queue_reqs 7\n") as engine_port, node_state_exporter(root) as node_url:
        node_port = int(node_url.rsplit(":", 1)[1].split("/")[0])
        targets = [observability.ScrapeTarget(observability.ENGINE_JOB, engine_port, "/metrics",
                                              ((observability.ENGINE_INDEX_LABEL, "0"),)),
                   observability.ScrapeTarget(observability.NODE_STATE_JOB, node_port)]
        rendered, listener = _loopback_proxy("rtxpro6000-int4-sglang", engine_port,
                                             scrape_routes=node_metrics.scrape_routes(targets))
        scrape_port = listener["scrape"].port
        env = {"KIMI_API_KEY": API_KEY, node_metrics.METRICS_KEY_ENV: METRICS_KEY}
        with start_caddy(rendered.text, env, ready_url=f"https://localhost:{scrape_port}/metrics/kimi-node") as caddy:
            results = {}
            for name, key in (("right", METRICS_KEY), ("wrong", "wrong-key-0123456789")):
                key_file = tmp_path / f"{name}-key"
                key_file.write_text(key)
                config = node_metrics.host_prometheus_config(
                    "rtxpro6000-int4-sglang", "localhost", targets, credentials_file=str(key_file),
                    ca_file=str(caddy.root_ca), port=scrape_port, scrape_interval="1s")
                config_file = tmp_path / f"{name}.yml"
                config_file.write_text(yaml.safe_dump(config))
                check = subprocess.run(["promtool", "check", "config", str(config_file)], capture_output=True, text=True)
                assert check.returncode == 0, check.stdout + check.stderr
                results[name] = _scrape_with_prometheus(tmp_path / name, config_file, free_port(), wait_for)
    up, samples = results["right"]
    assert up == {"kimi-engine-0": 1.0, "kimi-node": 1.0}
    assert samples["sglang:num_queue_reqs"] == (("engine_index", "0"), ("stack", "rtxpro6000-int4-sglang"), 7.0)
    assert samples["kimi_fleet_node_admitted"][-1] == 0.0
    assert results["wrong"][0] == {"kimi-engine-0": 0.0, "kimi-node": 0.0}


def _scrape_with_prometheus(data: Path, config: Path, port: int, wait_for) -> tuple[dict, dict]:
    """Run Prometheus until both jobs were scraped; (up per job, the series asked for)."""
    data.mkdir()
    process = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={data}",
                                f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)

    def query(expression: str) -> list:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)["data"]["result"]
        except OSError:
            return []

    try:
        assert wait_for(lambda: len(query("up")) == 2, 60), "Prometheus did not scrape both jobs"
        up = {r["metric"]["job"]: float(r["value"][1]) for r in query("up")}
        samples = {}
        for name in ("sglang:num_queue_reqs", "kimi_fleet_node_admitted"):
            for r in query(name):
                labels = tuple(sorted((k, v) for k, v in r["metric"].items()
                                      if k in ("engine_index", "stack")))
                samples[name] = (*labels, float(r["value"][1]))
        return up, samples
    finally:
        process.terminate()
        process.wait(timeout=20)
