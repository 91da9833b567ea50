"""The host's scrape endpoint as the host component declares it (issue 24, item 1 on a host): its
URL as the metrics location, no dashboard, and its own generated key, shipped only through stdin."""

from __future__ import annotations

import json

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
