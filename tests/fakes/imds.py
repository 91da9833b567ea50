"""EC2's instance metadata service as IMDSv2 answers it, on loopback, for node scripts under test:
a session token from PUT /latest/api/token (with a TTL header), that token on every read (IMDSv1 is
off on kimi-fleet nodes), and 404 for anything it was not given."""

from __future__ import annotations

import http.server
from collections.abc import Iterator
from contextlib import contextmanager

from tests.fakes.harness import serve_on_loopback

TOKEN = "imds-session-token"


@contextmanager
def start_imds(metadata: dict[str, str]) -> Iterator[str]:
    """Serve `metadata` (a path under /latest/meta-data/, e.g. "instance-id", -> its text); yields
    the base URL (AWS_EC2_METADATA_SERVICE_ENDPOINT)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, status: int, text: str = "") -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self):  # noqa: N802
            ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            self._answer(200, TOKEN) if ok else self._answer(400)

        def do_GET(self):  # noqa: N802
            if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                return self._answer(401)
            found = metadata.get(self.path.removeprefix("/latest/meta-data/"))
            self._answer(200, found) if found is not None else self._answer(404)

    with serve_on_loopback(Handler) as url:
        yield url
