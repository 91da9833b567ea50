#!/usr/bin/env python3
"""Fill an S3 weights mirror with one pinned checkpoint, once: <mirror>/<repo>/<revision>/ gets every
file, verified against the Hub's tree, then the manifest (every path, size and SHA-256) last, which
is what a node's download waits for and verifies against. A mirror that already holds the manifest
is left alone, so several stacks (and re-runs) share one fill.

    fill_mirror.py --repo moonshotai/Kimi-K2.6 --revision <40 hex> --mirror s3://bucket/prefix \\
        --region us-east-1 [--from-dir DIR] [--work-dir DIR] [--s5cmd PATH]

Needs s5cmd (the nodes' pinned transfer tool; $S5CMD or on PATH) and the `hf` CLI unless --from-dir
holds the files already. Standard library otherwise: it runs on the managed mirror's fill instance,
a laptop or in tests (against moto's S3 on loopback).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import weights_manifest  # noqa: E402  (shipped beside this script)


def s5cmd(binary: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*weights_manifest.s5cmd_base(binary), *args], check=check, capture_output=True, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True)
    parser.add_argument("--revision", required=True)
    parser.add_argument("--mirror", required=True, help="s3://bucket/prefix")
    parser.add_argument("--region", required=True)
    parser.add_argument("--from-dir", help="the checkpoint's files already on disk (else: hf download)")
    parser.add_argument("--work-dir", help="where hf downloads to (default: a temporary directory)")
    parser.add_argument("--s5cmd", default=os.environ.get("S5CMD") or shutil.which("s5cmd") or "s5cmd")
    args = parser.parse_args()
    os.environ.setdefault("AWS_REGION", args.region)
    if not args.mirror.startswith("s3://"):
        parser.error(f"--mirror must be an s3:// URI, got {args.mirror!r}")
    prefix = f"{args.mirror.rstrip('/')}/{args.repo}/{args.revision}"
    manifest_uri = f"{prefix}/{weights_manifest.MANIFEST_NAME}"

    if s5cmd(args.s5cmd, "ls", manifest_uri, check=False).returncode == 0:
        print(f"fill: {manifest_uri} exists: the mirror already holds {args.repo}@{args.revision}")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        local = args.from_dir or args.work_dir or os.path.join(scratch, "weights")
        if not args.from_dir:
            subprocess.run(["hf", "download", args.repo, "--revision", args.revision, "--local-dir", local],
                           check=True, env={**os.environ, "HF_XET_HIGH_PERFORMANCE": "1"})
        manifest = os.path.join(scratch, weights_manifest.MANIFEST_NAME)
        made = subprocess.run([sys.executable, weights_manifest.__file__, "manifest", "--dir", local,
                               "--hub", args.repo, args.revision, "--out", manifest])
        if made.returncode != 0:
            print("fill: the files do not match the Hub's tree: nothing uploaded", file=sys.stderr)
            return 1
        s5cmd(args.s5cmd, "cp", "--exclude", ".cache/*", "--exclude", ".kimi-*", "--exclude",
              weights_manifest.MANIFEST_NAME, local + "/", prefix + "/")
        # Last: a node that finds the manifest finds every file it lists.
        s5cmd(args.s5cmd, "cp", manifest, manifest_uri)
        s5cmd(args.s5cmd, "rm", f"{prefix}/{weights_manifest.FILL_FAILED_NAME}", check=False)  # an earlier fill's failure
    print(f"fill: {args.repo}@{args.revision} is in {prefix}/ with its manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
