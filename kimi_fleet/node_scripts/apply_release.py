#!/usr/bin/env python3
"""Apply a release to this node in place: fetch the content-addressed bundle of node files, check
its SHA-256, write the files that changed, and re-run the idempotent bootstrap (which restarts
only the units whose inputs changed). Run by cloud-init at boot and by the stack's SSM
association on every `pulumi up` that changes the release.

usage: apply_release.py --pointer PARAMETER --region REGION [--expect SHA256] [--boot]
  PARAMETER  SSM parameter holding "s3://bucket/releases/<sha256>.json <sha256>"
  --expect   refuse unless the pointer names this bundle (the association passes the one it deploys);
             with --boot, wait for the pointer to name it (a fleet node's launch template names
             its release, and may boot before Pulumi moves the pointer)
  --boot     first boot: write the files, then start the bootstrap unit without waiting for it
The AWS CLI (`aws`, on PATH) does the fetching; $KIMI_ROOT prefixes every path (tests).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ.get("KIMI_ROOT", "/"))
LIVE = ROOT == Path("/")
STATE = ROOT / "var/lib/kimi-fleet"
LOG = ROOT / "var/log/kimi-fleet/bootstrap.log"
BOOTSTRAP = "usr/local/sbin/kimi-bootstrap"
#: A new node may boot before Pulumi has written the pointer: keep asking for this long.
POINTER_WAIT_SECONDS = 1800


def log(message: str) -> None:
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} [kimi-apply-release] {message}"
    print(line, file=sys.stderr, flush=True)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as out:
        out.write(line + "\n")


def aws(*args: str) -> bytes:
    result = subprocess.run(["aws", *args], capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"aws {' '.join(args[:2])}: {result.stderr.decode(errors='replace').strip()[-300:]}")
    return result.stdout


def read_pointer(name: str, region: str, wait_seconds: float, wanted: str | None = None) -> tuple[str, str]:
    """The bundle the pointer names; with `wanted`, keep asking until it names that one."""
    deadline = time.monotonic() + wait_seconds
    delay = 5.0
    while True:
        try:
            value = aws("ssm", "get-parameter", "--region", region, "--name", name,
                        "--query", "Parameter.Value", "--output", "text").decode().strip()
            uri, digest = value.split()
            if not uri.startswith("s3://") or len(digest) != 64:
                raise ValueError(f"pointer {name} holds {value!r}, not 's3://... <sha256>'")
            if wanted and digest != wanted:
                raise RuntimeError(f"pointer {name} still names bundle {digest[:16]}, waiting for {wanted[:16]}")
            return uri, digest
        except RuntimeError as error:
            if time.monotonic() >= deadline:
                raise
            log(f"release pointer not readable yet ({error}); retrying in {delay:.0f}s")
            time.sleep(delay)
            delay = min(60.0, delay * 2)


def fetch(uri: str, digest: str, region: str) -> dict:
    bundle = aws("s3", "cp", uri, "-", "--region", region)
    actual = hashlib.sha256(bundle).hexdigest()
    if actual != digest:
        raise RuntimeError(f"bundle {uri} has SHA-256 {actual}, the pointer says {digest}: refusing it")
    return json.loads(bundle)


def write_files(bundle: dict) -> list[str]:
    """Write every file whose content or mode differs, atomically; return the paths written."""
    written = []
    for entry in bundle["files"]:
        path = ROOT / entry["path"].lstrip("/")
        mode = int(entry["mode"], 8)
        content = entry["content"].encode()
        if path.is_file() and path.read_bytes() == content and (path.stat().st_mode & 0o7777) == mode:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.kimi-tmp")
        tmp.write_bytes(content)
        tmp.chmod(mode)
        tmp.replace(path)
        written.append(entry["path"])
    return written


def systemctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)


def rerun_bootstrap(boot: bool) -> None:
    if not LIVE:  # a scratch root: run the bootstrap itself, as its unit would
        result = subprocess.run(["bash", str(ROOT / BOOTSTRAP)], check=False)
        if result.returncode != 0:
            raise RuntimeError(f"bootstrap failed (exit {result.returncode})")
        return
    systemctl("daemon-reload")
    if boot:
        systemctl("enable", "kimi-bootstrap.service")
        systemctl("start", "--no-block", "kimi-bootstrap.service")
        return
    # A bootstrap still running (a first boot's download) finishes first; then it runs again on
    # the new files. Restarting it mid-download would throw the download away.
    while systemctl("is-active", "kimi-bootstrap.service").stdout.strip() == "activating":
        time.sleep(10)
    result = systemctl("restart", "kimi-bootstrap.service")
    if result.returncode != 0:
        raise RuntimeError(f"kimi-bootstrap.service failed: {result.stderr.strip()[-300:]}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="apply_release.py")
    parser.add_argument("--pointer", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--expect")
    parser.add_argument("--boot", action="store_true")
    parser.add_argument("--pointer-wait", type=float, default=POINTER_WAIT_SECONDS)
    args = parser.parse_args(argv)
    STATE.mkdir(parents=True, exist_ok=True)
    with (STATE / "apply-release.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # cloud-init and the association may both apply at boot
        try:
            uri, digest = read_pointer(args.pointer, args.region, args.pointer_wait,
                                       wanted=args.expect if args.boot else None)
            if args.expect and digest != args.expect:
                raise RuntimeError(f"pointer {args.pointer} names bundle {digest}, expected {args.expect}")
            written = write_files(fetch(uri, digest, args.region))
            log(f"release bundle {digest[:16]}: {len(written)} file(s) changed")
            rerun_bootstrap(args.boot)
            (STATE / "applied-release").write_text(digest + "\n")
        except (RuntimeError, ValueError, KeyError) as error:
            log(f"apply failed: {error}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
