"""GpuNode: the EC2 capacity that runs the engines, under the stack's market policy.

One replica: an instance from a launch template, with an Elastic IP so the DNS name survives a
replacement and the EBS weight volume attached. On spot it is a persistent request that *stops* on
interruption and starts again when capacity returns (same instance, address and volume).
Several replicas (or a scaling range above one): an Auto Scaling group with a mixed instances policy
(an on-demand base, the rest spot, price-capacity-optimized, capacity rebalancing): replacing a
replica lost to an interruption is AWS's job, not ours; with capacity.scaling the group's range is
the stack's and a target-tracking policy moves its desired count (components/fleet_scaling.py).
Capacity Blocks: market type capacity-block with the reservation.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from components.fleet_scaling import DRAIN_HOOK_NAME, FleetScaling, FleetScalingArgs, drain_heartbeat_seconds
from components.fleet_steward import FleetSteward, FleetStewardArgs
from kimi_fleet import boot_stub, catalog, health, lifecycle_rights, node_files, observability
from kimi_fleet.autoscaling import scaling_policy
from kimi_fleet.cost import estimate
from kimi_fleet.paths import mirror_compile_cache_prefix
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import Sizing

ROOT_DEVICE = "/dev/sda1"  # Ubuntu AMIs
#: Where the node sees the EBS weight volume (NVMe: found by volume id, this name is nominal).
WEIGHTS_DEVICE = "/dev/sdf"
#: One hop: the node's own agents reach IMDS, a container on a bridge network cannot (its packets take
#: a second hop). Engines share the host's network, so the node firewall also refuses IMDS to every
#: process in the engines' cgroup (node_guard.ENGINE_SLICE).
IMDS_HOP_LIMIT = 1
#: The group metrics a fleet collects (AWS/AutoScaling, one-minute granularity, no charge).
GROUP_METRICS = ("GroupDesiredCapacity", "GroupInServiceInstances", "GroupMinSize", "GroupMaxSize")




@dataclass
class GpuNodeArgs:
    resolved: Resolved
    sizing: Sizing
    user_data: pulumi.Input[str]
    subnet_ids: pulumi.Input[list[str]]
    security_group_id: pulumi.Input[str]
    ssm_prefix: str
    tags: dict[str, str]
    #: The EBS weight volume to attach (single node only).
    weights_volume_id: pulumi.Input[str] | None = None
    #: The fleet's load balancer target groups (Auto Scaling group only).
    target_group_arns: pulumi.Input[list[str]] | None = None
    #: The release bundle's SHA-256 a fleet's new instances boot (an instance tag they read through
    #: IMDS): a new release is a new template version, while the user data stays the same bytes.
    release_digest: pulumi.Input[str] | None = None
    #: One rank of a multi-node replica (single instance only): its EFA interfaces, placement group
    #: and security groups.
    fabric: NodeFabric | None = None


@dataclass
class NodeFabric:
    rank: int
    #: EFA interfaces, one per network card (catalog.FABRICS)
    interfaces: int
    placement_group: pulumi.Input[str]
    #: Every interface's groups: the replica's own, and on the leader the public one too.
    security_group_ids: list[pulumi.Input[str]]
    #: The replica's one subnet (a cluster placement group is in one zone).
    subnet_id: pulumi.Input[str]


def efa_interfaces(fabric: NodeFabric) -> list[aws.ec2.LaunchTemplateNetworkInterfaceArgs]:
    """AWS's layout for an instance with EFA on every network card: card 0 carries the primary ENA
    interface (device 0: the node's address, its Elastic IP) and an efa-only interface (device 1);
    every other card one efa-only interface (device 0). efa-only interfaces take no IP address.
    Deterministic order: the provider diffs the list by position."""
    def interface(card: int, device: int, kind: str | None):
        return aws.ec2.LaunchTemplateNetworkInterfaceArgs(
            network_card_index=card, device_index=device, interface_type=kind,
            subnet_id=fabric.subnet_id, security_groups=fabric.security_group_ids, delete_on_termination="true")
    return ([interface(0, 0, None), interface(0, 1, "efa-only")]
            + [interface(card, 0, "efa-only") for card in range(1, fabric.interfaces)])


def _version(template: aws.ec2.LaunchTemplate) -> pulumi.Output[str]:
    return template.latest_version.apply(str)


def refresh_percentages(replicas: int, rollout: str) -> dict[str, int]:
    """Instance refresh bounds. surge: launch one extra replica before each termination (never below
    full capacity, one more node's cost for the rollout); one-at-a-time: take one replica out, then
    bring its replacement up (no extra capacity, one replica less while it loads)."""
    one_replica = math.ceil(100 / replicas)
    if rollout == "surge":
        return {"min_healthy_percentage": 100, "max_healthy_percentage": min(200, 100 + one_replica)}
    return {"min_healthy_percentage": max(0, 100 - one_replica), "max_healthy_percentage": 100}


def ssm_prefix_arn(region: str, ssm_prefix: str) -> str:
    """Every parameter under the stack's own prefix (its secrets, its release pointer, its cache pins),
    in the node's own account (the policy variable: a parameter another account shares under the
    same name is not the stack's)."""
    return f"arn:aws:ssm:{region}:${{aws:PrincipalAccount}}:parameter{ssm_prefix.rstrip('/')}/*"


def _role_policy(r: Resolved, ssm_prefix: str) -> str:
    """The node role's whole policy (no AWS-managed policy beside it): what the SSM agent needs, the
    stack's own parameters, the weights mirror read-only, and one write for compile-cache candidates.
    A node runs third-party code (engines with --trust-remote-code, JIT kernels), so this is also
    what a compromised engine could do with the role."""
    region = r.spec.target.aws.region
    parameters = ssm_prefix_arn(region, ssm_prefix)
    statements = [
        {"Sid": "SsmAgent", "Effect": "Allow", "Action": list(catalog.SSM_AGENT_ACTIONS), "Resource": "*"},
        {"Sid": "ReleaseApplyDocument", "Effect": "Allow", "Action": ["ssm:GetDocument", "ssm:DescribeDocument"],
         "Resource": f"arn:aws:ssm:{region}::document/{catalog.SSM_RUN_SHELL_DOCUMENT}"},
        {"Sid": "ReadStackParameters", "Effect": "Allow", "Action": ["ssm:GetParameter", "ssm:GetParameters"],
         "Resource": parameters},
        # SecureString reads decrypt through SSM, and only parameters under the stack's prefix.
        {"Sid": "DecryptStackParameters", "Effect": "Allow", "Action": "kms:Decrypt", "Resource": "*",
         "Condition": {"StringEquals": {"kms:ViaService": f"ssm.{region}.amazonaws.com"},
                       "StringLike": {"kms:EncryptionContext:PARAMETER_ARN": parameters}}},
        # The node's metrics (issue 24): PutMetricData takes no resource ARN, only this condition key
        # (CloudWatch user guide, "Using condition keys to limit access to CloudWatch namespaces"), so a
        # node may write the stack's own namespace and no other (not AWS/*, not another tool's, not
        # another stack's: its scaling and alarms read that one).
        {"Sid": "PublishStackMetrics", "Effect": "Allow", "Action": "cloudwatch:PutMetricData", "Resource": "*",
         "Condition": {"StringEquals": {"cloudwatch:namespace": observability.cloudwatch_namespace(r.spec.stack)}}},
    ]
    if r.spec.weights.source == "s3-mirror":
        bucket, key_prefix = r.spec.weights.s3_mirror_location
        statements += [
            {"Sid": "ListWeightMirror", "Effect": "Allow", "Action": "s3:ListBucket",
             "Resource": f"arn:aws:s3:::{bucket}",
             "Condition": {"StringLike": {"s3:prefix": [f"{key_prefix}/*" if key_prefix else "*"]}}},
            {"Sid": "ReadWeightMirror", "Effect": "Allow", "Action": "s3:GetObject",
             "Resource": f"arn:aws:s3:::{bucket}/{key_prefix + '/' if key_prefix else ''}*"},
            # What any node uploads is read by the deployer's promotion only, never by a node: a
            # compromised node cannot hand code to another one through the mirror.
            {"Sid": "NoNodeReadsCandidates", "Effect": "Deny", "Action": "s3:GetObject",
             "Resource": f"arn:aws:s3:::{bucket}/{mirror_compile_cache_prefix(key_prefix)}/*/"
                         f"{node_files.COMPILE_CACHE_CANDIDATES_DIR}/*"},
        ]
    candidates = node_files.compile_cache_candidate_prefix(r)
    if candidates is not None:
        bucket, _ = r.spec.weights.s3_mirror_location
        statements.append(
            {"Sid": "UploadCompileCacheCandidates", "Effect": "Allow",
             "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
             # Under its own ${aws:userid} (<role id>:<instance id>): no node overwrites another's candidate.
             "Resource": f"arn:aws:s3:::{bucket}/{candidates}/${{aws:userid}}/*"})
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


def _steward_caller_policy(function_arn: str) -> str:
    """A fleet node's Auto Scaling and Lambda rights beside _role_policy: call its steward through the
    function URL with IAM auth (Lambda now checks both actions for a URL call; InvokeFunction only via
    the URL: a direct Invoke would let the caller write the event, and so the identity, itself; the
    function's resource policy grants the same two, and in one account either grant suffices), and
    read its group (the drain reads the desired count and its own protection; Describe actions take
    no resource ARN)."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "CallStewardUrl", "Effect": "Allow", "Action": "lambda:InvokeFunctionUrl", "Resource": function_arn,
         "Condition": {"StringEquals": {"lambda:FunctionUrlAuthType": "AWS_IAM"}}},
        {"Sid": "CallStewardThroughItsUrl", "Effect": "Allow", "Action": "lambda:InvokeFunction",
         "Resource": function_arn, "Condition": {"Bool": {"lambda:InvokedViaFunctionUrl": "true"}}},
        {"Sid": "FindOwnGroup", "Effect": "Allow",
         "Action": ["autoscaling:DescribeAutoScalingInstances", "autoscaling:DescribeAutoScalingGroups"],
         "Resource": "*"}]})


def _market_options(r: Resolved, fleet: bool):
    """Launch template market options; a mixed-instances fleet decides the market in the group instead."""
    capacity = r.spec.capacity
    market = capacity.effective_market
    if market == "capacity-block":
        return aws.ec2.LaunchTemplateInstanceMarketOptionsArgs(market_type="capacity-block")
    if market == "spot" and not fleet:
        return aws.ec2.LaunchTemplateInstanceMarketOptionsArgs(
            market_type="spot",
            spot_options=aws.ec2.LaunchTemplateInstanceMarketOptionsSpotOptionsArgs(
                spot_instance_type="persistent",
                instance_interruption_behavior="stop",
                max_price=_price(capacity.max_spot_price_usd),
            ),
        )
    return None


def _price(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


class GpuNode(pulumi.ComponentResource):
    market: pulumi.Output[str]
    #: Instance ids (one node) or the Auto Scaling group's name (a fleet: AWS picks the instances).
    node_ids: pulumi.Output[list[str]]
    #: The Elastic IP of a single node; None for a fleet (reached through its load balancer).
    public_ip: pulumi.Output[str | None]
    hourly_cost_usd: pulumi.Output[float | None]
    #: The nodes' instance role (a release bucket grants it read access).
    role_arn: pulumi.Output[str]
    #: A fleet's Auto Scaling group name and the launch template version of this release (the gate
    #: waits until only instances of it are healthy targets); None for one node.
    fleet_group: pulumi.Output[str] | None
    template_version: pulumi.Output[str]
    #: The launch template (the fleet gate starts the instance refresh to its new version itself).
    launch_template_id: pulumi.Output[str]
    #: A single node's private address (a multi-node replica's rendezvous); None for a fleet.
    private_ip: pulumi.Output[str | None]

    def __init__(self, name: str, args: GpuNodeArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:aws:GpuNode", name, None, opts)
        r, sizing = args.resolved, args.sizing
        spec, target = r.spec, r.spec.target.aws
        capacity = spec.capacity
        fleet = capacity.is_fleet
        child = pulumi.ResourceOptions(parent=self)

        role = aws.iam.Role(
            f"{name}-role",
            assume_role_policy=json.dumps({"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Action": "sts:AssumeRole", "Principal": {"Service": "ec2.amazonaws.com"}}]}),
            tags=args.tags,
            opts=child,
        )
        # Inline only: an AWS-managed policy (AmazonSSMManagedInstanceCore) would read every parameter of the account.
        aws.iam.RolePolicy(f"{name}-node", role=role.id, policy=_role_policy(r, args.ssm_prefix), opts=child)
        profile = aws.iam.InstanceProfile(f"{name}-profile", role=role.name, tags=args.tags, opts=child)
        self.role_arn = role.arn

        # The AMI is read once: AWS publishing a new one under the /latest/ parameter must not become a
        # new template version (a replaced node). A pinned target.aws.amiId is the announced way to move.
        image = target.ami_id or aws.ssm.get_parameter_output(
            name=catalog.DLAMI_SSM_PARAMETER, opts=pulumi.InvokeOutputOptions(parent=self)).value
        instance_tags = {**args.tags, boot_stub.RELEASE_TAG: args.release_digest} if fleet else args.tags
        capacity_reservation = None
        if capacity.effective_market == "capacity-block":
            capacity_reservation = aws.ec2.LaunchTemplateCapacityReservationSpecificationArgs(
                capacity_reservation_target=aws.ec2.LaunchTemplateCapacityReservationSpecificationCapacityReservationTargetArgs(
                    capacity_reservation_id=capacity.capacity_reservation_id,
                ),
            )
        template = aws.ec2.LaunchTemplate(
            f"{name}-template",
            image_id=image,
            instance_type=r.offer.instance_type,
            key_name=target.key_name,
            iam_instance_profile=aws.ec2.LaunchTemplateIamInstanceProfileArgs(arn=profile.arn),
            # With interfaces declared, the groups and subnet live in them (AWS refuses both at once).
            vpc_security_group_ids=None if args.fabric else [args.security_group_id],
            network_interfaces=efa_interfaces(args.fabric) if args.fabric else None,
            placement=aws.ec2.LaunchTemplatePlacementArgs(group_name=args.fabric.placement_group)
            if args.fabric else None,
            user_data=pulumi.Output.from_input(args.user_data).apply(
                lambda text: base64.b64encode(node_files.user_data_bytes(text)).decode()),
            metadata_options=aws.ec2.LaunchTemplateMetadataOptionsArgs(
                http_endpoint="enabled", http_tokens="required", http_put_response_hop_limit=IMDS_HOP_LIMIT,
                # A fleet node reads the release it boots from its own tag.
                instance_metadata_tags="enabled" if fleet else None),
            block_device_mappings=[aws.ec2.LaunchTemplateBlockDeviceMappingArgs(
                device_name=ROOT_DEVICE,
                ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                    volume_size=target.root_volume_gib, volume_type="gp3", encrypted="true",
                    delete_on_termination="true"),
            )],
            instance_market_options=_market_options(r, fleet),
            capacity_reservation_specification=capacity_reservation,
            tag_specifications=[
                aws.ec2.LaunchTemplateTagSpecificationArgs(resource_type="instance", tags=instance_tags),
                aws.ec2.LaunchTemplateTagSpecificationArgs(resource_type="volume", tags=args.tags)],
            tags=args.tags,
            update_default_version=True,
            # The subnet (so the zone, the weight volumes' and the placement group's) is chosen once: a
            # zone AWS adds later must not be a new template version, which replaces the instance.
            opts=pulumi.ResourceOptions(parent=self, ignore_changes=([] if target.ami_id else ["imageId"]) + (
                ["networkInterfaces[*].subnetId"] if args.fabric else [])),
        )

        self.market = pulumi.Output.from_input(capacity.effective_market)
        self.hourly_cost_usd = pulumi.Output.from_input(estimate(r).fleet_usd_per_hour)
        self.template_version = _version(template)
        self.launch_template_id = template.id
        self.fleet_group = None
        if fleet:
            group = self._fleet(name, args, template, sizing)
            windows = health.windows(sizing, verification_seconds=node_files.ADMISSION_DEADLINE_SECONDS, fleet=True)
            # A new instance serves only once its watchdog admitted it (the suite passed on the node): it
            # waits in Pending:Wait until it completes this hook, and is abandoned if it never does. (A
            # separate resource, not the group's initial hooks, so a running stack gets it too.)
            aws.autoscaling.LifecycleHook(
                f"{name}-admission", autoscaling_group_name=group.name, name=health.ADMISSION_HOOK_NAME,
                lifecycle_transition="autoscaling:EC2_INSTANCE_LAUNCHING", default_result="ABANDON",
                heartbeat_timeout=health.admission_hook_timeout(windows), opts=child)
            policy = scaling_policy(r, sizing)
            if policy is not None:
                FleetScaling(f"{name}-scaling", FleetScalingArgs(stack=spec.stack, group_name=group.name,
                                                                 policy=policy), child)
            # Every fleet's terminating replica drains first, whatever terminates it (a scale-in, an
            # instance refresh of a fixed fleet, an edit of its size): the hook holds it while its node
            # stops taking requests and finishes the running ones (node_scripts/drain.py, on every
            # fleet node). It lived under FleetScaling before fixed fleets had it: the alias keeps a
            # scaling stack's hook in place (a new resource would put the same hook name, then delete it).
            drain_opts = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(aliases=[pulumi.Alias(
                name=f"{name}-scaling-drain",
                parent=pulumi.create_urn(f"{name}-scaling", "kimi-fleet:aws:FleetScaling", parent=self))]))
            aws.autoscaling.LifecycleHook(
                f"{name}-drain", autoscaling_group_name=group.name, name=DRAIN_HOOK_NAME,
                lifecycle_transition="autoscaling:EC2_INSTANCE_TERMINATING", default_result="CONTINUE",
                heartbeat_timeout=drain_heartbeat_seconds(node_files.drain_timeout_seconds(r, sizing)),
                opts=drain_opts)
            # A node's Auto Scaling calls on itself (completing its admission and its drain, its scale-in
            # protection while busy) go through the stack's steward, which acts on the caller's own
            # instance only: the role holds neither action (no instance condition exists for them, so
            # it would hold them for every peer). A dead node powers itself off instead of marking
            # itself unhealthy (the same: that permission would cover every node of the group).
            steward = FleetSteward(f"{name}-steward", FleetStewardArgs(
                group_name=group.name, group_arn=group.arn, node_role_arn=role.arn,
                admission_hook=health.ADMISSION_HOOK_NAME, drain_hook=DRAIN_HOOK_NAME,
                url_parameter=node_files.steward_url_parameter(args.ssm_prefix), tags=args.tags), child)
            # Under its own name: the pre-steward `{name}-admission` (the direct writes) is no longer
            # declared, so Pulumi deletes it only at the end of a `pulumi up` that succeeded, after the
            # gate made a steward release the group's good version. Until then a rollback, a scale-out or
            # a spot replacement launching the older release can still admit itself (lifecycle_rights.py).
            aws.iam.RolePolicy(f"{name}{lifecycle_rights.STEWARD_CALLER_SUFFIX}", role=role.id, opts=child,
                               policy=steward.function_arn.apply(_steward_caller_policy))
            self.node_ids = pulumi.Output.all(group.name)
            self.public_ip = pulumi.Output.from_input(None)
            self.private_ip = pulumi.Output.from_input(None)
            self.fleet_group = group.name
        else:
            # The instance follows the template's newest version, and a new version replaces it (the
            # provider cannot change a live instance's template): so releases never touch the template
            # (the user data is the frozen boot loader, releases arrive through SSM), and only an
            # announced change does (market, instance type, a pinned amiId; plan.py --diff says so).
            # The old node goes first: its GPUs are the capacity the new one needs, and the EBS weight
            # volume attaches to one node.
            # The subnet (so the zone, the weight volume's) is chosen once: a zone AWS adds later moves nothing.
            replace_in_order = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(delete_before_replace=True))
            instance_opts = pulumi.ResourceOptions.merge(replace_in_order, pulumi.ResourceOptions(
                ignore_changes=["subnetId"]))
            node_name = spec.stack if args.fabric is None else f"{spec.stack}-rank-{args.fabric.rank}"
            instance = aws.ec2.Instance(
                f"{name}-instance",
                launch_template=aws.ec2.InstanceLaunchTemplateArgs(id=template.id,
                                                                   version=_version(template)),
                subnet_id=None if args.fabric else pulumi.Output.from_input(args.subnet_ids).apply(lambda ids: ids[0]),
                tags={**args.tags, "Name": node_name},
                opts=instance_opts,
            )
            if args.weights_volume_id is not None:
                aws.ec2.VolumeAttachment(f"{name}-weights", device_name=WEIGHTS_DEVICE,
                                         volume_id=args.weights_volume_id, instance_id=instance.id,
                                         opts=replace_in_order)
            address = aws.ec2.Eip(f"{name}-eip", domain="vpc", tags={**args.tags, "Name": node_name}, opts=child)
            # With several interfaces AWS assigns no public address, and an Elastic IP must name the
            # interface: the primary one (card 0, device 0). A worker needs one too, for its weights,
            # image and AWS's APIs; its groups let nothing from outside the replica in.
            aws.ec2.EipAssociation(
                f"{name}-eip-association", allocation_id=address.allocation_id,
                instance_id=None if args.fabric else instance.id,
                network_interface_id=instance.primary_network_interface_id if args.fabric else None, opts=child)
            self.node_ids = pulumi.Output.all(instance.id)
            self.public_ip = address.public_ip
            self.private_ip = instance.private_ip
        self.register_outputs({
            "market": self.market,
            "node_ids": self.node_ids,
            "public_ip": self.public_ip,
            "hourly_cost_usd": self.hourly_cost_usd,
            "role_arn": self.role_arn,
            "fleet_group": self.fleet_group,
            "template_version": self.template_version,
            "launch_template_id": self.launch_template_id,
            "private_ip": self.private_ip,
        })

    def _fleet(self, name: str, args: GpuNodeArgs, template: aws.ec2.LaunchTemplate,
               sizing: Sizing) -> aws.autoscaling.Group:
        r = args.resolved
        capacity = r.spec.capacity
        market = capacity.effective_market
        # A version number (not "$Latest"): a new template version is a change of the group, which
        # starts the instance refresh below.
        specification = {"launch_template_id": template.id, "version": _version(template)}
        mixed = None
        launch_template = None
        if market == "capacity-block":
            launch_template = aws.autoscaling.GroupLaunchTemplateArgs(id=template.id, version=_version(template))
        else:
            mixed = aws.autoscaling.GroupMixedInstancesPolicyArgs(
                instances_distribution=aws.autoscaling.GroupMixedInstancesPolicyInstancesDistributionArgs(
                    on_demand_base_capacity=capacity.effective_on_demand_base,
                    on_demand_percentage_above_base_capacity=0 if market == "spot" else 100,
                    spot_allocation_strategy="price-capacity-optimized",
                    spot_max_price=_price(capacity.max_spot_price_usd),
                ),
                launch_template=aws.autoscaling.GroupMixedInstancesPolicyLaunchTemplateArgs(
                    launch_template_specification=(
                        aws.autoscaling.GroupMixedInstancesPolicyLaunchTemplateLaunchTemplateSpecificationArgs(
                            **specification)),
                    overrides=[aws.autoscaling.GroupMixedInstancesPolicyLaunchTemplateOverrideArgs(
                        instance_type=r.offer.instance_type)],
                ),
            )
        scaling = capacity.scaling
        low, high = (scaling.min_replicas, scaling.max_replicas) if scaling else (capacity.replicas, capacity.replicas)
        # With a range, the desired count is the policy's once the group exists: capacity.replicas is
        # only the count it is created with, and a later `pulumi up` must not set it back (the provider
        # would send it as an update; the SDK's own note: omit it, or ignore it, under scaling policies).
        # min/max are updates in place, never a replacement (catalog.REPLACE_ON_CHANGE: name only); a
        # range that no longer holds the policy's count moves it (UpdateAutoScalingGroup API reference:
        # a new MinSize above the group's size sets the desired capacity to it, a MaxSize below to that).
        ignored = ["mixedInstancesPolicy.launchTemplate.launchTemplateSpecification.version", "launchTemplate.version"]
        if scaling:
            ignored.append("desiredCapacity")
        return aws.autoscaling.Group(
            f"{name}-group",
            min_size=low,
            max_size=high,
            desired_capacity=capacity.replicas,
            # One-minute group metrics (free): the dashboard's replica count and the policy's moves.
            enabled_metrics=list(GROUP_METRICS),
            vpc_zone_identifiers=args.subnet_ids,
            mixed_instances_policy=mixed,
            launch_template=launch_template,
            # Launch a replacement when AWS signals a rebalance risk, before the interruption lands.
            capacity_rebalance=market == "spot",
            target_group_arns=args.target_group_arns,
            # EC2, not ELB: a node the load balancer stops routing to (busy, reloading) is not replaced
            # for it; a node's watchdog marks itself unhealthy only when it is dead (kimi_fleet/health.py).
            health_check_type="EC2",
            health_check_grace_period=health.windows(
                sizing, verification_seconds=node_files.ADMISSION_DEADLINE_SECONDS, fleet=True).grace_period_seconds,
            # GPU capacity can take hours to appear: `pulumi up` must not fail waiting for it.
            wait_for_capacity_timeout="0",
            # No instance_refresh here: the provider stores the new version on the group before the
            # refresh starts, so its auto-rollback relaunches the new version (terraform-provider-aws
            # #34189). The group stays on the last good version; the fleet gate starts the refresh
            # with the new version as its desired configuration, and AWS moves the group only when
            # it succeeds (scripts/await_fleet_release.py).
            tags=[aws.autoscaling.GroupTagArgs(key=k, value=v, propagate_at_launch=True)
                  for k, v in {**args.tags, "Name": r.spec.stack}.items()],
            opts=pulumi.ResourceOptions(parent=self, ignore_changes=ignored),
        )
