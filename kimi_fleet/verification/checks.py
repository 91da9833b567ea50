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

from kimi_fleet import catalog

from .client import CheckFailed, Endpoint, StreamedChat, chat, gather_all, reasoning_of, stream_chat
from .images import COLORS, png_data_url, solid_png
from .report import FAIL, PASS, SKIP

# Sampling recommended for K2.6 (thinking is the default mode).
THINKING = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 8192}
INSTANT = {"temperature": 0.6, "top_p": 0.95, "max_tokens": 1024, "chat_template_kwargs": {"thinking": False}}

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

# A streamed answer is incremental when its content chunks arrive spread over at least this
# share of the request's duration; a buffered one arrives in a single burst at the end.
MIN_STREAM_SPREAD = 0.2


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


def _leaks_think_tags(text: str) -> bool:
    return "<think>" in text or "</think>" in text


async def check_auth(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    url = f"{endpoint.base_url}/models"
    probes = {
        "without a key": {},
        "with an empty bearer token": {"Authorization": "Bearer"},
        "with a wrong key": {"Authorization": f"Bearer wrong-{secrets.token_hex(8)}"},
    }
    responses = await gather_all(
        *(client.get(url, headers=headers) for headers in probes.values()),
        client.get(url, headers=endpoint.auth_headers),
    )
    statuses = {label: r.status_code for label, r in zip(probes, responses)}
    statuses["with the key"] = responses[-1].status_code
    for label in probes:
        if statuses[label] != 401:
            return failed(f"request {label} got {statuses[label]} (expected 401)", statuses=statuses)
    if statuses["with the key"] != 200:
        return failed(f"request with the key got {statuses['with the key']} (expected 200)", statuses=statuses)
    return passed("401 without a key, with an empty or a wrong one; 200 with the key", statuses=statuses)


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
    route = catalog.ENGINES[endpoint.engine].health_path

    try:
        response = await client.get(f"{endpoint.root_url}{route}", headers=endpoint.auth_headers)
    except httpx.TimeoutException:
        raise CheckFailed(f"GET {route} timed out after {endpoint.timeout:g}s (scheduler dead?)")
    if response.status_code != 200:
        return failed(f"GET {route} got HTTP {response.status_code}")

    body = {"messages": [{"role": "user", "content": "Say OK."}], **INSTANT, "max_tokens": 8}
    try:
        message = await chat(client, endpoint, body)
    except httpx.TimeoutException:
        raise CheckFailed(
            f"tiny completion timed out after {endpoint.timeout:g}s although {route} answered 200 "
            "(scheduler dead behind a live HTTP server?)"
        )
    if not (message.get("content") or reasoning_of(message)):
        return failed("tiny completion returned no text", message=message)
    return passed(f"{route} 200 and a tiny completion answered", finish_reason=message["finish_reason"])


async def check_thinking(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    body = {"messages": [{"role": "user", "content": "What is 17 * 23? Reply with the number."}], **THINKING}
    message = await chat(client, endpoint, body)
    content, reasoning = message.get("content") or "", reasoning_of(message)
    details = {"finish_reason": message["finish_reason"], "content": content[:200], "reasoning_chars": len(reasoning)}
    if _leaks_think_tags(content):
        return failed("reasoning leaked into content as <think> tags (reasoning parser off?)", **details)
    if not reasoning:
        return failed("no reasoning_content/reasoning field in thinking mode (reasoning parser off?)", **details)
    if not content.strip():
        return failed(
            f"content empty after {len(reasoning)} chars of reasoning "
            f"(finish_reason={message['finish_reason']}; raise max_tokens)",
            **details,
        )
    return passed(f"reasoning ({len(reasoning)} chars) separated from content", **details)


async def check_instant(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    body = {"messages": [{"role": "user", "content": "Name one planet of the solar system."}], **INSTANT}
    message = await chat(client, endpoint, body)
    content, reasoning = message.get("content") or "", reasoning_of(message)
    details = {"finish_reason": message["finish_reason"], "content": content[:200]}
    if reasoning:
        return failed(f"instant mode returned {len(reasoning)} chars of reasoning", **details)
    if _leaks_think_tags(content):
        return failed("instant mode content contains <think> tags", **details)
    if not content.strip():
        return failed("instant mode returned empty content", **details)
    return passed("content without reasoning", **details)


def _validate_call(call: dict, label: str) -> dict:
    """Parse and schema-check one tool call; returns its arguments or raises CheckFailed."""
    name, arguments = call.get("name"), call.get("arguments") or ""
    if name != "get_weather":
        raise CheckFailed(f"{label}: called {name!r} instead of get_weather", call=call)
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as error:
        raise CheckFailed(f"{label}: arguments are not JSON ({error.msg} at char {error.pos})", arguments=arguments)
    error = jsonschema.exceptions.best_match(WEATHER_VALIDATOR.iter_errors(parsed))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise CheckFailed(f"{label}: arguments violate the schema at {where}: {error.message}", arguments=parsed)
    return parsed


def _calls_of(message: dict) -> list[dict]:
    return [
        {"name": (c.get("function") or {}).get("name"), "arguments": (c.get("function") or {}).get("arguments")}
        for c in message.get("tool_calls") or []
    ]


async def check_tool_call(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    forced = {
        "messages": [{"role": "user", "content": "What is the weather in Paris right now, in celsius?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        **THINKING,
    }
    parallel = {
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
    }
    plain, streamed, both = await gather_all(
        chat(client, endpoint, forced), stream_chat(client, endpoint, forced), chat(client, endpoint, parallel)
    )
    plain_calls = _calls_of(plain)
    if not plain_calls:
        raise CheckFailed("non-streaming: no tool_calls in the response", content=(plain.get("content") or "")[:200])
    arguments = {"non-streaming": _validate_call(plain_calls[0], "non-streaming")}

    if not streamed.tool_calls:
        raise CheckFailed("streaming: no tool_calls deltas in the stream", content=streamed.content[:200])
    arguments["streaming"] = _validate_call(streamed.tool_calls[min(streamed.tool_calls)], "streaming")

    parallel_calls = _calls_of(both)
    if len(parallel_calls) < 2:
        raise CheckFailed(
            f"parallel: asked for two cities, got {len(parallel_calls)} tool call(s)", calls=parallel_calls
        )
    arguments["parallel"] = [_validate_call(c, f"parallel call {i}") for i, c in enumerate(parallel_calls)]
    return passed(
        f"forced call valid (plain and streamed), {len(parallel_calls)} parallel calls valid", arguments=arguments
    )


async def check_vision(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    color = random.choice(sorted(COLORS))
    body = {
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
    }
    message = await chat(client, endpoint, body)
    content, reasoning = (message.get("content") or "").lower(), reasoning_of(message).lower()
    named = sorted(name for name in COLORS if re.search(rf"\b{name}\b", content))
    details = {"color": color, "content": content[:200], "finish_reason": message["finish_reason"]}
    if named == [color]:
        return passed(f"named the {color} square", **details)
    if color in named:
        return failed(f"answer names several colors {named} for a {color} square", **details)
    if re.search(rf"\b{color}\b", reasoning):
        return failed("answer landed only in reasoning (raise max_tokens / check <think> handling)", **details)
    return failed(f"did not name the color of a {color} square (named {named or 'none'})", **details)


async def check_streaming(client: httpx.AsyncClient, endpoint: Endpoint) -> Outcome:
    body = {
        "messages": [{"role": "user", "content": "Count from 1 to 40, numbers separated by spaces."}],
        **INSTANT,
        "max_tokens": 256,
    }
    stream = await stream_chat(client, endpoint, body)
    times = stream.content_times
    details = {"content_chunks": len(times), "done": stream.done, "finish_reason": stream.finish_reason}
    if len(times) < 2:
        return failed(f"only {len(times)} content-bearing chunk(s) arrived", **details)
    total = times[-1] - stream.started
    spread = times[-1] - times[0]
    details |= {"first_chunk_s": round(times[0] - stream.started, 3), "spread_s": round(spread, 3)}
    if spread < MIN_STREAM_SPREAD * total:
        return failed(
            f"response arrived in one burst: {len(times)} chunks within {spread * 1000:.0f} ms after "
            f"{total:.2f}s (buffering proxy? Caddy needs flush_interval -1)",
            **details,
        )
    if not stream.done:
        return failed("stream ended without data: [DONE]", **details)
    if not stream.finish_reason:
        return failed("no chunk carried a finish_reason", **details)
    return passed(f"{len(times)} chunks over {spread:.2f}s, [DONE], finish_reason={stream.finish_reason}", **details)


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
        stream = await stream_chat(client, endpoint, body)
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


CHECKS = {
    "auth": check_auth,
    "models": check_models,
    "health": check_health,
    "thinking": check_thinking,
    "instant": check_instant,
    "tool_call": check_tool_call,
    "vision": check_vision,
    "streaming": check_streaming,
    "tls": check_tls,
    "load": check_load,
}
