"""AwsEndpoint: a Kimi-K2.6 endpoint on AWS GPU nodes, from network to DNS name.

SSM SecureString secrets, the network and its security group, the weight volume, the GPU node(s)
booting from cloud-init into engines behind Caddy, a load balancer for a fleet, the DNS record, the
stack's CloudWatch dashboard and alarms, and the AuthProxy record of the Caddyfile for the policy pack.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from components.auth_proxy import AuthProxy, AuthProxyArgs
from components.aws_monitoring import AwsMonitoring, AwsMonitoringArgs
from components.endpoint_outputs import EndpointArgs, publish_endpoint
from components.aws_network import AwsNetwork, AwsNetworkArgs
from components.dns_record import DnsRecord, DnsRecordArgs
from components.fleet_load_balancer import FleetLoadBalancer, FleetLoadBalancerArgs
from components.gpu_node import GpuNode, GpuNodeArgs, NodeFabric, refresh_percentages
from components.replica_fabric import ReplicaFabric, ReplicaFabricArgs
from components.mirror_fill import MirrorFill, MirrorFillArgs, MirrorManifestPin, MirrorManifestPinArgs
from components.node_release import STACK_TAG, NodeRelease, NodeReleaseArgs
from components.node_secrets import NodeSecrets, NodeSecretsArgs
from components.weight_volume import WeightVolume, WeightVolumeArgs
from components.weights_mirror import WeightsMirror, WeightsMirrorArgs
from kimi_fleet import catalog, health
from kimi_fleet.launch import Launch, replica_launches
from kimi_fleet.mirror import plan_mirror
from kimi_fleet.node_files import (
    SecretsSource, bootstrap_timeout_seconds, bundle_digest, compile_cache_key_prefix, compile_cache_launch_digest,
    compile_cache_pin_parameter, default_ssm_prefix, node_release, release_bundle, release_pointer,
    render_aws_user_data, render_node_files, render_proxy_for, replica_apply_timeout_seconds,
)

WORKLOAD_TAG = "kimi-fleet:workload"
#: A multi-node replica's node carries its rank.
REPLICA_RANK_TAG = "kimi-fleet:rank"
MARKET_TAG = "kimi-fleet:market"


def _release_bundle(args: AwsEndpointArgs, secrets: NodeSecrets, ssm_prefix: str, volume_id: pulumi.Input[str],
                    manifest_sha256: pulumi.Input[str | None], launch: pulumi.Input[Launch],
                    node_rank: int = 0, instance_ids: pulumi.Input[list[str]] | None = None) -> pulumi.Output[str]:
    """A node's release bundle: its files, with the secrets' versions, its weights volume, the pinned
    mirror manifest and its launch (a replica's rank's is known once every rank's address is), and a
    replica's ranks' instance ids (a peer replaced at the same address is still a new peer)."""
    r, region = args.resolved, args.resolved.spec.target.aws.region
    return pulumi.Output.all(volume_id, secrets.api_key_version, manifest_sha256, secrets.previous_api_key_version,
                             launch, instance_ids).apply(
        lambda values: release_bundle(render_node_files(
            r, values[4], args.sizing, ebs_volume_id=values[0], mirror_manifest_sha256=values[2], node_rank=node_rank,
            instance_ids=tuple(values[5]) if values[5] is not None else None,
            secrets=SecretsSource.ssm(ssm_prefix, region, hf_token=args.hf_token is not None,
                                      api_key_version=values[1], previous_api_key=args.previous_api_key is not None,
                                      previous_api_key_version=values[3]))))


def _refresh_basis(capacity) -> int:
    """The replica count a fleet's refresh percentages are computed for. A fixed fleet: its count. A
    scaling fleet runs anywhere in its range when a release lands: one-at-a-time takes the top (one
    replica out of the most it may have; where the minimum rounds up to the whole group, as at the
    bottom of the range, AWS's user guide says a refresh replaces one instance at a time), surge the
    bottom (one extra replica even there; at the top of the range a refresh may launch several)."""
    if capacity.scaling is None:
        return capacity.replicas
    if capacity.rollout == "surge":
        return max(1, capacity.scaling.min_replicas)
    return capacity.scaling.max_replicas


@dataclass
class ReplicaNodes:
    """What the endpoint needs of a multi-node replica (the leader serves; every rank costs)."""
    node_ids: pulumi.Output[list[str]]
    public_ip: pulumi.Output[str]
    market: pulumi.Output[str]
    hourly_cost_usd: pulumi.Output[float | None]
    volumes_monthly_cost_usd: pulumi.Output[float]
    volume_ids: pulumi.Output[str]
    fleet_group = None


@dataclass
class AwsEndpointArgs(EndpointArgs):
    """The shared endpoint inputs; nothing Aws-specific beyond the spec."""


class AwsEndpoint(pulumi.ComponentResource):
    endpoint_url: pulumi.Output[str]
    openai_base_url: pulumi.Output[str]
    node_ids: pulumi.Output[list[str]]
    #: The node's Elastic IP, or the fleet load balancer's DNS name.
    public_address: pulumi.Output[str]
    market: pulumi.Output[str]
    hourly_cost_usd: pulumi.Output[float | None]
    dns_record: pulumi.Output[str]
    weights_volume_id: pulumi.Output[str | None]
    #: A fleet's rollout as AWS reports it (region, group, target groups, template version): the
    #: gate waits until only nodes of this release are healthy targets. None for one node.
    fleet_rollout: pulumi.Output[dict] | None
    #: What the gate needs to promote a node's compile-cache candidate after the suite passed
    #: (scripts/promote_compile_cache.py): None without a managed mirror.
    compile_cache_promotion: pulumi.Output[dict] | None
    #: The CloudWatch console page of the stack's dashboard, and where its metrics are (the contract:
    #: "cloudwatch://KimiFleet/<stack>?Stack=<stack>"); the SNS topic its alarms notify.
    dashboard_url: pulumi.Output[str]
    metrics_location: pulumi.Output[str]
    alarm_topic_arn: pulumi.Output[str]

    def __init__(self, name: str, args: AwsEndpointArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:aws:AwsEndpoint", name, None, opts)
        r, spec = args.resolved, args.resolved.spec
        target = spec.target.aws
        if r.offer is None:
            raise ValueError(f"stack {spec.stack}: no AWS instance type in the catalog for "
                             f"{spec.accelerator_count}x {spec.accelerator}; set target.aws.instanceType")
        fleet = r.target.behind_load_balancer(r)
        tags = {STACK_TAG: spec.stack, WORKLOAD_TAG: spec.capacity.workload, MARKET_TAG: spec.capacity.effective_market}
        ssm_prefix = target.ssm_prefix or default_ssm_prefix(spec.stack)

        region = aws.Provider(f"{name}-region", region=target.region, opts=pulumi.ResourceOptions(parent=self))
        child = pulumi.ResourceOptions(parent=self, providers=[region])

        network = AwsNetwork(f"{name}-network", AwsNetworkArgs(resolved=r, tags=tags), child)
        secrets = NodeSecrets(f"{name}-secrets", NodeSecretsArgs(
            prefix=ssm_prefix, api_key=args.api_key, hf_token=args.hf_token, tags=tags,
            previous_api_key=args.previous_api_key), child)
        # A managed mirror is filled (on AWS) before any GPU node exists: nodes never wait on an empty one.
        # Its manifest (or an external mirror's) is checked against the Hub on this side, and its
        # SHA-256 goes into node.env: a node refuses any other manifest (issue 21, item 4).
        node_prerequisites: list[pulumi.Resource] = [secrets]
        manifest_sha256: pulumi.Input[str | None] = None
        mirror_plan = plan_mirror(r)
        if mirror_plan:
            mirror = WeightsMirror(f"{name}-mirror", WeightsMirrorArgs(plan=mirror_plan, tags=tags), child)
            fill = MirrorFill(f"{name}-fill", MirrorFillArgs(
                plan=mirror_plan, bucket_arn=mirror.bucket_arn, vpc_id=network.vpc_id,
                subnet_ids=network.subnet_ids, default_subnets=not target.subnet_ids,
                region=target.region, tags=tags, hf_token=args.hf_token), child)
            node_prerequisites.append(fill)
            manifest_sha256 = fill.manifest_sha256
        elif spec.weights.source == "s3-mirror":
            pin = MirrorManifestPin(f"{name}-mirror-pin", MirrorManifestPinArgs(
                mirror_uri=spec.weights.s3_mirror_uri, repo=r.repo, revision=r.revision, region=target.region,
                hf_token=args.hf_token), child)
            node_prerequisites.append(pin)
            manifest_sha256 = pin.manifest_sha256

        if r.multi_node:
            node = self._replica(name, args, network, secrets, manifest_sha256, ssm_prefix, tags, child,
                                 node_prerequisites)
            balancer = None
            volume_monthly = node.volumes_monthly_cost_usd
            volume_ids = node.volume_ids
        else:
            node, balancer, volume = self._single_or_fleet(name, args, network, secrets, manifest_sha256, ssm_prefix,
                                                           tags, child, node_prerequisites, fleet)
            volume_monthly = volume.monthly_cost_usd
            volume_ids = volume.volume_id
        if balancer:
            dns = DnsRecord(f"{name}-dns", DnsRecordArgs(
                domain=spec.domain, hosted_zone_id=target.hosted_zone_id,
                alias_dns_name=balancer.dns_name, alias_zone_id=balancer.zone_id), child)
            self.public_address = balancer.dns_name
        else:
            dns = DnsRecord(f"{name}-dns", DnsRecordArgs(
                domain=spec.domain, hosted_zone_id=target.hosted_zone_id, address=node.public_ip), child)
            self.public_address = node.public_ip
        AuthProxy(f"{name}-proxy", AuthProxyArgs(
            rendered=render_proxy_for(r, args.launch, release=node_release(r, args.launch, args.sizing)),
            allowed_upstreams=args.launch.upstreams),
            pulumi.ResourceOptions(parent=self))

        self.dns_record = dns.record
        self.weights_volume_id = volume_ids
        # Every AWS stack: one node, a fleet (with its group's size) or a multi-node replica.
        monitoring = AwsMonitoring(f"{name}-monitoring", AwsMonitoringArgs(
            spec=spec, region=target.region, tags=tags, group_name=node.fleet_group), child)
        self.dashboard_url = monitoring.dashboard_url
        self.metrics_location = monitoring.metrics_location
        self.alarm_topic_arn = monitoring.alarm_topic_arn
        self.fleet_rollout = None
        if balancer:
            # The refresh is the gate's (gpu_node: the provider's own cannot roll back, #34189): its
            # bounds from the stack's rollout; a new instance is InService only once admitted (the
            # launch hook), so its warm-up is the load balancer's own checks.
            bounds = refresh_percentages(_refresh_basis(spec.capacity), spec.capacity.rollout)
            warmup = health.REFRESH_WARMUP_SECONDS
            self.fleet_rollout = pulumi.Output.all(node.fleet_group, balancer.target_group_arns,
                                                   node.template_version, node.launch_template_id).apply(
                lambda values: {"region": target.region, "group": values[0], "target_groups": list(values[1]),
                                "template_version": str(values[2]), "launch_template_id": values[3],
                                **bounds, "instance_warmup_seconds": warmup})
        self.compile_cache_promotion = None
        cache_prefix = compile_cache_key_prefix(r)
        if cache_prefix is not None:
            launch_digest = compile_cache_launch_digest(args.launch, spec.stack)
            promotion = {"region": target.region, "bucket": spec.weights.s3_mirror_location[0],
                         "cache_prefix": cache_prefix, "stack": spec.stack, "launch": launch_digest,
                         "pin_parameter": compile_cache_pin_parameter(ssm_prefix, launch_digest)}
            # A fleet's candidates may come from any instance of its group; one node's from it alone.
            self.compile_cache_promotion = (
                node.fleet_group.apply(lambda group: {**promotion, "group": group}) if fleet
                else node.node_ids.apply(lambda ids: {**promotion, "instance_ids": list(ids)}))
        publish_endpoint(
            self, domain=spec.domain, node_ids=node.node_ids, market=node.market,
            # The weight volume outlives the node and bills monthly: folded into the hourly figure.
            hourly_cost_usd=pulumi.Output.all(node.hourly_cost_usd, volume_monthly).apply(
                lambda costs: None if costs[0] is None else round(costs[0] + costs[1] / (24 * 30), 2)),
            extra={"public_address": self.public_address, "dns_record": self.dns_record,
                   "weights_volume_id": self.weights_volume_id, "dashboard_url": self.dashboard_url,
                   "metrics_location": self.metrics_location, "alarm_topic_arn": self.alarm_topic_arn},
        )

    def _single_or_fleet(self, name, args, network, secrets, manifest_sha256, ssm_prefix, tags, child,
                         node_prerequisites, fleet):
        r, spec, target = args.resolved, args.resolved.spec, args.resolved.spec.target.aws
        volume = WeightVolume(f"{name}-weights", WeightVolumeArgs(
            resolved=r, availability_zone=network.availability_zone, tags=tags), child)
        # The node files travel as one content-addressed bundle in S3 (NodeRelease below); user data
        # is the frozen boot loader. One node takes releases in place through the pointer; a fleet's
        # release is an instance tag of its template (GpuNode): a new one is a new template version,
        # which the gate's instance refresh rolls out.
        bundle = _release_bundle(args, secrets, ssm_prefix, volume.volume_id, manifest_sha256, args.launch)
        # Known at preview: the user data names no release (a fleet's travels as an instance tag).
        user_data = render_aws_user_data(r, ssm_prefix=ssm_prefix, region=target.region)

        balancer = None
        if fleet:
            balancer = FleetLoadBalancer(f"{name}-ingress", FleetLoadBalancerArgs(
                stack=spec.stack, vpc_id=network.vpc_id, subnet_ids=network.subnet_ids, tags=tags), child)
        node = GpuNode(
            f"{name}-node",
            GpuNodeArgs(
                resolved=r, sizing=args.sizing, user_data=user_data, subnet_ids=network.subnet_ids,
                security_group_id=network.security_group_id, ssm_prefix=ssm_prefix, tags=tags,
                weights_volume_id=volume.volume_id if r.weights_volume == "ebs" else None,
                target_group_arns=balancer.target_group_arns if balancer else None,
                release_digest=bundle.apply(bundle_digest) if fleet else None,
            ),
            # The node reads its secrets (and its mirror) at boot: they exist before it does.
            pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=node_prerequisites)),
        )
        NodeRelease(f"{name}-release", NodeReleaseArgs(
            stack=spec.stack, region=target.region, bundle=bundle, pointer_name=release_pointer(ssm_prefix),
            # A fleet takes releases by instance refresh: no association to run on its nodes.
            instance_id=None if fleet else node.node_ids.apply(lambda ids: ids[0]), role_arn=node.role_arn,
            apply_timeout_seconds=bootstrap_timeout_seconds(args.sizing), tags=tags), child)
        return node, balancer, volume

    def _replica(self, name, args, network, secrets, manifest_sha256, ssm_prefix, tags, child, node_prerequisites):
        """One replica over several nodes: each rank its own instance (with every EFA interface), its
        own weight volume and its own release (its pointer, its bundle); the leader's address, and
        every rank's, reach each rank through its release, so a replaced node moves every rank to
        the new rendezvous on the same `pulumi up`."""
        r, target = args.resolved, args.resolved.spec.target.aws
        fabric = ReplicaFabric(f"{name}-replica", ReplicaFabricArgs(resolved=r, vpc_id=network.vpc_id, tags=tags),
                               child)
        subnet_id = network.subnet_ids.apply(lambda ids: ids[0])
        interfaces = catalog.FABRICS[r.offer.instance_type].interfaces
        ranks = []
        for rank in range(r.nodes_per_replica):
            volume = WeightVolume(f"{name}-rank{rank}-weights", WeightVolumeArgs(
                resolved=r, availability_zone=network.availability_zone, tags=tags), child)
            # Only the leader serves HTTPS: a worker's interfaces carry the replica's group alone.
            groups = [fabric.security_group_id, network.security_group_id] if rank == 0 else [fabric.security_group_id]
            node = GpuNode(
                f"{name}-rank{rank}-node",
                GpuNodeArgs(
                    resolved=r, sizing=args.sizing,
                    user_data=render_aws_user_data(r, ssm_prefix=ssm_prefix, region=target.region, node_rank=rank),
                    subnet_ids=network.subnet_ids, security_group_id=network.security_group_id,
                    ssm_prefix=ssm_prefix, tags={**tags, REPLICA_RANK_TAG: str(rank)},
                    weights_volume_id=volume.volume_id,
                    fabric=NodeFabric(rank=rank, interfaces=interfaces, placement_group=fabric.placement_group,
                                      security_group_ids=groups, subnet_id=subnet_id)),
                pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=node_prerequisites)))
            ranks.append((rank, volume, node))
        addresses = pulumi.Output.all(*[node.private_ip for _, _, node in ranks])
        instance_ids = pulumi.Output.all(*[node.node_ids.apply(lambda ids: ids[0]) for _, _, node in ranks])
        for rank, volume, node in ranks:
            launch = addresses.apply(lambda values, rank=rank: replica_launches(r, tuple(values))[rank])
            bundle = _release_bundle(args, secrets, ssm_prefix, volume.volume_id, manifest_sha256, launch, rank,
                                     instance_ids)
            NodeRelease(f"{name}-rank{rank}-release", NodeReleaseArgs(
                stack=r.spec.stack, region=target.region, bundle=bundle,
                pointer_name=release_pointer(ssm_prefix, rank), instance_id=node.node_ids.apply(lambda ids: ids[0]),
                role_arn=node.role_arn, apply_timeout_seconds=replica_apply_timeout_seconds(r, args.sizing),
                tags=tags), child)
        leader = ranks[0][2]
        return ReplicaNodes(
            node_ids=pulumi.Output.all(*[node.node_ids.apply(lambda ids: ids[0]) for _, _, node in ranks]),
            public_ip=leader.public_ip, market=leader.market,
            # The replica's price is the catalog's (every node of it), once.
            hourly_cost_usd=leader.hourly_cost_usd,
            volumes_monthly_cost_usd=pulumi.Output.all(*[v.monthly_cost_usd for _, v, _ in ranks]).apply(sum),
            volume_ids=pulumi.Output.all(*[v.volume_id for _, v, _ in ranks]).apply(lambda ids: ",".join(ids)),
        )
