"""The checks a deployed Kimi-K2.6 endpoint must pass. Each returns an Outcome or raises CheckFailed."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import secrets
import ssl
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import jsonschema

from kimi_fleet import catalog, engine_bugs

from .client import CheckFailed, Endpoint, StreamedChat, chat, gather_all, reasoning_of, stream_chat
from .images import COLORS, png_data_url, solid_png
from .report import FAIL, PASS, SKIP
from .sampling import GATE_BEHAVIOURS, judgement_for, samples_needed

# Sampling recommended for K2.6 (thinking is the default mode). max_tokens are what a check wants;
# Endpoint.max_tokens() lowers them to what the served context allows.
THINKING = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 8192}
INSTANT = {"temperature": 0.6, "top_p": 0.95, "max_tokens": 1024, "chat_template_kwargs": {"thinking": False}}
#: requests that prove both tool-call paths (non-streaming and streaming) carry a forced call
FORCED_TOOL_REQUESTS_PER_PATH = 2

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
WEATHER_VALIDATOR = jsonschema.Draft202012Validator(WEATHER_TOOL["function"]["parameters"])

# A streamed answer is incremental when its content arrives in separate reads after the first
# token; a buffering proxy delivers everything at once. Chunks closer than the gap count as one
# arrival (one TCP read). A slow first token (a long prefill) says nothing about buffering.
MIN_ARRIVAL_GAP_S = 0.0005
MIN_SEPARATE_ARRIVALS = 3
#: Streams in a row that must arrive in one burst before the check fails (a buffering proxy bursts
#: every time; a stalled client by accident, once).
STREAM_BURSTS_TO_FAIL = 2

# The context check: a calibration prompt measures tokens per word of the filler text, then one
# prompt is sized to this share of the advertised context, and must be taken in full.
CONTEXT_FILL = 0.95
CONTEXT_CALIBRATION_WORDS = 2000
FILLER_WORDS = (
    "river stone garden window morning silver forest letter yellow market bridge summer ocean "
    "pencil orange travel winter castle doctor island animal basket butter candle circle dinner "
    "engine family finger flower friend guitar hammer jacket kitchen ladder monkey number parrot "
    "pocket rabbit rocket shadow spider ticket tunnel valley wallet"
).split()


def with_budget(endpoint: Endpoint, body: dict) -> dict:
    return {**body, "max_tokens": endpoint.max_tokens(body["max_tokens"])}


@dataclass
class Outcome:
    status: str
    reason: str
    details: dict = field(default_factory=dict)


def passed(reason: str, **details) -> Outcome:
    return Outcome(PASS, reason, details)


def failed(reason: str, **details) -> Outcome:
    return Outcome(FAIL, reason, details)


def skipped(reason: str, **details) -> Outcome:
    return Outcome(SKIP, reason, details)


async def check_auth(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    url = f"{endpoint.base_url}/models"
    probes = {
        "without a key": {},
        "with an empty bearer token": {"Authorization": "Bearer"},
        "with a wrong key": {"Authorization": f"Bearer wrong-{secrets.token_hex(8)}"},
    }
    accepted = {"with the key": endpoint.auth_headers}
    if endpoint.previous_api_key:  # a rotation's overlap: clients still on the previous key get through
        accepted["with the previous key"] = {"Authorization": f"Bearer {endpoint.previous_api_key}"}
    responses = await gather_all(
        *(client.get(url, headers=headers) for headers in probes.values()),
        *(client.get(url, headers=headers) for headers in accepted.values()),
    )
    statuses = {label: r.status_code for label, r in zip([*probes, *accepted], responses)}
    for label in probes:
        if statuses[label] != 401:
            return failed(f"request {label} got {statuses[label]} (expected 401)", statuses=statuses)
    for label in accepted:
        if statuses[label] != 200:
            return failed(f"request {label} got {statuses[label]} (expected 200)", statuses=statuses)
    return passed("401 without a key, with an empty or a wrong one; 200 with " + " and ".join(
        label.removeprefix("with ") for label in accepted), statuses=statuses)


async def check_models(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    response = await client.get(f"{endpoint.base_url}/models", headers=endpoint.auth_headers)
    if response.status_code != 200:
        return failed(f"GET /v1/models got HTTP {response.status_code}")
    names = [entry.get("id") for entry in response.json().get("data") or []]
    if endpoint.model not in names:
        return failed(f"served name {endpoint.model!r} not listed; saw {names}", models=names)
    return passed(f"{endpoint.model!r} is served", models=names)


async def check_health(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    # SGLang's HTTP server can outlive its scheduler: only a real generation proves liveness.
    # Both requests get the short health timeout: a hung engine must fail the gate in seconds.
    route = catalog.ENGINES[endpoint.engine].health_path
    limit = endpoint.health_timeout
    try:
        response = await client.get(f"{endpoint.root_url}{route}", headers=endpoint.auth_headers, timeout=limit)
    except httpx.TimeoutException:
        raise CheckFailed(f"GET {route} timed out after {limit:g}s (scheduler dead?)")
    if response.status_code != 200:
        return failed(f"GET {route} got HTTP {response.status_code}")

    body = {"messages": [{"role": "user", "content": "Say OK."}], **INSTANT, "max_tokens": 8}
    try:
        message = await chat(client, endpoint, body, timeout=limit)
    except httpx.TimeoutException:
        raise CheckFailed(
            f"tiny completion timed out after {limit:g}s although {route} answered 200 "
            "(scheduler dead behind a live HTTP server?)"
        )
    if not (message.get("content") or reasoning_of(message)):
        return failed("tiny completion returned no text", message=message)
    return passed(f"{route} 200 and a tiny completion answered", finish_reason=message["finish_reason"])


def _judged(name: str, failures: int, samples: int, **details) -> Outcome:
    judgement = judgement_for(GATE_BEHAVIOURS[name], samples)
    verdict = passed if judgement.verdict(failures) else failed
    return verdict(judgement.describe(failures), **details, **{name: judgement.details(failures)})


async def _samples(count: int, sample) -> list:
    """Run `count` samples concurrently (bounded by the endpoint's slots); a plumbing fault in any
    sample (CheckFailed, HTTP error) fails the check at once and cancels the rest."""
    return await gather_all(*(sample(index) for index in range(count)))


async def check_thinking(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    body = with_budget(endpoint, {"messages": [{"role": "user", "content": "What is 17 * 23? Reply with the number."}],
                                  **THINKING})

    async def sample(_: int) -> dict:
        message = await chat(client, endpoint, body)
        if not reasoning_of(message):
            # Plumbing: thinking mode always reasons; no field means the reasoning parser is off.
            raise CheckFailed("no reasoning_content/reasoning field in thinking mode (reasoning parser off?)",
                              content=(message.get("content") or "")[:200], finish_reason=message["finish_reason"])
        return message

    messages = await _samples(samples_needed(GATE_BEHAVIOURS["thinking_content"]), sample)
    # Behaviour: a thinking answer that runs out of tokens before any content (finish "length").
    runaway = [m for m in messages if not (m.get("content") or "").strip()]
    return _judged(
        "thinking_content", len(runaway), len(messages), max_tokens=body["max_tokens"],
        finish_reasons=sorted({str(m["finish_reason"]) for m in messages}),
        example=(messages[0].get("content") or "")[:200],
    )


async def check_instant(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    body = with_budget(endpoint, {"messages": [{"role": "user", "content": "Name one planet of the solar system."}],
                                  **INSTANT})
    message = await chat(client, endpoint, body)
    content, reasoning = message.get("content") or "", reasoning_of(message)
    details = {"finish_reason": message["finish_reason"], "content": content[:200]}
    if reasoning:
        return failed(f"instant mode returned {len(reasoning)} chars of reasoning "
                      "(chat_template_kwargs thinking=false ignored?)", **details)
    if not content.strip():
        return failed("instant mode returned empty content", **details)
    return passed("content without reasoning", **details)


def argument_error(arguments: str | None, validator: jsonschema.protocols.Validator) -> str | None:
    """Why a tool call's arguments are invalid (not JSON, or against the tool's schema); None if valid.
    K2-Vendor-Verifier's validity rule: shared by the gate and the --k2vv mode."""
    try:
        parsed = json.loads(arguments or "")
    except json.JSONDecodeError as error:
        return f"arguments are not JSON ({error.msg} at char {error.pos})"
    error = jsonschema.exceptions.best_match(validator.iter_errors(parsed))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return f"arguments violate the schema at {where}: {error.message}"
    return None


def _calls_of(message: dict) -> list[dict]:
    return [
        {"name": (c.get("function") or {}).get("name"), "arguments": (c.get("function") or {}).get("arguments")}
        for c in message.get("tool_calls") or []
    ]


def _require_forced_call(calls: list[dict], label: str, content: str) -> None:
    """Plumbing: a forced tool_choice must produce a call to the forced function."""
    if not calls:
        raise CheckFailed(f"{label}: no tool_calls for a forced tool_choice (tool-call parser off?)",
                          content=content[:200])
    names = sorted({str(c["name"]) for c in calls})
    if names != ["get_weather"]:
        raise CheckFailed(f"{label}: forced get_weather but the call names {names}", calls=calls)


async def check_tool_call(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    forced = with_budget(endpoint, {
        "messages": [{"role": "user", "content": "What is the weather in Paris right now, in celsius?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        **THINKING,
    })
    parallel = with_budget(endpoint, {
        "messages": [
            {
                "role": "user",
                "content": "What is the weather in Paris and in Tokyo right now? Call get_weather once "
                "for each city, both calls in this turn.",
            }
        ],
        "tools": [WEATHER_TOOL],
        "tool_choice": "auto",
        **THINKING,
    })

    async def forced_plain(_: int) -> list[dict]:
        message = await chat(client, endpoint, forced)
        calls = _calls_of(message)
        _require_forced_call(calls, "non-streaming", message.get("content") or "")
        return calls

    async def forced_streamed(_: int) -> list[dict]:
        stream = await stream_chat(client, endpoint, forced)
        calls = [stream.tool_calls[i] for i in sorted(stream.tool_calls)]
        _require_forced_call(calls, "streaming", stream.content)
        return calls

    async def two_cities(_: int) -> list[dict]:
        return _calls_of(await chat(client, endpoint, parallel))

    forced_count = FORCED_TOOL_REQUESTS_PER_PATH
    plain, streamed, both = await gather_all(
        _samples(forced_count, forced_plain),
        _samples(forced_count, forced_streamed),
        _samples(samples_needed(GATE_BEHAVIOURS["parallel_calls"]), two_cities),
    )
    calls = [call for group in (*plain, *streamed, *both) for call in group]
    errors = [error for call in calls if (error := argument_error(call["arguments"], WEATHER_VALIDATOR))]
    single_or_none = sum(1 for group in both if len(group) < 2)
    schema = _judged("tool_schema", len(errors), len(calls))
    parallel_outcome = _judged("parallel_calls", single_or_none, len(both))
    details = {**schema.details, **parallel_outcome.details, "first_errors": errors[:3]}
    reason = f"schema: {schema.reason}; parallel: {parallel_outcome.reason}"
    if errors and schema.status == FAIL:
        reason = f"{reason}; e.g. {errors[0]}"
    ok = schema.status == PASS and parallel_outcome.status == PASS
    return (passed if ok else failed)(reason, **details)


async def check_vision(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    colors = sorted(COLORS)

    async def sample(_: int) -> dict:
        color = random.choice(colors)
        body = with_budget(endpoint, {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": png_data_url(solid_png(COLORS[color]))}},
                        {"type": "text", "text": "This image is one solid color. Which color is it? Answer in one word."},
                    ],
                }
            ],
            **THINKING,
        })
        message = await chat(client, endpoint, body)
        content, reasoning = (message.get("content") or "").lower(), reasoning_of(message).lower()
        named = sorted(name for name in COLORS if re.search(rf"\b{name}\b", content))
        if named == [color]:
            verdict = None
        elif color in named:
            verdict = f"named several colors {named} for a {color} square"
        elif re.search(rf"\b{color}\b", reasoning):
            verdict = f"the {color} answer landed only in reasoning (finish_reason={message['finish_reason']})"
        else:
            verdict = f"did not name the color of a {color} square (named {named or 'none'})"
        return {"color": color, "wrong": verdict, "content": content[:120]}

    answers = await _samples(samples_needed(GATE_BEHAVIOURS["vision_colour"]), sample)
    wrong = [a["wrong"] for a in answers if a["wrong"]]
    outcome = _judged("vision_colour", len(wrong), len(answers), first_wrong=wrong[:3])
    if wrong and outcome.status == FAIL:
        outcome.reason += f"; e.g. {wrong[0]}"
    return outcome


async def check_streaming(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    body = {
        "messages": [{"role": "user", "content": "Count from 1 to 40, numbers separated by spaces."}],
        **INSTANT,
        "max_tokens": 256,
    }
    # A buffering proxy delivers every answer in one burst; a client whose own event loop stalled
    # (a loaded machine, a concurrent check) can see one burst by accident. One burst is therefore
    # looked at again, and only a second one fails.
    bursts = 0
    while True:
        stream = await stream_chat(client, endpoint, with_budget(endpoint, body))
        times = stream.content_times
        details = {"content_chunks": len(times), "done": stream.done, "finish_reason": stream.finish_reason}
        if len(times) < 2:
            return failed(f"only {len(times)} content-bearing chunk(s) arrived", **details)
        arrivals = 1 + sum(1 for before, after in zip(times, times[1:]) if after - before >= MIN_ARRIVAL_GAP_S)
        details |= {"first_chunk_s": round(times[0] - stream.started, 3), "separate_arrivals": arrivals,
                    "spread_s": round(times[-1] - times[0], 3), "bursts_before": bursts}
        if arrivals >= min(MIN_SEPARATE_ARRIVALS, len(times)):
            break
        bursts += 1
        if bursts == STREAM_BURSTS_TO_FAIL:
            return failed(
                f"response arrived in one burst: {len(times)} content chunks in {arrivals} separate arrival(s) "
                f"after the first token, {bursts} streams in a row (buffering proxy? Caddy needs "
                "flush_interval -1)",
                **details,
            )
    if not stream.done:
        return failed("stream ended without data: [DONE]", **details)
    if not stream.finish_reason:
        return failed("no chunk carried a finish_reason", **details)
    return passed(f"{len(times)} chunks in {arrivals} separate arrivals, [DONE], "
                  f"finish_reason={stream.finish_reason}", **details)


def filler_text(words: int) -> str:
    return " ".join(FILLER_WORDS[i % len(FILLER_WORDS)] for i in range(words))


async def _prompt_tokens(client: httpx.AsyncClient, endpoint: Endpoint, words: int, max_tokens: int) -> int:
    body = {
        "messages": [{"role": "user", "content": f"{filler_text(words)}\n\nReply with the word OK."}],
        **INSTANT,
        "max_tokens": max_tokens,
    }
    message = await chat(client, endpoint, body)
    tokens = (message.get("usage") or {}).get("prompt_tokens")
    if not isinstance(tokens, int) or tokens <= 0:
        raise CheckFailed("the completion carries no usage.prompt_tokens: cannot size a long prompt")
    return tokens


async def check_context(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    """The endpoint takes one prompt near the context the stack advertises (a single long prefill)."""
    promised = endpoint.context
    if not promised:
        return skipped("no advertised context given (--context)")
    details = {"promised_tokens": promised, "max_model_len": endpoint.max_model_len}
    if endpoint.max_model_len is not None and endpoint.max_model_len < promised:
        return failed(
            f"/v1/models reports max_model_len {endpoint.max_model_len:,} for {endpoint.model!r} but the stack "
            f"promises {promised:,} tokens (engine started with a smaller --max-model-len / --context-length?)",
            **details,
        )
    reply_tokens = 8
    # Two short prompts measure the chat template's overhead and the filler's tokens per word.
    base, calibrated = await gather_all(
        _prompt_tokens(client, endpoint, 0, reply_tokens),
        _prompt_tokens(client, endpoint, CONTEXT_CALIBRATION_WORDS, reply_tokens),
    )
    per_word = (calibrated - base) / CONTEXT_CALIBRATION_WORDS
    if per_word <= 0:
        raise CheckFailed(f"prompt tokens did not grow with the prompt ({base} -> {calibrated})")
    target = int(promised * CONTEXT_FILL) - reply_tokens
    words = max(0, int((target - base) / per_word))
    body = {
        "messages": [{"role": "user", "content": f"{filler_text(words)}\n\nReply with the word OK."}],
        **INSTANT,
        "max_tokens": reply_tokens,
    }
    details |= {"tokens_per_word": round(per_word, 4), "target_prompt_tokens": target}
    try:
        message = await chat(client, endpoint, body)
    except CheckFailed as error:
        raise CheckFailed(
            f"a prompt of about {target:,} tokens ({CONTEXT_FILL:.0%} of the promised {promised:,}) was refused: "
            f"{error.reason}", **details
        )
    taken = (message.get("usage") or {}).get("prompt_tokens") or 0
    details["prompt_tokens"] = taken
    if taken < promised * CONTEXT_FILL * 0.9:
        return failed(f"the long prompt counted only {taken:,} tokens, short of {target:,}: cannot prove the "
                      "context (filler tokenized unevenly)", **details)
    return passed(f"a {taken:,}-token prompt was taken ({taken / promised:.0%} of the promised {promised:,})",
                  **details)


async def check_tls(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    url = urlsplit(endpoint.base_url)
    if url.scheme != "https":
        return skipped("plain http: no TLS to check")
    if endpoint.verify is False:
        return skipped("TLS verification disabled by the caller")
    context = endpoint.ssl_context()
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(url.hostname, url.port or 443, ssl=context, server_hostname=url.hostname),
            endpoint.timeout,
        )
    except ssl.SSLCertVerificationError as error:
        return failed(f"certificate not valid for {url.hostname}: {error.verify_message}")
    except (OSError, asyncio.TimeoutError) as error:
        return failed(f"TLS connection to {url.hostname}:{url.port or 443} failed: {error or type(error).__name__}")
    try:
        cert = writer.get_extra_info("peercert")
        version = writer.get_extra_info("ssl_object").version()
    finally:
        writer.close()
    expires = ssl.cert_time_to_seconds(cert["notAfter"])
    issuer = dict(item[0] for item in cert.get("issuer", ()))
    details = {
        "issuer": issuer.get("organizationName") or issuer.get("commonName"),
        "not_after": cert["notAfter"],
        "days_left": round((expires - time.time()) / 86400, 2),
        "protocol": version,
    }
    return passed(f"certificate valid for {url.hostname} ({version}, issuer {details['issuer']})", **details)


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def check_load(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    body = {"messages": [{"role": "user", "content": "Write two sentences about the sea."}], **INSTANT, "max_tokens": 128}

    async def one() -> StreamedChat:
        stream = await stream_chat(client, endpoint, body, limited=False)
        if not (stream.content_times and stream.done and stream.finish_reason):
            raise CheckFailed("stream incomplete (no content, [DONE] or finish_reason)")
        return stream

    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(endpoint.load)), return_exceptions=True)
    wall = time.perf_counter() - started
    errors = [r for r in results if isinstance(r, BaseException)]
    streams = [r for r in results if not isinstance(r, BaseException)]
    if errors:
        samples = sorted({f"{type(e).__name__}: {getattr(e, 'reason', e)}" for e in errors})[:3]
        return failed(f"{len(errors)}/{endpoint.load} concurrent streams failed: {samples[0]}", errors=samples)

    ttft = [s.token_times[0] - s.started for s in streams]
    decode_rates = [
        (s.output_tokens - 1) / (s.token_times[-1] - s.token_times[0])
        for s in streams
        if s.output_tokens > 1 and s.token_times[-1] > s.token_times[0]
    ]
    total_tokens = sum(s.output_tokens for s in streams)
    details = {
        "requests": endpoint.load,
        "ttft_p50_s": round(_percentile(ttft, 50), 3),
        "ttft_p90_s": round(_percentile(ttft, 90), 3),
        "ttft_p99_s": round(_percentile(ttft, 99), 3),
        "output_tokens_per_s_p50": round(statistics.median(decode_rates), 1) if decode_rates else None,
        "aggregate_output_tokens_per_s": round(total_tokens / wall, 1),
        "wall_s": round(wall, 3),
    }
    return passed(
        f"{endpoint.load} streams ok; TTFT p50/p90/p99 {details['ttft_p50_s']}/{details['ttft_p90_s']}/"
        f"{details['ttft_p99_s']}s; {details['output_tokens_per_s_p50']} tok/s per request, "
        f"{details['aggregate_output_tokens_per_s']} tok/s aggregate",
        **details,
    )


# --- what agent clients do (issue 23) ------------------------------------------------------------
#: Streams in flight at once in the tool_swarm check: agent swarms run 6-14, and vllm #54701 shows
#: from 6. Short requests fit any stack's KV pool, so the stack's own concurrency only raises this.
MIN_STREAMS_IN_FLIGHT = 8
SWARM_CITIES = (
    "Paris", "Tokyo", "Oslo", "Lisbon", "Cairo", "Lima", "Dublin", "Vienna", "Prague", "Madrid", "Berlin",
    "Rome", "Athens", "Warsaw", "Helsinki", "Stockholm", "Copenhagen", "Budapest", "Zurich", "Geneva",
    "Toronto", "Chicago", "Boston", "Seattle", "Denver", "Austin", "Sydney", "Melbourne", "Auckland", "Nairobi",
)
UNITS = ("celsius", "fahrenheit")
#: Greedy decoding: the same request must give the same call streamed and not, so a difference is
#: the streaming parser's. Instant mode keeps the swarm's streams short (tens of tokens).
GREEDY_INSTANT = {"temperature": 0, "max_tokens": 512, "chat_template_kwargs": {"thinking": False}}
SAVE_TOOL = {
    "type": "function",
    "function": {
        "name": "save_document",
        "description": "Save a text document under a title.",
        "parameters": {
            "type": "object",
            "properties": {"title": {"type": "string"}, "text": {"type": "string"}},
            "required": ["title", "text"],
            "additionalProperties": False,
        },
    },
}
SAVE_VALIDATOR = jsonschema.Draft202012Validator(SAVE_TOOL["function"]["parameters"])
#: Long tool arguments (sglang #23363): a document of this many characters copied into a call.
LONG_ARGUMENT_CHARS = 4096
#: A budget that cuts the long call inside its arguments (it needs ~1,000 tokens): the answer must
#: say "length" (dynamo PR #8208: a silent stop drops the call).
TRUNCATING_MAX_TOKENS = 48


def _plain_calls(message: dict) -> list[dict]:
    return _calls_of(message)


def _streamed_calls(stream: StreamedChat) -> list[dict]:
    return [{"id": stream.tool_calls[i]["id"], "name": stream.tool_calls[i]["name"],
             "arguments": stream.tool_calls[i]["arguments"]} for i in sorted(stream.tool_calls)]


def _parsed(arguments: str | None):
    try:
        return True, json.loads(arguments or "")
    except json.JSONDecodeError:
        return False, None


def stream_fault(stream_calls: list[dict], stream_finish: str | None, empty_deltas: int,
                 plain_calls: list[dict]) -> tuple[str, str] | None:
    """(symptom, what was seen) when a stream lost or altered the calls the same request gets
    non-streamed (greedy decoding): a fault of the engine's streaming parser, never of the model."""
    named = [c for c in stream_calls if c.get("name")]
    if (stream_finish == "tool_calls" or empty_deltas) and len(named) < max(1, len(stream_calls)):
        return (engine_bugs.EMPTY_STREAMED_CALL,
                f"finish_reason {stream_finish!r}, {empty_deltas} empty tool_calls delta(s), "
                f"{len(named)} of {len(stream_calls)} streamed call(s) named; non-streamed: "
                f"{[c.get('name') for c in plain_calls]}")
    if [c.get("name") for c in stream_calls] != [c.get("name") for c in plain_calls]:
        return (engine_bugs.STREAM_DIFFERS,
                f"streamed calls {[c.get('name') for c in stream_calls]} (finish_reason {stream_finish!r}), "
                f"non-streamed {[c.get('name') for c in plain_calls]}")
    for index, (streamed, plain) in enumerate(zip(stream_calls, plain_calls)):
        (stream_ok, stream_args), (plain_ok, plain_args) = _parsed(streamed["arguments"]), _parsed(plain["arguments"])
        if plain_ok and (not stream_ok or stream_args != plain_args):
            return (engine_bugs.STREAM_DIFFERS,
                    f"call {index} arguments streamed as {streamed['arguments'][:80]!r} "
                    f"({len(streamed['arguments'] or '')} chars), non-streamed {plain['arguments'][:80]!r} "
                    f"({len(plain['arguments'] or '')} chars)")
    return None


def _fault_reason(count: int, total: int, where: str, first: tuple[str, str], endpoint: Endpoint) -> str:
    symptom, seen = first
    return (f"{count}/{total} {where}: {symptom} ({seen}); a fault of the engine's streaming tool-call parser, "
            f"not of the model; {engine_bugs.named_for(symptom, endpoint.engine, endpoint.engine_release)}")


@dataclass
class SwarmSample:
    """One streamed request of the swarm beside the same request answered non-streamed."""

    stream_calls: list[dict]
    stream_finish: str | None
    empty_deltas: int
    plain_calls: list[dict]


def swarm_body(index: int) -> dict:
    """The index-th swarm request: distinct per index (greedy decoding answers a repeated prompt the
    same way, so repeats would prove nothing more), one clear call to get_weather."""
    city, unit = SWARM_CITIES[index % len(SWARM_CITIES)], UNITS[index // len(SWARM_CITIES) % len(UNITS)]
    return {
        "messages": [{"role": "user", "content": f"Request {index}: what is the weather in {city} right now, in "
                      f"{unit}? Call get_weather with city \"{city}\" and unit \"{unit}\"."}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "auto",  # the tool parser's path: a named tool_choice is guided JSON in vLLM
        **GREEDY_INSTANT,
    }


def swarm_samples_needed() -> int:
    return max(samples_needed(GATE_BEHAVIOURS["streamed_call_faults"]),
               samples_needed(GATE_BEHAVIOURS["streamed_tool_calls"]))


def judge_swarm(samples: list[SwarmSample], endpoint: Endpoint, **details) -> Outcome:
    """The tool_swarm verdict on recorded samples (pure: the statistics tests drive it directly)."""
    faults = [fault for s in samples
              if (fault := stream_fault(s.stream_calls, s.stream_finish, s.empty_deltas, s.plain_calls))]
    invalid = [
        problem for s in samples
        if (problem := "no tool call" if not s.stream_calls else next(
            (error for call in s.stream_calls if (error := argument_error(call["arguments"], WEATHER_VALIDATOR))),
            None))
    ]
    plumbing = _judged("streamed_call_faults", len(faults), len(samples))
    behaviour = _judged("streamed_tool_calls", len(invalid), len(samples))
    details = {**details, **plumbing.details, **behaviour.details, "first_faults": [seen for _, seen in faults[:3]],
               "first_invalid": invalid[:3]}
    if faults:
        return failed(_fault_reason(len(faults), len(samples), "streamed tool calls broken", faults[0], endpoint),
                      symptom=faults[0][0], **details)
    reason = f"no stream lost a call; {behaviour.reason}"
    if invalid and behaviour.status == FAIL:
        reason = f"{reason}; e.g. {invalid[0]}"
    return (passed if behaviour.status == PASS else failed)(reason, **details)


async def check_tool_swarm(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    """Streamed tool calls sampled many at once, each beside the same request non-streamed.

    Cost: 2 x 59 short instant requests (~40 output tokens each; 59 streams, 59 twins). 59 is the
    fewest streams that catch a stream-losing bug at the low end of vllm #54701's rate (5%) with
    P(pass) <= 5% while a good engine (which never loses one) cannot fail on it; its 59 calls also
    judge the streamed calls' validity at the non-streamed rates (30 would do)."""
    count = swarm_samples_needed()
    in_flight = max(MIN_STREAMS_IN_FLIGHT, endpoint.concurrency)
    swarm = asyncio.Semaphore(in_flight)
    open_streams = peak = 0

    async def streamed(index: int) -> StreamedChat:
        nonlocal open_streams, peak
        async with swarm:
            open_streams += 1
            peak = max(peak, open_streams)
            try:
                # The swarm holds its own slots: the endpoint's are sized for long sequences.
                return await stream_chat(client, endpoint, with_budget(endpoint, swarm_body(index)), limited=False)
            finally:
                open_streams -= 1

    async def plain(index: int) -> dict:
        return await chat(client, endpoint, with_budget(endpoint, swarm_body(index)))

    streams, twins = await gather_all(
        gather_all(*(streamed(i) for i in range(count))), gather_all(*(plain(i) for i in range(count))),
    )
    samples = [SwarmSample(_streamed_calls(s), s.finish_reason, s.empty_tool_deltas, _plain_calls(t))
               for s, t in zip(streams, twins)]
    return judge_swarm(samples, endpoint, streams=count, streams_in_flight_limit=in_flight,
                       streams_in_flight_peak=peak)


AGENT_TOOL_PROMPT = ("What is the weather in {city} right now? Use the get_weather tool, then tell me the "
                     "temperature and the observation code it reports.")


def agent_loop_turns(city: str, call: dict, reasoning: str, content: str, result: dict) -> list[dict]:
    """The conversation an agent sends back after running the tool.

    Kimi's chat template (K2-Thinking/K2.6, as rendered by vLLM and SGLang from the model's
    chat_template.jinja) keeps the reasoning of assistant messages after the last user message (the
    tool loop in progress) and renders earlier turns' reasoning as an empty <think></think>; Moonshot's
    guide asks clients to send reasoning_content back with the tool-call message. So the check sends
    it back on the assistant message that carries the call; the template decides what it renders."""
    assistant = {
        "role": "assistant",
        "content": content or "",
        "tool_calls": [{"id": call["id"], "type": "function",
                        "function": {"name": call["name"], "arguments": call["arguments"]}}],
    }
    if reasoning:
        assistant["reasoning_content"] = reasoning
    return [
        {"role": "user", "content": AGENT_TOOL_PROMPT.format(city=city)},
        assistant,
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)},
    ]


async def check_agent_loop(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    """Call a tool, send its result back with the call id, get an answer that uses it (thinking on).

    Cost: 2 thinking requests per sample, 16 samples (the fewest that separate a 5% from a 50% rate
    within both error budgets); half the samples stream both turns, half do not."""

    async def sample(index: int) -> str | None:
        city = SWARM_CITIES[index % len(SWARM_CITIES)]
        streamed = index % 2 == 1
        code = f"OBS-{secrets.randbelow(9000) + 1000}"
        temperature = random.randint(-9, 35) + random.randint(1, 9) / 10  # never x.0: "17" is not "17.0"
        first = with_budget(endpoint, {"messages": [{"role": "user", "content": AGENT_TOOL_PROMPT.format(city=city)}],
                                       "tools": [WEATHER_TOOL], "tool_choice": "auto", **THINKING})
        if streamed:
            stream = await stream_chat(client, endpoint, first)
            calls, reasoning, content = _streamed_calls(stream), stream.reasoning, stream.content
        else:
            message = await chat(client, endpoint, first)
            calls = [{"id": c.get("id"), **_calls_of({"tool_calls": [c]})[0]} for c in message.get("tool_calls") or []]
            reasoning, content = reasoning_of(message), message.get("content") or ""
        calls = [c for c in calls if c.get("name") == "get_weather"]
        if not calls:
            return "no get_weather call in the first turn"
        if not calls[0].get("id"):
            # Plumbing: without the id a client cannot send the result back.
            raise CheckFailed(f"{'streamed' if streamed else 'non-streamed'} tool call carries no id: a client "
                              "cannot send the tool's result back (tool_call_id)", call=calls[0])
        result = {"city": city, "temperature_c": temperature, "observation_code": code}
        second = with_budget(endpoint, {"messages": agent_loop_turns(city, calls[0], reasoning, content, result),
                                        "tools": [WEATHER_TOOL], "tool_choice": "auto", **THINKING})
        if streamed:
            stream = await stream_chat(client, endpoint, second)
            answer, finish = stream.content, stream.finish_reason
        else:
            message = await chat(client, endpoint, second)
            answer, finish = message.get("content") or "", message["finish_reason"]
        if code in answer or str(temperature) in answer:
            return None
        return (f"the answer after the tool result names neither {code} nor {temperature} "
                f"(finish_reason {finish}): {answer[:80]!r}")

    outcomes = await _samples(samples_needed(GATE_BEHAVIOURS["agent_loop"]), sample)
    unused = [o for o in outcomes if o]
    outcome = _judged("agent_loop", len(unused), len(outcomes), first_unused=unused[:3])
    if unused and outcome.status == FAIL:
        outcome.reason += f"; e.g. {unused[0]}"
    return outcome


def long_document(chars: int = LONG_ARGUMENT_CHARS) -> str:
    """Numbered lines of ordinary words, at least `chars` long: easy to copy, easy to compare."""
    lines, line = [], 0
    while sum(len(text) + 1 for text in lines) < chars:
        words = " ".join(FILLER_WORDS[(line * 7 + k) % len(FILLER_WORDS)] for k in range(8))
        lines.append(f"{line + 1:03d} {words}")
        line += 1
    return "\n".join(lines)


def long_call_body(max_tokens: int) -> dict:
    """A multi-turn request (an earlier tool exchange, with Kimi's own call-id form) whose answer is
    one long call: the shape sglang #23363 drops in streams."""
    earlier = {"id": "functions.get_weather:0", "type": "function",
               "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo", "unit": "celsius"})}}
    return {
        "messages": [
            {"role": "user", "content": "What is the weather in Oslo, in celsius?"},
            {"role": "assistant", "content": "", "tool_calls": [earlier]},
            {"role": "tool", "tool_call_id": earlier["id"], "content": json.dumps({"temperature_c": 4.0})},
            {"role": "assistant", "content": "It is 4.0 degrees celsius in Oslo."},
            {"role": "user", "content": "Now save the document below with save_document, title \"notes\", and "
             "the text exactly as it stands between the tags, unchanged.\n"
             f"<document>{long_document()}</document>"},
        ],
        "tools": [WEATHER_TOOL, SAVE_TOOL],
        "tool_choice": "auto",
        **GREEDY_INSTANT,
        "max_tokens": max_tokens,
    }


def truncation_fault(finish: str | None, calls: list[dict]) -> tuple[str, str] | None:
    """A call cut by max_tokens must come back as finish_reason "length" (a partial call may ride along)."""
    if finish == "length":
        return None
    if finish == "tool_calls":
        return (engine_bugs.TRUNCATED_CALL_AS_COMPLETE,
                f"finish_reason 'tool_calls' for a call cut at {TRUNCATING_MAX_TOKENS} tokens, arguments "
                f"{(calls[-1]['arguments'] or '')[:60]!r}" if calls else "finish_reason 'tool_calls' and no call")
    return (engine_bugs.TRUNCATED_CALL_SILENT_STOP,
            f"finish_reason {finish!r} with {len(calls)} call(s) for a call cut at {TRUNCATING_MAX_TOKENS} tokens")


async def check_long_calls(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    """Long tool arguments (several KB) streamed and not, in a multi-turn request, and the same call
    cut by max_tokens reported honestly. Deterministic (greedy), so every rule here is plumbing.

    Cost: 4 instant requests: the long call twice (~1,000 output tokens each) and cut twice (48)."""
    full = with_budget(endpoint, long_call_body(8192))
    cut = long_call_body(TRUNCATING_MAX_TOKENS)
    plain, stream, cut_plain, cut_stream = await gather_all(
        chat(client, endpoint, full), stream_chat(client, endpoint, full),
        chat(client, endpoint, cut), stream_chat(client, endpoint, cut),
    )
    plain_calls, stream_calls = _plain_calls(plain), _streamed_calls(stream)
    saved = [c for c in plain_calls if c["name"] == "save_document"]
    text = (_parsed(saved[0]["arguments"])[1] or {}).get("text", "") if saved else ""
    details = {"plain_finish": plain["finish_reason"], "stream_finish": stream.finish_reason,
               "argument_chars": len(saved[0]["arguments"]) if saved else 0,
               "completion_tokens": (plain.get("usage") or {}).get("completion_tokens"),
               "cut_finishes": [cut_plain["finish_reason"], cut_stream.finish_reason]}
    problem = argument_error(saved[0]["arguments"], SAVE_VALIDATOR) if saved else None
    if problem:
        return failed(f"the long non-streamed call is invalid: {problem}", **details)
    if not isinstance(text, str) or len(text) < LONG_ARGUMENT_CHARS * 0.9:
        return failed(f"the non-streamed answer carried no save_document call with the {LONG_ARGUMENT_CHARS}-char "
                      f"document (calls {[c['name'] for c in plain_calls]}, finish_reason {plain['finish_reason']}, "
                      f"text {len(text) if isinstance(text, str) else 0} chars): long arguments not proven", **details)
    fault = stream_fault(stream_calls, stream.finish_reason, stream.empty_tool_deltas, plain_calls)
    if fault:
        return failed(_fault_reason(1, 1, f"long streamed call of {len(saved[0]['arguments'])} chars", fault,
                                    endpoint), symptom=fault[0], **details)
    for label, finish, calls in (("non-streamed", cut_plain["finish_reason"], _plain_calls(cut_plain)),
                                 ("streamed", cut_stream.finish_reason, _streamed_calls(cut_stream))):
        fault = truncation_fault(finish, calls)
        if fault:
            return failed(f"max_tokens {TRUNCATING_MAX_TOKENS} cut the {label} call: {fault[0]} ({fault[1]}); a "
                          f"client cannot tell the call was lost; "
                          f"{engine_bugs.named_for(fault[0], endpoint.engine, endpoint.engine_release)}",
                          symptom=fault[0], **details)
    return passed(f"a {len(saved[0]['arguments']):,}-char call streamed and not, identical; cut at "
                  f"{TRUNCATING_MAX_TOKENS} tokens both report finish_reason length", **details)


CHECKS = {
    "auth": check_auth,
    "models": check_models,
    "health": check_health,
    "thinking": check_thinking,
    "instant": check_instant,
    "tool_call": check_tool_call,
    "tool_swarm": check_tool_swarm,
    "agent_loop": check_agent_loop,
    "long_calls": check_long_calls,
    "vision": check_vision,
    "streaming": check_streaming,
    "context": check_context,
    "tls": check_tls,
    "load": check_load,
}
