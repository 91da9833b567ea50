"""A fake OpenAI-compatible Kimi-K2.6 engine (stdlib only) for testing the proxy and the verifier.

    python tests/fakes/fake_engine.py --port 0 --model kimi-k2.6 --mode good [--engine sglang]

Prints "listening on 127.0.0.1:PORT" once it accepts connections. Like the real engines it does
no authentication: the proxy in front of it does. Each non-good mode breaks exactly one thing.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import struct
import sys
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = {
    "good": "behaves like a correctly configured engine",
    "no-auth": "same as good; shows that an engine reached without the proxy has no auth",
    "bad-tool-json": "tool call arguments are not JSON",
    "schema-invalid-tool": "tool call arguments are JSON but omit the schema's required properties",
    "vision-in-reasoning": "the image's color appears only in reasoning_content",
    "buffered-stream": "streams are computed, held back, then written in one burst",
    "dead-scheduler": "/health is 200 but every generation hangs",
    "missing-model": "/v1/models lists a different name",
    "leaky-thinking": "no reasoning field: reasoning is left in content inside <think> tags",
    "reasoning-in-instant": "instant mode still returns reasoning_content",
}

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


class EngineState:
    def __init__(self, model: str, mode: str, engine: str, chunk_delay: float):
        self.model = model
        self.mode = mode
        self.engine = engine
        self.chunk_delay = chunk_delay
        self.stopping = threading.Event()
        self.requests_total = 0
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "EngineServer"

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

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
            self._send_json(
                200,
                {"object": "list", "data": [{"id": served, "object": "model", "owned_by": "fake"}]},
            )
        elif path == "/metrics":
            body = f"fake_engine_requests_total {self.state.requests_total}\n".encode()
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
        with self.state.lock:
            self.state.requests_total += 1
        if self.state.mode == "dead-scheduler":
            self._hang()
            return
        if request.get("model") != self.state.model:
            self._send_json(404, {"error": {"message": f"model {request.get('model')!r} not found"}})
            return
        reply = compose_reply(request, self.state.mode)
        if request.get("stream"):
            self._stream(request, reply)
        else:
            self._send_json(200, completion_body(self.state.model, reply))

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

    def _stream(self, request: dict, reply: "Reply"):
        events = [json.dumps(chunk) for chunk in stream_chunks(self.state.model, reply, request)]
        events.append("[DONE]")
        frames = [f"data: {event}\n\n".encode() for event in events]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if self.state.mode == "buffered-stream":
                time.sleep(self.state.chunk_delay * len(frames))
                self.wfile.write(b"".join(_http_chunk(frame) for frame in frames))
            else:
                for index, frame in enumerate(frames):
                    if index:
                        time.sleep(self.state.chunk_delay)
                    self.wfile.write(_http_chunk(frame))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _http_chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


# --- what the "model" answers ------------------------------------------------------------


class Reply:
    def __init__(self, content: str | None, reasoning: str | None, tool_calls: list[dict]):
        self.content = content
        self.reasoning = reasoning
        self.tool_calls = tool_calls

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"


def compose_reply(request: dict, mode: str) -> Reply:
    kwargs = request.get("chat_template_kwargs") or {}
    thinking = bool(kwargs.get("thinking", kwargs.get("enable_thinking", True)))
    prompt, images = _last_user_message(request.get("messages") or [])

    tool_calls = _tool_calls(request, prompt, mode)
    if tool_calls:
        content = None
    elif images:
        color = dominant_color(images[0])
        content = f"The image is a solid {color} square."
    else:
        content = ANSWER_TEXT
    reasoning = REASONING_TEXT if thinking or mode == "reasoning-in-instant" else None
    if images and reasoning:
        reasoning += f" The pixels all look {dominant_color(images[0])}."
    if images and mode == "vision-in-reasoning":
        content = "It is a plain square filled with a single uniform color."
    if mode == "leaky-thinking" and reasoning:
        content = f"<think>{reasoning}</think>{content or ''}"
        reasoning = None
    return Reply(content, reasoning, tool_calls)


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


def _tool_calls(request: dict, prompt: str, mode: str) -> list[dict]:
    tools = {t["function"]["name"]: t["function"] for t in request.get("tools") or []}
    choice = request.get("tool_choice", "auto")
    if not tools or choice == "none":
        return []
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        calls = [(name, _cities(prompt)[:1])]
    else:
        name = next(iter(tools))
        cities = _cities(prompt)
        calls = [(name, [city]) for city in cities] if len(cities) > 1 else [(name, cities)]
    result = []
    for name, cities in calls:
        arguments = fill_arguments(tools[name].get("parameters") or {}, cities[0] if cities else None)
        if mode == "schema-invalid-tool":
            required = (tools[name].get("parameters") or {}).get("required", [])
            arguments = {k: v for k, v in arguments.items() if k not in required}
        text = json.dumps(arguments)
        if mode == "bad-tool-json":
            text = text.replace('"', "'")[:-1]
        result.append({"id": f"call_{uuid.uuid4().hex[:12]}", "name": name, "arguments": text})
    return result


def _cities(prompt: str) -> list[str]:
    return re.findall(r"\bin ([A-Z][a-zA-Z]+)", prompt)


def fill_arguments(schema: dict, city: str | None) -> dict:
    """Arguments that satisfy the schema: every required property, enums take their first value."""
    properties = schema.get("properties", {})
    arguments = {}
    for key in schema.get("required", list(properties)):
        arguments[key] = _value_for(key, properties.get(key, {}), city)
    return arguments


def _value_for(key: str, schema: dict, city: str | None):
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "string")
    if kind == "string":
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
        return fill_arguments(schema, city)
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
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]},
            }
            for call in reply.tool_calls
        ]
    tokens = len(_words(reply.reasoning)) + len(_words(reply.content))
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
        "usage": {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": tokens + 10},
    }


def stream_chunks(model: str, reply: Reply, request: dict) -> list[dict]:
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"

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
        chunks.append(chunk({"tool_calls": [head | {"function": {"name": call["name"], "arguments": ""}}]}))
        text = call["arguments"]
        for start in range(0, len(text), 8):
            piece = {"index": index, "function": {"arguments": text[start : start + 8]}}
            chunks.append(chunk({"tool_calls": [piece]}))
            tokens += 1
    chunks.append(chunk({}, reply.finish_reason))
    if (request.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": tokens + 10}
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", default="kimi-k2.6")
    parser.add_argument("--mode", choices=sorted(MODES), default="good")
    parser.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    parser.add_argument("--chunk-delay", type=float, default=0.02, help="seconds between SSE chunks")
    args = parser.parse_args(argv)

    state = EngineState(args.model, args.mode, args.engine, args.chunk_delay)
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
