"""FleetLoadBalancer: one stable address in front of an Auto Scaling group of GPU nodes.

A Network Load Balancer passes TCP 443 and 80 through to the nodes: Caddy on each node still
terminates TLS and checks the key, so nothing about auth changes between one node and a fleet.
It routes to a node only while the node's ready listener says its watchdog admitted it.
Per-node Elastic IPs cannot follow instances the Auto Scaling group replaces; the NLB can.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from kimi_fleet import health
from kimi_fleet.caddy import HTTP_PORT, HTTPS_PORT, READY_PATH
from kimi_fleet.node_files import READY_PORT

PASSTHROUGH_PORTS = (HTTPS_PORT, HTTP_PORT)
#: A replaced spot node drains quickly: its in-flight streams are lost anyway.
DEREGISTRATION_DELAY_SECONDS = 30


@dataclass
class FleetLoadBalancerArgs:
    stack: str
    vpc_id: pulumi.Input[str]
    subnet_ids: pulumi.Input[list[str]]
    tags: dict[str, str]


class FleetLoadBalancer(pulumi.ComponentResource):
    dns_name: pulumi.Output[str]
    zone_id: pulumi.Output[str]
    target_group_arns: pulumi.Output[list[str]]

    def __init__(self, name: str, args: FleetLoadBalancerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:aws:FleetLoadBalancer", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        balancer = aws.lb.LoadBalancer(
            f"{name}-nlb",
            load_balancer_type="network",
            internal=False,
            subnets=args.subnet_ids,
            enable_cross_zone_load_balancing=True,
            tags=args.tags,
            opts=child,
        )
        target_groups = []
        for port in PASSTHROUGH_PORTS:
            group = aws.lb.TargetGroup(
                f"{name}-tcp{port}",
                port=port,
                protocol="TCP",
                target_type="instance",
                vpc_id=args.vpc_id,
                deregistration_delay=DEREGISTRATION_DELAY_SECONDS,
                # Healthy only once the node's watchdog admitted it by real generations through its
                # own Caddy (the ready listener answers 503 before, and after the watchdog judged it
                # stalled, never while merely busy); it leaves only after several failed checks
                # (kimi_fleet/health.py: minutes in all, never one slow probe).
                health_check=aws.lb.TargetGroupHealthCheckArgs(
                    protocol="HTTP", port=str(READY_PORT), path=READY_PATH, matcher="200",
                    interval=health.LB_INTERVAL_SECONDS, timeout=health.LB_TIMEOUT_SECONDS,
                    healthy_threshold=health.LB_HEALTHY_THRESHOLD, unhealthy_threshold=health.LB_UNHEALTHY_THRESHOLD,
                ),
                tags=args.tags,
                opts=child,
            )
            aws.lb.Listener(
                f"{name}-listen{port}",
                load_balancer_arn=balancer.arn,
                port=port,
                protocol="TCP",
                default_actions=[aws.lb.ListenerDefaultActionArgs(type="forward", target_group_arn=group.arn)],
                opts=child,
            )
            target_groups.append(group.arn)
        self.dns_name = balancer.dns_name
        self.zone_id = balancer.zone_id
        self.target_group_arns = pulumi.Output.all(*target_groups)
        self.register_outputs({"dns_name": self.dns_name, "zone_id": self.zone_id,
                               "target_group_arns": self.target_group_arns})
