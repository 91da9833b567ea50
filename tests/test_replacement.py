"""Nothing is replaced unless the plan says so, in words (issue 20).

Every single-node AWS stack is planned under the mocks before and after one change; the two runs'
registered inputs go through kimi_fleet/replacement.py (the providers' replace-on-change inputs,
catalog.REPLACE_ON_CHANGE). Changes a release carries (a shipped file, an engine flag, the context,
the checkpoint revision, the description) replace nothing; a market change is printed as a
replacement of the node with its downtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from kimi_fleet import catalog, health, node_files
from kimi_fleet.cost import estimate
from kimi_fleet.launch import render_launch
from kimi_fleet.replacement import (NO_SERVICE_IMPACT, Replacement, replace_triggers, replacement_lines,
                                    replacements)
from kimi_fleet.resolve import Resolved
from kimi_fleet.rollout import rollout_facts
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import load_stack_config, stack_file, stack_names
from tests.matrix import REFUSED_STACKS
from tooling import mock_run
from tests.test_rollout import run_variant as run_program

INSTANCE, VOLUME = "aws:ec2/instance:Instance", "aws:ebs/volume:Volume"


def _single_node_aws_stacks() -> list[str]:
    stacks = []
    for name in stack_names():
        if name in REFUSED_STACKS:
            continue
        spec = load_stack_config(stack_file(name)).spec()
        if spec.target.kind == "aws" and spec.capacity.replicas == 1:
            stacks.append(name)
    return stacks


SINGLE_NODE_AWS = _single_node_aws_stacks()
#: One node per replica: spot, the market change below, is refused for a replica over several nodes
#: (tests/test_multi_node_aws.py).
ONE_NODE_AWS = [name for name in SINGLE_NODE_AWS if not Resolved(load_stack_config(stack_file(name)).spec()).multi_node]


def plan_resources(run) -> list[dict]:
    """What plan.py records per resource (its JSON), from a mock run."""
    return [{k: r[k] for k in ("type", "name", "parent", "inputs", "id", "protect", "ignore_changes")}
            for r in run.resources]


def run_variant(stack: str, tmp_path: Path, change=None):
    """The whole program (tests/test_rollout.py's run of the changed stack file) and plan.py's
    rollout facts for the same file."""
    run = run_program(stack, tmp_path, change)
    r = Resolved(load_stack_config(tmp_path / ("after" if change else "before") / f"Pulumi.{stack}.yaml").spec())
    sizing, launch = size(r), render_launch(r)
    return run, rollout_facts(r, sizing, launch, estimate(r)).as_dict()


def _edit_shipped_files(monkeypatch):
    """An edit to files every node gets: the applier (read at render time) and the bootstrap."""
    real = node_files.node_script
    monkeypatch.setattr(node_files, "node_script",
                        lambda name: real(name) + ("\n# edited\n" if name == "apply_release.py" else ""))
    monkeypatch.setattr(node_files, "BOOTSTRAP", node_files.BOOTSTRAP + "\n# edited\n")


#: A flag each engine's parser accepts and kimi-fleet does not render.
EXTRA_FLAG = {"sglang": "--enable-cache-report", "vllm": "--enable-prefix-caching"}


def _flag(config):
    engine = config.setdefault("kimi-fleet:engine", {})
    engine["extraArgs"] = [*engine.get("extraArgs", []), EXTRA_FLAG[engine["name"]]]


def _context(config):
    config["kimi-fleet:contextLength"] = 65536 if config.get("kimi-fleet:contextLength") == 131072 else 131072


def _revision(config):
    config["kimi-fleet:model"] = {**(config.get("kimi-fleet:model") or {}),
                                  "revision": "0123456789abcdef0123456789abcdef01234567"}


def _description(config):
    config["kimi-fleet:description"] = "a new description"


RELEASE_CHANGES = {"flag": _flag, "context": _context, "revision": _revision, "description": _description}


@pytest.mark.parametrize("stack", SINGLE_NODE_AWS)
@pytest.mark.parametrize("change", ["shipped-file", *RELEASE_CHANGES])
def test_release_changes_replace_nothing_on_a_single_node(stack, change, tmp_path, monkeypatch):
    before, before_facts = run_variant(stack, tmp_path)
    if change == "shipped-file":
        _edit_shipped_files(monkeypatch)
        after, after_facts = run_variant(stack, tmp_path, lambda config: None)
    else:
        after, after_facts = run_variant(stack, tmp_path, RELEASE_CHANGES[change])
    if change != "description":  # the change reached the plan: it is not a no-op
        assert (before_facts["release"], before_facts["checkpoint"]) != (after_facts["release"],
                                                                          after_facts["checkpoint"])
    found = replacements(plan_resources(before), plan_resources(after))
    # Only the content-addressed release bundle object may be replaced (a new key per release).
    assert {r.type for r in found} <= set(NO_SERVICE_IMPACT), replacement_lines(found, before_facts, after_facts)
    for typ in (INSTANCE, VOLUME):  # the node's and the weights volume's replace-on-change inputs, directly
        for old, new in zip(*(sorted(run.of_type(typ), key=lambda x: x["name"]) for run in (before, after))):
            assert replace_triggers(typ, old["inputs"], new["inputs"], new["ignore_changes"]) == []


@pytest.mark.parametrize("stack", ONE_NODE_AWS)
def test_a_market_change_is_printed_as_a_replacement_with_its_downtime(stack, tmp_path):
    before, before_facts = run_variant(stack, tmp_path)

    def to_spot(config):
        config["kimi-fleet:capacity"] = {**(config.get("kimi-fleet:capacity") or {}), "market": "spot"}

    after, after_facts = run_variant(stack, tmp_path, to_spot)
    found = replacements(plan_resources(before), plan_resources(after))
    node = [r for r in found if r.gpu_node]
    assert len(node) == 1 and "launchTemplate.version" in node[0].because
    assert not any(r.type == VOLUME for r in found)
    lines = replacement_lines(found, before_facts, after_facts)
    # A new instance boots and pulls the engine image too (a review found the plan left those out).
    minutes = -(-(after_facts["volume_start_seconds"] + health.BOOT_SECONDS + health.IMAGE_PULL_SECONDS) // 60)
    assert (f"the GPU node `{node[0].name}`" in lines[0] and f"about {minutes} min without service" in lines[0]
            and "the weights volume survives" in lines[0])
    # What hangs on the instance's id is replaced with it: the volume attachment and the address association.
    cascaded = {r.type for r in found if not r.gpu_node}
    assert {"aws:ec2/volumeAttachment:VolumeAttachment", "aws:ec2/eipAssociation:EipAssociation"} <= cascaded


@pytest.mark.parametrize("stack", SINGLE_NODE_AWS)
def test_a_new_zone_that_sorts_first_leaves_the_weights_volume_where_it_is(stack, tmp_path, monkeypatch):
    monkeypatch.setattr(mock_run, "ZONES", ["us-east-1b", "us-east-1c"])
    before, _ = run_variant(stack, tmp_path)
    monkeypatch.setattr(mock_run, "ZONES", ["us-east-1a", "us-east-1b", "us-east-1c"])  # AWS adds a zone
    after, _ = run_variant(stack, tmp_path, lambda config: None)
    pairs = list(zip(*(sorted(run.of_type(VOLUME), key=lambda x: x["name"]) for run in (before, after))))
    assert pairs  # one weights volume per node
    for old, new in pairs:
        assert old["inputs"]["availabilityZone"] != new["inputs"]["availabilityZone"]  # the lookup did move
        assert replace_triggers(VOLUME, old["inputs"], new["inputs"], new["ignore_changes"]) == []
        assert new["protect"] is True
    found = replacements(plan_resources(before), plan_resources(after))
    assert not any(r.type == VOLUME for r in found)


@pytest.mark.parametrize("stack", SINGLE_NODE_AWS)
def test_a_new_zone_that_sorts_first_leaves_the_node_where_it_is(stack, tmp_path, monkeypatch):
    monkeypatch.setattr(mock_run, "ZONES", ["us-east-1b", "us-east-1c"])
    before, _ = run_variant(stack, tmp_path)
    monkeypatch.setattr(mock_run, "ZONES", ["us-east-1a", "us-east-1b", "us-east-1c"])
    after, _ = run_variant(stack, tmp_path, lambda config: None)
    assert replacements(plan_resources(before), plan_resources(after)) == []


@pytest.mark.parametrize("stack", SINGLE_NODE_AWS)
def test_an_ami_is_kept_until_the_stack_pins_a_new_one(stack, tmp_path, monkeypatch):
    before, before_facts = run_variant(stack, tmp_path)
    monkeypatch.setattr(mock_run, "AMI_ID", "ami-0fedcba9876543210")  # AWS publishes a new AMI
    after, _ = run_variant(stack, tmp_path, lambda config: None)
    assert replacements(plan_resources(before), plan_resources(after)) == []

    def pin(config):
        target = config["kimi-fleet:target"]
        target["aws"] = {**(target.get("aws") or {}), "amiId": "ami-0aaaaaaaaaaaaaaaa"}

    pinned, pinned_facts = run_variant(stack, tmp_path, pin)
    found = replacements(plan_resources(before), plan_resources(pinned))
    nodes = Resolved(load_stack_config(stack_file(stack)).spec()).nodes_per_replica
    assert [r.gpu_node for r in found if r.type == INSTANCE] == [True] * nodes
    assert "without service" in replacement_lines(found, before_facts, pinned_facts)[0]


# --- the comparison itself ---------------------------------------------------------------------------


def _resource(typ, name, inputs, **extra):
    return {"type": typ, "name": name, "parent": extra.pop("parent", None), "inputs": inputs,
            "id": f"{name}-id", "protect": False, "ignore_changes": [], **extra}


def test_only_replace_on_change_inputs_that_are_not_ignored_replace():
    old = _resource(VOLUME, "w", {"availabilityZone": "us-east-1a", "size": 1000, "encrypted": True})
    bigger = _resource(VOLUME, "w", {"availabilityZone": "us-east-1a", "size": 1200, "encrypted": True})
    assert replacements([old], [bigger]) == []  # a size change is modified in place
    moved = _resource(VOLUME, "w", {"availabilityZone": "us-east-1b", "size": 1000, "encrypted": True})
    (found,) = replacements([old], [moved])
    assert found.because == ("availabilityZone",) and not found.gpu_node
    kept = {**moved, "ignore_changes": ["availabilityZone"]}
    assert replacements([old], [kept]) == []
    nested = _resource(INSTANCE, "i", {"launchTemplate": {"id": "lt", "version": "3"}})
    newer = _resource(INSTANCE, "i", {"launchTemplate": {"id": "lt", "version": "4"}})
    assert replacements([nested], [newer])[0].because == ("launchTemplate.version",)


def test_a_resource_naming_a_replaced_one_is_replaced_too():
    node = _resource("kimi-fleet:aws:GpuNode", "n", {}, parent=None)
    before = [node, _resource(INSTANCE, "i", {"launchTemplate": {"version": "1"}}, parent="n"),
              _resource("aws:ec2/eipAssociation:EipAssociation", "a", {"instanceId": "i-id", "allocationId": "e"})]
    after = [node, _resource(INSTANCE, "i", {"launchTemplate": {"version": "2"}}, parent="n"), before[2]]
    found = replacements(before, after)
    assert [(r.name, r.gpu_node) for r in found] == [("i", True), ("a", False)]
    assert found[1].because == ("instanceId (names the replaced i)",)


def test_the_words_say_downtime_weights_and_protection():
    facts = {"weights_volume": "ebs", "cold_start_seconds": 1800, "volume_start_seconds": 900,
             "fetch_seconds": 600, "checkpoint": "a@1"}
    node = Replacement(INSTANCE, "i", ("launchTemplate.version",), False, True)
    new_node = health.BOOT_SECONDS + health.IMAGE_PULL_SECONDS  # 15 min
    (line,) = replacement_lines([node], facts, facts)
    assert f"about {15 + new_node // 60} min without service" in line and "weights volume survives" in line
    assert "own verification" in line
    volume = Replacement(VOLUME, "w", ("availabilityZone",), True, False)
    node_line, volume_line = replacement_lines([node, volume], facts, facts)
    assert f"about {30 + new_node // 60} min without service" in node_line and "downloaded again" in node_line
    assert "Pulumi will refuse it" in volume_line and "weights.allowVolumeReplacement" in volume_line
    store = {**facts, "weights_volume": "instance-store"}
    assert f"about {30 + new_node // 60} min" in replacement_lines([node], store, store)[0]


def test_every_recorded_type_is_one_the_program_declares_or_may_declare():
    """A typo in a type token would silently replace nothing: each is a real pulumi_aws resource."""
    import importlib

    for token in catalog.REPLACE_ON_CHANGE:
        package, module_path, cls = token.split(":")
        module = importlib.import_module(f"pulumi_aws.{module_path.split('/')[0]}")
        assert hasattr(module, cls), token
