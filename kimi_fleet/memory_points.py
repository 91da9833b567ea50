"""The seeds' measured memory points beside what the sizing says (issue 12): the table the README
shows and tests/test_memory_points.py checks."""

from __future__ import annotations

from kimi_fleet import catalog
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.spec import StackSpec


def point_spec(point: catalog.MemoryPoint) -> StackSpec:
    """The measured configuration as a stack (schema only: the rules would refuse the failing ones)."""
    engine = {"name": point.engine, "image": point.image, "memoryFraction": point.memory_knob}
    if point.speculative != "off":
        engine.update(speculative=point.speculative, speculativeDraftRepo="lightseekorg/kimi-k2.6-eagle3")
    return StackSpec.model_validate({
        "stack": "point", "accelerator": point.accelerator, "acceleratorCount": point.accelerator_count,
        "checkpoint": point.checkpoint, "engine": engine, "kvCacheDtype": point.kv_dtype,
        "contextLength": point.context_length,
        "parallelism": {"tensorParallel": point.accelerator_count, **point.parallelism},
        "target": {"kind": "host", "host": {"address": "203.0.113.7"}}, "domain": "kimi.example.com",
    })


def modelled(point: catalog.MemoryPoint) -> str:
    sizing = size(Resolved(point_spec(point)))
    if point.outcome == "pool":
        off = (sizing.max_sequence_tokens - point.pool_tokens) / point.pool_tokens
        return f"pool {sizing.max_sequence_tokens:,} tokens ({off:+.0%})"
    return f"{'starts' if sizing.fits else 'refused'} at {point.context_length:,}"


def table() -> str:
    rows = ["| seed | hardware | engine (image) | knob | KV | measured | sizing |", "|---|---|---|---|---|---|---|"]
    for p in catalog.MEASURED_MEMORY_POINTS:
        seed = p.source.where.split(" (")[0]
        measured = f"pool ~{p.pool_tokens:,} tokens" if p.outcome == "pool" else f"{p.outcome}: {p.what_was_seen}"
        spec = " + EAGLE3" if p.speculative != "off" else ""
        rows.append(f"| {seed} | {p.accelerator_count}x {p.accelerator} {p.checkpoint} | {p.engine} "
                    f"(`{p.image.split(':')[-1]}`){spec} | {p.memory_knob} | {p.kv_dtype} | {measured} | {modelled(p)} |")
    return "\n".join(rows) + "\n"
