#!/usr/bin/env python3
"""Reading Prometheus' text exposition format (version 0.0.4), standard library only: what the
node's metrics publisher and its drain read from the loopback exporters (the engines' /metrics,
the DCGM exporter, Caddy's metrics site, the node-state exporter).

Only what those scripts need: samples as (name, labels, value); counters and gauges summed over
their label sets; a histogram's cumulative buckets summed over label sets, by `le`; the quantile of
the observations between two reads, interpolated within a bucket as Prometheus'
histogram_quantile() does.
"""

from __future__ import annotations

import math
import re
import urllib.request

#: One sample line: name, optional {labels}, value (a timestamp after it is ignored).
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
#: An exporter answers in milliseconds when alive.
SCRAPE_TIMEOUT_SECONDS = 5


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        labels = {key: raw.replace('\\"', '"').replace("\\\\", "\\") for key, raw in _LABEL.findall(match.group(2) or "")}
        samples.append((match.group(1), labels, value))
    return samples


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT_SECONDS) -> list[tuple[str, dict[str, str], float]] | None:
    """The samples an exporter serves, or None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return parse(response.read().decode(errors="replace"))
    except (OSError, ValueError):
        return None


def total(samples, name: str, **match: str) -> float | None:
    """The sum of `name` over its label sets (those whose labels include `match`); None when absent."""
    values = [v for n, labels, v in samples if n == name and all(labels.get(k) == want for k, want in match.items())]
    return sum(values) if values else None


def values(samples, name: str) -> list[tuple[dict[str, str], float]]:
    return [(labels, v) for n, labels, v in samples if n == name]


def buckets(samples, histogram: str) -> dict[str, float]:
    """A histogram's cumulative bucket counts summed over its label sets, keyed by `le` as written
    (so they survive a JSON state file)."""
    summed: dict[str, float] = {}
    for labels, value in values(samples, f"{histogram}_bucket"):
        le = labels.get("le")
        if le is not None:
            summed[le] = summed.get(le, 0.0) + value
    return summed


def delta_buckets(now: dict[str, float], before: dict[str, float] | None) -> dict[str, float] | None:
    """Observations between two reads, per bucket; None when the histogram was reset (a restart) or
    one read lacks it."""
    if not now or before is None:
        return None
    if set(before) - set(now):
        return None
    delta = {le: now[le] - before.get(le, 0.0) for le in now}
    if any(v < 0 for v in delta.values()):
        return None
    return delta


def quantile(q: float, cumulative: dict[str, float]) -> float | None:
    """The q-quantile of cumulative bucket counts, as Prometheus' histogram_quantile() computes it
    (linear within the bucket; the highest finite bound when it falls in +Inf); None without
    observations."""
    bounds = sorted((float(le), count) for le, count in cumulative.items())
    if not bounds or bounds[-1][0] != math.inf:
        return None
    observed = bounds[-1][1]
    if observed <= 0:
        return None
    rank = q * observed
    lower, below = 0.0, 0.0
    for upper, count in bounds:
        if count >= rank:
            if upper == math.inf:
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower
