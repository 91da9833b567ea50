#!/usr/bin/env python3
"""A multi-node replica restarts as one unit: each rank publishes its engine's current start on the
replica's private network, and each rank's watchdog restarts its own engine once the peer start it
formed its collectives with has ended (a new start, or no process).

Why (vLLM 0.22.1, the pinned release): a headless worker (--headless, node rank > 0) runs its local
workers under MultiprocExecutor with the monitor inline (entrypoints/cli/serve.py:206-220): it exits
only when one of its own worker processes dies (v1/executor/multiproc_executor.py:267-298). Each
worker waits for the leader's next step on a ZeroMQ subscription with no timeout
(multiproc_executor.py:944-949, dequeue(indefinite=True); distributed/device_communicators/
shm_broadcast.py:786-797, poll(timeout=None)): when the leader dies, the worker neither fails nor
rejoins a new leader (it met the leader once, at init, through the torch.distributed store at
master_addr:master_port, distributed/parallel_state.py:1407-1410; the loop above never goes back). The leader's executor watches only
its own local workers (multiproc_executor.py:267-298), so a worker that died leaves the leader
waiting on a step it never gets (VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS, 300 s by default, envs.py:1609,
then only while a request runs). Neither rank recovers by itself: the replica restarts as a unit.

    replica_epoch.py serve --address A --port P --unit U

serves one line on http://A:P/: "<InvocationID> <ActiveState>" of unit U (the InvocationID is 32
hex digits, "-" before the unit's first start), on the listening socket systemd passes
(kimi-replica-epoch.socket, which holds A:P through this service's restarts; bound here only when
started without one). Nothing else: no path but "/", no method but GET,
nothing read from the request. `read_peer` reads a peer's line and accepts exactly that shape;
anything else is refused (never executed, never sourced, never logged beyond a bounded repr).
The watchdog does the rest (see watchdog.py's replica_epoch): this file runs nothing but
`systemctl show`.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

#: systemd's ActiveState words (systemd's unit-def.c unit_active_state_table).
ACTIVE_STATES = ("active", "reloading", "inactive", "failed", "activating", "deactivating", "maintenance",
                 "refreshing")
#: The one shape a rank publishes and accepts: an InvocationID (or "-": never started) and an ActiveState.
LINE = re.compile(r"(?P<start>[0-9a-f]{32}|-) (?P<active>" + "|".join(ACTIVE_STATES) + r")")
#: No valid line is longer; a longer answer is refused unread.
MAX_BYTES = 64
#: A peer's whole answer (connect, request, every read) waits no longer (the watchdog runs every few
#: seconds, and its run waits for every peer in turn).
READ_TIMEOUT_SECONDS = 3.0
#: The publisher's whole HTTP answer (status line, its few headers, one start line) is well under
#: this; a longer answer is refused unread.
MAX_RESPONSE_BYTES = 512
#: An HTTP/1.x status line.
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (?P<code>[0-9]{3})[ \r]")
#: A request reads the unit's state at most this often (a peer polling fast costs one systemctl a second).
CACHE_SECONDS = 1.0
#: The first file descriptor systemd passes (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3


class PeerUnreadable(RuntimeError):
    """The peer did not answer, or answered something that is not a start line: nothing to act on."""


def unit_line(unit: str) -> str:
    """The published line for `unit`, from systemd (a start line whatever systemctl says)."""
    shown = subprocess.run(["systemctl", "show", "-p", "InvocationID", "-p", "ActiveState", unit],
                           capture_output=True, text=True, check=False, timeout=10)
    values = dict(line.partition("=")[::2] for line in shown.stdout.splitlines() if "=" in line)
    start, active = values.get("InvocationID", "").strip() or "-", values.get("ActiveState", "").strip()
    line = f"{start} {active}"
    return line if LINE.fullmatch(line) else "- inactive"


def parse(body: bytes) -> tuple[str, str]:
    """(start, ActiveState) from a peer's answer; PeerUnreadable for anything but one start line."""
    if len(body) > MAX_BYTES:
        raise PeerUnreadable(f"an answer of more than {MAX_BYTES} bytes")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise PeerUnreadable(f"not ASCII: {body[:40]!r}") from None
    found = LINE.fullmatch(text.removesuffix("\n"))
    if found is None:
        raise PeerUnreadable(f"not a start line: {text[:40]!r}")
    return found["start"], found["active"]


def read_peer(address: str, port: int, timeout: float = READ_TIMEOUT_SECONDS) -> tuple[str, str]:
    """A peer rank's (start, ActiveState); PeerUnreadable when it does not answer one start line
    within `timeout` seconds in all (connect, request and every read: a peer that drips its answer
    a byte at a time is given up at the deadline), or answers more than MAX_RESPONSE_BYTES."""
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no whole answer within {timeout:g} s")
        return left

    answer = b""
    try:
        with socket.create_connection((address, port), timeout=remaining()) as connection:
            connection.settimeout(remaining())
            connection.sendall(f"GET / HTTP/1.0\r\nHost: {address}:{port}\r\n\r\n".encode("ascii"))
            while len(answer) <= MAX_RESPONSE_BYTES:
                connection.settimeout(remaining())
                chunk = connection.recv(MAX_RESPONSE_BYTES + 1 - len(answer))
                if not chunk:
                    break
                answer += chunk
    except OSError as error:
        raise PeerUnreadable(f"no answer ({error.__class__.__name__}: {str(error)[:80]})") from None
    if len(answer) > MAX_RESPONSE_BYTES:
        raise PeerUnreadable(f"an answer of more than {MAX_RESPONSE_BYTES} bytes")
    head, blank, body = answer.partition(b"\r\n\r\n")
    status = STATUS_LINE.match(head)
    if not blank or status is None:
        raise PeerUnreadable(f"not an HTTP answer: {answer[:40]!r}")
    if status["code"] != b"200":
        raise PeerUnreadable(f"HTTP {status['code'].decode()}")
    return parse(body)


def serve(address: str, port: int, unit: str) -> None:
    cached = {"at": float("-inf"), "line": ""}

    class Handler(BaseHTTPRequestHandler):
        server_version = "kimi-replica-epoch"
        sys_version = ""
        timeout = 5  # a connection that sends nothing is dropped

        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path != "/":
                self.send_error(404)
                return
            now = time.monotonic()
            if now - cached["at"] >= CACHE_SECONDS:
                cached.update(at=now, line=unit_line(unit))
            body = (cached["line"] + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    listener = inherited_listener()
    server = HTTPServer((address, port), Handler, bind_and_activate=listener is None)
    if listener is not None:
        # kimi-replica-epoch.socket holds the port, through every restart of this service: nothing
        # else on the node (an engine shares the host's network) can take it meanwhile.
        bound = listener.getsockname()[:2]
        if bound != (address, port):
            raise SystemExit(f"replica_epoch.py: the socket systemd passed is bound to {bound}, not "
                             f"{(address, port)}: refusing to serve on it")
        server.socket.close()
        server.socket = listener
    with server:
        server.serve_forever()


def inherited_listener() -> socket.socket | None:
    """The listening socket systemd passed (sd_listen_fds: LISTEN_PID is this process, LISTEN_FDS 1,
    at fd 3), or None when started without one (the socket unit is not in use)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    listener = socket.socket(fileno=SD_LISTEN_FDS_START)
    if listener.type != socket.SOCK_STREAM or listener.family != socket.AF_INET:
        raise SystemExit("replica_epoch.py: systemd passed a socket that is not a TCP/IPv4 one")
    return listener


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="replica_epoch.py")
    commands = parser.add_subparsers(dest="command", required=True)
    served = commands.add_parser("serve", help="publish this rank's engine start on its own address")
    served.add_argument("--address", required=True)
    served.add_argument("--port", type=int, required=True)
    served.add_argument("--unit", required=True)
    read = commands.add_parser("read", help="print a peer's start line (or why it has none)")
    read.add_argument("--address", required=True)
    read.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.address, args.port, args.unit)
        return 0
    try:
        print(" ".join(read_peer(args.address, args.port)))
    except PeerUnreadable as error:
        print(f"unreadable: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
