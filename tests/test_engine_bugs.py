"""Known engine bugs as data: the plan warns about pinned affected releases (issue 23)."""

import pytest

from kimi_fleet import engine_bugs
from kimi_fleet.resolve import Resolved
from kimi_fleet.stackfile import load_stack_config, stack_file, stack_names


def resolved(name: str) -> Resolved:
    return Resolved(load_stack_config(stack_file(name)).spec())


def test_gb200_int4_vllm_is_warned_about_vllm_54701_for_its_pinned_release():
    warnings = engine_bugs.warnings_for(resolved("gb200-int4-vllm"))
    assert len(warnings) == 1, warnings
    warning = warnings[0]
    assert "vllm/vllm-openai:v0.19.1-cu130 pins vllm 0.19.1, affected by vllm #54701" in warning
    assert "empty tool_calls deltas" in warning and "stream: false" in warning
    assert "\n" not in warning


@pytest.mark.parametrize("name", [n for n in stack_names() if n != "gb200-int4-vllm"])
def test_stacks_on_other_releases_get_no_bug_warning(name):
    config = load_stack_config(stack_file(name))
    try:
        spec = config.spec()
    except Exception:
        pytest.skip(f"{name} is refused for its own reason (tests/matrix.py)")
    assert engine_bugs.warnings_for(Resolved(spec)) == []


@pytest.mark.parametrize("release, affected", [("0.19.1", True), ("0.19.0", False), ("0.22.1", False),
                                               (None, False), ("not-a-version", False)])
def test_affected_range(release, affected):
    bug = next(b for b in engine_bugs.ENGINE_BUGS if b.ref == "vllm #54701")
    assert bug.affects("vllm", release) is affected
    assert not bug.affects("sglang", release)


def test_every_bug_has_its_source_symptoms_and_workaround():
    known = {engine_bugs.EMPTY_STREAMED_CALL, engine_bugs.STREAM_DIFFERS, engine_bugs.TRUNCATED_CALL_SILENT_STOP,
             engine_bugs.TRUNCATED_CALL_AS_COMPLETE}
    for bug in engine_bugs.ENGINE_BUGS:
        assert bug.source.where and bug.source.date and bug.workaround and bug.summary
        assert bug.symptoms and set(bug.symptoms) <= known, bug.ref
        assert set(bug.engines) <= {"vllm", "sglang"}
        assert bug.ref in bug.describe()


def test_a_symptom_names_the_affected_bug_first_and_the_release():
    sentence = engine_bugs.named_for(engine_bugs.STREAM_DIFFERS, "vllm", "0.19.1")
    assert sentence.startswith("the endpoint runs vllm 0.19.1: vllm #54701, which it affects; also vllm #45866")
    unknown = engine_bugs.named_for(engine_bugs.EMPTY_STREAMED_CALL, "vllm", None)
    assert "release not given to the gate: --engine-release" in unknown
    assert "no known sglang bug" in engine_bugs.named_for(engine_bugs.TRUNCATED_CALL_AS_COMPLETE, "sglang", "0.5.12")


def test_the_gate_tells_the_suite_which_engine_release_it_checks():
    """A failed check names the known bugs of the release the stack pins: the gate passes it."""
    from kimi_fleet.verification.cli import build_parser
    from tooling.mock_run import run_stack

    run = run_stack("gb200-int4-vllm")
    assert run.error is None, run.error
    (gate,) = [r for r in run.of_type("command:local:Command") if r["name"].endswith("-gate-verify")]
    command = gate["inputs"]["create"]
    assert "--engine-release 0.19.1 " in command
    verify_argv = command.split(" && ")[-1].split()
    assert build_parser().parse_args(verify_argv[2:]).engine_release == "0.19.1"
