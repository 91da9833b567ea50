"""tooling/mock_run.py's stack trace for each registration is the SDK's own, only cheaper to build."""

import sys

import pulumi
import pulumi_random
import pytest
from pulumi.runtime import resource

from tooling import mock_run
from tooling.mock_run import run_components


def test_it_replaces_the_sdks_function_only_while_that_is_the_one_it_reproduces(monkeypatch):
    assert mock_run._sdk_source_sha256() == mock_run.SDK_STACK_TRACE_SOURCE_SHA256
    assert resource._get_stack_trace is mock_run.stack_trace
    sdk = mock_run._SDK_STACK_TRACE[0]
    assert sdk.__module__ == "pulumi.runtime.resource" and sdk.__name__ == "_get_stack_trace"
    # Another SDK's function (a moved pin): left alone.
    monkeypatch.setattr(resource, "_get_stack_trace", sdk)
    monkeypatch.setattr(mock_run, "SDK_STACK_TRACE_SOURCE_SHA256", ("0" * 64, "0" * 64))
    assert mock_run.use_fast_stack_trace() is False
    assert resource._get_stack_trace is sdk
    monkeypatch.undo()
    assert mock_run.use_fast_stack_trace() is True and resource._get_stack_trace is mock_run.stack_trace


class _Outer:
    def __init__(self, depth, calls):
        _Middle(depth, calls)


class _Middle:
    def __init__(self, depth, calls):
        _Inner(depth, calls)


class _Inner:
    def __init__(self, depth, calls):
        calls.append(_both(depth))


def _both(depth):
    """Both functions called from the same frame, `depth` frames below here."""
    if depth:
        return _both(depth - 1)
    return mock_run._SDK_STACK_TRACE[0](), mock_run.stack_trace()


def _nested(levels, calls):
    if levels:
        return _nested(levels - 1, calls)
    _Outer(0, calls)
    _Outer(3, calls)


@pytest.mark.parametrize("limit", [None, 4])
def test_the_same_frames_and_positions_as_the_sdk(monkeypatch, limit):
    if limit is not None:
        monkeypatch.setattr(sys, "tracebacklimit", limit, raising=False)
    calls = []
    for levels in (0, 5):
        _nested(levels, calls)
    calls.append(_both(0))  # fewer than three __init__ frames: the SDK's empty trace
    for sdk, ours in calls:
        assert ours.SerializeToString(deterministic=True) == sdk.SerializeToString(deterministic=True)
    if limit is None:
        assert all(len(sdk.frames) > 3 for sdk, _ in calls[:-1]) and len(calls[-1][0].frames) == 0
        assert any(frame.pc.uri.endswith("/tests/test_mock_run.py") for frame in calls[0][0].frames)
        assert any(not frame.HasField("pc") for frame in calls[0][0].frames)  # pytest's <frozen ...> frames


class _Thing(pulumi.ComponentResource):
    def __init__(self, name):
        super().__init__("test:index:Thing", name)
        self.id_ = pulumi_random.RandomId(f"{name}-id", byte_length=4, opts=pulumi.ResourceOptions(parent=self))
        self.register_outputs({})


def test_every_registration_of_a_program_under_the_mocks_gets_the_sdks_trace(monkeypatch):
    compared = []

    def both():
        sdk, ours = mock_run._SDK_STACK_TRACE[0](), mock_run.stack_trace()
        compared.append((sdk.SerializeToString(deterministic=True), ours.SerializeToString(deterministic=True)))
        return ours

    monkeypatch.setattr(resource, "_get_stack_trace", both)
    run_components(lambda: {"hex": _Thing("a").id_.hex}, "dev")
    assert len(compared) >= 2 and all(sdk == ours and sdk for sdk, ours in compared)
