"""What agent clients do, against the fake engine: tool results sent back, long arguments
streamed and not, and truncation reported honestly (issue 23)."""

import json

import httpx
import pytest

from kimi_fleet import engine_bugs
from kimi_fleet.verification import checks, run_suite
from tests.fakes.harness import start_fake_engine

pytestmark = pytest.mark.timeout(180)
AGENT_CHECKS = ["agent_loop", "long_calls"]


def suite(fake, only=AGENT_CHECKS, **options):
    return run_suite(fake.base_url, "test-key-0123456789", fake.model, only=only, timeout=30, **options)


def test_good_engine_passes_the_agent_checks():
    with start_fake_engine("good", chunk_delay=0.002) as engine:
        report = suite(engine)
    assert report.passed, report.to_dict()
    loop = report.check("agent_loop").details["agent_loop"]
    assert loop["samples"] == 16 and loop["failures"] == 0
    long_calls = report.check("long_calls")
    assert long_calls.details["argument_chars"] >= checks.LONG_ARGUMENT_CHARS
    assert long_calls.details["cut_finishes"] == ["length", "length"]


def test_an_engine_that_ignores_the_tool_result_fails_the_agent_loop():
    with start_fake_engine("ignores-tool-result", chunk_delay=0.002) as engine:
        report = suite(engine)
    assert report.failed_checks() == ["agent_loop"], report.to_dict()
    reason = report.check("agent_loop").reason
    assert "16/16 agent loops without an answer that uses the tool result" in reason
    assert "names neither OBS-" in reason


def test_a_call_dropped_at_max_tokens_with_a_stop_fails_naming_the_bug():
    with start_fake_engine("silent-truncation", chunk_delay=0.002) as engine:
        report = suite(engine)
    assert report.failed_checks() == ["long_calls"], report.to_dict()
    reason = report.check("long_calls").reason
    assert f"max_tokens {checks.TRUNCATING_MAX_TOKENS} cut the non-streamed call" in reason
    assert engine_bugs.TRUNCATED_CALL_SILENT_STOP in reason and "dynamo PR #8208" in reason
    assert report.check("long_calls").details["cut_finishes"] == ["stop", "stop"]


@pytest.mark.parametrize("engine_name", ["sglang", "vllm"])
def test_a_long_call_lost_in_the_stream_fails_as_a_streaming_fault(engine_name):
    with start_fake_engine("drops-long-streamed-call", engine=engine_name, chunk_delay=0.002) as engine:
        report = suite(engine, engine=engine_name)
    assert report.failed_checks() == ["long_calls"], report.to_dict()
    reason = report.check("long_calls").reason
    assert "1/1 long streamed call of 4225 chars: streamed calls differ from the non-streamed answer" in reason
    assert "streamed calls [] (finish_reason 'stop'), non-streamed ['save_document']" in reason
    assert ("sglang #23363/#23341" if engine_name == "sglang" else "vllm #54701") in reason


@pytest.mark.parametrize("finish, calls, symptom", [
    ("length", [{"name": "save_document", "arguments": '{"title": "no'}], None),
    ("length", [], None),
    ("stop", [], engine_bugs.TRUNCATED_CALL_SILENT_STOP),
    ("tool_calls", [{"name": "save_document", "arguments": '{"title": "no'}], engine_bugs.TRUNCATED_CALL_AS_COMPLETE),
])
def test_truncation_rule(finish, calls, symptom):
    fault = checks.truncation_fault(finish, calls)
    assert (fault[0] if fault else None) == symptom
    if symptom == engine_bugs.TRUNCATED_CALL_AS_COMPLETE:
        assert "vllm PR #47963" in engine_bugs.named_for(symptom, "vllm", "0.22.1")


def test_the_tool_result_goes_back_with_the_call_id_and_the_reasoning():
    call = {"id": "functions.get_weather:0", "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}
    turns = checks.agent_loop_turns("Oslo", call, "I should call the tool.", "", {"temperature_c": 4.2})
    assert [t["role"] for t in turns] == ["user", "assistant", "tool"]
    assert turns[1]["reasoning_content"] == "I should call the tool."  # kept in the tool loop (Kimi's template)
    assert turns[1]["tool_calls"][0]["id"] == turns[2]["tool_call_id"] == call["id"]
    assert json.loads(turns[2]["content"]) == {"temperature_c": 4.2}


def test_the_fake_engine_refuses_a_tool_result_for_no_call():
    """The fake holds clients to the contract the agent check relies on (OpenAI's API refuses it too)."""
    body = {"model": "kimi-k2.6", "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_b", "content": "{}"},
    ]}
    with start_fake_engine("good") as engine:
        refused = httpx.post(f"{engine.base_url}/chat/completions", json=body, timeout=10)
        body["messages"][2]["tool_call_id"] = "call_a"
        answered = httpx.post(f"{engine.base_url}/chat/completions", json=body, timeout=10)
    assert refused.status_code == 400 and "'call_b' matches no earlier tool call" in refused.text
    assert answered.status_code == 200 and "According to the tool" in answered.json()["choices"][0]["message"]["content"]
