"""A node as Prometheus sees it, on loopback, for tests/test_prometheus_scrape.py and
scripts/observability.py (the dashboard picture): fake engines (tests/fakes/fake_engine.py, the
pinned engines' metric names) behind a real Caddy with its metrics on, a fixed-reading stand-in for
the GPU exporter (DCGM names from the catalog; there is no GPU here) and for the node-state exporter,
and a real Prometheus scraping the stack's rendered scrape targets (ports remapped to free ones)
with the stack's rules loaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import httpx

from kimi_fleet import catalog, observability
from kimi_fleet.launch import render_launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.stackfile import load_stack_config, stack_file
from tests.fakes.harness import free_port, start_caddy, start_fake_engine, wait_for

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
API_KEY = "scrape-test-key-0123456789"
RELEASE = "0123456789abcdef"
GPUS = 8
#: the fake GPU exporter's readings (per GPU)
GPU_UTIL, FB_USED, FB_FREE, POWER = 87.0, 70_000.0, 11_000.0, 550.0


class _Fixed(BaseHTTPRequestHandler):
    body = b""

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self):
        if self.path != "/metrics":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


@contextmanager
def fixed_endpoint(text: str):
    handler = type("Handler", (_Fixed,), {"body": text.encode()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def fake_dcgm_text() -> str:
    """The catalog's DCGM names with the exporter's labels, fixed readings; no XID (the count has no series)."""
    values = {"DCGM_FI_DEV_GPU_UTIL": GPU_UTIL, "DCGM_FI_DEV_FB_USED": FB_USED, "DCGM_FI_DEV_FB_FREE": FB_FREE,
              "DCGM_FI_DEV_POWER_USAGE": POWER, "DCGM_FI_DEV_XID_ERRORS": 0, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": 0}
    lines = []
    for name, value in values.items():
        lines.append(f"# TYPE {name} {catalog.GPU_METRICS[name].kind}")
        lines += [f'{name}{{gpu="{g}",UUID="GPU-{g:08d}",modelName="NVIDIA H100 80GB HBM3"}} {value}'
                  for g in range(GPUS)]
    return "\n".join(lines) + "\n"


def fake_node_state_text(engines: int) -> str:
    return "\n".join([f'{observability.RELEASE_INFO}{{release="{RELEASE}"}} 1', f"{observability.NODE_ADMITTED} 1",
                      *(f'{observability.ENGINE_UP}{{engine="{i}"}} 1' for i in range(engines)),
                      f"{observability.GATE_PASSED} 1"]) + "\n"


def caddyfile(proxy_port: int, metrics_port: int, upstreams: list[str]) -> str:
    """The proxy as catalog.PROXY_METRICS.enable['2.6'] says (Debian's caddy here): metrics on the
    tenant listener's server only, served by a loopback metrics site; a Bearer key like the node's."""
    return "\n".join([
        "{", "\tadmin off", f"\tservers :{proxy_port} {{", "\t\tmetrics", "\t}", "}",
        f"http://127.0.0.1:{proxy_port} {{",
        '\t@unauth not header Authorization "Bearer {env.KIMI_API_KEY}"',
        "\trespond @unauth 401",
        f"\treverse_proxy {' '.join(upstreams)} {{", "\t\tflush_interval -1", "\t}", "}",
        f"http://127.0.0.1:{metrics_port} {{", "\tmetrics /metrics", "}", ""])


class Prometheus:
    """Prometheus's HTTP API (instant and range queries)."""
    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"

    def query(self, promql: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def values(self, promql: str) -> dict[str, float]:
        """{legend-ish key: value}: the replica (and release) labels of each series."""
        return {",".join(f"{k}={v}" for k, v in sorted(r["metric"].items())): float(r["value"][1])
                for r in self.query(promql)}

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as answer:
            return json.load(answer)

    def query_range(self, promql: str, start: float, end: float, step: float) -> list[dict]:
        url = f"{self.url}/api/v1/query_range?" + urllib.parse.urlencode(
            {"query": promql, "start": start, "end": end, "step": step})
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return body["data"]["result"]


@contextmanager
def run_prometheus(config: Path, workdir: Path):
    port = free_port()
    log = open(workdir / "prometheus.log", "w")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={workdir / 'data'}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    prometheus = Prometheus(port)
    try:
        def ready() -> bool:
            try:
                return urllib.request.urlopen(prometheus.url + "/-/ready", timeout=2).status == 200
            except OSError:
                return False
        assert wait_for(ready, 30), (workdir / "prometheus.log").read_text()[-3000:]
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def stack_for(engine: str) -> str:
    """A planned single-node NVIDIA stack of the engine with one engine per node (GPU exporter among its
    targets; the observed node runs one fake engine)."""
    from tests.matrix import PLANNED_STACKS
    for name in PLANNED_STACKS:
        spec = load_stack_config(stack_file(name)).spec()
        r = Resolved(spec)
        if (spec.engine.name == engine and r.accelerator.vendor == "nvidia" and spec.parallelism.nodes == 1
                and r.engines_per_node == 1):
            return name
    raise AssertionError(f"no planned NVIDIA single-node {engine} stack")


def load(base_url: str, seconds: float, workers: int) -> dict[str, int]:
    """Streaming chat completions with the key from `workers` threads, plus requests without it."""
    counts = {"ok": 0, "unauthorized": 0, "other": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(index: int):
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < deadline:
                key = API_KEY if index else "wrong-key-0123456789"
                with client.stream("POST", f"{base_url}/v1/chat/completions",
                                   headers={"Authorization": f"Bearer {key}"},
                                   json={"model": "kimi-k2.6", "stream": True, "max_tokens": 64,
                                         "messages": [{"role": "user", "content": f"Say hello, number {index}."}]}) as r:
                    for _ in r.iter_bytes():
                        pass
                kind = "ok" if r.status_code == 200 else "unauthorized" if r.status_code == 401 else "other"
                with lock:
                    counts[kind] += 1
                if kind == "unauthorized":
                    time.sleep(0.2)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts





@dataclass
class ObservedNode:
    stack: str
    engine: str
    prometheus: Prometheus
    proxy_url: str
    #: the stack's rendered targets with the ports they are reached on here
    targets: list[observability.ScrapeTarget]


@contextmanager
def observed_node(stack: str, workdir: Path, *, max_running: int = 2, scrape_interval: str = "1s",
                  hang_file: Path | None = None) -> Iterator[ObservedNode]:
    """Everything up and every target scraped once (up == 1) before it yields. While `hang_file`
    exists, the engines' new generations hang (running, no token: a stalled engine)."""
    spec = load_stack_config(stack_file(stack)).spec()
    r = Resolved(spec)
    engine = spec.engine.name
    targets = observability.node_scrape_targets(render_launch(r), r.accelerator.vendor)
    engine_targets = [t for t in targets if t.job == observability.ENGINE_JOB]
    with ExitStack() as context:
        # One fake engine per engine target; `max_running` requests generate at once, the rest queue.
        fakes = [context.enter_context(start_fake_engine(
            "good", engine, chunk_delay=0.02, options=("--max-running", str(max_running), "--first-token-delay", "0.05",
                                                       "--kv-capacity-tokens", "2048",
                                                       *(("--hang-file", str(hang_file)) if hang_file else ()))))
            for _ in engine_targets]
        proxy_port, metrics_port = free_port(), free_port()
        context.enter_context(start_caddy(caddyfile(proxy_port, metrics_port, [f.upstream for f in fakes]),
                                          {"KIMI_API_KEY": API_KEY}))
        gpu_port = context.enter_context(fixed_endpoint(fake_dcgm_text()))
        node_port = context.enter_context(fixed_endpoint(fake_node_state_text(len(engine_targets))))
        ports = {observability.GPU_JOB: gpu_port, observability.PROXY_JOB: metrics_port,
                 observability.NODE_STATE_JOB: node_port}
        engine_ports = iter(f.port for f in fakes)
        local = [replace(t, port=next(engine_ports) if t.job == observability.ENGINE_JOB else ports[t.job])
                 for t in targets]
        (workdir / "rules.yml").write_text(observability.render_prometheus_rules(spec))
        config = workdir / "prometheus.yml"
        config.write_text(observability.render_prometheus_scrape_config(
            stack, local, {"replica": "0"}, scrape_interval=scrape_interval, rule_files=("rules.yml",)))
        check = subprocess.run([PROMTOOL or "promtool", "check", "config", str(config)],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        prometheus = context.enter_context(run_prometheus(config, workdir))

        def all_up() -> bool:
            up = prometheus.values(f'up{{stack="{stack}"}}')
            return len(up) == len(local) and all(v == 1 for v in up.values())
        assert wait_for(all_up, 20, 0.5), prometheus.get("/api/v1/targets")
        yield ObservedNode(stack, engine, prometheus, f"http://127.0.0.1:{proxy_port}", local)
