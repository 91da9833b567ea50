"""Runs the selected checks concurrently against one endpoint and collects a Report."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Callable, Iterable

import httpx

from kimi_fleet import catalog
from kimi_fleet.endpoint_contract import RELEASE_HEADER

from .checks import CHECKS, Outcome, failed
from .client import HEALTH_TIMEOUT, CheckFailed, Endpoint, open_client
from .report import FAIL, PASS, SKIP, CheckResult, Report

ENGINES = tuple(catalog.ENGINES)
DEFAULT_TIMEOUT = 300.0  # per HTTP request: thinking answers on a busy engine take minutes
# Shorter "keys" (test placeholders) would turn redaction into mangling of ordinary words.
MIN_REDACTED_KEY_LENGTH = 8
#: Quick checks that run first; when `health` fails, the long checks are not sent to a hung engine.
PREFLIGHT = ("auth", "models", "health", "tls")


def select_checks(only: Iterable[str] | None, load: int) -> list[str]:
    """Checks to run, in table order; `load` runs only when a concurrency was given."""
    if only:
        names = list(dict.fromkeys(only))
        unknown = [name for name in names if name not in CHECKS]
        if unknown:
            raise ValueError(f"unknown check(s) {unknown}; known: {list(CHECKS)}")
        if "load" in names and load <= 0:
            raise ValueError("the load check needs a concurrency (--load N)")
        return [name for name in CHECKS if name in names]
    return [name for name in CHECKS if name != "load" or load > 0]


def _redact(value, secret: str):
    """Keep the API key out of anything printed or written."""
    if isinstance(value, str):
        return value.replace(secret, "***")
    if isinstance(value, dict):
        return {k: _redact(v, secret) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v, secret) for v in value]
    return value


async def _run_check(name: str, client: httpx.AsyncClient, endpoint: Endpoint) -> CheckResult:
    started = time.perf_counter()
    try:
        outcome = await CHECKS[name](client, endpoint)
    except CheckFailed as error:
        outcome = failed(error.reason, **error.details)
    except httpx.TimeoutException as error:
        outcome = failed(f"timed out after {endpoint.timeout:g}s ({type(error).__name__})")
    except httpx.HTTPError as error:
        outcome = failed(f"{type(error).__name__}: {error}")
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # malformed JSON, unexpected shape
        outcome = failed(f"unexpected response: {type(error).__name__}: {error}")
    except Exception as error:  # one broken check must not take the rest of the suite down
        outcome = failed(f"check crashed: {type(error).__name__}: {error}")
    seconds = time.perf_counter() - started
    if len(endpoint.api_key) >= MIN_REDACTED_KEY_LENGTH:
        outcome = Outcome(outcome.status, _redact(outcome.reason, endpoint.api_key), _redact(outcome.details, endpoint.api_key))
    # Details end up in a JSON report: make sure they serialize.
    details = json.loads(json.dumps(outcome.details, default=str))
    return CheckResult(name, outcome.status, outcome.reason, round(seconds, 3), details)


async def discover_max_model_len(client: httpx.AsyncClient, endpoint: Endpoint) -> int | None:
    """The context the engine serves, as both vLLM and SGLang report it in /v1/models."""
    try:
        response = await client.get(f"{endpoint.base_url}/models", headers=endpoint.auth_headers,
                                    timeout=endpoint.health_timeout)
        entries = response.json().get("data") or [] if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError, AttributeError):
        return None  # the models check reports what is wrong
    for entry in entries:
        if isinstance(entry, dict) and entry.get("id") == endpoint.model and isinstance(entry.get("max_model_len"), int):
            return entry["max_model_len"]
    return None


async def run_suite_async(
    base_url: str,
    api_key: str,
    model: str,
    *,
    engine: str = catalog.VERIFY_DEFAULT_ENGINE,
    only: Iterable[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    load: int = 0,
    verify: bool | str = True,
    context: int | None = None,
    concurrency: int = 16,
    health_timeout: float = HEALTH_TIMEOUT,
    release: str | None = None,
    engine_release: str | None = None,
    previous_api_key: str | None = None,
    on_result: Callable[[CheckResult], None] | None = None,
) -> Report:
    base_url = base_url.rstrip("/")
    if not base_url.startswith(("http://", "https://")) or not base_url.endswith("/v1"):
        raise ValueError(f"base_url must be an http(s) URL ending in /v1, got {base_url!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if timeout <= 0 or load < 0 or health_timeout <= 0:
        raise ValueError("timeouts must be positive and load non-negative")
    if concurrency < 1 or (context is not None and context < 1):
        raise ValueError("concurrency and context must be positive")
    names = select_checks(only, load)
    endpoint = Endpoint(base_url, api_key, model, engine, timeout, verify, load, context=context,
                        concurrency=concurrency, health_timeout=min(health_timeout, timeout),
                        engine_release=engine_release, previous_api_key=previous_api_key)

    started = time.perf_counter()
    results: dict[str, CheckResult] = {}

    def announce(result: CheckResult) -> None:
        results[result.name] = result
        if on_result:
            on_result(result)

    releases = ReleaseWatch(release) if release else None
    async with open_client(endpoint, on_response=releases.observe if releases else None) as client:

        async def run_and_announce(name: str) -> None:
            announce(await _run_check(name, client, endpoint))

        endpoint.max_model_len = await discover_max_model_len(client, endpoint)
        first = [name for name in names if name in PREFLIGHT]
        await asyncio.gather(*(run_and_announce(name) for name in first))
        rest = [name for name in names if name not in PREFLIGHT]
        if "health" in results and results["health"].status == FAIL:
            for name in rest:
                announce(CheckResult(name, SKIP, "not run: the health check failed", 0.0))
        else:
            await asyncio.gather(*(run_and_announce(name) for name in rest))
    ordered = [results[name] for name in names]
    if releases is not None:
        ordered.append(releases.result())
        if on_result:
            on_result(ordered[-1])
    return Report(base_url, model, engine, ordered, time.perf_counter() - started)


class ReleaseWatch:
    """Every proxied answer must come from the release the gate verifies: one from an older release
    (a replica the rollout has not reached) makes the run a failure, whatever the checks said."""

    def __init__(self, release: str):
        self.release = release
        self.answers = 0
        self.foreign: dict[str, int] = {}

    async def observe(self, response: httpx.Response) -> None:
        if response.status_code == 401:
            return  # refused by the proxy itself (the auth check): not stamped
        self.answers += 1
        served = response.headers.get(RELEASE_HEADER, "")
        if served != self.release:
            self.foreign[served or "(unstamped)"] = self.foreign.get(served or "(unstamped)", 0) + 1

    def result(self) -> CheckResult:
        if not self.foreign:
            return CheckResult("release", PASS, f"all {self.answers} answers from release {self.release}", 0.0)
        others = ", ".join(f"{count} from {served}" for served, count in sorted(self.foreign.items()))
        return CheckResult("release", FAIL, f"expected release {self.release} on every answer; {others} "
                           f"(of {self.answers}): a replica still serves another release", 0.0)


def run_suite(base_url: str, api_key: str, model: str, **options) -> Report:
    """Verify a deployed endpoint (options as for run_suite_async). `verify`: True (system CAs),
    False (no TLS verification) or the path of a CA bundle (PEM). Raises ValueError on bad arguments."""
    return asyncio.run(run_suite_async(base_url, api_key, model, **options))
