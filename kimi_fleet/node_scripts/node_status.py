#!/usr/bin/env python3
"""The node's cold start, as data: which phase it is in, since when, and the download's progress.

The bootstrap and the watchdog record phases; during the download a sampler measures the
weights directory every few seconds. The file is world-readable (the proxy serves it, behind the
key, at /kimi-fleet/status) and holds no secret.

usage: node_status.py phase NAME              start phase NAME (the previous one ends now)
       node_status.py watch-download DIR TOTAL_BYTES [INTERVAL]   sample until killed
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
