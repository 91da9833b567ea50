"""HTTP plumbing shared by the checks: the endpoint, authenticated requests and SSE streams."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import ssl
import time
from dataclasses import dataclass, field

import httpx

#: Kimi's raw tool-call markers: in `content` they mean the engine's tool-call parser is off.
RAW_TOOL_MARKERS = ("<|tool_calls_section_begin|>", "<|tool_call_begin|>", "<|tool_call_argument_begin|>")
#: Room left for the prompt (text, chat template, a small image) when sizing max_tokens to the context.
PROMPT_ALLOWANCE_TOKENS = 1024
#: seconds for the health route and its tiny completion: a hung engine fails the gate fast
HEALTH_TIMEOUT = 30.0


class CheckFailed(Exception):
    """Raised inside a check to fail it with a one-line reason (and optional details)."""

    def __init__(self, reason: str, **details):
        super().__init__(reason)
        self.reason = reason
        self.details = details


@dataclass
class Endpoint:
    base_url: str  # OpenAI base, ends with /v1
    api_key: str
    model: str
    engine: str
    timeout: float
    verify: bool | str  # True: system CAs, False: no verification, str: a CA bundle (PEM)
    load: int = 0
    #: the context the stack promises (tokens); None: not checked
    context: int | None = None
    #: sampled requests in flight at once (the stack's concurrent sequences): more would only queue
    concurrency: int = 16
    health_timeout: float = HEALTH_TIMEOUT
    #: what /v1/models reports for the served name (filled by the runner before the checks)
    max_model_len: int | None = None
    #: the engine release the stack pins (e.g. "0.19.1"): a failure naming a known bug's symptom says
    #: whether this release is affected (kimi_fleet.engine_bugs); None: not told
    engine_release: str | None = None
    #: during a key rotation, the previous key: the endpoint must accept it too (None: not checked)
    previous_api_key: str | None = field(default=None, repr=False)
    _slots: asyncio.Semaphore | None = field(default=None, repr=False)

    def max_tokens(self, wanted: int) -> int:
        """`wanted`, or less so that prompt + completion fit the context the endpoint serves."""
        limits = [wanted]
        for served in (self.max_model_len, self.context):
            if served:
                limits.append(max(16, served - PROMPT_ALLOWANCE_TOKENS))
        return min(limits)

    def slot(self):
        """Hold one of `concurrency` request slots (created in the running event loop)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        return self._slots

    @property
    def root_url(self) -> str:
        """Where the engine's own routes (/health, /health_generate) live."""
        return self.base_url[: -len("/v1")]

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def ssl_context(self) -> ssl.SSLContext | bool:
        if self.verify is False:
            return False
        if self.verify is True:
            return _verifying_context(None, None)
        try:  # a bundle rewritten in place (same path) gets a fresh context
            stat = os.stat(self.verify)
            version = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            version = None  # create_default_context raises as it always did
        return _verifying_context(self.verify, version)


@functools.lru_cache(maxsize=32)
def _verifying_context(cafile: str | None, version: tuple | None) -> ssl.SSLContext:
    """One verifying context per CA bundle (and version of it) per process: building one loads the
    whole bundle (~40 ms), and a gate's statistics runs the suite hundreds of times. A context is
    never modified after this, so the runs may share it."""
    return ssl.create_default_context(cafile=cafile)


def open_client(endpoint: Endpoint, on_response=None) -> httpx.AsyncClient:
    """`on_response`: an async hook called with every response (the release watch)."""
    # One connection per concurrent stream under --load; keep headroom for the other checks.
    connections = max(100, endpoint.load + 32)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(endpoint.timeout),
        verify=endpoint.ssl_context(),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        event_hooks={"response": [on_response]} if on_response else None,
    )


async def gather_all(*coroutines):
    """Run concurrently; on the first failure cancel the siblings (no stray requests) and raise it."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def _error_snippet(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:200] + ("..." if len(text) > 200 else "")


def check_plumbing(endpoint: Endpoint, answered_model: str | None, content: str, where: str) -> None:
    """Faults of configuration, not of the model: one occurrence fails the check."""
    if answered_model and answered_model != endpoint.model:
        raise CheckFailed(f"{where}: the response names model {answered_model!r}, asked for {endpoint.model!r}")
    if "<think>" in content or "</think>" in content:
        raise CheckFailed(f"{where}: reasoning leaked into content as <think> tags (reasoning parser off?)",
                          content=content[:200])
    marker = next((m for m in RAW_TOOL_MARKERS if m in content), None)
    if marker:
        raise CheckFailed(f"{where}: raw tool-call marker {marker} in content (tool-call parser off? "
                          "needs --tool-call-parser kimi_k2 and, on vLLM, --enable-auto-tool-choice)",
                          content=content[:200])


async def chat(client: httpx.AsyncClient, endpoint: Endpoint, body: dict, *, timeout: float | None = None) -> dict:
    """Non-streaming chat completion; returns the first choice's message plus finish_reason and usage."""
    async with endpoint.slot():
        response = await client.post(
            f"{endpoint.base_url}/chat/completions",
            json={"model": endpoint.model, **body},
            headers=endpoint.auth_headers,
            timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
    if response.status_code != 200:
        raise CheckFailed(f"chat completion got HTTP {response.status_code}: {_error_snippet(response)}")
    payload = response.json()
    choices = payload.get("choices") or []
    if not choices:
        raise CheckFailed("chat completion returned no choices", response=payload)
    message = choices[0].get("message") or {}
    check_plumbing(endpoint, payload.get("model"), message.get("content") or "", "chat completion")
    return {**message, "finish_reason": choices[0].get("finish_reason"), "usage": payload.get("usage") or {}}


def reasoning_of(message: dict) -> str:
    """Engines name the separated reasoning `reasoning_content` (some vLLM versions: `reasoning`)."""
    return message.get("reasoning_content") or message.get("reasoning") or ""


@dataclass
class StreamedChat:
    started: float  # perf_counter when the request was sent
    model: str | None = None  # the model the chunks name
    content: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    done: bool = False  # saw `data: [DONE]`
    usage: dict | None = None
    content_times: list[float] = field(default_factory=list)  # arrival of content-bearing chunks
    token_times: list[float] = field(default_factory=list)  # arrival of content/reasoning/tool chunks
    tool_calls: dict[int, dict] = field(default_factory=dict)  # index -> {id, name, arguments}
    #: tool_calls deltas that carried nothing (an empty list, or entries without name and arguments):
    #: the wire signature of vllm #54701
    empty_tool_deltas: int = 0

    @property
    def output_tokens(self) -> int:
        """Engine-reported completion tokens when usage was streamed, else one per chunk."""
        if self.usage and self.usage.get("completion_tokens"):
            return int(self.usage["completion_tokens"])
        return len(self.token_times)

    def add(self, chunk: dict, arrived: float) -> None:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        self.model = chunk.get("model") or self.model
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            carries_tokens = False
            if delta.get("content"):
                self.content += delta["content"]
                self.content_times.append(arrived)
                carries_tokens = True
            reasoning = reasoning_of(delta)
            if reasoning:
                self.reasoning += reasoning
                carries_tokens = True
            if delta.get("tool_calls") is not None and not any(
                (c.get("function") or {}).get("name") or (c.get("function") or {}).get("arguments")
                for c in delta.get("tool_calls") or []
            ):
                self.empty_tool_deltas += 1
            for call in delta.get("tool_calls") or []:
                slot = self.tool_calls.setdefault(call.get("index", 0), {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                # Most engines name the function once; some repeat the full name on every delta.
                name = function.get("name") or ""
                if name and name != slot["name"]:
                    slot["name"] += name
                slot["arguments"] += function.get("arguments") or ""
                carries_tokens = True
            if carries_tokens:
                self.token_times.append(arrived)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]


async def stream_chat(client: httpx.AsyncClient, endpoint: Endpoint, body: dict, *, limited: bool = True) -> StreamedChat:
    """POST stream=true and record when each SSE event arrives (client-side clock).

    `limited`: hold a request slot (sampled checks); the load check sends its own concurrency."""
    async with endpoint.slot() if limited else contextlib.nullcontext():
        result = await _stream_chat(client, endpoint, body)
    check_plumbing(endpoint, result.model, result.content, "streamed completion")
    return result


async def _stream_chat(client: httpx.AsyncClient, endpoint: Endpoint, body: dict) -> StreamedChat:
    request = {"model": endpoint.model, **body, "stream": True, "stream_options": {"include_usage": True}}
    result = StreamedChat(started=time.perf_counter())
    async with client.stream(
        "POST", f"{endpoint.base_url}/chat/completions", json=request, headers=endpoint.auth_headers
    ) as response:
        if response.status_code != 200:
            await response.aread()
            raise CheckFailed(f"streaming request got HTTP {response.status_code}: {_error_snippet(response)}")
        async for line in response.aiter_lines():
            arrived = time.perf_counter()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                result.done = True
                break
            try:
                result.add(json.loads(data), arrived)
            except json.JSONDecodeError:
                raise CheckFailed(f"stream carried a non-JSON event: {data[:120]}")
    return result
