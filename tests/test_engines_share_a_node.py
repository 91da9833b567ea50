"""Two vLLM engines on one node (issue 25: the K2.6 recipes' two TP4 engines per B200/B300 node), and
one of them hangs the way vllm #39863 does: /health keeps answering 200, no generation ever comes back.

Run to its end state with the node's real files: the rendered Caddyfile in a real Caddy balancing the
two (fake) engines, the shipped watchdog with systemctl and aws stubs. What is asserted is what the
plan promises (health.shared_node_exposure): only the hung engine is restarted, after the watchdog's
stall detection; once its port closes (systemd stopping it for the restart), the proxy's own health
check takes it out of rotation and every request is served by the other engine."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from kimi_fleet import caddy, node_files
from kimi_fleet.health import hung_engine_window_seconds, shared_node_exposure, windows
from kimi_fleet.launch import render_launch
from kimi_fleet.node_files import SecretsSource, render_caddyfile_for, render_node_files
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import load_stack_config, stack_file
from tests.fakes.harness import free_port, start_caddy, start_fake_engine, wait_for
from tests.fakes.imds import start_imds
from tests.test_watchdog import (API_KEY, AWS_STUB, CHUNK_DELAY, INSTANCE_ID, PROBE_TIMEOUT, SYSTEMCTL_STUB,
                                 health_settings, write_node_root)

pytestmark = [pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy binary not installed"),
              pytest.mark.timeout(300)]
STACK = "b200-nvfp4-vllm"  # two TP4 vLLM engines per node
#: A request that has not answered by then is one the hung engine holds.
CLIENT_TIMEOUT = 5.0


def _ready(root: Path) -> str | None:
    ready = root / "run/kimi-fleet/ready"
    return ready.read_text().strip() if ready.exists() else None


def _ask(proxy: str, timeout: float = CLIENT_TIMEOUT) -> int | None:
    """One chat completion through the node's Caddy: its status, or None when it hangs past `timeout`."""
    try:
        response = httpx.post(f"{proxy}/v1/chat/completions", timeout=timeout,
                              headers={"Authorization": f"Bearer {API_KEY}"},
                              json={"model": "kimi-k2.6", "max_tokens": 4,
                                    "messages": [{"role": "user", "content": "hi"}]})
        return response.status_code
    except httpx.TimeoutException:
        return None


def test_a_hung_engine_is_restarted_alone_and_the_proxy_then_serves_everything_from_the_other(tmp_path, monkeypatch):
    # The proxy's health timings, shortened (same roles, same order: fail_duration > interval >
    # timeout): the test waits them out, and at the nodes' values that is 45 s of waiting.
    monkeypatch.setattr(caddy, "HEALTH_INTERVAL", "3s")
    monkeypatch.setattr(caddy, "HEALTH_TIMEOUT", "2s")
    monkeypatch.setattr(caddy, "FAIL_DURATION", "6s")
    r = Resolved(load_stack_config(stack_file(STACK)).spec())
    assert r.engines_per_node == 2 and not r.engine.health_runs_generation
    launch = render_launch(r)
    root = tmp_path / "root"
    files = render_node_files(r, launch, size(r), secrets=SecretsSource("files"), ebs_volume_id="vol-0123456789abcdef0")
    write_node_root(root, files)
    stubs, state = tmp_path / "bin", tmp_path / "systemctl"
    stubs.mkdir()
    state.mkdir()
    for name, text in (("systemctl", SYSTEMCTL_STUB), ("aws", AWS_STUB)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    hang = tmp_path / "engine-1-hung"  # while it exists, engine 1's generations hang; /health stays 200
    model = r.spec.model.served_name
    with ExitStack() as stack:
        engine0 = stack.enter_context(start_fake_engine("good", "vllm", model, chunk_delay=CHUNK_DELAY))
        engine1_life = ExitStack()  # closed when "systemd" stops engine 1 for its restart
        stack.enter_context(engine1_life)
        engine1 = engine1_life.enter_context(start_fake_engine("good", "vllm", model, chunk_delay=CHUNK_DELAY,
                                                               options=("--hang-file", str(hang))))
        ports = (engine0.port, engine1.port)
        local_port = free_port()
        local = dataclasses.replace(launch, instances=tuple(
            dataclasses.replace(instance, port=port) for instance, port in zip(launch.instances, ports)))
        caddyfile = render_caddyfile_for(r, local, release=files[node_files.RELEASE_FILE].content.strip(),
                                         domain="localhost", tls="internal", acme_email=None, https_port=free_port(),
                                         http_port=free_port(), bind_host="127.0.0.1", local_port=local_port,
                                         access_log=str(tmp_path / "access.log"))
        # The proxy balances the two on vLLM's /health (the route #39863 keeps green).
        assert f"health_uri {r.engine.health_path}" in caddyfile and "lb_policy least_conn" in caddyfile
        stack_json = root / "etc/kimi-fleet/stack.json"
        facts = json.loads(stack_json.read_text())
        assert facts["watchdog"] == health_settings(r) and len(facts["engines"]) == 2
        for engine, port in zip(facts["engines"], ports):
            engine["port"] = port
        facts["local_proxy"] = proxy = f"http://127.0.0.1:{local_port}"
        facts["watchdog"] = {**facts["watchdog"], "probe_timeout_seconds": PROBE_TIMEOUT}
        stack_json.write_text(json.dumps(facts))
        imds = stack.enter_context(start_imds({"instance-id": INSTANCE_ID}))
        stack.enter_context(start_caddy(caddyfile, {"KIMI_API_KEY": API_KEY}))
        env = {**os.environ, "KIMI_ROOT": str(root), "PATH": f"{stubs}:{os.environ['PATH']}",
               "SYSTEMCTL_STUB_DIR": str(state), "KIMI_VERIFY_PYTHON": sys.executable,
               "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds}
        env.pop("PYTHONPATH", None)

        def run_watchdog() -> subprocess.CompletedProcess:
            result = subprocess.run(["/usr/bin/python3", str(root / node_files.WATCHDOG.lstrip("/"))],
                                    env=env, capture_output=True, text=True, timeout=200)
            assert result.returncode == 0, result.stderr
            return result

        first = run_watchdog()
        release = _ready(root)
        assert release and "kimi-engine@0.service: generates, admitted" in first.stderr
        assert "kimi-engine@1.service: generates, admitted" in first.stderr
        assert "admission: the verification suite passed" in first.stderr

        # Engine 1 hangs. Until the watchdog acts, it keeps part of the new requests: some hang.
        hang.touch()
        asked: list[int | None] = []
        while len(asked) < 30 and not (200 in asked and None in asked):  # least_conn breaks ties at random
            asked.append(_ask(proxy, timeout=2.0))
        assert 200 in asked and None in asked, asked
        failures = facts["watchdog"]["failures"]
        started = time.monotonic()
        for run in range(1, failures + 1):
            result = run_watchdog()
            assert f"kimi-engine@1.service: stalled: probe failed" in result.stderr
            assert "kimi-engine@0.service: stalled" not in result.stderr
        # Only the hung engine is restarted, at the last stalled probe; the serving one is left alone.
        assert (state / "restarts").read_text().split() == ["kimi-engine@1.service"]
        assert "kimi-engine@1.service: restarting: it stopped generating after admission" in result.stderr
        status = json.loads((root / "run/kimi-fleet/status.json").read_text())
        assert "kimi-engine@1.service" in json.dumps(status["health"]), status
        # The plan's stated window is the watchdog's cadence times its failures (here compressed: each
        # run is one timer tick); the test's runs took seconds, not minutes.
        plan_windows = windows(size(r), verification_seconds=node_files.ADMISSION_DEADLINE_SECONDS, fleet=False)
        assert plan_windows.stalled_probes == failures
        assert f"{hung_engine_window_seconds(plan_windows)} s" in shared_node_exposure(
            "vllm", r.engine.health_path, False, 2, plan_windows)
        assert time.monotonic() - started < 120

        # systemd stops engine 1 for its restart: its port closes. Within one active health interval and
        # timeout, the proxy has taken it out: every request is served (by engine 0), none hangs.
        # (The requests it held fail as it goes: passive health also takes it out, for FAIL_DURATION;
        # past that, only the active check keeps it out.)
        engine1_life.close()
        settle = _seconds(caddy.HEALTH_INTERVAL) + _seconds(caddy.HEALTH_TIMEOUT)
        # A loaded 2-core CI machine delays Caddy's check ticker: poll for the change, generously.
        assert wait_for(lambda: [_ask(proxy) for _ in range(5)] == [200] * 5, 3 * settle, interval=1.0)
        time.sleep(_seconds(caddy.FAIL_DURATION))
        assert [_ask(proxy) for _ in range(10)] == [200] * 10
        # While engine 1 loads again, the watchdog does not touch engine 0 and does not restart engine 1
        # a second time.
        hang.unlink()
        again = run_watchdog()
        assert (state / "restarts").read_text().split() == ["kimi-engine@1.service"]
        assert "kimi-engine@0.service: stalled" not in again.stderr


def _seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])
