"""The plan shows what SGLang really runs with (issue 25, item 4): under DP attention its own
ServerArgs post-init divides --chunked-prefill-size by dp_size (catalog.SGLANG_DP_ATTENTION_CHUNK,
file:line per release). The plan sizes and prints each rank's effective chunk and says the engine
rewrites the flag. With KIMI_FLEET_SGLANG_PYTHON pointing at an interpreter that holds the pinned
sglang wheel (CPU is enough), the rendered command lines go through SGLang's own parser and its own
`_handle_data_parallelism`, and the recorded line is checked in that release."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_fleet import catalog
from kimi_fleet.launch import render_launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import load_stack_config, stack_file
from kimi_fleet.validation import parse_spec

ROOT = Path(__file__).resolve().parents[1]
RULE = catalog.SGLANG_DP_ATTENTION_CHUNK
DP_ATTENTION_STACKS = ("h200-int4-sglang", "b300-int4-sglang")

#: Runs in the engine's interpreter: SGLang's parser, then the post-init step that applies the rule.
#: A "dummy" model path makes __post_init__ return before the steps that need a GPU or the model's
#: config, so the step is called by itself, on the values the parser produced.
PROBE = r"""
import argparse, inspect, json, sys
import sglang
from sglang.srt.server_args import ServerArgs
out = []
for argv in json.loads(sys.argv[1]):
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(argv)
    ns.model_path = "dummy"
    args = ServerArgs.from_cli_args(ns)
    given = args.chunked_prefill_size
    args._handle_data_parallelism()
    out.append({"given": given, "effective": args.chunked_prefill_size})
src, start = inspect.getsourcelines(ServerArgs._handle_data_parallelism)
line = next(start + i for i, text in enumerate(src) if "self.chunked_prefill_size // self.dp_size" in text)
print(json.dumps({"version": sglang.__version__, "results": out, "line": line}))
"""


def variant(stack: str, **edits) -> Resolved:
    values = copy.deepcopy(load_stack_config(stack_file(stack)).values)
    for key, value in edits.items():
        values[key] = {**values.get(key, {}), **value}
    return Resolved(parse_spec(values, stack, f"stacks/Pulumi.{stack}.yaml"))


def engine_args(r: Resolved) -> list[str]:
    argv = list(render_launch(r).instances[0].argv)
    return argv[len(r.adapter.entrypoint_words(r)):]


def flag(argv: list[str], name: str) -> int:
    return int(argv[argv.index(name) + 1])


def cases() -> list[Resolved]:
    stacks = [Resolved(load_stack_config(stack_file(name)).spec()) for name in DP_ATTENTION_STACKS]
    chosen = variant("h200-int4-sglang", engine={"maxNumBatchedTokens": 2048, "memoryFraction": 0.8})
    plain = variant("h200-int4-sglang", parallelism={"dataParallel": 1, "dpAttention": False})
    return [*stacks, chosen, plain]


def printed_sizing(r: Resolved) -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    from plan import print_sizing

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_sizing({"sizing": size(r).as_dict()})
    return out.getvalue()


def test_the_rule_is_recorded_for_every_pinned_sglang_release_that_runs_dp_attention():
    versions = {image.package_version for image in catalog.ENGINE_IMAGES.values() if image.engine == "sglang"
                and image.vendor in ("nvidia", "amd")}
    assert versions <= set(RULE.releases), versions - set(RULE.releases)
    for where in RULE.releases.values():
        assert where.startswith("python/sglang/srt/server_args.py:") and "_handle_data_parallelism" in where


@pytest.mark.parametrize("stack", DP_ATTENTION_STACKS)
def test_a_dp_attention_stack_is_sized_and_printed_with_each_ranks_chunk(stack):
    r = Resolved(load_stack_config(stack_file(stack)).spec())
    given, dp = flag(engine_args(r), "--chunked-prefill-size"), r.spec.parallelism.data_parallel
    sizing = size(r)
    assert sizing.per_rank["prefill tokens per step"] == given // dp == 1024
    (adjustment,) = sizing.engine_adjustments
    assert (adjustment["given"], adjustment["effective"]) == (given, given // dp)
    assert adjustment["where"] == f"sglang {r.image_entry.package_version} {RULE.releases[r.image_entry.package_version]}"
    text = printed_sizing(r)
    assert "prefill tokens per step 1,024" in text and "prefill tokens per step 8,192" not in text
    assert f"the engine runs --chunked-prefill-size {given} as 1,024 on each of {dp} DP attention ranks" in text
    assert "The chunked prefill size is adjusted to 1024 to avoid MoE kernel issues" in text


def test_the_printed_value_follows_the_layout():
    """The same stack without DP attention: the engine keeps the flag, and the plan says so."""
    plain = variant("h200-int4-sglang", parallelism={"dataParallel": 1, "dpAttention": False})
    assert size(plain).engine_adjustments == []
    text = printed_sizing(plain)
    assert "prefill tokens per step 8,192" in text and "the engine runs" not in text


def _engine_python() -> str:
    python = os.environ.get("KIMI_FLEET_SGLANG_PYTHON")
    if not python:
        pytest.skip("set KIMI_FLEET_SGLANG_PYTHON to an interpreter holding the pinned sglang wheel")
    return python


def test_sglangs_own_post_init_gives_the_values_the_plan_prints():
    python = _engine_python()
    resolved = cases()
    argvs = [engine_args(r) for r in resolved]
    run = subprocess.run([python, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True, timeout=600,
                         cwd="/")
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    version = report["version"]
    assert f"server_args.py:{report['line']} " in RULE.releases[version]  # the recorded line is the rule's
    for r, argv, result in zip(resolved, argvs, report["results"]):
        assert result["given"] == flag(argv, "--chunked-prefill-size")
        assert result["effective"] == size(r).per_rank["prefill tokens per step"], argv
    # The DP8 stacks run 1,024 (the figure); a chosen 2,048 per rank is rendered as 16,384.
    assert [x["effective"] for x in report["results"]] == [1024, 1024, 2048, 8192]
