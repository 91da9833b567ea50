"""The tests' `aws` (the real AWS CLI run in forks of a pre-imported server, tests/fakes/aws_cli_forkserver.py)
answers as the venv's own `aws` does: same output, same exit status, same streams, the caller's
environment and directory; where a fork could differ from the process the caller would start, the
client runs the real CLI itself."""

from __future__ import annotations

import json
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


IMPORT_TIME_VALUES = r"""
import json, sys
import awscli.clidriver
before = set(sys.modules)
import importlib
importlib.import_module(sys.argv[1])
plain = (str, bytes, int, float, bool, tuple, frozenset, type(None))
print(json.dumps({name: {key: repr(value) for key, value in vars(module).items()
                         if isinstance(value, plain) and not key.startswith("__")}
                  for name, module in sys.modules.items() if name not in before and module is not None}))
"""


def test_what_the_plugins_import_reads_from_the_environment_each_call_computes_again(tmp_path):
    """The server imports the CLI's plugins once; a call may come with another HOME, config or data path.
    Of every module-level value the import leaves, only those HOME_DEPENDENT names differ between two
    environments, and a call recomputes them as a fresh import would."""
    from tests.fakes import aws_cli_forkserver as server

    values = []
    for side in ("one", "two"):
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / side), "AWS_CONFIG_FILE": str(tmp_path / side / "c"),
               "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / side / "k"), "AWS_DATA_PATH": str(tmp_path / side / "d"),
               "AWS_CLI_HISTORY_FILE": str(tmp_path / side / "h"), "KUBECONFIG": str(tmp_path / side / "kube"),
               "AWS_DEFAULT_REGION": {"one": "us-east-1", "two": "eu-west-1"}[side], "AWS_PROFILE": side,
               "TMPDIR": str(tmp_path), "LANG": {"one": "C.UTF-8", "two": "en_US.UTF-8"}[side]}
        done = subprocess.run([str(BIN / "python"), "-c", IMPORT_TIME_VALUES, server.PLUGINS_MODULE], env=env,
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0, done.stderr
        values.append(json.loads(done.stdout))
    one, two = values
    assert one.keys() == two.keys() and len(one) > 100  # the customizations, s3transfer, rsa, yaml...
    differing = {(module, name) for module in one for name in one[module].keys() | two[module].keys()
                 if one[module].get(name) != two[module].get(name)}
    assert differing == {(module, name) for module, names in server.HOME_DEPENDENT.items() for name in names}
    for module, names in server.HOME_DEPENDENT.items():
        for name, parts in names.items():
            home = str(tmp_path / "two")
            assert two[module][name] == repr(os.path.join(*parts).replace("~", home, 1)), (module, name)
