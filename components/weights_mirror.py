"""WeightsMirror: the region's S3 bucket of checkpoints (weights.mirror: managed), created or adopted.

Created: the bucket with default encryption, every public-access block, TLS-only access and a
lifecycle that aborts incomplete multipart uploads (a fill cut off mid-upload leaves no billed
parts) and expires the nodes' shared compile caches (old images' kernels do not pile up). It is
retained when the stack is destroyed: other stacks in the region read it, and a refill costs a Hub
download; delete it by hand when no stack needs it. Adopted: looked up by name (preview
fails when it does not exist yet), its encryption and public access are checked by the fill's wait
before any GPU node is declared.

It registers what it declared as facts (`mirror`), which the policy pack checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from kimi_fleet import catalog
from kimi_fleet.mirror import MirrorPlan

SSE_ALGORITHM = "AES256"


@dataclass
class WeightsMirrorArgs:
    plan: MirrorPlan
    tags: dict[str, str]


def tls_only_policy(bucket_arn: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "TlsOnly", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
         "Resource": [bucket_arn, f"{bucket_arn}/*"], "Condition": {"Bool": {"aws:SecureTransport": "false"}}}]})


def mirror_facts(plan: MirrorPlan) -> dict:
    """What the component declares about its bucket (for the policy pack); None for what an adopted
    bucket's owner declares (checked live by the fill's wait instead)."""
    created = plan.create_bucket
    return {
        "bucket": plan.bucket,
        "created": created,
        "encryption": SSE_ALGORITHM if created else None,
        "publicAccessBlock": dict.fromkeys(("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls",
                                            "restrictPublicBuckets"), True) if created else None,
        "abortIncompleteUploadsDays": catalog.MIRROR_ABORT_INCOMPLETE_UPLOAD_DAYS if created else None,
        "compileCachePrefix": plan.compile_cache_prefix,
        "compileCacheExpiryDays": catalog.MIRROR_COMPILE_CACHE_EXPIRY_DAYS if created else None,
        "liveCheckBeforeNodes": True,
    }


class WeightsMirror(pulumi.ComponentResource):
    bucket_name: pulumi.Output[str]
    bucket_arn: pulumi.Output[str]
    mirror: pulumi.Output[dict]

    def __init__(self, name: str, args: WeightsMirrorArgs, opts: pulumi.ResourceOptions | None = None):
        plan = args.plan
        facts = mirror_facts(plan)
        super().__init__("kimi-fleet:weights:WeightsMirror", name, {"mirror": facts}, opts)
        child = pulumi.ResourceOptions(parent=self)
        if plan.create_bucket:
            # Kept on destroy: other stacks read it, and its content costs a refill.
            bucket = aws.s3.Bucket(f"{name}-bucket", bucket=plan.bucket, tags=args.tags,
                                   opts=pulumi.ResourceOptions(parent=self, retain_on_delete=True))
            blocked = aws.s3.BucketPublicAccessBlock(
                f"{name}-private", bucket=bucket.id, **{_snake(k): v for k, v in facts["publicAccessBlock"].items()},
                opts=child)
            aws.s3.BucketServerSideEncryptionConfiguration(
                f"{name}-encryption", bucket=bucket.id,
                rules=[aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
                    apply_server_side_encryption_by_default=(
                        aws.s3.BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                            sse_algorithm=facts["encryption"])),
                    bucket_key_enabled=True)],
                opts=child)
            aws.s3.BucketLifecycleConfiguration(
                f"{name}-lifecycle", bucket=bucket.id,
                rules=[aws.s3.BucketLifecycleConfigurationRuleArgs(
                    id="abort-incomplete-uploads", status="Enabled",
                    filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(prefix=""),
                    abort_incomplete_multipart_upload=aws.s3.BucketLifecycleConfigurationRuleAbortIncompleteMultipartUploadArgs(
                        days_after_initiation=facts["abortIncompleteUploadsDays"])),
                    aws.s3.BucketLifecycleConfigurationRuleArgs(
                        id="expire-compile-caches", status="Enabled",
                        filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(
                            prefix=f"{facts['compileCachePrefix']}/"),
                        expiration=aws.s3.BucketLifecycleConfigurationRuleExpirationArgs(
                            days=facts["compileCacheExpiryDays"]))],
                opts=child)
            aws.s3.BucketPolicy(f"{name}-tls-only", bucket=bucket.id, policy=bucket.arn.apply(tls_only_policy),
                                opts=pulumi.ResourceOptions(parent=self, depends_on=[blocked]))
            self.bucket_name, self.bucket_arn = bucket.bucket, bucket.arn
        else:
            found = aws.s3.get_bucket_output(bucket=plan.bucket, opts=pulumi.InvokeOutputOptions(parent=self))
            self.bucket_name, self.bucket_arn = found.bucket, found.arn
        self.mirror = pulumi.Output.from_input(facts)
        self.register_outputs({"bucket_name": self.bucket_name, "bucket_arn": self.bucket_arn, "mirror": self.mirror})


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
