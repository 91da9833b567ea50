"""The gate promotes a node's compile-cache candidate only after the suite passed, with the
deployer's credentials (issue 21, item 1): the real gate command against a fake endpoint behind a
real caddy, and moto's S3/SSM on loopback for the mirror and the pin."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile

import pytest

from components.verification_gate import VerificationGateArgs, verify_command
from kimi_fleet.stackfile import PROJECT_ROOT
from tests.fakes.aws_api import BIN, moto_server
from tests.fakes.harness import start_proxied_engine

REGION = "us-east-1"
BUCKET = "kimi-gate-cache"
CACHE = "hf/.compile-cache/vllm--img--h200"
LAUNCH = "0123456789abcdef"
NODE = "i-0aaaaaaaaaaaaaaa1"
PIN = f"/kimi-fleet/gate-test/compile-cache/{LAUNCH}"
PROMOTION = {"region": REGION, "bucket": BUCKET, "cache_prefix": CACHE, "stack": "gate-test", "launch": LAUNCH,
             "pin_parameter": PIN, "instance_ids": [NODE]}
pytestmark = [pytest.mark.skipif(not (BIN / "aws").exists(), reason="awscli not installed (requirements-dev.txt)"),
              pytest.mark.timeout(400)]


def aws(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["aws", *args, "--region", REGION], env=env, capture_output=True, text=True)


@pytest.fixture
def mirror(tmp_path):
    with moto_server(REGION) as env:
        assert aws(env, "s3api", "create-bucket", "--bucket", BUCKET).returncode == 0
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            info = tarfile.TarInfo("triton/kernel.cubin")
            info.size = 6
            archive.addfile(info, io.BytesIO(b"kernel"))
        (tmp_path / "candidate.tar").write_bytes(buffer.getvalue())
        key = f"s3://{BUCKET}/{CACHE}/candidates/gate-test/AROAEXAMPLENODEROLE01:{NODE}/{LAUNCH}.tar"
        assert aws(env, "s3", "cp", str(tmp_path / "candidate.tar"), key).returncode == 0
        yield env, hashlib.sha256(buffer.getvalue()).hexdigest()


def gate(endpoint, env, checks: list[str]) -> subprocess.CompletedProcess:
    args = VerificationGateArgs(stack="gate-test", base_url="unused", api_key="unused", model="kimi-k2.6",
                                engine="vllm", ready_timeout_seconds=30, request_timeout_seconds=30,
                                checks=checks, compile_cache_promotion=PROMOTION)
    command = verify_command(args, endpoint.base_url, None, PROMOTION)
    env = {**env, "KIMI_API_KEY": endpoint.api_key, "SSL_CERT_FILE": str(endpoint.caddy.root_ca)}
    return subprocess.run(["bash", "-c", command], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def pin(env) -> str | None:
    result = aws(env, "ssm", "get-parameter", "--name", PIN, "--query", "Parameter.Value", "--output", "text")
    return result.stdout.strip() if result.returncode == 0 else None


def test_the_gate_promotes_the_candidate_after_the_suite_passed(mirror):
    env, sha256 = mirror
    with start_proxied_engine("good", "vllm") as endpoint:
        result = gate(endpoint, env, ["models", "tool_call"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"pinned {PIN} = {sha256}" in result.stdout and pin(env) == sha256
    listed = aws(env, "s3", "ls", f"s3://{BUCKET}/{CACHE}/sha256/").stdout
    assert f"{sha256}.tar" in listed


def test_a_failed_suite_promotes_nothing(mirror):
    env, _ = mirror
    with start_proxied_engine("schema-invalid-tool", "vllm") as endpoint:
        result = gate(endpoint, env, ["models", "tool_call"])
    assert result.returncode == 1 and "tool_call" in result.stdout
    assert "promoted" not in result.stdout and pin(env) is None


def test_the_promotion_runs_only_for_a_managed_mirror_and_after_the_suite():
    plain = VerificationGateArgs(stack="s", base_url="u", api_key="k", model="m", engine="vllm",
                                 ready_timeout_seconds=1, request_timeout_seconds=1)
    assert "promote_compile_cache" not in verify_command(plain, "https://x/v1")
    command = verify_command(plain, "https://x/v1", None, {**PROMOTION, "instance_ids": None, "group": "asg-1"})
    steps = command.split(" && ")
    assert "scripts/verify.py" in steps[-2] and "scripts/promote_compile_cache.py" in steps[-1]
    assert "--group asg-1" in steps[-1] and "--instance-id" not in steps[-1]
