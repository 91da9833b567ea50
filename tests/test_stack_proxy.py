"""A stack's own rendered Caddyfile, run in a real caddy on loopback in front of fake engines.

The configuration is the one a node gets (render_caddyfile_for: upstreams, health path, key
check, streaming); only the listener differs: localhost with internal TLS on free ports. The
MI300X stack is used because its node runs two engines behind one proxy.
"""

import dataclasses
from contextlib import ExitStack

import httpx
import pytest

from kimi_fleet.launch import render_launch
from kimi_fleet.node_files import render_caddyfile_for
from kimi_fleet.resolve import Resolved
from kimi_fleet.stackfile import load_stack_config, stack_file
from kimi_fleet.verification import run_suite
from tests.fakes.harness import free_port, start_caddy, start_fake_engine

API_KEY = "stack-proxy-test-key-0123456789"


@pytest.fixture
def mi300x_node():
    """Two fake SGLang engines and the stack's Caddyfile pointed at them."""
    r = Resolved(load_stack_config(stack_file("mi300x-int4-sglang")).spec())
    launch = render_launch(r)
    assert len(launch.instances) == 2
    with ExitStack() as stack:
        engines = [stack.enter_context(start_fake_engine("good", "sglang", r.spec.model.served_name))
                   for _ in launch.instances]
        # The engines' loopback ports are taken from the fakes; everything else is the stack's.
        local = dataclasses.replace(launch, instances=tuple(
            dataclasses.replace(instance, port=engine.port) for instance, engine in zip(launch.instances, engines)))
        https_port = free_port()
        caddyfile = render_caddyfile_for(r, local, domain="localhost", tls="internal", acme_email=None,
                                         https_port=https_port, http_port=free_port(), bind_host="127.0.0.1",
                                         local_port=free_port())
        base_url = f"https://localhost:{https_port}/v1"
        caddy = stack.enter_context(start_caddy(caddyfile, {"KIMI_API_KEY": API_KEY}, ready_url=f"{base_url}/models"))
        yield base_url, caddy, engines, r.spec.model.served_name


def test_key_required_and_streaming_through_the_stack_proxy(mi300x_node):
    base_url, caddy, _, model = mi300x_node
    report = run_suite(base_url, API_KEY, model, engine="sglang", only=["auth", "models", "health", "streaming"],
                       timeout=30, verify=str(caddy.root_ca))
    assert report.passed, report.to_dict()


def test_losing_one_engine_costs_at_most_one_request(mi300x_node):
    base_url, caddy, engines, model = mi300x_node
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "chat_template_kwargs": {"thinking": False}}
    with httpx.Client(verify=str(caddy.root_ca), timeout=30) as client:
        engines[0].process.terminate()
        engines[0].process.wait(timeout=10)
        statuses = [client.post(f"{base_url}/chat/completions", json=body, headers=headers).status_code
                    for _ in range(10)]
    # The request that finds the engine gone may fail once; then that engine is out of rotation.
    assert statuses.count(200) >= 9, statuses
