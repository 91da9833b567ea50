"""Day two (issue 9): a change to what runs on a node reaches every running node, and the gate
checks the release it is meant to check. The whole program runs under the mocks twice, before and
after a one-field change of a real stack file, and the declared resources are compared."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pulumi
import pytest

from kimi_fleet import catalog
import yaml

from kimi_fleet.cost import estimate
from kimi_fleet.launch import render_launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.rollout import RolloutFacts, impact, rollout_facts
from kimi_fleet.sizing import size
from kimi_fleet.validation import parse_spec
from kimi_fleet.stackfile import load_stack_config, stack_file
from tooling.mock_run import MockRun, mock_instance_id, run_config

LT = "aws:ec2/launchTemplate:LaunchTemplate"
INSTANCE = "aws:ec2/instance:Instance"
ASG = "aws:autoscaling/group:Group"
GATE_COMMAND = "command:local:Command"
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
#: A scaling stack's other Deployment (its deletion-cost controller: test_deletion_cost_manifests).
DELETION_COST = "kimi-deletion-cost"
REMOTE = "command:remote:Command"
UNPINNED_VERSIONS = ("$Latest", "$Default")


def _document(stack: str) -> dict:
    return yaml.safe_load(stack_file(stack).read_text())


def run_variant(stack: str, tmp_path: Path, change=None) -> MockRun:
    """The whole program for `stack`, its stack file changed by `change(config)`."""
    document = _document(stack)
    if change:
        change(document["config"])
    directory = tmp_path / ("after" if change else "before")
    directory.mkdir(exist_ok=True)
    path = directory / f"Pulumi.{stack}.yaml"
    path.write_text(yaml.safe_dump(document))
    run = run_config(load_stack_config(path))
    assert run.error is None, run.error
    return run


def _engine(config: dict) -> dict:
    return config.setdefault("kimi-fleet:engine", {})


def change_image(config: dict) -> None:
    """The same engine release rebuilt under a new pinned tag."""
    engine = _engine(config)
    if not engine.get("image"):
        values = {key.split(":", 1)[1]: value for key, value in config.items()}
        engine["image"] = render_launch(Resolved(parse_spec(values, "x", "stacks/Pulumi.x.yaml"))).image
    engine["image"] += "-rebuild1"


def change_flag(config: dict) -> None:
    config["kimi-fleet:engine"] = {**_engine(config), "extraArgs": [*_engine(config).get("extraArgs", []),
                                                                   "--enable-cache-report"]}


def change_revision(config: dict) -> None:
    model = dict(config.get("kimi-fleet:model") or {})
    model["revision"] = "0123456789abcdef0123456789abcdef01234567"
    config["kimi-fleet:model"] = model


CHANGES = {"image": change_image, "flag": change_flag, "revision": change_revision}


def gate_command(run: MockRun) -> list[str]:
    (gate,) = [r for r in run.of_type(GATE_COMMAND) if r["name"].endswith("gate-verify")]
    return shlex.split(gate["inputs"]["create"].split("&&", 1)[1])


def released(run: MockRun) -> str:
    return run.outputs["release"]


def _versions(node, path="") -> list[tuple[str, object]]:
    """Every launch-template `version` field anywhere in a resource's inputs."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "version" and ("launchTemplate" in path or "LaunchTemplate" in path):
                found.append((path, value))
            found += _versions(value, f"{path}.{key}")
    elif isinstance(node, list):
        for value in node:
            found += _versions(value, path)
    return found


def gpu_instances(run) -> list[dict]:
    """The stack's GPU node instances (not the managed mirror's one-shot fill instance)."""
    return [r for r in run.of_type(INSTANCE) if "-fill-" not in r["name"]]


# --- every AWS stack follows its template ----------------------------------------------------

@pytest.mark.parametrize("stack", ["h200-int4-sglang", "h200-int4-vllm", "b200-nvfp4-vllm", "b300-int4-sglang"])
def test_no_stack_uses_a_template_version_that_cannot_change(stack, tmp_path):
    run = run_variant(stack, tmp_path)
    # The managed mirror's fill instance is one-shot (no template, nothing to roll out): GPU capacity is not.
    fills = [r for r in run.of_type(INSTANCE) if "-fill-" in r["name"]]
    assert all(r["inputs"]["instanceType"] == catalog.FILL_INSTANCE.instance_type for r in fills)
    consumers = gpu_instances(run) + run.of_type(ASG)
    assert consumers
    for resource in consumers:
        versions = _versions(resource["inputs"])
        assert versions, resource["name"]
        for path, value in versions:
            assert value not in UNPINNED_VERSIONS and str(value).isdigit(), (resource["name"], path, value)
    for group in run.of_type(ASG):
        # The group stays on the last good version (the engine keeps it); the fleet gate starts the
        # instance refresh with the new version as its desired configuration (commit 6836c84).
        assert "instanceRefresh" not in group["inputs"]
        assert "mixedInstancesPolicy.launchTemplate.launchTemplateSpecification.version" in group["ignore_changes"]


BUNDLE = "aws:s3/bucketObjectv2:BucketObjectv2"
ASSOCIATION = "aws:ssm/association:Association"


def _apply_command(run: MockRun) -> str:
    (association,) = run.of_type(ASSOCIATION)
    return association["inputs"]["parameters"]["commands"]


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_single_node_change_is_applied_in_place_and_the_gate_checks_the_new_release(change, tmp_path):
    stack = "h200-int4-sglang"
    before, after = run_variant(stack, tmp_path), run_variant(stack, tmp_path, CHANGES[change])
    assert released(before) != released(after)
    # The launch template and so the instance stay: the boot stub names the pointer, not a release.
    (old_template,), (new_template,) = before.of_type(LT), after.of_type(LT)
    assert old_template["inputs"]["userData"] == new_template["inputs"]["userData"]
    (old_instance,), (new_instance,) = gpu_instances(before), gpu_instances(after)
    assert old_instance["inputs"]["launchTemplate"] == new_instance["inputs"]["launchTemplate"]
    # A new bundle, a pointer to it, and an association command naming it: SSM applies it in place.
    (old_bundle,), (new_bundle,) = before.of_type(BUNDLE), after.of_type(BUNDLE)
    assert old_bundle["inputs"]["key"] != new_bundle["inputs"]["key"]
    digest = new_bundle["inputs"]["key"].removeprefix("releases/").removesuffix(".json")
    assert f"--expect {digest};" in _apply_command(after) and _apply_command(before) != _apply_command(after)
    (association,) = after.of_type(ASSOCIATION)
    assert association["inputs"]["targets"] == [{"key": "InstanceIds", "values": [mock_instance_id(new_instance["name"])]}]
    assert association["inputs"]["waitForSuccessTimeoutSeconds"] > 0
    command = gate_command(after)
    assert command[command.index("--release") + 1] == released(after)
    (old_gate,), (new_gate,) = ([r for r in run.of_type(GATE_COMMAND) if r["name"].endswith("gate-verify")]
                                for run in (before, after))
    assert old_gate["inputs"]["triggers"] != new_gate["inputs"]["triggers"]


def test_single_node_new_root_volume_replaces_the_instance(tmp_path):
    def bigger(config):
        target = config["kimi-fleet:target"]
        target["aws"] = {**(target.get("aws") or {}), "rootVolumeGib": 400}

    stack = "h200-int4-sglang"
    before, after = run_variant(stack, tmp_path), run_variant(stack, tmp_path, bigger)
    (old_instance,), (new_instance,) = gpu_instances(before), gpu_instances(after)
    assert old_instance["inputs"]["launchTemplate"]["version"] != new_instance["inputs"]["launchTemplate"]["version"]


@pytest.mark.parametrize("rollout, bounds", [("one-at-a-time", (50, 100)), ("surge", (100, 150))])
def test_fleet_change_starts_an_instance_refresh(rollout, bounds, tmp_path):
    stack = "h200-int4-vllm"  # two replicas behind an NLB

    def with_rollout(config):
        config["kimi-fleet:capacity"] = {**(config.get("kimi-fleet:capacity") or {}), "rollout": rollout}

    def and_new_image(config):
        with_rollout(config)
        change_image(config)

    before, after = run_variant(stack, tmp_path, with_rollout), None
    after_dir = tmp_path / "second"
    after_dir.mkdir()
    after = run_variant(stack, after_dir, and_new_image)
    (old_group,), (new_group,) = before.of_type(ASG), after.of_type(ASG)
    old_version = _versions(old_group["inputs"])[0][1]
    new_version = _versions(new_group["inputs"])[0][1]
    assert old_version != new_version  # a new template version: what the gate's refresh rolls out
    from components.gpu_node import refresh_percentages

    percentages = refresh_percentages(2, rollout)
    assert (percentages["min_healthy_percentage"], percentages["max_healthy_percentage"]) == bounds
    command = gate_command(after)
    assert command[command.index("--replicas") + 1] == "2"
    assert command[command.index("--release") + 1] == released(after) != released(before)


def test_rotating_the_key_reaches_the_aws_node_in_place():
    from tests.test_aws_stacks import resolved as aws_resolved
    from tooling.mock_run import run_components

    def run_with(key: str) -> MockRun:
        from components.aws_endpoint import AwsEndpoint, AwsEndpointArgs

        r = aws_resolved("h200-int4-sglang")

        def declare():
            endpoint = AwsEndpoint("kimi", AwsEndpointArgs(resolved=r, sizing=size(r), launch=render_launch(r),
                                                           api_key=pulumi.Output.secret(key), hf_token=None))
            return {"node_ids": endpoint.node_ids}

        return run_components(declare, "h200-int4-sglang")

    first, second = run_with("first-key-0123456789abcdef"), run_with("second-key-0123456789abcdef")
    (a,), (b,) = gpu_instances(first), gpu_instances(second)
    # The bundle names the key's SSM version: a rotation is a new bundle applied in place (the
    # bootstrap fetches the key again and restarts Caddy), not a new node.
    assert a["inputs"]["launchTemplate"] == b["inputs"]["launchTemplate"]
    assert _apply_command(first) != _apply_command(second)
    for run, key in ((first, "first-key-0123456789abcdef"), (second, "second-key-0123456789abcdef")):
        for resource in run.of_type(LT) + run.of_type(BUNDLE) + run.of_type(ASSOCIATION):
            assert key not in json.dumps(resource["inputs"])


# --- Kubernetes ------------------------------------------------------------------------------

def test_kubernetes_change_rolls_the_pods_and_a_caddyfile_change_does_too(tmp_path):
    stack = "gb200-int4-vllm"

    def new_email(config):
        config["kimi-fleet:acmeEmail"] = "ops-rotated@example.com"

    def engine_env(config):
        # Not an image change: an unknown rebuilt tag is sized the conservative way (vLLM CUDA graphs
        # inside the budget), which no longer fits this stack's full-length bf16 context.
        _engine(config).setdefault("env", {})["NCCL_DEBUG"] = "WARN"

    before = run_variant(stack, tmp_path)
    for name, change in (("engine-env", engine_env), ("caddyfile", new_email)):
        directory = tmp_path / name
        directory.mkdir()
        after = run_variant(stack, directory, change)
        old, new = before.of_type(DEPLOYMENT)[0], after.of_type(DEPLOYMENT)[0]
        old_annotations = old["inputs"]["spec"]["template"]["metadata"]["annotations"]
        new_annotations = new["inputs"]["spec"]["template"]["metadata"]["annotations"]
        # A new pod template: the Deployment rolls, even when only the ConfigMap changed.
        assert old_annotations["kimi-fleet/release"] != new_annotations["kimi-fleet/release"] == released(after)


def test_kubernetes_key_rotation_rolls_the_pods():
    from tests.test_k8s_component import run_kubernetes_endpoint

    def annotation(key: str) -> str:
        run = run_kubernetes_endpoint("gb200-int4-vllm", api_key=key)
        (deployment,) = run.of_type(DEPLOYMENT)[:1]
        return deployment["inputs"]["spec"]["template"]["metadata"]["annotations"]["kimi-fleet/api-key-version"]

    assert annotation("first-key-0123456789abcdef") != annotation("second-key-0123456789abcdef")


@pytest.mark.parametrize("rollout, strategy", [("one-at-a-time", {"maxSurge": 0, "maxUnavailable": 1}),
                                               ("surge", {"maxSurge": 1, "maxUnavailable": 0})])
def test_kubernetes_rollout_strategy(rollout, strategy, tmp_path):
    def with_rollout(config):
        config["kimi-fleet:capacity"] = {**(config.get("kimi-fleet:capacity") or {}), "rollout": rollout}

    run = run_variant("mi355x-int4-sglang", tmp_path, with_rollout)
    engines = [d for d in run.of_type(DEPLOYMENT) if d["inputs"]["metadata"]["name"] != DELETION_COST]
    assert engines
    for deployment in engines:
        assert deployment["inputs"]["spec"]["strategy"]["rollingUpdate"] == strategy


# --- existing host ---------------------------------------------------------------------------

def test_host_flag_change_ships_a_new_bundle_and_reruns_the_applier(tmp_path):
    stack = "rtxpro6000-int4-sglang"
    before, after = run_variant(stack, tmp_path), run_variant(stack, tmp_path, change_flag)
    old = {r["name"]: r for r in before.of_type(REMOTE)}
    new = {r["name"]: r for r in after.of_type(REMOTE)}
    changed = sorted(name for name in old.keys() & new.keys() if old[name]["inputs"] != new[name]["inputs"])
    (bundle,) = [name for name in changed if name.endswith("-bundle")]

    def argv(run: dict) -> str:
        (text,) = [f["content"] for f in json.loads(run[bundle]["inputs"]["stdin"])["files"]
                   if f["path"].endswith("engine-0.argv.json")]
        return text

    assert json.loads(argv(new)) == [*json.loads(argv(old)), "--enable-cache-report"]  # the flag, appended
    (bootstrap,) = [name for name in new if name.endswith("-bootstrap") and "-file-" not in name]
    assert bootstrap in changed and old[bootstrap]["inputs"]["triggers"] != new[bootstrap]["inputs"]["triggers"]


# --- the plan says what a change does to running nodes --------------------------------------

def facts(stack: str, **capacity) -> RolloutFacts:
    config = load_stack_config(stack_file(stack))
    values = json.loads(json.dumps(config.values))
    if capacity:
        values["capacity"] = {**(values.get("capacity") or {}), **capacity}
    return _facts(values, stack)


def _facts(values: dict, stack: str) -> RolloutFacts:
    r = Resolved(parse_spec(values, stack, f"stacks/Pulumi.{stack}.yaml"))
    sizing = size(r)
    return rollout_facts(r, sizing, render_launch(r), estimate(r))


def changed(stack: str, edit, **capacity) -> tuple[RolloutFacts, RolloutFacts]:
    values = json.loads(json.dumps(load_stack_config(stack_file(stack)).values))
    if capacity:
        values["capacity"] = {**(values.get("capacity") or {}), **capacity}
    before = _facts(values, stack)
    edit(values)
    return before, _facts(values, stack)


def _flag(values: dict) -> None:
    # An option of every pinned engine release (the stack is checked against the real parsers).
    extra = [*values["engine"].get("extraArgs", []), "--enable-mfu-metrics"]
    values["engine"] = {**values["engine"], "extraArgs": extra}


def test_impact_for_a_single_aws_node_in_place_or_replaced():
    before, after = changed("h200-int4-sglang", _flag)
    line = impact(before, after)
    assert line.startswith("in place (SSM): caddy.service, kimi-engine@0.service restart")
    assert f"about {-(-after.warm_start_seconds // 60)} min without service" in line
    assert impact(before, before) is None

    def bigger(values):
        values["target"] = {**values["target"], "aws": {**(values["target"].get("aws") or {}), "rootVolumeGib": 400}}

    before, after = changed("h200-int4-sglang", bigger)
    assert impact(before, after).startswith("replace: a new p5en.48xlarge instance")


def test_impact_rolling_for_a_fleet_and_kubernetes():
    before, after = changed("h200-int4-vllm", _flag)
    line = impact(before, after)
    assert line.startswith("rolling: one of 2 replicas out at a time") and "1/2 capacity" in line
    before, after = changed("h200-int4-vllm", _flag, rollout="surge")
    line = impact(before, after)
    assert line.startswith("rolling: no downtime; one extra p5en.48xlarge") and "+$" in line
    before, after = changed("gb200-int4-vllm", _flag)
    assert impact(before, after).startswith("rolling (one replica): the pod restarts")


def test_impact_in_place_on_a_host_names_the_units():
    before, after = changed("rtxpro6000-int4-sglang", _flag)
    # Caddy restarts with every release: it stamps the new release id on every answer.
    assert impact(before, after) == (f"in place: caddy.service, kimi-engine@0.service restart; about "
                                     f"{-(-after.warm_start_seconds // 60)} min without service "
                                     "(the weights are already on the disk)")

    def email(values):
        values["acmeEmail"] = "ops-rotated@example.com"

    before, after = changed("rtxpro6000-int4-sglang", email)
    assert impact(before, after) == ("in place: caddy.service restart; a few seconds without service, "
                                     "engines keep running")

    def firewall(values):
        values["target"] = {**values["target"], "host": {**(values["target"].get("host") or {}),
                                                         "firewall": True, "sshAllowlist": ["203.0.113.0/24"]}}

    before, after = changed("rtxpro6000-int4-sglang", firewall)
    assert impact(before, after) == ("in place: caddy.service, kimi-firewall.service restart; a few seconds without "
                                     "service, engines keep running")


def _revision(values: dict) -> None:
    values["model"] = {**(values.get("model") or {}), "revision": "b" * 40}


def test_impact_of_a_new_checkpoint_says_where_it_goes_and_when_service_stops():
    # EBS 1000 GiB holds one 595 GB checkpoint, not two: the old one goes first (weights_room.py).
    before, after = changed("h200-int4-sglang", _revision)
    line = impact(before, after)
    assert line.startswith(f"in place (SSM): the new checkpoint moonshotai/Kimi-K2.6@{'b' * 40} is downloaded "
                           "after deleting the old one (the 1,000 GiB volume cannot hold two 595 GB checkpoints; "
                           "a rollback downloads it again) while the old engine serves"), line
    assert f"(about {-(-after.fetch_seconds // 60)} min); then caddy.service, kimi-engine@0.service restart" in line
    assert f"about {-(-after.volume_start_seconds // 60)} min without service (a cold read" in line
    assert after.volume_start_seconds > after.warm_start_seconds  # not the warm restart of a flag change

    def bigger_volume(values):
        _revision(values)
        values["weights"] = {**values["weights"], "ebsSizeGib": 1200}

    before, after = changed("h200-int4-sglang", bigger_volume)
    assert "is downloaded beside the old one (kept for a rollback) while the old engine serves" in impact(before, after)

    # A host's disk is not known here; the node decides.
    before, after = changed("rtxpro6000-int4-sglang", _revision)
    assert impact(before, after).startswith(
        f"in place: the new checkpoint moonshotai/Kimi-K2.6@{'b' * 40} is downloaded beside the old one if the "
        "disk has room, else after deleting the old one while the old engine serves")

    # Kubernetes with a PVC: the download Job runs before the pods roll.
    before, after = changed("gb200-int4-vllm", _revision)
    line = impact(before, after)
    assert "after the download Job fetched the new checkpoint" in line and "while the old pods serve" in line, line
    assert line.endswith(f"about {-(-after.volume_start_seconds // 60)} min without service")

    # Instance store: every new node downloads anyway.
    before, after = changed("h200-int4-vllm", _revision)
    assert impact(before, after).endswith("weights downloaded again)")


def test_facts_planned_by_an_older_ref_still_compare():
    before, after = changed("h200-int4-sglang", _flag)
    old = {key: value for key, value in before.as_dict().items()
           if key not in ("checkpoint", "checkpoint_bytes", "weights_volume_bytes", "fetch_seconds",
                          "volume_start_seconds")}
    old["a_field_this_code_does_not_know"] = 1
    line = impact(RolloutFacts.from_dict(old), after)
    assert line.startswith("in place (SSM): caddy.service, kimi-engine@0.service restart"), line


def test_impact_of_resizing_the_ebs_weights_volume():
    def size(gib):
        def edit(values):
            values["weights"] = {**values["weights"], "ebsSizeGib": gib}
        return edit

    before, after = changed("h200-int4-sglang", size(1400))
    assert before.release != after.release  # node.env asks the node for the new size
    line = impact(before, after)
    assert line.endswith("engines keep running; the weights volume and its filesystem grow online to 1400 GiB"), line
    assert impact(*changed("h200-int4-sglang", size(800))) == (
        "refused by AWS: an EBS volume cannot shrink (1000 GiB to 800 GiB); `pulumi up` would fail at the volume")
