"""Health windows from the sizing (issue 20, item 3): kimi_fleet/health.py, the one source of the
watchdog's windows, the load balancer's check and the Auto Scaling group's grace period."""

from __future__ import annotations

import json

import pytest

from kimi_fleet import health, node_files
from kimi_fleet.launch import render_launch
from kimi_fleet.node_files import SecretsSource, render_node_files
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import load_stack_config, stack_file

FLEET, SINGLE = "h200-int4-vllm", "h200-int4-sglang"


def _windows(stack: str) -> tuple[health.HealthWindows, object]:
    r = Resolved(load_stack_config(stack_file(stack)).spec())
    sizing = size(r)
    return health.windows(sizing, verification_seconds=node_files.ADMISSION_DEADLINE_SECONDS,
                          fleet=node_files.behind_load_balancer(r)), sizing


def test_the_grace_period_covers_the_whole_time_to_ready_term_by_term():
    w, sizing = _windows(FLEET)
    # The finding: a grace shorter than the cold start plus the pull plus the self-verification.
    assert w.grace_period_seconds > (sizing.cold_start_seconds + health.IMAGE_PULL_SECONDS
                                     + node_files.ADMISSION_DEADLINE_SECONDS)
    assert w.grace_period_seconds == sum(w.grace_terms.values())
    # The read counts the engine's default loader where a faster one is adopted (Sizing.budget_seconds).
    assert w.grace_terms["download"] == sizing.download_seconds
    assert w.grace_terms["read"] == sizing.budget_seconds("read") >= sizing.read_seconds
    assert w.grace_terms["self-verification"] == node_files.ADMISSION_DEADLINE_SECONDS


def test_a_restart_always_comes_before_replacement():
    w, sizing = _windows(FLEET)
    assert w.load_budget_seconds > health.IMAGE_PULL_SECONDS + sizing.read_seconds + sizing.load_seconds
    # The dead window holds the first load, a restart with its full budget, and the stall detection.
    assert w.dead_window_seconds > 2 * w.load_budget_seconds + w.stall_detection_seconds
    assert w.dead_window_seconds == sum(w.dead_window_terms.values())
    # Minutes, not one probe, before a node leaves its load balancer.
    assert w.stalled_probes >= 2 and w.lb_unhealthy_threshold >= 2 and w.lb_leave_seconds >= 120


def test_only_a_fleet_replaces_a_dead_node_and_the_plan_lines_say_which():
    fleet, _ = _windows(FLEET)
    single, _ = _windows(SINGLE)
    assert fleet.replace_dead_node and not single.replace_dead_node
    assert "powers itself off and its Auto Scaling group (EC2 health) replaces it" in "\n".join(fleet.lines())
    assert "nothing replaces it" in "\n".join(single.lines())
    assert f"group health check grace {fleet.grace_period_seconds} s = boot" in "\n".join(fleet.lines())
    settings = health.watchdog_settings(fleet)
    assert settings["dead_window_seconds"] == fleet.dead_window_seconds and settings["replace_dead_node"] is True
    assert settings["failures"] == fleet.stalled_probes  # the name the watchdog always read


@pytest.mark.parametrize("stack", [FLEET, SINGLE])
def test_the_node_receives_the_windows_of_its_stack(stack):
    r = Resolved(load_stack_config(stack_file(stack)).spec())
    files = render_node_files(r, render_launch(r), size(r), secrets=SecretsSource("files"),
                              ebs_volume_id=node_files.EBS_VOLUME_PLACEHOLDER)
    facts = json.loads(files[f"{node_files.ENV_DIR}/stack.json"].content)
    w, _ = _windows(stack)
    assert facts["watchdog"] == health.watchdog_settings(w)
    assert facts["watchdog"]["replace_dead_node"] is (stack == FLEET)


def test_the_watchdog_unit_outlasts_its_longest_run():
    """The watchdog's own unit may not kill a run that is still within its windows: per engine a
    probe and two /metrics reads around it, two probes through Caddy, and the admission run."""
    from kimi_fleet.node_scripts.generation_probe import METRICS_TIMEOUT_SECONDS

    for engines in (1, 2):
        unit = node_files._watchdog_unit(engines)
        (timeout,) = [int(line.split("=", 1)[1]) for line in unit.splitlines() if line.startswith("TimeoutStartSec=")]
        longest = ((engines + 2) * health.GENERATION_PROBE_TIMEOUT_SECONDS + 2 * engines * METRICS_TIMEOUT_SECONDS
                   + node_files.ADMISSION_DEADLINE_SECONDS)
        assert timeout > longest, (engines, timeout, longest)


def test_the_load_balancer_drops_a_node_only_after_minutes_of_failed_checks():
    from tooling.mock_run import run_stack

    run = run_stack(FLEET)
    assert run.error is None, run.error
    groups = run.of_type("aws:lb/targetGroup:TargetGroup")
    assert len(groups) == 2
    for group in groups:
        check = group["inputs"]["healthCheck"]
        assert (check["interval"], check["unhealthyThreshold"], check["healthyThreshold"], check["timeout"]) == (
            health.LB_INTERVAL_SECONDS, health.LB_UNHEALTHY_THRESHOLD, health.LB_HEALTHY_THRESHOLD,
            health.LB_TIMEOUT_SECONDS)
        assert check["interval"] * check["unhealthyThreshold"] >= 60
