"""Two node roots of one replica, really apart (issue 22, done-when 3): the worker in its own network
namespace behind a veth pair, the leader on this machine's. Each runs its rendered engine line in a
fake rank that checks the rendezvous arguments (ranks, world, the leader's address, its own) and
meets the other over TCP at the rendered addresses, then logs NCCL's transport line; each node's
shipped watchdog admits it (the leader through its real Caddy and the verification suite) only
when NCCL named the fabric, and refuses it, naming the rank, over sockets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from kimi_fleet import node_files
from kimi_fleet.launch import replica_launches
from kimi_fleet.node_files import SecretsSource, render_caddyfile_for, render_node_files
from kimi_fleet.sizing import size
from tests.fakes.harness import free_port, start_caddy, wait_for
from tests.fakes.imds import start_imds
from tests.test_aws_stacks import resolved
from tests.test_watchdog import API_KEY, AWS_STUB, INSTANCE_ID, SYSTEMCTL_STUB, write_node_root

STACK = "h100-int4-vllm"
FAKE_RANK = Path(__file__).parent / "fakes" / "fake_rank.py"
#: The engine's journal, as the watchdog asks for it: the log answers only for the engine unit's
#: current start (the systemctl stub's InvocationID), as _SYSTEMD_INVOCATION_ID filters it.
JOURNALCTL_STUB = """#!/bin/bash
state=${SYSTEMCTL_STUB_DIR:?}
current=$(cat "$state/invocation-kimi-engine@0.service" 2>/dev/null || echo first)
[ "$1" = "_SYSTEMD_INVOCATION_ID=$current" ] && cat "$state/engine.log" 2>/dev/null
exit 0
"""


def _netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"kf-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return made


pytestmark = [pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy binary not installed"),
              pytest.mark.skipif(not _netns_usable(), reason="needs root and network namespaces"),
              pytest.mark.timeout(240)]


@contextmanager
def worker_namespace():
    """A namespace for the worker node and a veth pair to it: (leader address, worker address, netns)."""
    tag = os.getpid() % 10000
    netns, host_end, node_end = f"kf-worker-{tag}", f"kfl{tag}", f"kfw{tag}"
    subnet = f"10.231.{tag % 250}"
    leader, worker = f"{subnet}.1", f"{subnet}.2"
    commands = [["ip", "netns", "add", netns],
                ["ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end],
                ["ip", "link", "set", node_end, "netns", netns],
                ["ip", "addr", "add", f"{leader}/30", "dev", host_end], ["ip", "link", "set", host_end, "up"],
                ["ip", "-n", netns, "addr", "add", f"{worker}/30", "dev", node_end],
                ["ip", "-n", netns, "link", "set", node_end, "up"], ["ip", "-n", netns, "link", "set", "lo", "up"]]
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)
        yield leader, worker, netns
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def _container(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The engine line and environment `docker run` would give the container."""
    image_at = argv.index("--entrypoint") + 2
    env = dict(a.removeprefix("--env=").split("=", 1) for a in argv[:image_at] if a.startswith("--env="))
    return [argv[image_at - 1], *argv[image_at + 1:]], env


def _node_root(tmp_path: Path, rank: int, r, addresses: tuple[str, str]):
    launch = replica_launches(r, addresses)[rank]
    files = render_node_files(r, launch, size(r), secrets=SecretsSource("files"), node_rank=rank,
                              ebs_volume_id="vol-0123456789abcdef0")
    root = tmp_path / f"rank{rank}"
    write_node_root(root, files)
    stubs, state = tmp_path / f"bin{rank}", tmp_path / f"state{rank}"
    stubs.mkdir()
    state.mkdir()
    for name, text in (("systemctl", SYSTEMCTL_STUB), ("aws", AWS_STUB), ("journalctl", JOURNALCTL_STUB)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    argv = json.loads(files[launch.instances[0].argv_file_path].content)
    return root, stubs, state, launch, files, argv


def _start_rank(argv: list[str], transport: str, log: Path, *, netns: str | None = None,
                serve_port: int | None = None) -> subprocess.Popen:
    engine, env = _container(argv)
    command = [sys.executable, str(FAKE_RANK), "--transport", transport,
               *(["--serve-port", str(serve_port)] if serve_port else []), "--", *engine]
    if netns:
        command = ["ip", "netns", "exec", netns, *command]
    return subprocess.Popen(command, env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _watchdog(root: Path, stubs: Path, state: Path, imds: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KIMI_ROOT": str(root), "PATH": f"{stubs}:{os.environ['PATH']}",
           "SYSTEMCTL_STUB_DIR": str(state), "KIMI_VERIFY_PYTHON": sys.executable,
           "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds}
    env.pop("PYTHONPATH", None)
    return subprocess.run(["/usr/bin/python3", str(root / node_files.WATCHDOG.lstrip("/"))], env=env,
                          capture_output=True, text=True, timeout=200)


def _status(root: Path) -> dict:
    return json.loads((root / "run/kimi-fleet/status.json").read_text())


def _ready(root: Path) -> str | None:
    ready = root / "run/kimi-fleet/ready"
    return ready.read_text().strip() if ready.exists() else None


@pytest.mark.parametrize("worker_transport", ["efa", "socket"])
def test_two_ranks_meet_at_the_rendered_addresses_and_admit_only_over_the_fabric(tmp_path, worker_transport):
    r = resolved(STACK)
    with worker_namespace() as (leader_address, worker_address, netns), ExitStack() as stack:
        addresses = (leader_address, worker_address)
        leader_root, leader_stubs, leader_state, leader_launch, leader_files, leader_argv = _node_root(
            tmp_path, 0, r, addresses)
        worker_root, worker_stubs, worker_state, _, worker_files, worker_argv = _node_root(tmp_path, 1, r, addresses)
        serve_port, local_port = free_port(), free_port()
        ranks = [_start_rank(leader_argv, "efa", leader_state / "engine.log", serve_port=serve_port),
                 _start_rank(worker_argv, worker_transport, worker_state / "engine.log", netns=netns)]
        stack.callback(lambda: [p.kill() for p in ranks])
        logs = (leader_state / "engine.log", worker_state / "engine.log")
        assert wait_for(lambda: all("NCCL INFO Using network" in p.read_text() for p in logs)
                        or any(p.poll() is not None for p in ranks), 60), [p.read_text() for p in logs]
        assert all(p.poll() is None for p in ranks), [p.read_text() for p in logs]  # the rendezvous held

        imds = stack.enter_context(start_imds({"instance-id": INSTANCE_ID}))
        # The worker: admitted by its watchdog once NCCL named the fabric; refused, naming rank 1, over sockets.
        worker_run = _watchdog(worker_root, worker_stubs, worker_state, imds)
        assert worker_run.returncode == 0, worker_run.stderr
        fabric = _status(worker_root)["fabric"]
        worker_release = worker_files[node_files.RELEASE_FILE].content.strip()
        if worker_transport == "efa":
            assert fabric["transport"] == "efa" and fabric["verdict"].startswith("rank 1: NCCL over efa")
            assert _ready(worker_root) == worker_release
            # NCCL said it once, at start-up: a journal that no longer has it does not unadmit the rank.
            (worker_state / "engine.log").rename(worker_state / "engine.log.vacuumed")
            assert _watchdog(worker_root, worker_stubs, worker_state, imds).returncode == 0
            assert _ready(worker_root) == worker_release
            # A new start is judged on its own lines only: it has said nothing yet, so it is not admitted.
            (worker_state / "engine.log").write_text("INFO loading weights\n")
            (worker_state / "invocation-kimi-engine@0.service").write_text("second-start\n")
            assert _watchdog(worker_root, worker_stubs, worker_state, imds).returncode == 0
            assert _ready(worker_root) is None
            assert _status(worker_root)["fabric"]["transport"] == "unknown"
        else:
            assert fabric["transport"] == "socket"
            assert fabric["verdict"].startswith("rank 1: NCCL runs over TCP sockets, not the fabric")
            assert "NET/Socket" in fabric["verdict"] or "Using network Socket" in fabric["verdict"]
            assert _ready(worker_root) is None
            assert "rank 1: NCCL runs over TCP sockets" in worker_run.stderr
            return

        # The leader: the fabric, then its real Caddy and the verification suite against its own listener.
        release = leader_files[node_files.RELEASE_FILE].content.strip()
        local = leader_launch.__class__(**{**leader_launch.__dict__, "instances": tuple(
            i.__class__(**{**i.__dict__, "port": serve_port}) for i in leader_launch.instances)})
        caddyfile = render_caddyfile_for(r, local, release=release, domain="localhost", tls="internal",
                                         acme_email=None, https_port=free_port(), http_port=free_port(),
                                         bind_host="127.0.0.1", local_port=local_port,
                                         access_log=str(tmp_path / "access.log"))
        stack_json = leader_root / "etc/kimi-fleet/stack.json"
        facts = json.loads(stack_json.read_text())
        facts["engines"][0]["port"] = serve_port
        facts["local_proxy"] = f"http://127.0.0.1:{local_port}"
        facts["watchdog"] = {**facts["watchdog"], "probe_timeout_seconds": 5}
        stack_json.write_text(json.dumps(facts))
        stack.enter_context(start_caddy(caddyfile, {"KIMI_API_KEY": API_KEY}))
        deadline = time.monotonic() + 150
        while _ready(leader_root) != release and time.monotonic() < deadline:
            leader_run = _watchdog(leader_root, leader_stubs, leader_state, imds)
            assert leader_run.returncode == 0, leader_run.stderr
        assert _ready(leader_root) == release, leader_run.stderr
        assert _status(leader_root)["fabric"]["verdict"].startswith("rank 0: NCCL over efa")


@pytest.mark.parametrize("judged_start, fails_at_once", [("new-start", True), ("0", False)])
def test_a_release_apply_fails_at_once_when_its_new_engine_is_on_sockets(tmp_path, judged_start, fails_at_once):
    """The apply does not wait out its budget for a rank whose watchdog saw its new engine on
    sockets, and does not fail on a verdict about the engine start it is replacing (the old engine
    may still run, on sockets, for its stop grace)."""
    script = Path(node_files.__file__).parent / "node_scripts" / "apply_release.py"
    root = tmp_path / "root"
    status = root / "run/kimi-fleet/status.json"
    status.parent.mkdir(parents=True)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    # The engine's start when the wait begins is "0" (systemctl show ... --value), its restarts 0.
    (stubs / "systemctl").write_text("#!/bin/bash\necho 0\n")
    (stubs / "journalctl").write_text("#!/bin/bash\necho 'NCCL INFO Using network Socket'\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    code = f"""
import json, sys, threading, time
sys.path.insert(0, {str(script.parent)!r})
import apply_release
from pathlib import Path
def later():
    time.sleep(0.5)
    Path({str(status)!r}).write_text(json.dumps({{"fabric": {{"transport": "socket", "at": time.time(),
        "engine_starts": [{judged_start!r}],
        "verdict": "rank 1: NCCL runs over TCP sockets, not the fabric (Using network Socket)"}}}}))
threading.Thread(target=later).start()
started = time.monotonic()
try:
    apply_release.wait_admitted("r1", Path({str(root / 'run/kimi-fleet/ready')!r}), [0], budget=4, poll=0.1)
except apply_release.ReleaseFailed as failure:
    print(json.dumps({{"reason": str(failure), "seconds": time.monotonic() - started}}))
"""
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KIMI_ROOT": str(root),
                                                               "PATH": f"{stubs}:{os.environ['PATH']}"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    if fails_at_once:
        assert outcome["reason"].startswith("rank 1: NCCL runs over TCP sockets")
        assert outcome["seconds"] < 3  # not the whole budget
    else:
        assert outcome["reason"].startswith("not admitted within")  # the old start's verdict did not count


def test_a_node_whose_first_boot_never_got_a_bundle_installs_it_through_its_boot_loader(tmp_path):
    """A rank's boot loader gives up waiting for its pointer when its peer takes longer to launch;
    the association's next run finds no applier and hands over to the frozen boot loader instead of
    failing on every `pulumi up` until the node is replaced by hand."""
    from components.node_release import apply_command
    from kimi_fleet.boot_stub import BOOT_LOADER

    assert not Path(node_files.APPLY_RELEASE).exists()  # this machine is no node
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "python3").write_text(f"#!/bin/bash\necho \"$@\" >{tmp_path / 'ran'}\n")
    (stubs / "python3").chmod(0o755)
    digest = "ab" * 32
    result = subprocess.run(["bash", "-c", apply_command("/kimi-fleet/h100-int4-vllm/release-rank-1", "us-east-1",
                                                         digest)],
                            env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ran").read_text().split() == [
        BOOT_LOADER, "--pointer", "/kimi-fleet/h100-int4-vllm/release-rank-1", "--region", "us-east-1"]
