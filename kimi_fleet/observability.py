"""Seeing an endpoint without SSH: which metrics a node exposes, where, and what the alerts and
dashboards read from them (issue 24).

Pure data and rendering, no Pulumi: the node files, the Kubernetes manifests, the AWS components
(CloudWatch agent, dashboard, alarms, scaling policy), the plan and the tests all read this module,
so a metric name, a port or a threshold is written once.

Every exporter listens on the node's loopback only (the firewall and the proxy's route allowlist
keep them from the outside, like the engine port):
- each engine's own /metrics on its engine port (launch.EngineProcess.port);
- the GPU exporter (DCGM exporter, pinned in the catalog) on GPU_EXPORTER_PORT;
- Caddy's metrics on PROXY_METRICS_PORT (a loopback-only site; Caddy's admin API stays off);
- the node's release and admission state on NODE_STATE_PORT.
"""

from __future__ import annotations

from dataclasses import dataclass

from kimi_fleet.paths import LOOPBACK

#: Loopback ports of the node's exporters (the engines keep their own ports).
GPU_EXPORTER_PORT = 9400
PROXY_METRICS_PORT = 9182  # 9180: the local proxy listener, 9181: the ready listener (node_files)
NODE_STATE_PORT = 9183

#: CloudWatch namespace the nodes publish to, and the dimensions every datum carries.
CLOUDWATCH_NAMESPACE = "KimiFleet"
STACK_DIMENSION = "Stack"
REPLICA_DIMENSION = "Replica"

#: The Prometheus job names (one per exporter kind): scrape configs, rules and dashboards agree on them.
ENGINE_JOB = "kimi-engine"
GPU_JOB = "kimi-gpu"
PROXY_JOB = "kimi-proxy"
NODE_STATE_JOB = "kimi-node"


@dataclass(frozen=True)
class ScrapeTarget:
    """One exporter on a node's loopback."""
    job: str
    port: int
    path: str = "/metrics"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"
