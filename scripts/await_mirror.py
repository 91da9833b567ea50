#!/usr/bin/env python3
"""Wait until a managed weights mirror holds the stack's checkpoint (run by `pulumi up` before any
GPU node is declared, as the MirrorFill component's command).

    await_mirror.py --bucket B --manifest-key K --failure-key F --repo R --revision REV \\
        --region us-east-1 --instance-id i-... --timeout SECONDS

First the bucket itself: default encryption on and every public-access block set, whoever created
it (an adopted bucket included); refused otherwise. Then, every 20 s: the manifest (of this repo
and revision) means done; the fill's failure note means failed (its log's tail is printed); a fill
instance that ended without either means failed; otherwise one progress line a minute.
Exit 0 when filled, 1 otherwise. Uses the caller's AWS credentials (boto3's usual chain).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import boto3
from botocore.exceptions import ClientError

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
            document = json.loads(manifest)
            if (document.get("repo"), document.get("revision")) != (args.repo, args.revision):
                print(f"mirror: {where} describes {document.get('repo')}@{document.get('revision')}, not "
                      f"{args.repo}@{args.revision}", file=sys.stderr)
                return 1
            files = document.get("files", [])
            size = sum(f["size"] for f in files)
            print(f"mirror: filled: {len(files)} files, {size / 1e9:.1f} GB of {args.repo}@{args.revision[:12]} "
                  f"in {where.rsplit('/', 1)[0]}/")
            return 0
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
