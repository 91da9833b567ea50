#!/usr/bin/env python3
"""Measure the verification suite's own overhead against the fake engine behind a real Caddy.

The checks run concurrently, so the suite should take about as long as its slowest check;
this prints, per run, the wall time, the slowest check and the difference, then mean per-check
times. A benchmark, not a test:

    python scripts/bench_verify.py [--runs 5] [--load 0] [--engine vllm]
"""

import argparse
import statistics
import sys
from pathlib import Path

# Runnable from a checkout: the package and the test harness live in the repo.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_fleet import catalog  # noqa: E402
from kimi_fleet.verification import run_suite  # noqa: E402
from tests.fakes.harness import start_proxied_engine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--load", type=int, default=0, help="also run the load check with N streams")
    parser.add_argument("--engine", choices=tuple(catalog.ENGINES), default=catalog.VERIFY_DEFAULT_ENGINE)
    args = parser.parse_args()

    per_check: dict[str, list[float]] = {}
    overheads = []
    with start_proxied_engine("good", engine=args.engine) as endpoint:
        print(f"{'run':>3} {'wall s':>8} {'slowest check':>22} {'overhead s':>11}  passed")
        for run in range(1, args.runs + 1):
            report = run_suite(
                endpoint.base_url, endpoint.api_key, endpoint.model, engine=args.engine,
                load=args.load, timeout=60, verify=str(endpoint.caddy.root_ca),
            )
            slowest = max(report.checks, key=lambda check: check.seconds)
            overhead = report.wall_seconds - slowest.seconds
            overheads.append(overhead)
            for check in report.checks:
                per_check.setdefault(check.name, []).append(check.seconds)
            slowest_label = f"{slowest.name} {slowest.seconds:.3f}"
            print(f"{run:>3} {report.wall_seconds:>8.3f} {slowest_label:>22} {overhead:>11.3f}  {report.passed}")

    print(f"\noverhead (wall - slowest check): mean {statistics.mean(overheads):.3f}s, max {max(overheads):.3f}s")
    print(f"\n{'check':<10} {'mean s':>8} {'max s':>8}")
    for name, seconds in sorted(per_check.items(), key=lambda item: -statistics.mean(item[1])):
        print(f"{name:<10} {statistics.mean(seconds):>8.3f} {max(seconds):>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
