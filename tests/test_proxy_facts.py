"""The proxy facts AuthProxy registers (and the policy pack checks) say what the Caddyfile does:
held against real Caddy's own adaptation of every stack's Caddyfile (`caddy adapt`)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from kimi_fleet import k8s_manifests
from kimi_fleet.launch import render_launch
from kimi_fleet.node_files import render_proxy_for
from kimi_fleet.resolve import Resolved
from kimi_fleet.stackfile import load_stack_config, stack_file
from tests.matrix import PLANNED_STACKS

pytestmark = pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy missing")
RELEASE = "0123456789abcdef"


def adapted(text: str, tmp_path) -> dict:
    path = tmp_path / "Caddyfile"
    path.write_text(text)
    result = subprocess.run(["caddy", "adapt", "--config", str(path), "--adapter", "caddyfile"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _handlers(node, name):
    if isinstance(node, dict):
        if node.get("handler") == name:
            yield node
        for value in node.values():
            yield from _handlers(value, name)
    elif isinstance(node, list):
        for value in node:
            yield from _handlers(value, name)


def _is_key_gate(route: dict, key_env: str, previous_key_env: str | None = None) -> bool:
    accepted = [key_env] + ([previous_key_env] if previous_key_env else [])
    bearer = {"header": {"Authorization": [f"Bearer {{env.{env}}}" for env in accepted]}}
    refuses = any(h.get("handler") == "static_response" and h.get("status_code") == 401 for h in route.get("handle", []))
    return refuses and any(m.get("not") == [bearer] for m in route.get("match", []))


def gate_precedes_every_proxy(routes: list, key_env: str, previous_key_env: str | None = None) -> bool:
    """In each route list that reaches a reverse_proxy, a 401 key gate comes first."""
    gate_seen = False
    for route in routes:
        if _is_key_gate(route, key_env, previous_key_env):
            gate_seen = True
        for handler in route.get("handle", []):
            if handler.get("handler") == "reverse_proxy" and not gate_seen:
                return False
            if handler.get("handler") == "subroute" and not gate_precedes_every_proxy(handler["routes"], key_env,
                                                                                      previous_key_env):
                if not gate_seen:
                    return False
    return True


def listen_of(address: str) -> str:
    if address.startswith("http://"):
        return address.removeprefix("http://")
    return ":443"


def proxies(name: str, *, rotation: bool = False):
    spec = load_stack_config(stack_file(name)).spec()
    if rotation:  # a key rotation's overlap: both keys open the endpoint
        spec = spec.model_copy(update={"api_key_rotation": type(spec.api_key_rotation)(generation=1,
                                                                                        accept_previous=True)})
    r = Resolved(spec)
    launch = render_launch(r)
    if r.target.renders_manifests:
        return k8s_manifests.render_pod_proxy(r, launch, RELEASE)
    return render_proxy_for(r, launch, release=RELEASE)


@pytest.mark.parametrize("rotation", [False, True], ids=["one-key", "rotation-overlap"])
@pytest.mark.parametrize("name", PLANNED_STACKS)
def test_the_facts_say_what_caddy_makes_of_the_text(name, rotation, tmp_path):
    rendered = proxies(name, rotation=rotation)
    config = adapted(rendered.text, tmp_path)
    facts = rendered.facts
    assert (config.get("admin") == {"disabled": True}) is facts["adminOff"] is True
    servers = {tuple(server["listen"]): server for server in config["apps"]["http"]["servers"].values()}
    assert len(servers) >= len(facts["sites"])
    for site in facts["sites"]:
        server = servers[(listen_of(site["address"]),)]
        dials = {u["dial"] for h in _handlers(server, "reverse_proxy") for u in h["upstreams"]}
        assert dials == set(site["upstreams"]), site["address"]
        if site["keyRequired"]:
            routes = server["routes"][0]["handle"][0]["routes"]
            assert (site["previousKeyEnv"] is not None) is rotation
            assert gate_precedes_every_proxy(routes, site["keyEnv"], site["previousKeyEnv"])
            assert any(_is_key_gate(route, site["keyEnv"], site["previousKeyEnv"]) for route in routes)
        else:
            assert not dials and list(_handlers(server, "file_server"))


def test_the_cross_check_catches_a_caddyfile_that_drops_the_key(tmp_path):
    rendered = proxies("h200-int4-sglang")
    # Drop the site's own refusals (one tab deep); the status route keeps its own.
    text = "\n".join(line for line in rendered.text.split("\n") if not line.startswith("\trespond @"))
    config = adapted(text, tmp_path)
    server = next(s for s in config["apps"]["http"]["servers"].values() if s["listen"] == [":443"])
    assert not gate_precedes_every_proxy(server["routes"][0]["handle"][0]["routes"], "KIMI_API_KEY")
    assert gate_precedes_every_proxy(adapted(rendered.text, tmp_path)["apps"]["http"]["servers"]["srv0"]["routes"][0]
                                     ["handle"][0]["routes"], "KIMI_API_KEY")
