#!/usr/bin/env python3
"""Run the project's verification suite against an endpoint's own proxy and judge it (standard
library only): the node's watchdog and a Kubernetes pod's admission container both admit by it.

    admission.py --base-url http://127.0.0.1:9180 --model M --engine E --checks a b c \\
        --release ID --suite-path DIR --python PY --report FILE [--timeout S] [--concurrency N] \\
        [--deadline S]

Passed means: the suite exited 0 and its report shows every requested check passed and none
failed (the suite adds a `release` check of its own: every answer from this release). The suite
is the shipped copy in --suite-path, run from that directory so nothing else of the project is
imported. The key comes from KIMI_API_KEY. Exit 0 passed, 1 failed (the reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _checks(report: Path) -> list[dict]:
    try:
        return list(json.loads(report.read_text()).get("checks", []))
    except (OSError, ValueError):
        return []


def run_suite(*, base_url: str, model: str, engine: str, checks: list[str], release: str, suite_path: str,
              python: str, report: Path, key: str, timeout: float, concurrency: int,
              deadline: float, dependencies: str | None = None) -> tuple[bool, str]:
    """(passed, what to log). `dependencies`: a directory holding the suite's packages, if not `python`'s own."""
    command = [python, "-m", "kimi_fleet.verification.cli", "--base-url", f"{base_url}/v1", "--model", model,
               "--engine", engine, "--only", *checks, "--timeout", str(timeout), "--concurrency", str(concurrency),
               "--release", release, "--json", str(report)]
    environment = {**os.environ, "KIMI_API_KEY": key,
                   "PYTHONPATH": os.pathsep.join(filter(None, [suite_path, dependencies]))}
    report.parent.mkdir(parents=True, exist_ok=True)
    report.unlink(missing_ok=True)  # this run's report, or none
    started = time.monotonic()
    try:
        run = subprocess.run(command, env=environment, capture_output=True, text=True, cwd=suite_path,
                             timeout=deadline)
    except subprocess.TimeoutExpired:
        return False, f"the verification suite did not finish in {deadline:.0f} s"
    results = _checks(report)
    statuses = {c.get("name"): c.get("status") for c in results}
    passed = all(statuses.get(name) == "pass" for name in checks) and "fail" not in statuses.values()
    if run.returncode != 0 or not passed:
        failed = "; ".join(f"{c['name']}: {c.get('status')}: {c.get('reason')}" for c in results
                           if c.get("status") != "pass")
        missing = [name for name in checks if name not in statuses]
        if missing:
            failed = "; ".join(filter(None, [failed, f"not run: {', '.join(missing)}"]))
        output = (run.stdout + run.stderr).strip()[-500:]
        return False, f"the verification suite failed ({failed or output or 'no report'})"
    return True, f"the verification suite passed in {time.monotonic() - started:.0f} s ({', '.join(checks)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("--base-url", "--model", "--engine", "--release", "--suite-path", "--python", "--report"):
        parser.add_argument(name, required=True)
    parser.add_argument("--checks", nargs="+", required=True)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--deadline", type=float, default=900)
    args = parser.parse_args()
    passed, message = run_suite(
        base_url=args.base_url, model=args.model, engine=args.engine, checks=args.checks, release=args.release,
        suite_path=args.suite_path, python=args.python, report=Path(args.report), key=os.environ["KIMI_API_KEY"],
        timeout=args.timeout, concurrency=args.concurrency, deadline=args.deadline)
    print(f"admission: {message}", file=sys.stderr if not passed else sys.stdout)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
