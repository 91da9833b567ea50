#!/usr/bin/env python3
"""Wait until a managed weights mirror holds the stack's checkpoint (run by `pulumi up` before any
GPU node is declared, as the MirrorFill component's command).

    await_mirror.py --bucket B --manifest-key K --failure-key F --repo R --revision REV \\
        --region us-east-1 --instance-id i-... --timeout SECONDS

First the bucket itself: default encryption on and every public-access block set, whoever created
it (an adopted bucket included); refused otherwise. Then, every 20 s: the manifest (of this repo
and revision) means done; the fill's failure note means failed (its log's tail is printed); a fill
instance that ended without either means failed; otherwise one progress line a minute.
A manifest that appeared is then checked against the Hub's own tree at the revision
(weights_manifest.hub_manifest_problems; the Hub at $HF_ENDPOINT, token $HF_TOKEN if set) and its
SHA-256 printed on one line starting with MANIFEST_SHA256_PREFIX: MirrorFill exposes it, and the
stack's nodes refuse any other manifest. A manifest that disagrees with the Hub is refused.
Exit 0 when filled and verified, 1 otherwise. Uses the caller's AWS credentials (boto3's usual chain).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import boto3
from botocore.exceptions import ClientError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kimi_fleet.mirror import MANIFEST_SHA256_PREFIX  # noqa: E402
from kimi_fleet.node_scripts import weights_manifest  # noqa: E402

POLL_SECONDS = 20
#: The fill's instance is gone or going: without the manifest, it will not come.
ENDED = {"shutting-down", "terminated", "stopping", "stopped"}
#: Public access is blocked only when all four are set.
PUBLIC_ACCESS_BLOCKS = ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")


def _missing(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}


def bucket_problems(s3, bucket: str) -> list[str]:
    problems = []
    try:
        rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
        algorithms = {r["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] for r in rules}
        if not algorithms & {"AES256", "aws:kms", "aws:kms:dsse"}:
            problems.append(f"default encryption is {sorted(algorithms)}")
    except ClientError as error:
        problems.append(f"no default encryption ({error.response['Error'].get('Code')})")
    try:
        block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
        open_ = [name for name in PUBLIC_ACCESS_BLOCKS if not block.get(name)]
        if open_:
            problems.append(f"public access not blocked: {', '.join(open_)} off")
    except ClientError as error:
        problems.append(f"no public access block ({error.response['Error'].get('Code')})")
    return problems


def read(s3, bucket: str, key: str) -> bytes | None:
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if _missing(error):
            return None
        raise


def pin_manifest(manifest: bytes, where: str, repo: str, revision: str) -> int:
    """Check a mirror's manifest against the Hub; print its digest (exit 0) or refuse it (exit 1)."""
    try:
        document = json.loads(manifest)
        problems = weights_manifest.hub_manifest_problems(document, repo, revision)
    except (ValueError, KeyError, TypeError) as error:
        problems = [f"not a readable manifest ({error})"]
    except OSError as error:  # urllib's errors: the Hub could not be asked, so nothing is pinned
        print(f"mirror: {where} not checked against the Hub ({weights_manifest.hub_endpoint()}): {error}; "
              "refused (nothing is pinned that the Hub did not confirm)", file=sys.stderr)
        return 1
    if problems:
        print(f"mirror: {where} refused: it disagrees with the Hub's tree of {repo}@{revision} "
              f"({len(problems)} problem(s)): {'; '.join(problems[:5])}", file=sys.stderr)
        return 1
    files = document.get("files", [])
    size = sum(f["size"] for f in files)
    print(f"mirror: filled: {len(files)} files, {size / 1e9:.1f} GB of {repo}@{revision[:12]} "
          f"in {where.rsplit('/', 1)[0]}/, every size and SHA-256 as the Hub has them")
    print(f"{MANIFEST_SHA256_PREFIX}{weights_manifest.manifest_sha256(manifest)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("--bucket", "--manifest-key", "--failure-key", "--repo", "--revision", "--region", "--instance-id"):
        parser.add_argument(name, required=True)
    parser.add_argument("--timeout", type=int, required=True)
    parser.add_argument("--expected-minutes", type=int, default=0)
    parser.add_argument("--poll", type=float, default=POLL_SECONDS, help="seconds between checks")
    args = parser.parse_args()
    s3, ec2 = boto3.client("s3", region_name=args.region), boto3.client("ec2", region_name=args.region)
    where = f"s3://{args.bucket}/{args.manifest_key}"

    problems = bucket_problems(s3, args.bucket)
    if problems:
        print(f"mirror: bucket {args.bucket} refused: {'; '.join(problems)}", file=sys.stderr)
        return 1
    started = time.monotonic()
    last_line = -60.0
    while True:
        manifest = read(s3, args.bucket, args.manifest_key)
        if manifest is not None:
            return pin_manifest(manifest, where, args.repo, args.revision)
        failure = read(s3, args.bucket, args.failure_key)
        if failure is not None:
            print(f"mirror: the fill failed; its log ends:\n{failure.decode(errors='replace')}", file=sys.stderr)
            return 1
        reservations = ec2.describe_instances(InstanceIds=[args.instance_id])["Reservations"]
        state = reservations[0]["Instances"][0]["State"]["Name"] if reservations else "gone"
        elapsed = time.monotonic() - started
        if state in ENDED or state == "gone":
            if read(s3, args.bucket, args.manifest_key) is None:  # it may have finished just now
                print(f"mirror: fill instance {args.instance_id} is {state} and {where} does not exist: the fill "
                      "did not finish (its console output: aws ec2 get-console-output)", file=sys.stderr)
                return 1
            continue
        if elapsed >= args.timeout:
            print(f"mirror: {where} did not appear in {args.timeout} s (instance {args.instance_id}: {state}; it "
                  "powers itself off at its deadline)", file=sys.stderr)
            return 1
        if elapsed - last_line >= 60:
            expected = f" of about {args.expected_minutes}" if args.expected_minutes else ""
            print(f"mirror: filling on {args.instance_id} ({state}), {elapsed / 60:.0f} min{expected}", flush=True)
            last_line = elapsed
        time.sleep(args.poll)


if __name__ == "__main__":
    sys.exit(main())
