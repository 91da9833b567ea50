"""Shared test setup."""

import asyncio
import atexit
import gc
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The cyclic garbage collector's thresholds in the test processes (Python's: 700, 10, 10). A worker
#: keeps the program's imports, the mock runs' objects and module fixtures alive for minutes, and
#: with the default thresholds the collector scanned that heap over and over: a third of the CPU of
#: the mock-run files (test_aws_stacks + test_key_rotation + test_k8s_observability + test_replacement:
#: 13.0 of 37.9 s in the collector). Objects without cycles are freed by reference counting as
#: before; only cycles wait longer (50,000 new objects instead of 700). Nothing is collected less:
#: pytest still collects at the end of the session for its unraisable-exception check.
GC_THRESHOLDS = (50_000, 20, 10)
gc.set_threshold(*GC_THRESHOLDS)


def _python3_without_its_launcher() -> None:
    """`python3` on PATH, as the node scripts, their shebangs and the tests' shell scripts call it, is
    the interpreter PATH's `python3` runs, started directly. A version manager's shim there (pyenv's,
    in this workplace's image) started a dozen bash processes before each Python one (0.06 s of CPU
    a call, hundreds of calls a session) and put its own bin/ first on the script's PATH, so a node
    script's `aws` was that directory's unpinned CLI rather than the one the test put on PATH. The
    wrapper execs the same interpreter (sys.executable as PATH's python3 reports it) with the PATH
    the caller gave it."""
    found = shutil.which("python3")
    if not found:
        return
    interpreter = subprocess.run([found, "-c", "import sys; print(sys.executable)"], capture_output=True,
                                 text=True, check=True).stdout.strip()
    if interpreter == found:
        return
    wrappers = Path(tempfile.mkdtemp(prefix="kimi-test-python3-"))
    (wrappers / "python3").write_text(f"#!/bin/sh\nexec {shlex.quote(interpreter)} \"$@\"\n")
    (wrappers / "python3").chmod(0o755)
    os.environ["PATH"] = f"{wrappers}{os.pathsep}{os.environ.get('PATH', '')}"
    atexit.register(shutil.rmtree, wrappers, True)


_python3_without_its_launcher()


def pytest_collection_finish(session):
    """What the imports and the collection left (modules, the program's and the SDKs' classes, test
    items) lives until the process ends: moved out of the collector's scans (gc.freeze)."""
    gc.collect()
    gc.freeze()


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
    """`scripts/plan.py --all --no-preflight`, run once per test session for every test that reads its
    table (10-19 s of CPU a run): the first pytest-xdist worker to ask runs it, under a lock, and keeps
    its result beside the workers' temporary directories for the others. Its artifacts go to a
    temporary build dir: never the repo's build/, which other tests may be writing at the same time."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # one directory for every worker of this session
    result = shared / "plan-all.json"
    with FileLock(str(shared / "plan-all.lock")):
        if not result.exists():
            build = shared / "plan-all-build"
            done = subprocess.run([sys.executable, "scripts/plan.py", "--all", "--no-preflight", "--build-dir",
                                   str(build)], capture_output=True, text=True, cwd=ROOT, timeout=600)
            result.write_text(json.dumps({"args": done.args, "returncode": done.returncode, "stdout": done.stdout,
                                          "stderr": done.stderr}))
        kept = json.loads(result.read_text())
    return subprocess.CompletedProcess(kept["args"], kept["returncode"], kept["stdout"], kept["stderr"])


#: Files whose tests mostly wait (fake engines behind a real Caddy, the admission suite run by the
#: node's own scripts, the applier against moto) rather than compute, and whose module fixtures are
#: cheap. Under `pytest -n N --dist loadgroup` their tests spread over the workers; every other file
#: stays whole on one worker, as with --dist loadfile, so its module-scoped fixtures (every stack run
#: under the mocks) are built once.
SPREAD_FILES = {"test_watchdog.py", "test_verification.py", "test_apply_release.py", "test_compile_cache.py",
                "test_gate_statistics.py", "test_drain.py", "test_prometheus_scrape.py", "test_release_retention.py",
                "test_replica_restart.py"}


#: Whole files that take longest (waiting included: a real pip, LiteLLM's import, the mirror's moto
#: transfers, every stack under the mocks), and the spread files whose single tests take 10-25 s (the
#: watchdog's, the Prometheus scrapes), handed out first so that none is left running alone at the end
#: while the other workers idle (CI at c7eac4d: the last 3% of the tests took about 40 s, the watchdog's
#: long tests collected last). The rest keep their order.
LONGEST_FIRST = ("test_plan.py", "test_watchdog.py", "test_prometheus_scrape.py", "test_client_snippets.py",
                 "test_weights_mirror.py", "test_replacement.py", "test_node_packages.py", "test_node_files.py",
                 "test_engines_share_a_node.py", "test_release_retention.py", "test_apply_release.py")


def pytest_collection_modifyitems(config, items):
    """In a pytest-xdist worker: LONGEST_FIRST's files first (every worker collects the same order)."""
    if not hasattr(config, "workerinput"):
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def scheduling_scope(nodeid: str) -> str:
    """The unit --dist loadgroup hands a worker: the test itself in SPREAD_FILES, its file otherwise."""
    path = nodeid.split("::", 1)[0]
    return nodeid if Path(path).name in SPREAD_FILES else path


def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup with the scopes of scheduling_scope. (Until this, xdist_group marks named the
    groups; pytest 9 computes a node id from its parts, so the `@group` pytest-xdist 3.8 writes into
    it was lost and every file's tests were spread over the workers, each worker building the file's
    module fixtures again: test_plan's 13 mock runs on all four.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileOrTestScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_scope(nodeid)

    return FileOrTestScheduling(config, log)
