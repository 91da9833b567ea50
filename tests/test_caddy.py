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
    assert "email ops@example.com" in text
    assert "kimi.example.com {" in text
    assert "tls internal" not in text
    assert '@unauthorized not header Authorization "Bearer {env.KIMI_API_KEY}"' in text
    assert "respond @unauthorized `" in text and "` 401" in text
    assert '@keyless vars {env.KIMI_API_KEY} ""' in text
    assert "reverse_proxy 127.0.0.1:8000 {" in text
    assert "flush_interval -1" in text
    assert "max_size 64MB" in text
    assert "read_timeout 3600s" in text and "write_timeout 3600s" in text
    # One upstream: nothing to balance or fail over to.
    assert "lb_policy" not in text and "health_uri" not in text
    # The engines may use the Authorization header: it is forwarded untouched.
    assert "header_up" not in text


def test_several_upstreams_are_balanced_and_health_checked():
    text = render_caddyfile(
        "kimi.example.com", ["127.0.0.1:30000", "127.0.0.1:30001"], "/health_generate", api_key_env="API_KEY"
    )
    assert "reverse_proxy 127.0.0.1:30000 127.0.0.1:30001 {" in text
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
