"""The rendered Caddyfile: its content, `caddy validate`, and refusal of non-loopback upstreams."""

import shutil

import pytest

from kimi_fleet.caddy import render_caddyfile
from tests.fakes.harness import validate_caddyfile

needs_caddy = pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy binary not installed")
ENV = {"KIMI_API_KEY": "test-key"}


def test_single_upstream_has_auth_streaming_and_timeouts():
    text = render_caddyfile("kimi.example.com", ["127.0.0.1:8000"], "/health", acme_email="ops@example.com")
    assert "admin off" in text
    assert "grace_period 10s" in text
    assert 'email "ops@example.com"' in text
    assert "kimi.example.com {" in text
    assert "tls internal" not in text
    assert '@unauthorized not header Authorization "Bearer {env.KIMI_API_KEY}"' in text
    assert "respond @unauthorized `" in text and "` 401" in text
    assert '@keyless vars {env.KIMI_API_KEY} ""' in text
    assert "reverse_proxy @promised 127.0.0.1:8000 {" in text
    assert "flush_interval -1" in text
    assert "max_size 64MB" in text
    assert "read_timeout 3600s" in text and "write_timeout 3600s" in text
    # One upstream: nothing to balance or fail over to.
    assert "lb_policy" not in text and "health_uri" not in text
    # The engine never receives the key (it may log headers); the ACME email is quoted.
    assert "header_up -Authorization" in text


def test_several_upstreams_are_balanced_and_health_checked():
    text = render_caddyfile(
        "kimi.example.com", ["127.0.0.1:30000", "127.0.0.1:30001"], "/health_generate", api_key_env="API_KEY"
    )
    assert "reverse_proxy @promised 127.0.0.1:30000 127.0.0.1:30001 {" in text
    assert "lb_policy least_conn" in text
    assert "health_uri /health_generate" in text
    assert "health_interval" in text and "fail_duration" in text
    assert "Bearer {env.API_KEY}" in text


def test_internal_tls_and_ports_for_loopback_tests():
    text = render_caddyfile(
        "localhost", ["[::1]:8000"], "/health", tls="internal", https_port=8443, http_port=8080, bind_host="127.0.0.1"
    )
    assert "tls internal" in text
    assert "skip_install_trust" in text
    assert "https_port 8443" in text and "http_port 8080" in text
    assert "bind 127.0.0.1" in text


@pytest.mark.parametrize(
    "upstream", ["192.168.1.20:8000", "10.0.0.5:30000", "0.0.0.0:8000", "engine.internal:8000", "localhost:8000"]
)
def test_refuses_non_loopback_upstreams(upstream):
    with pytest.raises(ValueError, match="DHCP"):
        render_caddyfile("kimi.example.com", ["127.0.0.1:8000", upstream], "/health")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"upstreams": []},
        {"upstreams": ["127.0.0.1"]},
        {"upstreams": ["127.0.0.1:99999"]},
        {"tls": "selfsigned"},
        {"health_uri": "health"},
        {"api_key_env": "KIMI-KEY"},
        {"domain": "kimi.example.com {"},
        {"https_port": 0},
    ],
)
def test_rejects_bad_arguments(kwargs):
    arguments = {"domain": "kimi.example.com", "upstreams": ["127.0.0.1:8000"], "health_uri": "/health", **kwargs}
    with pytest.raises(ValueError):
        render_caddyfile(**arguments)


@needs_caddy
@pytest.mark.parametrize(
    "kwargs",
    [
        {"domain": "kimi.example.com", "upstreams": ["127.0.0.1:8000"], "health_uri": "/health"},
        {
            "domain": "kimi.example.com",
            "upstreams": ["127.0.0.1:30000", "127.0.0.1:30001"],
            "health_uri": "/health_generate",
            "acme_email": "ops@example.com",
        },
        {
            "domain": "localhost",
            "upstreams": ["127.0.0.1:8000"],
            "health_uri": "/health",
            "tls": "internal",
            "https_port": 18443,
            "http_port": 18080,
            "bind_host": "127.0.0.1",
        },
    ],
    ids=["acme-single", "acme-balanced", "internal-loopback"],
)
def test_caddy_validates_rendered_config(kwargs):
    result = validate_caddyfile(render_caddyfile(**kwargs), ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid configuration" in result.stdout + result.stderr


@needs_caddy
def test_engine_never_sees_the_key_and_failed_keys_are_logged_without_it():
    """A real caddy in front of a recording upstream: the upstream gets no Authorization header;
    wrong keys get 401 and appear in the access log with the client address, never the key."""
    import http.server
    import json
    import threading

    import httpx

    from tests.fakes.harness import free_port, start_caddy

    seen = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(dict(self.headers))
            body = b'{"object":"list","data":[]}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    key = "right-key-7f3c9e21d4b85a60"
    https_port, http_port = free_port(), free_port()
    caddyfile = render_caddyfile("localhost", [f"127.0.0.1:{upstream.server_address[1]}"], "/health", tls="internal",
                                 https_port=https_port, http_port=http_port, bind_host="127.0.0.1")
    url = f"https://localhost:{https_port}/v1/models"
    try:
        with start_caddy(caddyfile, {"KIMI_API_KEY": key}, ready_url=url) as caddy:
            with httpx.Client(verify=caddy.ssl_context(), timeout=10) as client:
                wrong = [client.get(url, headers={"Authorization": f"Bearer wrong-key-{i}-secretish"}) for i in range(5)]
                right = client.get(url, headers={"Authorization": f"Bearer {key}"})
            logs = caddy.logs()
    finally:
        upstream.shutdown()
    assert [r.status_code for r in wrong] == [401] * 5 and right.status_code == 200
    assert len(seen) == 1 and not any(name.lower() == "authorization" for name in seen[0])
    entries = [json.loads(line) for line in logs.splitlines() if line.startswith("{") and '"http.log.access' in line]
    refused = [e for e in entries if e.get("status") == 401]
    assert len(refused) >= 5 and all(e["request"]["remote_ip"] == "127.0.0.1" for e in refused)
    assert "wrong-key-" not in logs and key not in logs


@pytest.mark.parametrize("key", ["short", "x" * 20 + "*", "x" * 20 + "{env.HOME}", "x" * 20 + " y", 'x' * 20 + '"'])
def test_api_key_rule_refuses_wildcards_placeholders_and_short_keys_without_echoing(key):
    from kimi_fleet.caddy import check_api_key

    with pytest.raises(ValueError) as refused:
        check_api_key(key)
    assert key not in str(refused.value)


def test_program_refuses_a_wildcard_api_key_on_kubernetes_before_declaring_anything():
    from tooling.mock_run import run_config
    from kimi_fleet.stackfile import load_stack_config, stack_file

    config = load_stack_config(stack_file("gb200-int4-vllm"))
    config.pulumi_config["kimi-fleet:apiKey"] = "abcdefghijklmnop*"
    run = run_config(config)
    assert run.error and "kimi-fleet:apiKey must be" in run.error and "abcdefghijklmnop*" not in run.error
    assert run.resources == []


def test_free_ports_of_one_test_process_never_repeat():
    # Two listeners of one Caddy given the same port fail to start (seen once in CI): the
    # harness must not hand out a port twice, even when the kernel offers a just-closed one again.
    from tests.fakes.harness import free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
