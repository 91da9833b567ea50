#!/usr/bin/env python3
"""The frozen boot loader: the only program an AWS node's user data carries (issue 20).

Everything else travels in the release bundle, so this text, and with it the launch template and
the instance, changes only when the loader itself changes: an edit to any node file, flag or
package list is a new bundle, never a new instance. At first boot it
  1. reads the release pointer (SSM: "s3://bucket/releases/<sha256>.json <sha256>"), or, with
     --expect-tag, the bundle digest the instance's launch template tags it with (a fleet: a new
     release is a new template version, which starts the instance refresh);
  2. fetches that bundle and refuses it unless its SHA-256 is the digest;
  3. installs the packages the bundle lists (NODE_PACKAGES_FILE, one per line), if any;
  4. writes the bundle's apply_release.py and hands over to it: `--boot --expect <digest>`, so the
     applier applies exactly the bundle checked here.
Transient AWS errors (the pointer or bundle not written yet, the role not propagated, SSM or S3
unreachable) are retried with backoff and jitter until --wait runs out; a refusal (wrong digest,
a malformed pointer, a bundle without the applier) is not. The AWS CLI does the fetching (as the
applier's); $KIMI_ROOT prefixes every path and $AWS_EC2_METADATA_SERVICE_ENDPOINT (the AWS SDKs' variable)
replaces the metadata service (tests).

usage: boot_loader.py --pointer PARAMETER --region REGION [--expect-tag TAG] [--wait SECONDS]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(os.environ.get("KIMI_ROOT", "/"))
LOG = ROOT / "var/log/kimi-fleet/bootstrap.log"
APPLY_RELEASE = "/usr/local/lib/kimi-fleet/apply_release.py"
NODE_PACKAGES_FILE = "/etc/kimi-fleet/node-packages"
IMDS_URL = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254").rstrip("/")
WAIT_SECONDS = 1800
FIRST_DELAY_SECONDS = 5.0
MAX_DELAY_SECONDS = 60.0


class Transient(RuntimeError):
    """May pass (network, an object not yet written): retried."""


class Refused(RuntimeError):
    """Wrong and will stay wrong: never retried."""


def log(message: str) -> None:
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} [kimi-boot-loader] {message}"
    print(line, file=sys.stderr, flush=True)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as out:
        out.write(line + "\n")


def run(command: list[str]) -> bytes:
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        raise Transient(f"{' '.join(command[:3])}: {result.stderr.decode(errors='replace').strip()[-300:]}")
    return result.stdout


def retrying(what: str, attempt, wait_seconds: float, first_delay: float):
    deadline = time.monotonic() + wait_seconds
    delay = first_delay
    while True:
        try:
            return attempt()
        except Transient as error:
            if time.monotonic() >= deadline:
                raise
            pause = min(random.uniform(delay / 2, delay), max(0.0, deadline - time.monotonic()))
            log(f"{what}: {error}; retrying in {pause:.1f}s")
            time.sleep(pause)
            delay = min(MAX_DELAY_SECONDS, delay * 2)


def read_pointer(name: str, region: str) -> tuple[str, str]:
    value = run(["aws", "ssm", "get-parameter", "--region", region, "--name", name,
                 "--query", "Parameter.Value", "--output", "text"]).decode().strip()
    parts = value.split()
    if len(parts) != 2 or not parts[0].startswith("s3://") or len(parts[1]) != 64:
        raise Refused(f"pointer {name} holds {value!r}, not 's3://... <sha256>'")
    return parts[0], parts[1]


def tagged_digest(tag: str) -> str:
    """The instance tag `tag` through IMDSv2 (the launch template's tag of this node's release)."""
    try:
        token_request = urllib.request.Request(f"{IMDS_URL}/latest/api/token", method="PUT",
                                               headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
        token = urllib.request.urlopen(token_request, timeout=5).read().decode()
        tag_request = urllib.request.Request(f"{IMDS_URL}/latest/meta-data/tags/instance/{tag}",
                                             headers={"X-aws-ec2-metadata-token": token})
        digest = urllib.request.urlopen(tag_request, timeout=5).read().decode().strip()
    except OSError as error:
        raise Transient(f"instance tag {tag}: {error}") from None
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise Refused(f"instance tag {tag} holds {digest[:80]!r}, not a SHA-256")
    return digest


def fetch(uri: str, digest: str, region: str) -> dict:
    bundle = run(["aws", "s3", "cp", uri, "-", "--region", region])
    actual = hashlib.sha256(bundle).hexdigest()
    if actual != digest:
        raise Refused(f"bundle {uri} has SHA-256 {actual}, expected {digest}: refusing it")
    return json.loads(bundle)


def bundle_file(bundle: dict, path: str) -> dict | None:
    return next((entry for entry in bundle.get("files", []) if entry.get("path") == path), None)


def install_packages(bundle: dict, wait_seconds: float, first_delay: float) -> None:
    listed = bundle_file(bundle, NODE_PACKAGES_FILE)
    packages = [p for p in (listed or {}).get("content", "").split() if p]
    if not packages:
        log("the bundle lists no packages: none installed by the loader")
        return
    env_noninteractive = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def attempt():
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *packages]):
            result = subprocess.run(command, capture_output=True, env=env_noninteractive, check=False)
            if result.returncode != 0:
                raise Transient(f"{' '.join(command[:2])}: {result.stderr.decode(errors='replace').strip()[-300:]}")

    retrying("packages", attempt, wait_seconds, first_delay)
    log(f"packages installed: {' '.join(packages)}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="boot_loader.py")
    parser.add_argument("--pointer", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--expect-tag", help="instance tag naming the bundle's SHA-256 (a fleet's template)")
    parser.add_argument("--wait", type=float, default=WAIT_SECONDS, help="seconds to retry transient errors")
    parser.add_argument("--retry-delay", type=float, default=FIRST_DELAY_SECONDS)
    args = parser.parse_args(argv)
    try:
        uri, digest = retrying("release pointer", lambda: read_pointer(args.pointer, args.region),
                               args.wait, args.retry_delay)
        if args.expect_tag:
            digest = retrying("bundle tag", lambda: tagged_digest(args.expect_tag), args.wait, args.retry_delay)
            uri = f"{uri.rsplit('/', 1)[0]}/{digest}.json"
        bundle = retrying(f"release bundle {digest[:16]}", lambda: fetch(uri, digest, args.region),
                          args.wait, args.retry_delay)
        applier = bundle_file(bundle, APPLY_RELEASE)
        if applier is None:
            raise Refused(f"bundle {digest[:16]} has no {APPLY_RELEASE}: nothing to hand over to")
        install_packages(bundle, args.wait, args.retry_delay)
        path = ROOT / APPLY_RELEASE.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(applier["content"])
        path.chmod(int(applier["mode"], 8))
    except (Transient, Refused, ValueError, KeyError) as error:
        log(f"boot refused: {error}")
        return 1
    log(f"release bundle {digest[:16]} verified; handing over to its apply_release.py")
    command = [sys.executable, str(path), "--pointer", args.pointer, "--region", args.region, "--boot",
               "--expect", digest]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
