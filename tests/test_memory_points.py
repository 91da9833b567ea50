"""Every measured memory point of seeds 001, 003 and 004 is reproduced by the sizing (issue 12):
pools within 10%, and the configurations that started or failed are accepted or refused."""

from __future__ import annotations

import pytest

from kimi_fleet import catalog
from kimi_fleet.memory_points import point_spec, table
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import PROJECT_ROOT

POINTS = catalog.MEASURED_MEMORY_POINTS


@pytest.mark.parametrize("point", POINTS, ids=lambda p: f"{p.accelerator}-{p.engine}-{p.memory_knob}-{p.kv_dtype}")
def test_the_sizing_reproduces_the_measured_point(point):
    sizing = size(Resolved(point_spec(point)))
    if point.outcome == "pool":
        assert abs(sizing.max_sequence_tokens - point.pool_tokens) <= catalog.POOL_TOLERANCE * point.pool_tokens, (
            sizing.max_sequence_tokens, point.pool_tokens)
    elif point.outcome == "starts":
        assert sizing.fits, sizing.why_not()
    else:
        assert not sizing.fits, f"{point.what_was_seen}, but the sizing accepts it"


def test_every_seed_with_memory_data_has_points():
    assert {p.source for p in POINTS} == {catalog.SEED_001, catalog.SEED_003, catalog.SEED_004}
    assert {p.outcome for p in POINTS} == {"pool", "starts", "fails"}


def test_a_mutated_constant_breaks_a_point(monkeypatch):
    """The table can fail: without the vLLM profile-run figure, the 0.85 point would start."""
    import dataclasses

    monkeypatch.setattr(catalog, "VLLM_MEMORY", dataclasses.replace(catalog.VLLM_MEMORY, profile_peak_bytes=0))
    failing = next(p for p in POINTS if p.engine == "vllm" and p.outcome == "fails")
    assert size(Resolved(point_spec(failing))).fits


def test_the_readme_shows_the_current_table():
    assert table() in (PROJECT_ROOT / "README.md").read_text(), "run python scripts/memory_points.py into the README"
