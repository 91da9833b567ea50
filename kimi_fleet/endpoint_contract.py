"""What the endpoint promises its clients: the routes a tenant's key opens, and the routes and header
the proxy adds. Standard library only: the verification suite imports it on nodes, where the rest of
the package (and pydantic) is not installed."""

import re
from typing import NamedTuple

#: The node's cold-start status, behind the key.
STATUS_PATH = "/kimi-fleet/status"
#: Which release answered: only on proxied (authenticated) answers.
RELEASE_HEADER = "X-Kimi-Fleet-Release"
RELEASE_PATTERN = re.compile(r"[0-9a-f]{16}")


class Route(NamedTuple):
    """One request a client may send through the proxy: an exact method and an exact path."""

    method: str
    path: str

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


#: The OpenAI-compatible API the endpoint serves (README: chat, completions, the model list). The
#: proxy passes these (any query string) and answers every other route itself: an engine's
#: controls (SGLang's /update_weights_from_disk or /flush_cache, vLLM's /sleep or
#: /v1/load_lora_adapter) are for operators on the node (SSM session, SSH), never for a tenant's key.
OPENAI_ROUTES = (
    Route("POST", "/v1/chat/completions"),
    Route("POST", "/v1/completions"),
    Route("GET", "/v1/models"),
)


def promised_routes(health_path: str) -> tuple[Route, ...]:
    """Everything the proxy passes to the engine: OPENAI_ROUTES and a GET of the engine's health
    route, which the verification gate calls through the proxy with the key (on SGLang it runs a
    real generation, so a live HTTP server with a dead scheduler fails it)."""
    return (*OPENAI_ROUTES, Route("GET", health_path))
