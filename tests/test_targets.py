"""The target seam (issue 13): targets are modules behind one interface; nothing outside
kimi_fleet/targets/ branches on the target kind; a field picks among several offers."""

from __future__ import annotations

import ast
import dataclasses
import typing

import pytest

from kimi_fleet import catalog, targets
from kimi_fleet.resolve import Resolved
from kimi_fleet.spec import TARGET_KINDS, StackSpecError, TargetSpec
from kimi_fleet.stackfile import PROJECT_ROOT, load_stack_config, stack_file
from kimi_fleet.validation import parse_spec

TARGET_HOME = PROJECT_ROOT / "kimi_fleet" / "targets"
SPEC = PROJECT_ROOT / "kimi_fleet" / "spec.py"


def kind_comparisons(path) -> list[str]:
    """`<anything>.target.kind == / != / in ...` comparisons: a branch on the target kind."""
    hits = []
    label = path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path.name
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                if (isinstance(side, ast.Attribute) and side.attr == "kind" and isinstance(side.value, ast.Attribute)
                        and side.value.attr == "target"):
                    hits.append(f"{label}:{node.lineno}")
    return hits


def test_nothing_outside_the_target_modules_branches_on_the_target_kind():
    files = [PROJECT_ROOT / "__main__.py"] + [
        path for folder in ("kimi_fleet", "components", "scripts", "policy", "tooling")
        for path in (PROJECT_ROOT / folder).rglob("*.py") if not path.is_relative_to(TARGET_HOME) and path != SPEC]
    assert [hit for path in files for hit in kind_comparisons(path)] == []


def test_the_finder_finds_a_branch(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("if r.spec.target.kind == 'aws':\n    pass\n")
    assert kind_comparisons(sample) == ["sample.py:1"]


def test_every_kind_the_spec_accepts_has_a_target_and_an_endpoint_component():
    from components.fleet import ENDPOINTS

    variants = typing.get_args(typing.get_args(TargetSpec)[0])
    kinds = {typing.get_args(variant.model_fields["kind"].annotation)[0] for variant in variants}
    assert kinds == set(ENDPOINTS) == set(TARGET_KINDS)
    for kind in kinds:
        spec = parse_spec({"accelerator": "h200", "engine": {"name": "vllm"}, "target": {"kind": kind},
                           "domain": "kimi.example.com", "contextLength": 4096}, "t", "f")
        assert targets.for_spec(spec).kind == kind


def _cloud(**host) -> dict:
    return {"accelerator": "h200", "engine": {"name": "vllm"}, "domain": "kimi.example.com",
            "target": {"kind": "host", "host": {"startupScriptOnly": True, **host}}}


def test_a_field_picks_among_several_offers_for_one_accelerator(monkeypatch):
    default = Resolved(parse_spec(_cloud(), "t", "f"))
    assert default.offer.instance_type == "spheron-8x-h200-sxm5"
    other = dataclasses.replace(default.offer, instance_type="othercloud-8x-h200", on_demand_usd_per_hour=99.0)
    monkeypatch.setitem(catalog.MACHINE_OFFERS, other.instance_type, other)
    assert Resolved(parse_spec(_cloud(), "t", "f")).offer.instance_type == "spheron-8x-h200-sxm5"  # the cheaper
    chosen = Resolved(parse_spec(_cloud(offer="othercloud-8x-h200"), "t", "f"))
    assert chosen.offer.instance_type == "othercloud-8x-h200"


def test_an_unknown_offer_or_an_offer_without_a_startup_script_cloud_is_refused():
    with pytest.raises(StackSpecError, match="target.host.offer .given 'nocloud-8x-h200'.: no GPU-cloud offer"):
        parse_spec(_cloud(offer="nocloud-8x-h200"), "t", "f")
    with pytest.raises(StackSpecError, match="applies with startupScriptOnly"):
        parse_spec({**_cloud(), "target": {"kind": "host", "host": {"offer": "spheron-8x-h200-sxm5"}}}, "t", "f")


@pytest.mark.parametrize("stack,kind,manifests", [
    ("h200-int4-vllm", "aws", False), ("gb200-int4-vllm", "kubernetes", True),
    ("rtxpro6000-int4-sglang", "host", False), ("spheron-h200-int4-vllm", "host", False)])
def test_each_stack_gets_its_target(stack, kind, manifests):
    r = Resolved(load_stack_config(stack_file(stack)).spec())
    assert r.target.kind == kind and r.target.renders_manifests == manifests
    assert r.weights_volume in r.target.weight_volumes


@pytest.mark.parametrize("target,expected", [
    ({"kind": "aws", "host": {"user": "x"}}, "field kimi-fleet:target.host: settings for a host target, but target.kind is 'aws'"),
    ({"kind": "aws", "aws": {"regoin": "x"}}, "field kimi-fleet:target.aws.regoin (given 'x'): unknown key (did you mean 'region'?)"),
    ({"kind": "gcp"}, "field kimi-fleet:target.kind (given 'gcp'): must be one of aws, kubernetes, host"),
    ({"kind": "host", "host": {"port": 99999}}, "field kimi-fleet:target.host.port (given 99999)"),
])
def test_the_target_union_reports_fields_as_the_stack_file_spells_them(target, expected):
    with pytest.raises(StackSpecError) as refused:
        parse_spec({"accelerator": "h200", "engine": {"name": "vllm"}, "target": target,
                    "domain": "kimi.example.com"}, "t", "f")
    assert expected in str(refused.value)


def test_the_schema_offers_each_kind_its_own_section():
    import json

    schema = json.loads((PROJECT_ROOT / "stacks" / "schema.json").read_text())
    text = json.dumps(schema)
    assert '"discriminator"' in text and "AwsTargetSpec" in text and "HostTargetSpec" in text


@pytest.mark.parametrize("stack, accepted", [("gb200-int4-vllm", False), ("rtxpro6000-int4-sglang", True),
                                             ("spheron-h200-int4-vllm", True), ("h200-int4-sglang", True)])
def test_only_targets_whose_download_reads_a_mirror_accept_one(stack, accepted):
    # A Kubernetes download Job fetches from the Hub: a mirror there would be a silent lie (and its
    # deadline, sized for the mirror's rate, far too short for the Hub).
    values = load_stack_config(stack_file(stack)).values
    mirrored = {**values, "weights": {**values.get("weights", {}), "source": "s3-mirror",
                                      "s3MirrorUri": "s3://my-weights/hf"}}
    if accepted:
        assert Resolved(parse_spec(mirrored, stack, "f")).spec.weights.source == "s3-mirror"
    else:
        with pytest.raises(StackSpecError, match=r"weights.source .given 's3-mirror'.: a kubernetes target's "
                                                 r"weights download fetches from the Hugging Face Hub"):
            parse_spec(mirrored, stack, "f")
