"""The fake engine answering an httpx client in the test's own process: no socket, no server thread.

For the gate's statistical tests (tests/test_gate_statistics.py), which run the verification suite
hundreds of times: over loopback most of their CPU went into the client's connection pool and the
engine's thread per connection, not into what they test (how the suite judges the answers). Here
each request is handed to tests/fakes/fake_engine.py's own Handler, with the same EngineState the
engine process builds from the same command line, as the bytes of an HTTP/1.1 request; its answer
is parsed back by http.client. The engine's code, its seeded draws and its HTTP framing are the
real ones; only the socket is missing. A stream arrives as one piece (the statistical tests run no
timing check), and the transport refuses a state that sleeps, hangs or queues, which would block
the event loop the client runs in.
"""

from __future__ import annotations

import http.client
import io

import httpx

from tests.fakes.fake_engine import EngineState, Handler, state_from_options

#: Response headers that describe the framing of the bytes on the wire; the body is handed on whole.
FRAMING = {"transfer-encoding", "content-length", "connection"}


class _Server:
    """What Handler reads from its server: the engine's state."""

    def __init__(self, state: EngineState):
        self.state = state


class _Connection:
    """A socket as StreamRequestHandler uses it: the request's bytes to read, sendall() to answer."""

    def __init__(self, request: bytes):
        self.request = io.BytesIO(request)
        self.answer = bytearray()

    def makefile(self, mode: str, *args, **kwargs):
        assert mode == "rb", mode
        return self.request

    def sendall(self, data) -> None:
        self.answer += data


class _Answer:
    """What http.client.HTTPResponse reads a response from."""

    def __init__(self, data: bytes):
        self.data = data

    def makefile(self, mode: str, *args, **kwargs):
        return io.BytesIO(self.data)


class InProcessEngine(httpx.AsyncBaseTransport):
    """`fake_engine.py OPTIONS`, answering in this process."""

    def __init__(self, *options: str):
        _, self.state = state_from_options(list(options))
        blocking = {"chunk delay": self.state.chunk_delay, "first-token delay": self.state.first_token_delay,
                    "max running": self.state.metrics.slots is not None, "hang after": self.state.hang_after,
                    "hang file": self.state.hang_file, "not the good mode": self.state.mode != "good"}
        if any(blocking.values()):
            raise ValueError(f"in process, the engine must never wait: {blocking}")
        self.server = _Server(self.state)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        head = [f"{request.method} {request.url.raw_path.decode('ascii')} HTTP/1.1"]
        head += [f"{name.decode('latin-1')}: {value.decode('latin-1')}" for name, value in request.headers.raw]
        if body and "content-length" not in request.headers:
            head.append(f"Content-Length: {len(body)}")
        connection = _Connection("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body)
        Handler(connection, ("127.0.0.1", 0), self.server)  # answers every request in the bytes, then returns
        answer = http.client.HTTPResponse(_Answer(bytes(connection.answer)), method=request.method)
        answer.begin()
        content = answer.read()
        headers = [(name, value) for name, value in answer.getheaders() if name.lower() not in FRAMING]
        return httpx.Response(answer.status, headers=headers, content=content, request=request)
