"""The tests' `aws` (the real AWS CLI run in forks of a pre-imported server, tests/fakes/aws_cli_forkserver.py)
answers as the venv's own `aws` does: same output, same exit status, same streams, the caller's
environment and directory; where a fork could differ from the process the caller would start, the
client runs the real CLI itself."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.fakes.aws_api import BIN, aws_cli, moto_server
from tests.fakes.aws_cli_forkserver import _STATE, shim_dir
from tests.fakes.harness import wait_for

pytestmark = pytest.mark.skipif(not (BIN / "aws").exists(), reason="awscli not installed (requirements-dev.txt)")
REAL = str(BIN / "aws")


def _both(command: str, env: dict | None = None, stdin: bytes | None = None) -> list[tuple[int, bytes, bytes]]:
    """`command` (a shell line, `AWS` standing for the CLI) through the shim and through the real CLI."""
    results = []
    for aws in (aws_cli(), REAL):
        done = subprocess.run(["bash", "-c", command.replace("AWS", aws)], input=stdin, capture_output=True,
                              env=env or os.environ, timeout=60)
        results.append((done.returncode, done.stdout, done.stderr))
    return results


@pytest.mark.parametrize("command", [
    "AWS --version",
    "AWS s3 ls --no-such-option",  # the parser's refusal: 255 and its message on stderr
    "AWS sts assume-role --generate-cli-skeleton",  # (run-instances' skeleton picks enum values in set order)
    "AWS ec2 run-instances --generate-cli-skeleton >&-",  # stdout closed: the CLI's own failure
    "cd /tmp && AWS configure get region",  # no config: exit 1, nothing printed
])
def test_the_shim_answers_as_the_real_cli(command):
    assert shim_dir() is not None and aws_cli() != REAL
    shim, real = _both(command)
    assert shim == real, (shim, real)


def test_the_callers_environment_stdin_and_stdout_reach_the_cli():
    with moto_server("us-east-1") as env:
        assert env["PATH"].startswith(f"{shim_dir()}:")
        subprocess.run(["aws", "s3", "mb", "s3://forkserver-test"], env=env, check=True, capture_output=True)
        body = os.urandom(4096)
        shim, real = _both("AWS s3 cp - s3://forkserver-test/object && AWS s3 cp s3://forkserver-test/object -",
                           env=env, stdin=body)
        assert shim[0] == real[0] == 0 and shim[1] == real[1] == body


def test_a_killed_caller_ends_its_call():
    """A script's `timeout` kills the client: the fork it started goes too (no CLI left running)."""
    done = subprocess.run(["timeout", "0.5", aws_cli(), "s3", "cp", "-", "s3://bucket/key"], stdin=subprocess.PIPE,
                          capture_output=True, timeout=30,
                          env={**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert done.returncode == 124
    server = _STATE["server"].pid
    assert wait_for(lambda: _children(server) == [], 5), _children(server)


def _children(pid: int) -> list[str]:
    return [child for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]
