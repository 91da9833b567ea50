"""The gate judges model behaviour as a rate: 100 seeded runs against fake engines with error rates.

At the rates K2-Vendor-Verifier measured for K2.6 (101 of 970 tool calls schema-invalid on SGLang
0.5.9) plus the odd runaway thinking answer, a good deployment must pass; with half the tool calls
invalid it must fail. The fake engine draws its errors from a seed per request kind, so each
scenario is deterministic whatever order the concurrent requests arrive in.
"""

from dataclasses import asdict
from unittest import mock

import httpx
import pytest

from kimi_fleet import catalog
from kimi_fleet.verification import run_suite, runner
from kimi_fleet.verification.sampling import (GATE_BEHAVIOURS, binomial_tail_above, false_fail_budget, judgement_for,
                                              samples_needed)
from tests.fakes.harness import start_fake_engine
from tests.fakes.inprocess_engine import InProcessEngine

RUNS = 100
#: Of them, the first few also over loopback, against the engine's own process started with the same
#: options: the same judgements, check by check (the seeded draws do not depend on the transport).
SOCKET_RUNS = 10
K2VV_INVALID_RATE = 101 / 970
RUNAWAY_RATE = 0.03  # "a single vision or thinking answer that ran away" in 6 of 100 runs of two answers
BEHAVIOUR_CHECKS = ["thinking", "tool_call", "vision"]
MODEL = "kimi-k2.6"
KEY = "test-key-0123456789"


#: A check's examples (an answer; the first few to go wrong, also after "; e.g." in its reason): which
#: request got which of a run's seeded draws is the order the requests arrived in, which concurrency
#: decides; how many went wrong is not.
EXAMPLES = {"example", "first_errors", "first_wrong"}


def judged(report) -> list[dict]:
    """A report's checks without their timings and examples."""
    checks = [{k: v for k, v in asdict(check).items() if k != "seconds"} for check in report.checks]
    for check in checks:
        check["reason"] = check["reason"].split("; e.g. ", 1)[0]
        check["details"] = {k: v for k, v in check["details"].items() if k not in EXAMPLES}
    return checks


def gate_runs(*options: str) -> list:
    """RUNS runs of the behaviour checks against the fake engine answering in this process
    (tests/fakes/inprocess_engine.py: the statistics' CPU was the loopback connections'), the first
    SOCKET_RUNS again against the engine process over loopback; both must judge alike."""
    transport = InProcessEngine("--model", MODEL, "--mode", "good", "--engine", "vllm", "--chunk-delay", "0.0",
                                *options)

    def in_process_client(endpoint, on_response=None):
        assert on_response is None  # no release watch in these runs
        return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(endpoint.timeout))

    with mock.patch.object(runner, "open_client", in_process_client):
        reports = [run_suite("http://fake-engine.invalid/v1", KEY, MODEL, only=BEHAVIOUR_CHECKS, timeout=30,
                             concurrency=64) for _ in range(RUNS)]
    with start_fake_engine("good", model=MODEL, chunk_delay=0.0, options=options) as engine:
        over_sockets = [run_suite(engine.base_url, KEY, engine.model, only=BEHAVIOUR_CHECKS, timeout=30,
                                  concurrency=64) for _ in range(SOCKET_RUNS)]
    assert [judged(r) for r in over_sockets] == [judged(r) for r in reports[:SOCKET_RUNS]]
    return reports


@pytest.mark.timeout(600)
def test_good_deployment_at_k2vv_rates_passes_at_least_99_of_100_runs():
    reports = gate_runs("--seed", "2026", "--tool-invalid-rate", str(K2VV_INVALID_RATE),
                        "--runaway-rate", str(RUNAWAY_RATE))
    failed = [r.to_dict() for r in reports if not r.passed]
    assert len(failed) <= 1, failed[:2]
    # The runs did see errors: the gate tolerated them as a rate, not by missing them.
    invalid = sum(r.check("tool_call").details["tool_schema"]["failures"] for r in reports)
    calls = sum(r.check("tool_call").details["tool_schema"]["samples"] for r in reports)
    assert 0.07 < invalid / calls < 0.14, (invalid, calls)


@pytest.mark.timeout(600)
def test_half_the_calls_invalid_fails_at_least_95_of_100_runs():
    reports = gate_runs("--seed", "7", "--tool-invalid-rate", "0.5")
    failing = [r for r in reports if not r.passed]
    assert len(failing) >= 95, len(failing)
    assert all(r.failed_checks() == ["tool_call"] for r in failing)
    assert "calls invalid (JSON or schema)" in failing[0].check("tool_call").reason


def test_designs_meet_the_error_budgets_for_every_behaviour():
    share = false_fail_budget()
    # The agent behaviours (issue 23) share the budget; one a good deployment never shows spends none.
    assert share == catalog.GATE_FALSE_FAIL_BUDGET / sum(1 for b in GATE_BEHAVIOURS.values() if b.good_failure_rate)
    assert set(GATE_BEHAVIOURS) >= set(catalog.GATE_BEHAVIOURS) | {"streamed_tool_calls", "streamed_call_faults",
                                                                   "agent_loop"}
    for behaviour in GATE_BEHAVIOURS.values():
        n = samples_needed(behaviour)
        judgement = judgement_for(behaviour, n)
        assert judgement.false_fail <= share and judgement.false_pass <= catalog.GATE_FALSE_PASS_BUDGET
        # The smallest such design: one sample fewer misses a budget.
        if n > 1:
            assert judgement_for(behaviour, n - 1).false_pass > catalog.GATE_FALSE_PASS_BUDGET


def test_binomial_tail_matches_hand_computed_values():
    assert binomial_tail_above(0, 2, 0.5) == pytest.approx(0.75)
    assert binomial_tail_above(4, 16, 0.5) == pytest.approx(1 - 2517 / 65536)
    assert binomial_tail_above(5, 5, 0.3) == 0
