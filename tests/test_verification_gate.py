"""The post-deploy gate's command, run for real against a fake endpoint behind a real caddy.

`pulumi up` fails exactly when this command exits non-zero, so a broken endpoint must exit 1
and a working one 0, with the key read from the environment only.
"""

import os
import subprocess

import pytest

from components.verification_gate import VerificationGateArgs, verify_command
from kimi_fleet.stackfile import PROJECT_ROOT
from tests.fakes.harness import start_proxied_engine


def gate_args(engine: str) -> VerificationGateArgs:
    return VerificationGateArgs(
        stack="gate-test", base_url="unused", api_key="unused", model="kimi-k2.6", engine=engine,
        ready_timeout_seconds=30, request_timeout_seconds=30,
    )


def run_gate(endpoint, engine: str, api_key: str) -> subprocess.CompletedProcess:
    command = verify_command(gate_args(engine), endpoint.base_url)
    env = {**os.environ, "KIMI_API_KEY": api_key, "SSL_CERT_FILE": str(endpoint.caddy.root_ca)}
    return subprocess.run(["bash", "-c", command], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_gate_passes_a_working_endpoint(engine):
    with start_proxied_engine("good", engine) as endpoint:
        result = run_gate(endpoint, engine, endpoint.api_key)
    assert result.returncode == 0, result.stdout + result.stderr
    assert endpoint.api_key not in result.stdout + result.stderr
    assert (PROJECT_ROOT / "build" / "gate-test" / "verification.json").is_file()


def test_gate_fails_a_broken_endpoint():
    with start_proxied_engine("schema-invalid-tool", "vllm") as endpoint:
        result = run_gate(endpoint, "vllm", endpoint.api_key)
    assert result.returncode == 1
    assert "tool_call" in result.stdout


def test_gate_fails_with_the_wrong_key():
    with start_proxied_engine("good", "vllm") as endpoint:
        command = verify_command(gate_args("vllm"), endpoint.base_url).replace("--wait-ready 30", "--wait-ready 1")
        env = {**os.environ, "KIMI_API_KEY": "not-the-key-0000", "SSL_CERT_FILE": str(endpoint.caddy.root_ca)}
        result = subprocess.run(["bash", "-c", command], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 1 and "not ready" in result.stderr


def test_gate_command_carries_the_stacks_context_and_concurrency():
    args = gate_args("vllm")
    args.context_tokens, args.concurrency = 8192, 1
    command = verify_command(args, "https://kimi.example.com/v1")
    assert "--context 8192" in command and "--concurrency 1" in command


def test_gate_fails_an_engine_serving_less_context_than_promised():
    with start_proxied_engine("good", "vllm", options=("--max-model-len", "32768")) as endpoint:
        args = gate_args("vllm")
        args.context_tokens = 262_144
        env = {**os.environ, "KIMI_API_KEY": endpoint.api_key, "SSL_CERT_FILE": str(endpoint.caddy.root_ca)}
        result = subprocess.run(["bash", "-c", verify_command(args, endpoint.base_url)], cwd=PROJECT_ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "context" in result.stdout and "max_model_len 32,768" in result.stdout
