"""The verification suite against the fake engine behind a real Caddy (tls internal, loopback).

A good engine passes every check; each misbehaving fake-engine mode fails exactly the check
that exists to catch it.
"""

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from kimi_fleet.verification import run_suite
from tests.fakes.harness import start_fake_engine, start_proxied_engine

pytestmark = [
    pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy binary not installed"),
    pytest.mark.timeout(180),
]
REPO = Path(__file__).resolve().parents[1]
ALL_CHECKS = ["auth", "models", "health", "thinking", "instant", "tool_call", "tool_swarm", "agent_loop", "long_calls",
              "vision", "streaming", "context", "tls"]
#: every check that reads tool-call arguments: a parser or argument fault fails them all
TOOL_CHECKS = ["tool_call", "tool_swarm", "long_calls"]


@pytest.fixture(scope="module")
def good_endpoint():
    with start_proxied_engine("good") as endpoint:
        yield endpoint


def suite(endpoint, **kwargs):
    kwargs.setdefault("context", 262_144)
    return run_suite(
        endpoint.base_url, endpoint.api_key, endpoint.model, verify=str(endpoint.caddy.root_ca), **kwargs
    )


def test_good_engine_passes_every_check(good_endpoint):
    report = suite(good_endpoint, timeout=30)
    assert [c.name for c in report.checks] == ALL_CHECKS
    assert report.passed, report.to_dict()
    assert all(c.status == "pass" for c in report.checks), report.to_dict()
    # Two concurrent phases (quick preflight, then the sampled checks): about the two slowest checks.
    preflight = max(c.seconds for c in report.checks if c.name in ("auth", "models", "health", "tls"))
    sampled = max(c.seconds for c in report.checks if c.name not in ("auth", "models", "health", "tls"))
    assert report.wall_seconds < preflight + sampled + 5
    # Behaviour is judged as a rate, and the report says how sure the verdict is.
    tool = report.check("tool_call").details["tool_schema"]
    assert tool["samples"] >= 28 and tool["failures"] == 0
    assert tool["p_false_fail"] <= 0.01 / 6 and tool["p_false_pass"] <= 0.05
    assert "P(fail | good at 13.0%)" in report.check("tool_call").reason


def test_good_sglang_engine_passes_with_health_generate():
    with start_proxied_engine("good", engine="sglang") as endpoint:
        report = suite(endpoint, engine="sglang", timeout=30)
    assert report.passed, report.to_dict()
    assert "/health_generate 200" in report.check("health").reason


@pytest.mark.parametrize(
    "mode, check, reason",
    [
        ("bad-tool-json", TOOL_CHECKS, "arguments are not JSON"),
        ("schema-invalid-tool", TOOL_CHECKS, "'city' is a required property"),
        ("vision-in-reasoning", "vision", "answer landed only in reasoning"),
        ("buffered-stream", "streaming", "arrived in one burst"),
        ("missing-model", "models", "not listed; saw ['some-other-model']"),
        ("reasoning-in-instant", "instant", "instant mode returned"),
    ],
)
def test_each_misbehaviour_fails_exactly_its_check(mode, check, reason):
    with start_proxied_engine(mode) as endpoint:
        report = suite(endpoint, timeout=30)
    checks = check if isinstance(check, list) else [check]
    assert report.failed_checks() == checks, report.to_dict()
    assert reason in report.check(checks[0]).reason


@pytest.mark.parametrize(
    "mode, check, reason",
    [
        ("leaky-thinking", "thinking", "reasoning leaked into content as <think> tags"),
        ("no-reasoning-field", "thinking", "no reasoning_content/reasoning field in thinking mode"),
        ("raw-tool-markers", "tool_call", "raw tool-call marker <|tool_calls_section_begin|> in content"),
        ("no-forced-call", "tool_call", "no tool_calls for a forced tool_choice"),
        ("wrong-model-in-response", "health", "the response names model 'kimi-k2', asked for 'kimi-k2.6'"),
        ("server-error", None, "HTTP 500"),
    ],
)
def test_plumbing_faults_fail_on_one_occurrence_naming_the_cause(mode, check, reason):
    """Configuration faults are not model behaviour: the first occurrence fails, with its cause."""
    with start_proxied_engine(mode, chunk_delay=0.01) as endpoint:
        report = suite(endpoint, timeout=30)
    assert not report.passed
    failing = [report.check(name) for name in report.failed_checks()]
    if check is not None:
        assert reason in report.check(check).reason, report.to_dict()
    else:  # the one 500 lands on whichever request is third: that check names it
        assert len(failing) == 1 and reason in failing[0].reason, report.to_dict()


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_dead_scheduler_behind_healthy_http_server_fails_health_fast(engine):
    """A hung engine fails the whole gate within the short health timeout, not the request timeout."""
    with start_proxied_engine("dead-scheduler", engine=engine) as endpoint:
        started = time.monotonic()
        report = suite(endpoint, engine=engine, timeout=600, health_timeout=3)
        elapsed = time.monotonic() - started
    assert report.failed_checks() == ["health"], report.to_dict()
    assert "timed out after 3s" in report.check("health").reason
    assert elapsed < 120, elapsed  # far below the 600 s request timeout, whatever the machine's load
    skipped = [c for c in report.checks if c.status == "skip"]
    assert {c.name for c in skipped} >= {"thinking", "tool_call", "vision", "streaming", "context"}
    assert all(c.reason == "not run: the health check failed" for c in skipped)


def test_engine_reached_without_the_proxy_fails_auth():
    with start_fake_engine("no-auth") as engine:
        report = run_suite(engine.base_url, "any-key", engine.model, timeout=30)
    assert report.failed_checks() == ["auth"], report.to_dict()
    assert report.check("auth").reason == "request without a key got 200 (expected 401)"
    assert report.check("tls").status == "skip"


def test_unreachable_endpoint_fails_every_check_without_crashing():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        report = run_suite(f"https://127.0.0.1:{port}/v1", "test-key-0123456789", "kimi-k2.6", timeout=5)
    # The preflight fails (health among them); the long checks are not sent to a dead endpoint.
    assert report.failed_checks() == ["auth", "models", "health", "tls"], report.to_dict()
    assert "ConnectError" in report.check("models").reason


def test_tls_check_fails_when_the_ca_is_not_trusted(good_endpoint):
    report = run_suite(good_endpoint.base_url, good_endpoint.api_key, good_endpoint.model, only=["tls"], timeout=10)
    assert report.failed_checks() == ["tls"]
    assert "certificate not valid for localhost" in report.check("tls").reason


def test_proxy_requires_the_key(good_endpoint):
    url = f"{good_endpoint.base_url}/models"
    with httpx.Client(verify=good_endpoint.caddy.ssl_context(), timeout=10) as client:
        missing = client.get(url)
        wrong = client.get(url, headers={"Authorization": "Bearer not-the-key"})
        right = client.get(url, headers={"Authorization": f"Bearer {good_endpoint.api_key}"})
        health = client.get(url.replace("/v1/models", "/health"))
    assert missing.status_code == 401 and wrong.status_code == 401 and health.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert right.status_code == 200
    assert right.json()["data"][0]["id"] == good_endpoint.model


def test_proxy_refuses_everything_when_the_key_is_empty():
    with start_proxied_engine("good", api_key="") as endpoint:
        with httpx.Client(verify=endpoint.caddy.ssl_context(), timeout=10) as client:
            for header in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer x"}):
                assert client.get(f"{endpoint.base_url}/models", headers=header).status_code == 401


def test_proxy_streams_chunks_as_they_are_generated(good_endpoint):
    body = {"model": good_endpoint.model, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    arrivals = []
    with httpx.Client(verify=good_endpoint.caddy.ssl_context(), timeout=30) as client:
        started = time.perf_counter()
        with client.stream(
            "POST", f"{good_endpoint.base_url}/chat/completions", json=body,
            headers={"Authorization": f"Bearer {good_endpoint.api_key}"},
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.perf_counter() - started)
    assert len(arrivals) > 10
    # The fake engine sleeps 20 ms between chunks: a buffering proxy would deliver them together.
    assert arrivals[-1] - arrivals[0] > 0.5 * arrivals[-1], arrivals


def test_official_openai_client_against_stack_outputs(good_endpoint):
    outputs = {"base_url": good_endpoint.base_url, "api_key": good_endpoint.api_key, "model": good_endpoint.model}
    http_client = httpx.Client(verify=good_endpoint.caddy.ssl_context())
    client = openai.OpenAI(base_url=outputs["base_url"], api_key=outputs["api_key"], http_client=http_client)
    try:
        assert outputs["model"] in [m.id for m in client.models.list()]

        stream = client.chat.completions.create(
            model=outputs["model"], messages=[{"role": "user", "content": "Hello"}], stream=True,
            temperature=1.0, top_p=0.95,
        )
        pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
        assert len(pieces) > 1 and "".join(pieces).strip()

        tool = {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                    "required": ["city", "unit"],
                },
            },
        }
        response = client.chat.completions.create(
            model=outputs["model"], messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=[tool], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        call = response.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Oslo", "unit": "celsius"}

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=outputs["base_url"], api_key="wrong", http_client=http_client).models.list()
    finally:
        http_client.close()


@pytest.mark.timeout(300)
def test_load_of_256_concurrent_streams_through_caddy(good_endpoint):
    # 256 streams of ~20 chunks each: a few seconds on 2 cores; the timeout is generous.
    report = suite(good_endpoint, only=["load"], load=256, timeout=120)
    load = report.check("load")
    assert load.status == "pass", load
    assert load.details["requests"] == 256
    assert load.details["ttft_p50_s"] <= load.details["ttft_p90_s"] <= load.details["ttft_p99_s"]
    assert load.details["aggregate_output_tokens_per_s"] > 0


def run_cli(*arguments):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "verify.py"), *arguments],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )


def test_cli_passes_writes_report_and_hides_the_key(good_endpoint, tmp_path):
    report_path = tmp_path / "report.json"
    result = run_cli(
        "--base-url", good_endpoint.base_url, "--api-key", good_endpoint.api_key, "--model", good_endpoint.model,
        "--ca-cert", str(good_endpoint.caddy.root_ca), "--timeout", "30", "--json", str(report_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert good_endpoint.api_key not in result.stdout + result.stderr + report_path.read_text()
    report = json.loads(report_path.read_text())
    assert report["passed"] is True and report["model"] == good_endpoint.model
    assert {c["name"] for c in report["checks"]} == set(ALL_CHECKS)
    assert set(report) == {"base_url", "model", "engine", "passed", "checks", "wall_seconds"}


def test_cli_exits_1_when_a_check_fails():
    with start_fake_engine("good") as engine:
        result = run_cli("--base-url", engine.base_url, "--api-key", "test-key-0123456789", "--model", engine.model, "--only", "auth")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "request without a key got 200" in result.stdout


@pytest.mark.parametrize(
    "arguments",
    [
        ["--base-url", "http://127.0.0.1:9/", "--api-key", "k", "--model", "m"],
        ["--base-url", "http://127.0.0.1:9/v1", "--api-key", "k", "--model", "m", "--only", "nonsense"],
        ["--base-url", "http://127.0.0.1:9/v1", "--api-key", "k", "--model", "m", "--only", "load"],
        ["--base-url", "http://127.0.0.1:9/v1", "--api-key", "k"],
    ],
    ids=["no-v1", "unknown-check", "load-without-n", "missing-model"],
)
def test_cli_exits_2_on_bad_usage(arguments):
    assert run_cli(*arguments).returncode == 2


# --- sizing to the served context, proving the advertised one ------------------------------------


def test_a_stack_with_an_8k_context_passes_its_own_gate():
    """An endpoint that serves 8,192 tokens: no check may ask for more than it holds."""
    context = 8192
    with start_proxied_engine("good", chunk_delay=0.01, options=("--max-model-len", str(context))) as endpoint:
        report = suite(endpoint, timeout=30, context=context)
    assert report.passed, [(c.name, c.reason) for c in report.checks if c.status == "fail"]
    assert report.check("thinking").details["max_tokens"] <= context - 1024
    assert "of the promised 8,192" in report.check("context").reason


@pytest.mark.parametrize("reports_max_model_len", [True, False], ids=["reported", "hidden"])
def test_engine_serving_less_context_than_the_stack_claims_fails(reports_max_model_len):
    options = ("--max-model-len", "32768") + (() if reports_max_model_len else ("--hide-max-model-len",))
    with start_proxied_engine("good", chunk_delay=0.001, options=options) as endpoint:
        report = suite(endpoint, timeout=30, context=262_144, only=["context"])
    assert report.failed_checks() == ["context"], report.to_dict()
    reason = report.check("context").reason
    if reports_max_model_len:
        assert "reports max_model_len 32,768" in reason and "promises 262,144" in reason
    else:  # nothing reported: the long prompt itself is refused by the engine
        assert "was refused" in reason and "maximum context length is 32768" in reason


def test_one_burst_is_looked_at_again_and_only_bursts_in_a_row_fail():
    # A client stalled by its own load sees one burst now and then; a buffering proxy every time.
    with start_proxied_engine("buffered-once") as endpoint:
        once = suite(endpoint, timeout=30, only=["streaming"])
    assert once.passed, once.to_dict()
    assert once.check("streaming").details["bursts_before"] == 1
    with start_proxied_engine("buffered-stream") as endpoint:
        always = suite(endpoint, timeout=30, only=["streaming"])
    assert always.failed_checks() == ["streaming"]
    assert "2 streams in a row" in always.check("streaming").reason


def test_streaming_with_a_slow_first_token_is_not_mistaken_for_buffering():
    with start_proxied_engine("good", options=("--first-token-delay", "2.5")) as endpoint:
        report = suite(endpoint, timeout=30, only=["streaming"])
    assert report.passed, report.to_dict()
    assert report.check("streaming").details["first_chunk_s"] >= 2.5


def test_tool_name_repeated_on_every_delta_is_accepted():
    with start_proxied_engine("repeat-tool-name", chunk_delay=0.001) as endpoint:
        report = suite(endpoint, timeout=30, only=["tool_call"])
    assert report.passed, report.to_dict()


def test_cli_k2vv_mode_prints_schema_accuracy_beside_published_figures():
    with start_fake_engine("good", chunk_delay=0.001, options=("--tool-invalid-rate", "0.25", "--seed", "3")) as engine:
        result = run_cli("--base-url", engine.base_url, "--api-key", "test-key-0123456789",
                         "--model", engine.model, "--k2vv", "40")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "requests 40, triggered (finish_reason tool_calls) 40 (100.0%)" in result.stdout
    accuracy = float(result.stdout.split("schema accuracy ")[1].split("%")[0])
    assert 55 <= accuracy <= 95, result.stdout  # 25% invalid on average
    assert "stock vLLM" in result.stdout and "87.0%" in result.stdout


# --- releases: the gate verifies the release it is meant to verify (issue 9) -----------------

RELEASE, OLD_RELEASE = "0123456789abcdef", "fedcba9876543210"


def test_every_answer_through_the_proxy_carries_the_release_and_the_suite_checks_it():
    with start_proxied_engine("good", release=RELEASE) as endpoint:
        report = suite(endpoint, timeout=30, release=RELEASE, only=["auth", "models", "instant"])
        release = report.check("release")
        assert release.status == "pass", release.reason
        assert f"from release {RELEASE}" in release.reason
        # A 401 from the proxy is not stamped: the release is no business of a client without the key.
        refused = httpx.get(f"{endpoint.base_url}/models", verify=str(endpoint.caddy.root_ca))
        assert refused.status_code == 401 and "x-kimi-fleet-release" not in refused.headers
        # The gate waiting for another release gives up, naming the one still served.
        result = run_cli("--base-url", endpoint.base_url, "--api-key", endpoint.api_key, "--model", endpoint.model,
                         "--ca-cert", str(endpoint.caddy.root_ca), "--release", OLD_RELEASE, "--wait-ready", "2",
                         "--only", "models")
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"still answers from release {RELEASE}, not {OLD_RELEASE}" in result.stderr


def test_an_answer_from_an_unrefreshed_replica_fails_the_run():
    """Behind a load balancer, one replica in four still on the old release."""
    options = ("--release", RELEASE, "--stale-release", OLD_RELEASE, "--stale-every", "4")
    with start_fake_engine("good", options=options) as engine:
        report = run_suite(engine.base_url, "unused-key-0123456789", engine.model, release=RELEASE,
                           only=["models", "instant", "thinking"], timeout=30)
    release = report.check("release")
    assert release.status == "fail" and not report.passed
    assert f"from {OLD_RELEASE}" in release.reason and "a replica still serves another release" in release.reason
    # Waiting for the release needs 4 x replicas fresh answers in a row from it: a stale one resets the count.
    with start_fake_engine("good", options=options) as engine:
        result = run_cli("--base-url", engine.base_url, "--api-key", "unused-key-0123456789", "--model", engine.model,
                         "--release", RELEASE, "--replicas", "2", "--wait-ready", "3", "--only", "models")
    assert result.returncode == 1 and "has not reached every replica" in result.stderr


def test_release_flag_is_checked():
    result = run_cli("--base-url", "https://x.example/v1", "--api-key", "k" * 20, "--model", "m",
                     "--release", "not-a-release")
    assert result.returncode == 2 and "16-hex release id" in result.stderr
