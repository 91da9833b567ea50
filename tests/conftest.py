"""Shared test setup."""

import asyncio

import pytest


@pytest.fixture(autouse=True)
def _current_event_loop():
    """Pulumi's Output helpers ask for the current event loop outside any coroutine; a test that ran
    asyncio.run() before (the verification suite does) leaves none set. Give each test one."""
    policy = asyncio.get_event_loop_policy()
    try:
        loop = policy.get_event_loop()
        if loop.is_closed():
            raise RuntimeError("closed")
    except RuntimeError:
        policy.set_event_loop(policy.new_event_loop())
    yield
