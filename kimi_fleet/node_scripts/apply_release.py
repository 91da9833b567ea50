#!/usr/bin/env python3
"""Apply a release to this node: fetch the content-addressed bundle of node files, check its
SHA-256, and bring the node to it. Run by cloud-init at boot and by the stack's SSM association on
every `pulumi up` that changes the release.

A first install (or --boot) writes the files and runs the bootstrap. A node that already runs a
release takes the next one in place without losing the old one first:
  1. stage: the new files go to a staging directory; the files they replace are saved on the node;
  2. prepare, while the old engines serve: the staged bootstrap fetches secrets and fetches and
     verifies the weights (`kimi-bootstrap --prepare`), and the new engine images are pulled;
  3. swap: the new files go live and the bootstrap restarts what changed;
  4. wait until the node admits the new release anew (the ready file is removed before the swap,
     so only the watchdog's next admission names it), within the warm start (a rank of a multi-node
     replica whose peer the release names at a new address: that peer's cold start, since no rank
     is admitted before all are up), the node's own admission deadline, two watchdog intervals
     and a margin; an engine that crash-loops fails it
     at once; files only the previous bundle had are removed (an engine the release dropped);
  5. on failure, the saved files come back and the bootstrap restarts the previous release; the
     node status names the failed release, why, and the engine's last log lines.

usage: apply_release.py --pointer PARAMETER --region REGION [--expect SHA256] [--boot]
       apply_release.py --bundle-file PATH --expect SHA256
  PARAMETER  SSM parameter holding "s3://bucket/releases/<sha256>.json <sha256>"
  --bundle-file  a bundle the deployer copied onto an existing host (root's, not writable by others)
  --expect   refuse unless the pointer names this bundle (the association passes the one it deploys);
             with --boot, fetch that bundle by its digest from the pointer's bucket (a fleet node's
             launch template names its release, which need not be the pointer's: a node launched
             from a retained template version boots its own bundle)
  --boot     first boot: write the files, then start the bootstrap unit without waiting for it
AWS errors (SSM, S3 unreachable, the role not yet propagated, an object not yet written) are
retried with backoff and jitter until --pointer-wait runs out; a refusal (a bundle whose SHA-256
is wrong, a pointer of the wrong shape) is not retried. The AWS CLI (`aws`, on PATH) does the
fetching; $KIMI_ROOT prefixes every path (tests).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from stat import S_ISREG

ROOT = Path(os.environ.get("KIMI_ROOT", "/"))
LIVE = ROOT == Path("/")
STATE = ROOT / "var/lib/kimi-fleet"
LOG = ROOT / "var/log/kimi-fleet/bootstrap.log"
BOOTSTRAP = "usr/local/sbin/kimi-bootstrap"
NODE_ENV = "etc/kimi-fleet/node.env"
STACK_JSON = "etc/kimi-fleet/stack.json"
RELEASE_FILE = "etc/kimi-fleet/release"
NODE_STATUS_FILE = "run/kimi-fleet/status.json"
LIB_DIR = "usr/local/lib/kimi-fleet"
#: How long transient AWS errors are retried (a new node may boot before Pulumi wrote the pointer
#: or its bundle, SSM or S3 may be unreachable for a while).
POINTER_WAIT_SECONDS = 1800
RETRY_FIRST_DELAY_SECONDS = 5.0
RETRY_MAX_DELAY_SECONDS = 60.0
#: Beyond the warm start, the node's admission run and two watchdog ticks: a slow but healthy load
#: is not a failed release.
ADMISSION_MARGIN_SECONDS = 300
#: The watchdog ticks waited for: one may have just begun before the engines were ready.
ADMISSION_WATCHDOG_TICKS = 2
#: The paths of the bundle applied last (what the next release removes when it drops one).
APPLIED_FILES = "applied-files.json"
#: An engine restarted this many times since the swap is crash-looping (an OOM at load restarts
#: every RestartSec): the release has failed, whatever the budget still allows.
ENGINE_RESTARTS_TOLERATED = 3
ADMISSION_POLL_SECONDS = 10.0
#: The engine's last log lines recorded with a failed release (what `pulumi up` shows).
ENGINE_LOG_LINES = 20
#: Saved pre-swap files of the last few in-place applies (each holds one release's small text files).
ROLLBACKS_KEPT = 3


class Transient(RuntimeError):
    """A fault that may pass (network, an object not yet written): retried."""


#: The rollback label of a release that served before the applier kept records (`applied-release`).
UNRECORDED_RELEASE = "unrecorded"


class Refused(RuntimeError):
    """Content that is wrong and will stay wrong: never retried."""


class ReleaseFailed(RuntimeError):
    """The new release did not admit itself on this node."""

    def __init__(self, reason: str, log_tail: list[str]):
        super().__init__(reason)
        self.log_tail = log_tail


def log(message: str) -> None:
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} [kimi-apply-release] {message}"
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass  # the caller went away (an SSH session dropped): the apply and its rollback go on
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as out:
        out.write(line + "\n")


def aws(*args: str) -> bytes:
    result = subprocess.run(["aws", *args], capture_output=True, check=False)
    if result.returncode != 0:
        raise Transient(f"aws {' '.join(args[:2])}: {result.stderr.decode(errors='replace').strip()[-300:]}")
    return result.stdout


def retrying(what: str, attempt, wait_seconds: float, first_delay: float = RETRY_FIRST_DELAY_SECONDS):
    """attempt() until it returns; Transient errors are retried with exponential backoff and full
    jitter (many fleet nodes booting at once do not retry in step) until `wait_seconds` ran out."""
    deadline = time.monotonic() + wait_seconds
    delay = first_delay
    while True:
        try:
            return attempt()
        except Transient as error:
            if time.monotonic() >= deadline:
                raise
            pause = min(random.uniform(delay / 2, delay), max(0.0, deadline - time.monotonic()))
            log(f"{what}: {error}; retrying in {pause:.1f}s")
            time.sleep(pause)
            delay = min(RETRY_MAX_DELAY_SECONDS, delay * 2)


def read_pointer(name: str, region: str) -> tuple[str, str]:
    value = aws("ssm", "get-parameter", "--region", region, "--name", name,
                "--query", "Parameter.Value", "--output", "text").decode().strip()
    parts = value.split()
    if len(parts) != 2 or not parts[0].startswith("s3://") or len(parts[1]) != 64:
        raise Refused(f"pointer {name} holds {value!r}, not 's3://... <sha256>'")
    return parts[0], parts[1]


def bundle_uri(pointer_uri: str, digest: str) -> str:
    """The bundle named `digest` in the pointer's bucket (bundles are stored under their SHA-256)."""
    return f"{pointer_uri.rsplit('/', 1)[0]}/{digest}.json"


def fetch(uri: str, digest: str, region: str) -> dict:
    bundle = aws("s3", "cp", uri, "-", "--region", region)
    actual = hashlib.sha256(bundle).hexdigest()
    if actual != digest:
        raise Refused(f"bundle {uri} has SHA-256 {actual}, the pointer says {digest}: refusing it")
    return json.loads(bundle)


def read_bundle_file(path: Path, digest: str) -> dict:
    """A bundle the deployer copied onto the node (an existing host, over SSH): its bytes must hash to
    `digest`, and the file and its directory must be root's own (nothing else on the host may have
    written or swapped it). Opened once, without following a link or blocking on a FIFO."""
    directory = path.parent.lstat()
    if LIVE and (directory.st_uid != 0 or directory.st_mode & 0o022):
        raise Refused(f"bundle directory {path.parent} is not root's own (uid {directory.st_uid}, mode "
                      f"{oct(directory.st_mode & 0o777)}): refusing its bundles")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        raise Refused(f"bundle file {path} cannot be opened as a plain file: {error.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        stat = os.fstat(handle.fileno())
        if not S_ISREG(stat.st_mode):
            raise Refused(f"bundle file {path} is not a regular file")
        if LIVE and stat.st_uid != 0:
            raise Refused(f"bundle file {path} is owned by uid {stat.st_uid}, not root: refusing it")
        if stat.st_mode & 0o022:
            raise Refused(f"bundle file {path} is writable by others (mode {oct(stat.st_mode & 0o777)}): "
                          "refusing it")
        bundle = handle.read()
    actual = hashlib.sha256(bundle).hexdigest()
    if actual != digest:
        raise Refused(f"bundle file {path} has SHA-256 {actual}, expected {digest}: refusing it")
    return json.loads(bundle)


def take_incoming_secrets(incoming: Path | None, settings_root: Path, into: Path) -> None:
    """Copy the secrets the deployer left in `incoming` (an existing host: root-only files named
    after their node path's last part) to where the release at `settings_root` reads them, under
    `into` (the stage while the old release serves, the node itself on a first install). They stay
    in `incoming` until the release is applied: a failed apply that is retried finds them again."""
    if incoming is None:
        return
    for path in secret_paths(settings_root):
        given = incoming / Path(path).name
        if given.is_file() and not given.is_symlink():
            target = into / path.lstrip("/")
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.kimi-tmp")
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(given.read_bytes())
            os.replace(tmp, target)


def clear_incoming_secrets(incoming: Path | None) -> None:
    """Once a release is applied, the deployer's copies go: the node keeps only the live ones."""
    if incoming is None or not incoming.is_dir():
        return
    for given in incoming.iterdir():
        if given.is_file() or given.is_symlink():
            given.unlink()


def bundle_file(bundle: dict, path: str) -> str | None:
    """The content the bundle gives `path`, or None."""
    return next((entry["content"] for entry in bundle["files"] if entry["path"] == path), None)


def write_files(bundle: dict, root: Path | None = None) -> list[str]:
    """Write every file whose content or mode differs, atomically, under `root` (the node's ROOT when
    None, read at call time); return the paths written."""
    root = ROOT if root is None else root
    written = []
    for entry in bundle["files"]:
        path = root / entry["path"].lstrip("/")
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


def bundle_paths(bundle: dict) -> list[str]:
    return sorted(entry["path"] for entry in bundle["files"])


def dropped_paths(bundle: dict) -> list[str]:
    """Files the previously applied bundle had and this one has not (never anything else)."""
    try:
        previous = json.loads((STATE / APPLIED_FILES).read_text())
    except (OSError, ValueError):
        return []
    return sorted(set(previous) - set(bundle_paths(bundle)))


def remove_paths(paths: list[str]) -> None:
    for path in paths:
        (ROOT / path.lstrip("/")).unlink(missing_ok=True)
    if paths:
        log(f"removed {len(paths)} file(s) the release dropped: {' '.join(paths)}")


def snapshot(bundle: dict, also: list[str] = ()) -> dict:
    """The live files the bundle would replace or remove (`also`), as a bundle (None for a file it
    would create)."""
    files = []
    for entry in [*bundle["files"], *({"path": p} for p in also)]:
        path = ROOT / entry["path"].lstrip("/")
        if path.is_file():
            files.append({"path": entry["path"], "mode": f"0{path.stat().st_mode & 0o7777:o}",
                          "content": path.read_text()})
        else:
            files.append({"path": entry["path"], "mode": None, "content": None})
    return {"files": files}


def restore(saved: dict) -> None:
    write_files({"files": [f for f in saved["files"] if f["content"] is not None]})
    for entry in saved["files"]:
        if entry["content"] is None:
            (ROOT / entry["path"].lstrip("/")).unlink(missing_ok=True)


def systemctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)


def wait_for_running_bootstrap() -> None:
    # A bootstrap still running (a first boot's download) finishes first: restarting or racing it
    # mid-download would throw the download away.
    while LIVE and systemctl("is-active", "kimi-bootstrap.service").stdout.strip() == "activating":
        time.sleep(10)


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
    wait_for_running_bootstrap()
    result = systemctl("restart", "kimi-bootstrap.service")
    if result.returncode != 0:
        raise RuntimeError(f"kimi-bootstrap.service failed: {result.stderr.strip()[-300:]}")


def env_values(path: Path) -> dict[str, str]:
    """A node's KEY=VALUE file (node.env, an engine's env file) as data; never sourced."""
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key] = value
    return values


def settings(root: Path) -> dict[str, str]:
    """node.env as data."""
    return env_values(root / NODE_ENV)


def engine_images(staged: Path) -> list[tuple[str, str]]:
    """(image, the directory its Dockerfile is in on the node, or "" for an image pulled as pinned)."""
    images = []
    for env_file in sorted((staged / "etc/kimi-fleet").glob("engine-*.env")):
        values = env_values(env_file)
        image = (values.get("IMAGE", ""), values.get("IMAGE_BUILD_DIR", ""))
        if image[0] and image not in images:
            images.append(image)
    return images


def ensure_image(staged: Path, image: str, build_dir: str) -> None:
    """The engine image on the node: pulled as pinned, or built from the staged release's Dockerfile
    (its directory on the node, under `staged`: the new files are not live yet)."""
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0:
        return
    command = (["docker", "build", "--tag", image, str(staged / build_dir.lstrip("/"))] if build_dir
               else ["docker", "pull", image])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise Transient(f"docker {command[1]} {image}: {done.stderr.strip()[-300:]}")


def prepare(staged: Path, wait_seconds: float, first_delay: float) -> None:
    """While the old engines serve: the new release's secrets, weights and images on the node."""
    wait_for_running_bootstrap()
    result = subprocess.run(["bash", str(staged / BOOTSTRAP), "--prepare"],
                            env={**os.environ, "KIMI_STAGE": str(staged), "KIMI_ROOT": str(ROOT)}, check=False)
    if result.returncode != 0:
        raise ReleaseFailed(f"preparing it failed (kimi-bootstrap --prepare exit {result.returncode}; "
                            "see /var/log/kimi-fleet/bootstrap.log)", [])

    for image, build_dir in engine_images(staged):
        retrying(f"engine image {image}", lambda image=image, build_dir=build_dir: ensure_image(staged, image, build_dir),
                 wait_seconds, first_delay)
        log(f"engine image {image} on the node" + (" (built from its pinned base)" if build_dir else ""))


def engine_start(index: int) -> str | None:
    """The engine unit's current start (systemd's InvocationID), None when it has none."""
    shown = systemctl("show", "-p", "InvocationID", "--value", f"kimi-engine@{index}.service")
    value = shown.stdout.strip() if shown.returncode == 0 else ""
    return value or None


def engine_restarts(index: int) -> int | None:
    shown = systemctl("show", "-p", "NRestarts", "--value", f"kimi-engine@{index}.service")
    try:
        return int(shown.stdout.strip())
    except ValueError:
        return None


def engine_log_tail(index: int) -> list[str]:
    try:
        shown = subprocess.run(["journalctl", "-u", f"kimi-engine@{index}.service", "-n", str(ENGINE_LOG_LINES),
                                "--no-pager", "-o", "cat"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return shown.stdout.splitlines()[-ENGINE_LOG_LINES:]


def unready(ready_file: Path) -> None:
    """Forget the last admission: only the watchdog's next one may name the release (a key rotation
    keeps the release id, and a restored release is the one the file already names)."""
    ready_file.unlink(missing_ok=True)


def node_status_field(name: str) -> dict | None:
    """One field of the node status the watchdog writes (read as data)."""
    try:
        return json.loads((ROOT / NODE_STATUS_FILE).read_text()).get(name)
    except (OSError, ValueError, AttributeError):
        return None


def wait_admitted(release: str, ready_file: Path, engines: list[int], budget: float, poll: float,
                  terms: str = "") -> None:
    """Until the node's ready file names `release` (call unready() before the change it admits);
    ReleaseFailed when an engine crash-loops or the budget runs out."""
    deadline = time.monotonic() + budget
    # A fabric verdict on the engine starts this change replaces does not count (the old engine may
    # still run for its stop grace while the watchdog judges it).
    replaced_starts = {engine_start(index) for index in engines} - {None}
    baseline = {index: engine_restarts(index) for index in engines}
    while True:
        try:
            if ready_file.read_text().strip() == release:
                return
        except OSError:
            pass
        fabric = node_status_field("fabric")
        if (fabric and fabric.get("transport") == "socket" and fabric.get("engine_starts")
                and not replaced_starts & set(fabric["engine_starts"])):
            # A rank of a multi-node replica off its fabric: no wait makes it faster.
            raise ReleaseFailed(fabric["verdict"], [line for index in engines for line in engine_log_tail(index)]
                                [-ENGINE_LOG_LINES:])
        for index in engines:
            now, before = engine_restarts(index), baseline[index]
            if now is not None and before is not None and now < before:
                baseline[index] = before = 0  # a manual (re)start resets systemd's count
            if now is not None and before is not None and now - before >= ENGINE_RESTARTS_TOLERATED:
                raise ReleaseFailed(f"kimi-engine@{index} restarted {now - before} times without admitting itself",
                                    engine_log_tail(index))
        if time.monotonic() >= deadline:
            tails = [line for index in engines for line in engine_log_tail(index)]
            raise ReleaseFailed(f"not admitted within {budget:.0f} s ({terms or budget_terms([])})",
                                tails[-ENGINE_LOG_LINES:])
        time.sleep(poll)


def new_peers(staged: Path, live: Path) -> list[str]:
    """The other ranks of this node's multi-node replica that the release at `staged` names as a new
    node: at a new address, or, where both releases name it, with a new instance id (a replaced node
    may be given its predecessor's private address). Their engines start cold (the boot, the
    download, then the load), and no rank of a replica is admitted before every rank is up. Empty
    for a single node. Only compared: nothing in stack.json is run."""
    after = json.loads((staged / STACK_JSON).read_text()).get("replica") or {}
    try:
        before = json.loads((live / STACK_JSON).read_text()).get("replica") or {}
    except (OSError, ValueError):
        before = {}
    known = {peer["rank"]: peer for peer in before.get("peers", [])}
    new = []
    for peer in after.get("peers", []):
        old = known.get(peer["rank"], {})
        instance, old_instance = peer.get("instance_id"), old.get("instance_id")
        if old.get("address") != peer["address"]:
            new.append(f"rank {peer['rank']} ({peer['address']})")
        elif instance and old_instance and instance != old_instance:
            new.append(f"rank {peer['rank']} ({peer['address']}, instance {instance}, was {old_instance})")
    return new


def admission_budget(root: Path, peers: list[str] = ()) -> float:
    """The warm start, the node's own admission run (stack.json's deadline), two watchdog ticks (the
    one running when the engines came up may have started before them) and a margin. With new
    `peers` (new_peers), the start waited for is theirs, when it is the longer: a new node's boot,
    image pull, download, verify, build, read and load of the whole checkpoint and the grace's
    margin (stack.json's expected_seconds.peer_cold_start, health.peer_cold_start_terms)."""
    minutes = settings(root).get("EXPECTED_READY_MINUTES") or "0"
    stack = json.loads((root / STACK_JSON).read_text())
    deadline = float(stack["admission"]["deadline_seconds"])
    interval = float(stack["watchdog"]["interval_seconds"])
    start = int(minutes) * 60
    if peers:
        start = max(start, int(stack["expected_seconds"]["peer_cold_start"]))
    return budget_seconds(start, deadline, interval)


def budget_seconds(start: float, deadline: float, interval: float) -> float:
    """An admission budget: the `start` waited for, the admission `deadline`, the watchdog ticks (of
    `interval`) and the margin (also what a multi-node rank's association waits: node_files)."""
    return start + deadline + ADMISSION_WATCHDOG_TICKS * interval + ADMISSION_MARGIN_SECONDS


def budget_terms(peers: list[str]) -> str:
    """What an admission budget is made of, for the failure that names it."""
    start = (f"the cold start of new peer {', '.join(peers)} (a new node's boot, image pull, download, verify, "
             "build, read and load of the whole checkpoint, and a margin; this node's warm start when longer)"
             if peers
             else "the expected warm start")
    return (f"{start}, the node's admission deadline, {ADMISSION_WATCHDOG_TICKS} watchdog intervals and "
            f"{ADMISSION_MARGIN_SECONDS} s")


def secret_paths(staged: Path) -> list[str]:
    values = settings(staged)
    return [values[key] for key in ("API_KEY_FILE", "HF_TOKEN_FILE", "PREVIOUS_API_KEY_FILE", "METRICS_KEY_FILE")
            if values.get(key)]


def take_secrets(staged: Path, paths: list[str], serving: list[str] = ()) -> dict[str, bytes | None]:
    """Move the secrets the prepare fetched under the stage into place; return what they replaced
    (kept in memory only: a secret is never written to the rollback files). `serving` are the
    secrets of the release being replaced: kept too, since the new release's bootstrap may remove
    one (a retired previous key) that a rollback needs back."""
    replaced = {}
    for path in serving:
        live = ROOT / path.lstrip("/")
        replaced[path] = live.read_bytes() if live.is_file() else None
    for path in paths:
        fetched = staged / path.lstrip("/")
        if not fetched.is_file():
            continue  # secrets of kind "files": already in place, never fetched
        live = ROOT / path.lstrip("/")
        replaced[path] = live.read_bytes() if live.is_file() else None
        live.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fetched.chmod(0o600)
        os.replace(fetched, live)
    return replaced


def put_back_secrets(replaced: dict[str, bytes | None]) -> None:
    for path, content in replaced.items():
        live = ROOT / path.lstrip("/")
        if content is None:
            live.unlink(missing_ok=True)
            continue
        tmp = live.with_name(f".{live.name}.kimi-tmp")
        tmp.touch(mode=0o600)
        tmp.chmod(0o600)
        tmp.write_bytes(content)
        tmp.replace(live)


def record_status(action: str, lib: Path, **fields) -> None:
    """The node status, through the node_status.py in `lib` (the staged release's: it knows the
    fields this applier writes; every release ships it beside this file)."""
    sys.path.insert(0, str(lib))
    try:
        import node_status
        getattr(node_status, action)(**fields)
    except (ImportError, AttributeError, OSError) as error:
        log(f"status: could not record {action}: {error}")
    finally:
        sys.path.pop(0)


def apply_in_place(bundle: dict, digest: str, previous: str, args) -> None:
    staged = STATE / "staging" / digest
    write_files(bundle, staged)
    # A host's new secrets wait under the stage like an AWS node's fetched ones: the serving
    # release keeps its key until the swap, and gets it back if the new release fails.
    take_incoming_secrets(args.secrets_from, staged, staged)
    release = (staged / RELEASE_FILE).read_text().strip()
    dropped = dropped_paths(bundle)
    saved = snapshot(bundle, dropped)
    rollbacks = STATE / "rollback"
    rollbacks.mkdir(parents=True, exist_ok=True)
    (rollbacks / f"{previous}.json").write_text(json.dumps(saved))
    for old in sorted(rollbacks.glob("*.json"), key=lambda p: p.stat().st_mtime)[:-ROLLBACKS_KEPT]:
        old.unlink()
    stack = json.loads((staged / STACK_JSON).read_text())
    engines = [engine["index"] for engine in stack["engines"]]
    ready_file = ROOT / stack["ready_file"].lstrip("/")
    # A replaced peer (its new address in this release) boots cold: this rank waits for it.
    peers = new_peers(staged, ROOT)
    budget = args.admission_budget if args.admission_budget is not None else admission_budget(staged, peers)
    terms = "--admission-budget" if args.admission_budget is not None else budget_terms(peers)
    log(f"release {release} (bundle {digest[:16]}): staged; preparing while the current release serves")
    replaced_secrets: dict[str, bytes | None] = {}
    swapped = False
    try:
        prepare(staged, args.pointer_wait, args.retry_delay)
        unready(ready_file)
        swapped = True
        serving_secrets = secret_paths(ROOT)
        written = write_files(bundle)
        replaced_secrets = take_secrets(staged, secret_paths(staged), serving_secrets)
        log(f"release {release} (bundle {digest[:16]}): {len(written)} file(s) changed; waiting up to "
            f"{budget:.0f} s for the node to admit it ({terms})")
        rerun_bootstrap(False)
        remove_paths(dropped)  # after the bootstrap stopped what used them
        wait_admitted(release, ready_file, engines, budget, args.admission_poll, terms)
    except (ReleaseFailed, RuntimeError) as error:
        tail = error.log_tail if isinstance(error, ReleaseFailed) else []
        node = socket.gethostname()
        record_status("record_release_failure", staged / LIB_DIR, release=release, bundle=digest, reason=str(error),
                      log_tail=tail, node=node)
        if not swapped:  # nothing went live: the current release never stopped serving
            log(f"release {release} failed on node {node} before the swap: {error}; the current release serves on")
            raise RuntimeError(f"release {release} failed on node {node}: {error}") from None
        log(f"release {release} failed on node {node}: {error}; restoring bundle {previous[:16]}")
        restore(saved)
        put_back_secrets(replaced_secrets)
        try:
            unready(ready_file)
            rerun_bootstrap(False)
            back = (ROOT / RELEASE_FILE).read_text().strip()
            back_engines = [engine["index"] for engine in json.loads((ROOT / STACK_JSON).read_text())["engines"]]
            wait_admitted(back, ready_file, back_engines, budget, args.admission_poll)
            log(f"release {back} restored and admitted again")
        except (ReleaseFailed, RuntimeError) as restore_error:
            log(f"restoring bundle {previous[:16]} did not bring the node back: {restore_error}")
        raise RuntimeError(f"release {release} failed on node {node}: {error}") from None
    else:
        record_status("clear_release_failure", staged / LIB_DIR)  # an earlier failure no longer stands
    finally:
        subprocess.run(["rm", "-rf", str(staged)], check=False)
    log(f"release {release} admitted")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="apply_release.py")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pointer", help="the SSM parameter naming the release bundle (AWS nodes)")
    source.add_argument("--bundle-file", type=Path,
                        help="a bundle already on this node (an existing host: the deployer copies it over SSH); "
                             "needs --expect")
    parser.add_argument("--region")
    parser.add_argument("--expect")
    parser.add_argument("--secrets-from", type=Path,
                        help="a root-only directory of secret files the deployer copied (an existing host): "
                             "they go live with the release that names them, and back out with it")
    parser.add_argument("--boot", action="store_true")
    parser.add_argument("--pointer-wait", type=float, default=POINTER_WAIT_SECONDS,
                        help="seconds to keep retrying transient AWS errors")
    parser.add_argument("--retry-delay", type=float, default=RETRY_FIRST_DELAY_SECONDS,
                        help="the first retry's delay (it doubles, with jitter)")
    parser.add_argument("--admission-budget", type=float,
                        help="seconds to wait for the node to admit an in-place release "
                             "(default: the expected warm start plus a margin)")
    parser.add_argument("--admission-poll", type=float, default=ADMISSION_POLL_SECONDS)
    args = parser.parse_args(argv)
    if args.pointer and not args.region:
        parser.error("--pointer needs --region")
    if args.bundle_file and not args.expect:
        parser.error("--bundle-file needs --expect (the bundle's SHA-256)")
    STATE.mkdir(parents=True, exist_ok=True)
    with (STATE / "apply-release.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # cloud-init and the association may both apply at boot
        try:
            if args.bundle_file:
                digest = args.expect
                bundle = read_bundle_file(args.bundle_file, digest)
            else:
                uri, digest = retrying("release pointer", lambda: read_pointer(args.pointer, args.region),
                                       args.pointer_wait, args.retry_delay)
                if args.expect and digest != args.expect:
                    if not args.boot:
                        raise Refused(f"pointer {args.pointer} names bundle {digest}, expected {args.expect}")
                    log(f"pointer names bundle {digest[:16]}; this node's template names {args.expect[:16]}: "
                        "booting that one by its digest")
                    uri, digest = bundle_uri(uri, args.expect), args.expect
                bundle = retrying(f"release bundle {digest[:16]}", lambda: fetch(uri, digest, args.region),
                                  args.pointer_wait, args.retry_delay)
            applied = STATE / "applied-release"
            previous = applied.read_text().strip() if applied.exists() else None
            live_release = ROOT / RELEASE_FILE
            if (previous is None and not args.boot and live_release.is_file()
                    and live_release.read_text() != bundle_file(bundle, "/" + RELEASE_FILE)):
                # Another release's node files with no applied release on record (a host set up
                # before the bundle applier): it serves, so it is kept and comes back if the new
                # one fails. (The same release's files are a first install that failed: retried.)
                previous = UNRECORDED_RELEASE
            if args.boot or previous is None or previous == digest:
                # Nothing serves yet (or this release already does): no old release to keep.
                dropped = dropped_paths(bundle)
                written = write_files(bundle)
                log(f"release bundle {digest[:16]}: {len(written)} file(s) changed")
                remove_paths(dropped)
                take_incoming_secrets(args.secrets_from, ROOT, ROOT)
                rerun_bootstrap(args.boot)
            else:
                apply_in_place(bundle, digest, previous, args)
            applied.write_text(digest + "\n")
            (STATE / APPLIED_FILES).write_text(json.dumps(bundle_paths(bundle)) + "\n")
            clear_incoming_secrets(args.secrets_from)
        except (RuntimeError, ValueError, KeyError, OSError) as error:
            log(f"apply failed: {error}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
