#!/usr/bin/env python3
"""Pin an external weights mirror's manifest (a stack with weights.source s3-mirror whose mirror is
filled outside the program): run by `pulumi up` before the nodes get their settings.

    pin_mirror_manifest.py --mirror s3://bucket/prefix --repo R --revision REV [--region R]

Reads <mirror>/<repo>/<revision>/kimi-fleet-manifest.json with the caller's AWS credentials, checks
it against the Hub's own tree at the revision (sizes, LFS SHA-256, the small files fetched and
hashed; the Hub at $HF_ENDPOINT) and prints its SHA-256 on one line starting with
MANIFEST_SHA256_PREFIX; the nodes refuse any other manifest. Exit 1 when the manifest is missing or
disagrees with the Hub (one line saying which files and why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import boto3
from botocore.exceptions import BotoCoreError, ClientError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.await_mirror import pin_manifest  # noqa: E402
from kimi_fleet.node_scripts.weights_manifest import MANIFEST_NAME  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mirror", required=True, help="s3://bucket/prefix")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--revision", required=True)
    parser.add_argument("--region")
    args = parser.parse_args(argv)
    if not args.mirror.startswith("s3://"):
        parser.error(f"--mirror must be an s3:// URI, got {args.mirror!r}")
    bucket, _, prefix = args.mirror.removeprefix("s3://").rstrip("/").partition("/")
    key = "/".join(p for p in (prefix, args.repo, args.revision, MANIFEST_NAME) if p)
    where = f"s3://{bucket}/{key}"
    try:
        manifest = boto3.client("s3", region_name=args.region).get_object(Bucket=bucket, Key=key)["Body"].read()
    except (ClientError, BotoCoreError) as error:
        print(f"mirror: {where} could not be read ({error}): fill the mirror first "
              "(node_scripts/fill_mirror.py), then deploy", file=sys.stderr)
        return 1
    return pin_manifest(manifest, where, args.repo, args.revision)


if __name__ == "__main__":
    sys.exit(main())
