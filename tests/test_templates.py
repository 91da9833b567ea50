"""Node files come from template files through one strict mechanism (issue 13, item 4)."""

from __future__ import annotations

from importlib import resources

import pytest

from kimi_fleet import node_files, node_guard, templates
from kimi_fleet.artifacts import render_artifacts
from kimi_fleet.launch import render_launch, replica_launches
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import load_stack_config, stack_file

TEMPLATE_FILES = sorted(p.name for p in resources.files("kimi_fleet.templates").iterdir()
                        if p.is_file() and not p.name.endswith(".py"))


def test_rendering_refuses_a_missing_or_an_unused_value():
    with pytest.raises(KeyError, match=r"no value for \['GPU_FREE_TIMEOUT'\]"):
        templates.render("wait_gpus_free.sh")
    with pytest.raises(KeyError, match=r"no marker for \['EXTRA'\]"):
        templates.render("engine_run.sh", EXTRA="x")


def test_a_value_is_never_scanned_for_markers():
    text = templates.render("kimi-watchdog.timer", INTERVAL_SECONDS="__SBIN__")
    assert "__SBIN__" in text  # substituted once, as given


def test_every_template_file_is_rendered_and_no_marker_survives():
    r = Resolved(load_stack_config(stack_file("mi300x-int4-sglang")).spec())
    launch = render_launch(r)
    files = node_files.render_node_files(r, launch, size(r), secrets=node_files.SecretsSource("files"))
    texts = [f.content for f in files.values()] + list(node_files.render_node_artifacts(r, size(r), launch).values())
    # The opt-in firewall's rules, as a host with firewall: true gets them.
    texts.append(node_guard.render_firewall(enabled=True, ssh_port=22, ssh_allowlist=("203.0.113.0/24",), stack="s"))
    # The managed mirror's fill instance (a stack with weights.mirror: managed).
    managed = Resolved(load_stack_config(stack_file("h200-int4-vllm")).spec())
    texts.append(render_artifacts(managed, size(managed), render_launch(managed))["mirror-fill-user-data.yaml"])
    # A multi-node rank's EFA engine image (its release carries the Dockerfile), and, with the ranks'
    # addresses known as on a deployed replica, the unit that publishes its engine's start.
    multi = Resolved(load_stack_config(stack_file("h100-int4-vllm")).spec())
    texts += [f.content for f in node_files.render_node_files(
        multi, replica_launches(multi, ("10.0.0.5", "10.0.0.6"))[1], size(multi),
        secrets=node_files.SecretsSource("files"),
        ebs_volume_id="vol-0123456789abcdef0", node_rank=1).values()]
    for text in texts:
        assert not templates.MARKER.search(text), text[:200]
    # Each template shows up in a node file or a review artifact, by its longest plain line.
    for name in TEMPLATE_FILES:
        distinctive = max((line for line in templates.source(name).splitlines() if not templates.MARKER.search(line)),
                          key=len)
        assert any(distinctive in text for text in texts), name


@pytest.mark.parametrize("module", ["node_files.py", "node_guard.py"])
def test_the_renderers_hold_no_script_unit_or_config_text(module):
    source = (resources.files("kimi_fleet") / module).read_text()
    for marker in ("#!/bin/bash", "[Unit]", "[Service]", "ExecStart=", "set -euo pipefail", "[Definition]",
                   "chain input", "protocol = tcp"):
        assert marker not in source, marker
