"""A real S3/SSM API on loopback (moto's server) for the AWS CLI the nodes use."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.fakes.aws_cli_forkserver import shim_dir
from tests.fakes.harness import free_port

#: Where the venv's `aws` lives (requirements-dev.txt): first on PATH for the scripts under test.
BIN = Path(sys.executable).parent


def aws_cli() -> str:
    """The `aws` the scripts under test call: the venv's AWS CLI, through this process's fork server
    (tests/fakes/aws_cli_forkserver.py: the same CLI without its 0.4 s start-up)."""
    shims = shim_dir()
    return str((shims or BIN) / "aws")


#: One moto server per test process, reset between uses: a server's start (~2 s of CPU) was most of
#: the set-up of every test that talks to S3/SSM. `None` until first used.
_SHARED: dict = {}
_IN_USE = [0]


def _start_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    return server, url


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=10)


@contextmanager
def moto_server(region: str) -> Iterator[dict]:
    """The environment a script needs to talk to a fresh moto server with the AWS CLI: the process's
    shared server with every service's state reset (moto's /moto-api/reset), or, when a test already
    holds it, a server of its own."""
    own = None
    if _IN_USE[0]:
        own, url = _start_server()
    else:
        if "server" not in _SHARED or _SHARED["server"].poll() is not None:
            _SHARED["server"], _SHARED["url"] = _start_server()
            atexit.register(_stop, _SHARED["server"])
        url = _SHARED["url"]
        httpx.post(f"{url}/moto-api/reset", timeout=30).raise_for_status()
        _IN_USE[0] += 1
    env = {**os.environ, "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": region, "PATH": f"{Path(aws_cli()).parent}:{BIN}:{os.environ['PATH']}"}
    try:
        yield env
    finally:
        if own is not None:
            _stop(own)
        else:
            _IN_USE[0] -= 1
