"""AwsNetwork: where the GPU nodes live and what reaches them.

The stack's VPC and subnets (or the region's default VPC, restricted to the availability zones
that sell the instance type), and one security group: 443 and 80 (ACME) from the world, SSH only
from the stack's allowlist (none by default), and on a fleet the ready listener from the VPC (the
NLB's health check). The engine ports and metrics are never opened: the engines listen on
127.0.0.1 behind Caddy.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from kimi_fleet.caddy import HTTP_PORT, HTTPS_PORT
from kimi_fleet.node_files import READY_PORT, behind_load_balancer
from kimi_fleet.resolve import Resolved

WORLD_V4 = "0.0.0.0/0"
WORLD_V6 = "::/0"
PUBLIC_PORTS = ((HTTPS_PORT, "HTTPS to Caddy"), (HTTP_PORT, "ACME HTTP-01 challenge and redirect to HTTPS"))


@dataclass
class AwsNetworkArgs:
    resolved: Resolved
    tags: dict[str, str]


class AwsNetwork(pulumi.ComponentResource):
    vpc_id: pulumi.Output[str]
    subnet_ids: pulumi.Output[list[str]]
    #: The zone of the first subnet: a single node and its EBS volume go there.
    availability_zone: pulumi.Output[str]
    security_group_id: pulumi.Output[str]
    vpc_cidr: pulumi.Output[str]

    def __init__(self, name: str, args: AwsNetworkArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:aws:AwsNetwork", name, None, opts)
        target = args.resolved.spec.target.aws
        instance_type = args.resolved.offer.instance_type
        invoke = pulumi.InvokeOutputOptions(parent=self)

        if target.subnet_ids:
            self.subnet_ids = pulumi.Output.from_input(list(target.subnet_ids))
            first = aws.ec2.get_subnet_output(id=target.subnet_ids[0], opts=invoke)
            self.vpc_id = pulumi.Output.from_input(target.vpc_id) if target.vpc_id else first.vpc_id
            self.availability_zone = first.availability_zone
            self.vpc_cidr = aws.ec2.get_vpc_output(id=self.vpc_id, opts=invoke).cidr_block
        else:
            vpc = aws.ec2.get_vpc_output(id=target.vpc_id, default=None if target.vpc_id else True, opts=invoke)
            # GPU instance types are sold in a few zones only: keep the subnets of those zones.
            offered = aws.ec2.get_instance_type_offerings_output(
                location_type="availability-zone",
                filters=[{"name": "instance-type", "values": [instance_type]}],
                opts=invoke,
            ).locations
            wanted = set(target.availability_zones)
            # One node (and its EBS volume) lives in one zone; a fleet spreads over all of them.
            keep = None if args.resolved.spec.capacity.is_fleet else 1
            zones = offered.apply(
                lambda zs: _require([z for z in zs if not wanted or z in wanted], instance_type, target.region)[:keep]
            )
            subnets = aws.ec2.get_subnets_output(
                filters=[
                    {"name": "vpc-id", "values": [vpc.id]},
                    {"name": "default-for-az", "values": ["true"]},
                    {"name": "availability-zone", "values": zones},
                ],
                opts=invoke,
            )
            self.vpc_id = vpc.id
            self.vpc_cidr = vpc.cidr_block
            self.subnet_ids = subnets.ids.apply(lambda ids: _require(ids, instance_type, target.region))
            self.availability_zone = zones.apply(lambda zs: zs[0])

        ssh_v4 = [c for c in target.ssh_allowlist if ipaddress.ip_network(c, strict=False).version == 4]
        ssh_v6 = [c for c in target.ssh_allowlist if ipaddress.ip_network(c, strict=False).version == 6]
        ingress = [
            aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=port, to_port=port, description=why,
                                             cidr_blocks=[WORLD_V4], ipv6_cidr_blocks=[WORLD_V6])
            for port, why in PUBLIC_PORTS
        ]
        if behind_load_balancer(args.resolved):
            # The NLB's health checks come from its private addresses in the VPC.
            ingress.append(aws.ec2.SecurityGroupIngressArgs(
                protocol="tcp", from_port=READY_PORT, to_port=READY_PORT,
                description="load balancer health check (the node's ready listener), VPC only",
                cidr_blocks=[self.vpc_cidr],
            ))
        if target.ssh_allowlist:
            ingress.append(aws.ec2.SecurityGroupIngressArgs(
                protocol="tcp", from_port=22, to_port=22, description="SSH from the stack's allowlist",
                cidr_blocks=ssh_v4, ipv6_cidr_blocks=ssh_v6,
            ))
        group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            description=f"kimi-fleet {args.resolved.spec.stack}: HTTPS/ACME to Caddy only",
            vpc_id=self.vpc_id,
            ingress=ingress,
            egress=[aws.ec2.SecurityGroupEgressArgs(protocol="-1", from_port=0, to_port=0,
                                                    cidr_blocks=[WORLD_V4], ipv6_cidr_blocks=[WORLD_V6])],
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.security_group_id = group.id
        self.register_outputs({
            "vpc_id": self.vpc_id,
            "subnet_ids": self.subnet_ids,
            "availability_zone": self.availability_zone,
            "security_group_id": self.security_group_id,
        })


def _require(values: list[str], instance_type: str, region: str) -> list[str]:
    if not values:
        raise ValueError(
            f"no default subnet in {region} where {instance_type} is offered: set "
            "kimi-fleet:target.aws.subnetIds (or availabilityZones) to where you have capacity"
        )
    return sorted(values)
