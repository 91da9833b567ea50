"""Room for a new checkpoint revision on a volume that holds the old one: the node's tool against a
real filesystem of a fixed size (a tmpfs in a private mount namespace), and the download script
that calls it before any transfer. The tool removes only what it can prove it downloaded, and only
when removing all of that is enough (issue 21: a team's dataset holding a `.verified` file was
removed from a shared disk, and the download failed anyway)."""

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

# A marker's content in a layout: literal text, or one of
MADE = "@made"  # the tool itself marks the directory, as when it made room for its download
MOVED = "@moved"  # as MADE, on another volume, then the whole directory is moved onto this one
COPY = "@copy:"  # + a directory on another volume (`elsewhere`): its marker file copied here

# Runs inside `unshare --mount`: a volume of SIZE bytes at ROOT, directories laid out on it (in
# order, each a data file and its markers, aged), then the tool's command line; prints what is left.
DRIVER = textwrap.dedent("""\
    import json, os, shutil, subprocess, sys
    spec = json.loads(sys.argv[1])
    root, staging, tool = spec["root"], spec["staging"], spec["tool"]
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={spec['size']}", "tmpfs", root], check=True)

    def run(volume, target, need, keep=()):
        keeps = [arg for k in keep for arg in ("--keep", os.path.join(volume, k))]
        return subprocess.run([sys.executable, tool, "--root", volume, "--target", target, "--need", str(need),
                               *keeps], capture_output=True, text=True)

    def lay_out(volume, dirs):
        for rel, (size, markers, age) in dirs.items():
            moved = any(content == "@moved" for content in markers.values())
            d = os.path.join(staging if moved else volume, rel)
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "model.safetensors"), "wb") as f:
                f.write(b"\\1" * size)
            for link in spec["links"].get(rel, []):  # the same file, linked from outside the layout
                os.makedirs(os.path.dirname(os.path.join(volume, link)), exist_ok=True)
                os.link(os.path.join(d, "model.safetensors"), os.path.join(volume, link))
            for marker, content in markers.items():
                path = os.path.join(d, marker)
                if content in ("@made", "@moved"):
                    made = run(staging if moved else volume, d, 0)
                    assert made.returncode == 0 and os.path.isfile(path), made.stdout + made.stderr
                elif content.startswith("@copy:"):
                    shutil.copy(os.path.join(staging, content.removeprefix("@copy:"), marker), path)
                else:
                    with open(path, "w") as f:
                        f.write(content)
            if moved:
                os.makedirs(os.path.dirname(os.path.join(volume, rel)), exist_ok=True)
                shutil.move(d, os.path.join(volume, rel))
                d = os.path.join(volume, rel)
            for marker in markers:
                os.utime(os.path.join(d, marker), (age, age))

    lay_out(staging, spec["elsewhere"])
    lay_out(root, spec["dirs"])
    target = os.path.join(root, spec["target"])
    result = run(root, target, spec["need"], spec["keep"])
    left = sorted(os.path.relpath(os.path.join(p, n), root) for p, ds, _ in os.walk(root) for n in ds)
    try:
        with open(os.path.join(target, spec["owner_marker"])) as f:
            owner = json.load(f)
    except OSError:
        owner = None
    print(json.dumps({"rc": result.returncode, "out": result.stdout + result.stderr, "left": left,
                      "owner": owner, "root": os.path.realpath(root)}))
""")


def _room(tmp_path: Path, *, size: int, dirs: dict, target: str, need: int, links: dict | None = None,
          elsewhere: dict | None = None, keep: tuple[str, ...] = ()) -> dict:
    root, staging = tmp_path / "weights", tmp_path / "elsewhere"
    root.mkdir()
    staging.mkdir()
    spec = {"root": str(root), "staging": str(staging), "size": size, "dirs": dirs, "target": target,
            "need": need, "links": links or {}, "elsewhere": elsewhere or {}, "keep": list(keep),
            "tool": str(NODE_SCRIPTS / "weights_room.py"),
            "owner_marker": weights_room.OWNER_MARKER}
    node_root = tmp_path / "node"  # a refusal's status line lands here, not in this machine's /run
    run = subprocess.run(["unshare", "--mount", sys.executable, "-c", DRIVER, json.dumps(spec)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "KIMI_ROOT": str(node_root)})
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    status = node_root / "run/kimi-fleet/status.json"
    result["refusal"] = json.loads(status.read_text()).get("refused") if status.exists() else None
    return result


REPO, REPO_DIR = "org/kimi", "org--kimi"
OLD, OLDER, NEW = (f"{REPO_DIR}/{c * 40}" for c in "abc")
OWNED = {weights_room.OWNER_MARKER: MADE}


def legacy(rel: str) -> dict:
    """The markers the previous release's download left (before the owner marker existed)."""
    revision = rel.rsplit("/", 1)[1]
    return {weights_room.CHECKPOINT_MARKER: f"{REPO}@{revision}\n", weights_room.NODE_VERIFIED_MARKER: f"{revision}\n"}


@needs_tmpfs
def test_a_volume_that_holds_both_keeps_the_old_checkpoint_and_marks_the_new_one(tmp_path):
    result = _room(tmp_path, size=40 * MB, dirs={OLD: (10 * MB, OWNED, 1_000)}, target=NEW, need=10 * MB)
    assert result["rc"] == 0, result["out"]
    assert OLD in result["left"] and result["out"] == ""
    # The proof this program made the target: its repo, revision and absolute place.
    assert result["owner"] == {"made_by": "kimi-fleet", "repo": REPO, "revision": "c" * 40,
                               "directory": f"{result['root']}/{NEW}"}


@needs_tmpfs
def test_older_checkpoints_go_first_and_only_as_many_as_needed(tmp_path):
    dirs = {OLDER: (10 * MB, OWNED, 1_000), OLD: (10 * MB, legacy(OLD), 2_000),
            # Not this program's: no marker, never removed, whatever its size.
            f"{REPO_DIR}/someone-elses": (8 * MB, {}, 0)}
    result = _room(tmp_path, size=40 * MB, dirs=dirs, target=NEW, need=15 * MB)
    assert result["rc"] == 0, result["out"]
    assert OLDER not in result["left"] and OLD in result["left"], result
    assert f"{REPO_DIR}/someone-elses" in result["left"]
    assert f"removed {OLDER} (" in result["out"] and f"removed {OLD} (" not in result["out"]
    assert "a running engine keeps serving what it loaded" in result["out"]
    assert result["owner"]["revision"] == "c" * 40


@needs_tmpfs
def test_a_partial_download_of_the_target_counts_and_is_never_removed(tmp_path):
    # 30 of 40 MB free after two checkpoints; the target already holds 12 MB of its 20: it fits.
    dirs = {OLD: (10 * MB, OWNED, 1_000), NEW: (12 * MB, OWNED, 3_000)}
    result = _room(tmp_path, size=40 * MB, dirs=dirs, target=NEW, need=20 * MB)
    assert result["rc"] == 0 and OLD in result["left"] and NEW in result["left"], result


@needs_tmpfs
def test_nothing_is_removed_when_removing_everything_would_not_be_enough(tmp_path):
    """Issue 21: the tool used to remove checkpoints one by one and fail after the last; now it
    counts what it may remove first, and a volume too small even then loses nothing."""
    dirs = {OLDER: (10 * MB, OWNED, 1_000), OLD: (10 * MB, legacy(OLD), 2_000), "notes": (1 * MB, {}, 0)}
    result = _room(tmp_path, size=40 * MB, dirs=dirs, target=NEW, need=45 * MB)
    assert result["rc"] == 2  # a refusal: no retry can help
    assert {OLDER, OLD, "notes"} <= set(result["left"]), result
    (line,) = [line for line in result["out"].splitlines() if "removing nothing" in line]
    assert f"{NEW} needs 45.0 MB more" in line
    assert "the 2 older checkpoint(s) this program downloaded hold 20.0 MB" in line
    assert re.search(r"\d+\.\d MB short even without them; grow the weights volume \(weights.ebsSizeGib", line), line
    assert result["owner"] is None  # no download follows: the target is not claimed


@needs_tmpfs
def test_the_serving_checkpoint_is_kept_and_an_older_one_goes_instead(tmp_path):
    """An in-place release keeps the checkpoint the running release serves (--keep), though it is the
    least recently verified: the other one is removed."""
    dirs = {OLD: (10 * MB, OWNED, 1_000), OLDER: (10 * MB, OWNED, 2_000)}
    result = _room(tmp_path, size=40 * MB, dirs=dirs, target=NEW, need=25 * MB, keep=(OLD,))
    assert result["rc"] == 0, result["out"]
    assert OLD in result["left"] and OLDER not in result["left"], result


@needs_tmpfs
def test_no_room_without_the_serving_checkpoint_is_a_refusal_that_removes_nothing(tmp_path):
    """Removing the serving checkpoint would make room, but a failed release goes back to it: the
    prepare refuses (exit 2) in one line, also in the node status, and the old release serves on."""
    dirs = {OLD: (10 * MB, OWNED, 1_000), OLDER: (5 * MB, OWNED, 2_000)}
    result = _room(tmp_path, size=40 * MB, dirs=dirs, target=NEW, need=30 * MB, keep=(OLD,))
    assert result["rc"] == 2, result
    assert {OLD, OLDER} <= set(result["left"]) and result["owner"] is None
    (line,) = [line for line in result["out"].splitlines() if "removing nothing" in line]
    assert f"{OLD} is kept because the running release serves it" in line
    assert "grow the weights volume (weights.ebsSizeGib) to hold both checkpoints, by at least" in line
    assert result["refusal"] and "to hold both checkpoints" in json.dumps(result["refusal"])


@needs_tmpfs
def test_a_checkpoint_whose_files_are_linked_elsewhere_frees_nothing_and_is_not_counted(tmp_path):
    # Removing it would unlink names only: the data stays for the other link, and the download fails.
    result = _room(tmp_path, size=40 * MB, dirs={OLD: (20 * MB, OWNED, 1_000)}, target=NEW, need=25 * MB,
                   links={OLD: ["backup/model.safetensors"]})
    assert result["rc"] == 2 and OLD in result["left"], result
    assert "hold 0.0 MB" in result["out"] and "removed" not in result["out"]


@needs_tmpfs
def test_a_volume_too_small_even_when_empty_fails_with_the_numbers(tmp_path):
    result = _room(tmp_path, size=20 * MB, dirs={"notes": (1 * MB, {}, 0)}, target=NEW, need=25 * MB)
    assert result["rc"] == 2 and "notes" in result["left"]
    assert "grow the weights volume" in json.dumps(result["refusal"]), result["refusal"]  # in the node status too
    assert "no older checkpoint left to remove: grow the weights volume" in result["out"], result["out"]
    assert re.search(r"by at least [56]\.\d MB$", result["out"].strip()), result["out"]


# Directories that hold a marker but are not provably this program's download, each with the log
# line's reason. Removing any one of them would make room (40 MB volume, 10 MB each, 35 MB asked).
NOT_OURS = {
    # Issue 21 as it happened: a team's dataset on the host's shared disk, with its own `.verified`.
    "a team's dataset with a generic .verified": (
        "team/dataset", {".verified": "ok\n"}, "not at <root>/<org>--<name>/<40-hex revision>"),
    "the previous release's marker outside the layout": (
        "backup/kimi", {".kimi-checkpoint": f"{REPO}@{'d' * 40}\n"}, "not at <root>/<org>--<name>/<40-hex revision>"),
    "a commit-named directory under a folder not named for a repo": (
        f"datasets/{'d' * 40}", {".kimi-verified": f"{'d' * 40}\n"}, "not at <root>/<org>--<name>/<40-hex revision>"),
    "a revision directory not named by a commit": (
        f"{REPO_DIR}/main", {".kimi-checkpoint": f"{REPO}@main\n"}, "not at <root>/<org>--<name>/<40-hex revision>"),
    "a generic .verified in the layout": (
        f"{REPO_DIR}/{'d' * 40}", {".verified": f"{'d' * 40}\n"}, "it holds only a generic .verified"),
    "the previous release's marker without its content": (
        f"{REPO_DIR}/{'d' * 40}", {".kimi-checkpoint": "", ".kimi-verified": "x\n"},
        f"its .kimi-checkpoint and .kimi-verified do not name {REPO}@{'d' * 40}"),
    "the previous release's marker naming another revision": (
        f"{REPO_DIR}/{'d' * 40}", {".kimi-checkpoint": f"{REPO}@{'e' * 40}\n"},
        f"its .kimi-checkpoint does not name {REPO}@{'d' * 40}"),
    "an owner marker copied from another checkpoint": (
        f"{REPO_DIR}/{'d' * 40}", {weights_room.OWNER_MARKER: f"{COPY}{REPO_DIR}/{'e' * 40}"},
        f"names {REPO}@{'e' * 40}, not {REPO}@{'d' * 40}"),
    "a checkpoint moved here from another volume": (
        f"{REPO_DIR}/{'d' * 40}", {weights_room.OWNER_MARKER: MOVED}, "(copied or moved here)"),
    "an owner marker this program did not write": (
        f"{REPO_DIR}/{'d' * 40}", {weights_room.OWNER_MARKER: '{"repo": "org/kimi"}\n'},
        "is not one this program wrote"),
}


@needs_tmpfs
@pytest.mark.parametrize("case", NOT_OURS)
def test_what_this_program_cannot_prove_it_downloaded_is_never_removed(tmp_path, case):
    rel, markers, why = NOT_OURS[case]
    # The copy's source is a real checkpoint of this program, on another volume.
    source = {f"{REPO_DIR}/{'e' * 40}": (1 * MB, OWNED, 0)} if COPY in str(markers) else {}
    result = _room(tmp_path, size=40 * MB, dirs={rel: (10 * MB, markers, 1_000)}, target=NEW, need=35 * MB,
                   elsewhere=source)
    assert result["rc"] == 2, result["out"]
    assert rel in result["left"], result
    (line,) = [line for line in result["out"].splitlines() if line.startswith(f"weights: not removing {rel}: ")]
    assert why in line and line.endswith("(remove it by hand if it is not needed)"), line
    assert "no older checkpoint left to remove: grow the weights volume" in result["out"]


@needs_tmpfs
@pytest.mark.parametrize("markers", [OWNED, legacy(f"{REPO_DIR}/{'d' * 40}")],
                         ids=["marked by this tool", "previous release"])
def test_what_this_program_downloaded_is_removed_in_the_same_place(tmp_path, markers):
    """The control for the cases above: the same volume with a checkpoint this program made."""
    rel = f"{REPO_DIR}/{'d' * 40}"
    result = _room(tmp_path, size=40 * MB, dirs={rel: (10 * MB, markers, 1_000)}, target=NEW, need=35 * MB)
    assert result["rc"] == 0 and rel not in result["left"], result
    assert f"removed {rel} (10.0 MB)" in result["out"] and "not removing" not in result["out"]


def test_a_target_outside_the_root_is_refused(tmp_path):
    run = subprocess.run([sys.executable, str(NODE_SCRIPTS / "weights_room.py"), "--root", str(tmp_path / "w"),
                          "--target", str(tmp_path / "elsewhere" / "x"), "--need", "1"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "is not a directory under --root" in run.stderr


def test_the_checkpoints_are_this_programs_least_recently_verified_first(tmp_path):
    mine_started = f"{REPO_DIR}/{'f' * 40}"
    for rel, markers, age in ((OLD, legacy(OLD), 2_000), (OLDER, {".verified": "x\n"}, 1_000),
                              (mine_started, None, 1_500), (f"{REPO_DIR}/theirs", {}, 0),
                              (".kimi-fleet/verify-packages", {".kimi-verified": "x\n"}, 0)):
        (tmp_path / rel).mkdir(parents=True)
        if markers is None:
            weights_room.mark_target(str(tmp_path), str(tmp_path / rel))
            markers = OWNED
        for marker, content in markers.items():
            if content != MADE:
                (tmp_path / rel / marker).write_text(content)
            os.utime(tmp_path / rel / marker, (age, age))
    (tmp_path / REPO_DIR / ("9" * 40)).symlink_to(tmp_path / OLD)
    ours, kept = weights_room.survey(str(tmp_path))
    assert [Path(d).relative_to(tmp_path).as_posix() for d in ours] == [mine_started, OLD]
    assert {Path(d).relative_to(tmp_path).as_posix(): why for d, why in kept.items()} == {
        OLDER: "it holds only a generic .verified, which any tool may write",
        f"{REPO_DIR}/{'9' * 40}": "a symbolic link"}
    assert weights_room.checkpoints(str(tmp_path)) == ours


def test_the_owner_marker_is_written_only_for_the_projects_layout(tmp_path):
    lines = []
    weights_room.mark_target(str(tmp_path), str(tmp_path / "w"), log=lines.append)
    assert not (tmp_path / "w" / weights_room.OWNER_MARKER).exists()
    assert lines == [f"weights: {tmp_path / 'w'} is not at <root>/<org>--<name>/<40-hex revision>: no "
                     f"{weights_room.OWNER_MARKER} written, so it is never removed to make room for another checkpoint"]



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
    # `python3 -m pip` (the hash-pinned hf CLI install) is recorded, not run: no index here.
    (tools / "python3").write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then echo pip >>{calls}; exit 0; fi\n'
                                   f'exec {sys.executable} "$@"\n')
    (tools / "python3").chmod(0o755)
    for stub in ("hf", "pip"):
        (tools / stub).write_text(f"#!/bin/sh\necho {stub} >>{calls}\n")
        (tools / stub).chmod(0o755)
    target = weights / "moonshotai--Kimi-K2.6" / ("c" * 40)
    need = 1_000 if fits else shutil.disk_usage(tmp_path).total + 1
    script = k8s.DOWNLOAD_SCRIPT.replace(k8s.VERIFIER_MOUNT, str(verifier)).replace(
        f"--root {k8s.WEIGHTS_MOUNT} ", f"--root {weights} ")
    env = {"PATH": f"{tools}:/usr/bin:/bin", "HOME": str(tmp_path), "TARGET_DIR": str(target),
           "PACKAGES_DIR": str(packages), "REPO": "moonshotai/Kimi-K2.6", "REVISION": "c" * 40,
           "CHECKPOINT_BYTES": str(need), "HF_ENDPOINT": "http://127.0.0.1:9", "KIMI_ROOT": str(tmp_path / "node")}
    result = subprocess.run(["/bin/sh", "-ec", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0  # no Hub here: the verify after `hf download` fails too
    if fits:
        assert calls.read_text().split() == ["pip", "hf"]
        assert (target / weights_room.CHECKPOINT_MARKER).read_text() == f"moonshotai/Kimi-K2.6@{'c' * 40}\n"
        # The room tool claimed the directory: a later download may remove it for room.
        assert weights_room.why_not_ours(str(weights), str(target)) is None
        assert json.loads((target / weights_room.OWNER_MARKER).read_text())["directory"] == str(target.resolve())
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
