"""A real S3/SSM API on loopback (moto's server) for the AWS CLI the nodes use."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.fakes.harness import free_port

#: Where the venv's `aws` lives (requirements-dev.txt): first on PATH for the scripts under test.
BIN = Path(sys.executable).parent


@contextmanager
def moto_server(region: str) -> Iterator[dict]:
    """The environment a script needs to talk to a fresh moto server with the AWS CLI."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": region, "PATH": f"{BIN}:{os.environ['PATH']}"}
    try:
        for _ in range(100):
            try:
                httpx.get(env["AWS_ENDPOINT_URL"], timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=10)
