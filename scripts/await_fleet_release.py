#!/usr/bin/env python3
"""Wait until an AWS fleet's load balancer sends traffic only to nodes of the new release (run by
the verification gate before the suite, for stacks behind a load balancer).

    await_fleet_release.py --region R --group ASG --target-group ARN [--target-group ARN ...] \\
        --template-version V --release ID --replicas N --timeout SECONDS

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
import sys
import time
from dataclasses import dataclass

import boto3
from botocore.exceptions import BotoCoreError, ClientError

POLL_SECONDS = 20
#: The newest instance refresh in one of these will not bring the release.
REFRESH_ENDED_BADLY = {"Failed", "Cancelled", "RollbackInProgress", "RollbackSuccessful", "RollbackFailed"}


@dataclass
class FleetState:
    #: per target group: the ids of its healthy targets
    healthy: dict[str, set[str]]
    #: instance id -> the launch template version it was launched from (group members only)
    versions: dict[str, str]
    #: the newest instance refresh: (status, percentage, reason), or None
    refresh: tuple[str, int | None, str] | None

    def on_release(self, version: str) -> set[str]:
        return {i for i, v in self.versions.items() if v == version}

    def done(self, version: str, replicas: int) -> bool:
        fresh = self.on_release(version)
        return all(ids and ids <= fresh and len(ids) >= replicas for ids in self.healthy.values())

    def describe(self, version: str) -> str:
        fresh = self.on_release(version)
        parts = []
        for arn, ids in self.healthy.items():
            others = sorted(i for i in ids if i not in fresh)
            stale = ", ".join(f"{i} (version {self.versions.get(i, 'not in the group')})" for i in others)
            parts.append(f"{arn.rsplit('/', 2)[-2] if '/' in arn else arn}: {len(ids) - len(others)} healthy on "
                         f"version {version}" + (f", still healthy on another: {stale}" if stale else ""))
        if self.refresh:
            status, percentage, _ = self.refresh
            parts.append(f"instance refresh {status}" + (f" {percentage}%" if percentage is not None else ""))
        return "; ".join(parts)


def read_state(autoscaling, elbv2, group: str, target_groups: list[str]) -> FleetState:
    groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"]
    if not groups:
        raise LookupError(f"Auto Scaling group {group} does not exist")
    versions = {}
    for instance in groups[0].get("Instances", []):
        template = instance.get("LaunchTemplate") or {}
        if template.get("Version") is not None:
            versions[instance["InstanceId"]] = str(template["Version"])
    healthy = {}
    for arn in target_groups:
        descriptions = elbv2.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
        healthy[arn] = {d["Target"]["Id"] for d in descriptions if d["TargetHealth"]["State"] == "healthy"}
    refreshes = autoscaling.describe_instance_refreshes(AutoScalingGroupName=group, MaxRecords=1)
    newest = (refreshes.get("InstanceRefreshes") or [None])[0]
    refresh = None if newest is None else (newest["Status"], newest.get("PercentageComplete"),
                                           newest.get("StatusReason", ""))
    return FleetState(healthy, versions, refresh)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--region", required=True)
    parser.add_argument("--group", required=True, help="the fleet's Auto Scaling group")
    parser.add_argument("--target-group", action="append", required=True, dest="target_groups")
    parser.add_argument("--template-version", required=True, help="the launch template version of this release")
    parser.add_argument("--release", required=True, help="the release id (for messages)")
    parser.add_argument("--replicas", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--poll", type=float, default=POLL_SECONDS)
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
        if state.done(args.template_version, args.replicas):
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return wait(boto3.client("autoscaling", region_name=args.region), boto3.client("elbv2", region_name=args.region),
                args)


if __name__ == "__main__":
    sys.exit(main())
