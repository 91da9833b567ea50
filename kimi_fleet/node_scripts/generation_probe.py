#!/usr/bin/env python3
"""A tiny real generation: exit 0 only when the endpoint produced at least one token in time.

An engine can answer 200 on /health while its scheduler is dead (vLLM #39863: 85 minutes of
outage behind a green health route); only a generation proves it serves. Standard library only:
it runs on nodes (Ubuntu's python3) and inside engine containers (Kubernetes exec probes).

Also: what the engine itself says it is doing (engine_load), which tells a busy engine whose probe
waited behind other requests from a stalled one (the watchdog's "busy" versus "dead").

usage: generation_probe.py [--alive-while-generating METRICS_JSON] BASE_URL MODEL TIMEOUT_SECONDS [KEY_FILE]
  BASE_URL  e.g. http://127.0.0.1:8000 (the engine) or http://127.0.0.1:9180 (the node's Caddy, loopback listener)
  KEY_FILE  a file holding the API key, sent as a Bearer token (never on the command line)
  --alive-while-generating  liveness, not readiness: a failed generation still passes when the engine's
            token counter advanced meanwhile (busy: the probe waited behind other clients' requests).
            METRICS_JSON names the engine's own metrics: {"generated": ..., "running": ..., "waiting": ...}
            (its engine module's LoadMetrics); BASE_URL must then be the engine itself (its /metrics).
"""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.request

#: One read of an engine's /metrics, at most: it answers in milliseconds when alive (the watchdog
#: reads it twice around a failed probe; its unit's timeout counts both).
METRICS_TIMEOUT_SECONDS = 10
#: What engine_load reports, by the keys stack.json's engines[].metrics name the engine's own
#: metrics with (its engine module's LoadMetrics: this script runs on nodes and cannot import them).
LOAD_KEYS = ("generated", "running", "waiting")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")


def probe(base_url: str, model: str, timeout: float, key: str | None = None) -> str | None:
    """None when a token came back; else why not, in one line."""
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": "Reply with the single word OK."}],
        "max_tokens": 4,
        "temperature": 0,
        # Instant mode: a thinking answer would spend its tokens on reasoning.
        "chat_template_kwargs": {"thinking": False},
    }).encode()
    request = urllib.request.Request(f"{base_url.rstrip('/')}/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    except (OSError, ValueError) as error:  # refused, timed out, not JSON
        return f"{type(error).__name__}: {error}"
    generated = (answer.get("usage") or {}).get("completion_tokens") or 0
    choices = answer.get("choices") or []
    if not choices or generated < 1:
        return f"no tokens generated: {json.dumps(answer)[:200]}"
    return None


def engine_load(base_url: str, metrics: dict, timeout: float = METRICS_TIMEOUT_SECONDS) -> dict | None:
    """{"generated", "running", "waiting"} from the engine's /metrics (each summed over its label
    sets: one per model or data-parallel rank), or None when /metrics does not answer or lacks the
    token counter (then nothing proves the engine is busy). `metrics`: the engine's own name for
    each of those keys (stack.json's engines[].metrics)."""
    names = {metrics[key]: key for key in LOAD_KEYS}
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/metrics", timeout=timeout) as response:
            text = response.read().decode(errors="replace")
    except (OSError, ValueError):
        return None
    totals: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) in names:
            key = names[match.group(1)]
            try:
                totals[key] = totals.get(key, 0.0) + float(match.group(2))
            except ValueError:
                continue
    if "generated" not in totals:
        return None
    return {key: totals.get(key, 0.0) for key in LOAD_KEYS}


USAGE = "usage: generation_probe.py [--alive-while-generating METRICS_JSON] BASE_URL MODEL TIMEOUT_SECONDS [KEY_FILE]"
ALIVE_WHILE_GENERATING = "--alive-while-generating"


def load_metric_names(text: str) -> dict | None:
    """The engine's metric names from the command line, or None when they do not name every key."""
    try:
        metrics = json.loads(text)
    except ValueError:
        return None
    if not isinstance(metrics, dict) or not all(isinstance(metrics.get(key), str) and metrics[key]
                                                for key in LOAD_KEYS):
        return None
    return metrics


def alive(base_url: str, model: str, timeout: float, metrics: dict, key: str | None = None) -> tuple[str | None, str]:
    """Liveness: (None, note) when a token came back or the engine's token counter advanced during
    the failed generation (busy, not dead); else (why dead, ""). A dead engine's counter stands still,
    and an engine whose /metrics do not answer proves nothing: both fail, as the watchdog judges."""
    before = engine_load(base_url, metrics)
    failure = probe(base_url, model, timeout, key)
    if failure is None:
        return None, ""
    after = engine_load(base_url, metrics)
    if before and after and after["generated"] > before["generated"]:
        return None, (f"busy: {failure}, but the engine generated {after['generated'] - before['generated']:.0f} "
                      f"tokens meanwhile ({after['running']:.0f} running, {after['waiting']:.0f} queued)")
    progress = "its /metrics do not answer" if after is None or before is None else "no token generated meanwhile"
    return f"{failure}; {progress}", ""


def main(argv: list[str]) -> int:
    metrics = None
    if argv[:1] == [ALIVE_WHILE_GENERATING]:
        metrics = load_metric_names(argv[1]) if len(argv) > 1 else None
        if metrics is None:
            print(f"generation probe refused: {ALIVE_WHILE_GENERATING} needs a JSON object naming the engine's "
                  f"{', '.join(LOAD_KEYS)} metrics, got {argv[1] if len(argv) > 1 else 'nothing'!r}; pass its "
                  "engine module's LoadMetrics", file=sys.stderr)
            return 2
        argv = argv[2:]
    if len(argv) not in (3, 4):
        print(USAGE, file=sys.stderr)
        return 2
    key = None
    if len(argv) == 4:
        with open(argv[3]) as key_file:
            key = key_file.read().strip()
    if metrics is None:
        failure = probe(argv[0], argv[1], float(argv[2]), key)
    else:
        failure, note = alive(argv[0], argv[1], float(argv[2]), metrics, key)
        if note:  # the kubelet keeps a passing probe's output only in its debug log: this is for a human
            print(f"generation probe {argv[0]}: {note}", file=sys.stderr)
    if failure:
        print(f"generation probe {argv[0]}: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
