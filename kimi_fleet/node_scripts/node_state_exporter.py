#!/usr/bin/env python3
"""kimi-fleet node-state exporter (kimi-node-state.service): the node's release and admission as
Prometheus metrics, on loopback only, read from the files the node already writes:

  kimi_fleet_release_info{release="<id>"} 1   the release file (/etc/kimi-fleet/release)
  kimi_fleet_node_admitted 0|1                 the ready file holds this release (the watchdog wrote it
                                               after real generations through the node's own Caddy)
  kimi_fleet_engine_up{engine="<index>"} 0|1   the watchdog's last verdict on the engine (node status
                                               "health"): serving or busy
  kimi_fleet_gate_passed 0|1                   the node's last self-verification (the admission report:
                                               every check it ran passed); absent until there is one
  kimi_fleet_node_draining 0|1                 the node is draining before a scale-in (drain.py)

Every read is at scrape time: nothing is cached, so a metric is never older than its file.

usage: node_state_exporter.py [--port PORT]    (binds 127.0.0.1 only; paths under $KIMI_ROOT)
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(os.environ.get("KIMI_ROOT", "/"))
LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 9183
STACK_JSON = ROOT / "etc/kimi-fleet/stack.json"
RELEASE = ROOT / "etc/kimi-fleet/release"
STATUS = ROOT / "run/kimi-fleet/status.json"
#: Verdicts under which an engine serves (the watchdog's words).
UP_VERDICTS = ("serving", "busy")
_RELEASE_ID = re.compile(r"^[0-9a-f]{8,64}$")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def gate_passed(report: Path) -> bool | None:
    """The admission report of the node's last self-verification: every check passed, none failed.
    None while there is none (a node still loading, or a run under way: the suite removes the last
    report when it starts): not verified yet is not failed, so no sample at all."""
    if not report.exists():
        return None
    checks = _json(report).get("checks")
    if not isinstance(checks, list) or not checks:
        return False
    statuses = [c.get("status") for c in checks if isinstance(c, dict)]
    return "fail" not in statuses and "pass" in statuses and all(s in ("pass", "skip") for s in statuses)


def render() -> str:
    stack = _json(STACK_JSON)
    release = _read(RELEASE)
    lines = ["# HELP kimi_fleet_release_info The release this node runs (its id in the label).",
             "# TYPE kimi_fleet_release_info gauge"]
    if release and _RELEASE_ID.match(release):
        lines.append(f'kimi_fleet_release_info{{release="{release}"}} 1')
    ready_file = ROOT / str(stack.get("ready_file", "run/kimi-fleet/ready")).lstrip("/")
    admitted = bool(release) and _read(ready_file) == release
    draining_file = ROOT / str((stack.get("drain") or {}).get("file", "run/kimi-fleet/draining")).lstrip("/")
    health = _json(STATUS).get("health") or {}
    verdicts = health.get("engines") or {}
    report = ROOT / str((stack.get("admission") or {}).get("report", "var/lib/kimi-fleet/admission.json")).lstrip("/")
    lines += ["# HELP kimi_fleet_node_admitted 1 when the node's ready file names its release (admitted by real generations).",
              "# TYPE kimi_fleet_node_admitted gauge", f"kimi_fleet_node_admitted {int(admitted)}",
              "# HELP kimi_fleet_engine_up 1 when the watchdog's last verdict on the engine is serving or busy.",
              "# TYPE kimi_fleet_engine_up gauge"]
    for engine in stack.get("engines", []):
        index = int(engine["index"])
        verdict = (verdicts.get(f"kimi-engine@{index}.service") or {}).get("verdict")
        lines.append(f'kimi_fleet_engine_up{{engine="{index}"}} {int(verdict in UP_VERDICTS)}')
    passed = gate_passed(report)
    lines += ["# HELP kimi_fleet_gate_passed 1 when the node's last self-verification passed every check.",
              "# TYPE kimi_fleet_gate_passed gauge",
              *([f"kimi_fleet_gate_passed {int(passed)}"] if passed is not None else []),
              "# HELP kimi_fleet_node_draining 1 while the node drains before a scale-in.",
              "# TYPE kimi_fleet_node_draining gauge", f"kimi_fleet_node_draining {int(draining_file.exists())}"]
    return "\n".join(lines) + "\n"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404)
            return
        body = render().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    server = http.server.ThreadingHTTPServer((LOOPBACK, args.port), Handler)
    print(f"kimi-node-state: serving on {LOOPBACK}:{server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
