"""The pods' liveness probe tells a busy engine from a dead one (issue 20): the exact command the
rendered livenessProbe runs, against the fake engine behind the load shim (tests/fakes/load_shim.py),
which holds generations past the probe's timeout while its token counter advances (busy) and,
with the fake's hang file, hangs them with the counter standing still (dead)."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from kimi_fleet import engines
from kimi_fleet import k8s_manifests as manifests
from kimi_fleet.launch import render_launch
from kimi_fleet.node_scripts import generation_probe
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import load_stack_config, stack_file
from tests.fakes.harness import start_fake_engine

# tests/fakes/load_shim.py reads each engine's /metrics names from generation_probe.ENGINE_METRICS,
# which moved to the engine modules (LoadMetrics); it gets the same names from there (as test_watchdog).
generation_probe.ENGINE_METRICS = {  # type: ignore[attr-defined]
    name: tuple(engines.get(name).load_metrics.as_dict().values()) for name in engines.names()}
from tests.fakes.load_shim import start_load_shim  # noqa: E402

pytestmark = pytest.mark.timeout(120)
STACK = "gb200-int4-vllm"
SCRIPT = Path(generation_probe.__file__)
PROBE_TIMEOUT = 2  # the generation's; the shim holds a busy engine's requests longer


def probes(stack: str = STACK) -> tuple[Resolved, dict]:
    r = Resolved(load_stack_config(stack_file(stack)).spec())
    objects = manifests.render_manifests(r, size(r), render_launch(r), stack=stack)
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    engine = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "engine")
    return r, engine


def as_run_here(command: list[str], port: int) -> list[str]:
    """The pod's probe command with this machine's script, the shim's port and a short timeout."""
    script = f"{manifests.PROBE_MOUNT}/{manifests.GENERATION_PROBE_SCRIPT}"
    assert command[:2] == ["python3", script]
    out = [sys.executable, str(SCRIPT), *command[2:]]
    url = next(i for i, arg in enumerate(out) if arg.startswith("http://127.0.0.1:"))
    out[url] = f"http://127.0.0.1:{port}"
    out[url + 2] = str(PROBE_TIMEOUT)
    return out


@contextmanager
def busy_engine(tmp_path: Path, engine: str):
    busy, hang = tmp_path / "busy", tmp_path / "hang"
    with start_fake_engine("good", engine, "kimi-k2.6", options=("--hang-file", str(hang))) as fake:
        with start_load_shim(fake.port, engine, str(busy), hold_seconds=PROBE_TIMEOUT + 2) as shim:
            yield shim.port, busy, hang


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_liveness_passes_a_busy_engine_that_readiness_takes_out(tmp_path):
    r, engine = probes()
    with busy_engine(tmp_path, r.spec.engine.name) as (port, busy, _):
        liveness = as_run_here(engine["livenessProbe"]["exec"]["command"], port)
        readiness = as_run_here(engine["readinessProbe"]["exec"]["command"], port)
        idle = run(liveness)
        assert idle.returncode == 0, idle.stderr
        busy.touch()
        alive = run(liveness)
        ready = run(readiness)
    assert alive.returncode == 0, alive.stderr
    assert "busy: TimeoutError" in alive.stderr and "tokens meanwhile" in alive.stderr
    # Readiness still takes a pod that does not answer out of the Service.
    assert ready.returncode == 1 and "TimeoutError" in ready.stderr


def test_liveness_fails_a_dead_engine_whose_counter_stands_still(tmp_path):
    r, engine = probes()
    with busy_engine(tmp_path, r.spec.engine.name) as (port, _, hang):
        hang.touch()
        result = run(as_run_here(engine["livenessProbe"]["exec"]["command"], port))
    assert result.returncode == 1
    assert "no token generated meanwhile" in result.stderr and "busy" not in result.stderr


def test_busy_is_read_under_the_engines_own_metric_names(tmp_path):
    """The same busy engine, probed with another engine's metric names: nothing proves it busy."""
    r, engine = probes()
    other = next(name for name in engines.names() if name != r.spec.engine.name)
    command = engine["livenessProbe"]["exec"]["command"]
    mode = command.index(generation_probe.ALIVE_WHILE_GENERATING)
    wrong = [*command[:mode + 1], generation_probe.json.dumps(engines.get(other).load_metrics.as_dict()),
             *command[mode + 2:]]
    with busy_engine(tmp_path, r.spec.engine.name) as (port, busy, _):
        busy.touch()
        result = run(as_run_here(wrong, port))
    assert result.returncode == 1 and "its /metrics do not answer" in result.stderr


@pytest.mark.parametrize("metrics", ['{"generated": "vllm:generation_tokens_total"}', "not json", "[]"])
def test_metric_names_that_do_not_name_every_load_key_are_refused(metrics):
    result = run([sys.executable, str(SCRIPT), generation_probe.ALIVE_WHILE_GENERATING, metrics,
                  "http://127.0.0.1:9", "kimi-k2.6", "1"])
    assert result.returncode == 2
    assert "refused" in result.stderr and "generated, running, waiting" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
