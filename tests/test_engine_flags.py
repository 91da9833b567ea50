"""Every stack's engine command line passes the recorded parser of the engine version its image
pins (issue 12): no unknown flag, abbreviation, deprecated spelling or bad value. The manifests are
written from the real wheels by scripts/engine_flags.py manifest, which also parses the command
lines with the real parsers (check-real)."""

from __future__ import annotations

import json

import pytest

from kimi_fleet.engines.flags import MANIFESTS, argv_problems, load_manifest, manifest_name
from kimi_fleet.launch import render_launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.stackfile import load_stack_config, stack_file
from tests.matrix import PLANNED_STACKS


#: Every stack whose spec is valid: planned ones, and those sized and laid out but not deployable yet.
PARSED_STACKS = [*PLANNED_STACKS, "h100-int4-vllm"]


@pytest.mark.parametrize("name", PARSED_STACKS)
def test_every_engine_argv_passes_its_pinned_parser(name):
    r = Resolved(load_stack_config(stack_file(name)).spec())
    entry = r.image_entry
    assert entry is not None, f"{name}: image {r.image} is not in the catalog, so no parser version is known"
    manifest = load_manifest(r.spec.engine.name, entry.package_version)
    assert manifest, (f"no manifest {manifest_name(r.spec.engine.name, entry.package_version)}: run "
                      "scripts/engine_flags.py manifest in a venv holding that wheel")
    for rank in range(r.nodes_per_replica):  # every node of a multi-node replica
        for instance in render_launch(r, rank).instances:
            args = list(instance.argv[len(r.adapter.entrypoint_words(r)):])
            assert argv_problems(args, manifest) == [], instance.argv


def test_manifests_come_from_the_script_and_name_their_version():
    paths = [p for p in MANIFESTS.iterdir() if p.name.endswith(".json")]
    assert len(paths) >= 4
    for path in paths:
        document = json.loads(path.read_text())
        assert path.name == f"{document['engine']}-{document['version']}.json"
        assert document["generated_by"] == "scripts/engine_flags.py manifest" and len(document["options"]) > 200


@pytest.mark.parametrize("args,engine,version,problem", [
    (["--tp", "8"], "sglang", "0.5.12.post1", "an abbreviation of"),
    (["--no-such-flag"], "sglang", "0.5.12.post1", "not an option"),
    (["--kv-cache-dtype", "fp4_bogus"], "sglang", "0.5.12.post1", "not one of"),
    (["--enable-metrics=1"], "sglang", "0.5.12.post1", "takes no value"),
    (["--mem-fraction-static"], "sglang", "0.5.12.post1", "needs a value"),
    (["--stream-output"], "sglang", "0.5.12.post1", "deprecated"),
    (["/models/kimi", "--attention-config.use_trtllm_ragged_deepseek_prefill=True"], "vllm", "0.22.1", "has no key"),
    (["/models/kimi", "/models/other"], "vllm", "0.22.1", "no flag takes"),
])
def test_the_manifest_check_refuses_what_the_parser_would(args, engine, version, problem):
    problems = argv_problems(args, load_manifest(engine, version))
    assert problems and problem in problems[0], problems


def test_the_seeds_prefill_option_exists_in_0_19_1_only():
    """Seed 004's --attention-config.use_trtllm_ragged_deepseek_prefill: vLLM 0.19.1 has it, 0.22.1
    dropped it (the real 0.22.1 parser refuses it too): the gb200 stack pins 0.19.1."""
    arg = ["/models/kimi", "--attention-config.use_trtllm_ragged_deepseek_prefill=True"]
    assert argv_problems(arg, load_manifest("vllm", "0.19.1")) == []
    assert argv_problems(arg, load_manifest("vllm", "0.22.1"))


def test_a_stack_is_refused_before_anything_is_declared_when_the_parser_would_refuse_it():
    from kimi_fleet.spec import StackSpecError
    from kimi_fleet.validation import parse_spec

    base = {"accelerator": "gb200", "acceleratorCount": 4, "domain": "kimi.example.com",
            "target": {"kind": "kubernetes"}}
    ragged = "--attention-config.use_trtllm_ragged_deepseek_prefill=True"
    with pytest.raises(StackSpecError) as refused:
        parse_spec({**base, "engine": {"name": "vllm", "image": "vllm/vllm-openai:v0.22.1", "extraArgs": [ragged],
                                       "memoryFraction": 0.9}, "kvCacheDtype": "fp8"}, "t", "stacks/Pulumi.t.yaml")
    message = str(refused.value)
    assert "field kimi-fleet:engine.extraArgs" in message and "has no key 'use_trtllm_ragged_deepseek_prefill'" in message
    with pytest.raises(StackSpecError, match="--enable-mixed-chunk-prefill: not an option of vllm 0.19.1"):
        parse_spec({**base, "engine": {"name": "vllm", "image": "vllm/vllm-openai:v0.19.1-cu130",
                                       "extraArgs": ["--enable-mixed-chunk-prefill"]}}, "t", "stacks/Pulumi.t.yaml")
