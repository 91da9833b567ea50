"""HTTP plumbing shared by the checks: the endpoint, authenticated requests and SSE streams."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass, field

import httpx


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
        return ssl.create_default_context(cafile=None if self.verify is True else self.verify)


def open_client(endpoint: Endpoint) -> httpx.AsyncClient:
    # One connection per concurrent stream under --load; keep headroom for the other checks.
    connections = max(100, endpoint.load + 32)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(endpoint.timeout),
        verify=endpoint.ssl_context(),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
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


async def chat(client: httpx.AsyncClient, endpoint: Endpoint, body: dict) -> dict:
    """Non-streaming chat completion; returns the first choice's message plus finish_reason."""
    response = await client.post(
        f"{endpoint.base_url}/chat/completions",
        json={"model": endpoint.model, **body},
        headers=endpoint.auth_headers,
    )
    if response.status_code != 200:
        raise CheckFailed(f"chat completion got HTTP {response.status_code}: {_error_snippet(response)}")
    payload = response.json()
    choices = payload.get("choices") or []
    if not choices:
        raise CheckFailed("chat completion returned no choices", response=payload)
    return {**(choices[0].get("message") or {}), "finish_reason": choices[0].get("finish_reason")}


def reasoning_of(message: dict) -> str:
    """Engines name the separated reasoning `reasoning_content` (some vLLM versions: `reasoning`)."""
    return message.get("reasoning_content") or message.get("reasoning") or ""


@dataclass
class StreamedChat:
    started: float  # perf_counter when the request was sent
    content: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    done: bool = False  # saw `data: [DONE]`
    usage: dict | None = None
    content_times: list[float] = field(default_factory=list)  # arrival of content-bearing chunks
    token_times: list[float] = field(default_factory=list)  # arrival of content/reasoning/tool chunks
    tool_calls: dict[int, dict] = field(default_factory=dict)  # index -> {id, name, arguments}

    @property
    def output_tokens(self) -> int:
        """Engine-reported completion tokens when usage was streamed, else one per chunk."""
        if self.usage and self.usage.get("completion_tokens"):
            return int(self.usage["completion_tokens"])
        return len(self.token_times)

    def add(self, chunk: dict, arrived: float) -> None:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
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
            for call in delta.get("tool_calls") or []:
                slot = self.tool_calls.setdefault(call.get("index", 0), {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["name"] += function.get("name") or ""
                slot["arguments"] += function.get("arguments") or ""
                carries_tokens = True
            if carries_tokens:
                self.token_times.append(arrived)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]


async def stream_chat(client: httpx.AsyncClient, endpoint: Endpoint, body: dict) -> StreamedChat:
    """POST stream=true and record when each SSE event arrives (client-side clock)."""
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
