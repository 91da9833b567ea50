"""A fleet release that fails its gate really goes back (issue 20, item 2): the gate starts the
instance refresh itself with a DesiredConfiguration naming the new launch template version, so the
group's own configuration stays on the last good version until the refresh succeeded, and a failure
is rolled back until the group is configured with, and runs only, the last good version
(scripts/await_fleet_release.py, rollout mode).

AWS is botocore's Stubber: every request's parameters and every answer are checked against AWS's
own API model (moto has no StartInstanceRefresh rollback). The clock is injected: nothing waits."""

from __future__ import annotations

import boto3
from botocore.stub import Stubber

from tests.test_fleet_release import GROUP, NEW, OLD, RELEASE, TG_HTTP, TG_HTTPS, Clock, _instance, both, fleet_release

TEMPLATE = "lt-0123456789abcdef0"
DISTRIBUTION = {"OnDemandBaseCapacity": 1, "OnDemandPercentageAboveBaseCapacity": 0,
                "SpotAllocationStrategy": "price-capacity-optimized"}
OVERRIDES = [{"InstanceType": "p5en.48xlarge"}]


def _policy(version: str) -> dict:
    return {"LaunchTemplate": {"LaunchTemplateSpecification": {"LaunchTemplateId": TEMPLATE, "Version": version},
                               "Overrides": OVERRIDES},
            "InstancesDistribution": DISTRIBUTION}


def _group(autoscaling: Stubber, configured: str, members: dict[str, str], unhealthy: tuple[str, ...] = ()) -> None:
    instances = [{**_instance(i, v), "HealthStatus": "Unhealthy" if i in unhealthy else "Healthy"}
                 for i, v in members.items()]
    autoscaling.add_response("describe_auto_scaling_groups", {"AutoScalingGroups": [{
        "AutoScalingGroupName": GROUP, "MinSize": 2, "MaxSize": 2, "DesiredCapacity": 2, "DefaultCooldown": 300,
        "AvailabilityZones": ["us-east-1a"], "HealthCheckType": "EC2", "CreatedTime": "2026-12-01T00:00:00Z",
        "MixedInstancesPolicy": _policy(configured), "Instances": instances}]}, {"AutoScalingGroupNames": [GROUP]})


def _poll(autoscaling: Stubber, elbv2: Stubber, configured: str, members: dict[str, str], healthy: list[str],
          refresh: str, unhealthy: tuple[str, ...] = ()) -> None:
    _group(autoscaling, configured, members, unhealthy)
    for arn in (TG_HTTPS, TG_HTTP):
        elbv2.add_response("describe_target_health", {"TargetHealthDescriptions": [
            {"Target": {"Id": i, "Port": 443}, "TargetHealth": {"State": "healthy"}} for i in healthy]},
            {"TargetGroupArn": arn})
    autoscaling.add_response("describe_instance_refreshes", {"InstanceRefreshes": [
        {"InstanceRefreshId": "r-1", "AutoScalingGroupName": GROUP, "Status": refresh, "PercentageComplete": 50}]},
        {"AutoScalingGroupName": GROUP, "MaxRecords": 1})


def _start_expected(autoscaling: Stubber, version: str) -> None:
    autoscaling.add_response("start_instance_refresh", {"InstanceRefreshId": "r-1"}, {
        "AutoScalingGroupName": GROUP, "Strategy": "Rolling",
        # The group's own policy, only the version changed: the market and the overrides stay.
        "DesiredConfiguration": {"MixedInstancesPolicy": _policy(version)},
        # A node busy with requests protects itself from scale-in: the refresh still replaces it (its
        # drain hook holds it until idle); Wait, AWS's default, would hold the refresh up to an hour, then fail it.
        "Preferences": {"MinHealthyPercentage": 100, "MaxHealthyPercentage": 150, "InstanceWarmup": 2400,
                        "SkipMatching": True, "ScaleInProtectedInstances": "Refresh", "AutoRollback": True}})


def _run(script) -> tuple[int, Clock]:
    autoscaling = boto3.client("autoscaling", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    elbv2 = boto3.client("elbv2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    clock = Clock()
    with Stubber(autoscaling) as a, Stubber(elbv2) as e:
        script(a, e)
        args = fleet_release.parse_args([
            "--region", "us-east-1", "--group", GROUP, "--target-group", TG_HTTPS, "--target-group", TG_HTTP,
            "--template-version", NEW, "--release", RELEASE, "--replicas", "2", "--timeout", "7200",
            "--launch-template-id", TEMPLATE, "--min-healthy-percentage", "100", "--max-healthy-percentage", "150",
            "--instance-warmup", "2400"])
        status = fleet_release.rollout(autoscaling, elbv2, args, sleep=clock.sleep, clock=clock)
        a.assert_no_pending_responses()
        e.assert_no_pending_responses()
    return status, clock


OLD_NODES = {"i-old1": OLD, "i-old2": OLD}


def test_a_new_version_that_fails_its_gate_leaves_the_group_on_the_last_good_version(capsys):
    def script(a: Stubber, e: Stubber) -> None:
        _group(a, OLD, OLD_NODES)
        _start_expected(a, NEW)
        # The surge node loads; the old ones serve.
        _poll(a, e, OLD, {**OLD_NODES, "i-new1": NEW}, ["i-old1", "i-old2"], "InProgress")
        # Its watchdog found its load over budget twice and marked it unhealthy: the gate failed.
        _poll(a, e, OLD, {**OLD_NODES, "i-new1": NEW}, ["i-old1", "i-old2"], "InProgress", unhealthy=("i-new1",))
        a.add_response("rollback_instance_refresh", {"InstanceRefreshId": "r-1"}, {"AutoScalingGroupName": GROUP})
        _poll(a, e, OLD, {**OLD_NODES, "i-new1": NEW}, ["i-old1", "i-old2"], "RollbackInProgress",
              unhealthy=("i-new1",))
        # Back: configured with the last good version, running only it, every target on it.
        _poll(a, e, OLD, OLD_NODES, ["i-old1", "i-old2"], "RollbackSuccessful")

    status, clock = _run(script)
    err = capsys.readouterr().err
    assert status == 1
    assert (f"fleet: release {RELEASE} failed: node(s) i-new1 of version {NEW} marked unhealthy (their watchdog's "
            f"verdict") in err
    assert f"release {RELEASE} rolled back: node(s) i-new1" in err
    assert f"group {GROUP} is back on version {OLD} (last good)" in err
    assert clock.now == 2 * fleet_release.POLL_SECONDS  # failed at the poll that saw it, not at the deadline


def test_a_refresh_aws_already_rolled_back_is_confirmed_back_before_failing(capsys):
    def script(a: Stubber, e: Stubber) -> None:
        _group(a, OLD, OLD_NODES)
        _start_expected(a, NEW)
        _poll(a, e, OLD, OLD_NODES, ["i-old1", "i-old2"], "RollbackSuccessful")  # no rollback call: AWS did it
        _poll(a, e, OLD, OLD_NODES, ["i-old1", "i-old2"], "RollbackSuccessful")

    status, _ = _run(script)
    err = capsys.readouterr().err
    assert status == 1 and "the instance refresh ended RollbackSuccessful" in err
    assert f"back on version {OLD} (last good)" in err


def test_a_rollback_that_leaves_a_new_node_is_not_called_back(capsys):
    """The group configured back but still running a node of the new version: not back yet; at the
    deadline the failure says the rollback did not finish."""
    def script(a: Stubber, e: Stubber) -> None:
        _group(a, OLD, OLD_NODES)
        _start_expected(a, NEW)
        _poll(a, e, OLD, OLD_NODES, ["i-old1", "i-old2"], "Failed")
        for _ in range(int(7200 / fleet_release.POLL_SECONDS) + 1):
            _poll(a, e, OLD, {**OLD_NODES, "i-new1": NEW}, ["i-old1", "i-old2"], "Failed")

    status, _ = _run(script)
    err = capsys.readouterr().err
    assert status == 1 and "the rollback did not bring group" in err and "rolled back:" not in err


def test_a_release_that_passes_is_recorded_as_the_group_s_good_version(capsys):
    def script(a: Stubber, e: Stubber) -> None:
        _group(a, OLD, OLD_NODES)
        _start_expected(a, NEW)
        _poll(a, e, OLD, {**OLD_NODES, "i-new1": NEW}, ["i-old1", "i-old2", "i-new1"], "InProgress")
        # AWS moves the group to the new version only when its refresh succeeded.
        _poll(a, e, NEW, {"i-new1": NEW, "i-new2": NEW}, ["i-new1", "i-new2"], "Successful")

    status, _ = _run(script)
    out = capsys.readouterr().out
    assert status == 0
    assert f"instance refresh r-1 of {GROUP} from version {OLD} (last good) to {NEW}" in out
    assert f"release {RELEASE} (template version {NEW}) on every healthy target and recorded as the group's good" in out


def test_a_group_already_on_the_release_starts_nothing():
    def script(a: Stubber, e: Stubber) -> None:
        _group(a, NEW, {"i-new1": NEW, "i-new2": NEW})
        both_new = both("i-new1", "i-new2")
        _poll(a, e, NEW, {"i-new1": NEW, "i-new2": NEW}, both_new[TG_HTTPS], "Successful")

    status, _ = _run(script)
    assert status == 0  # no start_instance_refresh: the Stubber would fail on an unexpected call


def test_a_passing_release_waits_for_the_old_nodes_still_draining(capsys):
    """AWS may call the refresh Successful while an old node still drains (Terminating:Wait). The gate ends
    only once it has left: its success ends the `pulumi up` that may retire the old release's direct
    lifecycle rights (kimi_fleet/lifecycle_rights.py), which that node needs to end its drain when idle."""
    def script(a: Stubber, e: Stubber) -> None:
        _group(a, OLD, OLD_NODES)
        _start_expected(a, NEW)
        new_nodes = {"i-new1": NEW, "i-new2": NEW}
        _poll(a, e, NEW, {**new_nodes, "i-old2": OLD}, ["i-new1", "i-new2"], "Successful")
        _poll(a, e, NEW, new_nodes, ["i-new1", "i-new2"], "Successful")

    status, clock = _run(script)
    assert status == 0 and clock.now == fleet_release.POLL_SECONDS
    assert "still in the group on another version (draining): i-old2 (version 6)" in capsys.readouterr().out
