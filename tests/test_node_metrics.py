"""The node's exporters, checked with the real consumers (issue 24, item 1): Caddy 2.6 counting the
tenants' requests and serving its metrics on a loopback-only site with admin off, the node-state
exporter reading the files the node writes, the units through systemd-analyze, the ports out of
reach from another network namespace, the tenants' route allowlist refusing /metrics, and the
host's scrape endpoint behind its own key."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from kimi_fleet import catalog, node_guard, node_metrics, observability
from kimi_fleet.caddy import ScrapeSite
from kimi_fleet.launch import render_launch
from kimi_fleet.node_files import (NODE_STATE_UNIT_PATH, SecretsSource, render_node_files, render_proxy_for)
from kimi_fleet.node_scripts import metrics_text
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import load_stack_config, stack_file
from tests.fakes.harness import free_port, start_caddy, wait_for
from tests.test_node_files import _systemd_root, install

NODE_SCRIPTS = Path(__file__).resolve().parents[1] / "kimi_fleet" / "node_scripts"
API_KEY = "tenant-key-0123456789abcdef"
METRICS_KEY = "scrape-key-fedcba9876543210"
RELEASE = "0123456789abcdef"


def resolved(stack: str) -> Resolved:
    return Resolved(load_stack_config(stack_file(stack)).spec())


def files_of(stack: str):
    r = resolved(stack)
    return render_node_files(r, render_launch(r), size(r), secrets=SecretsSource("files"), ebs_volume_id="vol-1")


@contextmanager
def exporter(text_of):
    """A loopback HTTP server answering /metrics with text_of() (a fake engine's or exporter's)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            body = text_of().encode() if self.path.split("?")[0] == "/metrics" else b"not here"
            self.send_response(200 if self.path.split("?")[0] == "/metrics" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _get(url: str, key: str | None = None, context=None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


# --- units and what they run ----------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("stack", ["h200-int4-sglang", "mi300x-int4-sglang"])
def test_the_exporter_publisher_and_drain_units_pass_systemd_analyze_verify(stack, tmp_path):
    files = files_of(stack)
    _systemd_root(tmp_path, files)
    units = [NODE_STATE_UNIT_PATH, f"/etc/systemd/system/{node_metrics.PUBLISH_UNIT}",
             f"/etc/systemd/system/{node_metrics.PUBLISH_TIMER}", f"/etc/systemd/system/{node_metrics.DRAIN_UNIT}"]
    gpu_unit = f"/etc/systemd/system/{node_metrics.GPU_EXPORTER_UNIT}"
    # DCGM reads NVIDIA GPUs only: the AMD node has no GPU exporter.
    assert (gpu_unit in files) is (resolved(stack).accelerator.vendor == "nvidia")
    units += [gpu_unit] if gpu_unit in files else []
    result = subprocess.run(["systemd-analyze", "verify", f"--root={tmp_path}", "--man=no", *units],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _gpu_exporter_unit() -> str:
    return files_of("h200-int4-sglang")[f"/etc/systemd/system/{node_metrics.GPU_EXPORTER_UNIT}"].content


def _gpu_exporter_run(unit: str) -> tuple[list[str], list[str]]:
    """The unit's `docker run`: (options, the exporter's own arguments)."""
    (start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    argv = start.removeprefix("ExecStart=").split()
    assert argv[:3] == ["/usr/bin/docker", "run", "--rm"]
    image = argv.index(catalog.GPU_EXPORTER.image)
    return argv[3:image], argv[image + 1:]


def test_the_gpu_exporter_runs_in_its_own_network_as_root_without_capabilities():
    unit = _gpu_exporter_unit()
    options, command = _gpu_exporter_run(unit)
    port = observability.GPU_EXPORTER_PORT
    # The guard covers it (the engines' slice; it requires the guard, which also holds its bridge in).
    assert "--cgroup-parent=kimi-engines.slice" in options
    assert f"Requires=docker.service {node_guard.ENGINE_GUARD_UNIT_NAME}" in unit
    # Its own network namespace, not the host's (whose loopback holds the engines' ports); its one port
    # published on the host's loopback only.
    assert f"--network={node_metrics.GPU_EXPORTER_NETWORK}" in options and "--network=host" not in options
    assert [o for o in options if o.startswith(("-p", "--publish", "--network", "--net="))] == [
        f"--network={node_metrics.GPU_EXPORTER_NETWORK}", f"--publish=127.0.0.1:{port}:{port}"]
    # Root with no capability at all: the pinned release needs SYS_ADMIN for profiling fields only
    # (docker/Dockerfile's security note at 4.5.3-4.8.2), and the collectors file asks for none.
    assert {"--user=0:0", "--cap-drop=ALL", "--security-opt=no-new-privileges", "--device=nvidia.com/gpu=all"} <= set(options)
    assert not any(o.startswith(("--privileged", "--cap-add", "--gpus", "--pid", "--ipc", "--userns", "--uts"))
                   for o in options)
    counters = files_of("h200-int4-sglang")[node_metrics.GPU_EXPORTER_COUNTERS_FILE].content
    assert "DCGM_EXP_XID_ERRORS_COUNT, counter," in counters and "DCGM_FI_DEV_GPU_UTIL, gauge," in counters
    assert not any(line.startswith("DCGM_FI_PROF_") for line in counters.splitlines())
    # Every address of its own namespace (the publish reaches its bridge address), our collectors file.
    assert command == ["-a", f":{port}", "-f", node_metrics.GPU_EXPORTER_COUNTERS_FILE]
    # Its network is a bridge of its own, under the name the guard matches, masquerading nothing.
    # Made anew at every start (the container is gone by then): an existing network of that name, with
    # whatever bridge and options, is never reused; one still in use fails the create, and the unit.
    steps = [line for line in unit.splitlines() if line.startswith("ExecStartPre=")]
    network = [line for line in steps if "docker network create" in line]
    removed = steps.index(f"ExecStartPre=-/usr/bin/docker network rm {node_metrics.GPU_EXPORTER_NETWORK}")
    assert steps.index(f"ExecStartPre=-/usr/bin/docker rm --force {node_metrics.GPU_EXPORTER_CONTAINER}") < removed
    assert network == [f"ExecStartPre=/usr/bin/docker network create {' '.join(node_metrics.gpu_exporter_network_argv())}"]
    assert steps.index(network[0]) == removed + 1 and "inspect" not in " ".join(s for s in steps if "network" in s)
    assert f"com.docker.network.bridge.name={node_guard.GPU_EXPORTER_BRIDGE}" in network[0]
    assert "enable_ip_masquerade=false" in network[0]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_the_gpu_exporter_units_shell_steps_pass_shellcheck(tmp_path):
    scripts = [line.split("/bin/sh -c ", 1)[1] for line in _gpu_exporter_unit().splitlines()
               if line.startswith("ExecStartPre=") and "/bin/sh -c " in line]
    assert len(scripts) == 1  # the image pull
    for index, quoted in enumerate(scripts):
        assert quoted[0] == quoted[-1] == "'" and "'" not in quoted[1:-1]
        path = tmp_path / f"step{index}.sh"
        path.write_text("#!/bin/sh\n" + quoted[1:-1] + "\n")
        done = subprocess.run(["shellcheck", "-s", "sh", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("docker") is None, reason="the docker client is not installed")
def test_the_docker_client_accepts_the_gpu_exporters_arguments(tmp_path):
    """The real docker client parses every flag before it dials the daemon: with no daemon, an argument
    it accepts ends at the connection, one it refuses ends at the parser."""
    options, command = _gpu_exporter_run(_gpu_exporter_unit())
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock", "DOCKER_CONFIG": str(tmp_path)}
    for argv in (["run", "--rm", *options, catalog.GPU_EXPORTER.image, *command],
                 ["network", "create", *node_metrics.gpu_exporter_network_argv()],
                 ["run", "--rm", "--no-such-flag", catalog.GPU_EXPORTER.image]):
        done = subprocess.run(["docker", *argv], capture_output=True, text=True, env=env, timeout=30)
        refused = "unknown flag" in done.stderr or "invalid" in done.stderr
        assert done.returncode != 0
        assert refused is (argv[2] == "--no-such-flag"), done.stderr
        if not refused:
            assert "Cannot connect to the Docker daemon" in done.stderr, done.stderr


def _node_root(root: Path, stack: str = "h200-int4-vllm") -> dict:
    files = files_of(stack)
    install(root, {p: f for p, f in files.items() if p.startswith("/etc/kimi-fleet/")})
    return json.loads(files["/etc/kimi-fleet/stack.json"].content)


@contextmanager
def node_state_exporter(root: Path):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(NODE_SCRIPTS / "node_state_exporter.py"), "--port", str(port)],
                               env={**os.environ, "KIMI_ROOT": str(root)}, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving on 127.0.0.1:" in process.stderr.readline()
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_node_state_exporter_serves_the_contract_metrics_from_the_node_files(tmp_path):
    root = tmp_path / "root"
    stack = _node_root(root)
    release = (root / "etc/kimi-fleet/release").read_text().strip()
    with node_state_exporter(root) as url:
        samples = metrics_text.parse(_get(url)[1])
        values = {(name, tuple(sorted(labels.items()))): v for name, labels, v in samples}
        assert values[("kimi_fleet_release_info", (("release", release),))] == 1
        assert values[("kimi_fleet_node_admitted", ())] == 0
        # Not verified yet is not failed: no gate sample until the node's first admission report.
        assert ("kimi_fleet_gate_passed", ()) not in values
        assert values[("kimi_fleet_engine_up", (("engine", "0"),))] == 0
        assert values[("kimi_fleet_node_draining", ())] == 0
        # The watchdog admits the node: ready file with this release, engine serving, report passed.
        (root / "run/kimi-fleet").mkdir(parents=True, exist_ok=True)
        (root / stack["ready_file"].lstrip("/")).write_text(release + "\n")
        (root / "run/kimi-fleet/status.json").write_text(json.dumps(
            {"health": {"engines": {"kimi-engine@0.service": {"verdict": "busy"}}}}))
        report = root / stack["admission"]["report"].lstrip("/")
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps({"checks": [{"name": "text", "status": "pass"},
                                                 {"name": "tls", "status": "skip"}]}))
        (root / stack["drain"]["file"].lstrip("/")).write_text("1\n")
        values = {(n, tuple(sorted(l.items()))): v for n, l, v in metrics_text.parse(_get(url)[1])}
        assert values[("kimi_fleet_node_admitted", ())] == 1 and values[("kimi_fleet_gate_passed", ())] == 1
        assert values[("kimi_fleet_engine_up", (("engine", "0"),))] == 1
        assert values[("kimi_fleet_node_draining", ())] == 1
        # A ready file of another release (the old one, mid-apply) is not this release admitted; a failed check fails the gate.
        (root / stack["ready_file"].lstrip("/")).write_text("fedcba9876543210\n")
        report.write_text(json.dumps({"checks": [{"name": "text", "status": "pass"}, {"name": "vision", "status": "fail"}]}))
        values = {(n, tuple(sorted(l.items()))): v for n, l, v in metrics_text.parse(_get(url)[1])}
        assert values[("kimi_fleet_node_admitted", ())] == 0 and values[("kimi_fleet_gate_passed", ())] == 0
        assert _get(url.replace("/metrics", "/other"))[0] == 404
    # Bound to loopback: the exporter refuses to be anything else.
    assert "LOOPBACK = \"127.0.0.1\"" in (NODE_SCRIPTS / "node_state_exporter.py").read_text()


# --- Caddy: metrics of the tenants' site, on loopback, admin off ------------------------------

def _loopback_proxy(stack: str, engine_port: int, *, scrape_routes: dict[str, int] | None = None, **extra):
    """The stack's own Caddyfile on loopback ports (tls internal), its engine at `engine_port`."""
    r = resolved(stack)
    launch = render_launch(r)
    launch = dataclasses.replace(launch, instances=tuple(dataclasses.replace(i, port=engine_port + i.index)
                                                         for i in launch.instances))
    ports = {"https_port": free_port(), "http_port": free_port(), "local_port": free_port(),
             "metrics_port": free_port()}
    listener = {"domain": "localhost", "tls": "internal", "bind_host": "127.0.0.1", "access_log": None, **ports,
                **extra}
    if scrape_routes is not None:
        listener["scrape"] = ScrapeSite(free_port(), node_metrics.METRICS_KEY_ENV, scrape_routes)
    return render_proxy_for(r, launch, release=RELEASE, **listener), listener


def _caddy_samples(port: int) -> list:
    return metrics_text.parse(_get(f"http://127.0.0.1:{port}/metrics")[1])


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy missing")
def test_caddy_counts_the_tenants_requests_by_status_on_a_loopback_metrics_site_with_admin_off(tmp_path):
    engine_text = "vllm:num_requests_running 0\n"
    with exporter(lambda: engine_text) as engine_port:
        rendered, listener = _loopback_proxy("h200-int4-vllm", engine_port, ready_port=free_port(),
                                             ready_file=str(tmp_path / "ready"), drain_file=str(tmp_path / "draining"))
        public = f"https://localhost:{listener['https_port']}"
        with start_caddy(rendered.text, {"KIMI_API_KEY": API_KEY}, ready_url=f"{public}/v1/models") as caddy:
            context = caddy.ssl_context()
            local = f"http://127.0.0.1:{listener['local_port']}"
            ready = f"http://127.0.0.1:{listener['ready_port']}/kimi-fleet/ready"
            before = _codes(_caddy_samples(listener["metrics_port"]))
            assert _get(f"{public}/v1/models", API_KEY, context)[0] == 404  # the fake answers 404 off /metrics
            for _ in range(3):
                assert _get(f"{public}/v1/models", "wrong-key-0123456789", context)[0] == 401
            # The engine's /metrics are not a promised route: Caddy refuses them, key or not.
            for path in ("/metrics", "/%6detrics", "/METRICS", "/v1/../metrics", "/metrics?x=1", "/v1/metrics"):
                status, body = _get(f"{public}{path}", API_KEY, context)
                assert status in (400, 404) and "vllm:" not in body, path
            # Neither the node's own checks nor the load balancer's are the tenants' traffic.
            for _ in range(4):
                _get(f"{local}/v1/models", API_KEY)
                assert _get(ready)[0] == 503
            samples = _caddy_samples(listener["metrics_port"])
            after = _codes(samples)
            assert after.get("401", 0) - before.get("401", 0) == 3
            assert after.get("404", 0) + after.get("400", 0) - before.get("404", 0) - before.get("400", 0) == 7
            assert after.get("503", 0) - before.get("503", 0) == 0
            servers = {labels[catalog.PROXY_METRICS.server_label] for name, labels, _ in samples
                       if name == f"{catalog.PROXY_METRICS.request_duration}_count"}
            assert len(servers) == 1, servers  # the public site's server only
            # The metrics site serves /metrics only, and the admin API is off.
            assert _get(f"http://127.0.0.1:{listener['metrics_port']}/other")[0] == 404
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", 2019), timeout=1).close()
            assert rendered.facts["metricsSite"]["bind"] == "127.0.0.1" and rendered.facts["adminOff"] is True
            # Draining: the ready listener answers 503 whatever the ready file says.
            (tmp_path / "ready").write_text(RELEASE + "\n")
            assert _get(ready) == (200, RELEASE + "\n")
            (tmp_path / "draining").write_text("1\n")
            assert _get(ready) == (503, "draining")


def _codes(samples) -> dict[str, float]:
    counts: dict[str, float] = {}
    for name, labels, value in samples:
        if name == f"{catalog.PROXY_METRICS.request_duration}_count":
            counts[labels[catalog.PROXY_METRICS.code_label]] = counts.get(labels[catalog.PROXY_METRICS.code_label], 0) + value
    return counts


# --- the host's scrape endpoint ---------------------------------------------------------------

@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy missing")
def test_the_host_scrape_endpoint_serves_each_exporter_behind_its_own_key_and_nothing_else(tmp_path):
    root = tmp_path / "root"
    _node_root(root, "rtxpro6000-int4-sglang")
    engine_text = "sglang:num_running_reqs 2\nsglang:generation_tokens_total 40\n"
    with exporter(lambda: engine_text) as engine_port, node_state_exporter(root) as node_url:
        node_port = int(node_url.rsplit(":", 1)[1].split("/")[0])
        routes = {"/metrics/kimi-engine/0": engine_port, "/metrics/kimi-node": node_port}
        rendered, listener = _loopback_proxy("rtxpro6000-int4-sglang", engine_port, scrape_routes=routes)
        scrape = listener["scrape"]
        assert scrape.routes == routes
        base = f"https://localhost:{scrape.port}"
        env = {"KIMI_API_KEY": API_KEY, node_metrics.METRICS_KEY_ENV: METRICS_KEY}
        with start_caddy(rendered.text, env, ready_url=f"{base}/metrics/kimi-node") as caddy:
            context = caddy.ssl_context()
            status, body = _get(f"{base}/metrics/kimi-engine/0", METRICS_KEY, context)
            assert status == 200 and "sglang:num_running_reqs 2" in body
            status, body = _get(f"{base}/metrics/kimi-node", METRICS_KEY, context)
            assert status == 200 and "kimi_fleet_node_admitted 0" in body
            # No key, a wrong key, or the tenants' key: 401; another path: 404 (never an exporter's other routes).
            for key in (None, "wrong-key-0123456789", API_KEY):
                assert _get(f"{base}/metrics/kimi-node", key, context)[0] == 401
            for path in ("/metrics/kimi-gpu", "/metrics", "/v1/models", "/metrics/kimi-node/../kimi-engine/0x"):
                assert _get(f"{base}{path}", METRICS_KEY, context)[0] == 404, path
            # ... and the scrape key opens nothing of the tenants' API.
            assert _get(f"https://localhost:{listener['https_port']}/v1/models", METRICS_KEY, context)[0] == 401
    facts = rendered.facts["scrapeSite"]
    assert facts["keyRequired"] and facts["keyEnv"] == node_metrics.METRICS_KEY_ENV
    assert set(facts["upstreams"]) == {f"127.0.0.1:{engine_port}", f"127.0.0.1:{node_port}"}


def test_a_host_scrapes_every_exporter_and_an_aws_node_serves_none():
    host = resolved("rtxpro6000-int4-sglang")
    facts = render_proxy_for(host, render_launch(host), release=RELEASE).facts["scrapeSite"]
    assert facts["address"] == f"{host.spec.domain}:{node_metrics.HOST_METRICS_PORT}"
    assert {r["path"] for r in facts["proxiedRoutes"]} == {
        "/metrics/kimi-engine/0", "/metrics/kimi-gpu", "/metrics/kimi-proxy", "/metrics/kimi-node"}
    assert set(facts["upstreams"]) == {f"127.0.0.1:{p}" for p in (
        render_launch(host).instances[0].port, observability.GPU_EXPORTER_PORT, observability.PROXY_METRICS_PORT,
        observability.NODE_STATE_PORT)}
    aws = resolved("h200-int4-vllm")
    assert "scrapeSite" not in render_proxy_for(aws, render_launch(aws), release=RELEASE).facts
    assert "METRICS_KEY_FILE=\n" in files_of("h200-int4-vllm")["/etc/kimi-fleet/node.env"].content
    # Failed scrape keys are banned like failed API keys (same access log, the scrape port too).
    jail = files_of("rtxpro6000-int4-sglang")[node_guard.FAIL2BAN_JAIL_PATH].content
    assert f"443,{node_metrics.HOST_METRICS_PORT}" in jail


# --- out of reach from outside ------------------------------------------------------------------

from tests.test_node_guard import NETNS_UNAVAILABLE, _Namespaces  # noqa: E402


@pytest.mark.skipif(NETNS_UNAVAILABLE is not None, reason=str(NETNS_UNAVAILABLE))
def test_no_exporter_port_answers_from_another_host_with_or_without_the_firewall(tmp_path):
    """In a server namespace: the node-state exporter and Caddy's metrics site as the node runs them
    (both bind loopback), plus a stand-in listener on every interface at the GPU exporter's and an
    engine's port; from a client namespace none of the exporter ports answers, and the host
    firewall (when enabled) drops the stand-ins too."""
    root = tmp_path / "root"
    _node_root(root, "rtxpro6000-int4-sglang")
    # The node's own metrics site, cut from its rendered Caddyfile (the public site would ask ACME).
    text = render_proxy_for(resolved("rtxpro6000-int4-sglang"), render_launch(resolved("rtxpro6000-int4-sglang")),
                            release=RELEASE).text
    start = text.index(f"http://127.0.0.1:{observability.PROXY_METRICS_PORT} {{")
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text("{\n\tadmin off\n}\n" + text[start:text.index("\n}\n", start) + 3])
    firewall = node_guard.render_firewall(enabled=True, ssh_port=22, ssh_allowlist=("10.77.0.2/32",), stack="s")
    exporter_ports = [observability.PROXY_METRICS_PORT, observability.NODE_STATE_PORT]
    with _Namespaces() as net:
        net.listen([observability.GPU_EXPORTER_PORT, 30000])  # every interface: what only the firewall stops
        node = subprocess.Popen(["ip", "netns", "exec", net.server, sys.executable,
                                 str(NODE_SCRIPTS / "node_state_exporter.py"), "--port",
                                 str(observability.NODE_STATE_PORT)], env={**os.environ, "KIMI_ROOT": str(root)},
                                stderr=subprocess.DEVNULL)
        caddy = subprocess.Popen(["ip", "netns", "exec", net.server, "caddy", "run", "--adapter", "caddyfile",
                                  "--config", str(caddyfile)], env={**os.environ, "HOME": str(tmp_path)},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            inside = ("import sys, urllib.request\n"
                      "urllib.request.urlopen(f'http://127.0.0.1:{sys.argv[1]}/metrics', timeout=2)\n")
            assert all(wait_for(lambda p=p: subprocess.run(["ip", "netns", "exec", net.server, sys.executable, "-c",
                                                            inside, str(p)], capture_output=True).returncode == 0, 15)
                       for p in exporter_ports), "the exporters did not start on the node's loopback"
            assert net.reachable("10.77.0.2", observability.GPU_EXPORTER_PORT)  # the stand-in, no firewall yet
            for port in exporter_ports:
                assert not net.reachable("10.77.0.2", port), port
            net.apply(firewall, tmp_path / "firewall.nft")
            for port in exporter_ports + [observability.GPU_EXPORTER_PORT, 30000]:
                assert not net.reachable("10.77.0.2", port), port
        finally:
            for process in (node, caddy):
                process.terminate()
                process.wait(timeout=10)



# --- the GPU exporter's own network namespace ------------------------------------------------------

from tests.test_engine_guard import NFT_CGROUP_BASE, UNAVAILABLE as GUARD_UNAVAILABLE  # noqa: E402
from tests.test_engine_guard import engine_cgroup  # noqa: E402, F401 - the fixture

#: What docker gives the exporter's network here: the host's end of it (named as the guard expects)
#: and the container's address; the metadata service behind another link of the node.
BRIDGE_HOST, BRIDGE_CONTAINER = "172.30.254.1", "172.30.254.2"
METADATA = catalog.INSTANCE_METADATA_ADDRESSES[0]

LISTEN = """
import socket, sys, threading
def serve(address, port, body):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, port)); s.listen(16)
    while True:
        c, _ = s.accept()
        c.recv(1024)
        c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
        c.close()
for spec in sys.argv[1:]:
    address, port, body = spec.split(",", 2)
    threading.Thread(target=serve, args=(address, int(port), body.encode()), daemon=True).start()
print("listening", flush=True)
sys.stdin.read()
"""

#: docker-proxy's part of --publish HOST_IP:HOST_PORT:CONTAINER_PORT: a host listener that connects to
#: the container's address (a connection the host opens).
PUBLISH = """
import socket, sys, threading
listen_ip, listen_port, target_ip, target_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def pipe(a, b):
    while data := a.recv(65536):
        b.sendall(data)
    b.shutdown(socket.SHUT_WR)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((listen_ip, listen_port)); s.listen(16)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    try:
        u = socket.create_connection((target_ip, target_port), timeout=5)
    except OSError:
        c.close(); continue
    threading.Thread(target=pipe, args=(c, u), daemon=True).start()
    threading.Thread(target=pipe, args=(u, c), daemon=True).start()
"""

PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
    print("open")
except OSError as error:
    print(type(error).__name__)
"""


class _ExporterNetwork:
    """A node namespace (the host), the exporter's namespace behind a veth whose host end has the
    bridge's name (what docker's bridge network gives the container: an address, a default route via
    the host), and the metadata service behind another link of the node, which forwards."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.node, self.exporter, self.metadata = f"kx-node-{tag}", f"kx-exp-{tag}", f"kx-meta-{tag}"
        self.processes: list[subprocess.Popen] = []

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def __enter__(self):
        for ns in (self.node, self.exporter, self.metadata):
            self._ip("netns", "add", ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("link", "add", node_guard.GPU_EXPORTER_BRIDGE, "netns", self.node, "type", "veth", "peer", "name",
                 "eth0", "netns", self.exporter)
        self._ip("link", "add", "vmeta", "netns", self.node, "type", "veth", "peer", "name", "vm", "netns",
                 self.metadata)
        for ns, dev, address in ((self.node, node_guard.GPU_EXPORTER_BRIDGE, f"{BRIDGE_HOST}/30"),
                                 (self.exporter, "eth0", f"{BRIDGE_CONTAINER}/30"),
                                 (self.node, "vmeta", "169.254.0.2/16"), (self.metadata, "vm", f"{METADATA}/16")):
            self._ip("-n", ns, "addr", "add", address, "dev", dev)
            self._ip("-n", ns, "link", "set", dev, "up")
        self._ip("-n", self.exporter, "route", "add", "default", "via", BRIDGE_HOST)
        # No masquerade on the exporter's bridge: the far side routes back to it, so only the guard stops it.
        self._ip("-n", self.metadata, "route", "add", f"{BRIDGE_CONTAINER}/32", "via", "169.254.0.2")
        subprocess.run(["ip", "netns", "exec", self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        return self

    def start(self, ns: str, code: str, *args: str) -> None:
        process = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.processes.append(process)
        assert process.stdout.readline().strip() == "listening"

    def probe(self, ns: str, address: str, port: int) -> str:
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, address, str(port)],
                              capture_output=True, text=True, timeout=30).stdout.strip()

    def scrape(self, url: str) -> str:
        code = "import sys, urllib.request\nprint(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        done = subprocess.run(["ip", "netns", "exec", self.node, sys.executable, "-c", code, url],
                              capture_output=True, text=True, timeout=30)
        return done.stdout.strip() if done.returncode == 0 else f"failed: {done.stderr.strip()[-200:]}"

    def __exit__(self, *exc):
        for process in self.processes:
            process.kill()
            process.wait()
        for ns in (self.node, self.exporter, self.metadata):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.skipif(GUARD_UNAVAILABLE is not None or NETNS_UNAVAILABLE is not None,
                    reason=str(GUARD_UNAVAILABLE or NETNS_UNAVAILABLE))
def test_from_the_exporters_namespace_no_engine_port_answers_and_the_hosts_scrape_does(engine_cgroup, tmp_path):
    """The exporter's network as the unit makes it, on the real kernel: in the host's namespace an
    engine on its loopback port and a public listener (Caddy's 443, every address); in the exporter's
    the exporter on every address of its own namespace (-a :9400) and, on the host, the publish of
    --publish 127.0.0.1:9400:9400 (docker-proxy's connection to the container). The rendered engine
    guard is loaded on the host. From the exporter's namespace: no engine port (its loopback is its
    own; the host's engine binds loopback), no host listener, no metadata service; from the host the
    scrape of 127.0.0.1:9400 answers."""
    r = resolved("h200-int4-sglang")
    engine_port = render_launch(r).instances[0].port
    options, command = _gpu_exporter_run(_gpu_exporter_unit())
    (publish,) = [o.removeprefix("--publish=") for o in options if o.startswith("--publish=")]
    host_ip, host_port, container_port = publish.split(":")
    assert command[:2] == ["-a", f":{container_port}"]  # every address of its own namespace
    with _ExporterNetwork() as net:
        net.start(net.node, LISTEN, f"127.0.0.1,{engine_port},engine", f"0.0.0.0,{caddy_https_port()},public")
        net.start(net.exporter, LISTEN, f"0.0.0.0,{container_port},DCGM_FI_DEV_GPU_UTIL{{gpu=\"0\"}} 42")
        net.start(net.metadata, LISTEN, f"{METADATA},80,a-token")
        net.start(net.node, PUBLISH, host_ip, host_port, BRIDGE_CONTAINER, container_port)
        # Without the guard: the host's engine is out of reach already (it binds loopback, and the
        # namespace's loopback is the exporter's own), but the host's other listeners and whatever the
        # node forwards are not: what the guard is for.
        # The host's network (--network=host, what the exporter had) reaches the engine's port.
        assert net.probe(net.node, "127.0.0.1", engine_port) == "open"
        for address in ("127.0.0.1", BRIDGE_HOST):
            assert net.probe(net.exporter, address, engine_port) == "ConnectionRefusedError", address
        assert net.probe(net.exporter, BRIDGE_HOST, caddy_https_port()) == "open"
        assert net.probe(net.exporter, METADATA, 80) == "open"

        relative = engine_cgroup.relative_to(NFT_CGROUP_BASE)
        rules = tmp_path / "engine-guard.nft"
        rules.write_text(node_guard.render_engine_guard(stack="test", cgroup_path=str(relative)))
        subprocess.run(["nsenter", f"--net=/run/netns/{net.node}", "nft", "-f", str(rules)], check=True,
                       capture_output=True)
        for address, port in (("127.0.0.1", engine_port), (BRIDGE_HOST, engine_port),
                              (BRIDGE_HOST, caddy_https_port()), (BRIDGE_HOST, int(host_port)), (METADATA, 80)):
            assert net.probe(net.exporter, address, port) != "open", (address, port)
        # The host's scrape goes through: a connection the host opens, answered.
        assert net.scrape(f"http://{host_ip}:{host_port}/metrics") == 'DCGM_FI_DEV_GPU_UTIL{gpu="0"} 42'


def caddy_https_port() -> int:
    from kimi_fleet.caddy import HTTPS_PORT
    return HTTPS_PORT
