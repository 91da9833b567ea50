"""A tenant's key opens the model API only (issue 21, item 5).

Every stack's Caddyfile, rendered the way the program renders it (node_files.render_proxy_for on
nodes and hosts, k8s_manifests.render_pod_proxy for the Kubernetes sidecar), runs in a real caddy
in front of engines that record every request they receive. With the valid key we send the
engines' control routes (SGLang's and vLLM's, GET and POST), path-matching bypasses and wrong
methods, and assert: the engines received exactly the promised requests; each refused request got
Caddy's own JSON 404/405; without the key or with a wrong one every request got 401 (fail2ban
counts those). Only the listeners are moved onto loopback, and a check holds the moved text against
the program's own text in Caddy's adaptation (same routes, handlers and matchers).
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import re
import shutil
import ssl
import subprocess
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from kimi_fleet import catalog, k8s_manifests
from kimi_fleet.caddy import READY_PATH, RELEASE_HEADER, RenderedProxy, render_proxy
from kimi_fleet.endpoint_contract import OPENAI_ROUTES, STATUS_PATH, Route, promised_routes
from kimi_fleet.launch import render_launch
from kimi_fleet.node_files import render_proxy_for
from kimi_fleet.resolve import Resolved
from kimi_fleet.stackfile import load_stack_config, stack_file
from tests.fakes import harness
from tests.fakes.harness import free_port, start_caddy
from tests.matrix import PLANNED_STACKS

pytestmark = pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy binary not installed")

API_KEY = "proxy-routes-test-key-0123456789"
RELEASE = "0123456789abcdef"
RUN_DIR = "/run/kimi-fleet"
PROBE_HEADER = "X-Route-Probe"

#: Control and non-API routes the engines register (issue 21 and the engines' HTTP servers).
SGLANG_CONTROLS = (
    "/update_weights_from_disk", "/update_weights_from_tensor", "/update_weights_from_distributed",
    "/init_weights_update_group", "/pause_generation", "/continue_generation", "/release_memory_occupation",
    "/resume_memory_occupation", "/flush_cache", "/start_profile", "/stop_profile", "/get_server_info",
    "/server_info", "/get_model_info", "/model_info", "/abort_request", "/configure_logging",
    "/set_internal_state", "/get_internal_state", "/load_lora_adapter", "/unload_lora_adapter",
    "/slow_down", "/open_session", "/close_session", "/generate", "/encode", "/classify", "/tokenize",
    "/detokenize", "/metrics", "/get_load", "/v1/rerank", "/v1/embeddings", "/v1/score",
)
VLLM_CONTROLS = (
    "/sleep", "/wake_up", "/is_sleeping", "/reset_prefix_cache", "/reset_mm_cache", "/collective_rpc",
    "/start_profile", "/stop_profile", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
    "/scale_elastic_ep", "/is_scaling_elastic_ep", "/pause", "/resume", "/is_paused", "/server_info",
    "/tokenize", "/detokenize", "/metrics", "/version", "/ping", "/invocations", "/pooling", "/classify",
    "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank", "/v1/embeddings", "/v1/responses",
    "/v1/audio/transcriptions", "/v1/audio/translations", "/load", "/docs", "/openapi.json", "/redoc",
)
#: Paths that look like, or clean up to, a promised route (or a control route) but are not one
#: as sent. `{authority}` is the listener's host:port (absolute-form request targets).
BYPASSES = (
    ("POST", "/v1/chat/completions/../../flush_cache"),
    ("GET", "/v1/chat/completions/../../get_server_info"),
    ("POST", "//flush_cache"),
    ("POST", "/v1/chat/completions/extra"),
    ("POST", "/v1/chat/completions/"),
    ("GET", "/V1/models"),
    ("GET", "/v1/Models"),
    ("POST", "/V1/CHAT/COMPLETIONS"),
    ("POST", "/%66lush_cache"),
    ("POST", "/v1/chat%2Fcompletions"),
    ("POST", "/v1/chat/completions%2F..%2F..%2Fflush_cache"),
    ("GET", "/v1/%6Dodels"),
    ("GET", "/v1/models/"),
    ("GET", "/v1/models/kimi-k2.6"),
    ("GET", "/./v1/models"),
    ("GET", "/v1//models"),
    ("GET", "/v1/models/."),
    ("GET", "/v1/models;x=1"),
    ("GET", "/v1/models%3Fx=1"),
    ("GET", "/v1/models#fragment"),
    ("GET", "/flush_cache/../v1/models"),
    ("POST", "/sleep?/v1/chat/completions"),
    ("GET", "/"),
    ("POST", "/v1"),
    ("POST", "http://{authority}/flush_cache"),
    ("GET", "http://{authority}/v1/models/../../sleep"),
    ("get", "/v1/models"),
    # Go's server answers `OPTIONS *` itself (200, empty) before any handler: it never reaches one.
    ("OPTIONS", "*"),
)
#: Answered by Go's HTTP server before Caddy's handlers run (so neither a 401 nor a 404).
SERVER_ANSWERED = {("OPTIONS", "*")}
OTHER_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


class Recorder(http.server.ThreadingHTTPServer):
    """A fake engine that answers 200 JSON to anything and records every request it receives."""

    daemon_threads = True

    def __init__(self):
        self.seen: list[dict] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _RecordingHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _record(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        with self.server.lock:
            self.server.seen.append({"method": self.command, "target": self.path,
                                     "probe": self.headers.get(PROBE_HEADER),
                                     "forwarded": self.headers.get("X-Forwarded-For") is not None,
                                     "authorization": self.headers.get("Authorization")})
        body = b'{"object":"list","data":[]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _record

    def log_message(self, *args):
        pass


@contextmanager
def recorders(count: int):
    servers = [Recorder() for _ in range(count)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield servers
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def rendered_for(name: str, ports: list[int]) -> tuple[RenderedProxy, str]:
    """The stack's proxy as the program renders it, its engines on `ports`; and the health path."""
    r = Resolved(load_stack_config(stack_file(name)).spec())
    launch = render_launch(r)
    local = dataclasses.replace(launch, instances=tuple(
        dataclasses.replace(instance, port=port) for instance, port in zip(launch.instances, ports)))
    if r.target.renders_manifests:
        return k8s_manifests.render_pod_proxy(r, local, RELEASE), local.health_path
    return render_proxy_for(r, local, release=RELEASE), local.health_path


def engine_count(name: str) -> int:
    return len(render_launch(Resolved(load_stack_config(stack_file(name)).spec())).instances)


@dataclasses.dataclass
class Listeners:
    https: int
    http: int
    #: program address -> loopback port it is moved to (the node's local listener, a fleet's ready listener)
    moved: dict[str, int]


def relocate(text: str, facts: dict, listeners: Listeners, run_dir: Path, log_dir: Path) -> str:
    """The program's Caddyfile with only where it listens and writes changed: the public site on
    localhost with the internal CA, the plain-HTTP listeners on free loopback ports, the access
    log and runtime files under temporary directories. Routes, matchers and handlers are untouched
    (test_relocation_changes_only_the_listeners holds the two adaptations side by side)."""
    public = facts["sites"][0]["address"]
    lines = text.split("\n")
    out = []
    for line in lines:
        if line == "\tadmin off":
            out += [line, f"\thttp_port {listeners.http}", f"\thttps_port {listeners.https}"]
            if "skip_install_trust" not in text:
                out.append("\tskip_install_trust")
        elif line.startswith("\temail "):
            continue  # no ACME on loopback
        elif line == f"{public} {{":
            out += ["localhost {", "\tbind 127.0.0.1", "\ttls internal"]
        elif line == "\ttls internal":
            continue  # the public site got it above (the sidecar's own, when not behind a LoadBalancer)
        elif line.endswith(" {") and line[:-2] in listeners.moved:
            # Same host (none for the ready listener), another port, bound to loopback.
            address = line[:-2].rsplit(":", 1)[0]
            out += [f"{address}:{listeners.moved[line[:-2]]} {{", "\tbind 127.0.0.1"]
        elif line.strip().startswith("bind 127.0.0.1") and out and out[-1] == "\tbind 127.0.0.1":
            continue  # the loopback listener already binds 127.0.0.1
        else:
            out.append(line.replace(RUN_DIR, str(run_dir)).replace("/var/log/caddy", str(log_dir)))
    return "\n".join(out)


def adapted(text: str, tmp_path: Path) -> dict:
    path = tmp_path / "adapt.Caddyfile"
    path.write_text(text)
    result = subprocess.run(["caddy", "adapt", "--config", str(path), "--adapter", "caddyfile"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def site_handlers(config: dict) -> list[str]:
    """Each server's routes without its host match: what Caddy does with a request once it arrived."""
    servers = config["apps"]["http"]["servers"].values()
    return sorted(json.dumps([route["handle"] for route in server["routes"]], sort_keys=True) for server in servers)


class Client:
    """One keep-alive connection; raw request targets go out exactly as written (no normalising)."""

    def __init__(self, port: int, context: ssl.SSLContext | None):
        self.port, self.context = port, context
        self.connection = None

    @property
    def authority(self) -> str:
        """host:port as the site is addressed (the public site is `localhost`, the others 127.0.0.1)."""
        return f"{'localhost' if self.context else '127.0.0.1'}:{self.port}"

    def send(self, method: str, target: str, headers: dict) -> tuple[int, dict, bytes]:
        for attempt in range(2):
            if self.connection is None:
                self.connection = (http.client.HTTPSConnection("localhost", self.port, context=self.context, timeout=30)
                                   if self.context else http.client.HTTPConnection("127.0.0.1", self.port, timeout=30))
            body = b"{}" if method in ("POST", "PUT", "PATCH") else None
            try:
                self.connection.request(method, target, body=body,
                                        headers={**headers, **({"Content-Type": "application/json"} if body else {})})
                response = self.connection.getresponse()
                payload = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
                continue
            if response.will_close:
                self.close()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, payload
        raise AssertionError("unreachable")

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def refused_requests(health_path: str, authority: str) -> list[tuple[str, str]]:
    promised = promised_routes(health_path)
    other_health = {"/health", "/health_generate"} - {health_path}
    paths = sorted(set(SGLANG_CONTROLS) | set(VLLM_CONTROLS) | other_health)
    requests = [(method, path) for path in paths for method in ("GET", "POST")]
    requests += [(method, target.format(authority=authority)) for method, target in BYPASSES]
    requests += [(method, route.path) for route in promised for method in OTHER_METHODS
                 if method not in {r.method for r in promised if r.path == route.path}]
    return requests


def accepted_requests(health_path: str) -> list[tuple[str, str]]:
    promised = promised_routes(health_path)
    return [(route.method, route.path) for route in promised] + [
        ("GET", "/v1/models?limit=1"), ("POST", "/v1/chat/completions?api-version=2024-06-01"), ("GET", "/v1/models?")]


def probe(client: Client, requests: list[tuple[str, str]], headers: dict, tag: str) -> list[tuple]:
    answers = []
    for index, (method, target) in enumerate(requests):
        status, response_headers, body = client.send(method, target, {**headers, PROBE_HEADER: f"{tag}-{index}"})
        answers.append((method, target, status, response_headers, body))
    return answers


def assert_refused_by_caddy(answers: list[tuple], health_path: str) -> None:
    allowed = {}
    for route in promised_routes(health_path):
        allowed.setdefault(route.path, []).append(route.method)
    for method, target, status, headers, body in answers:
        where = f"{method} {target}"
        if (method, target) in SERVER_ANSWERED:
            assert status == 200 and not body, where
            continue
        path = target.split("?", 1)[0]
        # A promised path (exactly as promised) with another method: 405; anything else: 404.
        wrong_method = path in allowed and method not in allowed[path]
        assert status == (405 if wrong_method else 404), f"{where}: got {status} {body[:200]!r}"
        assert RELEASE_HEADER.lower() not in headers, f"{where}: answered through the proxy"
        assert headers.get("content-type") == "application/json", where
        if wrong_method:
            assert headers.get("allow") == ", ".join(allowed[path]), where
        if method == "HEAD":
            continue
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error" and error["message"], where
        if wrong_method:
            assert error["code"] == "method_not_allowed" and path in error["message"], where
        else:
            assert error["code"] == "unknown_route", where
            assert all(str(route) in error["message"] for route in promised_routes(health_path)), where


def assert_unauthorized(answers: list[tuple]) -> None:
    for method, target, status, headers, body in answers:
        if (method, target) in SERVER_ANSWERED:
            continue
        assert status == 401, f"{method} {target} without the right key: got {status}"
        if method != "HEAD":
            assert json.loads(body)["error"]["code"] == "invalid_api_key", f"{method} {target}"


@contextmanager
def running_stack(name: str, tmp_path: Path):
    """The stack's proxy on loopback in front of recorders: (rendered, relocated text, health path,
    recorders, clients by listener, ready port or None, run dir)."""
    with ExitStack() as stack:
        engines = stack.enter_context(recorders(engine_count(name)))
        rendered, health_path = rendered_for(name, [engine.port for engine in engines])
        facts = rendered.facts
        moved = {site["address"]: free_port() for site in facts["sites"][1:]}
        listeners = Listeners(https=free_port(), http=free_port(), moved=moved)
        run_dir, log_dir = tmp_path / "run", tmp_path / "log"
        run_dir.mkdir()
        log_dir.mkdir()
        text = relocate(rendered.text, facts, listeners, run_dir, log_dir)
        caddy = stack.enter_context(start_caddy(text, {"KIMI_API_KEY": API_KEY},
                                                ready_url=f"https://localhost:{listeners.https}/v1/models"))
        clients = {facts["sites"][0]["address"]: Client(listeners.https, caddy.ssl_context())}
        ready_port = None
        for site in facts["sites"][1:]:
            if site["upstreams"]:
                clients[site["address"]] = Client(moved[site["address"]], None)
            else:
                ready_port = moved[site["address"]]
        try:
            yield rendered, text, health_path, engines, clients, ready_port, run_dir
        finally:
            for client in clients.values():
                client.close()


@pytest.mark.parametrize("name", PLANNED_STACKS)
def test_a_tenant_key_reaches_the_promised_routes_only(name, tmp_path):
    with running_stack(name, tmp_path) as (rendered, _, health_path, engines, clients, _, _):
        keyed_sites = [site for site in rendered.facts["sites"] if site["upstreams"]]
        assert [site["address"] for site in keyed_sites] == list(clients)
        for site in keyed_sites:
            # What the facts (and so the policy pack) say is proxied is what the contract promises.
            assert [Route(**route) for route in site["proxiedRoutes"]] == list(promised_routes(health_path))
        expected = []
        for address, client in clients.items():
            refused = refused_requests(health_path, client.authority)
            accepted = accepted_requests(health_path)
            key = {"Authorization": f"Bearer {API_KEY}"}
            tag = f"{address}-"

            keyed = probe(client, refused, key, tag + "refused")
            assert_refused_by_caddy(keyed, health_path)
            passed = probe(client, accepted, key, tag + "accepted")
            assert [(m, t, s) for m, t, s, _, _ in passed] == [(m, t, 200) for m, t in accepted]
            assert all(headers.get(RELEASE_HEADER.lower()) == RELEASE for *_, headers, _ in passed)
            expected += [(method, target, f"{tag}accepted-{index}") for index, (method, target) in enumerate(accepted)]

            # No key, a wrong key, an empty bearer: 401 on every path, promised or not.
            for label, headers in (("none", {}), ("wrong", {"Authorization": "Bearer wrong-key-0123456789abcdef"}),
                                   ("empty", {"Authorization": "Bearer"})):
                assert_unauthorized(probe(client, refused + accepted, headers, f"{tag}{label}"))

        received = [request for engine in engines for request in engine.seen]
        probes = sorted((r["method"], r["target"], r["probe"]) for r in received if r["probe"])
        assert probes == sorted(expected), "the engines received requests beyond the promised ones"
        assert not any(r["authorization"] for r in received), "an engine saw the Authorization header"
        # The only other requests are Caddy's own active health checks (several engines per node).
        checks = [r for r in received if not r["probe"]]
        assert all((r["method"], r["target"], r["forwarded"]) == ("GET", health_path, False) for r in checks), checks


K8S_PLANNED = [name for name in PLANNED_STACKS
               if load_stack_config(stack_file(name)).values["target"]["kind"] == "kubernetes"]


@pytest.mark.parametrize("name", K8S_PLANNED)
def test_the_pods_own_caddy_release_passes_the_promised_routes_only(name, tmp_path, monkeypatch):
    """The same check with the Caddy release the pods run (catalog.CADDY_IMAGE, newer than Debian's that
    the nodes run): 2.10.2 never matched the route gate's former vars_regexp on two placeholders, and
    every request to a pod was refused as an unknown route while Debian's 2.6.2 passed them."""
    binary = harness.pod_caddy()
    version = subprocess.run([binary, "version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("v" + catalog.CADDY_IMAGE.split(":", 1)[1] + " "), version
    monkeypatch.setattr(harness, "CADDY", binary)
    test_a_tenant_key_reaches_the_promised_routes_only(name, tmp_path)


@pytest.mark.parametrize("name", ["b300-int4-sglang", "mi300x-int4-sglang", "gb200-int4-vllm"],
                         ids=["aws-fleet", "host-two-engines", "kubernetes-sidecar"])
def test_the_special_routes_answer_as_before(name, tmp_path):
    """The status file behind the key, the fleet's keyless ready listener: served by Caddy itself."""
    with running_stack(name, tmp_path) as (rendered, _, _, engines, clients, ready_port, run_dir):
        status_served = any(route["path"] == STATUS_PATH for route in rendered.facts["sites"][0]["routes"])
        client = next(iter(clients.values()))
        key = {"Authorization": f"Bearer {API_KEY}"}
        if status_served:
            assert client.send("GET", STATUS_PATH, {})[0] == 401
            assert client.send("GET", STATUS_PATH, key)[0] == 404  # no status file yet
            (run_dir / "status.json").write_text('{"phase": "download"}')
            status, headers, body = client.send("GET", STATUS_PATH, key)
            assert status == 200 and json.loads(body) == {"phase": "download"}
            assert headers["content-type"] == "application/json"
        else:
            assert client.send("GET", STATUS_PATH, key)[0] == 404
        if ready_port is not None:
            ready = Client(ready_port, None)
            assert ready.send("GET", READY_PATH, {})[0] == 503
            (run_dir / "ready").write_text(RELEASE)
            status, _, body = ready.send("GET", READY_PATH, {})
            assert (status, body) == (200, RELEASE.encode())
            assert ready.send("POST", "/v1/chat/completions", key)[0] == 503  # proxies nothing
            ready.close()
        assert not [r for engine in engines for r in engine.seen if r["forwarded"]]


@pytest.mark.parametrize("name", PLANNED_STACKS)
def test_relocation_changes_only_the_listeners(name, tmp_path):
    """The loopback text differs from the program's only in where it listens and writes: Caddy
    makes the same routes of both (the proof above is about the program's Caddyfile)."""
    rendered, _ = rendered_for(name, [free_port() for _ in range(engine_count(name))])
    listeners = Listeners(https=free_port(), http=free_port(),
                          moved={site["address"]: free_port() for site in rendered.facts["sites"][1:]})
    text = relocate(rendered.text, rendered.facts, listeners, Path(RUN_DIR), Path("/var/log/caddy"))
    assert site_handlers(adapted(text, tmp_path)) == site_handlers(adapted(rendered.text, tmp_path))
    assert "localhost {" in text and f"https_port {listeners.https}" in text


def test_a_stack_contract_is_the_openai_api_and_the_health_route():
    assert [str(route) for route in OPENAI_ROUTES] == [
        "POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"]
    assert promised_routes("/health_generate")[-1] == Route("GET", "/health_generate")


@pytest.mark.parametrize("health_uri", ["/health.*", "/health|/flush_cache", "/health/../flush_cache", "/health{x}",
                                        "/%66lush_cache", "/health?x=1", "/health/"])
def test_a_health_route_that_is_not_a_plain_path_is_refused(health_uri):
    with pytest.raises(ValueError, match="health_uri must be a plain path"):
        render_proxy("kimi.example.com", ["127.0.0.1:8000"], health_uri)


def test_the_refusal_bodies_are_json_in_the_openai_shape():
    text = render_proxy("kimi.example.com", ["127.0.0.1:8000"], "/health").text
    bodies = re.findall(r"respond @(\w+) `([^`]*)` (\d+)", text)
    assert {status for _, _, status in bodies} == {"401", "404", "405"}
    for _, body, _ in bodies:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "code"} and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("route", [Route("POST", "/v1/chat/completions.*"), Route("get", "/v1/models"),
                                   Route("GET|POST", "/v1/models"), Route("GET", "/v1/models/{id}")])
def test_a_promised_route_that_would_widen_the_matcher_is_refused(route):
    from kimi_fleet.caddy import _route_gate

    with pytest.raises(ValueError, match="upper-case method and a plain path"):
        _route_gate((*OPENAI_ROUTES, route))


@pytest.mark.parametrize("message", ["a ` ends the token", "{http.request.header.Authorization}", "{env.KIMI_API_KEY}"])
def test_a_refusal_body_never_ends_its_token_or_expands_a_placeholder(message):
    from kimi_fleet.caddy import _error_body

    with pytest.raises(ValueError, match="placeholder"):
        _error_body(message, "unknown_route")
