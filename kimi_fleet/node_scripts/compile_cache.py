#!/usr/bin/env python3
"""Share the engines' compile and JIT caches through the managed weights mirror, so the next node
of the same engine configuration starts with the kernels the first one built (issue 10).
Standard library plus the pinned s5cmd binary: it runs on nodes and in tests.

    compile_cache.py restore --archive s3://bucket/prefix/.compile-cache/<cache>/<launch>.tar --dir D
    compile_cache.py publish --archive ... --dir D
    compile_cache.py publish --settings /etc/kimi-fleet/node.env   (the publish unit)

restore (the bootstrap, before the engines start): only into a cache directory holding no file
  (a volume that carried its cache over keeps it). The archive is streamed from s5cmd into a
  sibling directory, every member through tarfile's `data` filter (no `..`, no links out of the
  tree, no devices; absolute names stay inside), then moved into the cache directory entry by entry
  (the directory itself stays, as a running engine's bind mount needs): a failed or refused
  restore leaves nothing behind and the engine compiles as it would have anyway.
publish (once the node passed admission, so the engines compiled and warmed up): only when the
  archive does not exist yet; files written in the last --settle-seconds (the engine may still be
  writing them) and lock files are left out. s5cmd's `pipe` uploads the stream as one object that
  appears only when complete, so a reader never sees half an archive.

Exit 0: done, or nothing to do (said why); 1: failed or refused (said why; never fatal to a node).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from node_status import directory_bytes  # noqa: E402  (shipped beside this script)
from weights_manifest import s5cmd_base  # noqa: E402

#: The unit that runs `publish --settings` (the watchdog starts it once the node is admitted).
PUBLISH_UNIT = "kimi-compile-cache.service"
#: The fetch venv's s5cmd (bootstrap's ensure_fetch_tool), found when --s5cmd and $S5CMD are unset.
FETCH_VENV_S5CMD = "/opt/kimi-fleet/fetch/lib/python3*/site-packages/s5cmd/bin/s5cmd"
#: Files younger than this may still be being written by a running engine.
SETTLE_SECONDS = 60
LOCK_SUFFIXES = (".lock", ".lck", ".tmp")
#: s5cmd's own log: errors only (the outcome is said here).
QUIET = ("--log", "error")


def log(message: str) -> None:
    print(f"compile cache: {message}", flush=True)


def find_s5cmd(given: str | None) -> str:
    if given:
        return given
    found = sorted(glob.glob(FETCH_VENV_S5CMD))
    return found[-1] if found else (shutil.which("s5cmd") or "s5cmd")


def archive_exists(s5cmd: str, archive: str) -> bool:
    """True when the object exists; raises on any other failure than "not found"."""
    listed = subprocess.run([*s5cmd_base(s5cmd), *QUIET, "ls", archive], capture_output=True, text=True,
                            timeout=120)
    if listed.returncode == 0:
        return True
    if "no object found" in listed.stderr:
        return False
    raise RuntimeError(f"s5cmd ls {archive}: {listed.stderr.strip() or f'exit {listed.returncode}'}")


def has_files(directory: str) -> bool:
    for _, _, files in os.walk(directory):
        if files:
            return True
    return False


def restore(s5cmd: str, archive: str, directory: str) -> int:
    if has_files(directory):
        log(f"{directory} already holds a cache: kept")
        return 0
    if not archive_exists(s5cmd, archive):
        log(f"no shared cache at {archive} yet: the engines compile (the first admitted node publishes it)")
        return 0
    if not hasattr(tarfile, "data_filter"):
        log("this Python's tarfile has no data filter: refusing to unpack a shared archive")
        return 1
    parent = os.path.dirname(directory.rstrip("/")) or "."
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(directory.rstrip('/'))}.restoring-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    started = time.monotonic()
    stream = subprocess.Popen([*s5cmd_base(s5cmd), *QUIET, "cat", archive], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=stream.stdout, mode="r|") as archive_file:
            archive_file.extractall(staging, filter="data")
        stream.stdout.close()
        if stream.wait(timeout=120) != 0:
            raise RuntimeError(f"s5cmd cat exited {stream.returncode}: {stream.stderr.read().decode(errors='replace')}")
    except (tarfile.TarError, OSError, RuntimeError, subprocess.TimeoutExpired) as error:
        stream.kill()
        stream.wait()
        shutil.rmtree(staging, ignore_errors=True)
        log(f"not restored from {archive}: {error}")
        return 1
    # Into the directory itself, entry by entry, not by replacing it: an engine that is already
    # running has it bind-mounted and would keep writing into a replaced (deleted) directory.
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(staging):
        target = os.path.join(directory, name)
        if os.path.lexists(target):
            if os.path.islink(target) or not os.path.isdir(target) or has_files(target):
                continue  # written meanwhile by a running engine: its own copy wins
            shutil.rmtree(target)  # an empty directory tree
        os.rename(os.path.join(staging, name), target)
    shutil.rmtree(staging, ignore_errors=True)
    log(f"restored {directory_bytes(directory)} bytes from {archive} in {time.monotonic() - started:.1f} s")
    return 0


def members(directory: str, settle_seconds: float) -> tuple[list[str], int]:
    """Relative paths to archive (directories, regular files, links inside the tree), and how many
    files were left out as too fresh or as locks."""
    now, chosen, skipped = time.time(), [], 0
    root = os.path.realpath(directory)

    def inside(path: str) -> bool:
        """A relative link into the tree (the restore's data filter refuses any other)."""
        target = os.path.realpath(path)
        return not os.path.isabs(os.readlink(path)) and (target == root or target.startswith(root + os.sep))

    for folder, dirs, files in os.walk(directory):  # links to directories are listed, not followed
        dirs.sort()
        for name in dirs:
            path = os.path.join(folder, name)
            if os.path.islink(path) and not inside(path):
                skipped += 1
                continue
            chosen.append(os.path.relpath(path, directory))
        for name in sorted(files):
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, directory)
            if os.path.islink(path):
                if inside(path):
                    chosen.append(relative)
                else:
                    skipped += 1
                continue
            stat = os.lstat(path)
            if (not os.path.isfile(path) or name.endswith(LOCK_SUFFIXES)
                    or now - stat.st_mtime < settle_seconds):
                skipped += 1
                continue
            chosen.append(relative)
    return chosen, skipped


def publish(s5cmd: str, archive: str, directory: str, settle_seconds: float) -> int:
    if not os.path.isdir(directory) or not has_files(directory):
        log(f"{directory} holds no cache: nothing to publish")
        return 0
    if archive_exists(s5cmd, archive):
        log(f"{archive} already shared: not published again")
        return 0
    chosen, skipped = members(directory, settle_seconds)
    started = time.monotonic()
    upload = subprocess.Popen([*s5cmd_base(s5cmd), *QUIET, "pipe", archive], stdin=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=upload.stdin, mode="w|", format=tarfile.PAX_FORMAT) as archive_file:
            for relative in chosen:
                archive_file.add(os.path.join(directory, relative), arcname=relative, recursive=False)
        upload.stdin.close()
        status = upload.wait(timeout=3600)
    except (OSError, tarfile.TarError, subprocess.TimeoutExpired) as error:
        upload.kill()
        upload.wait()
        log(f"not published: {error}")
        return 1
    if status != 0:
        log(f"not published: s5cmd pipe exited {status}: {upload.stderr.read().decode(errors='replace').strip()}")
        return 1
    log(f"published {len(chosen)} entries to {archive} in {time.monotonic() - started:.1f} s"
        + (f"; left out {skipped} lock, fresh or outward-linking file(s)" if skipped else ""))
    return 0


def read_settings(path: str) -> dict[str, str]:
    """KEY=VALUE lines of node.env, read as data (never sourced)."""
    settings = {}
    with open(path) as settings_file:
        for line in settings_file:
            key, sep, value = line.rstrip("\n").partition("=")
            if sep and not key.startswith("#"):
                settings[key] = value
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("restore", "publish"))
    parser.add_argument("--archive", help="s3://.../<launch>.tar")
    parser.add_argument("--dir", help="the node's compile-cache directory")
    parser.add_argument("--settings", help="node.env: COMPILE_CACHE_ARCHIVE and COMPILE_CACHE_DIR from it")
    parser.add_argument("--s5cmd", default=os.environ.get("S5CMD"))
    parser.add_argument("--settle-seconds", type=float, default=SETTLE_SECONDS)
    args = parser.parse_args(argv)
    if args.settings:
        settings = read_settings(args.settings)
        root = os.environ.get("KIMI_ROOT", "")
        args.archive = args.archive or settings.get("COMPILE_CACHE_ARCHIVE")
        args.dir = args.dir or (root + settings["COMPILE_CACHE_DIR"] if settings.get("COMPILE_CACHE_DIR") else None)
        if settings.get("AWS_REGION"):  # the unit's environment is empty: s5cmd needs the bucket's region
            os.environ.setdefault("AWS_REGION", settings["AWS_REGION"])
    if not args.archive:
        log("no shared cache for this stack (weights.mirror is not managed)")
        return 0
    if not args.archive.startswith("s3://") or not args.archive.endswith(".tar") or not args.dir:
        parser.error(f"--archive must be an s3://...tar URI and --dir given (got {args.archive!r}, {args.dir!r})")
    s5cmd = find_s5cmd(args.s5cmd)
    try:
        if args.action == "restore":
            return restore(s5cmd, args.archive, args.dir)
        return publish(s5cmd, args.archive, args.dir, args.settle_seconds)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        log(f"{args.action} failed: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
