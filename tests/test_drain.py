"""Drain before scale-in (issue 24, item 3, node side): the real drain script against IMDSv2 (fake,
on loopback), an engine's /metrics, a stub `aws` for its reads, and the fleet steward's function URL
on loopback (tests/fakes/steward.py: the signature checked, the real handler) whose Auto Scaling
calls are recorded. A busy node is not let
go while it generates, an idle one is let go at once, a stuck one at the drain timeout; the ready
listener of the node's real Caddy answers 503 from the moment the drain begins."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from kimi_fleet import node_metrics
from tests.fakes.harness import free_port, start_caddy, wait_for
from tests.fakes import steward as fake_steward
from tests.fakes.imds import start_imds
from tests.test_node_metrics import RELEASE, _loopback_proxy, _node_root, exporter

DRAIN = Path(__file__).resolve().parents[1] / "kimi_fleet" / "node_scripts" / "drain.py"
STACK = "h200-int4-vllm"  # an AWS fleet (capacity.replicas 2)
INSTANCE = "i-0123456789abcdef0"
GROUP = "kimi-h200-int4-vllm-fleet"
ROLE = "kimi-h200-int4-vllm-node-role"
STEWARD_ENVIRONMENT = {"KIMI_STEWARD_GROUP": GROUP,
                       "KIMI_STEWARD_NODE_ROLE_ARN": f"arn:aws:iam::{fake_steward.ACCOUNT}:role/{ROLE}",
                       "KIMI_STEWARD_ADMISSION_HOOK": "kimi-fleet-admitted", "KIMI_STEWARD_DRAIN_HOOK": node_metrics.DRAIN_HOOK}

STUB_AWS = """#!{python}
import json, os, sys
open({calls!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")
protected_file = {calls!r} + ".protected"
if sys.argv[1:3] == ["autoscaling", "describe-auto-scaling-instances"]:
    print(json.dumps({{"AutoScalingInstances": [{{"InstanceId": {instance!r}, "AutoScalingGroupName": {group!r},
                                                 "LifecycleState": "Terminating:Wait"}}]}}))
if sys.argv[1:3] == ["ssm", "get-parameter"]:
    print({url!r})
if sys.argv[1:3] == ["autoscaling", "describe-auto-scaling-groups"]:
    # The group: this instance and a peer, both InService; the desired count from a file (default 2).
    desired = int(open({calls!r} + ".desired").read()) if os.path.exists({calls!r} + ".desired") else 2
    mine = os.path.exists(protected_file) and open(protected_file).read() == "1"
    print(json.dumps({{"AutoScalingGroups": [{{"AutoScalingGroupName": {group!r}, "DesiredCapacity": desired,
        "Instances": [{{"InstanceId": {instance!r}, "LifecycleState": "InService", "ProtectedFromScaleIn": mine}},
                      {{"InstanceId": "i-0fedcba9876543210", "LifecycleState": "InService",
                        "ProtectedFromScaleIn": False}}]}}]}}))
"""


def engine_metrics(load: dict) -> str:
    return (f'vllm:num_requests_running{{engine="0"}} {load["running"]}\n'
            f'vllm:num_requests_waiting{{engine="0"}} {load["waiting"]}\n'
            f'vllm:generation_tokens_total{{engine="0"}} {load["tokens"]}\n')


@contextmanager
def drained_node(tmp_path: Path, load: dict, *, timeout_seconds: int | None = None):
    """A fleet node's root (its rendered stack.json and node.env), its engine's /metrics, IMDS saying
    InService, a stub aws; yields (metadata, root, calls file, start) where start() runs the drain."""
    root = tmp_path / "root"
    stack = _node_root(root, STACK)
    assert stack["drain"] == {"file": node_metrics.DRAIN_FILE, "hook": node_metrics.DRAIN_HOOK,
                              "timeout_seconds": stack["drain"]["timeout_seconds"]}
    node_env = root / "etc/kimi-fleet/node.env"
    planned = int(re.search(r"^DRAIN_TIMEOUT_SECONDS=(\d+)$", node_env.read_text(), re.M).group(1))
    assert planned == stack["drain"]["timeout_seconds"] > 0
    if timeout_seconds is not None:
        node_env.write_text(node_env.read_text().replace(f"DRAIN_TIMEOUT_SECONDS={planned}",
                                                         f"DRAIN_TIMEOUT_SECONDS={timeout_seconds}"))
    calls, bin_dir = tmp_path / "aws-calls", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text(STUB_AWS.format(python=sys.executable, calls=str(calls), instance=INSTANCE,
                                                 group=GROUP, url=fake_steward.function_url("us-east-1")))
    (bin_dir / "aws").chmod(0o755)
    metadata = {"instance-id": INSTANCE, "autoscaling/target-lifecycle-state": "InService",
                **fake_steward.instance_metadata(ROLE)}
    processes = []

    def lifecycle(instance: str) -> tuple[str, str] | None:  # as AWS holds the instance its hook drains
        terminated = metadata["autoscaling/target-lifecycle-state"] == "Terminated"
        return (GROUP, "Terminating:Wait" if terminated else "InService") if instance == INSTANCE else None

    def protected(operation: str, parameters: dict) -> None:  # what the group reports from then on
        if operation == "set_instance_protection":
            Path(f"{calls}.protected").write_text("1" if parameters["ProtectedFromScaleIn"] else "0")

    autoscaling = fake_steward.RecordingAutoScaling(f"{calls}.steward", lifecycle, protected)
    with exporter(lambda: engine_metrics(load)) as port, start_imds(metadata) as imds, \
            fake_steward.start_steward("us-east-1", ROLE, INSTANCE, autoscaling, STEWARD_ENVIRONMENT) as steward_url:
        stack["engines"][0]["port"] = port
        (root / "etc/kimi-fleet/stack.json").write_text(json.dumps(stack))
        env = {**os.environ, "KIMI_ROOT": str(root), "PATH": f"{bin_dir}:{os.environ['PATH']}",
               "KIMI_STEWARD_ENDPOINT": steward_url,
               "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds, "KIMI_DRAIN_POLL_SECONDS": "0.2",
               "KIMI_DRAIN_GROUP_POLL_SECONDS": "0.2", "KIMI_DRAIN_RELEASE_BASE_SECONDS": "0.5"}

        def start(*args: str, **overrides: str) -> subprocess.Popen:
            process = subprocess.Popen([sys.executable, str(DRAIN), *args], env={**env, **overrides},
                                       stderr=subprocess.PIPE, text=True)
            processes.append(process)
            return process

        try:
            yield metadata, root, calls, start
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                process.wait(timeout=10)


def completions(calls: Path) -> list[dict]:
    """The lifecycle actions the steward completed for the node (its Auto Scaling calls)."""
    return fake_steward.recorded(f"{calls}.steward", "complete_lifecycle_action")


def protections(calls: Path) -> list[bool]:
    """The scale-in protection the steward set on the node, call by call (True: protected)."""
    found = []
    for call in fake_steward.recorded(f"{calls}.steward", "set_instance_protection"):
        assert (call["InstanceIds"], call["AutoScalingGroupName"]) == ([INSTANCE], GROUP), call
        found.append(call["ProtectedFromScaleIn"])
    return found


def test_a_serving_node_is_protected_from_scale_in_while_busy_and_released_once_idle_a_while(tmp_path):
    """Issue 24 (review F16): the group picks an idle replica for a scale-in, never the busiest. A pause
    shorter than PROTECT_IDLE_READINGS polls keeps the protection; /metrics that do not answer change
    nothing."""
    load = {"running": 1, "waiting": 0, "tokens": 100}
    with drained_node(tmp_path, load) as (metadata, root, calls, start):
        drain = start()  # InService (0.2 s polls here), not admitted yet: its requests are the admission's
        time.sleep(0.8)
        assert protections(calls) == []
        (root / "run/kimi-fleet").mkdir(parents=True, exist_ok=True)
        (root / "run/kimi-fleet/ready").write_text(RELEASE + "\n")
        assert wait_for(lambda: protections(calls) == [True], 10)
        load.update(running=0)
        time.sleep(0.2 * 4)  # a short pause: still protected
        assert protections(calls) == [True]
        load.update(waiting=2)
        time.sleep(0.6)
        load.update(waiting=0)
        assert wait_for(lambda: protections(calls) == [True, False], 15)
        time.sleep(0.6)
        assert protections(calls) == [True, False]  # idle stays unprotected: no call per poll
        assert drain.poll() is None and completions(calls) == []
        log = root / "var/log/kimi-fleet/drain.log"  # written just after the call AWS took
        assert wait_for(lambda: "scale-in protection off: idle for 12 readings" in log.read_text(), 10)


def test_under_steady_traffic_a_pending_scale_in_releases_the_busy_node_after_its_load_delay(tmp_path):
    """Review: protecting every busy node would block scale-in for good under steady traffic. When the
    group holds more InService instances than it desires, a busy node gives its protection up after
    RELEASE_BASE_SECONDS x (1 + its requests): the least busy goes first (then drains)."""
    load = {"running": 3, "waiting": 0, "tokens": 100}
    with drained_node(tmp_path, load) as (metadata, root, calls, start):
        (root / "run/kimi-fleet").mkdir(parents=True, exist_ok=True)
        (root / "run/kimi-fleet/ready").write_text(RELEASE + "\n")
        drain = start()
        assert wait_for(lambda: protections(calls) == [True], 10)
        time.sleep(1.0)
        assert protections(calls) == [True]  # nothing pending: busy keeps it
        began = time.monotonic()
        Path(f"{calls}.desired").write_text("1")  # the group wants one replica fewer
        assert wait_for(lambda: protections(calls) == [True, False], 15)
        # 3 requests: 0.5 s x 4 = 2 s after the group's wait was seen (not before), still busy.
        assert time.monotonic() - began >= 2.0
        log = root / "var/log/kimi-fleet/drain.log"  # written just after the call AWS took
        assert wait_for(lambda: "scale-in protection off: the group waits to scale in" in log.read_text(), 10)
        assert "least busy first (engine 0: 3 running" in log.read_text()
        Path(f"{calls}.desired").write_text("2")  # it scaled in elsewhere, or changed its mind: busy again
        assert wait_for(lambda: protections(calls) == [True, False, True], 10)
        assert drain.poll() is None


def test_a_lost_state_file_takes_the_protection_from_aws(tmp_path):
    """Review: /run empties on a reboot; AWS still holds the protection. The node reads it back and, idle,
    gives it up instead of staying protected for good."""
    load = {"running": 0, "waiting": 0, "tokens": 100}
    with drained_node(tmp_path, load) as (metadata, root, calls, start):
        (root / "run/kimi-fleet").mkdir(parents=True, exist_ok=True)
        (root / "run/kimi-fleet/ready").write_text(RELEASE + "\n")
        Path(f"{calls}.protected").write_text("1")  # protected before this start, no state file
        drain = start()
        assert wait_for(lambda: protections(calls) == [False], 15)
        assert drain.poll() is None


def _expected_completion() -> dict:
    return {"operation": "complete_lifecycle_action", "AutoScalingGroupName": GROUP,
            "LifecycleHookName": node_metrics.DRAIN_HOOK, "InstanceId": INSTANCE, "LifecycleActionResult": "CONTINUE"}


def _ready(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy missing")
def test_a_busy_node_is_not_terminated_while_it_generates(tmp_path):
    load = {"running": 2, "waiting": 1, "tokens": 100}
    with drained_node(tmp_path, load) as (metadata, root, calls, start):
        ready_file, drain_file = root / "run/kimi-fleet/ready", root / node_metrics.DRAIN_FILE.lstrip("/")
        ready_file.parent.mkdir(parents=True, exist_ok=True)
        ready_file.write_text(RELEASE + "\n")
        rendered, listener = _loopback_proxy(STACK, free_port(), ready_port=free_port(), ready_file=str(ready_file),
                                             drain_file=str(drain_file))
        ready = f"http://127.0.0.1:{listener['ready_port']}/kimi-fleet/ready"
        with start_caddy(rendered.text, {"KIMI_API_KEY": "tenant-key-0123456789abcdef"}):
            drain = start()
            # A few polls in service: it only protects itself from scale-in, once.
            assert wait_for(lambda: protections(calls) == [True], 10)
            time.sleep(1)
            assert _ready(ready) == (200, RELEASE + "\n") and not drain_file.exists()
            assert protections(calls) == [True] and completions(calls) == []
            metadata["autoscaling/target-lifecycle-state"] = "Terminated"
            assert wait_for(drain_file.exists, 10)
            assert _ready(ready) == (503, "draining")  # the load balancer takes it out of rotation
            time.sleep(1.5)  # generating: still here
            load.update(running=1, waiting=0, tokens=400)
            time.sleep(1)
            assert completions(calls) == [] and drain.poll() is None
            load.update(running=0, waiting=0)
            assert wait_for(lambda: drain.poll() is not None, 10)
    assert drain.returncode == 0
    assert completions(calls) == [_expected_completion()]
    assert "drained after" in drain.stderr.read()


def test_an_idle_node_completes_at_once(tmp_path):
    load = {"running": 0, "waiting": 0, "tokens": 100}
    with drained_node(tmp_path, load) as (metadata, root, calls, start):
        metadata["autoscaling/target-lifecycle-state"] = "Terminated"
        began = time.monotonic()
        drain = start()
        assert wait_for(lambda: drain.poll() is not None, 15)
        assert time.monotonic() - began < 10 and drain.returncode == 0
        assert completions(calls) == [_expected_completion()]
        # Done is done: a restarted drain does not complete the hook again.
        again = start("--once")
        assert again.wait(timeout=30) == 0 and len(completions(calls)) == 1


def test_a_steward_that_does_not_answer_keeps_the_node_draining_until_it_does(tmp_path):
    """The fleet's steward down (its URL refuses): the idle node has left its load balancer (the drain
    file: its ready listener answers 503) and keeps asking each poll, logging why, without exiting; AWS's
    hook ends it at its heartbeat timeout (default result CONTINUE) if the steward never returns. Once
    the steward answers, one completion, and no second."""
    load = {"running": 0, "waiting": 0, "tokens": 100}
    with drained_node(tmp_path, load) as (metadata, root, calls, start):
        metadata["autoscaling/target-lifecycle-state"] = "Terminated"
        down = start(KIMI_STEWARD_ENDPOINT=f"http://127.0.0.1:{free_port()}")
        time.sleep(3)  # several polls (0.2 s each), every one refused
        assert down.poll() is None, "the drain gave up while its steward was down"
        assert completions(calls) == [] and (root / node_metrics.DRAIN_FILE.lstrip("/")).exists()
        down.kill()
        refused = down.stderr.read()
        assert refused.count("failed") >= 2 and "retried next poll" in refused
        back = start("--once")
        assert back.wait(timeout=30) == 0 and completions(calls) == [_expected_completion()]
        assert start("--once").wait(timeout=30) == 0 and len(completions(calls)) == 1


def test_a_stuck_node_completes_at_the_drain_timeout(tmp_path):
    load = {"running": 1, "waiting": 3, "tokens": 100}  # never finishes
    with drained_node(tmp_path, load, timeout_seconds=3) as (metadata, root, calls, start):
        metadata["autoscaling/target-lifecycle-state"] = "Terminated"
        began = time.monotonic()
        drain = start()
        assert wait_for(lambda: drain.poll() is not None, 20)
        assert time.monotonic() - began >= 3
        assert completions(calls) == [_expected_completion()]
        assert re.search(r"drain timeout: \d+ s of 3 s and still engine 0: 1 running, 3 waiting", drain.stderr.read())


def test_an_engine_that_does_not_answer_is_not_taken_for_idle(tmp_path):
    load = {"running": 0, "waiting": 0, "tokens": 100}
    with drained_node(tmp_path, load, timeout_seconds=60) as (metadata, root, calls, start):
        stack_json = root / "etc/kimi-fleet/stack.json"
        stack = json.loads(stack_json.read_text())
        stack["engines"][0]["port"] = free_port()  # nothing listens there
        stack_json.write_text(json.dumps(stack))
        metadata["autoscaling/target-lifecycle-state"] = "Terminated"
        once = start("--once")
        assert once.wait(timeout=30) == 0
        assert completions(calls) == [] and (root / node_metrics.DRAIN_FILE.lstrip("/")).exists()
        assert "engine 0: /metrics do not answer" in once.stderr.read()


def test_a_node_outside_a_fleet_has_nothing_to_drain(tmp_path):
    root = tmp_path / "root"
    stack = _node_root(root, "h200-int4-sglang")  # a single AWS node: no group scales it in
    assert stack["drain"] is None
    assert "DRAIN_TIMEOUT_SECONDS=\n" in (root / "etc/kimi-fleet/node.env").read_text()
    result = subprocess.run([sys.executable, str(DRAIN)], env={**os.environ, "KIMI_ROOT": str(root)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "nothing to drain" in result.stderr


def test_one_idle_reading_between_requests_does_not_let_a_node_go(tmp_path):
    """Review F11: a single idle reading can fall between a keep-alive client's requests: the hook
    completes only after drain.IDLE_READINGS idle readings in a row, and a busy reading starts the
    run again."""
    load = {"running": 0, "waiting": 0, "tokens": 100}
    with drained_node(tmp_path, load) as (metadata, root, calls, start):
        metadata["autoscaling/target-lifecycle-state"] = "Terminated"
        drain = start()
        flips = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # idle and busy alternate faster than three readings
            load["running"] = 1 - load["running"]
            flips += 1
            time.sleep(0.25)
        assert flips > 8 and completions(calls) == [] and drain.poll() is None
        load["running"] = 0
        assert wait_for(lambda: drain.poll() is not None, 10)
    assert drain.returncode == 0 and completions(calls) == [_expected_completion()]
    assert "3 readings in a row" in drain.stderr.read()


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy missing")
def test_the_tenants_site_closes_keep_alive_connections_while_the_node_drains(tmp_path):
    """Review F4: the load balancer's deregistration ends no open connection; while the drain file
    exists every answer of the tenants' site says Connection: close (an HTTP/2 GOAWAY in Go), so a
    keep-alive client reconnects to another replica. Before the drain, connections stay open."""
    import http.client
    import ssl
    drain_file = tmp_path / "run/kimi-fleet/draining"
    rendered, listener = _loopback_proxy(STACK, free_port(), ready_port=free_port(),
                                         ready_file=str(tmp_path / "ready"), drain_file=str(drain_file))
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE

    def connection_header() -> str | None:
        conn = http.client.HTTPSConnection("localhost", listener["https_port"], context=context, timeout=10)
        try:
            conn.request("GET", "/v1/models")
            response = conn.getresponse()
            response.read()
            assert response.status == 401  # no key: still the key's answer, now closing
            return response.getheader("Connection")
        finally:
            conn.close()

    # Ready once the site answers over TLS: Caddy logs that it serves before its internal certificate
    # is issued, and a handshake before that is refused (seen as a TLS internal error).
    with start_caddy(rendered.text, {"KIMI_API_KEY": "tenant-key-0123456789abcdef"},
                     ready_url=f"https://localhost:{listener['https_port']}/v1/models"):
        assert connection_header() is None
        drain_file.parent.mkdir(parents=True, exist_ok=True)
        drain_file.write_text("1\n")
        assert connection_header() == "close"
