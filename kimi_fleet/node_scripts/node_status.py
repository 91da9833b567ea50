#!/usr/bin/env python3
"""The node's cold start, as data: which phase it is in, since when, and the download's progress.

The bootstrap and the watchdog record phases; during the download a sampler measures the
weights directory every few seconds. The file is world-readable (the proxy serves it, behind the
key, at /kimi-fleet/status) and holds no secret.

It also says what is wrong: a release that failed on this node and was rolled back
(`failed_release`, `reason`, `engine_log_tail`, `node`; written by apply_release.py) and the last
refusal to start (`refused`: who refused, why and what to do, in one line).

usage: node_status.py phase NAME              start phase NAME (the previous one ends now)
       node_status.py watch-download DIR TOTAL_BYTES [INTERVAL]   sample until killed
       node_status.py refuse WHO REASON        record a refusal to start (one line)
       node_status.py clear-refusal            a new attempt: the last refusal no longer holds
Paths are under $KIMI_ROOT when it is set (tests).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(os.environ.get("KIMI_ROOT", "/"))
STATUS = ROOT / "run/kimi-fleet/status.json"
PHASES = ("packages", "download", "verify", "loading", "verifying", "ready", "failed")


def read() -> dict:
    try:
        return json.loads(STATUS.read_text())
    except (OSError, ValueError):
        return {"phase": None, "phases": {}}


def write(status: dict) -> None:
    STATUS.parent.mkdir(parents=True, exist_ok=True)
    tmp = STATUS.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, sort_keys=True) + "\n")
    tmp.chmod(0o644)
    tmp.replace(STATUS)


def start_phase(name: str, now: float | None = None) -> dict:
    if name not in PHASES:
        raise SystemExit(f"node_status: unknown phase {name!r}; known: {', '.join(PHASES)}")
    now = time.time() if now is None else now
    status = read()
    if status.get("phase") == name:
        return status
    previous = status.get("phase")
    if previous in status["phases"]:
        status["phases"][previous]["ended"] = now
    status["phases"][name] = {"started": now}
    status["phase"] = name
    write(status)
    return status


#: The fields a rolled-back release leaves in the status (cleared by the next admitted release).
RELEASE_FAILURE_FIELDS = ("failed_release", "failed_bundle", "reason", "engine_log_tail", "node", "failed_at")


def record_release_failure(*, release: str, bundle: str, reason: str, log_tail: list[str], node: str,
                           now: float | None = None) -> dict:
    status = read()
    status.update(failed_release=release, failed_bundle=bundle, reason=reason, engine_log_tail=list(log_tail),
                  node=node, failed_at=time.time() if now is None else now)
    write(status)
    return status


def clear_release_failure() -> dict:
    status = read()
    if any(field in status for field in RELEASE_FAILURE_FIELDS):
        for field in RELEASE_FAILURE_FIELDS:
            status.pop(field, None)
        write(status)
    return status


def refuse(who: str, reason: str, now: float | None = None) -> dict:
    status = read()
    status["refused"] = {"by": who, "reason": " ".join(reason.split()), "at": time.time() if now is None else now}
    write(status)
    return status


def clear_refusal() -> dict:
    status = read()
    if status.pop("refused", None) is not None:
        write(status)
    return status


def directory_bytes(directory: Path) -> int:
    total = 0
    for folder, _, names in os.walk(directory):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass  # a file renamed or removed while we walk
    return total


def sample_download(directory: Path, total: int, previous: tuple[float, int] | None, now: float) -> tuple[float, int]:
    done = directory_bytes(directory)
    progress = {"bytes": done, "total_bytes": total}
    if previous is not None and now > previous[0]:
        rate = max(0.0, (done - previous[1]) / (now - previous[0]))
        progress["bytes_per_second"] = round(rate)
        if rate > 0:
            progress["eta_seconds"] = round(max(0, total - done) / rate)
    status = read()
    status["download"] = progress
    write(status)
    return now, done


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "phase":
        start_phase(argv[1])
        return 0
    if len(argv) == 3 and argv[0] == "refuse":
        refuse(argv[1], argv[2])
        return 0
    if argv == ["clear-refusal"]:
        clear_refusal()
        return 0
    if len(argv) in (3, 4) and argv[0] == "watch-download":
        directory, total = Path(argv[1]), int(argv[2])
        interval = float(argv[3]) if len(argv) == 4 else 10.0
        previous = None
        while True:
            previous = sample_download(directory, total, previous, time.time())
            time.sleep(interval)
    print(__doc__.split("usage:")[1].split("Paths")[0].rstrip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
