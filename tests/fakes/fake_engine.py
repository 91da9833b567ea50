"""A fake OpenAI-compatible Kimi-K2.6 engine (stdlib only) for testing the proxy and the verifier.

    python tests/fakes/fake_engine.py --port 0 --model kimi-k2.6 --mode good [--engine sglang]

Prints "listening on 127.0.0.1:PORT" once it accepts connections. Like the real engines it does
no authentication: the proxy in front of it does. Each non-good mode breaks exactly one thing.

Its /metrics serves the pinned engine's own metric names (kimi_fleet.catalog.ENGINE_METRICS, read
from the vLLM/SGLang source) moving with the requests it serves: tokens and prompt tokens counted,
requests running (in flight) and waiting (beyond --max-running), KV use from the tokens in flight
over --kv-capacity-tokens, and TTFT, inter-token and end-to-end latency histograms with the
engine's own buckets. A hung generation (dead-scheduler, --hang-after, --hang-file) counts as
running and generates nothing, as a stalled engine looks.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import struct
import sys
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repo's package
from kimi_fleet.catalog import ENGINE_METRICS  # noqa: E402 - stdlib-only module, after the path

MODES = {
    "good": "behaves like a correctly configured engine",
    "no-auth": "same as good; shows that an engine reached without the proxy has no auth",
    "bad-tool-json": "tool call arguments are not JSON",
    "schema-invalid-tool": "tool call arguments are JSON but omit the schema's required properties",
    "vision-in-reasoning": "the image's color appears only in reasoning_content",
    "buffered-stream": "streams are computed, held back, then written in one burst",
    "buffered-once": "the first stream arrives in one burst (as a stalled client sees it), later ones stream",
    "dead-scheduler": "/health is 200 but every generation hangs",
    "missing-model": "/v1/models lists a different name",
    "leaky-thinking": "no reasoning field: reasoning is left in content inside <think> tags",
    "reasoning-in-instant": "instant mode still returns reasoning_content",
    "no-reasoning-field": "thinking mode answers without any reasoning field (reasoning parser off)",
    "raw-tool-markers": "tool calls come back as Kimi's raw section markers inside content (tool parser off)",
    "no-forced-call": "a forced tool_choice returns plain content and no call",
    "server-error": "the third chat completion answers HTTP 500 (one occurrence)",
    "wrong-model-in-response": "completions name another model than the one asked for",
    "repeat-tool-name": "good, but every streamed tool-call delta repeats the function name",
    "empty-stream-tool-calls": "vllm #54701: while >= 6 streams are in flight, a share (--empty-call-rate) of "
    "streamed tool calls arrive as empty tool_calls deltas, still ending in finish_reason tool_calls; "
    "non-streamed answers are correct",
    "ignores-tool-result": "after a tool result comes back, the answer does not use it",
    "drops-long-streamed-call": "sglang #23363: a streamed call with arguments over 2,048 characters is dropped "
    "and the stream stops; non-streamed answers are correct",
    "silent-truncation": "a tool call cut by max_tokens is dropped and reported as finish_reason stop "
    "(dynamo PR #8208)",
}
#: sglang #23363's drop, for arguments longer than this
LONG_STREAMED_ARGUMENT_CHARS = 2048
#: vllm #54701 shows from 6 concurrent streams on
EMPTY_CALL_MIN_STREAMS = 6
#: where a prompt hands the model a text to copy into a tool argument (the long-arguments check)
DOCUMENT = re.compile(r"<document>(.*?)</document>", re.DOTALL)
RAW_TOOL_MARKERS = "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
# vLLM's refusal when prompt + max_tokens exceeds the context (vllm/entrypoints/openai/serving_engine.py).
CONTEXT_ERROR = (
    "This model's maximum context length is {limit} tokens. However, you requested {total} tokens "
    "({prompt} in the messages, {completion} in the completion). Please reduce the length of the "
    "messages or completion."
)
PROMPT_OVERHEAD_TOKENS = 8  # chat template tokens around the messages
ARGUMENT_CHARS_PER_TOKEN = 8  # tool-call arguments stream 8 characters a token
#: A call's first argument frames are paced one chunk delay apart like any token; past these, the
#: delay falls once per ARGUMENT_FRAMES_PER_PAUSE frames (a parser flushing a long call in bursts).
#: Each frame is still its own SSE event. No check times argument frames (the streaming check
#: times content), and a 4,225-character call paced frame by frame cost ~11 s of every suite run.
PACED_ARGUMENT_FRAMES = 32
ARGUMENT_FRAMES_PER_PAUSE = 16
IMAGE_TOKENS = 64

NAMED_COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}

REASONING_TEXT = (
    "The user wants a short answer. Let me think it through step by step before replying, "
    "checking the request carefully so the final answer is right."
)
ANSWER_TEXT = "Here is a short and friendly answer to your question, written in a few words."


# The engines' own histogram buckets (seconds): vllm/v1/metrics/loggers.py:755-870 (0.22.1),
# sglang/srt/observability/metrics_collector.py:1383-1446 (0.5.12.post1).
BUCKETS = {
    "vllm": {
        "ttft": (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0),
        "itl": (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0),
        "e2e": (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0),
    },
    "sglang": {
        "ttft": (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400),
        "itl": (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080, 0.100,
                0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000),
        "e2e": (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400),
    },
}


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        for bound, count in zip(self.bounds, self.counts):
            out.append(f'{name}_bucket{{{labels},le="{float(bound)}"}} {count}')
        out += [f'{name}_bucket{{{labels},le="+Inf"}} {self.total}', f"{name}_sum{{{labels}}} {self.sum}",
                f"{name}_count{{{labels}}} {self.total}"]
        return out


class EngineMetrics:
    """The engine's Prometheus metrics under its pinned names, kept by the request handlers."""

    def __init__(self, engine: str, model: str, max_running: int, kv_capacity_tokens: int):
        self.names = ENGINE_METRICS[engine]
        self.engine = engine
        self.model = model
        self.lock = threading.Lock()
        # Requests beyond max_running wait for a slot, as an engine's scheduler queue (0: no limit).
        self.slots = threading.BoundedSemaphore(max_running) if max_running else None
        self.kv_capacity_tokens = kv_capacity_tokens
        self.generated = 0
        #: the per-iteration counter (catalog progress_tokens): every token as it is generated
        self.progress = 0
        #: tokens of each request in flight: SGLang adds them to its generation counter at the finish
        self.pending_generated = 0
        self.prompt = 0
        self.running = 0
        self.waiting = 0
        self.tokens_in_flight = 0
        self.finished: dict[str, int] = {}
        self.ttft, self.itl, self.e2e = (Histogram(BUCKETS[engine][k]) for k in ("ttft", "itl", "e2e"))

    def admit(self, prompt_tokens: int) -> None:
        """Wait for a slot (counted as waiting meanwhile), then run."""
        with self.lock:
            self.waiting += 1
        if self.slots is not None:
            self.slots.acquire()
        with self.lock:
            self.waiting -= 1
            self.running += 1
            self.prompt += prompt_tokens
            self.tokens_in_flight += prompt_tokens

    def tokens(self, count: int) -> None:
        with self.lock:
            self.progress += count
            if self.engine == "sglang":  # its generation counter moves when the request finishes
                self.pending_generated += count
            else:
                self.generated += count
            self.tokens_in_flight += count

    def finish(self, started: float, held_tokens: int, reason: str, generated: int = 0) -> None:
        """`generated`: the request's tokens, which SGLang adds to its generation counter only now."""
        with self.lock:
            if self.engine == "sglang":
                counted = min(generated, self.pending_generated)
                self.generated += counted
                self.pending_generated -= counted
            self.running -= 1
            self.tokens_in_flight -= held_tokens
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.e2e.observe(time.monotonic() - started)
        if self.slots is not None:
            self.slots.release()

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        with self.lock:
            self.itl.observe(seconds)

    def exposition(self) -> list[str]:
        n = self.names
        if self.engine == "vllm":  # labels: loggers.py:414 (model_name, engine)
            labels = f'model_name="{self.model}",engine="0"'
            scheduler = request = labels
        else:  # the scheduler's and the tokenizer manager's collectors (scheduler_metrics_mixin.py:134-148)
            request = f'model_name="{self.model}",engine_type="unified"'
            scheduler = f'{request},tp_rank="0",pp_rank="0",moe_ep_rank="0"'
        with self.lock:
            kv = min(1.0, max(0, self.tokens_in_flight) / self.kv_capacity_tokens)
            out = [f"# TYPE {n.generated_tokens} counter", f"{n.generated_tokens}{{{request}}} {self.generated}"]
            if n.progress_tokens != n.generated_tokens:  # SGLang's per-iteration counter, by mode
                out += [f"# TYPE {n.progress_tokens} counter",
                        f'{n.progress_tokens}{{{scheduler},mode="decode"}} {self.progress}']
            out += [
                   f"# TYPE {n.prompt_tokens} counter", f"{n.prompt_tokens}{{{request}}} {self.prompt}",
                   f"# TYPE {n.running} gauge", f"{n.running}{{{scheduler}}} {self.running}",
                   f"# TYPE {n.waiting} gauge", f"{n.waiting}{{{scheduler}}} {self.waiting}",
                   f"# TYPE {n.kv_cache_usage} gauge", f"{n.kv_cache_usage}{{{scheduler}}} {kv}",
                   f"# TYPE {n.requests_finished} counter"]
            if self.engine == "vllm":
                out += [f'{n.requests_finished}{{{request},finished_reason="{reason}"}} {count}'
                        for reason, count in sorted(self.finished.items())]
            else:
                out.append(f"{n.requests_finished}{{{request}}} {sum(self.finished.values())}")
            out += self.ttft.lines(n.ttft_histogram, request) + self.itl.lines(n.itl_histogram, request)
            out += self.e2e.lines(n.e2e_histogram, request)
        return out


class EngineState:
    def __init__(self, model: str, mode: str, engine: str, chunk_delay: float, *, seed: int = 0,
                 tool_invalid_rate: float = 0.0, runaway_rate: float = 0.0, max_model_len: int = 262_144,
                 report_max_model_len: bool = True, first_token_delay: float = 0.0,
                 release: str | None = None, stale_release: str | None = None, stale_every: int = 0,
                 hang_after: int = 0, hang_file: str | None = None, empty_call_rate: float = 0.2,
                 max_running: int = 0, kv_capacity_tokens: int = 65_536, pace_content_only: bool = False):
        self.model = model
        self.pace_content_only = pace_content_only
        self.metrics = EngineMetrics(engine, model, max_running, kv_capacity_tokens)
        # vllm #54701's share of broken streams while enough streams are in flight
        self.empty_call_rate = empty_call_rate
        self.active_streams = 0
        self.most_streams_in_flight = 0
        # Breaks after admission: generations after the first `hang_after` hang (0: never).
        self.hang_after = hang_after
        # Breaks when a test says so: generations hang while this file exists.
        self.hang_file = hang_file
        # Stands in for the proxy's release stamp; every `stale_every`-th answer comes from a replica
        # still on `stale_release` (a rollout that has not finished).
        self.release = release
        self.stale_release = stale_release
        self.stale_every = stale_every
        self.answers_stamped = 0
        self.mode = mode
        self.engine = engine
        self.chunk_delay = chunk_delay
        self.seed = seed
        self.tool_invalid_rate = tool_invalid_rate
        self.runaway_rate = runaway_rate
        self.max_model_len = max_model_len
        self.report_max_model_len = report_max_model_len
        self.first_token_delay = first_token_delay
        self.stopping = threading.Event()
        self.requests_total = 0
        self.completions_total = 0
        self.streams_total = 0
        self.draws: dict[str, int] = {}
        self.lock = threading.Lock()

    def rng_for(self, kind: str) -> random.Random:
        """The k-th request of a kind gets the k-th draw of the seed, whatever order concurrent
        requests arrive in: a seeded run's outcomes do not depend on scheduling."""
        with self.lock:
            index = self.draws[kind] = self.draws.get(kind, 0) + 1
        return random.Random(f"{self.seed}:{kind}:{index}")

    def empty_calls_strike(self, in_flight: int) -> bool:
        """vllm #54701 strikes a share of tool-call streams, only while enough streams are in flight."""
        if self.mode != "empty-stream-tool-calls" or in_flight < EMPTY_CALL_MIN_STREAMS:
            return False
        return self.rng_for("empty-stream-call").random() < self.empty_call_rate

    def greedy_rng(self, request: dict) -> random.Random:
        """Temperature 0 is greedy decoding: the same request gets the same answer, streamed or not."""
        key = json.dumps([request.get(k) for k in ("messages", "tools", "tool_choice", "chat_template_kwargs",
                                                  "max_tokens")], sort_keys=True)
        return random.Random(f"{self.seed}:greedy:{key}")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "EngineServer"

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    def end_headers(self):
        state = self.server.state
        if state.release:
            with state.lock:
                state.answers_stamped += 1
                stale = state.stale_every and state.answers_stamped % state.stale_every == 0
            self.send_header("X-Kimi-Fleet-Release", state.stale_release if stale else state.release)
        super().end_headers()

    @property
    def state(self) -> EngineState:
        return self.server.state

    # --- routing -------------------------------------------------------------------------

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send_json(200, {})
        elif path == "/health_generate" and self.state.engine == "sglang":
            if self.state.mode == "dead-scheduler":
                self._hang()
            else:
                self._send_json(200, {})
        elif path == "/v1/models":
            served = self.state.model
            if self.state.mode == "missing-model":
                served = "some-other-model"
            entry = {"id": served, "object": "model", "owned_by": "fake"}
            if self.state.report_max_model_len:
                entry["max_model_len"] = self.state.max_model_len
            self._send_json(200, {"object": "list", "data": [entry]})
        elif path == "/metrics":
            lines = [f"fake_engine_requests_total {self.state.requests_total}",
                     f"fake_engine_streams_in_flight_max {self.state.most_streams_in_flight}",
                     *self.state.metrics.exposition()]
            body = ("\n".join(lines) + "\n").encode()
            self._send_bytes(200, body, "text/plain; version=0.0.4")
        else:
            self._send_json(404, {"error": {"message": f"no route {path}"}})

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        length = int(self.headers.get("Content-Length") or 0)
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._send_json(400, {"error": {"message": "body is not JSON"}})
            return
        if path != "/v1/chat/completions":
            self._send_json(404, {"error": {"message": f"no route {path}"}})
            return
        started = time.monotonic()
        with self.state.lock:
            self.state.requests_total += 1
            self.state.completions_total += 1
            completion_number = self.state.completions_total
        if (self.state.mode == "dead-scheduler" or (self.state.hang_after and completion_number > self.state.hang_after)
                or (self.state.hang_file and os.path.exists(self.state.hang_file))):
            self.state.metrics.admit(0)  # a hung generation runs and makes no token: a stalled engine
            self._hang()
            return
        if self.state.mode == "server-error" and completion_number == 3:
            self._send_json(500, {"error": {"message": "CUDA error: an illegal memory access was encountered"}})
            return
        if request.get("model") != self.state.model:
            self._send_json(404, {"error": {"message": f"model {request.get('model')!r} not found"}})
            return
        unmatched = unmatched_tool_result(request.get("messages") or [])
        if unmatched:
            # What OpenAI's API answers; engines render it anyway, and the model cannot tell which call it answers.
            self._send_json(400, {"object": "error", "type": "BadRequestError", "code": 400,
                                  "message": f"tool message tool_call_id {unmatched!r} matches no earlier tool call"})
            return
        prompt_tokens = count_prompt_tokens(request.get("messages") or [])
        completion_tokens = int(request.get("max_tokens") or 0)
        if prompt_tokens + completion_tokens > self.state.max_model_len:
            message = CONTEXT_ERROR.format(limit=self.state.max_model_len, total=prompt_tokens + completion_tokens,
                                           prompt=prompt_tokens, completion=completion_tokens)
            self._send_json(400, {"object": "error", "message": message, "type": "BadRequestError", "code": 400})
            return
        reply = compose_reply(request, self.state)
        reply.prompt_tokens = prompt_tokens
        answered_model = "kimi-k2" if self.state.mode == "wrong-model-in-response" else self.state.model
        metrics = self.state.metrics
        metrics.admit(prompt_tokens)
        generated, reason = 0, "length" if reply.finish_reason == "length" else "stop"
        try:
            if request.get("stream"):
                if self.state.mode == "drops-long-streamed-call" and any(
                        len(call["arguments"]) > LONG_STREAMED_ARGUMENT_CHARS for call in reply.tool_calls):
                    reply.tool_calls, reply.finish_override = [], "stop"
                generated, completed = self._stream(request, reply, answered_model, started)
                reason = reason if completed else "abort"
            else:
                body = completion_body(answered_model, reply)
                generated = body["usage"]["completion_tokens"]
                metrics.tokens(generated)
                metrics.observe_ttft(time.monotonic() - started)
                self._send_json(200, body)
        finally:
            metrics.finish(started, prompt_tokens + generated, reason, generated)

    # --- responses -----------------------------------------------------------------------

    def _send_bytes(self, status: int, body: bytes, content_type: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, payload):
        self._send_bytes(status, json.dumps(payload).encode(), "application/json")

    def _hang(self):
        # A dead scheduler accepts the request and never answers.
        self.close_connection = True
        self.state.stopping.wait()

    def _stream(self, request: dict, reply: "Reply", model: str, started: float) -> tuple[int, bool]:
        """Stream the reply; (tokens sent, whether the stream completed)."""
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        chunks = stream_chunks(model, reply, request, repeat_tool_name=self.state.mode == "repeat-tool-name",
                               completion_id=completion_id)
        frames = _frames(chunks)
        # frames 1..token_frames carry one token each (then the finish chunk, usage, [DONE])
        token_frames = sum(1 for c in chunks[1:] if c["choices"] and c["choices"][0]["delta"])
        metrics, sent, last_token = self.state.metrics, 0, started
        completed = False
        # vllm #54701: the same stream with every tool_calls delta emptied, sent when the bug strikes
        emptied = _frames(stream_chunks(model, reply, request, empty_tool_calls=True, completion_id=completion_id))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with self.state.lock:
            self.state.active_streams += 1
            self.state.most_streams_in_flight = max(self.state.most_streams_in_flight, self.state.active_streams)
        try:
            with self.state.lock:
                self.state.streams_total += 1
                first_stream = self.state.streams_total == 1
            pauses = _pauses(chunks, len(frames), content_only=self.state.pace_content_only)
            if self.state.mode == "buffered-stream" or (self.state.mode == "buffered-once" and first_stream):
                time.sleep(self.state.chunk_delay * sum(pauses))
                self.wfile.write(b"".join(_http_chunk(frame) for frame in frames))
                metrics.tokens(token_frames)
                metrics.observe_ttft(time.monotonic() - started)
                sent = token_frames
            else:
                for index in range(len(frames)):
                    if index == 1:
                        time.sleep(self.state.first_token_delay)
                    if pauses[index]:
                        time.sleep(self.state.chunk_delay)
                    if index == 1 and reply.tool_calls and self._empty_calls_strike():
                        frames = emptied
                    self.wfile.write(_http_chunk(frames[index]))
                    self.wfile.flush()
                    if 1 <= index <= token_frames:
                        now = time.monotonic()
                        metrics.tokens(1)
                        if index == 1:
                            metrics.observe_ttft(now - started)
                        else:
                            metrics.observe_itl(now - last_token)
                        last_token, sent = now, sent + 1
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            completed = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            with self.state.lock:
                self.state.active_streams -= 1
        return sent, completed

    def _empty_calls_strike(self) -> bool:
        with self.state.lock:
            in_flight = self.state.active_streams
        return self.state.empty_calls_strike(in_flight)


def _frames(chunks: list[dict]) -> list[bytes]:
    return [f"data: {event}\n\n".encode() for event in [*map(json.dumps, chunks), "[DONE]"]]


def _pauses(chunks: list[dict], frames: int, *, content_only: bool = False) -> list[bool]:
    """Whether frame i waits one chunk delay before it is sent: every frame after the first, except
    a long call's argument frames past PACED_ARGUMENT_FRAMES, of which one in ARGUMENT_FRAMES_PER_PAUSE.
    `content_only`: reasoning and tool-call frames are not paced at all (only the streaming check
    times arrivals, and it times content)."""
    pauses, pieces = [False] * frames, {}
    for index in range(1, frames):
        delta = chunks[index]["choices"][0]["delta"] if index < len(chunks) and chunks[index]["choices"] else {}
        calls = delta.get("tool_calls") or []
        if content_only and ("tool_calls" in delta or "reasoning_content" in delta):
            pauses[index] = False
        elif calls and (calls[0].get("function") or {}).get("arguments"):
            seen = pieces[calls[0]["index"]] = pieces.get(calls[0]["index"], 0) + 1
            pauses[index] = seen <= PACED_ARGUMENT_FRAMES or (seen - PACED_ARGUMENT_FRAMES) % ARGUMENT_FRAMES_PER_PAUSE == 0
        else:
            pauses[index] = True
    return pauses


def _http_chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


# --- what the "model" answers ------------------------------------------------------------


class Reply:
    def __init__(self, content: str | None, reasoning: str | None, tool_calls: list[dict], ran_away: bool = False):
        self.content = content
        self.reasoning = reasoning
        self.tool_calls = tool_calls
        self.ran_away = ran_away
        self.prompt_tokens = 0
        #: max_tokens cut the (last) call: streams carry what was generated, a non-streamed answer
        #: drops the unterminated call (the parser finds no complete one), both finish "length"
        self.cut_call = False
        #: the finish a broken engine reports instead of the honest one
        self.finish_override: str | None = None

    @property
    def finish_reason(self) -> str:
        if self.finish_override:
            return self.finish_override
        if self.ran_away or self.cut_call:
            return "length"
        return "tool_calls" if self.tool_calls else "stop"

    @property
    def complete_calls(self) -> list[dict]:
        return self.tool_calls[:-1] if self.cut_call else self.tool_calls


def count_prompt_tokens(messages: list[dict]) -> int:
    """One token per whitespace-separated word, a fixed cost per image, the template's overhead."""
    tokens = PROMPT_OVERHEAD_TOKENS
    for message in messages:
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for part in parts:
            if part.get("type") == "text":
                tokens += len((part.get("text") or "").split())
            elif part.get("type") == "image_url":
                tokens += IMAGE_TOKENS
    return tokens


def _request_kind(request: dict, thinking: bool, images: list[str]) -> str:
    choice = request.get("tool_choice", "auto")
    if request.get("tools"):
        return f"tools:{'forced' if isinstance(choice, dict) else choice}:{'stream' if request.get('stream') else 'plain'}"
    return f"{'vision' if images else 'text'}:{'thinking' if thinking else 'instant'}"


def compose_reply(request: dict, state: EngineState) -> Reply:
    mode = state.mode
    kwargs = request.get("chat_template_kwargs") or {}
    thinking = bool(kwargs.get("thinking", kwargs.get("enable_thinking", True)))
    prompt, images = _last_user_message(request.get("messages") or [])
    greedy = request.get("temperature") == 0
    rng = state.greedy_rng(request) if greedy else state.rng_for(_request_kind(request, thinking, images))
    tool_result = _tool_result(request.get("messages") or [])
    if tool_result is not None:
        # The turn after a tool ran: answer from its result, as an agent's model does.
        content = ANSWER_TEXT if mode == "ignores-tool-result" else f"According to the tool: {tool_result}"
        return Reply(content, REASONING_TEXT if thinking else None, [])

    if thinking and not request.get("tools") and rng.random() < state.runaway_rate:
        # Thinking that never reaches an answer before max_tokens: reasoning only, finish "length".
        return Reply(None, REASONING_TEXT * 3, [], ran_away=True)
    tool_calls = _tool_calls(request, prompt, mode, rng, state.tool_invalid_rate)
    if mode == "raw-tool-markers" and tool_calls:
        call = tool_calls[0]
        content = f"{RAW_TOOL_MARKERS}{call['arguments']}<|tool_call_end|><|tool_calls_section_end|>"
        return Reply(content, REASONING_TEXT if thinking else None, [])
    if mode == "no-forced-call" and isinstance(request.get("tool_choice"), dict):
        tool_calls = []
    if tool_calls:
        content = None
    elif images:
        color = dominant_color(images[0])
        content = f"The image is a solid {color} square."
    else:
        content = ANSWER_TEXT
    reasoning = REASONING_TEXT if thinking or mode == "reasoning-in-instant" else None
    if tool_calls:
        return _cut_to_max_tokens(Reply(None, reasoning, tool_calls), request, mode)
    if images and reasoning:
        reasoning += f" The pixels all look {dominant_color(images[0])}."
    if images and mode == "vision-in-reasoning":
        content = "It is a plain square filled with a single uniform color."
    if mode == "leaky-thinking" and reasoning:
        content = f"<think>{reasoning}</think>{content or ''}"
        reasoning = None
    if mode == "no-reasoning-field":
        reasoning = None
    return Reply(content, reasoning, tool_calls)


def unmatched_tool_result(messages: list[dict]) -> str | None:
    """The tool_call_id of a tool message that answers no earlier assistant call (None: all match)."""
    called: set[str] = set()
    for message in messages:
        if message.get("role") == "assistant":
            called |= {call.get("id") for call in message.get("tool_calls") or []}
        elif message.get("role") == "tool" and message.get("tool_call_id") not in called:
            return str(message.get("tool_call_id"))
    return None


def _tool_result(messages: list[dict]) -> str | None:
    """The tool result the conversation ends with (a role "tool" message after the last user one)."""
    if messages and messages[-1].get("role") == "tool":
        content = messages[-1].get("content")
        return content if isinstance(content, str) else json.dumps(content)
    return None


def _cut_to_max_tokens(reply: Reply, request: dict, mode: str) -> Reply:
    """Tool calls longer than max_tokens are cut inside their arguments (8 characters a token, the
    name one), like a real engine; silent-truncation then drops the call and reports a stop."""
    budget = int(request.get("max_tokens") or 0) or 1 << 30
    budget -= len(_words(reply.reasoning))
    for index, call in enumerate(reply.tool_calls):
        needed = 1 + -(-len(call["arguments"]) // ARGUMENT_CHARS_PER_TOKEN)
        if needed > budget:
            cut = {**call, "arguments": call["arguments"][: max(0, budget - 1) * ARGUMENT_CHARS_PER_TOKEN]}
            reply.tool_calls = reply.tool_calls[:index] + [cut]
            reply.cut_call = True
            if mode == "silent-truncation":
                reply.tool_calls, reply.cut_call, reply.finish_override = reply.tool_calls[:index], False, "stop"
            break
        budget -= needed
    return reply


def _last_user_message(messages: list[dict]) -> tuple[str, list[str]]:
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content, []
        texts, images = [], []
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                images.append(part["image_url"]["url"])
        return " ".join(texts), images
    return "", []


def _tool_calls(request: dict, prompt: str, mode: str, rng: random.Random, invalid_rate: float) -> list[dict]:
    tools = {t["function"]["name"]: t["function"] for t in request.get("tools") or []}
    choice = request.get("tool_choice", "auto")
    if not tools or choice == "none":
        return []
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        calls = [(name, _cities(prompt)[:1])]
    else:  # the tool the prompt names, else the first
        name = next((tool for tool in tools if tool in prompt), next(iter(tools)))
        cities = _cities(prompt)
        calls = [(name, [city]) for city in cities] if len(cities) > 1 else [(name, cities)]
    result = []
    document = DOCUMENT.search(prompt)
    for name, cities in calls:
        arguments = fill_arguments(tools[name].get("parameters") or {}, cities[0] if cities else None,
                                   document.group(1) if document else None)
        if mode == "schema-invalid-tool":
            required = (tools[name].get("parameters") or {}).get("required", [])
            arguments = {k: v for k, v in arguments.items() if k not in required}
        text = json.dumps(arguments)
        invalid = rng.random() < invalid_rate
        if mode == "bad-tool-json" or invalid and rng.random() < 0.5:
            text = text.replace('"', "'")[:-1]
        elif invalid:
            text = json.dumps({k: v for k, v in arguments.items() if k != "unit"})
        result.append({"id": f"call_{uuid.uuid4().hex[:12]}", "name": name, "arguments": text})
    return result


def _cities(prompt: str) -> list[str]:
    return re.findall(r"\bin ([A-Z][a-zA-Z]+)", prompt)


def fill_arguments(schema: dict, city: str | None, document: str | None = None) -> dict:
    """Arguments that satisfy the schema: every required property, enums take their first value, a
    `text` property copies the prompt's <document> when it has one."""
    properties = schema.get("properties", {})
    arguments = {}
    for key in schema.get("required", list(properties)):
        arguments[key] = _value_for(key, properties.get(key, {}), city, document)
    return arguments


def _value_for(key: str, schema: dict, city: str | None, document: str | None = None):
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "string")
    if kind == "string":
        if key == "text" and document is not None:
            return document
        return city if city and key in ("city", "location") else "example"
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.0
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return fill_arguments(schema, city, document)
    return None


def dominant_color(data_url: str) -> str:
    """Name of the named color nearest to the image's mean pixel (8-bit RGB/RGBA, no filters)."""
    try:
        width, height, pixels = _decode_png(base64.b64decode(data_url.split(",", 1)[1]))
    except (ValueError, IndexError, zlib.error, struct.error):
        return "unreadable"
    channels = len(pixels) // (width * height)
    count = width * height
    mean = [sum(pixels[c::channels]) / count for c in range(3)]
    return min(
        NAMED_COLORS,
        key=lambda name: sum((a - b) ** 2 for a, b in zip(mean, NAMED_COLORS[name])),
    )


def _decode_png(data: bytes) -> tuple[int, int, bytes]:
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not a PNG")
    offset, idat = 8, b""
    width = height = 0
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color_type = struct.unpack(">IIBB", body[:10])
            if depth != 8 or color_type not in (2, 6):
                raise ValueError("only 8-bit RGB/RGBA is supported")
            channels = 3 if color_type == 2 else 4
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows = []
    for row in range(height):
        start = row * (stride + 1)
        if raw[start] != 0:
            raise ValueError("only unfiltered scanlines are supported")
        rows.append(raw[start + 1 : start + 1 + stride])
    return width, height, b"".join(rows)


# --- wire formats ------------------------------------------------------------------------


def completion_body(model: str, reply: Reply) -> dict:
    message = {"role": "assistant", "content": reply.content}
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    if reply.complete_calls:
        message["tool_calls"] = [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]},
            }
            for call in reply.complete_calls
        ]
    tokens = len(_words(reply.reasoning)) + len(_words(reply.content)) + sum(
        1 + -(-len(call["arguments"]) // ARGUMENT_CHARS_PER_TOKEN) for call in reply.tool_calls)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
        "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": tokens,
                  "total_tokens": tokens + reply.prompt_tokens},
    }


def stream_chunks(model: str, reply: Reply, request: dict, *, repeat_tool_name: bool = False,
                  empty_tool_calls: bool = False, completion_id: str | None = None) -> list[dict]:
    """`empty_tool_calls`: every tool_calls delta carries nothing (vllm #54701)."""
    completion_id = completion_id or f"chatcmpl-{uuid.uuid4().hex}"

    def chunk(delta: dict, finish_reason=None) -> dict:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    chunks = [chunk({"role": "assistant", "content": ""})]
    tokens = 0
    for word in _words(reply.reasoning):
        chunks.append(chunk({"reasoning_content": word}))
        tokens += 1
    for word in _words(reply.content):
        chunks.append(chunk({"content": word}))
        tokens += 1
    for index, call in enumerate(reply.tool_calls):
        head = {"index": index, "id": call["id"], "type": "function"}
        chunks.append(chunk({"tool_calls": [] if empty_tool_calls else
                             [head | {"function": {"name": call["name"], "arguments": ""}}]}))
        tokens += 1
        text = call["arguments"]
        for start in range(0, len(text), ARGUMENT_CHARS_PER_TOKEN):
            piece = {"index": index, "function": {"arguments": text[start : start + ARGUMENT_CHARS_PER_TOKEN]}}
            if repeat_tool_name:
                piece["function"]["name"] = call["name"]
            chunks.append(chunk({"tool_calls": [] if empty_tool_calls else [piece]}))
            tokens += 1
    chunks.append(chunk({}, reply.finish_reason))
    if (request.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": tokens,
                 "total_tokens": tokens + reply.prompt_tokens}
        chunks.append(chunk({}) | {"choices": [], "usage": usage})
    return chunks


def _words(text: str | None) -> list[str]:
    """Split into token-like pieces that concatenate back to the text."""
    return re.findall(r"\S+\s*|\s+", text) if text else []


class EngineServer(ThreadingHTTPServer):
    daemon_threads = True
    # Load tests open hundreds of connections at once; the stdlib default backlog is 5.
    request_queue_size = 1024

    def __init__(self, address, state: EngineState):
        super().__init__(address, Handler)
        self.state = state


def options_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", default="kimi-k2.6")
    parser.add_argument("--mode", choices=sorted(MODES), default="good")
    parser.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    parser.add_argument("--chunk-delay", type=float, default=0.02, help="seconds between SSE chunks")
    parser.add_argument("--first-token-delay", type=float, default=0.0, help="extra seconds before the first chunk")
    parser.add_argument("--seed", type=int, default=0, help="seeds the error draws below")
    parser.add_argument("--tool-invalid-rate", type=float, default=0.0, help="share of tool calls made invalid")
    parser.add_argument("--runaway-rate", type=float, default=0.0,
                        help="share of thinking answers that run out of tokens before any content")
    parser.add_argument("--max-model-len", type=int, default=262_144, help="context the engine serves")
    parser.add_argument("--hide-max-model-len", action="store_true", help="leave max_model_len out of /v1/models")
    parser.add_argument("--release", help="stamp answers with this release id, as the proxy does")
    parser.add_argument("--stale-release", help="the release an unrefreshed replica still serves")
    parser.add_argument("--stale-every", type=int, default=0, help="every N-th answer comes from --stale-release")
    parser.add_argument("--hang-after", type=int, default=0, help="generations after the N-th hang (0: never)")
    parser.add_argument("--hang-file", help="generations hang while this file exists")
    parser.add_argument("--max-running", type=int, default=0,
                        help="requests generated at once; more wait in the queue (0: no limit)")
    parser.add_argument("--kv-capacity-tokens", type=int, default=65_536,
                        help="KV cache size in tokens: its use is the tokens in flight over this")
    parser.add_argument("--empty-call-rate", type=float, default=0.2,
                        help="empty-stream-tool-calls: share of tool-call streams emptied while >= 6 are in flight")
    parser.add_argument("--pace-content-only", action="store_true",
                        help="pace only content frames (and the stream's end): reasoning and tool calls flow at once")
    return parser


def state_from_options(argv: list[str] | None = None) -> tuple[argparse.Namespace, EngineState]:
    """The engine's state from its command line (also for tests/fakes/inprocess_engine.py)."""
    args = options_parser().parse_args(argv)
    state = EngineState(args.model, args.mode, args.engine, args.chunk_delay, seed=args.seed,
                        tool_invalid_rate=args.tool_invalid_rate, runaway_rate=args.runaway_rate,
                        max_model_len=args.max_model_len, report_max_model_len=not args.hide_max_model_len,
                        first_token_delay=args.first_token_delay, release=args.release,
                        stale_release=args.stale_release, stale_every=args.stale_every, hang_after=args.hang_after,
                        hang_file=args.hang_file, empty_call_rate=args.empty_call_rate,
                        max_running=args.max_running, kv_capacity_tokens=args.kv_capacity_tokens,
                        pace_content_only=args.pace_content_only)
    return args, state


def main(argv: list[str] | None = None) -> int:
    args, state = state_from_options(argv)
    server = EngineServer((args.host, args.port), state)
    print(f"listening on {args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        state.stopping.set()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
