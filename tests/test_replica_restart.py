"""A multi-node replica restarts as one unit (issue 22): two rank roots of `h100-int4-vllm` as rendered
for their addresses, each with its shipped start publisher (replica_epoch.py serve, on its own
loopback address) and its shipped watchdog, systemd and the journal stubbed per rank. One rank's
engine start ends (a new start, or no process): the other restarts its own engine once, the
replica forms again, and nobody restarts anybody after that. A peer that answers anything but a
start line changes nothing. And a release that replaces a rank's peer waits for that peer's cold
start, not this rank's warm one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from kimi_fleet import catalog, health, node_files
from kimi_fleet.launch import replica_launches
from kimi_fleet.node_files import (SecretsSource, bootstrap_timeout_seconds, release_bundle, render_node_files,
                                   replica_apply_timeout_seconds)
from kimi_fleet.node_scripts import replica_epoch
from kimi_fleet.node_scripts.replica_epoch import PeerUnreadable, read_peer
from kimi_fleet.sizing import size, whole_checkpoint_budget_seconds
from tests.fakes.harness import _stop as stop_process
from tests.fakes.harness import free_port, wait_for
from tests.test_aws_stacks import resolved
from tests.test_watchdog import write_node_root

STACK = "h100-int4-vllm"
UNIT = "kimi-engine@0.service"
pytestmark = [pytest.mark.timeout(120)]
#: systemctl as the watchdog and the publisher use it, with systemd's InvocationID shape (32 hex
#: digits): per-unit state from files; restart records the unit and gives it a new start.
SYSTEMCTL_STUB = """#!/bin/bash
state=${SYSTEMCTL_STUB_DIR:?}
echo "$*" >>"$state/systemctl-calls"
case "$1" in
  show) unit=${@: -1}
        id=$(cat "$state/invocation-$unit" 2>/dev/null)
        if [[ " $* " == *" --value "* ]]; then echo "$id"; exit 0; fi
        echo "InvocationID=$id"
        echo "ActiveState=$(cat "$state/active-$unit" 2>/dev/null || echo active)" ;;
  restart) unit=${@: -1}
           if [[ -s $state/fail-restarts ]]; then  # this many restarts fail (systemd refused the job)
             sed -i '$d' "$state/fail-restarts"; echo "Failed to restart $unit: stub refused" >&2; exit 1
           fi
           echo "$unit" >>"$state/restarts"
           printf 'restart %s %s %s' "$state" "$unit" "$(wc -l <"$state/restarts")" | md5sum | cut -c1-32 \\
             >"$state/invocation-$unit"
           echo active >"$state/active-$unit" ;;
  *) echo "unexpected systemctl $*" >&2; exit 1 ;;
esac
"""
#: The journal of one engine start, as the watchdog asks for it (_SYSTEMD_INVOCATION_ID=<id>).
JOURNALCTL_STUB = """#!/bin/bash
state=${SYSTEMCTL_STUB_DIR:?}
cat "$state/journal-${1#_SYSTEMD_INVOCATION_ID=}.log" 2>/dev/null
exit 0
"""
NCCL_EFA = ("NCCL INFO NET/OFI Selected provider is efa, fabric is efa (found 32 nics)\n"
            "NCCL INFO Using network Libfabric\n")


def start_id(label: str) -> str:
    return hashlib.md5(label.encode()).hexdigest()


class Rank:
    """One rank's node root, stubs and state, and its start publisher."""

    def __init__(self, tmp_path: Path, rank: int, addresses: tuple[str, str], port: int):
        r = resolved(STACK)
        launch = replica_launches(r, addresses)[rank]
        self.files = render_node_files(r, launch, size(r), secrets=SecretsSource("files"), node_rank=rank,
                                       ebs_volume_id="vol-0123456789abcdef0")
        self.rank, self.address, self.port = rank, addresses[rank], port
        self.root, self.bin, self.state = (tmp_path / f"rank{rank}", tmp_path / f"bin{rank}", tmp_path / f"state{rank}")
        write_node_root(self.root, self.files)
        self.bin.mkdir()
        self.state.mkdir()
        for name, text in (("systemctl", SYSTEMCTL_STUB), ("journalctl", JOURNALCTL_STUB)):
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)
        stack_json = self.root / "etc/kimi-fleet/stack.json"
        facts = json.loads(stack_json.read_text())
        assert facts["replica"]["address"] == self.address and facts["replica"]["epoch_port"] == \
            node_files.REPLICA_EPOCH_PORT
        assert facts["replica"]["peers"] == [{"rank": 1 - rank, "address": addresses[1 - rank]}]
        # Loopback ports this machine has free; the leader's engine port has nothing behind it (it loads).
        facts["replica"]["epoch_port"] = port
        facts["engines"][0]["port"] = free_port()
        stack_json.write_text(json.dumps(facts))
        self.env = {**os.environ, "KIMI_ROOT": str(self.root), "PATH": f"{self.bin}:{os.environ['PATH']}",
                    "SYSTEMCTL_STUB_DIR": str(self.state)}
        self.env.pop("PYTHONPATH", None)
        self.started(f"rank{rank}-first", formed=True)

    def started(self, label: str, *, formed: bool) -> str:
        """The engine unit is on a new start (systemd restarted it); `formed`: NCCL said its transport."""
        start = start_id(label)
        (self.state / f"invocation-{UNIT}").write_text(start + "\n")
        (self.state / f"active-{UNIT}").write_text("active\n")
        if formed:
            self.formed()
        return start

    def current(self) -> str:
        return (self.state / f"invocation-{UNIT}").read_text().strip()

    def formed(self) -> None:
        """The current start's communicators are up: NCCL named the fabric in its journal."""
        (self.state / f"journal-{self.current()}.log").write_text(NCCL_EFA)

    def gone(self, active: str = "failed") -> None:
        (self.state / f"active-{UNIT}").write_text(active + "\n")

    def restarts(self) -> list[str]:
        path = self.state / "restarts"
        return path.read_text().split() if path.exists() else []

    def watchdog(self) -> subprocess.CompletedProcess:
        result = subprocess.run(["/usr/bin/python3", str(self.root / node_files.WATCHDOG.lstrip("/"))], env=self.env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result

    def health(self) -> dict:
        return json.loads((self.root / "run/kimi-fleet/status.json").read_text())["health"]

    @contextmanager
    def publisher(self):
        """The shipped publisher as its units run it: the socket unit's listener on this rank's
        address (held here, as systemd holds it), passed to the service's ExecStart."""
        socket_unit = self.files[node_files.REPLICA_EPOCH_SOCKET_PATH].content
        assert f"ListenStream={self.address}:{node_files.REPLICA_EPOCH_PORT}\n" in socket_unit
        listener = socket.create_server((self.address, self.port))
        try:
            process = self.serve(listener)
            try:
                yield process
            finally:
                stop_process(process)
        finally:
            listener.close()

    def serve(self, listener: socket.socket) -> subprocess.Popen:
        """The service's ExecStart on the socket unit's listener (fd 3, LISTEN_PID and LISTEN_FDS as
        systemd sets them); up once it answers."""
        unit = self.files[node_files.REPLICA_EPOCH_UNIT_PATH].content
        exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
        argv = exec_start.removeprefix("ExecStart=").split()
        assert argv[:2] == ["/usr/bin/python3", node_files.REPLICA_EPOCH]
        assert argv[2:] == ["serve", "--address", self.address, "--port", str(node_files.REPLICA_EPOCH_PORT),
                            "--unit", UNIT]
        argv = ["/usr/bin/python3", str(self.root / node_files.REPLICA_EPOCH.lstrip("/")), "serve", "--address",
                self.address, "--port", str(self.port), "--unit", UNIT]
        fd = listener.fileno()
        process = subprocess.Popen(["/bin/bash", "-c", f'exec 3<&{fd} {fd}<&-; export LISTEN_PID=$$ LISTEN_FDS=1; '
                                    'exec "$@"', "sd-listen", *argv], env=self.env, pass_fds=(fd,),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert wait_for(lambda: self.published() is not None or process.poll() is not None, 20)
        assert process.poll() is None, process.stderr.read()
        return process

    def published(self) -> tuple[str, str] | None:
        try:
            return read_peer(self.address, self.port, timeout=2)
        except PeerUnreadable:
            return None

    def shows(self, start: str, active: str = "active") -> None:
        """Wait until the publisher answers this start (it reads systemd at most once a second)."""
        assert wait_for(lambda: self.published() == (start, active), 10), self.published()


def _addresses() -> tuple[str, str]:
    """Two loopback addresses of their own (tests running side by side do not share them)."""
    tag = os.getpid() % 250 + 1
    return f"127.42.{tag}.1", f"127.42.{tag}.2"


@contextmanager
def replica(tmp_path: Path):
    addresses = _addresses()
    port = free_port()
    leader, worker = Rank(tmp_path, 0, addresses, port), Rank(tmp_path, 1, addresses, port)
    with ExitStack() as stack:
        stack.enter_context(leader.publisher())
        stack.enter_context(worker.publisher())
        # Both ranks formed with each other's first start.
        for rank in (worker, leader):
            run = rank.watchdog()
            assert "formed its collectives with rank" in run.stderr, run.stderr
        yield leader, worker


@pytest.mark.parametrize("ended", ["restarted", "gone"])
@pytest.mark.parametrize("first", ["leader", "worker"])
def test_one_rank_restarting_restarts_the_other_once_and_never_again(tmp_path, first, ended):
    with replica(tmp_path) as (leader, worker):
        changed, other = (leader, worker) if first == "leader" else (worker, leader)
        old = changed.current()
        if ended == "restarted":
            new = changed.started(f"{first}-crashed-and-restarted", formed=False)  # systemd's Restart=
            changed.shows(new)
        else:
            changed.gone()
            changed.shows(old, "failed")
        run = other.watchdog()
        assert other.restarts() == [UNIT], run.stderr
        assert f"rank {changed.rank}'s engine start {old}, the one this rank's collectives were formed with" in run.stderr
        assert other.health()["engines"][UNIT]["verdict"] == "replica restart"
        assert not (other.root / "run/kimi-fleet/ready").exists()
        # Until the replica forms again: the restarted rank's next runs do not restart it again.
        other.watchdog()
        assert other.restarts() == [UNIT]
        if ended == "gone":  # systemd (or the rank's own watchdog) starts it again
            changed.started(f"{first}-back", formed=False)
        # The replica forms anew: both new starts meet, NCCL names the fabric on each.
        changed.formed()
        other.formed()
        changed.shows(changed.current())
        other.shows(other.current())
        for _ in range(3):
            for rank in (changed, other):
                rank.watchdog()
        assert other.restarts() == [UNIT]  # once, for the peer start that ended
        # The rank that started anew is not restarted for its peer's restart: no restart loop.
        assert changed.restarts() == []
        assert worker.health()["engines"][UNIT]["verdict"] == "serving"
        assert (worker.root / "run/kimi-fleet/ready").exists()


def test_a_failed_restart_is_retried_on_the_next_run(tmp_path):
    """systemd refuses the rank's restart once: nothing recorded as done, the next run restarts it
    (once), and the run after that does not."""
    with replica(tmp_path) as (leader, worker):
        new = leader.started("leader-crashed-and-restarted", formed=False)
        leader.shows(new)
        (worker.state / "fail-restarts").write_text("x\n")
        run = worker.watchdog()
        assert worker.restarts() == [] and "restart not queued" in run.stderr, run.stderr
        assert worker.health()["engines"][UNIT]["verdict"] == "replica restart"
        run = worker.watchdog()
        assert worker.restarts() == [UNIT], run.stderr
        worker.watchdog()
        assert worker.restarts() == [UNIT]


def test_a_rank_that_has_not_formed_waits_for_its_peer_instead_of_restarting(tmp_path):
    """A rank still waiting at the rendezvous (NCCL has said nothing for its start) meets whatever
    start its peer comes up with: a release that restarts the leader first and the worker later
    restarts each once, not twice."""
    with replica(tmp_path) as (leader, worker):
        leader_start = leader.started("release-n1-leader", formed=False)  # the leader's apply restarted it
        leader.shows(leader_start)
        worker.watchdog()
        assert worker.restarts() == [UNIT]  # the worker's old start cannot join the new leader
        worker.shows(worker.current())
        for _ in range(2):
            leader.watchdog()  # waiting at the rendezvous: the worker's new start is whom it will meet
        assert leader.restarts() == []
        leader.formed()
        worker.formed()
        for _ in range(2):
            for rank in (leader, worker):
                rank.watchdog()
        assert leader.restarts() == [] and worker.restarts() == [UNIT]


class _Forger(BaseHTTPRequestHandler):
    """A peer that answers whatever the test says (status, body)."""
    answer: tuple[int, bytes] = (200, b"")

    def do_GET(self):  # noqa: N802
        status, body = self.answer
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


FORGED = [
    b"",
    b"\n",
    b"$(systemctl poweroff) active\n",
    b"; systemctl poweroff\n",
    ("a" * 32 + " active; rm -rf /\n").encode(),
    ("a" * 32 + " active\n" + "b" * 32 + " active\n").encode(),
    ("A" * 32 + " active\n").encode(),
    ("b" * 31 + " active\n").encode(),
    ("b" * 32 + " running\n").encode(),
    ("b" * 32 + "  active\n").encode(),
    json.dumps({"start": "b" * 32, "active": "active"}).encode(),
    ("b" * 32 + " active").encode() + b"\x00",
    "ä".encode() * 20,
    b"b" * 32 + b" active" + b" " * 4096,
]


def test_a_forged_or_garbage_peer_value_changes_nothing(tmp_path):
    """The worker formed with a peer start; the peer then answers anything but a start line (or an
    error): no restart, nothing run, the formed start kept; its real start again changes nothing."""
    addresses = _addresses()
    port = free_port()
    worker = Rank(tmp_path, 1, addresses, port)
    forger = type("Forger", (_Forger,), {"answer": (200, ("a" * 32 + " active\n").encode())})
    server = HTTPServer((addresses[0], port), forger)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert "formed its collectives with rank 0's start " + "a" * 32 in worker.watchdog().stderr
        answers = [(200, body) for body in FORGED] + [(500, ("b" * 32 + " active\n").encode()),
                                                       (404, b"")]
        peer_state = worker.root / "run/kimi-fleet/watchdog/replica-peer-0.json"
        for answer in answers:
            forger.answer = answer
            run = worker.watchdog()
            state = json.loads(peer_state.read_text())
            assert state.get("unreadable") and state["partner"] == "a" * 32, (answer, run.stderr)
            assert worker.restarts() == [], answer
        forger.answer = (200, ("a" * 32 + " active\n").encode())
        worker.watchdog()
        assert worker.restarts() == []
        state = json.loads(peer_state.read_text())
        assert state["partner"] == "a" * 32 and "unreadable" not in state
        # Nothing but reads of the engine unit and none of its own: no restart, no poweroff, no start.
        calls = (worker.state / "systemctl-calls").read_text().splitlines()
        assert {call.split()[0] for call in calls} == {"show"}, calls
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def dripping_peer(address: str, port: int, every: float, seconds: float):
    """A peer that answers its status line one byte every `every` seconds, for `seconds` at most:
    each read waits less than any per-read timeout, the whole answer never ends."""
    import socket

    listener = socket.create_server((address, port))
    stop = threading.Event()

    def drip():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            with connection:
                connection.recv(1024)
                for byte in (b"HTTP/1.0 200 OK\r\nX-" + b"a" * 4096)[:int(seconds / every)]:
                    if stop.wait(every):
                        break
                    try:
                        connection.sendall(bytes([byte]))
                    except OSError:
                        break

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_a_dripping_peer_is_given_up_at_the_read_deadline():
    """One byte every 0.2 s, for 8 s: a per-read timeout of 1 s never fires; the whole read's does."""
    import time

    address, port = _addresses()[0], free_port()
    with dripping_peer(address, port, every=0.2, seconds=8):
        began = time.monotonic()
        with pytest.raises(PeerUnreadable):
            read_peer(address, port, timeout=1.0)
        assert time.monotonic() - began < 2.5


def test_a_dripping_peer_does_not_hold_the_watchdog(tmp_path):
    """The worker's peer drips its answer for 20 s: the watchdog's run gives up on it at the read
    deadline (and changes nothing), rather than for as long as the peer keeps dripping."""
    import time

    addresses = _addresses()
    port = free_port()
    worker = Rank(tmp_path, 1, addresses, port)
    with dripping_peer(addresses[0], port, every=0.5, seconds=20):
        began = time.monotonic()
        run = worker.watchdog()
        took = time.monotonic() - began
    assert took < replica_epoch.READ_TIMEOUT_SECONDS + 6, (took, run.stderr)
    assert "nothing to act on" in run.stderr and worker.restarts() == []


@pytest.mark.parametrize("body", FORGED)
def test_the_peer_reader_accepts_one_start_line_and_nothing_else(body):
    with pytest.raises(PeerUnreadable):
        replica_epoch.parse(body)
    assert replica_epoch.parse(("c" * 32 + " deactivating\n").encode()) == ("c" * 32, "deactivating")
    assert replica_epoch.parse(b"- inactive") == ("-", "inactive")


def test_the_publisher_answers_one_line_on_one_path(tmp_path):
    addresses = _addresses()
    leader = Rank(tmp_path, 0, addresses, free_port())
    import http.client

    with leader.publisher():
        leader.shows(leader.current())
        for method, path, status in (("GET", "/x", 404), ("POST", "/", 501), ("GET", "/../etc/passwd", 404)):
            connection = http.client.HTTPConnection(leader.address, leader.port, timeout=5)
            connection.request(method, path)
            assert connection.getresponse().status == status
            connection.close()


def test_the_publisher_s_port_is_held_through_its_restart(tmp_path):
    """The socket unit's listener outlives the service: while the publisher is down, nothing else (an
    engine on the host's network) can bind its port, and the restarted publisher answers on it."""
    import errno

    addresses = _addresses()
    leader = Rank(tmp_path, 0, addresses, free_port())
    listener = socket.create_server((leader.address, leader.port))
    try:
        stop_process(leader.serve(listener))
        for address in (leader.address, "0.0.0.0"):
            squatter = socket.socket()
            try:
                squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                with pytest.raises(OSError) as refused:
                    squatter.bind((address, leader.port))
                assert refused.value.errno == errno.EADDRINUSE
            finally:
                squatter.close()
        process = leader.serve(listener)
        try:
            leader.shows(leader.current())
        finally:
            stop_process(process)
    finally:
        listener.close()


def test_the_publisher_refuses_a_passed_socket_bound_elsewhere(tmp_path):
    addresses = _addresses()
    leader = Rank(tmp_path, 0, addresses, free_port())
    listener = socket.create_server((addresses[1], leader.port))
    try:
        fd = listener.fileno()
        argv = ["/usr/bin/python3", str(leader.root / node_files.REPLICA_EPOCH.lstrip("/")), "serve", "--address",
                leader.address, "--port", str(leader.port), "--unit", UNIT]
        result = subprocess.run(["/bin/bash", "-c", f'exec 3<&{fd} {fd}<&-; export LISTEN_PID=$$ LISTEN_FDS=1; '
                                 'exec "$@"', "sd-listen", *argv], env=leader.env, pass_fds=(fd,),
                                capture_output=True, text=True, timeout=30)
        assert result.returncode != 0 and "refusing to serve on it" in result.stderr
    finally:
        listener.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_the_publisher_unit_admits_the_peers_alone_and_passes_systemd_analyze(tmp_path):
    from tests.test_node_files import _systemd_root

    r = resolved(STACK)
    addresses = ("10.0.0.5", "10.0.0.6")
    for rank in (0, 1):
        files = render_node_files(r, replica_launches(r, addresses)[rank], size(r), secrets=SecretsSource("files"),
                                  node_rank=rank, ebs_volume_id="vol-0123456789abcdef0")
        unit = files[node_files.REPLICA_EPOCH_UNIT_PATH].content
        sockets = files[node_files.REPLICA_EPOCH_SOCKET_PATH].content
        for text in (unit, sockets):
            assert "IPAddressDeny=any\n" in text and f"IPAddressAllow={addresses[1 - rank]}\n" in text
        assert f"--address {addresses[rank]} " in unit and "DynamicUser=yes" in unit
        assert f"Requires={node_files.REPLICA_EPOCH_SOCKET}\n" in unit
        assert f"ListenStream={addresses[rank]}:{node_files.REPLICA_EPOCH_PORT}\n" in sockets
        assert f"Service={node_files.REPLICA_EPOCH_UNIT}\n" in sockets and "Accept=no\n" in sockets
        root = tmp_path / f"rank{rank}"
        _systemd_root(root, files)
        result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "--man=no",
                                 node_files.REPLICA_EPOCH_SOCKET_PATH, node_files.REPLICA_EPOCH_UNIT_PATH],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    # A single node, and the planner (no addresses yet), have no publisher.
    from kimi_fleet.launch import render_launch

    planned = render_node_files(r, render_launch(r), size(r), secrets=SecretsSource("files"),
                                ebs_volume_id="vol-0123456789abcdef0")
    assert node_files.REPLICA_EPOCH_UNIT_PATH not in planned and node_files.REPLICA_EPOCH_SOCKET_PATH not in planned


# --- the apply's budget -------------------------------------------------------------------------


class _Clock:
    """The applier's clock, run forward by its own sleeps; the node admits the release it runs at
    `admit_at` seconds (what the watchdog does once every rank is up)."""

    def __init__(self, root: Path, admit_at: float):
        import time

        self.now, self.root, self.admit_at = 0.0, root, admit_at
        self.strftime, self.gmtime = time.strftime, time.gmtime

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.now >= self.admit_at:
            release = (self.root / node_files.RELEASE_FILE.lstrip("/")).read_text()
            ready = self.root / node_files.READY_FILE.lstrip("/")
            ready.parent.mkdir(parents=True, exist_ok=True)
            ready.write_text(release)


def test_a_replaced_peer_s_budget_counts_a_new_node_with_the_whole_checkpoint():
    """The peer's cold start is the group's grace for a new node (boot, image pull, download, verify,
    build, read, load, margin: health's own terms and constants), less the self-verification a worker
    does not run, with the whole checkpoint's download, verify and read: its stage share is an
    estimate, and a node may fetch up to all of it."""
    r = resolved(STACK)
    sizing = size(r)
    assert r.stage_fetch  # the stack whose share is an estimate
    whole = whole_checkpoint_budget_seconds(r)
    terms = health.peer_cold_start_terms(sizing, whole)
    grace = health.windows(sizing, verification_seconds=node_files.ADMISSION_DEADLINE_SECONDS, fleet=True).grace_terms
    assert list(terms) == [name for name in grace if name != "self-verification"]
    assert terms["boot"] == health.BOOT_SECONDS and terms["image pull"] == health.IMAGE_PULL_SECONDS
    assert terms["margin"] == health.GRACE_MARGIN_SECONDS
    assert terms["image build (estimate)"] == sizing.image_build_seconds > 0
    assert terms["load (compile and warm-up included)"] == sizing.budget_seconds("load")
    # The whole checkpoint, from the catalog's size: more than the largest stage share the sizing counts.
    assert sizing.node_weights[0]["bytes"] < r.checkpoint.size_bytes
    for phase in ("download", "verify", "read"):
        assert terms[phase] == whole[phase] > grace[phase] * 1.5, phase
    assert whole["download"] >= r.checkpoint.size_bytes // catalog.TRANSFER_SOURCES[r.spec.weights.source].bytes_per_second
    assert sum(terms.values()) > sizing.cold_start_seconds + health.BOOT_SECONDS + health.IMAGE_PULL_SECONDS
    # A stack whose nodes fetch the whole checkpoint anyway: the same download, verify and read.
    single = resolved("h200-int4-vllm")
    assert not single.stage_fetch
    assert whole_checkpoint_budget_seconds(single) == {"download": size(single).download_seconds,
                                                       "verify": size(single).verify_seconds,
                                                       "read": size(single).budget_seconds("read")}


OLD_IDS, SAME_ADDRESS_NEW_WORKER = ("i-0123456789abcdef0", "i-0123456789abcdef1"), ("i-0123456789abcdef0", "i-0fedcba987654321f")


@pytest.mark.parametrize("peer_replaced", ["new address", "same address, new instance", False])
def test_an_apply_that_replaces_the_peer_waits_for_its_cold_start(tmp_path, monkeypatch, peer_replaced):
    """Release N runs on the leader; N+1 names a new worker (the old one was replaced) that boots cold,
    the worst case (the whole checkpoint): the leader's apply waits for it and admits N+1. The same late admission of a release that
    replaces no peer fails the apply at the warm budget and puts N back."""
    from kimi_fleet.node_scripts import apply_release

    r = resolved(STACK)
    sizing = size(r)
    root, bundles, stubs = tmp_path / "root", tmp_path / "bundles", tmp_path / "bin"
    for directory in (root, bundles, stubs):
        directory.mkdir()
    (stubs / "systemctl").write_text("#!/bin/sh\necho 0\n")
    (stubs / "journalctl").write_text("#!/bin/sh\nexit 0\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)

    def publish(addresses: tuple[str, str], volume: str, ids: tuple[str, str] | None = None) -> tuple[Path, str]:
        files = render_node_files(r, replica_launches(r, addresses)[0], sizing, secrets=SecretsSource("files"),
                                  node_rank=0, ebs_volume_id=volume, instance_ids=ids)
        bundle = release_bundle(files)
        digest = hashlib.sha256(bundle.encode()).hexdigest()
        path = bundles / f"{digest}.json"
        path.write_text(bundle)
        path.chmod(0o644)
        return path, digest

    monkeypatch.setenv("KIMI_ROOT", str(root))
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")
    monkeypatch.delitem(sys.modules, "node_status", raising=False)
    monkeypatch.setattr(apply_release, "ROOT", root)
    monkeypatch.setattr(apply_release, "STATE", root / "var/lib/kimi-fleet")
    monkeypatch.setattr(apply_release, "LOG", root / "var/log/kimi-fleet/bootstrap.log")
    # The bootstrap's work (weights, images, units) is not what this test is about.
    monkeypatch.setattr(apply_release, "prepare", lambda *args: None)
    monkeypatch.setattr(apply_release, "rerun_bootstrap", lambda boot: None)

    ids = None if peer_replaced == "new address" else OLD_IDS
    path_n, digest_n = publish(("10.0.0.5", "10.0.0.6"), "vol-0123456789abcdef0", ids)
    assert apply_release.main(["--bundle-file", str(path_n), "--expect", digest_n]) == 0
    release_n = (root / node_files.RELEASE_FILE.lstrip("/")).read_text().strip()
    if peer_replaced == "new address":
        path_n1, digest_n1 = publish(("10.0.0.5", "10.0.0.7"), "vol-0123456789abcdef0")
    elif peer_replaced:  # AWS gave the new worker its predecessor's private address
        path_n1, digest_n1 = publish(("10.0.0.5", "10.0.0.6"), "vol-0123456789abcdef0", SAME_ADDRESS_NEW_WORKER)
    else:  # the same worker (same address and instance), a change of the leader's own volume
        path_n1, digest_n1 = publish(("10.0.0.5", "10.0.0.6"), "vol-0fedcba9876543210", OLD_IDS)
    warm = apply_release.admission_budget(root)
    facts = json.loads((root / apply_release.STACK_JSON).read_text())
    terms = health.peer_cold_start_terms(sizing, whole_checkpoint_budget_seconds(r))
    peer_cold = sum(terms.values())
    cold = warm - -(-sizing.warm_start_seconds // 60) * 60 + peer_cold
    assert facts["expected_seconds"] == {"cold_start": sizing.cold_start_seconds, "warm_start": sizing.warm_start_seconds,
                                         "peer_cold_start": peer_cold, "peer_cold_start_terms": terms}
    # The worst-case new worker: it boots, pulls its image, fetches, verifies and reads the whole
    # checkpoint (its stage share is an estimate), builds its image and loads, each at its modelled
    # time; then the leader's own admission run (its deadline) admits the release.
    deadline = facts["admission"]["deadline_seconds"]
    worst = sum(seconds for name, seconds in terms.items() if name != "margin") + deadline
    assert warm < worst < cold
    # Without a new peer, a late admission (after the warm budget, inside the restore's) fails the apply.
    clock = _Clock(root, admit_at=worst if peer_replaced else warm * 1.5)
    monkeypatch.setattr(apply_release, "time", clock)
    code = apply_release.main(["--bundle-file", str(path_n1), "--expect", digest_n1, "--admission-poll", "10"])
    log = (root / "var/log/kimi-fleet/bootstrap.log").read_text()
    live = (root / node_files.RELEASE_FILE.lstrip("/")).read_text().strip()
    applied = (root / "var/lib/kimi-fleet/applied-release").read_text().strip()
    ready = (root / node_files.READY_FILE.lstrip("/")).read_text().strip()
    if peer_replaced:
        assert code == 0, log[-2000:]
        assert f"waiting up to {cold:.0f} s" in log
        peers = json.loads((root / apply_release.STACK_JSON).read_text())["replica"]["peers"]
        if peer_replaced == "new address":
            assert "the cold start of new peer rank 1 (10.0.0.7)" in log
            assert applied == digest_n1 and live == ready != release_n
            assert peers == [{"rank": 1, "address": "10.0.0.7"}]
        else:
            assert (f"the cold start of new peer rank 1 (10.0.0.6, instance {SAME_ADDRESS_NEW_WORKER[1]}, was "
                    f"{OLD_IDS[1]})") in log
            # The instance id is a deploy-time id (like the volume's): the release id stays, the bundle not.
            assert applied == digest_n1 and live == ready == release_n
            assert peers == [{"rank": 1, "address": "10.0.0.6", "instance_id": SAME_ADDRESS_NEW_WORKER[1]}]
        # The association that runs the apply waits at least as long as the apply may.
        assert replica_apply_timeout_seconds(r, sizing) >= cold
    else:
        assert code == 1
        assert f"not admitted within {warm:.0f} s (the expected warm start" in log
        assert applied == digest_n and live == release_n == ready  # N back, and admitted again


def test_a_rank_s_peer_instance_ids_are_strictly_shaped():
    r = resolved(STACK)
    launch = replica_launches(r, ("10.0.0.5", "10.0.0.6"))[0]
    files = render_node_files(r, launch, size(r), secrets=SecretsSource("files"), ebs_volume_id="vol-0123456789abcdef0",
                              instance_ids=OLD_IDS)
    facts = json.loads(files[f"{node_files.ENV_DIR}/stack.json"].content)
    assert facts["replica"]["peers"] == [{"rank": 1, "address": "10.0.0.6", "instance_id": OLD_IDS[1]}]
    for ids in (("i-0123456789abcdef0",), (OLD_IDS[0], "i-$(reboot)"), (OLD_IDS[0], "i-0123456789ABCDEF1"),
                (OLD_IDS[0], "")):
        with pytest.raises(ValueError, match="instance ids"):
            render_node_files(r, launch, size(r), secrets=SecretsSource("files"),
                              ebs_volume_id="vol-0123456789abcdef0", instance_ids=ids)


def test_the_bootstrap_frees_the_port_for_the_socket_then_applies_the_socket_then_the_service():
    """A node upgraded from a release whose publisher bound the port itself: that publisher stops
    while the socket unit is not yet active (else the socket could not bind), then the socket, then
    the service on it. (Read from the rendered bootstrap: its live branch runs only on a real node.)"""
    bootstrap = node_files.BOOTSTRAP
    guard = bootstrap.index(f"! systemctl is-active --quiet {node_files.REPLICA_EPOCH_SOCKET}; then")
    stop = bootstrap.index(f"systemctl stop {node_files.REPLICA_EPOCH_UNIT} ", guard)
    socket_unit = bootstrap.index(f"apply_unit {node_files.REPLICA_EPOCH_SOCKET} ", stop)
    service = bootstrap.index(f"apply_unit {node_files.REPLICA_EPOCH_UNIT} ", socket_unit)
    assert guard < stop < socket_unit < service


def test_a_ranks_association_outlasts_its_apply_whatever_the_peers_cold_start():
    """The association's wait is the bootstrap's time (two download attempts and setup) or, when
    longer, the apply's budget with a replaced peer (that peer's whole cold start, the admission
    deadline, the watchdog's ticks, the margin). With the EFA image build an hour (its 300 s is an
    estimate, never measured) the apply's budget is the longer one, and the wait follows it."""
    r = resolved(STACK)
    sizing = size(r)
    slow_build = dataclasses.replace(sizing, image_build_seconds=3600)
    for s in (sizing, slow_build):
        peer = node_files.expected_seconds(r, s)["peer_cold_start"]
        assert replica_apply_timeout_seconds(r, s) >= max(bootstrap_timeout_seconds(s),
                                                          peer + node_files.ADMISSION_DEADLINE_SECONDS)
    assert replica_apply_timeout_seconds(r, slow_build) > bootstrap_timeout_seconds(slow_build)
