"""Command line for the verification suite (scripts/verify.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checks import CHECKS
from .report import format_table, table_header, table_row
from .runner import DEFAULT_TIMEOUT, ENGINES, run_suite

EXIT_PASSED, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="verify.py",
        description="Verify a deployed Kimi-K2.6 OpenAI-compatible endpoint. Exit 0: every check passed, "
        "1: a check failed, 2: bad usage.",
    )
    parser.add_argument("--base-url", required=True, help="OpenAI base URL, ending in /v1")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--engine", choices=ENGINES, default="vllm")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), metavar="CHECK", help=f"subset of {list(CHECKS)}")
    parser.add_argument("--json", type=Path, metavar="REPORT", help="write a JSON report here")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per HTTP request")
    parser.add_argument("--load", type=int, default=0, metavar="N", help="also run N concurrent streams")
    parser.add_argument("--ca-cert", metavar="PEM", help="trust this CA bundle instead of the system's")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.ca_cert and not Path(args.ca_cert).is_file():
        print(f"verify.py: error: --ca-cert {args.ca_cert} is not a file", file=sys.stderr)
        return EXIT_USAGE

    print(table_header(), flush=True)
    try:
        report = run_suite(
            args.base_url,
            args.api_key,
            args.model,
            engine=args.engine,
            only=args.only,
            timeout=args.timeout,
            load=args.load,
            verify=args.ca_cert or True,
            on_result=lambda result: print(table_row(result), flush=True),
        )
    except ValueError as error:
        print(f"verify.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE

    print("\n" + format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return EXIT_PASSED if report.passed else EXIT_FAILED
