"""The gate waits until a fleet's load balancer sends traffic only to nodes of the new release
(issue 9, item 3), read from AWS rather than sampled through the load balancer
(scripts/await_fleet_release.py).

AWS is played by botocore's Stubber, which checks every request's parameters and every response
against AWS's own API model: moto (used elsewhere) has no DescribeInstanceRefreshes and reports
every Auto Scaling instance at the template's default version, not the version it launched from.
The wait's clock and sleep are injected: no test here waits in real time."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import boto3
from botocore.stub import Stubber

from kimi_fleet import health
from tooling.mock_run import run_stack

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("await_fleet_release", ROOT / "scripts" / "await_fleet_release.py")
fleet_release = sys.modules["await_fleet_release"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fleet_release)

GROUP = "kimi-h200-batch-asg"
TG_HTTPS = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/kimi-443/0123456789abcdef"
TG_HTTP = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/kimi-80/fedcba9876543210"
RELEASE = "0123456789abcdef"
NEW, OLD = "7", "6"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _instance(instance_id: str, version: str) -> dict:
    return {"InstanceId": instance_id, "AvailabilityZone": "us-east-1a", "LifecycleState": "InService",
            "HealthStatus": "Healthy", "ProtectedFromScaleIn": False,
            "LaunchTemplate": {"LaunchTemplateId": "lt-0123456789abcdef0", "LaunchTemplateName": "kimi",
                               "Version": version}}


def _poll(autoscaling: Stubber, elbv2: Stubber, members: dict[str, str], healthy: dict[str, list[str]],
          refresh: tuple[str, str] | None = ("InProgress", ""), desired: int = 2) -> None:
    """The calls of one poll, in order, with AWS's answers."""
    autoscaling.add_response("describe_auto_scaling_groups", {"AutoScalingGroups": [{
        "AutoScalingGroupName": GROUP, "MinSize": 1, "MaxSize": 3, "DesiredCapacity": desired, "DefaultCooldown": 300,
        "AvailabilityZones": ["us-east-1a"], "HealthCheckType": "ELB", "CreatedTime": "2026-12-01T00:00:00Z",
        "Instances": [_instance(i, v) for i, v in members.items()]}]}, {"AutoScalingGroupNames": [GROUP]})
    for arn in (TG_HTTPS, TG_HTTP):
        elbv2.add_response("describe_target_health", {"TargetHealthDescriptions": [
            {"Target": {"Id": i, "Port": 443}, "TargetHealth": {"State": "healthy"}} for i in healthy.get(arn, [])]},
            {"TargetGroupArn": arn})
    refreshes = [] if refresh is None else [{"InstanceRefreshId": "r-1", "AutoScalingGroupName": GROUP,
                                             "Status": refresh[0], "PercentageComplete": 50,
                                             **({"StatusReason": refresh[1]} if refresh[1] else {})}]
    autoscaling.add_response("describe_instance_refreshes", {"InstanceRefreshes": refreshes},
                             {"AutoScalingGroupName": GROUP, "MaxRecords": 1})


def _run(polls, *, replicas: int = 2, timeout: float = 3600) -> tuple[int, Clock]:
    autoscaling = boto3.client("autoscaling", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    elbv2 = boto3.client("elbv2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    clock = Clock()
    with Stubber(autoscaling) as a, Stubber(elbv2) as e:
        for poll in polls:
            _poll(a, e, **poll)
        args = fleet_release.parse_args([
            "--region", "us-east-1", "--group", GROUP, "--target-group", TG_HTTPS, "--target-group", TG_HTTP,
            "--template-version", NEW, "--release", RELEASE, "--replicas", str(replicas), "--timeout", str(timeout)])
        status = fleet_release.wait(autoscaling, elbv2, args, sleep=clock.sleep, clock=clock)
        a.assert_no_pending_responses()
        e.assert_no_pending_responses()
    return status, clock


def both(*ids: str) -> dict[str, list[str]]:
    return {TG_HTTPS: list(ids), TG_HTTP: list(ids)}


def test_done_only_once_no_old_node_takes_traffic(capsys):
    rolling = {"i-new1": NEW, "i-new2": NEW, "i-old2": OLD}
    status, clock = _run([
        dict(members={"i-old1": OLD, "i-old2": OLD}, healthy=both("i-old1", "i-old2")),
        dict(members={"i-new1": NEW, "i-old2": OLD}, healthy=both("i-new1", "i-old2")),
        # Two new nodes healthy, but the old one still receives traffic: not yet.
        dict(members=rolling, healthy=both("i-new1", "i-new2", "i-old2")),
        dict(members={"i-new1": NEW, "i-new2": NEW}, healthy=both("i-new1", "i-new2"), refresh=("Successful", "")),
    ])
    out = capsys.readouterr().out
    assert status == 0 and clock.now == 3 * fleet_release.POLL_SECONDS
    assert "still healthy on another: i-old1 (version 6), i-old2 (version 6)" in out
    assert f"release {RELEASE} (template version {NEW}) on every healthy target" in out


def test_fewer_healthy_new_nodes_than_replicas_is_not_done():
    status, _ = _run([dict(members={"i-new1": NEW, "i-new2": NEW}, healthy=both("i-new1"))] * 2,
                     timeout=fleet_release.POLL_SECONDS)
    assert status == 1


def test_a_scaling_fleet_counts_the_groups_desired_replicas_not_the_stacks_create_time_count():
    """A policy that scaled the group out to 3 since the stack was created at 2: two new nodes
    healthy leave the third replica on no release; one scaled in to 1 is done with one."""
    scaled_out = dict(members={"i-new1": NEW, "i-new2": NEW, "i-new3": NEW}, healthy=both("i-new1", "i-new2"),
                      desired=3)
    status, _ = _run([scaled_out] * 2, replicas=2, timeout=fleet_release.POLL_SECONDS)
    assert status == 1
    status, clock = _run([dict(members={"i-new1": NEW}, healthy=both("i-new1"), desired=1,
                               refresh=("Successful", ""))], replicas=2)
    assert status == 0 and clock.now == 0


def test_a_target_group_that_still_routes_to_an_old_node_is_not_done(capsys):
    # One listener's group already on the new nodes, the other still on an old one.
    status, _ = _run([dict(members={"i-new1": NEW, "i-new2": NEW},
                           healthy={TG_HTTPS: ["i-new1", "i-new2"], TG_HTTP: ["i-new1", "i-gone"]})] * 2,
                     timeout=fleet_release.POLL_SECONDS)
    assert status == 1
    assert "i-gone (version not in the group)" in capsys.readouterr().err


def test_a_rolled_back_refresh_fails_at_once_naming_the_release(capsys):
    status, clock = _run([dict(members={"i-old1": OLD, "i-old2": OLD}, healthy=both("i-old1", "i-old2"),
                               refresh=("RollbackSuccessful", "The instance refresh was rolled back: health checks"))])
    err = capsys.readouterr().err
    assert status == 1 and clock.now == 0
    assert f"release {RELEASE}: the instance refresh ended RollbackSuccessful (The instance refresh was rolled " \
           f"back: health checks)" in err


def test_time_out_names_the_release_and_what_still_serves():
    status, clock = _run([dict(members={"i-old1": OLD}, healthy=both("i-old1"), refresh=None)] * 4,
                         replicas=1, timeout=3 * fleet_release.POLL_SECONDS)
    assert status == 1 and clock.now == 3 * fleet_release.POLL_SECONDS


def test_the_fleet_gate_waits_for_the_release_before_the_suite():
    """Under the mocks: a fleet stack's gate runs the wait with its own group, target groups and
    template version first; a single-node stack's gate does not (it has no load balancer)."""
    run = run_stack("h200-int4-vllm")
    assert run.error is None, run.error
    (gate,) = [r for r in run.of_type("command:local:Command") if r["name"].endswith("-gate-verify")]
    create = gate["inputs"]["create"]
    _, wait, verify, promote = create.split(" && ")
    (group,) = run.of_type("aws:autoscaling/group:Group")
    # The gate starts the refresh itself (rollout mode) and promotes a compile cache only after the suite.
    (template,) = run.of_type("aws:ec2/launchTemplate:LaunchTemplate")
    assert f"--launch-template-id {template['name']}-id " in wait
    assert "--min-healthy-percentage " in wait and "--max-healthy-percentage " in wait
    # InService means admitted (the launch hook), so the warm-up is the load balancer's own checks.
    assert int(wait.split("--instance-warmup ")[1].split()[0]) == health.REFRESH_WARMUP_SECONDS
    assert "scripts/promote_compile_cache.py" in promote and "--group " in promote
    groups = run.of_type("aws:lb/targetGroup:TargetGroup")
    assert wait.startswith(".venv/bin/python scripts/await_fleet_release.py --region us-east-1 ")
    assert f"--group {group['name']} " in wait
    assert wait.count("--target-group arn:") == len(groups) == 2
    # The template version the group launches from, as the group itself names it.
    launched_from = group["inputs"]["mixedInstancesPolicy"]["launchTemplate"]["launchTemplateSpecification"]
    assert f"--template-version {launched_from['version']} " in wait
    assert "--replicas 2 " in wait
    assert "scripts/verify.py" in verify and "--release" in verify
    single = run_stack("h200-int4-sglang")
    (single_gate,) = [r for r in single.of_type("command:local:Command") if r["name"].endswith("-gate-verify")]
    assert "await_fleet_release" not in single_gate["inputs"]["create"]
    # The gate's own timeout covers the rollout and the suite.
    timeout = int(gate["timeouts"]["create"].rstrip("s"))
    assert timeout > int(wait.split("--timeout ")[1].split()[0])
    json.dumps(gate["inputs"])  # plain data


def test_the_fleet_gate_allows_every_replica_its_whole_admission():
    """A review found the gate gave up at 2 x cold start x replicas while each replaced replica needs
    its whole grace period (boot to self-verified, the launch hook's wait): every good release would
    have rolled back."""
    run = run_stack("h200-int4-vllm")
    (gate,) = [r for r in run.of_type("command:local:Command") if r["name"].endswith("-gate-verify")]
    (group,) = run.of_type("aws:autoscaling/group:Group")
    wait = gate["inputs"]["create"].split(" && ")[1]
    timeout = float(wait.split("--timeout ")[1].split()[0])
    replicas = int(wait.split("--replicas ")[1].split()[0])
    assert timeout >= replicas * group["inputs"]["healthCheckGracePeriod"], (timeout, replicas)


def test_an_old_node_still_draining_keeps_the_release_waiting(capsys):
    """The refresh says Successful and every healthy target is new, but an old node is still in the group
    (draining, Terminating:Wait): not done until it has left, so the `pulumi up` that may retire the old
    release's node rights (kimi_fleet/lifecycle_rights.py) does not end while it still needs them."""
    new_nodes = both("i-new1", "i-new2")
    status, clock = _run([
        dict(members={"i-new1": NEW, "i-new2": NEW, "i-old1": OLD}, healthy=new_nodes, refresh=("Successful", "")),
        dict(members={"i-new1": NEW, "i-new2": NEW}, healthy=new_nodes, refresh=("Successful", "")),
    ])
    assert status == 0 and clock.now == fleet_release.POLL_SECONDS
    assert "still in the group on another version (draining): i-old1 (version 6)" in capsys.readouterr().out
