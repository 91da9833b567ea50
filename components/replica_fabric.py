"""ReplicaFabric: what lets the nodes of one multi-node replica talk NCCL over EFA (issue 22).

A cluster placement group (one zone, one low-latency network segment: the nodes start together in
it), and the replica's own security group: every protocol and port to and from itself and nothing
else in (EFA's OS bypass needs a group that allows all traffic to and from itself, both ways: the
world egress rule does not cover EFA traffic, whose addresses are neither IPv4 nor IPv6), plus
egress to the world for the weights, the images and AWS's APIs. Every interface of every node of
the replica carries this group; only the leader's primary interface also carries the public one
(HTTPS/ACME to Caddy), so a worker takes nothing from outside the replica.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from components.aws_network import WORLD_V4, WORLD_V6
from kimi_fleet.resolve import Resolved

#: AWS's placement strategy for one replica: every node on one low-latency segment of one zone.
PLACEMENT_STRATEGY = "cluster"


@dataclass
class ReplicaFabricArgs:
    resolved: Resolved
    vpc_id: pulumi.Input[str]
    tags: dict[str, str]


class ReplicaFabric(pulumi.ComponentResource):
    placement_group: pulumi.Output[str]
    security_group_id: pulumi.Output[str]

    def __init__(self, name: str, args: ReplicaFabricArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:aws:ReplicaFabric", name, None, opts)
        stack = args.resolved.spec.stack
        group = aws.ec2.PlacementGroup(f"{name}-placement", strategy=PLACEMENT_STRATEGY, tags=args.tags,
                                       opts=pulumi.ResourceOptions(parent=self))
        replica = aws.ec2.SecurityGroup(
            f"{name}-sg",
            description=f"kimi-fleet {stack}: the replica's nodes to each other (NCCL over EFA, rendezvous)",
            vpc_id=args.vpc_id,
            ingress=[aws.ec2.SecurityGroupIngressArgs(
                protocol="-1", from_port=0, to_port=0, self=True,
                description="every port from the replica's own nodes (EFA, NCCL bootstrap, torch rendezvous)")],
            egress=[
                aws.ec2.SecurityGroupEgressArgs(protocol="-1", from_port=0, to_port=0, self=True,
                                                description="EFA to the replica's own nodes (EFA needs it explicitly)"),
                aws.ec2.SecurityGroupEgressArgs(protocol="-1", from_port=0, to_port=0,
                                                cidr_blocks=[WORLD_V4], ipv6_cidr_blocks=[WORLD_V6],
                                                description="weights, images, AWS APIs"),
            ],
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.placement_group = group.name
        self.security_group_id = replica.id
        self.register_outputs({"placement_group": self.placement_group, "security_group_id": self.security_group_id})
