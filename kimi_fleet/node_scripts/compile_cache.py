#!/usr/bin/env python3
"""Share the engines' compile and JIT caches through the managed weights mirror, so the next node
of the same engine configuration starts with the kernels the first one built (issue 10), and no
node can put code on another (issue 21): every byte a node restores was pinned by the deployer.
Standard library plus the pinned s5cmd binary and the AWS CLI: it runs on nodes and in tests.

    compile_cache.py restore --archive s3://bucket/prefix/.compile-cache/<cache>/<launch>.tar --dir D
    compile_cache.py publish --archive ... --dir D
    compile_cache.py publish --settings /etc/kimi-fleet/node.env   (the publish unit)

The archive URI names the cache of one launch (bucket, CACHE = <prefix>/.compile-cache/<cache>,
launch digest); no node reads or writes that key itself:
  CACHE/candidates/<stack>/<instance id>/<launch>.tar   what a node publishes (the only key it may write)
  CACHE/sha256/<hex>.tar                                a cache the deployer promoted (nodes cannot write it)
  <stack ssm prefix>/compile-cache/<launch> = <hex>     the deployer's pin (COMPILE_CACHE_PIN_PARAMETER)
The verification gate promotes a candidate (scripts/promote_compile_cache.py) after the suite passed,
checking it with archive_problem() below, the same rules the restore applies.

restore (the bootstrap, before the engines start): only into a cache directory holding no file
  (a volume that carried its cache over keeps it), and only a pinned archive: no pin means the
  engines compile. The archive is streamed from s5cmd, hashed on the way, into a sibling directory;
  every member must pass archive_problem() (no `..`, no absolute name, no link out of the tree, no
  device, no setuid bit) and is extracted through tarfile's `data` filter. A digest other than the
  pin, or any refused member, removes the staging directory; otherwise its entries move into the
  cache directory one by one (the directory stays: a running engine has it bind-mounted).
publish (once the node passed admission, so the engines compiled and warmed up): as this node's
  candidate, unless a pin exists already or this node published before. The tree is walked on
  directory file descriptors, each entry opened with O_NOFOLLOW and checked with fstat: a link the
  container places (or swaps in for a directory) is never followed, so no host file can enter the
  archive. Files written in the last --settle-seconds and lock files are left out. s5cmd's `pipe`
  uploads the stream as one object that appears only when complete.

Exit 0: done, or nothing to do (said why); 1: failed or refused (said why; never fatal to a node).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import posixpath
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from node_status import directory_bytes  # noqa: E402  (shipped beside this script)
from weights_manifest import s5cmd_base  # noqa: E402

#: The unit that runs `publish --settings` (the watchdog starts it once the node is admitted).
PUBLISH_UNIT = "kimi-compile-cache.service"
#: Under CACHE: what nodes publish (one folder per stack, then per instance) and what the deployer promoted.
CANDIDATES_DIR = "candidates"
PINNED_DIR = "sha256"
#: The fetch venv's s5cmd (bootstrap's ensure_fetch_tool), found when --s5cmd and $S5CMD are unset.
FETCH_VENV_S5CMD = "/opt/kimi-fleet/fetch/lib/python3*/site-packages/s5cmd/bin/s5cmd"
#: node.env, read when --settings is not given (under $KIMI_ROOT, as the bootstrap's scratch root).
NODE_ENV_FILE = "/etc/kimi-fleet/node.env"
#: Files younger than this may still be being written by a running engine.
SETTLE_SECONDS = 60
LOCK_SUFFIXES = (".lock", ".lck", ".tmp")
#: s5cmd's own log: errors only (the outcome is said here).
QUIET = ("--log", "error")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
#: Who the node's role credentials are, as IAM's ${aws:userid} names them: "<role id>:<instance id>"
#: (an EC2 role session is named after its instance). A node may write candidates under its own
#: name only (the role policy's resource), so no node can overwrite another's.
CALLER = re.compile(r"[A-Z0-9]{16,128}:i-[0-9a-f]{8,17}")


def log(message: str) -> None:
    print(f"compile cache: {message}", flush=True)


def find_s5cmd(given: str | None) -> str:
    if given:
        return given
    found = sorted(glob.glob(FETCH_VENV_S5CMD))
    return found[-1] if found else (shutil.which("s5cmd") or "s5cmd")


# --- names ------------------------------------------------------------------------------------------

def cache_uri(archive: str) -> str:
    """s3://bucket/CACHE of a launch's archive URI."""
    return archive.rsplit("/", 1)[0]


def launch_digest(archive: str) -> str:
    return archive.rsplit("/", 1)[1].removesuffix(".tar")


def candidate_uri(archive: str, stack: str, uploader: str) -> str:
    """`uploader`: the node's ${aws:userid} (`caller`), the one candidate prefix its role may write."""
    return f"{cache_uri(archive)}/{CANDIDATES_DIR}/{stack}/{uploader}/{launch_digest(archive)}.tar"


def pinned_uri(archive: str, sha256: str) -> str:
    return f"{cache_uri(archive)}/{PINNED_DIR}/{sha256}.tar"


# --- the hostile-archive rules (restore and promotion) ------------------------------------------------

def archive_problem(member: tarfile.TarInfo) -> str | None:
    """Why a member must not be unpacked into a cache directory, or None."""
    name = member.name
    parts = name.split("/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return f"{name!r}: absolute name"
    if ".." in parts:
        return f"{name!r}: '..' in its name"
    if member.issym() or member.islnk():
        target = member.linkname
        if target.startswith("/"):
            return f"{name!r}: link to the absolute path {target!r}"
        base = posixpath.dirname(name) if member.issym() else ""
        if posixpath.normpath(posixpath.join(base, target)).split("/")[0] == "..":
            return f"{name!r}: link {target!r} points outside the cache"
    elif not (member.isfile() or member.isdir()):
        return f"{name!r}: not a file, directory or link (a device, fifo or the like)"
    if member.mode & (stat.S_ISUID | stat.S_ISGID):
        return f"{name!r}: setuid or setgid bit"
    return None


class Refused(Exception):
    pass


def check_archive(fileobj) -> int:
    """Read a whole (streamed) tar, raising Refused at the first member archive_problem() refuses;
    the number of members."""
    count = 0
    with tarfile.open(fileobj=fileobj, mode="r|") as archive_file:
        for member in archive_file:
            problem = archive_problem(member)
            if problem:
                raise Refused(problem)
            count += 1
    return count


# --- AWS ---------------------------------------------------------------------------------------------

def object_exists(s5cmd: str, uri: str) -> bool:
    """True when the object exists; raises on any other failure than "not found"."""
    listed = subprocess.run([*s5cmd_base(s5cmd), *QUIET, "ls", uri], capture_output=True, text=True, timeout=120)
    if listed.returncode == 0:
        return True
    if "no object found" in listed.stderr:
        return False
    raise RuntimeError(f"s5cmd ls {uri}: {listed.stderr.strip() or f'exit {listed.returncode}'}")


def read_pin(parameter: str, region: str | None) -> str | None:
    """The SHA-256 the deployer pinned for this launch, or None (no promoted cache yet)."""
    command = ["aws", "ssm", "get-parameter", "--name", parameter, "--query", "Parameter.Value", "--output", "text"]
    if region:
        command += ["--region", region]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        if "ParameterNotFound" in result.stderr:
            return None
        raise RuntimeError(f"aws ssm get-parameter {parameter}: {result.stderr.strip() or f'exit {result.returncode}'}")
    value = result.stdout.strip()
    if not SHA256_HEX.fullmatch(value):
        # Never its text: a parameter under the stack's prefix may be a secret (the API key's is).
        raise Refused(f"pin {parameter} holds {len(value)} characters that are not a SHA-256 (64 lowercase hex): "
                      "nothing restored")
    return value


def caller(region: str | None) -> str:
    """This node's ${aws:userid} (STS answers any caller about itself: no permission needed)."""
    command = ["aws", "sts", "get-caller-identity", "--query", "UserId", "--output", "text"]
    if region:
        command += ["--region", region]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = result.stdout.strip()
    if result.returncode != 0 or not CALLER.fullmatch(found):
        raise RuntimeError(f"aws sts get-caller-identity gave {found[:60]!r} "
                           f"({result.stderr.strip()[-200:] or f'exit {result.returncode}'}), not a role session "
                           "of an instance")
    return found


# --- restore -------------------------------------------------------------------------------------------

def has_files(directory: str) -> bool:
    for _, _, files in os.walk(directory):
        if files:
            return True
    return False


def restore(s5cmd: str, archive: str, directory: str, pin_parameter: str | None, region: str | None) -> int:
    if has_files(directory):
        log(f"{directory} already holds a cache: kept")
        return 0
    if not pin_parameter:
        log("no pin parameter in the node settings (COMPILE_CACHE_PIN_PARAMETER): nothing restored, the engines compile")
        return 0
    try:
        pinned = read_pin(pin_parameter, region)
    except Refused as refusal:
        log(f"refused: {refusal}; the engines compile")
        return 1
    if pinned is None:
        log(f"no cache pinned for launch {launch_digest(archive)} yet ({pin_parameter}): the engines compile "
            "(the verification gate promotes one after a node of this launch passed it)")
        return 0
    source = pinned_uri(archive, pinned)
    if not hasattr(tarfile, "data_filter"):
        log("this Python's tarfile has no data filter: refusing to unpack a shared archive")
        return 1
    parent = os.path.dirname(directory.rstrip("/")) or "."
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(directory.rstrip('/'))}.restoring-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    started = time.monotonic()
    # The bytes are hashed before any of them reaches tarfile (as root): only the deployer's pinned
    # archive is ever unpacked, whoever else could write its key.
    download = f"{staging}.tar"
    stream = subprocess.Popen([*s5cmd_base(s5cmd), *QUIET, "cat", source], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        digest = hashlib.sha256()
        with open(download, "wb") as out:
            for chunk in iter(lambda: stream.stdout.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        stream.stdout.close()
        if stream.wait(timeout=120) != 0:
            raise RuntimeError(f"s5cmd cat exited {stream.returncode}: {stream.stderr.read().decode(errors='replace')}")
        if digest.hexdigest() != pinned:
            raise Refused(f"SHA-256 expected {pinned} (the deployer's pin {pin_parameter}), got {digest.hexdigest()}")
        with tarfile.open(download, mode="r:") as archive_file:
            for member in archive_file:
                problem = archive_problem(member)
                if problem:
                    raise Refused(problem)
                archive_file.extract(member, staging, filter="data")
    except (Refused, tarfile.TarError, OSError, RuntimeError, subprocess.TimeoutExpired) as error:
        stream.kill()
        stream.wait()
        shutil.rmtree(staging, ignore_errors=True)
        verdict = "refused" if isinstance(error, Refused) else "not restored"
        log(f"{verdict} {source}: {error}; staging removed, the engines compile")
        return 1
    finally:
        if os.path.exists(download):
            os.remove(download)
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
    log(f"restored {directory_bytes(directory)} bytes from {source} (SHA-256 as pinned) in "
        f"{time.monotonic() - started:.1f} s")
    return 0


# --- publish ---------------------------------------------------------------------------------------------

def link_inside(relative: str, target: str) -> bool:
    """A relative link that stays in the tree (archive_problem refuses any other)."""
    if target.startswith("/"):
        return False
    return posixpath.normpath(posixpath.join(posixpath.dirname(relative), target)).split("/")[0] != ".."


def _info(relative: str, status: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(relative)
    info.type = kind
    info.mode = stat.S_IMODE(status.st_mode) & 0o777  # never a setuid bit
    info.mtime = int(status.st_mtime)
    return info


def write_archive(fileobj, directory: str, settle_seconds: float) -> tuple[int, int]:
    """The tree under `directory` as a tar stream, without following any link: (entries, left out)."""
    now, counts = time.time(), {"added": 0, "skipped": 0}
    nofollow = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC

    def walk(archive_file: tarfile.TarFile, dir_fd: int, relative_dir: str) -> None:
        with os.scandir(dir_fd) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            relative = posixpath.join(relative_dir, name) if relative_dir else name
            try:
                status = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(status.st_mode):
                target = os.readlink(name, dir_fd=dir_fd)
                if link_inside(relative, target):
                    info = _info(relative, status, tarfile.SYMTYPE)
                    info.linkname = target
                    archive_file.addfile(info)
                    counts["added"] += 1
                else:
                    counts["skipped"] += 1
                continue
            if stat.S_ISDIR(status.st_mode):
                try:  # O_NOFOLLOW: a directory swapped for a link since the stat is refused here
                    child = os.open(name, nofollow | os.O_DIRECTORY, dir_fd=dir_fd)
                except OSError:
                    counts["skipped"] += 1
                    continue
                try:
                    archive_file.addfile(_info(relative, os.fstat(child), tarfile.DIRTYPE))
                    counts["added"] += 1
                    walk(archive_file, child, relative)
                finally:
                    os.close(child)
                continue
            if (not stat.S_ISREG(status.st_mode) or name.endswith(LOCK_SUFFIXES)
                    or now - status.st_mtime < settle_seconds):
                counts["skipped"] += 1
                continue
            try:
                opened = os.open(name, nofollow | os.O_NONBLOCK, dir_fd=dir_fd)
            except OSError:
                counts["skipped"] += 1  # swapped for a link (ELOOP), a fifo, or gone
                continue
            with os.fdopen(opened, "rb") as content:
                held = os.fstat(opened)
                if not stat.S_ISREG(held.st_mode):
                    counts["skipped"] += 1
                    continue
                info = _info(relative, held, tarfile.REGTYPE)
                info.size = held.st_size
                archive_file.addfile(info, content)  # the bytes of the file opened, whatever the path now is
                counts["added"] += 1

    root_fd = os.open(directory, nofollow | os.O_DIRECTORY)
    try:
        with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as archive_file:
            walk(archive_file, root_fd, "")
    finally:
        os.close(root_fd)
    return counts["added"], counts["skipped"]


def publish(s5cmd: str, archive: str, directory: str, settle_seconds: float, *, stack: str | None,
            pin_parameter: str | None, region: str | None) -> int:
    if not os.path.isdir(directory) or not has_files(directory):
        log(f"{directory} holds no cache: nothing to publish")
        return 0
    if not stack:
        log("no STACK in the node settings: nothing published")
        return 1
    if pin_parameter:
        try:
            pinned = read_pin(pin_parameter, region)
        except Refused as refusal:
            log(f"{refusal}; published anyway as a candidate")
            pinned = None
        if pinned:
            log(f"launch {launch_digest(archive)} already has a pinned cache ({pinned[:12]}...): not published")
            return 0
    try:
        candidate = candidate_uri(archive, stack, caller(region))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
        log(f"not published: {error}")
        return 1
    if object_exists(s5cmd, candidate):
        log(f"{candidate} already published: not published again")
        return 0
    started = time.monotonic()
    upload = subprocess.Popen([*s5cmd_base(s5cmd), *QUIET, "pipe", candidate], stdin=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        added, skipped = write_archive(upload.stdin, directory, settle_seconds)
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
    log(f"published {added} entries to {candidate} in {time.monotonic() - started:.1f} s (a candidate: the "
        "verification gate promotes it)" + (f"; left out {skipped} lock, fresh, special or outward-linking "
                                             "entr(y/ies)" if skipped else ""))
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
    parser.add_argument("--archive", help="s3://.../<launch>.tar (names the launch's cache)")
    parser.add_argument("--dir", help="the node's compile-cache directory")
    parser.add_argument("--settings", help="node.env (default: $KIMI_ROOT/etc/kimi-fleet/node.env): "
                                           "COMPILE_CACHE_ARCHIVE, COMPILE_CACHE_DIR, COMPILE_CACHE_PIN_PARAMETER, "
                                           "STACK, AWS_REGION")
    parser.add_argument("--s5cmd", default=os.environ.get("S5CMD"))
    parser.add_argument("--settle-seconds", type=float, default=SETTLE_SECONDS)
    args = parser.parse_args(argv)
    root = os.environ.get("KIMI_ROOT", "").rstrip("/")
    settings_path = args.settings or root + NODE_ENV_FILE
    settings = read_settings(settings_path) if os.path.exists(settings_path) else {}
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
    pin_parameter, region = settings.get("COMPILE_CACHE_PIN_PARAMETER"), os.environ.get("AWS_REGION")
    try:
        if args.action == "restore":
            return restore(s5cmd, args.archive, args.dir, pin_parameter, region)
        return publish(s5cmd, args.archive, args.dir, args.settle_seconds, stack=settings.get("STACK"),
                       pin_parameter=pin_parameter, region=region)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        log(f"{args.action} failed: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
