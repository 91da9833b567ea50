"""Shared test setup."""

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session")
def plan_all(tmp_path_factory) -> subprocess.CompletedProcess:
    """`scripts/plan.py --all --no-preflight`, run once per test process for every test that reads its
    table (10-19 s of CPU a run). Its artifacts go to a temporary build dir: never the repo's
    build/, which other tests (other pytest-xdist workers) may be writing at the same time."""
    build = tmp_path_factory.mktemp("plan-all-build")
    return subprocess.run([sys.executable, "scripts/plan.py", "--all", "--no-preflight", "--build-dir", str(build)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


#: Files whose tests mostly wait (fake engines behind a real Caddy, the admission suite run by the
#: node's own scripts) rather than compute. Under `pytest -n 2 --dist loadgroup` their tests spread
#: over the workers; every other file stays whole on one worker, as with --dist loadfile, so its
#: module-scoped fixtures (a moto server, every stack run under the mocks) are built once.
SPREAD_FILES = {"test_watchdog.py"}


def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if item.path.name not in SPREAD_FILES:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
