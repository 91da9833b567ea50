#!/usr/bin/env python3
"""One rank of a multi-node vLLM replica, as a test stand-in: it checks the rendezvous arguments the
node's rendered engine line gives it, meets the other rank over TCP at the leader's address (so the
addresses must really route between the two node roots), then writes the NCCL INFO lines a real
rank would (the transport the test chose) and, on the leader, serves the fake OpenAI engine.

usage: fake_rank.py --transport efa|socket [--serve-port N] -- ENGINE_ARGV...
Environment: what the rendered container gets (VLLM_HOST_IP, KIMI_REPLICA_PEERS, NCCL_DEBUG, ...).
Exit 2 with "fake-rank refused: ..." on stdout when an argument or the peer is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

RENDEZVOUS_SECONDS = 60
NCCL_LINES = {
    "efa": ["NCCL INFO NET/OFI Initializing aws-ofi-nccl 1.21.1",
            "NCCL INFO NET/OFI Selected provider is efa, fabric is efa (found 32 nics)",
            "NCCL INFO Using network Libfabric",
            "NCCL INFO Channel 00/0 : 7[7] -> 8[0] [send] via NET/Libfabric/0/GDRDMA"],
    "socket": ["NCCL INFO NET/Plugin: Could not find: libnccl-net.so",
               "NCCL INFO NET/Socket : Using [0]veth0:{host}<0>",
               "NCCL INFO Using network Socket"],
}


def refuse(why: str) -> None:
    print(f"fake-rank refused: {why}", flush=True)
    sys.exit(2)


def value(argv: list[str], flag: str) -> str:
    if flag not in argv:
        refuse(f"{flag} missing from the engine line")
    return argv[argv.index(flag) + 1]


def main() -> int:
    split = sys.argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=sorted(NCCL_LINES), required=True)
    parser.add_argument("--serve-port", type=int)
    args = parser.parse_args(sys.argv[1:split])
    engine = sys.argv[split + 1:]
    nodes, rank = int(value(engine, "--nnodes")), int(value(engine, "--node-rank"))
    leader, port = value(engine, "--master-addr"), int(value(engine, "--master-port"))
    world = int(value(engine, "--tensor-parallel-size")) * int(value(engine, "--pipeline-parallel-size"))
    own = os.environ.get("VLLM_HOST_IP") or refuse("VLLM_HOST_IP not set")
    peers = os.environ.get("KIMI_REPLICA_PEERS", "").split(",")
    if nodes != 2 or world != 16 or len(peers) != nodes or peers[rank] != own or peers[0] != leader:
        refuse(f"nodes {nodes}, world {world}, peers {peers}, rank {rank}, own {own}, leader {leader}")
    if ("--headless" in engine) != (rank > 0):
        refuse(f"rank {rank} {'without' if rank else 'with'} --headless")
    hello = {"rank": rank, "world": world, "nodes": nodes, "host": own}
    if rank == 0:
        with socket.create_server((leader, port)) as server:
            server.settimeout(RENDEZVOUS_SECONDS)
            connection, (peer, _) = server.accept()
            with connection:
                worker = json.loads(connection.makefile().readline())
                # The worker's claimed address must be the one its packets come from.
                ok = worker == {"rank": 1, "world": world, "nodes": nodes, "host": peer} and peer == peers[1]
                connection.sendall((json.dumps({"ok": ok, "leader": hello}) + "\n").encode())
            if not ok:
                refuse(f"worker said {worker} from {peer}")
    else:
        deadline = time.monotonic() + RENDEZVOUS_SECONDS
        while True:
            try:
                connection = socket.create_connection((leader, port), timeout=5, source_address=(own, 0))
                break
            except OSError as error:
                if time.monotonic() > deadline:
                    refuse(f"no rendezvous at {leader}:{port}: {error}")
                time.sleep(0.2)
        with connection:
            connection.sendall((json.dumps(hello) + "\n").encode())
            answer = json.loads(connection.makefile().readline())
        if not answer.get("ok"):
            refuse(f"the leader refused this rank: {answer}")
    for line in NCCL_LINES[args.transport]:
        print(f"{socket.gethostname()}:{os.getpid()}:0 [0] " + line.format(host=own), flush=True)
    if rank == 0 and args.serve_port:
        fake_engine = str(Path(__file__).with_name("fake_engine.py"))
        model = value(engine, "--served-model-name")
        os.execv(sys.executable, [sys.executable, fake_engine, "--port", str(args.serve_port), "--model", model,
                                  "--engine", "vllm"])
    while True:  # a headless worker runs until stopped
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
