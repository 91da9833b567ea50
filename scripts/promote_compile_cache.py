#!/usr/bin/env python3
"""Promote one node's compile cache to the shared, pinned cache of its launch (run by the
verification gate after the suite passed, with the deployer's credentials; issue 21).

    promote_compile_cache.py --region R --bucket B --cache-prefix CACHE --stack S --launch DIGEST \\
        --pin-parameter /kimi-fleet/S/compile-cache/DIGEST (--instance-id i-... | --group ASG) \\
        --timeout SECONDS

Nodes may only publish candidates (CACHE/candidates/<stack>/<role id>:<instance id>/<launch>.tar, each
under its own ${aws:userid}) and cannot
read anyone's. This waits, at most --timeout, for a candidate of this launch from an instance of
this stack (the single node, or any instance in the fleet's Auto Scaling group), downloads it,
checks every member with the rules the node's restore applies (compile_cache.archive_problem: no
`..`, absolute names, links out, devices or setuid bits), hashes it, uploads the bytes it checked
to CACHE/sha256/<hex>.tar and records <hex> in the SSM parameter --pin-parameter. Nodes restore
only that key, and only when its SHA-256 is the pin.

Caches are an optimisation: no candidate in time, a refused candidate or an AWS error is one clear
line and exit 0 (nothing promoted; the next node compiles). Exit 2 only for a usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tempfile
import time
from pathlib import Path

import boto3
from botocore.exceptions import BotoCoreError, ClientError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kimi_fleet.node_scripts import compile_cache  # noqa: E402

POLL_SECONDS = 20
#: A node's kernels are a few GB; anything far beyond is not a compile cache.
MAX_CANDIDATE_BYTES = 64 << 30


def log(message: str) -> None:
    print(f"compile cache: {message}", flush=True)


def current_pin(ssm, parameter: str) -> str | None:
    try:
        return ssm.get_parameter(Name=parameter)["Parameter"]["Value"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "ParameterNotFound":
            return None
        raise


def stack_instances(args, autoscaling) -> set[str]:
    if args.instance_id:
        return set(args.instance_id)
    groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[args.group])["AutoScalingGroups"]
    return {i["InstanceId"] for g in groups for i in g.get("Instances", [])}


def find_candidate(s3, args, instances: set[str]) -> str | None:
    """The newest candidate of this launch from one of `instances`."""
    prefix = f"{args.cache_prefix}/{compile_cache.CANDIDATES_DIR}/{args.stack}/"
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=args.bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            # <role id>:<instance id>, the uploader's own ${aws:userid}: the one prefix its role may write.
            uploader, _, name = item["Key"].removeprefix(prefix).partition("/")
            if not compile_cache.CALLER.fullmatch(uploader):
                continue
            instance = uploader.rpartition(":")[2]
            if instance in instances and name == f"{args.launch}.tar":
                found.append((item["LastModified"], item["Key"]))
    return max(found)[1] if found else None


def promote(s3, ssm, args, key: str) -> None:
    where = f"s3://{args.bucket}/{key}"
    with tempfile.TemporaryFile() as local:
        s3.download_fileobj(args.bucket, key, local)
        size = local.tell()
        if size > MAX_CANDIDATE_BYTES:
            log(f"refused candidate {where}: {size} bytes, more than {MAX_CANDIDATE_BYTES}; nothing promoted")
            return
        local.seek(0)
        digest = hashlib.sha256()
        for chunk in iter(lambda: local.read(16 << 20), b""):
            digest.update(chunk)
        sha256 = digest.hexdigest()
        local.seek(0)
        try:  # the bytes hashed are the bytes checked and the bytes uploaded: no second read of the key
            members = compile_cache.check_archive(local)
        except (compile_cache.Refused, OSError, compile_cache.tarfile.TarError) as refusal:
            log(f"refused candidate {where}: {refusal}; nothing promoted (the next node compiles its own kernels)")
            return
        local.seek(0)
        pinned_key = f"{args.cache_prefix}/{compile_cache.PINNED_DIR}/{sha256}.tar"
        s3.upload_fileobj(local, args.bucket, pinned_key)
    ssm.put_parameter(Name=args.pin_parameter, Value=sha256, Type="String", Overwrite=True,
                      Description=f"kimi-fleet {args.stack}: SHA-256 of the promoted compile cache of launch {args.launch}")
    log(f"promoted {where} ({members} entries) as s3://{args.bucket}/{pinned_key}; pinned {args.pin_parameter} = {sha256}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("--region", "--bucket", "--cache-prefix", "--stack", "--launch", "--pin-parameter"):
        parser.add_argument(name, required=True)
    nodes = parser.add_mutually_exclusive_group(required=True)
    nodes.add_argument("--instance-id", action="append", help="the stack's single node (repeatable)")
    nodes.add_argument("--group", help="the fleet's Auto Scaling group: any of its instances")
    parser.add_argument("--timeout", type=float, required=True, help="seconds to wait for a candidate")
    parser.add_argument("--poll", type=float, default=POLL_SECONDS)
    args = parser.parse_args(argv)
    args.cache_prefix = args.cache_prefix.strip("/")
    if not re.fullmatch(r"[0-9a-f]{16,64}", args.launch):
        parser.error(f"--launch must be the launch digest (hex), got {args.launch!r}")
    session = boto3.session.Session(region_name=args.region)
    s3, ssm, autoscaling = session.client("s3"), session.client("ssm"), session.client("autoscaling")
    try:
        pinned = current_pin(ssm, args.pin_parameter)
        if pinned:
            log(f"launch {args.launch} already pinned ({args.pin_parameter} = {pinned}): nothing to promote")
            return 0
        started = time.monotonic()
        while True:
            key = find_candidate(s3, args, stack_instances(args, autoscaling))
            if key:
                promote(s3, ssm, args, key)
                return 0
            if time.monotonic() - started >= args.timeout:
                log(f"warning: no candidate of launch {args.launch} from {args.stack}'s nodes under "
                    f"s3://{args.bucket}/{args.cache_prefix}/{compile_cache.CANDIDATES_DIR}/{args.stack}/ in "
                    f"{args.timeout:.0f} s: nothing promoted (new nodes compile their own kernels)")
                return 0
            time.sleep(args.poll)
    except (ClientError, BotoCoreError, OSError) as error:
        log(f"warning: not promoted: {error} (new nodes compile their own kernels)")
        return 0


if __name__ == "__main__":
    sys.exit(main())
