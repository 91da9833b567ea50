#!/usr/bin/env python3
"""Which transport a multi-node replica's collectives ride, from NCCL's own log (NCCL_DEBUG=INFO).

Without the fabric's plugin NCCL silently falls back to TCP sockets and the replica runs an order
of magnitude slower, with nothing else failing: admission (and the gate, through the node status)
must fail on it, naming the rank. Standard library only: it runs on nodes.

usage: fabric_check.py TRANSPORTS_JSON RANK LOG_FILE
  TRANSPORTS_JSON  {"fabric": {"<NCCL's words>": "<fabric>", ...}, "socket": ["<NCCL's words>", ...]}
                   (the catalog's NCCL_FABRIC_TRANSPORTS and NCCL_SOCKET_TRANSPORTS, rendered for the node)
  RANK             the node's rank in its replica (named in every verdict)
  LOG_FILE         the engine's log since it last started (its current invocation only:
                   journalctl _SYSTEMD_INVOCATION_ID=<id> -o cat; an older run's lines would decide
                   for this one), '-' for standard input
Prints one line. Exit 0: a fabric carries the collectives; 1: TCP sockets (refuse); 3: NCCL has not
said yet (keep waiting: the engine has not set up its communicators).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

EXIT_FABRIC, EXIT_SOCKET, EXIT_UNKNOWN = 0, 1, 3


class Verdict(NamedTuple):
    transport: str  # a fabric ("efa", "infiniband"), "socket", or "unknown"
    evidence: str  # the log line that says so ("" when unknown)


def classify(log: str, fabric: dict[str, str], socket: list[str]) -> Verdict:
    """Sockets anywhere win: one communicator on TCP slows the whole replica to its pace."""
    lines = log.splitlines()
    for line in lines:
        if any(words in line for words in socket):
            return Verdict("socket", line.strip())
    for line in lines:
        for words, kind in fabric.items():
            if words in line:
                return Verdict(kind, line.strip())
    return Verdict("unknown", "")


def verdict_line(rank: int, verdict: Verdict) -> str:
    if verdict.transport == "socket":
        return (f"rank {rank}: NCCL runs over TCP sockets, not the fabric ({verdict.evidence}): the replica would "
                "serve an order of magnitude slower; check the fabric plugin (aws-ofi-nccl / the IB driver) in "
                "the engine image and its devices")
    if verdict.transport == "unknown":
        return f"rank {rank}: NCCL has not named its transport yet (NCCL_DEBUG=INFO; the communicators are not up)"
    return f"rank {rank}: NCCL over {verdict.transport} ({verdict.evidence})"


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: fabric_check.py TRANSPORTS_JSON RANK LOG_FILE", file=sys.stderr)
        return 2
    transports = json.loads(Path(argv[0]).read_text())
    rank = int(argv[1])
    log = sys.stdin.read() if argv[2] == "-" else Path(argv[2]).read_text(errors="replace")
    verdict = classify(log, transports["fabric"], transports["socket"])
    print(verdict_line(rank, verdict))
    return {"socket": EXIT_SOCKET, "unknown": EXIT_UNKNOWN}.get(verdict.transport, EXIT_FABRIC)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
