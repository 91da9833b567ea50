"""The engine registry: one module per engine, each an `Engine` (see base.py).

Adding an engine is a module here, a `register()` call and its catalog rows (EngineProfile, images,
memory knobs); nothing else in kimi-fleet names engines.
"""

from __future__ import annotations

from kimi_fleet.engines.base import ENGINE_OPTIONS, PARALLELISM_OPTIONS, Engine, LoadMetrics
from kimi_fleet.engines.sglang import SGLang
from kimi_fleet.engines.vllm import VLLM

_REGISTRY: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
    # Refused here, not on a node: without them the watchdog restarts a busy engine as a stalled one.
    if not isinstance(getattr(engine, "load_metrics", None), LoadMetrics):
        raise TypeError(f"engine {engine.name!r} refused: it declares no load_metrics (LoadMetrics: its token "
                        "counter and running/waiting gauges on /metrics); add them from the engine's source")
    _REGISTRY[engine.name] = engine
    return engine


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> Engine:
    return _REGISTRY[name]


def managed_flags(engine: Engine) -> dict[str, str]:
    """Flags extraArgs may not set: this engine's, and, to be safe, every other engine's too (a flag
    spelled for another engine is a mistake that would stop the engine at boot, or worse, a prefix
    argparse expands into a managed one)."""
    merged: dict[str, str] = {}
    for other in _REGISTRY.values():
        merged.update(other.managed_flags)
    return {**merged, **engine.managed_flags}


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


register(VLLM())
register(SGLang())

__all__ = ["ENGINE_OPTIONS", "PARALLELISM_OPTIONS", "Engine", "LoadMetrics", "get", "managed_flags", "names",
           "register", "unregister"]
