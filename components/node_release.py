"""NodeRelease: the node files of an AWS stack as a release in S3; a single node takes it in place,
through AWS's own mechanism (a fleet takes it by instance refresh: no association).

The node files travel as one content-addressed bundle (an S3 object named by its SHA-256, in a
private, encrypted bucket that only the node's role may read). An SSM parameter points at the
current bundle; the node's boot stub applies whatever it names. An SSM State Manager association
runs the same applier on the instance whenever the release changes (its command names the
bundle it deploys), and `pulumi up` waits for it to succeed: only the units whose inputs changed
restart, and the instance is replaced only for what a node cannot take in place (AMI, instance
type, root volume, the boot stub).

Bundles outlive their release: the bucket keeps the last RETAINED_BUNDLES of them (a replaced
bundle object is retained, then pruned by age order once more than that exist), so a node launched
from an older template version, or a release rolled back to, still finds its own bundle by digest.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_command as command

from kimi_fleet.boot_stub import BOOT_LOADER, RELEASE_TAG
from kimi_fleet.node_files import APPLY_RELEASE, bundle_digest

#: Every resource of a stack carries it (instances too, through their launch template).
STACK_TAG = "kimi-fleet:stack"

#: What an apply may take: a bootstrap re-run with the weights already on disk, or a first boot's
#: whole cold start when the association reaches a new node before its download finished.
APPLY_MARGIN_SECONDS = 30 * 60
#: Bundles kept in the bucket (K). A fleet's Auto Scaling group may launch from an older template
#: version (an instance refresh rolled back, a scale-out while one is under way), each naming its
#: bundle by digest, and a bad release is undone by deploying an earlier one: the last few releases
#: must stay bootable. Bundles are a few hundred KB; ten cost nothing and cover any rollback
#: a person would do without re-deploying.
RETAINED_BUNDLES = 10
BUNDLE_PREFIX = "releases/"
#: The deployer's interpreter (the virtualenv Pulumi.yaml names), run from the project directory.
PYTHON = ".venv/bin/python"


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
    """The association's script. A node whose first boot never got a bundle (its boot loader gave up
    waiting for the pointer: a multi-node rank whose peer took longer than that to launch) has no
    applier yet: it runs its frozen boot loader again, which installs this release."""
    apply = shlex.join(["python3", APPLY_RELEASE, "--pointer", pointer_name, "--region", region, "--expect", digest])
    boot = shlex.join(["python3", BOOT_LOADER, "--pointer", pointer_name, "--region", region])
    return f"if [ -f {shlex.quote(APPLY_RELEASE)} ]; then {apply}; else {boot}; fi"


def prune_command(bucket: str, region: str, current_key: str, stack: str, keep: int = RETAINED_BUNDLES) -> str:
    """Run by the deployer after each new bundle: the bucket keeps the newest `keep` bundles and
    every bundle an instance of the stack still names."""
    return shlex.join([PYTHON, "-m", "components.node_release", "prune", "--bucket", bucket, "--region", region,
                       "--keep", str(keep), "--current", current_key, "--stack", stack])


def bundles_in_use(ec2, stack: str) -> set[str]:
    """The bundle keys the stack's instances name in their release tag (a fleet's nodes, whatever
    template version launched them: a group the gate kept on its last good version among them).
    `ec2`: a boto3 EC2 client."""
    in_use = set()
    filters = [{"Name": f"tag:{STACK_TAG}", "Values": [stack]},
               {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}]
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                tags = {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}
                if tags.get(RELEASE_TAG):
                    in_use.add(f"{BUNDLE_PREFIX}{tags[RELEASE_TAG]}.json")
    return in_use


def prune_bundles(s3, bucket: str, keep: int, current_key: str, in_use: set[str] = frozenset()) -> list[str]:
    """Delete all but the `keep` newest bundles (by upload time); the current one and those `in_use`
    are always kept, so failed releases in a row never prune the one the nodes run. Return the keys
    deleted. `s3`: a boto3 S3 client."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the current bundle), got {keep}")
    bundles = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=BUNDLE_PREFIX):
        bundles += [(item["LastModified"], item["Key"]) for item in page.get("Contents", [])]
    newest_first = [key for _, key in sorted(bundles, reverse=True)]
    kept = set(newest_first[:keep]) | {current_key} | set(in_use)
    doomed = [key for key in newest_first if key not in kept]
    for start in range(0, len(doomed), 1000):  # DeleteObjects takes 1,000 keys at a time
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key} for key in doomed[start:start + 1000]],
                                                 "Quiet": True})
    return doomed


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
        # A new release replaces this object (its key is the digest): the old bundle is retained
        # (older template versions still name it), and the prune below bounds how many stay.
        bundle_object = aws.s3.BucketObjectv2(
            f"{name}-bundle", bucket=bucket.id, key=digest.apply(lambda d: f"{BUNDLE_PREFIX}{d}.json"),
            content=args.bundle, content_type="application/json", tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self, retain_on_delete=True))
        pointer = aws.ssm.Parameter(
            f"{name}-pointer", name=args.pointer_name, type="String",
            value=pulumi.Output.all(bucket.bucket, digest).apply(lambda v: f"s3://{v[0]}/releases/{v[1]}.json {v[1]}"),
            tags=args.tags, opts=pulumi.ResourceOptions(parent=self, depends_on=[bundle_object, policy]))
        command.local.Command(
            f"{name}-prune",
            create=pulumi.Output.all(bucket.bucket, digest).apply(
                lambda v: prune_command(v[0], args.region, f"{BUNDLE_PREFIX}{v[1]}.json", args.stack)),
            triggers=[digest],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[pointer]))
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.node_release")
    parser.add_argument("action", choices=["prune"])
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--keep", type=int, default=RETAINED_BUNDLES)
    parser.add_argument("--current", required=True, help="the bundle key the pointer names (always kept)")
    parser.add_argument("--stack", required=True, help="the stack whose instances' bundles are kept")
    args = parser.parse_args(argv)
    import boto3

    in_use = bundles_in_use(boto3.client("ec2", region_name=args.region), args.stack)
    deleted = prune_bundles(boto3.client("s3", region_name=args.region), args.bucket, args.keep, args.current, in_use)
    print(f"release bundles: kept the newest {args.keep} in s3://{args.bucket}/{BUNDLE_PREFIX} and the "
          f"{len(in_use)} the stack's instances name; deleted {len(deleted)} older")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
