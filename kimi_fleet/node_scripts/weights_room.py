#!/usr/bin/env python3
"""Room on the weights volume for the checkpoint about to be downloaded (standard library only: it
runs on nodes and in the Kubernetes download Job, before the download).

    weights_room.py --root WEIGHTS_ROOT --target WEIGHTS_ROOT/REPO/REVISION --need CHECKPOINT_BYTES

A new checkpoint revision is downloaded beside the old one, which stays for a rollback, while the
running engine keeps serving it. When the volume cannot hold both (a 1000 GiB EBS volume and two
595 GB checkpoints), the download would fail at the disk's end, an hour in. So, before it starts:
the bytes still missing are compared with the volume's free space, and other checkpoints are
removed, the least recently verified first, until they fit. Only directories this program
downloaded (they hold one of MARKERS) are ever removed; nothing else on the volume is touched. A
running engine keeps serving what it loaded (its open files stay readable until closed). Exit 1,
naming the numbers, when even that is not enough.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from node_status import directory_bytes  # noqa: E402  (shipped beside this script)

#: Written into a checkpoint's directory when its download starts ("repo@revision").
CHECKPOINT_MARKER = ".kimi-checkpoint"
#: Written when every file is verified (holding the revision): by the node's download, and by the
#: Kubernetes Job or init container.
NODE_VERIFIED_MARKER = ".kimi-verified"
POD_VERIFIED_MARKER = ".verified"
#: What marks a directory as a checkpoint this program downloaded: the start marker, and the
#: verified markers, which directories from before the start marker existed carry.
MARKERS = (CHECKPOINT_MARKER, NODE_VERIFIED_MARKER, POD_VERIFIED_MARKER)
GB = 10**9


def _last_used(directory: str) -> float:
    return max((os.stat(os.path.join(directory, m)).st_mtime for m in MARKERS
                if os.path.isfile(os.path.join(directory, m))), default=0.0)


def checkpoints(root: str) -> list[str]:
    """Checkpoint directories under root (<repo>/<revision>), least recently verified first."""
    found = []
    for repo in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        repo_dir = os.path.join(root, repo)
        if repo.startswith(".") or os.path.islink(repo_dir) or not os.path.isdir(repo_dir):
            continue
        for revision in sorted(os.listdir(repo_dir)):
            directory = os.path.join(repo_dir, revision)
            if (not os.path.islink(directory) and os.path.isdir(directory)
                    and any(os.path.isfile(os.path.join(directory, m)) for m in MARKERS)):
                found.append(directory)
    return sorted(found, key=_last_used)


def make_room(root: str, target: str, need: int, log=print) -> bool:
    """Remove other checkpoints until the target's missing bytes fit; False when they cannot."""
    missing = max(need - directory_bytes(target), 0)
    free = shutil.disk_usage(root).free
    if free >= missing:
        return True
    log(f"weights: {missing / GB:.1f} GB still to download, {free / GB:.1f} GB free on {root}: "
        "removing older checkpoints, the least recently verified first")
    target_real = os.path.realpath(target)
    for directory in checkpoints(root):
        if os.path.realpath(directory) == target_real:
            continue
        size = directory_bytes(directory)
        shutil.rmtree(directory)
        free = shutil.disk_usage(root).free
        log(f"weights: removed {os.path.relpath(directory, root)} ({size / GB:.1f} GB); "
            f"a running engine keeps serving what it loaded; {free / GB:.1f} GB free")
        if free >= missing:
            return True
    log(f"weights: {os.path.relpath(target, root)} needs {missing / GB:.1f} GB more and {root} has "
        f"{free / GB:.1f} GB free with no older checkpoint left to remove: grow the weights volume "
        "(weights.ebsSizeGib, the PVC or the host's disk)")
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the weights volume's checkpoint root")
    parser.add_argument("--target", required=True, help="the directory the checkpoint is downloaded into")
    parser.add_argument("--need", required=True, type=int, help="the checkpoint's bytes")
    args = parser.parse_args()
    root, target = os.path.realpath(args.root), os.path.realpath(args.target)
    if os.path.commonpath([root, target]) != root or target == root:
        parser.error(f"--target {args.target} is not a directory under --root {args.root}")
    return 0 if make_room(args.root, args.target, args.need) else 1


if __name__ == "__main__":
    sys.exit(main())
