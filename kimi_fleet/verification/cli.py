"""Command line for the verification suite (scripts/verify.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from kimi_fleet import catalog
from kimi_fleet.endpoint_contract import RELEASE_HEADER, RELEASE_PATTERN, STATUS_PATH

from .checks import CHECKS
from .client import HEALTH_TIMEOUT, CheckFailed, Endpoint
from .k2vv import run_k2vv
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
    parser.add_argument("--api-key", default=os.environ.get("KIMI_API_KEY"),
                        help="default: $KIMI_API_KEY (keeps the key off the command line)")
    parser.add_argument("--previous-api-key", default=os.environ.get("KIMI_API_KEY_PREVIOUS"),
                        help="during a key rotation, the key clients used before: the auth check wants 200 with it "
                             "too (default: $KIMI_API_KEY_PREVIOUS; unset: not checked)")
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--engine", choices=ENGINES, default=catalog.VERIFY_DEFAULT_ENGINE,
                        help="the engine behind the endpoint (its reasoning field and health route; default %(default)s)")
    parser.add_argument("--engine-release", metavar="VERSION",
                        help="the engine release the stack pins: named when a known bug's symptom shows")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), metavar="CHECK", help=f"subset of {list(CHECKS)}")
    parser.add_argument("--json", type=Path, metavar="REPORT", help="write a JSON report here")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per HTTP request")
    parser.add_argument("--load", type=int, default=0, metavar="N", help="also run N concurrent streams")
    parser.add_argument("--ca-cert", metavar="PEM", help="trust this CA bundle instead of the system's")
    parser.add_argument("--wait-ready", type=float, default=0, metavar="S",
                        help="first wait up to S seconds for the endpoint to answer /v1/models (model load)")
    parser.add_argument("--context", type=int, metavar="TOKENS",
                        help="the context the stack promises: compared with max_model_len and proven by one "
                             "long prompt (the context check)")
    parser.add_argument("--concurrency", type=int, default=16, metavar="N",
                        help="sampled requests in flight at once (the stack's concurrent sequences)")
    parser.add_argument("--health-timeout", type=float, default=HEALTH_TIMEOUT, metavar="S",
                        help="seconds for the health route and its tiny completion")
    parser.add_argument("--release", metavar="ID",
                        help="the release the endpoint must serve (the proxy's X-Kimi-Fleet-Release): "
                             "--wait-ready waits until it does, and any answer from another release fails")
    parser.add_argument("--replicas", type=int, default=1, metavar="N",
                        help="replicas behind the endpoint: --wait-ready confirms the release on "
                             f"{RELEASE_CONFIRMATIONS_PER_REPLICA} x N fresh connections in a row")
    parser.add_argument("--usd-per-hour", type=float, metavar="USD",
                        help="what the endpoint costs per hour: with --load, the measured throughput is "
                             "also priced in $ per million output tokens")
    parser.add_argument("--k2vv", type=int, metavar="N",
                        help="instead of the suite: N tool-call requests scored the K2-Vendor-Verifier way "
                             "(trigger rate, schema accuracy) for drift checks")
    return parser


#: Fresh connections in a row that must all answer from the expected release, per replica: behind a
#: load balancer each new connection may land on another replica (NLB hashes the flow).
RELEASE_CONFIRMATIONS_PER_REPLICA = 4


@dataclass
class Readiness:
    ready: bool
    #: the release the last 200 answer carried ("" when unstamped, None when nothing answered 200)
    last_release: str | None = None
    #: the node said the awaited release failed there and went back ("release X failed on node Y: why")
    failure: str | None = None


def wait_until_ready(base_url: str, api_key: str, deadline_seconds: float, verify, *, release: str | None = None,
                     replicas: int = 1) -> Readiness:
    """Poll the models list until it answers 200 (a fresh node downloads and loads 595 GB first) and,
    with `release`, until enough fresh connections in a row answer from that release: a rollout is
    done only when no replica serves the old one."""
    deadline = time.monotonic() + deadline_seconds
    needed = RELEASE_CONFIRMATIONS_PER_REPLICA * replicas if release else 1
    confirmed, last_release, shown = 0, None, None
    while True:
        try:
            response = httpx.get(f"{base_url.rstrip('/')}/models", headers={"Authorization": f"Bearer {api_key}"},
                                 timeout=10, verify=verify)
            if response.status_code == 200:
                last_release = response.headers.get(RELEASE_HEADER, "")
                confirmed = confirmed + 1 if release is None or last_release == release else 0
                if confirmed >= needed:
                    return Readiness(True, last_release)
                if confirmed:
                    continue  # the next fresh connection at once
            else:
                confirmed = 0
        except httpx.HTTPError:
            confirmed = 0
        status = fetch_node_status(base_url, api_key, verify)
        failure = release_failure(status, release)
        if failure:  # the node rolled it back: waiting longer cannot see it
            return Readiness(False, last_release, failure)
        line = node_status_line(status, time.time())
        if line and line != shown:
            print(f"verify.py: {line}", flush=True)
            shown = line
        if time.monotonic() >= deadline:
            return Readiness(False, last_release)
        time.sleep(min(15.0, max(0.0, deadline - time.monotonic())))


def fetch_node_status(base_url: str, api_key: str, verify) -> dict | None:
    """The node's cold-start status (the proxy serves it behind the key), or None."""
    origin = base_url.rstrip("/").removesuffix("/v1")
    try:
        response = httpx.get(f"{origin}{STATUS_PATH}", headers={"Authorization": f"Bearer {api_key}"},
                             timeout=10, verify=verify)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def release_failure(status: dict | None, release: str | None) -> str | None:
    """"release X failed on node Y: why", then the engine's last log lines, when the node's status
    names the awaited release as failed (apply_release.py restored the previous one)."""
    if not release or not isinstance(status, dict) or status.get("failed_release") != release:
        return None
    lines = [f"release {release} failed on node {status.get('node') or '(unknown)'}: "
             f"{status.get('reason') or 'no reason recorded'}"]
    tail = status.get("engine_log_tail")
    if isinstance(tail, list) and tail:
        lines.append("engine log (last lines):")
        lines += [f"  {line}" for line in tail if isinstance(line, str)]
    return "\n".join(lines)


PHASE_WORDS = {"packages": "installing packages", "verify": "verifying the weights", "loading": "engines loading",
               "verifying": "the node runs the verification suite against itself", "ready": "ready", "failed": "bootstrap FAILED (see /var/log/kimi-fleet/bootstrap.log on the node)"}


MEASURED_PREFIX = "time to ready (measured on the node):"
THROUGHPUT_PREFIX = "throughput (measured by the gate):"


def measured_throughput(report_document: dict, usd_per_hour: float | None) -> dict | None:
    """The load check's aggregate output tok/s at its concurrency, priced when the hour's cost is known."""
    load = next((c for c in report_document.get("checks", []) if c.get("name") == "load"), None)
    details = (load or {}).get("details") or {}
    rate = details.get("aggregate_output_tokens_per_s")
    if not load or load.get("status") != "pass" or not rate:
        return None
    measured = {"output_tokens_per_second": rate, "concurrency": details.get("requests")}
    if usd_per_hour:
        measured["usd_per_million_output_tokens"] = round(usd_per_hour / (rate * 3600 / 1e6), 2)
    return measured


def throughput_line(measured: dict) -> str:
    price = measured.get("usd_per_million_output_tokens")
    priced = f", ${price:,.2f} per million output tokens" if price is not None else ""
    return (f"{THROUGHPUT_PREFIX} {measured['output_tokens_per_second']:g} output tok/s at concurrency "
            f"{measured['concurrency']}{priced}")


def measured_time_to_ready(status: dict | None) -> dict | None:
    """Seconds per phase the node recorded, and from its first phase to ready; None before ready."""
    if not isinstance(status, dict):
        return None
    phases = status.get("phases") or {}
    ready = (phases.get("ready") or {}).get("started")
    starts = [p.get("started") for p in phases.values() if isinstance(p, dict) and isinstance(p.get("started"), (int, float))]
    if not isinstance(ready, (int, float)) or not starts:
        return None
    measured = {f"{name}_seconds": round(phase["ended"] - phase["started"])
                for name, phase in phases.items()
                if isinstance(phase, dict) and isinstance(phase.get("ended"), (int, float))
                and isinstance(phase.get("started"), (int, float))}
    measured["total_seconds"] = round(ready - min(starts))
    return measured


def measured_line(measured: dict) -> str:
    parts = [f"{key.removesuffix('_seconds')} {value / 60:.1f} min" for key, value in measured.items()]
    return f"{MEASURED_PREFIX} {', '.join(parts)}"


def node_status_line(status: dict | None, now: float) -> str | None:
    """One line for the person watching `pulumi up`, e.g. "node: downloading 312/595 GB at
    2.4 GB/s, about 2 min left"."""
    if not isinstance(status, dict):
        return None
    refused = status.get("refused")
    if isinstance(refused, dict) and refused.get("reason"):  # what is wrong comes before how far it got
        return f"node: {refused.get('by') or 'the node'} refused to start: {refused['reason']}"
    if not status.get("phase"):
        return None
    phase = status["phase"]
    if phase == "download":
        progress = status.get("download") or {}
        line = f"node: downloading {progress.get('bytes', 0) / 1e9:,.0f}/{progress.get('total_bytes', 0) / 1e9:,.0f} GB"
        if progress.get("bytes_per_second"):
            line += f" at {progress['bytes_per_second'] / 1e9:.1f} GB/s"
        if progress.get("eta_seconds") is not None:
            line += f", about {max(1, -(-int(progress['eta_seconds']) // 60))} min left"
        return line
    started = ((status.get("phases") or {}).get(phase) or {}).get("started")
    elapsed = f" for {max(0, int(now - started)) // 60} min" if isinstance(started, (int, float)) else ""
    return f"node: {PHASE_WORDS.get(phase, phase)}{elapsed}"





def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.api_key:
        print("verify.py: error: give --api-key or set KIMI_API_KEY", file=sys.stderr)
        return EXIT_USAGE
    if args.ca_cert and not Path(args.ca_cert).is_file():
        print(f"verify.py: error: --ca-cert {args.ca_cert} is not a file", file=sys.stderr)
        return EXIT_USAGE

    if args.release is not None and not RELEASE_PATTERN.fullmatch(args.release):
        print(f"verify.py: error: --release {args.release!r} is not a 16-hex release id", file=sys.stderr)
        return EXIT_USAGE
    if args.wait_ready:
        readiness = wait_until_ready(args.base_url, args.api_key, args.wait_ready, args.ca_cert or True,
                                     release=args.release, replicas=args.replicas)
        if not readiness.ready:
            if readiness.failure:
                print(f"verify.py: {readiness.failure}", file=sys.stderr)
                return EXIT_FAILED
            if readiness.last_release is None:
                why = (f"{args.base_url}/models never answered 200 "
                       "(see /var/log/kimi-fleet/bootstrap.log on the node)")
            else:
                why = (f"it still answers from release {readiness.last_release or '(unstamped)'}, not "
                       f"{args.release}: the new release has not reached every replica")
            print(f"verify.py: endpoint not ready after {args.wait_ready:.0f}s: {why}", file=sys.stderr)
            return EXIT_FAILED
    if args.k2vv is not None:
        return _k2vv(args)
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
            context=args.context,
            concurrency=args.concurrency,
            health_timeout=args.health_timeout,
            release=args.release,
            engine_release=args.engine_release,
            previous_api_key=args.previous_api_key,
            on_result=lambda result: print(table_row(result), flush=True),
        )
    except ValueError as error:
        print(f"verify.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE

    print("\n" + format_table(report))
    document = report.to_dict()
    measured = measured_time_to_ready(fetch_node_status(args.base_url, args.api_key, args.ca_cert or True))
    if measured:
        print(measured_line(measured))
        document["time_to_ready_measured"] = measured
    throughput = measured_throughput(document, args.usd_per_hour)
    if throughput:
        print(throughput_line(throughput))
        document["throughput_measured"] = throughput
    if args.json:
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return EXIT_PASSED if report.passed else EXIT_FAILED


def _k2vv(args) -> int:
    endpoint = Endpoint(args.base_url.rstrip("/"), args.api_key, args.model, args.engine, args.timeout,
                        args.ca_cert or True, context=args.context, concurrency=args.concurrency,
                        engine_release=args.engine_release)
    try:
        result = run_k2vv(endpoint, args.k2vv)
    except ValueError as error:
        print(f"verify.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except CheckFailed as error:
        print(f"verify.py: k2vv run failed: {error.reason}".replace(args.api_key, "***"), file=sys.stderr)
        return EXIT_FAILED
    print("\n".join(result.lines()))
    if args.json:
        args.json.write_text(json.dumps({**result.__dict__, "schema_accuracy": result.schema_accuracy}, indent=2) + "\n")
    return EXIT_PASSED


if __name__ == "__main__":  # python -m kimi_fleet.verification.cli (a node's own admission run)
    sys.exit(main())
