"""A shim in front of the fake engine that plays an engine under load (tests of the watchdog's
"busy" versus "dead"): it serves the engine's own /metrics under the real engine's metric names
and, while its busy file exists, holds every generation past the probe's timeout while its token
counter keeps advancing (other clients' requests being served). Everything else is passed through
to the fake engine as it streams (HTTP/1.0: the shim closes each answer, nothing is buffered).

    with start_load_shim(engine.port, "sglang", busy_file, hold_seconds=3) as shim:
        ...  # point the watchdog (and the node's Caddy) at shim.port

A generation that hangs in the fake engine (its --hang-file) hangs here too, and the counter does
not move: that is a dead engine, as the watchdog must see it.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

from kimi_fleet import engines

#: Tokens per second the other clients of a busy engine get.
BUSY_TOKENS_PER_SECOND = 500
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass
class LoadShim:
    port: int
    server: ThreadingHTTPServer


class _State:
    def __init__(self, upstream_port: int, engine: str, busy_file: str, hold_seconds: float):
        self.upstream_port = upstream_port
        self.engine = engine
        self.busy_file = busy_file
        self.hold_seconds = hold_seconds
        self.generated = 0.0
        self.busy_since: float | None = None
        self.lock = threading.Lock()

    def counters(self) -> tuple[float, int, int]:
        """Tokens generated so far, requests running, requests queued."""
        with self.lock:
            busy = os.path.exists(self.busy_file)
            now = time.monotonic()
            if busy and self.busy_since is None:
                self.busy_since = now
            if self.busy_since is not None:
                self.generated += (now - self.busy_since) * BUSY_TOKENS_PER_SECOND
                self.busy_since = now if busy else None
            return self.generated, (48 if busy else 0), (120 if busy else 0)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    def do_GET(self):
        if self.path.split("?", 1)[0] == "/metrics":
            generated, running, waiting = self.server.state.counters()
            names = engines.get(self.server.state.engine).load_metrics  # the engine's own names
            labels = '{model_name="kimi-k2.6"}'
            body = (f"# TYPE {names.generated_tokens} counter\n{names.generated_tokens}{labels} {generated}\n"
                    f"{names.running}{labels} {running}\n{names.waiting}{labels} {waiting}\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self._forward(b"")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if os.path.exists(self.server.state.busy_file):
            self.server.state.counters()
            time.sleep(self.server.state.hold_seconds)  # behind everyone else's requests
        self._forward(body)

    def _forward(self, body: bytes):
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.state.upstream_port, timeout=600)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body:
            headers["Content-Length"] = str(len(body))
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.end_headers()
            while chunk := response.read1(65536):
                self.wfile.write(chunk)
                self.wfile.flush()
                if self.command == "POST":
                    with self.server.state.lock:
                        self.server.state.generated += 1  # roughly a token per chunk
        except (OSError, http.client.HTTPException):
            pass  # the client gave up (a probe's timeout) or the upstream went away
        finally:
            upstream.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: _State):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


@contextmanager
def start_load_shim(upstream_port: int, engine: str, busy_file: str, *, hold_seconds: float) -> Iterator[LoadShim]:
    server = _Server(_State(upstream_port, engine, busy_file, hold_seconds))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield LoadShim(server.server_address[1], server)
    finally:
        server.shutdown()
        server.server_close()
