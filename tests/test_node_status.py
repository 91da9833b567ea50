"""A cold start you can watch (issue 10, item 3): the node records its phases and the download's
progress, the proxy serves them behind the key, and the gate prints them while `pulumi up` waits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kimi_fleet import node_files
from kimi_fleet.verification.cli import node_status_line
from tests.fakes.harness import start_proxied_engine

SCRIPT = Path(node_files.__file__).parent / "node_scripts" / "node_status.py"
REPO = Path(__file__).resolve().parents[1]


def run_status(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/python3", str(SCRIPT), *args], env={**os.environ, "KIMI_ROOT": str(root)},
                          capture_output=True, text=True, timeout=30)


def test_phases_and_download_progress_are_recorded(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    os.environ["KIMI_ROOT"] = str(tmp_path)
    try:
        import importlib

        import node_status
        importlib.reload(node_status)  # ROOT is read at import
        node_status.start_phase("download", now=1000.0)
        weights = tmp_path / "weights"
        weights.mkdir()
        (weights / "a.safetensors").write_bytes(b"x" * 1000)
        first = node_status.sample_download(weights, 10_000, None, now=1000.0)
        (weights / "b.safetensors").write_bytes(b"x" * 2000)
        node_status.sample_download(weights, 10_000, first, now=1010.0)
        status = node_status.read()
        assert status["download"] == {"bytes": 3000, "total_bytes": 10_000, "bytes_per_second": 200,
                                      "eta_seconds": 35}
        node_status.start_phase("loading", now=1100.0)
        status = node_status.read()
        assert status["phase"] == "loading"
        assert status["phases"]["download"] == {"started": 1000.0, "ended": 1100.0}
        assert oct((tmp_path / "run/kimi-fleet/status.json").stat().st_mode & 0o777) == "0o644"
    finally:
        sys.path.remove(str(SCRIPT.parent))
        del os.environ["KIMI_ROOT"]
    assert run_status(tmp_path, "phase", "sideways").returncode != 0
    assert run_status(tmp_path, "nonsense").returncode == 2


def test_status_lines():
    download = {"phase": "download", "download": {"bytes": 312e9, "total_bytes": 595e9, "bytes_per_second": 2.4e9,
                                                  "eta_seconds": 118}}
    assert node_status_line(download, 0) == "node: downloading 312/595 GB at 2.4 GB/s, about 2 min left"
    loading = {"phase": "loading", "phases": {"loading": {"started": 1000.0}}}
    assert node_status_line(loading, 1000.0 + 250) == "node: engines loading for 4 min"
    assert node_status_line({"phase": "failed", "phases": {}}, 0).startswith("node: bootstrap FAILED")
    assert node_status_line(None, 0) is None and node_status_line({"phase": None}, 0) is None


@pytest.mark.skipif(subprocess.run(["which", "caddy"], capture_output=True).returncode != 0, reason="caddy missing")
def test_the_proxy_serves_the_status_behind_the_key_and_the_gate_prints_it(tmp_path):
    status_file = tmp_path / "status.json"
    status_file.write_text(json.dumps({"phase": "download", "phases": {"download": {"started": 1.0}},
                                       "download": {"bytes": 312e9, "total_bytes": 595e9,
                                                    "bytes_per_second": 2.4e9, "eta_seconds": 118}}))
    with start_proxied_engine("good", release="0123456789abcdef", status_file=str(status_file)) as endpoint:
        origin = endpoint.base_url.removesuffix("/v1")
        ca = str(endpoint.caddy.root_ca)
        assert httpx.get(f"{origin}/kimi-fleet/status", verify=ca).status_code == 401
        wrong = httpx.get(f"{origin}/kimi-fleet/status", verify=ca, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        served = httpx.get(f"{origin}/kimi-fleet/status", verify=ca,
                           headers={"Authorization": f"Bearer {endpoint.api_key}"})
        assert served.status_code == 200 and served.json()["phase"] == "download"
        # The gate waits for a release the endpoint does not serve yet, printing the node's progress.
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "verify.py"), "--base-url", endpoint.base_url,
             "--api-key", endpoint.api_key, "--model", endpoint.model, "--ca-cert", ca,
             "--release", "fedcba9876543210", "--wait-ready", "1", "--only", "models"],
            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1
    assert "verify.py: node: downloading 312/595 GB at 2.4 GB/s, about 2 min left" in result.stdout
    assert endpoint.api_key not in result.stdout + result.stderr


def test_measured_time_to_ready_from_the_node_status():
    from kimi_fleet.verification.cli import measured_line, measured_time_to_ready

    status = {"phase": "ready", "phases": {
        "download": {"started": 1000.0, "ended": 2080.0},
        "loading": {"started": 2080.0, "ended": 2800.0},
        "ready": {"started": 2800.0},
    }}
    measured = measured_time_to_ready(status)
    assert measured == {"download_seconds": 1080, "loading_seconds": 720, "total_seconds": 1800}
    assert measured_line(measured) == ("time to ready (measured on the node): download 18.0 min, "
                                       "loading 12.0 min, total 30.0 min")
    assert measured_time_to_ready({"phase": "loading", "phases": {"loading": {"started": 1.0}}}) is None


def test_the_gate_output_becomes_a_stack_output():
    from components.verification_gate import _measured

    stdout = "table...\ntime to ready (measured on the node): download 18.0 min, total 30.0 min\n"
    assert _measured(stdout) == "download 18.0 min, total 30.0 min"
    assert _measured("no status served\n") is None and _measured(None) is None


@pytest.mark.skipif(subprocess.run(["which", "caddy"], capture_output=True).returncode != 0, reason="caddy missing")
def test_the_gate_reports_what_the_node_measured(tmp_path):
    status_file = tmp_path / "status.json"
    status_file.write_text(json.dumps({"phase": "ready", "phases": {
        "download": {"started": 1000.0, "ended": 2080.0}, "loading": {"started": 2080.0, "ended": 2800.0},
        "ready": {"started": 2800.0}}}))
    report = tmp_path / "report.json"
    with start_proxied_engine("good", status_file=str(status_file)) as endpoint:
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "verify.py"), "--base-url", endpoint.base_url,
             "--api-key", endpoint.api_key, "--model", endpoint.model, "--ca-cert", str(endpoint.caddy.root_ca),
             "--only", "models", "--json", str(report)],
            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "time to ready (measured on the node): download 18.0 min, loading 12.0 min, total 30.0 min" in result.stdout
    assert json.loads(report.read_text())["time_to_ready_measured"]["total_seconds"] == 1800


def test_the_gate_prices_what_its_load_run_measured():
    from components.verification_gate import VerificationGateArgs, _measured, verify_command
    from kimi_fleet.verification.cli import THROUGHPUT_PREFIX, measured_throughput, throughput_line

    document = {"checks": [{"name": "load", "status": "pass",
                            "details": {"requests": 32, "aggregate_output_tokens_per_s": 925.0}}]}
    measured = measured_throughput(document, usd_per_hour=39.0)
    assert measured == {"output_tokens_per_second": 925.0, "concurrency": 32, "usd_per_million_output_tokens": 11.71}
    line = throughput_line(measured)
    assert line == f"{THROUGHPUT_PREFIX} 925 output tok/s at concurrency 32, $11.71 per million output tokens"
    assert _measured(f"table\n{line}\n", THROUGHPUT_PREFIX) == "925 output tok/s at concurrency 32, $11.71 per million output tokens"
    assert "$" not in throughput_line(measured_throughput(document, usd_per_hour=None))
    failed = {"checks": [{"name": "load", "status": "fail", "details": {"aggregate_output_tokens_per_s": 5.0}}]}
    assert measured_throughput(failed, 39.0) is None and measured_throughput({"checks": []}, 39.0) is None
    args = VerificationGateArgs(stack="s", base_url="u", api_key="k", model="m", engine="e",
                                ready_timeout_seconds=60, request_timeout_seconds=30, load=32, usd_per_hour=39.0)
    assert "--load 32 --usd-per-hour 39" in verify_command(args, "https://kimi.example.com/v1")


@pytest.mark.skipif(subprocess.run(["which", "caddy"], capture_output=True).returncode != 0, reason="caddy missing")
def test_a_real_load_run_through_the_proxy_becomes_the_throughput_output(tmp_path):
    from components.verification_gate import _measured
    from kimi_fleet.verification.cli import THROUGHPUT_PREFIX

    report = tmp_path / "report.json"
    with start_proxied_engine("good") as endpoint:
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "verify.py"), "--base-url", endpoint.base_url,
             "--api-key", endpoint.api_key, "--model", endpoint.model, "--ca-cert", str(endpoint.caddy.root_ca),
             "--only", "load", "--load", "8", "--usd-per-hour", "39", "--json", str(report)],
            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    measured = json.loads(report.read_text())["throughput_measured"]
    assert measured["concurrency"] == 8 and measured["output_tokens_per_second"] > 0
    assert measured["usd_per_million_output_tokens"] == round(39 / (measured["output_tokens_per_second"] * 3600 / 1e6), 2)
    assert _measured(result.stdout, THROUGHPUT_PREFIX).startswith(f"{measured['output_tokens_per_second']:g} output tok/s")


FAILED_STATUS = {"phase": "ready", "phases": {"ready": {"started": 1.0}}, "failed_release": "fedcba9876543210",
                 "failed_bundle": "ab" * 32, "node": "ip-10-0-0-7",
                 "reason": "kimi-engine@0 restarted 3 times without admitting itself",
                 "engine_log_tail": ["loading weights", "torch.OutOfMemoryError: CUDA out of memory."]}


def test_a_failed_release_in_the_status_is_one_line_for_the_gate():
    from kimi_fleet.verification.cli import release_failure

    failure = release_failure(FAILED_STATUS, "fedcba9876543210").splitlines()
    assert failure[0] == ("release fedcba9876543210 failed on node ip-10-0-0-7: kimi-engine@0 restarted 3 times "
                          "without admitting itself")
    assert failure[-1] == "  torch.OutOfMemoryError: CUDA out of memory."
    # Another release's failure (an older one) is not this one's.
    assert release_failure(FAILED_STATUS, "0123456789abcdef") is None and release_failure(FAILED_STATUS, None) is None
    assert release_failure(None, "fedcba9876543210") is None


def test_failures_and_refusals_are_recorded_and_cleared(tmp_path):
    def node_status(*args):
        result = run_status(tmp_path, *args)
        assert result.returncode == 0, result.stderr
        return json.loads((tmp_path / "run/kimi-fleet/status.json").read_text())

    status = node_status("refuse", "kimi-bootstrap", "secret file /x is missing or empty:\n put it there")
    assert status["refused"]["by"] == "kimi-bootstrap"
    assert status["refused"]["reason"] == "secret file /x is missing or empty: put it there"  # one line
    assert node_status_line(status, 0) == ("node: kimi-bootstrap refused to start: secret file /x is missing or "
                                           "empty: put it there")
    assert "refused" not in node_status("clear-refusal")
    sys.path.insert(0, str(SCRIPT.parent))
    os.environ["KIMI_ROOT"] = str(tmp_path)
    try:
        import importlib

        import node_status as module
        importlib.reload(module)
        module.record_release_failure(release="fedcba9876543210", bundle="ab" * 32, reason="why", log_tail=["x"],
                                      node="n", now=5.0)
        assert module.read()["failed_release"] == "fedcba9876543210" and module.read()["failed_at"] == 5.0
        module.clear_release_failure()
        assert not set(module.RELEASE_FAILURE_FIELDS) & set(module.read())
    finally:
        sys.path.remove(str(SCRIPT.parent))
        del os.environ["KIMI_ROOT"]


@pytest.mark.skipif(subprocess.run(["which", "caddy"], capture_output=True).returncode != 0, reason="caddy missing")
def test_the_gate_fails_at_once_when_the_node_names_the_awaited_release_as_failed(tmp_path):
    """The node rolled release fedcba9876543210 back and says so in its status: the gate, which
    would wait up to --wait-ready for that release, fails on its first look, naming the release,
    the node, the cause and the engine's last lines (the hang guard is far below --wait-ready)."""
    status_file = tmp_path / "status.json"
    status_file.write_text(json.dumps(FAILED_STATUS))
    with start_proxied_engine("good", release="0123456789abcdef", status_file=str(status_file)) as endpoint:
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "verify.py"), "--base-url", endpoint.base_url,
             "--api-key", endpoint.api_key, "--model", endpoint.model, "--ca-cert", str(endpoint.caddy.root_ca),
             "--release", "fedcba9876543210", "--wait-ready", "3000", "--only", "models"],
            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("verify.py: release fedcba9876543210 failed on node ip-10-0-0-7: kimi-engine@0 restarted 3 times "
            "without admitting itself") in result.stderr
    assert "  torch.OutOfMemoryError: CUDA out of memory." in result.stderr
    assert "not ready after" not in result.stderr
