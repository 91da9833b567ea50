"""NodeRelease: the node files of an AWS stack as a release in S3; a single node takes it in place,
through AWS's own mechanism (a fleet takes it by instance refresh: no association).

The node files travel as one content-addressed bundle (an S3 object named by its SHA-256, in a
private, encrypted bucket that only the node's role may read). An SSM parameter points at the
current bundle; the node's boot stub applies whatever it names. An SSM State Manager association
runs the same applier on the instance whenever the release changes (its command names the
bundle it deploys), and `pulumi up` waits for it to succeed: only the units whose inputs changed
restart, and the instance is replaced only for what a node cannot take in place (AMI, instance
type, root volume, the boot stub).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from kimi_fleet.node_files import APPLY_RELEASE, bundle_digest

#: What an apply may take: a bootstrap re-run with the weights already on disk, or a first boot's
#: whole cold start when the association reaches a new node before its download finished.
APPLY_MARGIN_SECONDS = 30 * 60


@dataclass
class NodeReleaseArgs:
    stack: str
    region: str
    #: the JSON bundle of every node file (node_files.release_bundle)
    bundle: pulumi.Input[str]
    pointer_name: str
    #: the single node to apply each release to in place (None: a fleet, refreshed instead)
    instance_id: pulumi.Input[str] | None
    role_arn: pulumi.Input[str]
    apply_timeout_seconds: int
    tags: dict[str, str]


def apply_command(pointer_name: str, region: str, digest: str) -> str:
    return shlex.join(["python3", APPLY_RELEASE, "--pointer", pointer_name, "--region", region, "--expect", digest])


def read_only_policy(bucket_arn: str, role_arn: str) -> str:
    """The node's role reads releases; nothing reaches the bucket without TLS."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "NodeReadsReleases", "Effect": "Allow", "Principal": {"AWS": role_arn},
         "Action": "s3:GetObject", "Resource": f"{bucket_arn}/releases/*"},
        {"Sid": "TlsOnly", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
         "Resource": [bucket_arn, f"{bucket_arn}/*"], "Condition": {"Bool": {"aws:SecureTransport": "false"}}},
    ]})


class NodeRelease(pulumi.ComponentResource):
    #: the SHA-256 of the bundle the node runs after this update
    digest: pulumi.Output[str]
    bucket_name: pulumi.Output[str]

    def __init__(self, name: str, args: NodeReleaseArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:aws:NodeRelease", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        bucket = aws.s3.Bucket(f"{name}-bucket", bucket_prefix="kimi-releases-", force_destroy=True,
                               tags=args.tags, opts=child)
        blocked = aws.s3.BucketPublicAccessBlock(
            f"{name}-private", bucket=bucket.id, block_public_acls=True, block_public_policy=True,
            ignore_public_acls=True, restrict_public_buckets=True, opts=child)
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{name}-encryption", bucket=bucket.id,
            rules=[aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
                apply_server_side_encryption_by_default=(
                    aws.s3.BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                        sse_algorithm="AES256")))],
            opts=child)
        policy = aws.s3.BucketPolicy(
            f"{name}-policy", bucket=bucket.id,
            policy=pulumi.Output.all(bucket.arn, args.role_arn).apply(lambda v: read_only_policy(v[0], v[1])),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[blocked]))

        digest = pulumi.Output.from_input(args.bundle).apply(bundle_digest)
        bundle_object = aws.s3.BucketObjectv2(
            f"{name}-bundle", bucket=bucket.id, key=digest.apply(lambda d: f"releases/{d}.json"),
            content=args.bundle, content_type="application/json", tags=args.tags, opts=child)
        pointer = aws.ssm.Parameter(
            f"{name}-pointer", name=args.pointer_name, type="String",
            value=pulumi.Output.all(bucket.bucket, digest).apply(lambda v: f"s3://{v[0]}/releases/{v[1]}.json {v[1]}"),
            tags=args.tags, opts=pulumi.ResourceOptions(parent=self, depends_on=[bundle_object, policy]))
        self.digest = digest
        self.bucket_name = bucket.bucket
        self.register_outputs({"digest": self.digest, "bucket_name": self.bucket_name})
        if args.instance_id is None:
            return
        # A new release is a new command, so State Manager runs it again; Pulumi waits for success.
        aws.ssm.Association(
            f"{name}-apply",
            name="AWS-RunShellScript",
            association_name=f"kimi-fleet-{args.stack}-apply-release",
            targets=[aws.ssm.AssociationTargetArgs(key="InstanceIds", values=[args.instance_id])],
            parameters={
                "commands": digest.apply(lambda d: apply_command(args.pointer_name, args.region, d)),
                "executionTimeout": str(args.apply_timeout_seconds + APPLY_MARGIN_SECONDS),
            },
            wait_for_success_timeout_seconds=args.apply_timeout_seconds + APPLY_MARGIN_SECONDS,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[pointer]),
        )
