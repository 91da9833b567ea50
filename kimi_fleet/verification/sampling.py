"""Judging model behaviour as a rate: sample sizes and thresholds from binomial error probabilities.

A good Kimi-K2.6 deployment still produces some schema-invalid tool calls and the odd runaway
answer (K2-Vendor-Verifier measured 101 invalid of 970 calls on SGLang 0.5.9). A gate that fails
on one bad sample fails good deployments; a gate that ignores them passes broken ones. Each
behaviour is therefore sampled n times and fails only when more than k samples fail, with n and k
chosen so that a deployment at the good rate fails rarely (false fail) and one at the broken rate
passes rarely (false pass). Pure arithmetic: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

from kimi_fleet import catalog


#: Where vllm #54701's rate of broken streams comes from (5-30% of streamed calls at 6-14 streams).
VLLM_54701 = catalog.Source("https://github.com/vllm-project/vllm/issues/54701 (low end of 5-30%)", "2026-09-01")
#: What agent clients do (issue 23): streamed calls many at once, tool results sent back. Kept here
#: beside the catalog's behaviours until the catalog carries them (catalog.py is edited elsewhere).
AGENT_BEHAVIOURS: dict[str, catalog.GateBehaviour] = {
    b.name: b
    for b in (
        # Same rates as the non-streamed calls: a streamed call is the same model output, parsed
        # incrementally.
        catalog.GateBehaviour("streamed_tool_calls", "streamed tool requests without a valid call",
                              catalog.GATE_BEHAVIOURS["tool_schema"].good_failure_rate, 0.5, catalog.K2VV),
        # A good engine never loses a streamed call: the threshold is zero (one occurrence fails),
        # and the sample count is what catches the bug at the low end of its reported rate.
        catalog.GateBehaviour("streamed_call_faults", "streams whose calls were lost or differ from the "
                              "non-streamed answer", 0.0, 0.05, VLLM_54701),
        catalog.GateBehaviour("agent_loop", "agent loops without an answer that uses the tool result",
                              0.05, 0.5, catalog.GATE_ASSUMED),
    )
}
#: Every behaviour the gate judges as a rate.
GATE_BEHAVIOURS: dict[str, catalog.GateBehaviour] = {**catalog.GATE_BEHAVIOURS, **AGENT_BEHAVIOURS}


def false_fail_budget() -> float:
    """Each behaviour's share of P(a good deployment fails the gate): split over the behaviours a
    good deployment can show at all (one it never shows, at rate 0, spends none)."""
    spenders = [b for b in GATE_BEHAVIOURS.values() if b.good_failure_rate > 0]
    return catalog.GATE_FALSE_FAIL_BUDGET / len(spenders)


def binomial_tail_above(k: int, n: int, p: float) -> float:
    """P(X > k) for X ~ Binomial(n, p)."""
    return sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1, n + 1))


@dataclass(frozen=True)
class Judgement:
    """The rule for one behaviour at a given sample count, with both error probabilities."""

    behaviour: catalog.GateBehaviour
    samples: int
    #: the gate fails when more than this many samples fail
    max_failures: int
    #: P(gate fails | every sample fails at the good rate)
    false_fail: float
    #: P(gate passes | every sample fails at the broken rate)
    false_pass: float

    def verdict(self, failures: int) -> bool:
        return failures <= self.max_failures

    def describe(self, failures: int) -> str:
        b = self.behaviour
        rate = failures / self.samples if self.samples else 0.0
        return (
            f"{failures}/{self.samples} {b.failure_noun} ({rate:.1%}); fails above {self.max_failures}; "
            f"P(fail | good at {b.good_failure_rate:.1%}) = {self.false_fail:.2%}, "
            f"P(pass | broken at {b.broken_failure_rate:.0%}) = {self.false_pass:.2%}"
        )

    def details(self, failures: int) -> dict:
        b = self.behaviour
        return {
            "samples": self.samples,
            "failures": failures,
            "observed_failure_rate": round(failures / self.samples, 4) if self.samples else None,
            "max_failures": self.max_failures,
            "good_failure_rate": b.good_failure_rate,
            "broken_failure_rate": b.broken_failure_rate,
            "p_false_fail": round(self.false_fail, 6),
            "p_false_pass": round(self.false_pass, 6),
            "rate_source": f"{b.source.where} ({b.source.date})",
        }


def judgement_for(behaviour: catalog.GateBehaviour, samples: int) -> Judgement:
    """The smallest threshold whose false-fail probability stays within the behaviour's budget."""
    if samples < 1:
        raise ValueError(f"{behaviour.name}: need at least one sample")
    budget = false_fail_budget()
    for max_failures in range(samples + 1):
        false_fail = binomial_tail_above(max_failures, samples, behaviour.good_failure_rate)
        if false_fail <= budget:
            break
    false_pass = 1.0 - binomial_tail_above(max_failures, samples, behaviour.broken_failure_rate)
    return Judgement(behaviour, samples, max_failures, false_fail, false_pass)


def samples_needed(behaviour: catalog.GateBehaviour) -> int:
    """The fewest samples whose judgement meets both error budgets (false fail and false pass)."""
    for samples in range(1, 1000):
        if judgement_for(behaviour, samples).false_pass <= catalog.GATE_FALSE_PASS_BUDGET:
            return samples
    raise ValueError(f"{behaviour.name}: no sample size up to 1000 separates the good and broken rates")
