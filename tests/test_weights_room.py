"""Room for a new checkpoint revision on a volume that holds the old one: the node's tool against a
real filesystem of a fixed size (a tmpfs in a private mount namespace), and the download script
that calls it before any transfer."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from kimi_fleet.node_scripts import weights_room

NODE_SCRIPTS = Path(weights_room.__file__).parent
MB = 10**6


def _private_tmpfs_works() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare not installed"
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"no private mount namespace here: {probe.stderr.strip()}"


UNAVAILABLE = _private_tmpfs_works()
needs_tmpfs = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))

# Runs inside `unshare --mount`: a volume of SIZE bytes at ROOT, checkpoints laid out on it as a
# node's download leaves them, then the tool's command line; prints what is left.
DRIVER = textwrap.dedent("""\
    import json, os, subprocess, sys
    spec = json.loads(sys.argv[1])
    root = spec["root"]
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={spec['size']}", "tmpfs", root], check=True)
    for rel, (size, markers, age) in spec["dirs"].items():
        d = os.path.join(root, rel)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "model.safetensors"), "wb") as f:
            f.write(b"\\1" * size)
        for marker in markers:
            path = os.path.join(d, marker)
            with open(path, "w") as f:
                f.write("x\\n")
            os.utime(path, (age, age))
    run = subprocess.run([sys.executable, spec["tool"], "--root", root, "--target", os.path.join(root, spec["target"]),
                          "--need", str(spec["need"])], capture_output=True, text=True)
    left = sorted(os.path.relpath(os.path.join(p, n), root) for p, ds, _ in os.walk(root) for n in ds)
    print(json.dumps({"rc": run.returncode, "out": run.stdout + run.stderr, "left": left}))
""")


def _room(tmp_path: Path, *, size: int, dirs: dict, target: str, need: int) -> dict:
    root = tmp_path / "weights"
    root.mkdir()
    spec = {"root": str(root), "size": size, "dirs": dirs, "target": target, "need": need,
            "tool": str(NODE_SCRIPTS / "weights_room.py")}
    run = subprocess.run(["unshare", "--mount", sys.executable, "-c", DRIVER, json.dumps(spec)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


OLD, OLDER, NEW = "org--kimi/rev-old", "org--kimi/rev-older", "org--kimi/rev-new"


@needs_tmpfs
def test_a_volume_that_holds_both_keeps_the_old_checkpoint(tmp_path):
    result = _room(tmp_path, size=40 * MB, dirs={OLD: (10 * MB, [".kimi-verified"], 1_000)}, target=NEW, need=10 * MB)
    assert result["rc"] == 0, result["out"]
    assert OLD in result["left"] and result["out"] == ""


@needs_tmpfs
def test_older_checkpoints_go_first_and_only_as_many_as_needed(tmp_path):
    dirs = {OLDER: (10 * MB, [".kimi-verified"], 1_000), OLD: (10 * MB, [".kimi-checkpoint", ".kimi-verified"], 2_000),
            # Not this program's: no marker, never removed, whatever its size.
            "org--kimi/someone-elses": (8 * MB, [], 0)}
    result = _room(tmp_path, size=40 * MB, dirs=dirs, target=NEW, need=15 * MB)
    assert result["rc"] == 0, result["out"]
    assert OLDER not in result["left"] and OLD in result["left"], result
    assert "org--kimi/someone-elses" in result["left"]
    assert "removed org--kimi/rev-older (" in result["out"] and "removed org--kimi/rev-old (" not in result["out"]
    assert "a running engine keeps serving what it loaded" in result["out"]


@needs_tmpfs
def test_a_partial_download_of_the_target_counts_and_is_never_removed(tmp_path):
    # 30 of 40 MB free after two checkpoints; the target already holds 12 MB of its 20: it fits.
    dirs = {OLD: (10 * MB, [".kimi-verified"], 1_000), NEW: (12 * MB, [".kimi-checkpoint"], 3_000)}
    result = _room(tmp_path, size=40 * MB, dirs=dirs, target=NEW, need=20 * MB)
    assert result["rc"] == 0 and OLD in result["left"] and NEW in result["left"], result


@needs_tmpfs
def test_a_volume_too_small_even_when_empty_fails_with_the_numbers(tmp_path):
    dirs = {OLD: (10 * MB, [".verified"], 1_000), "notes": (1 * MB, [], 0)}
    result = _room(tmp_path, size=20 * MB, dirs=dirs, target=NEW, need=25 * MB)
    assert result["rc"] == 1
    assert OLD not in result["left"] and "notes" in result["left"]
    assert "no older checkpoint left to remove: grow the weights volume" in result["out"], result["out"]


def test_a_target_outside_the_root_is_refused(tmp_path):
    run = subprocess.run([sys.executable, str(NODE_SCRIPTS / "weights_room.py"), "--root", str(tmp_path / "w"),
                          "--target", str(tmp_path / "elsewhere" / "x"), "--need", "1"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "is not a directory under --root" in run.stderr


def test_the_checkpoints_are_this_programs_least_recently_verified_first(tmp_path):
    for rel, marker, age in ((OLD, ".kimi-verified", 2_000), (OLDER, ".verified", 1_000),
                             ("org--kimi/mine-started", ".kimi-checkpoint", 1_500), ("org--kimi/theirs", None, 0),
                             (".kimi-fleet/verify-packages", ".kimi-verified", 0)):
        (tmp_path / rel).mkdir(parents=True)
        if marker:
            (tmp_path / rel / marker).write_text("x\n")
            os.utime(tmp_path / rel / marker, (age, age))
    (tmp_path / "org--kimi" / "link").symlink_to(tmp_path / OLD)
    assert [Path(d).relative_to(tmp_path).as_posix() for d in weights_room.checkpoints(str(tmp_path))] == [
        OLDER, "org--kimi/mine-started", OLD]


@pytest.mark.parametrize("fits", [True, False])
def test_the_kubernetes_download_checks_room_before_it_fetches(tmp_path, fits):
    """The Job's (and the init container's) script, under /bin/sh as the download image runs it:
    the room check comes before `hf download`, and a volume too small stops it there."""
    from kimi_fleet import k8s_manifests as k8s
    from kimi_fleet.node_files import VERIFIER_REQUIREMENTS_TEXT

    verifier = tmp_path / "verifier"
    verifier.mkdir()
    for name in k8s.WEIGHTS_JOB_SCRIPTS:
        shutil.copy(NODE_SCRIPTS / name, verifier / name)
    (verifier / k8s.VERIFIER_REQUIREMENTS_KEY).write_text(VERIFIER_REQUIREMENTS_TEXT)
    weights = tmp_path / "weights"
    packages = Path(k8s.VERIFIER_PACKAGES_DIR.replace(k8s.WEIGHTS_MOUNT, str(weights), 1))
    packages.mkdir(parents=True)
    (packages / k8s.PACKAGES_COMPLETE_MARKER).write_text("")  # installed by an earlier run
    tools, calls = tmp_path / "bin", tmp_path / "calls"
    tools.mkdir()
    (tools / "python3").symlink_to(sys.executable)
    for stub in ("hf", "pip"):
        (tools / stub).write_text(f"#!/bin/sh\necho {stub} >>{calls}\n")
        (tools / stub).chmod(0o755)
    target = weights / "moonshotai--Kimi-K2.6" / ("c" * 40)
    need = 1_000 if fits else shutil.disk_usage(tmp_path).total + 1
    script = k8s.DOWNLOAD_SCRIPT.replace(k8s.VERIFIER_MOUNT, str(verifier)).replace(
        f"--root {k8s.WEIGHTS_MOUNT} ", f"--root {weights} ")
    env = {"PATH": f"{tools}:/usr/bin:/bin", "HOME": str(tmp_path), "TARGET_DIR": str(target),
           "PACKAGES_DIR": str(packages), "REPO": "moonshotai/Kimi-K2.6", "REVISION": "c" * 40,
           "CHECKPOINT_BYTES": str(need), "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = subprocess.run(["/bin/sh", "-ec", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0  # no Hub here: the verify after `hf download` fails too
    if fits:
        assert calls.read_text().split() == ["pip", "hf"]
        assert (target / weights_room.CHECKPOINT_MARKER).read_text() == f"moonshotai/Kimi-K2.6@{'c' * 40}\n"
    else:
        assert not calls.exists()
        assert "grow the weights volume" in result.stdout


def _loop_xfs_unavailable() -> str | None:
    for tool in ("mkfs.xfs", "xfs_growfs", "losetup", "blockdev", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (.ci/run installs it)"
    with tempfile.NamedTemporaryFile() as image:
        image.truncate(1 << 20)
        probe = subprocess.run(["losetup", "-f", "--show", image.name], capture_output=True, text=True)
        if probe.returncode != 0:
            return f"no loop device can be attached here: {probe.stderr.strip()}"
        subprocess.run(["losetup", "-d", probe.stdout.strip()], check=True)
    return UNAVAILABLE


LOOP_UNAVAILABLE = _loop_xfs_unavailable()

# A 1 GiB xfs volume on a loop device, mounted in a private namespace; its device then grows to
# GROWN GiB (as an EBS device does once AWS applies a modification), and the bootstrap's own
# grow_weights_filesystem runs with the size the release asks for.
GROW_DRIVER = """\
set -euo pipefail
image=$1/volume.img mount_point=$1/weights
mkdir -p "$mount_point"
truncate -s 1G "$image"
device=$(losetup -f --show "$image")
trap 'umount "$mount_point" 2>/dev/null || true; losetup -d "$device"' EXIT
mkfs.xfs -q "$device"
mount "$device" "$mount_point"
truncate -s "${GROWN}G" "$image"
losetup -c "$device"
log() { echo "log: $*"; }
run() { log "+ $*"; "$@" >/dev/null; }
sleep() { :; }
WEIGHTS_ROOT=$mount_point
""" + "{function}" + """
grow_weights_filesystem "$device"
echo "size $(stat -f -c '%b %S' "$mount_point" | awk '{print $1 * $2}')"
"""


def _grow(tmp_path: Path, *, grown_gib: int, asked_gib: int) -> tuple[str, int]:
    from kimi_fleet.node_files import BOOTSTRAP

    function = re.search(r"^grow_weights_filesystem\(\) \{\n.*?^\}\n", BOOTSTRAP, re.S | re.M).group(0)
    run = subprocess.run(["unshare", "--mount", "bash", "-c", GROW_DRIVER.replace("{function}", function), "grow",
                          str(tmp_path)],
                         env={**os.environ, "GROWN": str(grown_gib), "EBS_VOLUME_GIB": str(asked_gib),
                              "GROW_WAIT_POLLS": "2"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout, int(re.search(r"^size (\d+)$", run.stdout, re.M).group(1))


@pytest.mark.skipif(LOOP_UNAVAILABLE is not None, reason=str(LOOP_UNAVAILABLE))
def test_a_grown_ebs_volume_grows_its_filesystem_online(tmp_path):
    out, size = _grow(tmp_path, grown_gib=2, asked_gib=2)
    assert "+ xfs_growfs" in out
    assert size > int(1.9 * 2**30), out  # the mounted filesystem now spans the grown device


@pytest.mark.skipif(LOOP_UNAVAILABLE is not None, reason=str(LOOP_UNAVAILABLE))
def test_a_device_not_yet_grown_leaves_the_filesystem_and_says_so(tmp_path):
    out, size = _grow(tmp_path, grown_gib=1, asked_gib=2)
    assert "not the 2 GiB asked for; the filesystem keeps its size" in out and "xfs_growfs" not in out
    assert size < 2**30
