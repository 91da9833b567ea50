"""What a node runs so it can be seen without SSH (issue 24): its exporters, on loopback only, the
AWS metrics publisher, the drain before a scale-in, and the host's key-protected scrape endpoint.
Pure rendering (no Pulumi): node_files.py ships the files, the tests run them.

- Every node: the node-state exporter (node_scripts/node_state_exporter.py, kimi-node-state.service)
  on observability.NODE_STATE_PORT; Caddy's metrics on a loopback-only site at PROXY_METRICS_PORT
  (caddy.py); on NVIDIA nodes the DCGM exporter (pinned container, kimi-gpu-exporter.service) on
  GPU_EXPORTER_PORT. The GPU exporter runs in a network namespace of its own (the docker bridge
  network GPU_EXPORTER_NETWORK), not the host's: there it could reach the engines' loopback-only
  ports (engine HTTP, metrics) and every other loopback service. Its own port is published on the
  host's 127.0.0.1 only; inside its namespace it listens on every address (its loopback and its
  bridge address, which only the host reaches). The bridge masquerades nothing, and the engine
  guard (node_guard.render_engine_guard) drops whatever the bridge would forward (to the instance
  metadata service, the VPC, the internet) and refuses connections it opens to the host: it only
  answers the host's scrapes. It runs in the engines' slice too. It gets the GPUs through CDI like
  an engine (nvidia.com/gpu=all: it watches every GPU), as root with no capability at all
  (--cap-drop=ALL) and no new privileges: the pinned release's Dockerfile (docker/Dockerfile,
  "Security Note: Default USER") says basic metrics work as root without additional capabilities
  and only its profiling fields (DCGM_FI_PROF_*) need SYS_ADMIN (internal/pkg/capabilities warns
  only when a profiling field is asked for); the node's collectors file asks for none.
- AWS nodes (node.env TARGET_KIND=aws): the metrics publisher every 60 s (metrics_publisher.py).
- AWS fleet nodes: the drain (drain.py) with the scaling policy's drain timeout.
- A host: the scrape endpoint, a second Caddy site on the host's own name at HOST_METRICS_PORT with
  its own bearer key (caddy.py renders it; components/host_endpoint.py generates the key).
"""

from __future__ import annotations

import re

from kimi_fleet import catalog, node_guard, observability, templates
from kimi_fleet.paths import ENGINE_SLICE, LOOPBACK

LIB_DIR = "/usr/local/lib/kimi-fleet"
NODE_STATE_EXPORTER = f"{LIB_DIR}/node_state_exporter.py"
METRICS_TEXT = f"{LIB_DIR}/metrics_text.py"
METRICS_PUBLISHER = f"{LIB_DIR}/metrics_publisher.py"
DRAIN = f"{LIB_DIR}/drain.py"
NODE_STATE_UNIT = "kimi-node-state.service"
GPU_EXPORTER_UNIT = "kimi-gpu-exporter.service"
GPU_EXPORTER_CONTAINER = "kimi-gpu-exporter"
#: The exporter's own docker network (a bridge: its own network namespace) and the host's bridge
#: interface for it (the engine guard matches it by name).
GPU_EXPORTER_NETWORK = "kimi-gpu-exporter"
GPU_EXPORTER_BRIDGE = node_guard.GPU_EXPORTER_BRIDGE
PUBLISH_UNIT = "kimi-metrics-publish.service"
PUBLISH_TIMER = "kimi-metrics-publish.timer"
DRAIN_UNIT = "kimi-drain.service"
#: The publisher's period: CloudWatch's standard resolution, and the scaling policy's metric period.
PUBLISH_INTERVAL_SECONDS = 60
#: Scrapes of a handful of loopback exporters and one put-metric-data call, at most.
PUBLISH_TIMEOUT_SECONDS = 55
#: The previous scrape the publisher's rates and p99s are computed against.
PUBLISHER_STATE = "/var/lib/kimi-fleet/metrics-publisher.json"
#: While it exists the ready listener answers 503 (caddy.py): the load balancer drains the node.
DRAIN_FILE = "/run/kimi-fleet/draining"
#: The Auto Scaling termination hook the drain completes (aws-components declares it).
DRAIN_HOOK = "kimi-drain"
#: The host's scrape endpoint: a port of its own beside 443 (9443: no engine, exporter or
#: well-known service; the host firewall admits it beside 80/443 when enabled).
HOST_METRICS_PORT = 9443
#: The scrape endpoint's own key (like the API key: a generated secret, root-only on the node,
#: handed to Caddy through its environment).
METRICS_KEY_FILE = "/etc/kimi-fleet/secrets/metrics-key"
METRICS_KEY_ENV = "KIMI_METRICS_KEY"
#: The path prefix of the host's scrape endpoint: /metrics/<job> (and /metrics/kimi-engine/<index>).
SCRAPE_PREFIX = "/metrics"
#: What every exporter serves (the scrape endpoint rewrites each of its paths to it).
METRICS_PATH = "/metrics"
_PLAIN_ARG = re.compile(r"^[A-Za-z0-9._:/@=,+-]+$")


def gpu_exporter_enabled(vendor: str) -> bool:
    """DCGM reads NVIDIA GPUs only; AMD and Ascend nodes run without a GPU exporter."""
    return vendor == "nvidia"


#: The collectors file the node gives the exporter (catalog.GPU_EXPORTER_COUNTERS), mounted read-only.
GPU_EXPORTER_COUNTERS_FILE = "/etc/kimi-fleet/dcgm-counters.csv"


def _plain(argv: list[str], what: str) -> list[str]:
    for arg in argv:
        if not _PLAIN_ARG.match(arg):
            raise ValueError(f"{what} argument {arg!r} is not plain")
    return argv


def gpu_exporter_network_argv() -> list[str]:
    """`docker network create`'s arguments for the exporter's network: a bridge of its own, named so
    the engine guard can match it, that masquerades nothing (its traffic cannot leave the host as the
    host's; the guard drops what it would forward anyway)."""
    return _plain(["--driver=bridge", f"--opt=com.docker.network.bridge.name={GPU_EXPORTER_BRIDGE}",
                   "--opt=com.docker.network.bridge.enable_ip_masquerade=false", GPU_EXPORTER_NETWORK],
                  "GPU exporter network")


def gpu_exporter_argv() -> list[str]:
    """`docker run`'s arguments for the DCGM exporter (constants only: nothing from a stack)."""
    exporter = catalog.GPU_EXPORTER
    port = observability.GPU_EXPORTER_PORT
    argv = ["--rm", "--name", GPU_EXPORTER_CONTAINER, f"--cgroup-parent={ENGINE_SLICE}",
            # Its own network namespace; its port published on the host's loopback only.
            f"--network={GPU_EXPORTER_NETWORK}", f"--publish={LOOPBACK}:{port}:{port}",
            # Root (the image's user) with no capability: basic metrics need none (module docstring).
            "--user=0:0", "--cap-drop=ALL", "--security-opt=no-new-privileges", "--device=nvidia.com/gpu=all",
            f"--volume={GPU_EXPORTER_COUNTERS_FILE}:{GPU_EXPORTER_COUNTERS_FILE}:ro", exporter.image,
            # Every address of its own namespace (the publish reaches its bridge address), our collectors file.
            exporter.listen_flag, f":{port}", exporter.counters_flag, GPU_EXPORTER_COUNTERS_FILE]
    return _plain(argv, "GPU exporter")


def gpu_exporter_unit() -> str:
    return templates.render(
        GPU_EXPORTER_UNIT, ADDRESS=f"{LOOPBACK}:{observability.GPU_EXPORTER_PORT}",
        DOCUMENTATION="https://github.com/NVIDIA/dcgm-exporter",
        ENGINE_GUARD_UNIT=node_guard.ENGINE_GUARD_UNIT_NAME, CONTAINER=GPU_EXPORTER_CONTAINER,
        IMAGE=catalog.GPU_EXPORTER.image, NETWORK=GPU_EXPORTER_NETWORK,
        NETWORK_ARGS=" ".join(gpu_exporter_network_argv()), ARGS=" ".join(gpu_exporter_argv()))


NODE_STATE_UNIT_TEXT = templates.render(
    NODE_STATE_UNIT, ADDRESS=f"{LOOPBACK}:{observability.NODE_STATE_PORT}", EXPORTER=NODE_STATE_EXPORTER,
    PORT=observability.NODE_STATE_PORT)
PUBLISH_UNIT_TEXT = templates.render(PUBLISH_UNIT, NAMESPACE=f"{observability.CLOUDWATCH_NAMESPACE_PREFIX}/<stack>",
                                     PUBLISHER=METRICS_PUBLISHER, TIMEOUT_SECONDS=PUBLISH_TIMEOUT_SECONDS)
PUBLISH_TIMER_TEXT = templates.render(PUBLISH_TIMER, INTERVAL_SECONDS=PUBLISH_INTERVAL_SECONDS)
DRAIN_UNIT_TEXT = templates.render(DRAIN_UNIT, HOOK=DRAIN_HOOK, DRAIN=DRAIN)


def exporter_urls(vendor: str) -> dict[str, str | None]:
    def url(port: int) -> str:
        return f"http://{LOOPBACK}:{port}/metrics"

    return {"gpu": url(observability.GPU_EXPORTER_PORT) if gpu_exporter_enabled(vendor) else None,
            "proxy": url(observability.PROXY_METRICS_PORT), "node": url(observability.NODE_STATE_PORT)}


#: What the publisher reads from the GPU exporter (catalog.GPU_METRICS): the XID count is the
#: exporter's own, over its window (catalog.GPU_EXPORTER.xid_window_ms).
GPU_SERIES = {"utilization": "DCGM_FI_DEV_GPU_UTIL", "memory_used": "DCGM_FI_DEV_FB_USED",
              "memory_free": "DCGM_FI_DEV_FB_FREE", "power": "DCGM_FI_DEV_POWER_USAGE",
              "xid_count": "DCGM_EXP_XID_ERRORS_COUNT"}


def stack_metrics(stack: str, engine: str, vendor: str) -> dict:
    """stack.json's "metrics": what the publisher reads (node scripts cannot import the catalog)."""
    names = catalog.ENGINE_METRICS[engine]
    return {
        "namespace": observability.cloudwatch_namespace(stack),
        "stack": stack,
        "state_file": PUBLISHER_STATE,
        "exporters": exporter_urls(vendor),
        "engine": {key: getattr(names, key) for key in (
            "generated_tokens", "progress_tokens", "prompt_tokens", "running", "waiting", "kv_cache_usage", "ttft_histogram",
            "itl_histogram")},
        "gpu": {key: catalog.GPU_METRICS[name].name for key, name in GPU_SERIES.items()}
        if gpu_exporter_enabled(vendor) else None,
        "proxy": {"requests_histogram": catalog.PROXY_METRICS.request_duration,
                  "code_label": catalog.PROXY_METRICS.code_label},
    }


def stack_drain(drain_timeout_seconds: int | None) -> dict | None:
    """stack.json's "drain" (None: the node is in no scaling fleet)."""
    if drain_timeout_seconds is None:
        return None
    return {"file": DRAIN_FILE, "hook": DRAIN_HOOK, "timeout_seconds": drain_timeout_seconds}


def scrape_routes(targets: list[observability.ScrapeTarget]) -> dict[str, int]:
    """The host's scrape endpoint: path -> the loopback exporter port it serves, one per scrape
    target of the node (observability.node_scrape_targets): /metrics/<job>, an engine's
    /metrics/kimi-engine/<index>."""
    routes = {}
    for target in targets:
        if target.path != METRICS_PATH:
            raise ValueError(f"{target.job} serves {target.path}: the scrape endpoint proxies {METRICS_PATH} only")
        labels = dict(target.labels)
        suffix = f"/{labels[observability.ENGINE_INDEX_LABEL]}" if target.job == observability.ENGINE_JOB else ""
        routes[f"{SCRAPE_PREFIX}/{target.job}{suffix}"] = target.port
    return routes


def scrape_location(domain: str) -> str:
    """The host's metrics location (a stack output): the scrape endpoint's base URL."""
    return f"https://{domain}:{HOST_METRICS_PORT}{SCRAPE_PREFIX}/"



def host_prometheus_config(stack: str, domain: str, targets: list[observability.ScrapeTarget], *,
                           credentials_file: str, ca_file: str | None = None, port: int = HOST_METRICS_PORT,
                           scrape_interval: str = "15s") -> dict:
    """How an operator's Prometheus scrapes a host (a scrape_configs document, as data): one job per
    scrape route, over TLS to the scrape endpoint, the key read from `credentials_file` (never in
    the config), every series labelled stack=<stack>, an engine's also engine_index=<index>.
    `ca_file`: a CA to trust beyond the system's (a test's Caddy internal CA)."""
    routes = scrape_routes(targets)
    jobs = []
    for target, path in zip(targets, routes):
        labels = {observability.STACK_LABEL: stack, **dict(target.labels)}
        job = {"job_name": path.removeprefix(f"{SCRAPE_PREFIX}/").replace("/", "-"), "scheme": "https",
               "metrics_path": path, "authorization": {"type": "Bearer", "credentials_file": credentials_file},
               "static_configs": [{"targets": [f"{domain}:{port}"], "labels": labels}]}
        if ca_file is not None:
            job["tls_config"] = {"ca_file": ca_file}
        jobs.append(job)
    return {"global": {"scrape_interval": scrape_interval}, "scrape_configs": jobs}
