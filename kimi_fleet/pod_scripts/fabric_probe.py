#!/usr/bin/env python3
"""The fabric check of one pod of a multi-node replica (Kubernetes): which transport NCCL chose in
every process of this rank's engine, from the log files NCCL writes (NCCL_DEBUG_FILE=DIR/%h.%p.log
on a volume the engine shares with this container), read as one log by fabric_check.py (shipped
beside this file: the verdict and its words are the nodes').

usage: fabric_probe.py TRANSPORTS_JSON LOG_DIR             (the readiness probe)
       fabric_probe.py --watch SECONDS TRANSPORTS_JSON LOG_DIR  (the container: logs each new verdict)
The rank is LWS_WORKER_INDEX (LeaderWorkerSet sets it in every container of the group: 0 is the
leader). Exit: fabric_check's (0 a fabric, 1 TCP sockets, 3 NCCL has not said yet); --watch never
exits (a container that ended would recreate the whole group).

The logs are the current engine's only: a container that restarts recreates the group
(RecreateGroupOnPodRestart), so the pod and its log volume are new with every start.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fabric_check import EXIT_FABRIC, EXIT_SOCKET, EXIT_UNKNOWN, classify, verdict_line  # noqa: E402

RANK_ENV = "LWS_WORKER_INDEX"


def check(transports_file: str, log_dir: str) -> tuple[int, str]:
    """(exit code, verdict line) over every NCCL log file in log_dir."""
    transports = json.loads(Path(transports_file).read_text())
    rank = int(os.environ.get(RANK_ENV, "0"))
    logs = "\n".join(path.read_text(errors="replace") for path in sorted(Path(log_dir).glob("*"))
                     if path.is_file())
    verdict = classify(logs, transports["fabric"], transports["socket"])
    code = {"socket": EXIT_SOCKET, "unknown": EXIT_UNKNOWN}.get(verdict.transport, EXIT_FABRIC)
    return code, verdict_line(rank, verdict)


def watch(period: float, transports_file: str, log_dir: str, *, rounds: int = 0, sleep=time.sleep) -> int:
    last, done = None, 0
    while not rounds or done < rounds:
        done += 1
        try:
            _, line = check(transports_file, log_dir)
        except (OSError, ValueError) as error:  # never end: this container's restart would recreate the group
            line = f"fabric check cannot read the NCCL logs: {error}"
        if line != last:
            print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} [kimi-fabric] {line}", flush=True)
            last = line
        sleep(period)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "--watch":
        return watch(float(argv[1]), argv[2], argv[3])
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    code, line = check(*argv)
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
