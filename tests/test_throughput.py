"""Throughput facts and $/M tokens (issue 25, item 2): every fact states its source, model, engine,
hardware, checkpoint, layout, workload, concurrency and per-user speed; a stack is priced for chat and
agentic only from a Kimi-K2.6 fact of its own engine, hardware, checkpoint and engine layout; the plan
shows the per-user speed and the fact's name beside the price, and `plan.py --all` ranks by $/M."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_fleet import catalog
from kimi_fleet.cost import PRICED_MODEL, estimate, matching_facts, stack_layout
from kimi_fleet.resolve import Resolved
from kimi_fleet.stackfile import load_stack_config, stack_file
from kimi_fleet.validation import parse_spec
from tests.matrix import PLANNED_STACKS

ROOT = Path(__file__).resolve().parents[1]
FACTS = {t.name: t for t in catalog.MEASURED_THROUGHPUT}
K26_DRAFT = {"speculative": "eagle3", "speculativeDraftRepo": "lightseekorg/kimi-k2.6-eagle3-mla"}


def variant(stack: str, engine: dict | None = None, **top) -> Resolved:
    values = copy.deepcopy(load_stack_config(stack_file(stack)).values)
    if engine:
        values["engine"] = {**values["engine"], **engine}
    values.update(top)
    return Resolved(parse_spec(values, stack, f"stacks/Pulumi.{stack}.yaml"))


def test_every_fact_names_its_source_model_layout_workload_and_speed():
    assert len(FACTS) == len(catalog.MEASURED_THROUGHPUT)  # names are unique: the plan cites them
    for t in catalog.MEASURED_THROUGHPUT:
        assert t.source.where and t.source.date and t.model and t.engine in catalog.ENGINES
        assert t.accelerator in catalog.ACCELERATORS and t.checkpoint in catalog.CHECKPOINTS
        assert t.workload.kind in (*catalog.WORKLOAD_KINDS, "other") and t.workload.description
        assert t.output_tokens_per_second_per_gpu > 0 and t.engines >= 1
        if t.layout.tensor_parallel is not None:  # one engine's GPUs are its TP x PP ranks
            assert t.gpus_per_engine == t.layout.tensor_parallel * t.layout.pipeline_parallel, t.name
        if t.workload.kind in catalog.WORKLOAD_KINDS:  # a priced figure is quoted at a per-user speed
            assert t.model == PRICED_MODEL and t.per_user_tokens_per_second and t.concurrency, t.name


@pytest.mark.parametrize("name,gpus,per_gpu,per_user,concurrency", [
    # Dynamo recipes/kimi-k2.6/README.md, "Performance results" (4 worker replicas each)
    ("dynamo-h200-int4-tp8-chat", 8, 38.7, 54.86, 32),
    ("dynamo-h200-int4-tp8-agentic", 8, 66.5, 56.06, 48),
    ("dynamo-b200-nvfp4-tp4-chat", 4, 107.8, 49.86, 48),
    ("dynamo-b200-nvfp4-tp4-agentic", 4, 166.5, 55.50, 64),
])
def test_dynamo_rows_are_recorded_as_published(name, gpus, per_gpu, per_user, concurrency):
    t = FACTS[name]
    assert (t.gpus_per_engine, t.output_tokens_per_second_per_gpu, t.per_user_tokens_per_second,
            t.concurrency, t.engines) == (gpus, per_gpu, per_user, concurrency, 4)
    assert t.layout == catalog.Layout(gpus, speculative=catalog.EAGLE3_K26_MLA)
    assert "synthetic acceptance" in t.conditions and "KV-aware routing" in t.conditions


def test_seed_004_is_the_run_without_the_draft():
    t = FACTS["seed004-gb200-int4-tp4-8k1k"]
    assert t.layout == catalog.Layout(4) and t.output_tokens_per_second_per_engine == pytest.approx(1181.84)
    assert t.per_user_tokens_per_second == pytest.approx(1000 / 24.35, abs=0.1)


def test_a_stack_on_a_facts_layout_is_priced_for_chat_and_agentic_at_the_facts_per_user_speed():
    r = variant("h200-int4-vllm", engine=K26_DRAFT)  # 2 spot replicas of 8x H200, TP8 + the K2.6 MLA draft
    cost = estimate(r)
    for kind, name in (("chat", "dynamo-h200-int4-tp8-chat"), ("agentic", "dynamo-h200-int4-tp8-agentic")):
        w, t = cost.workloads[kind], FACTS[name]
        assert w["fact"] == name and w["per_user_tokens_per_second"] == t.per_user_tokens_per_second
        fleet_rate = t.output_tokens_per_second_per_gpu * 8 * 2
        assert w["usd_per_million_output_tokens"] == pytest.approx(cost.fleet_usd_per_hour / (fleet_rate * 3600 / 1e6),
                                                                   abs=0.01)
    assert cost.usd_per_million_output_tokens == cost.workloads["chat"]["usd_per_million_output_tokens"]
    assert cost.throughput_note is None


def test_b200_nvfp4_at_tp4_with_the_k26_draft_matches_dynamos_b200_rows():
    values = copy.deepcopy(load_stack_config(stack_file("b200-nvfp4-vllm")).values)
    values.update(acceleratorCount=4, target={"kind": "host"}, engine={**values["engine"], **K26_DRAFT})
    values.pop("capacity"), values.pop("weights")
    r = Resolved(parse_spec(values, "b200-tp4", "f"))
    assert {k: t.name for k, t in matching_facts(r).items()} == {
        "chat": "dynamo-b200-nvfp4-tp4-chat", "agentic": "dynamo-b200-nvfp4-tp4-agentic"}


@pytest.mark.parametrize("engine,why", [
    ({}, "no draft: Dynamo measured with EAGLE3"),
    ({"speculative": "eagle3", "speculativeDraftRepo": "lightseekorg/kimi-k2.6-eagle3"}, "seed 004's older draft"),
])
def test_a_layout_that_differs_is_not_priced_and_the_plan_names_what_exists(engine, why):
    cost = estimate(variant("h200-int4-vllm", engine=engine))
    assert cost.usd_per_million_output_tokens is None and all(w is None for w in cost.workloads.values()), why
    assert "no published throughput for this layout" in cost.throughput_note
    assert "dynamo-h200-int4-tp8-chat" in cost.throughput_note  # the facts for the hardware are named
    assert "other models (never priced):" in cost.throughput_note and "inferencex-h200-int4-tp8" in cost.throughput_note


def test_other_models_never_price_even_on_their_own_layout():
    """seed 001 measured SGLang TP8 on 8x H200 INT4, but Kimi-K2.5: a plain TP8 SGLang stack stays unpriced."""
    r = variant("h200-int4-sglang", parallelism={"dataParallel": 1, "dpAttention": False})
    assert stack_layout(r) == FACTS["seed001-h200-int4-tp8-c16"].layout
    cost = estimate(r)
    assert cost.usd_per_million_output_tokens is None and "seed001-h200-int4-tp8-c16" in cost.throughput_note


@pytest.mark.parametrize("name", PLANNED_STACKS)
def test_no_planned_stack_is_priced_from_a_fact_whose_layout_differs(name):
    r = Resolved(load_stack_config(stack_file(name)).spec())
    for kind, w in estimate(r).workloads.items():
        if w is None:
            continue
        t = FACTS[w["fact"]]
        assert (t.model, t.engine, t.accelerator, t.checkpoint, t.layout, t.workload.kind) == (
            PRICED_MODEL, r.spec.engine.name, r.accelerator.id, r.checkpoint.id, stack_layout(r), kind), name


def test_ranking_orders_by_chat_cost_and_names_the_unpriced():
    sys.path.insert(0, str(ROOT / "scripts"))
    from plan import ranked_lines

    def plan(stack, chat):
        workloads = {"chat": None if chat is None else {"usd_per_million_output_tokens": chat,
                                                         "per_user_tokens_per_second": 50.0, "fact": f"f-{stack}"},
                     "agentic": None}
        return {"stack": stack, "valid": True, "cost": {"usd_per_million_output_tokens": chat, "workloads": workloads}}

    lines = ranked_lines([plan("dear", 9.5), plan("none", None), plan("cheap", 2.25)])
    assert lines[1] == "  1. cheap: chat $2.25 at 50 tok/s/user (f-cheap)"
    assert lines[2] == "  2. dear: chat $9.50 at 50 tok/s/user (f-dear)"
    assert lines[3].startswith("  not priced: none ")


def test_plan_all_has_the_per_user_column_and_the_ranked_section(plan_all):
    assert plan_all.returncode == 0, plan_all.stderr[-3000:]
    out = plan_all.stdout
    assert out.splitlines()[0].split()[-2:] == ["tok/s/u", "market"]
    assert "$/M output tokens, ranked" in out and "not priced:" in out


# --- scripts/bench_throughput.py (issue 25, item 3) ----------------------------------------------

#: vllm bench serve's own result keys (vllm 0.22.1 benchmarks/serve.py), with seed 004's figures.
SEED_004_RESULT = {"output_throughput": 1181.84, "mean_tpot_ms": 24.35, "max_concurrency": 32, "completed": 32}
FAKE_VLLM = r"""#!/usr/bin/env python3
import json, os, sys
argv = sys.argv[1:]
assert argv[:2] == ["bench", "serve"], argv
assert os.environ["OPENAI_API_KEY"] == "sk-test" and "sk-test" not in argv
out = os.path.join(argv[argv.index("--result-dir") + 1], argv[argv.index("--result-filename") + 1])
json.dump(%s, open(out, "w"))
""" % json.dumps(SEED_004_RESULT)


def bench():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_throughput

    return bench_throughput


def test_bench_result_becomes_a_fact_in_the_catalogs_format():
    b = bench()
    r = Resolved(load_stack_config(stack_file("gb200-int4-vllm")).spec())
    doc = b.fact_from_result(r, SEED_004_RESULT, catalog.CHAT, 32, "https://kimi-gb200.example.com", "2026-12-07")
    fact = b.throughput_from_fact(json.loads(json.dumps(doc)))
    assert fact.output_tokens_per_second_per_gpu == FACTS["seed004-gb200-int4-tp4-8k1k"].output_tokens_per_second_per_gpu
    assert fact.per_user_tokens_per_second == pytest.approx(41.1, abs=0.05) and fact.concurrency == 32
    assert (fact.model, fact.engine, fact.accelerator, fact.checkpoint, fact.layout) == (
        PRICED_MODEL, "vllm", "gb200", "int4", stack_layout(r))
    assert fact.workload.kind == "chat" and "prefix" in fact.conditions and fact.source.date == "2026-12-07"


def test_bench_runs_the_engines_tool_with_the_key_in_its_environment_only(tmp_path):
    (tmp_path / "vllm").write_text(FAKE_VLLM)
    (tmp_path / "vllm").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "KIMI_API_KEY": "sk-test"}
    run = subprocess.run([sys.executable, "scripts/bench_throughput.py", "run", "h200-int4-vllm", "--base-url",
                          "https://kimi.example.com/", "--out", str(tmp_path / "out")], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    fact = json.loads((tmp_path / "out" / "h200-int4-vllm-chat-c32.fact.json").read_text())
    assert fact["output_tokens_per_second_per_gpu"] == round(1181.84 / 16, 2)  # 2 replicas x 8 GPUs
    assert fact["engines"] == 2 and fact["workload"]["input_tokens"] == catalog.CHAT.input_tokens


@pytest.mark.parametrize("stack,tool", [("h200-int4-vllm", ["vllm", "bench", "serve"]),
                                        ("h200-int4-sglang", ["python3", "-m", "sglang.bench_serving"])])
def test_bench_argv_uses_the_recipes_workload_through_the_proxy(stack, tool, tmp_path):
    b = bench()
    r = Resolved(load_stack_config(stack_file(stack)).spec())
    argv = b.tool_argv(r, "https://kimi.example.com/", catalog.AGENTIC, 16, 160, tmp_path / "r.json")
    assert argv[:len(tool)] == tool and argv[argv.index("--base-url") + 1] == "https://kimi.example.com"
    assert argv[argv.index("--random-input-len") + 1] == "65536" and argv[argv.index("--random-output-len") + 1] == "400"
    assert argv[argv.index("--max-concurrency") + 1] == "16" and r.spec.model.served_name in argv


def test_bench_argv_parses_in_vllms_own_parser(tmp_path):
    """With KIMI_FLEET_VLLM_PYTHON pointing at an interpreter holding the pinned vllm wheel."""
    python = os.environ.get("KIMI_FLEET_VLLM_PYTHON")
    if not python:
        pytest.skip("set KIMI_FLEET_VLLM_PYTHON to an interpreter holding the pinned vllm wheel")
    r = Resolved(load_stack_config(stack_file("h200-int4-vllm")).spec())
    argv = bench().tool_argv(r, "https://kimi.example.com", catalog.CHAT, 32, 320, tmp_path / "r.json")[3:]
    probe = ("import argparse, json, sys\nfrom vllm.benchmarks.serve import add_cli_args\n"
             "p = argparse.ArgumentParser(); add_cli_args(p); ns = p.parse_args(json.loads(sys.argv[1]))\n"
             "print(json.dumps([ns.backend, ns.endpoint, ns.served_model_name, ns.random_input_len, ns.max_concurrency]))")
    run = subprocess.run([python, "-c", probe, json.dumps(argv)], capture_output=True, text=True, timeout=600, cwd="/")
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == ["openai-chat", "/v1/chat/completions", "kimi-k2.6",
                                                              1024, 32]


def test_a_host_or_cluster_that_states_its_node_price_is_priced_like_a_catalog_machine():
    """Issue 25: hosts and clusters price themselves with capacity.nodeHourlyUsd; $/M then follows where a
    K2.6 fact matches the layout (here the b200 TP4 host with the K2.6 draft: Dynamo's B200 rows)."""
    values = copy.deepcopy(load_stack_config(stack_file("b200-nvfp4-vllm")).values)
    values.update(acceleratorCount=4, target={"kind": "host"}, engine={**values["engine"], **K26_DRAFT},
                  capacity={"nodeHourlyUsd": 28.5})
    values.pop("weights")
    cost = estimate(Resolved(parse_spec(values, "b200-tp4", "f")))
    assert cost.fleet_usd_per_hour == 28.5 and "capacity.nodeHourlyUsd" in cost.note + cost.price_source
    chat = FACTS["dynamo-b200-nvfp4-tp4-chat"]
    assert cost.usd_per_million_output_tokens == pytest.approx(
        28.5 / (chat.output_tokens_per_second_per_gpu * 4 * 3600 / 1e6), abs=0.01)
    # Without it a host stays unpriced, and the plan says which field prices it.
    unpriced = estimate(Resolved(load_stack_config(stack_file("mi300x-int4-sglang")).spec()))
    assert unpriced.fleet_usd_per_hour is None and "capacity.nodeHourlyUsd" in unpriced.note
    # A Kubernetes stack: every node of every replica.
    values = copy.deepcopy(load_stack_config(stack_file("mi355x-int4-sglang")).values)
    values["capacity"] = {**values.get("capacity", {}), "nodeHourlyUsd": 40.0}
    r = Resolved(parse_spec(values, "mi355x-int4-sglang", "f"))
    assert estimate(r).fleet_usd_per_hour == 40.0 * r.spec.capacity.replicas
    # A batch cluster (spot by default): the stated price is what a node costs whatever the market.
    values["capacity"] = {**values["capacity"], "workload": "batch"}
    batch = Resolved(parse_spec(values, "mi355x-int4-sglang", "f"))
    assert batch.spec.capacity.effective_market == "spot"
    assert estimate(batch).fleet_usd_per_hour == 40.0 * batch.spec.capacity.replicas


def test_a_stated_node_price_is_refused_where_the_catalog_prices_the_machine():
    values = copy.deepcopy(load_stack_config(stack_file("h200-int4-sglang")).values)
    values["capacity"] = {**values.get("capacity", {}), "nodeHourlyUsd": 10.0}
    from kimi_fleet.spec import StackSpecError
    with pytest.raises(StackSpecError, match=r"capacity.nodeHourlyUsd \(given 10.0\): this stack's machine "
                                              r"\(p5en.48xlarge\) is priced from the catalog's snapshot"):
        Resolved(parse_spec(values, "h200-int4-sglang", "stacks/Pulumi.h200-int4-sglang.yaml"))


def test_the_k26_mla_draft_is_sized_as_a_latent_layer_in_the_pool_and_its_weights():
    """Issue 25 done-when: the sizing covers EAGLE3 with the K2.6 draft. That draft's attention is MLA: its
    KV is one more 576-element latent per token, on every rank, in the pool's dtype; the older GQA draft
    (seed 004's memory point) keeps its own reserve."""
    from kimi_fleet.sizing import size
    plain = variant("b300-nvfp4-vllm")
    mla = variant("b300-nvfp4-vllm", engine=K26_DRAFT)
    assert mla.draft_has_mla and not plain.draft_has_mla
    bytes_per = catalog.KV_DTYPE_BYTES[mla.kv_cache_dtype]
    latent = catalog.KIMI_K26.kv_elements_per_token // catalog.KIMI_K26.layers
    assert size(plain).kv_bytes_per_token == catalog.KIMI_K26.layers * latent * bytes_per
    assert size(mla).kv_bytes_per_token == (catalog.KIMI_K26.layers + 1) * latent * bytes_per
    assert size(mla).reserve_items["EAGLE3 draft weights (MLA draft)"] == catalog.EAGLE3_MLA_DRAFT_BYTES // 4
    assert size(mla).kv_tokens_per_device < size(plain).kv_tokens_per_device
    gqa = variant("b300-nvfp4-vllm", engine={"speculative": "eagle3",
                                             "speculativeDraftRepo": "lightseekorg/kimi-k2.6-eagle3"})
    assert not gqa.draft_has_mla and "EAGLE3 draft weights and KV" in size(gqa).reserve_items
    assert size(gqa).kv_bytes_per_token == size(plain).kv_bytes_per_token
