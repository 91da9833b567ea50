"""Where the deploy-time pins reach the nodes, under the mock runtime (issue 21, items 1 and 4): an
external mirror's manifest is checked by a deployer-side command on every target that fetches from
it, the node's settings take the digest that command prints, a startup-script-only host cannot
carry one and is refused, and a managed-mirror AWS stack hands the gate what it needs to promote a
compile-cache candidate (the commands themselves run for real in test_manifest_pin.py and
test_verification_gate_promotion.py)."""

from __future__ import annotations

import json

import pulumi
import pytest

from kimi_fleet import node_files
from kimi_fleet.launch import render_launch
from kimi_fleet.sizing import size
from tests.test_host_target import API_KEY, commands, resolved, run_host_endpoint
from tooling.mock_run import run_components

MIRROR = {"source": "s3-mirror", "s3MirrorUri": "s3://my-own-mirror/weights"}


def _settings(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_an_ssh_host_reading_a_mirror_gets_the_manifest_digest_the_deployer_checked():
    base = resolved("rtxpro6000-int4-sglang")
    r = resolved("rtxpro6000-int4-sglang", weights={**base.spec.weights.model_dump(by_alias=True, exclude_none=True),
                                                     **MIRROR})
    run = run_host_endpoint(r)
    (check,) = [c for c in run.of_type("command:local:Command") if c["name"].endswith("-mirror-pin-check")]
    create = check["inputs"]["create"]
    assert "scripts/pin_mirror_manifest.py --mirror s3://my-own-mirror/weights" in create and r.revision in create
    bundle = json.loads(commands(run)["kimi-bundle"]["inputs"]["stdin"])  # the release the host applies
    (node_env,) = [f["content"] for f in bundle["files"] if f["path"] == node_files.NODE_ENV_FILE]
    # Under the mocks the check printed nothing: the placeholder, which every node refuses.
    assert _settings(node_env)["MIRROR_MANIFEST_SHA256"] == node_files.MANIFEST_SHA256_PLACEHOLDER
    # A Hub-only stack has no such check.
    assert not [c for c in run_host_endpoint(base).of_type("command:local:Command") if "mirror-pin" in c["name"]]


def test_a_startup_script_only_host_cannot_read_a_mirror():
    r = resolved("spheron-h200-int4-vllm")
    r = resolved("spheron-h200-int4-vllm", weights={**r.spec.weights.model_dump(by_alias=True, exclude_none=True),
                                                    **MIRROR})
    with pytest.raises(Exception, match=r"s3-mirror with target.host.startupScriptOnly.*SHA-256"):
        run_host_endpoint(r, ssh=False)


def _aws_endpoint(r):
    from components.aws_endpoint import AwsEndpoint, AwsEndpointArgs

    def declare():
        endpoint = AwsEndpoint("kimi", AwsEndpointArgs(r, size(r), render_launch(r), pulumi.Output.secret(API_KEY)))
        return {"promotion": endpoint.compile_cache_promotion}

    return run_components(declare, r.spec.stack)


def test_an_aws_stack_on_an_external_mirror_checks_its_manifest_before_any_node():
    base = resolved("h200-int4-vllm")
    r = resolved("h200-int4-vllm", weights={**base.spec.weights.model_dump(by_alias=True, exclude_none=True),
                                            **MIRROR, "mirror": "external"})
    run = _aws_endpoint(r)
    (check,) = [c for c in run.of_type("command:local:Command") if c["name"].endswith("-mirror-pin-check")]
    assert "--region us-east-1" in check["inputs"]["create"]
    assert check["name"] in run.named("kimi-node")["dependencies"]  # no GPU node before the check passed
    assert run.outputs["promotion"] is None  # an external bucket: no shared compile cache


@pytest.mark.parametrize("stack", ["h200-int4-sglang", "h200-int4-vllm"])
def test_a_managed_mirror_stack_hands_the_gate_its_promotion(stack):
    r = resolved(stack)
    run = _aws_endpoint(r)
    launch = render_launch(r)
    digest = node_files.compile_cache_launch_digest(launch, stack)
    promotion = run.outputs["promotion"]
    assert promotion["launch"] == digest and promotion["stack"] == stack
    assert promotion["pin_parameter"] == node_files.compile_cache_pin_parameter(f"/kimi-fleet/{stack}", digest)
    assert promotion["cache_prefix"] == node_files.compile_cache_key_prefix(r)
    assert promotion["bucket"] == r.spec.weights.s3_mirror_location[0]
    if r.spec.capacity.replicas > 1:  # a fleet: any instance of its group
        assert promotion["group"] and "instance_ids" not in promotion
    else:  # one node: that instance only
        assert len(promotion["instance_ids"]) == 1 and "group" not in promotion
