"""Runs the selected checks concurrently against one endpoint and collects a Report."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Callable, Iterable

import httpx

from .checks import CHECKS, Outcome, failed
from .client import CheckFailed, Endpoint, open_client
from .report import CheckResult, Report

ENGINES = ("vllm", "sglang")
DEFAULT_TIMEOUT = 300.0  # per HTTP request: thinking answers on a busy engine take minutes
# Shorter "keys" (test placeholders) would turn redaction into mangling of ordinary words.
MIN_REDACTED_KEY_LENGTH = 8


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


async def run_suite_async(
    base_url: str,
    api_key: str,
    model: str,
    *,
    engine: str = "vllm",
    only: Iterable[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    load: int = 0,
    verify: bool | str = True,
    on_result: Callable[[CheckResult], None] | None = None,
) -> Report:
    base_url = base_url.rstrip("/")
    if not base_url.startswith(("http://", "https://")) or not base_url.endswith("/v1"):
        raise ValueError(f"base_url must be an http(s) URL ending in /v1, got {base_url!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if timeout <= 0 or load < 0:
        raise ValueError("timeout must be positive and load non-negative")
    names = select_checks(only, load)
    endpoint = Endpoint(base_url, api_key, model, engine, timeout, verify, load)

    started = time.perf_counter()
    async with open_client(endpoint) as client:

        async def run_and_announce(name: str) -> CheckResult:
            result = await _run_check(name, client, endpoint)
            if on_result:
                on_result(result)
            return result

        results = await asyncio.gather(*(run_and_announce(name) for name in names))
    return Report(base_url, model, engine, list(results), time.perf_counter() - started)


def run_suite(base_url: str, api_key: str, model: str, **options) -> Report:
    """Verify a deployed endpoint (options as for run_suite_async). `verify`: True (system CAs),
    False (no TLS verification) or the path of a CA bundle (PEM). Raises ValueError on bad arguments."""
    return asyncio.run(run_suite_async(base_url, api_key, model, **options))
