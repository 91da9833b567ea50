#!/usr/bin/env python3
"""Room on the weights volume for the checkpoint about to be downloaded (standard library only: it
runs on nodes and in the Kubernetes download Job, before the download).

    weights_room.py --root WEIGHTS_ROOT --target WEIGHTS_ROOT/ORG--NAME/REVISION --need CHECKPOINT_BYTES [--keep DIR]...

A new checkpoint revision is downloaded beside the old one, which stays for a rollback, while the
running engine keeps serving it. When the volume cannot hold both (a 1000 GiB EBS volume and two
595 GB checkpoints), the download would fail at the disk's end, an hour in. So, before it starts:
the bytes still missing are compared with the volume's free space, and other checkpoints are
removed, the least recently verified first, until they fit.

Only what this program can prove it made is ever removed, and only when removing all of that is
enough (a host's weights root may be a shared disk: a team's data beside the checkpoints must not
be lost to a download that fails anyway). Proof is both:
  - the place: exactly WEIGHTS_ROOT/<org>--<name>/<40-hex revision>, where downloads go;
  - the owner marker (OWNER_MARKER), written here when room is made for a target, naming its repo,
    revision and absolute path: a marker copied into another directory, or a directory moved or
    copied from elsewhere, names another path and proves nothing.
Checkpoints of the previous release (before OWNER_MARKER) carry `.kimi-checkpoint` ("repo@revision")
or `.kimi-verified` ("revision"): they stay removable when the place is exact and the marker says
exactly that repo and revision (nothing else the project's layout puts there could say so); an
empty or other content, or the generic `.verified`, proves nothing. A directory that has an owner
marker is judged by it alone.

--keep DIR (repeatable) is never removed and its bytes never count as room: an in-place release
keeps the checkpoint the running release serves, which a failed release goes back to.

Exit 2 without removing anything, naming the numbers, when even removing every proven checkpoint
is not enough. A running engine keeps serving what it loaded (its open files stay readable until
closed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import node_status  # noqa: E402  (shipped beside this script)
from node_status import directory_bytes  # noqa: E402

#: Written by this program into a target when it made room for its download (JSON: made_by, repo,
#: revision, directory): the only proof, with the directory's place, that a directory may be removed.
OWNER_MARKER = ".kimi-fleet-download"
OWNER = "kimi-fleet"
#: Written by the download scripts into a checkpoint's directory when its download starts ("repo@revision").
CHECKPOINT_MARKER = ".kimi-checkpoint"
#: Written when every file is verified (holding the revision): by the node's download, and by the
#: Kubernetes Job or init container.
NODE_VERIFIED_MARKER = ".kimi-verified"
POD_VERIFIED_MARKER = ".verified"
#: Every marker a download leaves; their newest mtime is when the checkpoint was last used (the
#: verified markers are touched each time a start finds the checkpoint already there).
MARKERS = (OWNER_MARKER, CHECKPOINT_MARKER, NODE_VERIFIED_MARKER, POD_VERIFIED_MARKER)
#: <org>--<name>: a Hugging Face repo id with its slash replaced (ids never contain "--").
REPO_DIR = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)--([A-Za-z0-9][A-Za-z0-9._-]*)$")
REVISION_DIR = re.compile(r"^[0-9a-f]{40}$")
LAYOUT = "<root>/<org>--<name>/<40-hex revision>"
GB = 10**9
MB = 10**6


def _size(n: int) -> str:
    """Checkpoints are hundreds of GB; a small test volume still reads sensibly."""
    return f"{n / GB:.1f} GB" if abs(n) >= GB else f"{n / MB:.1f} MB"


def place(root: str, directory: str) -> tuple[str, str] | None:
    """(repo, revision) when the directory sits exactly where this program downloads one, else None."""
    relative = os.path.relpath(directory, root).split(os.sep)
    if len(relative) != 2 or not REVISION_DIR.match(relative[1]):
        return None
    repo = REPO_DIR.match(relative[0])
    if repo is None or "--" in repo.group(1) or "--" in repo.group(2):
        return None
    return f"{repo.group(1)}/{repo.group(2)}", relative[1]


def owner_record(directory: str, repo: str, revision: str) -> str:
    return json.dumps({"made_by": OWNER, "repo": repo, "revision": revision,
                       "directory": os.path.realpath(directory)}, sort_keys=True) + "\n"


def _marker_text(directory: str, marker: str) -> str | None:
    """A marker's content when it is a small regular file of the directory itself (not a link)."""
    path = os.path.join(directory, marker)
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 4096:
            return None
        with open(path) as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


def why_not_ours(root: str, directory: str) -> str | None:
    """None when this program provably made the directory; else why not, in a few words."""
    if os.path.islink(directory) or os.path.islink(os.path.dirname(directory)):
        return "a symbolic link"
    where = place(root, directory)
    if where is None:
        return f"not at {LAYOUT}, where this program downloads"
    repo, revision = where
    owner = _marker_text(directory, OWNER_MARKER)
    if owner is not None:
        try:
            record = json.loads(owner)
        except ValueError:
            record = None
        if not isinstance(record, dict) or record.get("made_by") != OWNER:
            return f"its {OWNER_MARKER} is not one this program wrote"
        if (record.get("repo"), record.get("revision")) != (repo, revision):
            return f"its {OWNER_MARKER} names {record.get('repo')}@{record.get('revision')}, not {repo}@{revision}"
        if record.get("directory") != os.path.realpath(directory):
            return f"its {OWNER_MARKER} was written for {record.get('directory')} (copied or moved here)"
        return None
    # The previous release's markers (no owner marker yet): their content must name this place.
    if _marker_text(directory, CHECKPOINT_MARKER) == f"{repo}@{revision}\n":
        return None
    if _marker_text(directory, NODE_VERIFIED_MARKER) == f"{revision}\n":
        return None
    legacy = [m for m in (CHECKPOINT_MARKER, NODE_VERIFIED_MARKER) if os.path.lexists(os.path.join(directory, m))]
    if not legacy:
        return f"it holds only a generic {POD_VERIFIED_MARKER}, which any tool may write"
    return f"its {' and '.join(legacy)} {'does' if len(legacy) == 1 else 'do'} not name {repo}@{revision}"


def survey(root: str) -> tuple[list[str], dict[str, str]]:
    """Directories up to two levels under root that hold a download marker: those this program
    provably made (least recently verified first), and the others with why they are kept."""
    root = os.path.realpath(root)
    ours, kept = [], {}
    levels = [root]
    for _depth in (1, 2):
        below = []
        for parent in levels:
            try:
                names = sorted(os.listdir(parent))
            except OSError:
                continue
            for name in names:
                directory = os.path.join(parent, name)
                if not os.path.isdir(directory) or name.startswith(".") and parent == root:
                    continue  # a file, or the program's own state (.kimi-fleet/)
                if not os.path.islink(directory):
                    below.append(directory)
                if any(os.path.lexists(os.path.join(directory, m)) for m in MARKERS):
                    why = why_not_ours(root, directory)
                    if why is None:
                        ours.append(directory)
                    else:
                        kept[directory] = why
        levels = below
    return sorted(ours, key=_last_used), kept


def checkpoints(root: str) -> list[str]:
    """Checkpoint directories this program provably made under root, least recently verified first."""
    return survey(root)[0]


def _last_used(directory: str) -> float:
    return max((os.lstat(os.path.join(directory, m)).st_mtime for m in MARKERS
                if os.path.isfile(os.path.join(directory, m))), default=0.0)


def freed_bytes(directories: list[str]) -> int:
    """What removing the directories gives back: allocated blocks of files whose every link is among
    them (a hard link elsewhere keeps the data), each file once."""
    links: dict[tuple[int, int], list] = {}
    for directory in directories:
        for folder, _, names in os.walk(directory):
            for name in names:
                try:
                    info = os.lstat(os.path.join(folder, name))
                except OSError:
                    continue  # removed while we walk
                seen = links.setdefault((info.st_dev, info.st_ino), [info, 0])
                seen[1] += 1
    return sum(info.st_blocks * 512 for info, count in links.values() if count >= info.st_nlink)


def _contains(outer: str, inner: str) -> bool:
    return os.path.commonpath([outer, inner]) == outer


def mark_target(root: str, target: str, log=print) -> None:
    """Claim the target for this program: only what carries this marker, in its place, is ever removed."""
    where = place(root, target)
    if where is None:
        log(f"weights: {target} is not at {LAYOUT}: no {OWNER_MARKER} written, so it is never removed "
            "to make room for another checkpoint")
        return
    partial = os.path.join(target, f"{OWNER_MARKER}.partial")
    try:
        os.makedirs(target, exist_ok=True)
        with open(partial, "w") as handle:
            handle.write(owner_record(target, *where))
        os.replace(partial, os.path.join(target, OWNER_MARKER))
    except OSError as error:  # the download that follows meets the same disk and says so
        log(f"weights: could not write {OWNER_MARKER} in {target} ({error}): it will not be removed to make "
            "room for another checkpoint")


#: Exit statuses: the volume is too small even without every checkpoint this program may remove (a
#: refusal: no retry can help, the bootstrap's unit does not restart on it), or removed files are
#: still held open (a retry after the holder stops may pass).
TOO_SMALL_STATUS = 2
HELD_OPEN_STATUS = 1


class Refused(Exception):
    """The volume cannot hold the checkpoint: the message says by how much and what to grow."""


def make_room(root: str, target: str, need: int, log=print, keep: tuple[str, ...] = ()) -> bool:
    """Remove other checkpoints until the target's missing bytes fit, and mark the target as this
    program's. `keep`: directories never removed (nor anything inside or around them). Refused
    (nothing removed) when removing every other one would not be enough; False when they were
    removed and the space did not come back (files still held open)."""
    root, target = os.path.realpath(root), os.path.realpath(target)
    keep = tuple(os.path.realpath(k) for k in keep)
    missing = max(need - directory_bytes(target), 0)
    free = shutil.disk_usage(root).free
    if free >= missing:
        mark_target(root, target, log)
        return True
    ours, kept = survey(root)
    ours = [d for d in ours if not _contains(d, target) and not _contains(target, d)]
    kept_serving = [d for d in ours if any(_contains(d, k) or _contains(k, d) for k in keep)]
    ours = [d for d in ours if d not in kept_serving]
    for directory, why in kept.items():
        if _contains(directory, target) or _contains(target, directory):
            continue  # the download's own directory, never removed anyway
        log(f"weights: not removing {os.path.relpath(directory, root)}: {why}; this program removes only "
            f"checkpoints it downloaded (remove it by hand if it is not needed)")
    removable = freed_bytes(ours)
    relative_target = os.path.relpath(target, root)
    if kept_serving and free + removable < missing:
        serving = ", ".join(os.path.relpath(d, root) for d in kept_serving)
        raise Refused(f"weights: removing nothing: {relative_target} needs {_size(missing)} more and {root} has "
                      f"{_size(free)} free plus {_size(removable)} in older checkpoints; {serving} is kept because the "
                      f"running release serves it (a failed release goes back to it): grow the weights volume "
                      f"(weights.ebsSizeGib) to hold both checkpoints, by at least {_size(missing - free - removable)}")
    if not ours:
        raise Refused(f"weights: {relative_target} needs {_size(missing)} more and {root} has {_size(free)} "
                      "free with no older checkpoint left to remove: grow the weights volume (weights.ebsSizeGib, "
                      f"the PVC or the host's disk) by at least {_size(missing - free)}")
    if free + removable < missing:
        raise Refused(f"weights: removing nothing: {relative_target} needs {_size(missing)} more, {root} has "
                      f"{_size(free)} free and the {len(ours)} older checkpoint(s) this program downloaded hold "
                      f"{_size(removable)}: {_size(missing - free - removable)} short even without them; grow "
                      "the weights volume (weights.ebsSizeGib, the PVC or the host's disk) by at least that")
    log(f"weights: {_size(missing)} still to download, {_size(free)} free on {root}: "
        "removing older checkpoints, the least recently verified first")
    for directory in ours:
        size = freed_bytes([directory])
        shutil.rmtree(directory)
        free = shutil.disk_usage(root).free
        log(f"weights: removed {os.path.relpath(directory, root)} ({_size(size)}); "
            f"a running engine keeps serving what it loaded; {_size(free)} free")
        if free >= missing:
            mark_target(root, target, log)
            return True
    # Counted as enough, yet the space did not come back: files a running process still holds open.
    log(f"weights: {relative_target} needs {_size(missing)} more and {root} has {_size(free)} free "
        "after removing every older checkpoint (a process may still hold removed files open): stop it, or "
        "grow the weights volume (weights.ebsSizeGib, the PVC or the host's disk)")
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the weights volume's checkpoint root")
    parser.add_argument("--target", required=True, help="the directory the checkpoint is downloaded into")
    parser.add_argument("--need", required=True, type=int, help="the checkpoint's bytes")
    parser.add_argument("--keep", action="append", default=[],
                        help="a checkpoint never removed and not counted as room (the serving release's)")
    args = parser.parse_args()
    root, target = os.path.realpath(args.root), os.path.realpath(args.target)
    if os.path.commonpath([root, target]) != root or target == root:
        parser.error(f"--target {args.target} is not a directory under --root {args.root}")
    try:
        keep = tuple(k for k in args.keep if k)
        return 0 if make_room(args.root, args.target, args.need, keep=keep) else HELD_OPEN_STATUS
    except Refused as refused:
        print(refused, flush=True)
        try:  # one line in the node's status too (a pod's status file may not be writable: the log says it)
            node_status.refuse("kimi-download-weights", str(refused))
        except OSError:
            pass
        return TOO_SMALL_STATUS


if __name__ == "__main__":
    sys.exit(main())
