"""The engine seam (issue 13): engines are modules behind one interface, hardware quirks are catalog
rows, and nothing outside kimi_fleet/engines/ and the catalog names an engine."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from kimi_fleet import catalog, engines, node_files
from kimi_fleet.engines.base import Engine, LoadMetrics
from kimi_fleet.launch import render_launch
from kimi_fleet.node_scripts.generation_probe import LOAD_KEYS
from kimi_fleet.paths import LOOPBACK, MODEL_MOUNT
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.spec import StackSpecError
from kimi_fleet.stackfile import PROJECT_ROOT, load_stack_config, stack_file
from tooling.mock_run import run_stack_file

TOY = "toyllm"
TOY_IMAGE = "example.com/toyllm:v1.2.3"


class ToyLLM(Engine):
    """A third engine that exists only in this test."""

    name = TOY
    managed_flags = {"--toy-port": "(per engine)", "--toy-memory": "engine.memoryFraction"}
    load_metrics = LoadMetrics("toyllm:tokens_out_total", "toyllm:active", "toyllm:queued")

    def argv(self, r, port):
        return ["toyllm", "serve", MODEL_MOUNT, "--toy-port", str(port), "--toy-bind", LOOPBACK,
                "--toy-memory", f"{r.memory_knob:g}", "--toy-context", str(r.spec.context_length),
                "--toy-tp", str(r.tensor_parallel), *r.quirk_flags]


@pytest.fixture
def toy_engine(monkeypatch):
    """Register the toy engine plus its catalog rows, exactly what a real third engine would add."""
    monkeypatch.setitem(catalog.ENGINES, TOY, dataclasses.replace(
        catalog.ENGINES["vllm"], name=TOY, port=18000, health_path="/toy/health"))
    monkeypatch.setitem(catalog.ENGINE_IMAGES, TOY_IMAGE, catalog.EngineImage(
        TOY_IMAGE, TOY, "1.2.3", "nvidia", ("sm_90",), catalog.Source("test", "2026-12-02")))
    monkeypatch.setitem(catalog.DEFAULT_IMAGE, (TOY, "sm_90"), TOY_IMAGE)
    monkeypatch.setitem(catalog.DEFAULT_MEMORY_KNOB, (TOY, "nvidia"), 0.88)
    # Its metric names, as its source registers them (dashboards, alerts, the node's publisher, scaling).
    monkeypatch.setitem(catalog.ENGINE_METRICS, TOY, dataclasses.replace(
        catalog.ENGINE_METRICS["vllm"], engine=TOY, generated_tokens=ToyLLM.load_metrics.generated_tokens,
        running=ToyLLM.load_metrics.running, waiting=ToyLLM.load_metrics.waiting,
        prompt_tokens="toyllm:tokens_in_total", kv_cache_usage="toyllm:kv_use", ttft_histogram="toyllm:ttft_seconds",
        itl_histogram="toyllm:itl_seconds", e2e_histogram="toyllm:e2e_seconds",
        requests_finished="toyllm:requests_total", where={"1.2.3": {}}))
    int4 = catalog.CHECKPOINTS["int4"]
    monkeypatch.setitem(catalog.CHECKPOINTS, "int4", dataclasses.replace(
        int4, engines=(*int4.engines, TOY), min_engine_versions={**int4.min_engine_versions, TOY: "1.0"}))
    engines.register(ToyLLM())
    yield
    engines.unregister(TOY)


def _toy_stack(tmp_path: Path) -> Path:
    path = tmp_path / "Pulumi.toy-h200.yaml"
    path.write_text(yaml.safe_dump({"config": {
        "kimi-fleet:accelerator": "h200",
        "kimi-fleet:engine": {"name": TOY},
        "kimi-fleet:target": {"kind": "aws", "aws": {"region": "us-east-1"}},
        "kimi-fleet:capacity": {"workload": "interactive"},
        "kimi-fleet:domain": "kimi-toy.example.com",
    }}))
    return path


def test_a_third_engine_plans_a_stack_with_only_its_module_and_catalog_rows(toy_engine, tmp_path):
    config = load_stack_config(_toy_stack(tmp_path))
    spec = config.spec()
    r = Resolved(spec)
    launch = render_launch(r)
    (instance,) = launch.instances
    assert instance.argv[:3] == ("toyllm", "serve", MODEL_MOUNT)
    assert "--toy-port" in instance.argv and str(instance.port) in instance.argv
    assert instance.port == 18000 and instance.probe.path == "/toy/health" and not instance.probe.runs_generation
    assert launch.image == TOY_IMAGE and r.memory_knob == 0.88

    run = run_stack_file(config.path)
    assert run.error is None, run.error
    types = [resource["type"] for resource in run.resources]
    assert "kimi-fleet:aws:AwsEndpoint" in types and "aws:ec2/instance:Instance" in types
    declared = json.dumps(run.resources)
    assert TOY_IMAGE in declared and "--toy-port" in declared, "the toy engine's launch reaches the node's files"
    assert "toyllm:tokens_out_total" in declared, "the toy engine's own /metrics names reach the node's watchdog"


def test_a_third_engine_is_refused_where_the_catalog_has_no_rows_for_it(toy_engine, tmp_path):
    path = _toy_stack(tmp_path)
    path.write_text(path.read_text().replace("h200", "mi300x").replace("kimi-toy", "kimi-toy-amd"))
    with pytest.raises(StackSpecError) as refused:
        load_stack_config(path).spec()
    assert f"no verified {TOY} recipe" in str(refused.value)


def test_an_unregistered_engine_is_refused_with_the_known_ones(tmp_path):
    path = _toy_stack(tmp_path)
    with pytest.raises(StackSpecError) as refused:
        load_stack_config(path).spec()
    message = str(refused.value)
    assert "kimi-fleet:engine.name" in message and f"unknown engine '{TOY}'" in message
    assert ", ".join(engines.names()) in message


SOURCE_DIRS = ("kimi_fleet", "components", "policy", "scripts", "tooling")
ENGINE_HOME = PROJECT_ROOT / "kimi_fleet" / "engines"
CATALOG = PROJECT_ROOT / "kimi_fleet" / "catalog.py"
#: Catalog rows kept in their own module: each known bug names the engines it was reported against
#: (data with its source, read through EngineBug.affects; no code branches on a name there).
ENGINE_BUGS = PROJECT_ROOT / "kimi_fleet" / "engine_bugs.py"


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def engine_name_literals(path: Path, names: tuple[str, ...]) -> list[str]:
    """Every string literal in the code (not docstrings) that is an engine's name."""
    tree = ast.parse(path.read_text())
    skip = _docstrings(tree)
    label = path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path.name
    return [f"{label}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
            and id(node) not in skip]


def test_no_engine_is_named_outside_its_module_and_the_catalog():
    names = engines.names()
    files = [PROJECT_ROOT / "__main__.py"] + [
        path for folder in SOURCE_DIRS for path in (PROJECT_ROOT / folder).rglob("*.py")
        if not path.is_relative_to(ENGINE_HOME) and path not in (CATALOG, ENGINE_BUGS)]
    offenders = [hit for path in files for hit in engine_name_literals(path, names)]
    assert offenders == []


def test_the_literal_finder_finds_a_comparison(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""vllm in a docstring is prose."""\nif engine == "sglang":\n    pass\n')
    assert engine_name_literals(sample, ("vllm", "sglang")) == ["sample.py:2: 'sglang'"]


def test_each_quirk_is_one_catalog_row_that_names_its_source():
    for quirk in catalog.HARDWARE_QUIRKS:
        assert quirk.engine in catalog.ENGINES and quirk.source.where
        assert quirk.refuse or quirk.image or quirk.flags or quirk.env or quirk.kv_dtype or quirk.heads_per_rank_multiple



def test_an_engine_without_its_load_metrics_is_refused_at_registration():
    class Unmeasured(Engine):  # an engine module that forgot its /metrics names
        name = "unmeasured"
        managed_flags = {}

    with pytest.raises(TypeError, match="engine 'unmeasured' refused: it declares no load_metrics"):
        engines.register(Unmeasured())
    assert "unmeasured" not in engines.names()


@pytest.mark.parametrize("stack", ["h200-int4-vllm", "h200-int4-sglang", "rtxpro6000-int4-sglang"])
def test_each_engine_instance_carries_its_engines_metric_names_to_the_node(stack):
    """Issue 20's busy-versus-stalled needs the engine's own names for its token counter and queue:
    they live in the engine's module and reach the watchdog in stack.json, per engine instance."""
    r = Resolved(load_stack_config(stack_file(stack)).spec())
    files = node_files.render_node_files(r, render_launch(r), size(r), secrets=node_files.SecretsSource("files"),
                                         ebs_volume_id=node_files.EBS_VOLUME_PLACEHOLDER)
    facts = json.loads(files[f"{node_files.ENV_DIR}/stack.json"].content)
    metrics = engines.get(r.spec.engine.name).load_metrics
    assert facts["engines"] and all(e["metrics"] == metrics.as_dict() for e in facts["engines"])
    assert metrics.generated_tokens.startswith(f"{r.spec.engine.name}:")  # the engine's own namespace
    assert set(metrics.as_dict()) == set(LOAD_KEYS)  # the keys the node's engine_load reads
