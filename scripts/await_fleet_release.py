#!/usr/bin/env python3
"""Wait until an AWS fleet's load balancer sends traffic only to nodes of the new release (run by
the verification gate before the suite, for stacks behind a load balancer); with
--launch-template-id, first start the release's instance refresh itself and roll it back when it fails.

    await_fleet_release.py --region R --group ASG --target-group ARN [--target-group ARN ...] \\
        --template-version V --release ID --replicas N --timeout SECONDS \\
        [--launch-template-id LT --min-healthy-percentage P --max-healthy-percentage P --instance-warmup S]

Rollout (--launch-template-id): the group's own configuration is the record of the last good
release. Pulumi leaves it alone (the provider stores a new version on the group before its own
refresh starts, so that refresh's "rollback" relaunches the new version: terraform-provider-aws
#34189); this script starts the refresh with a DesiredConfiguration naming version V and
AutoRollback. AWS moves the group to V only when the refresh succeeds. A refresh that fails, a
node of V that marks itself unhealthy (its watchdog's verdict: a load over budget, a crash loop)
or a release that does not reach every replica in time is rolled back (RollbackInstanceRefresh):
the script waits until the group is configured with, and runs only, the last good version again,
then fails naming the release, the node and the cause. Old nodes serve throughout (the refresh
keeps MinHealthyPercentage of them). When the group already runs V, there is nothing to start.

A release is a launch template version: the fleet's instance refresh replaces every node, and a node
is a healthy target only once its watchdog proved it (the node's own run of the suite). So the
release has reached every replica exactly when, in every target group, every healthy target is an
instance of the group launched from version V, and at least N of them are healthy. This is read
from AWS (Auto Scaling and the target groups' health), not sampled through the load balancer.

Every 20 s it checks; one progress line a minute. An instance refresh that failed, was cancelled or
rolled back fails at once, naming the release and AWS's reason. Exit 0 when done, 1 otherwise.
Uses the caller's AWS credentials (boto3's usual chain).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass

import boto3
from botocore.exceptions import BotoCoreError, ClientError

POLL_SECONDS = 20
#: The newest instance refresh in one of these will not bring the release.
REFRESH_ENDED_BADLY = {"Failed", "Cancelled", "RollbackInProgress", "RollbackSuccessful", "RollbackFailed"}
#: A refresh in one of these can still be rolled back.
REFRESH_RUNNING = {"Pending", "InProgress", "Baking"}
#: A rollback is over in one of these.
ROLLBACK_OVER = {"RollbackSuccessful", "RollbackFailed", "Cancelled", "Failed", "Successful"}


@dataclass
class FleetState:
    #: per target group: the ids of its healthy targets
    healthy: dict[str, set[str]]
    #: instance id -> the launch template version it was launched from (group members only)
    versions: dict[str, str]
    #: the newest instance refresh: (status, percentage, reason), or None
    refresh: tuple[str, int | None, str] | None
    #: the launch template version the group itself is configured with (the last good release)
    configured: str | None = None
    #: instance id -> version, of members Auto Scaling holds Unhealthy (a node's watchdog says so)
    unhealthy: dict[str, str] | None = None
    #: the group's DesiredCapacity: a scaling fleet's count is its policy's, not the stack's create-time one
    desired: int | None = None

    def on_release(self, version: str) -> set[str]:
        return {i for i, v in self.versions.items() if v == version}

    def on_other_versions(self, version: str) -> list[str]:
        """Members of another version still in the group: an old node draining (Terminating:Wait) after
        the refresh replaced it. Until it has left, the release is not done: the gate's success ends the
        `pulumi up` that may retire the old release's node rights (kimi_fleet/lifecycle_rights.py), which
        such a node still needs to end its drain when idle."""
        return sorted(i for i, v in self.versions.items() if v != version)

    def replicas_needed(self, replicas: int) -> int:
        """How many healthy nodes of the release make it done: the group's own desired count when AWS
        reports one (a scaling policy may have moved it away from --replicas since the stack was
        created), else --replicas."""
        return max(1, self.desired) if self.desired is not None else replicas

    def done(self, version: str, replicas: int) -> bool:
        fresh, needed = self.on_release(version), self.replicas_needed(replicas)
        return all(ids and ids <= fresh and len(ids) >= needed for ids in self.healthy.values())

    def describe(self, version: str) -> str:
        fresh = self.on_release(version)
        parts = []
        for arn, ids in self.healthy.items():
            others = sorted(i for i in ids if i not in fresh)
            stale = ", ".join(f"{i} (version {self.versions.get(i, 'not in the group')})" for i in others)
            parts.append(f"{arn.rsplit('/', 2)[-2] if '/' in arn else arn}: {len(ids) - len(others)} healthy on "
                         f"version {version}" + (f", still healthy on another: {stale}" if stale else ""))
        if self.on_other_versions(version):
            parts.append("still in the group on another version (draining): " + ", ".join(
                f"{i} (version {self.versions[i]})" for i in self.on_other_versions(version)))
        if self.refresh:
            status, percentage, _ = self.refresh
            parts.append(f"instance refresh {status}" + (f" {percentage}%" if percentage is not None else ""))
        return "; ".join(parts)


def read_state(autoscaling, elbv2, group: str, target_groups: list[str]) -> FleetState:
    groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"]
    if not groups:
        raise LookupError(f"Auto Scaling group {group} does not exist")
    versions, unhealthy = {}, {}
    for instance in groups[0].get("Instances", []):
        template = instance.get("LaunchTemplate") or {}
        if template.get("Version") is not None:
            versions[instance["InstanceId"]] = str(template["Version"])
            if instance.get("HealthStatus") == "Unhealthy":
                unhealthy[instance["InstanceId"]] = str(template["Version"])
    healthy = {}
    for arn in target_groups:
        descriptions = elbv2.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
        healthy[arn] = {d["Target"]["Id"] for d in descriptions if d["TargetHealth"]["State"] == "healthy"}
    refreshes = autoscaling.describe_instance_refreshes(AutoScalingGroupName=group, MaxRecords=1)
    newest = (refreshes.get("InstanceRefreshes") or [None])[0]
    refresh = None if newest is None else (newest["Status"], newest.get("PercentageComplete"),
                                           newest.get("StatusReason", ""))
    desired = groups[0].get("DesiredCapacity")
    return FleetState(healthy, versions, refresh, configured_version(groups[0]), unhealthy,
                      None if desired is None else int(desired))


def configured_version(group: dict) -> str | None:
    """The launch template version a group launches new instances from."""
    mixed = group.get("MixedInstancesPolicy")
    spec = (mixed["LaunchTemplate"]["LaunchTemplateSpecification"] if mixed else group.get("LaunchTemplate")) or {}
    return None if spec.get("Version") is None else str(spec["Version"])


def desired_configuration(group: dict, template_id: str, version: str) -> dict:
    """The group's own configuration with only the launch template version changed (a mixed
    instances policy keeps its distribution and overrides: the refresh must not change the market)."""
    spec = {"LaunchTemplateId": template_id, "Version": version}
    mixed = group.get("MixedInstancesPolicy")
    if not mixed:
        return {"LaunchTemplate": spec}
    policy = copy.deepcopy(mixed)
    policy["LaunchTemplate"]["LaunchTemplateSpecification"] = spec
    return {"MixedInstancesPolicy": policy}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--region", required=True)
    parser.add_argument("--group", required=True, help="the fleet's Auto Scaling group")
    parser.add_argument("--target-group", action="append", required=True, dest="target_groups")
    parser.add_argument("--template-version", required=True, help="the launch template version of this release")
    parser.add_argument("--release", required=True, help="the release id (for messages)")
    parser.add_argument("--replicas", type=int, required=True,
                        help="healthy nodes of the release that make it done when the group reports no DesiredCapacity "
                             "(otherwise the group's own count: a scaling policy's)")
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--poll", type=float, default=POLL_SECONDS)
    parser.add_argument("--launch-template-id", help="start the release's instance refresh (rollout mode)")
    parser.add_argument("--min-healthy-percentage", type=int, default=100)
    parser.add_argument("--max-healthy-percentage", type=int, default=200)
    parser.add_argument("--instance-warmup", type=int, default=0, help="seconds (the nodes' time to ready)")
    return parser.parse_args(argv)


def wait(autoscaling, elbv2, args: argparse.Namespace, *, sleep=time.sleep, clock=time.monotonic) -> int:
    deadline = clock() + args.timeout
    last_line = None
    while True:
        try:
            state = read_state(autoscaling, elbv2, args.group, args.target_groups)
        except (ClientError, BotoCoreError, LookupError) as error:
            print(f"fleet: release {args.release}: cannot read the fleet: {error}", file=sys.stderr)
            return 1
        if state.done(args.template_version, args.replicas) and not state.on_other_versions(args.template_version):
            print(f"fleet: release {args.release} (template version {args.template_version}) on every healthy "
                  f"target: {state.describe(args.template_version)}", flush=True)
            return 0
        if state.refresh and state.refresh[0] in REFRESH_ENDED_BADLY:
            print(f"fleet: release {args.release}: the instance refresh ended {state.refresh[0]} "
                  f"({state.refresh[2] or 'no reason given'}); {state.describe(args.template_version)}",
                  file=sys.stderr)
            return 1
        if clock() >= deadline:
            print(f"fleet: release {args.release} did not reach every replica in {args.timeout:.0f} s: "
                  f"{state.describe(args.template_version)}", file=sys.stderr)
            return 1
        if last_line is None or clock() - last_line >= 60:
            print(f"fleet: waiting for release {args.release}: {state.describe(args.template_version)}", flush=True)
            last_line = clock()
        sleep(args.poll)


def rollout(autoscaling, elbv2, args: argparse.Namespace, *, sleep=time.sleep, clock=time.monotonic) -> int:
    """Start the release's instance refresh, wait for it and every replica, roll back a failure."""
    release, new = args.release, args.template_version
    try:
        (group,) = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[args.group])["AutoScalingGroups"]
    except (ClientError, BotoCoreError, ValueError) as error:
        print(f"fleet: release {release}: cannot read group {args.group}: {error}", file=sys.stderr)
        return 1
    last_good = configured_version(group)
    if last_good == new:
        return wait(autoscaling, elbv2, args, sleep=sleep, clock=clock)  # already on it: nothing to start
    try:
        # A busy node protects itself from scale-in (drain.py); the refresh replaces it anyway, through
        # the drain hook (Wait, AWS's default, would hold the refresh up to an hour, then fail it).
        started = autoscaling.start_instance_refresh(
            AutoScalingGroupName=args.group, Strategy="Rolling",
            DesiredConfiguration=desired_configuration(group, args.launch_template_id, new),
            Preferences={"MinHealthyPercentage": args.min_healthy_percentage,
                         "MaxHealthyPercentage": args.max_healthy_percentage,
                         "InstanceWarmup": args.instance_warmup, "SkipMatching": True,
                         "ScaleInProtectedInstances": "Refresh", "AutoRollback": True})
    except (ClientError, BotoCoreError) as error:
        print(f"fleet: release {release}: could not start the instance refresh of {args.group} from version "
              f"{last_good} to {new}: {error}; if another refresh runs, let it end or cancel it "
              f"(aws autoscaling cancel-instance-refresh --auto-scaling-group-name {args.group})", file=sys.stderr)
        return 1
    print(f"fleet: release {release}: instance refresh {started['InstanceRefreshId']} of {args.group} from version "
          f"{last_good} (last good) to {new}", flush=True)
    deadline, last_line = clock() + args.timeout, None
    while True:
        try:
            state = read_state(autoscaling, elbv2, args.group, args.target_groups)
        except (ClientError, BotoCoreError, LookupError) as error:
            print(f"fleet: release {release}: cannot read the fleet: {error}", file=sys.stderr)
            return 1
        status = state.refresh[0] if state.refresh else None
        failing = sorted(i for i, v in (state.unhealthy or {}).items() if v == new)
        cause = None
        if failing:
            cause = (f"node(s) {', '.join(failing)} of version {new} marked unhealthy (their watchdog's verdict: "
                     "see each node's /kimi-fleet/status and /var/log/kimi-fleet/watchdog.log)")
        elif status in REFRESH_ENDED_BADLY:
            cause = f"the instance refresh ended {status} ({state.refresh[2] or 'no reason given'})"
        elif (status == "Successful" and state.configured == new and state.done(new, args.replicas)
              and not state.on_other_versions(new)):
            print(f"fleet: release {release} (template version {new}) on every healthy target and recorded as "
                  f"the group's good version: {state.describe(new)}", flush=True)
            return 0
        elif clock() >= deadline:
            waiting = sorted(i for i, v in state.versions.items() if v == new
                             and not all(i in ids for ids in state.healthy.values()))
            cause = (f"not on every replica within {args.timeout:.0f} s (not healthy yet: "
                     f"{', '.join(waiting) or 'no node of it launched'}"
                     + (f"; still in the group on another version: {', '.join(state.on_other_versions(new))}"
                        if state.on_other_versions(new) else "") + ")")
        if cause:
            return roll_back(autoscaling, elbv2, args, last_good, cause, status, sleep=sleep, clock=clock)
        if last_line is None or clock() - last_line >= 60:
            print(f"fleet: waiting for release {release}: {state.describe(new)}", flush=True)
            last_line = clock()
        sleep(args.poll)


def roll_back(autoscaling, elbv2, args: argparse.Namespace, last_good: str | None, cause: str, status: str | None,
              *, sleep=time.sleep, clock=time.monotonic) -> int:
    """Put the group back on the last good version (AWS may already be doing so), wait until it runs
    only that version, and fail naming the release and the cause."""
    release = args.release
    print(f"fleet: release {release} failed: {cause}; rolling back to version {last_good}", file=sys.stderr)
    try:
        if status in REFRESH_RUNNING:
            autoscaling.rollback_instance_refresh(AutoScalingGroupName=args.group)
        elif status == "Successful":
            # AWS already moved the group to the new version: a refresh back to the last good one.
            (group,) = autoscaling.describe_auto_scaling_groups(
                AutoScalingGroupNames=[args.group])["AutoScalingGroups"]
            autoscaling.start_instance_refresh(
                AutoScalingGroupName=args.group, Strategy="Rolling",
                DesiredConfiguration=desired_configuration(group, args.launch_template_id, last_good),
                Preferences={"MinHealthyPercentage": args.min_healthy_percentage,
                             "MaxHealthyPercentage": args.max_healthy_percentage,
                             "InstanceWarmup": args.instance_warmup, "SkipMatching": True,
                             "ScaleInProtectedInstances": "Refresh"})
            status = "InProgress"
    except (ClientError, BotoCoreError, ValueError) as error:
        print(f"fleet: release {release}: rollback of {args.group} refused: {error}", file=sys.stderr)
    deadline = clock() + args.timeout
    while True:
        try:
            state = read_state(autoscaling, elbv2, args.group, args.target_groups)
        except (ClientError, BotoCoreError, LookupError) as error:
            print(f"fleet: release {release}: cannot read the fleet during the rollback: {error}", file=sys.stderr)
            return 1
        status = state.refresh[0] if state.refresh else None
        back = state.configured == last_good and set(state.versions.values()) <= {last_good}
        if back and status in ROLLBACK_OVER and state.done(last_good, args.replicas):
            print(f"fleet: release {release} rolled back: {cause}; group {args.group} is back on version "
                  f"{last_good} (last good), serving it: {state.describe(last_good)}", file=sys.stderr)
            return 1
        if status == "RollbackFailed" or clock() >= deadline:
            print(f"fleet: release {release}: {cause}; the rollback did not bring group {args.group} back to "
                  f"version {last_good} (refresh {status}, configured {state.configured}): "
                  f"{state.describe(last_good)}; see aws autoscaling describe-instance-refreshes", file=sys.stderr)
            return 1
        sleep(args.poll)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.launch_template_id:
        return rollout(boto3.client("autoscaling", region_name=args.region),
                       boto3.client("elbv2", region_name=args.region), args)
    return wait(boto3.client("autoscaling", region_name=args.region), boto3.client("elbv2", region_name=args.region),
                args)


if __name__ == "__main__":
    sys.exit(main())
