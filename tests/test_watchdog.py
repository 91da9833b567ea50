"""Health never lies (issue 9): the node's generation probe and watchdog, run as shipped, against
fake engines that are healthy on /health but do not generate, or generate but break the API
(the node then fails its own run of the verification suite), behind the node's real Caddy."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from kimi_fleet import catalog, engines, health, node_files
from kimi_fleet.launch import render_launch
from kimi_fleet.node_files import SecretsSource, render_caddyfile_for, render_node_files
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import load_stack_config, stack_file
from tests.fakes.harness import _stop as stop_process
from tests.fakes.harness import free_port, start_caddy, start_fake_engine, wait_for
from tests.fakes import steward as fake_steward
from tests.fakes.imds import start_imds
from tests.fakes.load_shim import start_load_shim

pytestmark = [pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy binary not installed"),
              pytest.mark.timeout(180)]
API_KEY = "watchdog-test-key-0123456789"
STACK = "rtxpro6000-int4-sglang"  # a host with one engine
PROBE_TIMEOUT = 2
#: Seconds between the fake engine's SSE chunks. The admission suite's long poles stream hundreds of
#: chunks one after another (long_calls' 4,225-character call, agent_loop's turns): at the harness's
#: default 0.02 s one admission took ~37 s, at 0.005 s ~20 s, with the same checks and the same CPU.
#: The streaming check still sees separate arrivals (its gap is 0.5 ms); at 0.001 s it saw bursts.
CHUNK_DELAY = 0.005
SYSTEMCTL_STUB = """#!/bin/bash
# systemctl as the watchdog uses it: InvocationID and ActiveState per unit from files (--value: the
# InvocationID alone); restart records the unit and gives it a new InvocationID, as systemd does.
state=${SYSTEMCTL_STUB_DIR:?}
case "$1" in
  show) unit=${@: -1}
        id=$(cat "$state/invocation-$unit" 2>/dev/null || echo first)
        if [[ " $* " == *" --value "* ]]; then echo "$id"; exit 0; fi
        echo "InvocationID=$id"
        echo "ActiveState=$(cat "$state/active-$unit" 2>/dev/null || echo active)" ;;
  restart) unit=${@: -1}; echo "$unit" >>"$state/restarts"
           echo "after-restart-$(wc -l <"$state/restarts")" >"$state/invocation-$unit" ;;
  start) echo "${@: -1}" >>"$state/starts" ;;
  poweroff) echo poweroff >>"$state/poweroff" ;;
  *) echo "unexpected systemctl $*" >&2; exit 1 ;;
esac
"""
#: aws as the watchdog uses it on a fleet node: records each call (one line of arguments); the
#: instance's lifecycle state comes from a file (Pending:Wait until the steward completes the hook),
#: the steward's URL from another (its SSM parameter).
AWS_STUB = """#!/bin/bash
state=${SYSTEMCTL_STUB_DIR:?}
echo "$*" >>"$state/aws-calls"
case "$2" in
  describe-auto-scaling-instances)
    printf '{"AutoScalingInstances": [{"AutoScalingGroupName": "kimi-group", "LifecycleState": "%s"}]}\n' \
      "$(cat "$state/lifecycle" 2>/dev/null || echo InService)" ;;
  get-parameter) cat "$state/steward-url" ;;
esac
"""
INSTANCE_ID = "i-0123456789abcdef0"
NODE_ROLE = "kimi-node-role"


def probe(*args: str) -> subprocess.CompletedProcess:
    script = Path(node_files.__file__).parent / "node_scripts" / "generation_probe.py"
    return subprocess.run(["/usr/bin/python3", str(script), *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("mode, expected", [("good", 0), ("dead-scheduler", 1)])
def test_generation_probe_tells_a_dead_scheduler_from_a_healthy_engine(mode, expected):
    with start_fake_engine(mode) as engine:
        # /health says 200 either way: that is the lie the probe exists for.
        health = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", engine.url + "/health"],
                                capture_output=True, text=True)
        assert health.stdout == "200"
        result = probe(engine.url, engine.model, str(PROBE_TIMEOUT))
    assert result.returncode == expected, result.stderr
    if expected:
        assert "timed out" in result.stderr


def write_node_root(root: Path, files: dict) -> None:
    """A node's files under `root`, and its API key where the node keeps it."""
    for file in files.values():
        target = root / file.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(file.content)
    key_file = root / SecretsSource("files").api_key_file.lstrip("/")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(API_KEY)


def health_settings(r: Resolved) -> dict:
    """stack.json's watchdog windows as kimi_fleet.health computes them for this stack."""
    return health.watchdog_settings(health.windows(size(r), verification_seconds=node_files.ADMISSION_DEADLINE_SECONDS,
                                                   fleet=node_files.behind_load_balancer(r)))


@contextmanager
def node(tmp_path: Path, mode: str, options: tuple[str, ...] = (), *, busy_file: Path | None = None,
         watchdog: dict | None = None):
    """A scratch node: the stack's rendered files, one fake engine in place of the real one, the
    node's Caddyfile run by a real Caddy (loopback ports), and systemctl and aws stubs.
    `busy_file`: a load shim in front of the engine (tests/fakes/load_shim.py) plays a busy engine
    while the file exists. `watchdog`: stack.json's watchdog settings to change (short windows)."""
    r = Resolved(load_stack_config(stack_file(STACK)).spec())
    launch = render_launch(r)
    root = tmp_path / "root"
    files = render_node_files(r, launch, size(r), secrets=SecretsSource("files"))
    write_node_root(root, files)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("systemctl", SYSTEMCTL_STUB), ("aws", AWS_STUB)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    state = tmp_path / "systemctl"
    state.mkdir()
    with ExitStack() as stack:
        # Only content frames are paced: this stack admits at concurrency 1, so every paced reasoning
        # and tool-call frame of the admission suite's serial requests adds up (the streaming check
        # times content alone).
        engine = stack.enter_context(start_fake_engine(mode, "sglang", r.spec.model.served_name,
                                                       options=(*options, "--pace-content-only"),
                                                       chunk_delay=CHUNK_DELAY))
        port = engine.port
        if busy_file is not None:
            port = stack.enter_context(start_load_shim(engine.port, "sglang", str(busy_file),
                                                       hold_seconds=PROBE_TIMEOUT + 1)).port
        imds = stack.enter_context(start_imds({"instance-id": INSTANCE_ID, **fake_steward.instance_metadata(NODE_ROLE)}))
        # The fleet's steward (its URL on loopback, the real handler): the hook the node completes through it.
        lifecycle = state / "lifecycle"
        autoscaling = fake_steward.RecordingAutoScaling(
            state / "steward-calls",
            lambda i: ("kimi-group", lifecycle.read_text().strip() if lifecycle.exists() else "InService"),
            lambda operation, _: lifecycle.write_text("InService\n"))
        (state / "steward-url").write_text(fake_steward.function_url("us-east-1"))
        steward_url = stack.enter_context(fake_steward.start_steward(
            "us-east-1", NODE_ROLE, INSTANCE_ID, autoscaling, {
                "KIMI_STEWARD_GROUP": "kimi-group",
                "KIMI_STEWARD_NODE_ROLE_ARN": f"arn:aws:iam::{fake_steward.ACCOUNT}:role/{NODE_ROLE}",
                "KIMI_STEWARD_ADMISSION_HOOK": health.ADMISSION_HOOK_NAME, "KIMI_STEWARD_DRAIN_HOOK": "kimi-drain"}))
        local_port = free_port()
        local = dataclasses.replace(launch, instances=tuple(
            dataclasses.replace(i, port=port) for i in launch.instances))
        caddyfile = render_caddyfile_for(r, local, release=files[node_files.RELEASE_FILE].content.strip(),
                                         domain="localhost", tls="internal", acme_email=None, https_port=free_port(),
                                         http_port=free_port(), bind_host="127.0.0.1", local_port=local_port,
                                         access_log=str(tmp_path / "access.log"))
        # The node's stack.json, with the fake's port, the loopback listener's port and short probes.
        stack_json = root / "etc/kimi-fleet/stack.json"
        facts = json.loads(stack_json.read_text())
        assert facts["watchdog"] == health_settings(r)  # the node got its stack's windows as rendered
        facts["engines"][0]["port"] = port
        facts["local_proxy"] = f"http://127.0.0.1:{local_port}"
        facts["watchdog"] = {**facts["watchdog"], "probe_timeout_seconds": PROBE_TIMEOUT, **(watchdog or {})}
        stack_json.write_text(json.dumps(facts))
        stack.enter_context(start_caddy(caddyfile, {"KIMI_API_KEY": API_KEY}))
        # Stopped before Caddy: a request the engine holds (a hung engine) ends, and Caddy stops at
        # once instead of waiting out the harness's STOP_TIMEOUT for it.
        stack.callback(stop_process, engine.process)
        # The suite's dependencies come from this venv (on a node: the bootstrap's verifier venv);
        # the suite itself is the copy shipped in the node files.
        env = {**os.environ, "KIMI_ROOT": str(root), "PATH": f"{stubs}:{os.environ['PATH']}",
               "SYSTEMCTL_STUB_DIR": str(state), "KIMI_VERIFY_PYTHON": sys.executable,
               "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds, "KIMI_STEWARD_ENDPOINT": steward_url}
        env.pop("PYTHONPATH", None)

        def run_watchdog() -> subprocess.CompletedProcess:
            return subprocess.run(["/usr/bin/python3", str(root / node_files.WATCHDOG.lstrip("/"))],
                                  env=env, capture_output=True, text=True, timeout=150)

        yield root, run_watchdog, state, facts


def _ready(root: Path) -> str | None:
    ready = root / "run/kimi-fleet/ready"
    return ready.read_text().strip() if ready.exists() else None


def test_a_node_whose_engine_never_generates_never_reports_ready(tmp_path):
    with node(tmp_path, "dead-scheduler") as (root, run_watchdog, state, facts):
        for _ in range(facts["watchdog"]["failures"] + 1):
            result = run_watchdog()
            assert result.returncode == 0, result.stderr
            assert _ready(root) is None
    # Never admitted, so never restarted either: a loading engine looks the same and must be left alone.
    assert not (state / "restarts").exists()


def test_a_node_that_breaks_after_admission_is_unready_and_its_engine_restarted(tmp_path):
    broken = tmp_path / "engine-broken"  # while it exists, every generation hangs
    with node(tmp_path, "good", ("--hang-file", str(broken))) as (root, run_watchdog, state, facts):
        first = run_watchdog()
        assert first.returncode == 0, first.stderr
        release = (root / node_files.RELEASE_FILE.lstrip("/")).read_text().strip()
        # Admitted by a generation straight to the engine, then the whole suite through its own Caddy.
        assert _ready(root) == release, first.stderr
        assert "kimi-engine@0.service: generates, admitted" in first.stderr
        assert "admission: the verification suite passed" in first.stderr
        report = json.loads((root / node_files.ADMISSION_REPORT.lstrip("/")).read_text())
        assert report["passed"] and {c["name"] for c in report["checks"]} == {*facts["admission"]["checks"], "release"}
        # Proven once per release and engine start: the next run only probes.
        assert "verification suite" not in run_watchdog().stderr and _ready(root) == release
        broken.touch()
        outputs = []
        failures = facts["watchdog"]["failures"]
        for run in range(1, failures + 1):
            result = run_watchdog()
            assert result.returncode == 0, result.stderr
            outputs.append(result.stderr)
            # In service through fewer than `failures` stalled probes (one slow minute is no outage),
            # out of rotation at the last one, when the engine is restarted.
            assert _ready(root) == (release if run < failures else None), result.stderr
            assert f"stalled: probe failed" in result.stderr and f"({run}/{failures} in a row)" in result.stderr
        restarts = (state / "restarts").read_text().split()
        assert restarts == ["kimi-engine@0.service"]
        assert "restarting: it stopped generating after admission" in outputs[-1]
        assert "node not ready: kimi-engine@0.service restarted after" in outputs[-1]
        # After the restart the engine must be admitted again before anything else happens to it.
        again = run_watchdog()
        assert (state / "restarts").read_text().split() == ["kimi-engine@0.service"]
        assert _ready(root) is None and "admitted" not in again.stderr
        broken.unlink()  # the restarted engine generates: admitted, and proven again for its new start
        back = run_watchdog()
        assert "admission: the verification suite passed" in back.stderr and _ready(root) == release


def _status(root: Path) -> dict:
    return json.loads((root / "run/kimi-fleet/status.json").read_text())


def _age(state_dir: Path, key: str, seconds: float) -> None:
    """Move one of the watchdog's remembered times `seconds` into the past (instead of waiting)."""
    path = state_dir / "engine-0.json"
    state = json.loads(path.read_text())
    state[key] -= seconds
    path.write_text(json.dumps(state))


def _aws_calls(state: Path) -> list[str]:
    calls = state / "aws-calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_a_busy_engine_stays_in_service_and_is_never_restarted(tmp_path):
    """Issue 20: a load spike that holds the 4-token probe past its timeout is not an outage. The
    engine's own token counter advances meanwhile: the node keeps its ready file (its load balancer
    keeps routing to it) and nothing is restarted, however many probes in a row time out."""
    busy = tmp_path / "busy"
    with node(tmp_path, "good", busy_file=busy) as (root, run_watchdog, state, facts):
        assert run_watchdog().returncode == 0
        release = (root / node_files.RELEASE_FILE.lstrip("/")).read_text().strip()
        assert _ready(root) == release
        busy.touch()
        for _ in range(facts["watchdog"]["failures"] + 2):
            result = run_watchdog()
            assert result.returncode == 0, result.stderr
            assert "kimi-engine@0.service: busy: probe failed (TimeoutError" in result.stderr, result.stderr
            assert "stays in service" in result.stderr and "stalled" not in result.stderr
            assert _ready(root) == release
        assert not (state / "restarts").exists()
        health_now = _status(root)["health"]
        assert health_now["verdict"] == "in service, held"
        assert health_now["engines"]["kimi-engine@0.service"]["verdict"] == "busy"
        busy.unlink()
        assert run_watchdog().returncode == 0 and _ready(root) == release
        assert _status(root)["health"]["verdict"] == "ready"


def test_busy_is_read_under_the_names_stack_json_gives_for_the_engine(tmp_path):
    """The watchdog knows no engine: the token counter it reads is the one stack.json names for
    this engine instance (its engine module's LoadMetrics). Under another engine's names the same
    busy engine shows no counter, and its failed probe counts as a stall."""
    busy = tmp_path / "busy"
    with node(tmp_path, "good", busy_file=busy) as (root, run_watchdog, state, facts):
        assert facts["engines"][0]["metrics"] == engines.get(facts["engine"]).load_metrics.as_dict()
        assert run_watchdog().returncode == 0 and _ready(root) is not None
        other = next(engines.get(name) for name in engines.names() if name != facts["engine"])
        facts["engines"][0]["metrics"] = other.load_metrics.as_dict()
        (root / "etc/kimi-fleet/stack.json").write_text(json.dumps(facts))
        busy.touch()
        result = run_watchdog()
        assert result.returncode == 0, result.stderr
        assert "kimi-engine@0.service: stalled: probe failed (TimeoutError" in result.stderr, result.stderr
        assert "busy" not in result.stderr


def test_a_dead_engine_is_restarted_first_and_only_after_the_long_window_marked_for_replacement(tmp_path):
    """A fleet node whose engine stops generating: restarted after `failures` stalled probes, its
    hung load killed at the load budget, and only once the dead window passed without a generation
    does the node mark itself unhealthy for its Auto Scaling group (once). Time is moved by editing
    the watchdog's remembered times, never by waiting."""
    hang = tmp_path / "hang"
    with node(tmp_path, "good", ("--hang-file", str(hang)), watchdog={"replace_dead_node": True}) as (
            root, run_watchdog, state, facts):
        settings = root / node_files.NODE_ENV_FILE.lstrip("/")
        settings.write_text(settings.read_text().replace("AWS_REGION=\n", "AWS_REGION=us-east-1\n"))
        watchdog_state = root / "run/kimi-fleet/watchdog"
        assert run_watchdog().returncode == 0 and _ready(root) is not None
        hang.touch()
        for _ in range(facts["watchdog"]["failures"]):
            result = run_watchdog()
        assert "restarting: it stopped generating after admission" in result.stderr
        assert (state / "restarts").read_text().split() == ["kimi-engine@0.service"]
        assert _ready(root) is None and _aws_calls(state) == []
        # The restarted engine loads (its probe fails, nothing is admitted): left alone within its budget.
        loading = run_watchdog()
        assert "over budget" not in loading.stderr and len((state / "restarts").read_text().split()) == 1
        assert _status(root)["health"]["engines"]["kimi-engine@0.service"]["verdict"] == "loading"
        # The load hangs past its budget: killed, restarted, reported. Still not dead: it was just restarted.
        _age(watchdog_state, "started_at", facts["watchdog"]["load_budget_seconds"] + 1)
        over = run_watchdog()
        budget = facts["watchdog"]["load_budget_seconds"]
        assert f"kimi-engine@0.service: load over budget: started" in over.stderr
        assert f"its load budget is {budget} s, still not generating (TimeoutError" in over.stderr
        assert len((state / "restarts").read_text().split()) == 2 and _aws_calls(state) == []
        # No generation for the whole dead window: now, and only now, the node stops itself (its group's
        # EC2 health check replaces it; no Auto Scaling permission that could touch other nodes).
        assert not (state / "poweroff").exists()
        _age(watchdog_state, "last_generation_at", facts["watchdog"]["dead_window_seconds"] + 1)
        dead = run_watchdog()
        assert "powering off; its Auto Scaling group replaces it" in dead.stderr, dead.stderr
        assert (state / "poweroff").read_text().split() == ["poweroff"]
        assert not any("set-instance-health" in call for call in _aws_calls(state))
        status = _status(root)
        assert status["phase"] == "failed" and status["health"]["verdict"] == "dead"
        assert "no generation for" in status["health"]["engines"]["kimi-engine@0.service"]["dead"]
        run_watchdog()
        assert (state / "poweroff").read_text().split() == ["poweroff"]  # once


def test_a_crash_loop_is_dead_at_once_and_a_single_node_only_says_so(tmp_path):
    """`crash_loop_starts` starts (new InvocationIDs) within the window: dead without waiting for the
    dead window. A single node has no group to replace it: no AWS call, one clear line."""
    starts = 3
    with node(tmp_path, "dead-scheduler", watchdog={"crash_loop_starts": starts}) as (
            root, run_watchdog, state, facts):
        assert facts["watchdog"]["replace_dead_node"] is False  # a host stack
        for start in range(1, starts + 1):
            (state / "invocation-kimi-engine@0.service").write_text(f"start-{start}\n")
            result = run_watchdog()
            assert result.returncode == 0 and _ready(root) is None
            assert ("crash loop" in result.stderr) == (start == starts), result.stderr
        assert f"node dead (kimi-engine@0.service: crash loop: {starts} starts within" in result.stderr
        assert "a single node has no group to replace it" in result.stderr
        assert _aws_calls(state) == [] and _status(root)["health"]["verdict"] == "dead"


def test_an_admitted_node_publishes_its_compile_cache_once_when_the_mirror_is_managed(tmp_path):
    with node(tmp_path, "good") as (root, run_watchdog, state, facts):
        # This host stack has no managed mirror: admission starts nothing else.
        assert run_watchdog().returncode == 0 and _ready(root) is not None
        assert not (state / "starts").exists()
    archive = "s3://kimi-fleet-weights-us-east-1/hf/.compile-cache/sglang--x--rtxpro6000/0123456789abcdef.tar"
    again = tmp_path / "managed"
    again.mkdir()
    with node(again, "good") as (root, run_watchdog, state, facts):
        settings = root / node_files.NODE_ENV_FILE.lstrip("/")
        settings.write_text(settings.read_text().replace("COMPILE_CACHE_ARCHIVE=\n", f"COMPILE_CACHE_ARCHIVE={archive}\n"))
        first = run_watchdog()
        assert _ready(root) is not None, first.stderr
        assert (state / "starts").read_text().split() == [node_files.COMPILE_CACHE_UNIT]
        assert f"compile cache: publishing to {archive}" in first.stderr
        run_watchdog()  # proven already: not published again
        assert (state / "starts").read_text().split() == [node_files.COMPILE_CACHE_UNIT]


@pytest.mark.parametrize("mode, check", [("raw-tool-markers", "tool_call"), ("vision-in-reasoning", "vision")])
def test_a_node_that_generates_but_breaks_the_api_never_reports_ready(tmp_path, mode, check):
    """The tiny probe generates fine; the node's own run of the suite finds what is broken."""
    with node(tmp_path, mode) as (root, run_watchdog, state, facts):
        for _ in range(2):
            result = run_watchdog()
            assert result.returncode == 0, result.stderr
            assert "generates, admitted" in result.stderr or "admission" in result.stderr
            assert f"admission: the verification suite failed ({check}:" in result.stderr
            assert _ready(root) is None
        assert json.loads((root / "run/kimi-fleet/status.json").read_text())["phase"] == "verifying"
    assert not (state / "restarts").exists()  # a wrong answer is not a hung engine: no restart loop


def test_the_loopback_listener_still_needs_the_key(tmp_path):
    with node(tmp_path, "good") as (root, run_watchdog, state, facts):
        local = facts["local_proxy"]
        without = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{local}/v1/models"],
                                 capture_output=True, text=True)
        assert without.stdout == "401"
        key_file = root / SecretsSource("files").api_key_file.lstrip("/")
        assert probe(local, facts["model"], str(PROBE_TIMEOUT), str(key_file)).returncode == 0
        wrong = tmp_path / "wrong-key"
        wrong.write_text("not-the-key-0123456789")
        result = probe(local, facts["model"], str(PROBE_TIMEOUT), str(wrong))
        assert result.returncode == 1 and "HTTP 401" in result.stderr


def test_probe_usage_error():
    result = probe("http://127.0.0.1:1")
    assert result.returncode == 2 and "usage:" in result.stderr
    assert sys.executable  # the probe runs with the system python3, as on a node


def test_a_fleet_node_tells_its_load_balancer_only_what_the_watchdog_wrote(tmp_path):
    """The NLB's health check (HTTP on the ready port, no key) against the fleet node's Caddyfile."""
    r = Resolved(load_stack_config(stack_file("h200-int4-vllm")).spec())
    assert node_files.behind_load_balancer(r)
    ready_file, ready_port = tmp_path / "run" / "ready", free_port()
    ready_file.parent.mkdir()
    caddyfile = render_caddyfile_for(r, render_launch(r), domain="localhost", tls="internal", acme_email=None,
                                     https_port=free_port(), http_port=free_port(), bind_host="127.0.0.1",
                                     local_port=free_port(), access_log=str(tmp_path / "access.log"),
                                     ready_port=ready_port, ready_file=str(ready_file))
    assert f"http://:{ready_port} {{" in caddyfile

    def check(path: str = "/kimi-fleet/ready") -> tuple[str, str]:
        result = subprocess.run(["curl", "-s", "-w", " %{http_code}", f"http://127.0.0.1:{ready_port}{path}"],
                                capture_output=True, text=True)
        body, _, code = result.stdout.rpartition(" ")
        return code, body

    with start_caddy(caddyfile, {"KIMI_API_KEY": API_KEY}):
        assert check() == ("503", "not ready")
        ready_file.write_text("0123456789abcdef\n")
        assert check() == ("200", "0123456789abcdef\n")
        # Nothing else is served there: not the directory, not the engine.
        assert check("/ready")[0] == "503" and check("/v1/models")[0] == "503"
        ready_file.unlink()
        assert check()[0] == "503"
    # A single node has no load balancer: no ready listener, nothing more to open.
    single = Resolved(load_stack_config(stack_file("h200-int4-sglang")).spec())
    assert "kimi-fleet/ready" not in render_caddyfile_for(single, render_launch(single))


def _package_imports(path: Path) -> tuple[set[str], set[str]]:
    """(kimi_fleet modules, other top-level modules) one module imports, at any depth."""
    import ast

    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT_DIR).with_suffix("").parts).rsplit(".", 1)[0]
    inside, outside = set(), set()
    for item in ast.walk(tree):
        names = []
        if isinstance(item, ast.Import):
            names = [alias.name for alias in item.names]
        elif isinstance(item, ast.ImportFrom):
            base = item.module or ""
            if item.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - item.level + 1], *filter(None, [base])])
            names = [base] + [f"{base}.{alias.name}" for alias in item.names]
        for name in names:
            (inside if name.startswith("kimi_fleet") else outside).add(name)
    return inside, {name.split(".")[0] for name in outside}


ROOT_DIR = Path(node_files.__file__).resolve().parents[1]


def test_the_suite_shipped_to_nodes_is_complete_and_needs_only_its_pinned_packages():
    shipped = {f"kimi_fleet/{module}" for module in node_files.VERIFIER_MODULES}
    third_party = set()
    for module in shipped:
        inside, outside = _package_imports(ROOT_DIR / module)
        for name in inside:
            candidates = {name.replace(".", "/") + ".py", name.replace(".", "/") + "/__init__.py"}
            existing = {c for c in candidates if (ROOT_DIR / c).exists()}
            assert existing <= shipped, (module, name)  # everything it imports from the package ships
        third_party |= outside - set(sys.stdlib_module_names) - {"__future__"}
    # packaging: engine_bugs.py (the gate names known engine bugs) reads version ranges with it.
    assert third_party == {"httpx", "jsonschema", "packaging"}
    pins = {line.split("==")[0].lower(): line for line in (ROOT_DIR / "requirements.txt").read_text().splitlines()
            if "==" in line}
    for package in third_party:
        assert f"{pins[package].strip()}" in catalog.VERIFIER_REQUIREMENTS  # the versions the gate runs with


# --- Kubernetes: the admission container, as the pod runs it ------------------------------------

def _pod_admission(root: Path, facts: dict, tmp_path: Path, rounds: int, *, background: bool = False):
    from kimi_fleet.k8s_manifests import ADMISSION_PASSED

    state = tmp_path / "admission-state"
    config = {
        "local_proxy": facts["local_proxy"], "model": facts["model"], "engine": facts["engine"],
        "checks": facts["admission"]["checks"], "release": (root / node_files.RELEASE_FILE.lstrip("/")).read_text().strip(),
        "suite_path": str(root / node_files.VERIFIER_DIR.lstrip("/")), "requirements": "unused",
        "dependencies_dir": str(state / "packages"), "report": str(state / "report.json"),
        "passed_file": str(state / Path(ADMISSION_PASSED).name), "interval_seconds": 0.2, "failures": 2,
        "probe_timeout_seconds": PROBE_TIMEOUT, "request_timeout_seconds": 30, "concurrency": 4,
        "deadline_seconds": 120,
    }
    (tmp_path / "admission.json").write_text(json.dumps(config))
    script = Path(node_files.__file__).parent / "node_scripts" / "pod_admission.py"
    env = {**os.environ, "KIMI_API_KEY": API_KEY, "KIMI_VERIFY_PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    command = ["/usr/bin/python3", str(script), str(tmp_path / "admission.json"), "--rounds", str(rounds)]
    if background:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)


def test_a_pod_is_ready_only_after_the_suite_passed_against_its_own_proxy(tmp_path):
    with node(tmp_path, "good") as (root, run_watchdog, state, facts):
        result = _pod_admission(root, facts, tmp_path, rounds=1)
    assert result.returncode == 0, result.stderr
    assert "the verification suite passed" in result.stderr
    assert (tmp_path / "admission-state" / "passed").read_text().strip() == \
        (root / node_files.RELEASE_FILE.lstrip("/")).read_text().strip()


def test_a_pod_whose_engine_generates_but_breaks_tool_calls_never_becomes_ready(tmp_path):
    with node(tmp_path, "raw-tool-markers") as (root, run_watchdog, state, facts):
        result = _pod_admission(root, facts, tmp_path, rounds=2)
    assert result.returncode == 1
    assert "the verification suite failed (tool_call:" in result.stderr
    assert not (tmp_path / "admission-state" / "passed").exists()


def test_a_pod_that_stops_generating_leaves_the_service_until_it_passes_again(tmp_path):
    broken = tmp_path / "engine-broken"
    passed = tmp_path / "admission-state" / "passed"
    passed.parent.mkdir()
    passed.write_text("stale\n")  # a restarted container's emptyDir still holds the last file
    with node(tmp_path, "good", ("--hang-file", str(broken))) as (root, run_watchdog, state, facts):
        admission = _pod_admission(root, facts, tmp_path, rounds=400, background=True)
        try:
            assert wait_for(lambda: passed.exists() and passed.read_text() != "stale\n", 60)
            broken.touch()  # generations hang: out of the Service after `failures` of them
            assert wait_for(lambda: not passed.exists(), 60)
            broken.unlink()  # generating again: the suite runs again before the pod is Ready
            assert wait_for(passed.exists, 60)
        finally:
            admission.terminate()
            _, errors = admission.communicate(timeout=30)
    assert errors.count("the verification suite passed") == 2, errors
    assert "not ready until it generates and passes the suite again" in errors


def _fleet_settings(root: Path) -> None:
    """This (single-node) stack's node.env as a fleet node's: its region and its steward's parameter."""
    settings = root / node_files.NODE_ENV_FILE.lstrip("/")
    settings.write_text(settings.read_text().replace("AWS_REGION=\n", "AWS_REGION=us-east-1\n").replace(
        "STEWARD_URL_PARAMETER=\n", "STEWARD_URL_PARAMETER=/kimi-fleet/test/steward-url\n"))


def test_a_fleet_node_enters_service_only_by_completing_its_launch_hook_once_admitted(tmp_path):
    """The group holds a new instance in Pending:Wait (kimi_fleet/health.py's launch hook) until its
    watchdog admitted it: only then is the hook completed, once; an instance refresh so waits on real
    admission. Before admission, no Auto Scaling call at all."""
    hook = health.ADMISSION_HOOK_NAME
    with node(tmp_path, "dead-scheduler", watchdog={"replace_dead_node": True, "admission_hook": hook}) as (
            root, run_watchdog, state, facts):
        _fleet_settings(root)
        (state / "lifecycle").write_text("Pending:Wait\n")
        run_watchdog()
        assert _ready(root) is None and _aws_calls(state) == []  # never generates: never admitted
        assert fake_steward.recorded(state / "steward-calls", "complete_lifecycle_action") == []
    with node(tmp_path / "good", "good", watchdog={"replace_dead_node": True, "admission_hook": hook}) as (
            root, run_watchdog, state, facts):
        _fleet_settings(root)
        (state / "lifecycle").write_text("Pending:Wait\n")
        result = run_watchdog()
        assert _ready(root) is not None, result.stderr
        assert f"launch hook {hook} completed; group kimi-group puts {INSTANCE_ID} in service" in result.stderr
        completed = fake_steward.recorded(state / "steward-calls", "complete_lifecycle_action")
        # Through the steward (the node's role may not): its own instance, its own group's hook.
        assert completed == [{"operation": "complete_lifecycle_action", "AutoScalingGroupName": "kimi-group",
                              "LifecycleHookName": hook, "InstanceId": INSTANCE_ID,
                              "LifecycleActionResult": "CONTINUE"}], completed
        assert not any("complete-lifecycle-action" in call for call in _aws_calls(state))
        calls = _aws_calls(state)
        run_watchdog()
        assert _aws_calls(state) == calls  # once
        assert len(fake_steward.recorded(state / "steward-calls", "complete_lifecycle_action")) == 1
