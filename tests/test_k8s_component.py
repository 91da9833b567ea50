"""KubernetesEndpoint under Pulumi mocks: what it declares, how long it waits, where the secrets go."""

import pulumi
import pytest

from kimi_fleet import k8s_manifests as manifests
from kimi_fleet.launch import render_launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import load_stack_config, stack_file
from tooling.mock_run import MockRun, run_components, secret_paths

API_KEY = "sk-test-not-a-real-key-0123456789"
HF_TOKEN = "hf_test_not_a_real_token"


def seconds(text: str) -> int:
    assert text.endswith("s"), text
    return int(text[:-1])


def resolved(stack: str) -> Resolved:
    return Resolved(load_stack_config(stack_file(stack)).spec())


def run_kubernetes_endpoint(stack: str, *, hf_token=None, api_key: str = API_KEY) -> MockRun:
    from components.kubernetes_endpoint import KubernetesEndpoint, KubernetesEndpointArgs

    def declare():
        r = resolved(stack)
        endpoint = KubernetesEndpoint("kimi", KubernetesEndpointArgs(
            resolved=r, sizing=size(r), launch=render_launch(r),
            api_key=pulumi.Output.secret(api_key), hf_token=hf_token,
        ))
        names = ["endpoint_url", "openai_base_url", "node_ids", "market", "hourly_cost_usd"]
        return {name: getattr(endpoint, name) for name in names}

    return run_components(declare, stack)


@pytest.fixture(scope="module")
def gb200():
    return run_kubernetes_endpoint("gb200-int4-vllm", hf_token=pulumi.Output.secret(HF_TOKEN))


def test_declares_the_whole_stack_as_children(gb200):
    run = gb200
    types = [r["type"] for r in run.resources]
    for typ in ("kubernetes:core/v1:Namespace", "kubernetes:core/v1:ConfigMap", "kubernetes:core/v1:PersistentVolumeClaim",
                "kubernetes:batch/v1:Job", "kubernetes:resource.k8s.io/v1:ResourceClaimTemplate",
                "kubernetes:apps/v1:Deployment", "kubernetes:core/v1:Service", "pulumi:providers:kubernetes",
                "kimi-fleet:proxy:AuthProxy"):
        assert typ in types, typ
    assert types.count("kubernetes:core/v1:Secret") == 2
    (component,) = run.of_type("kimi-fleet:kubernetes:KubernetesEndpoint")
    children = [r for r in run.resources if r is not component]
    assert all(r["parent"] == component["name"] for r in children)


def test_dra_claim_template_asks_for_four_gpus(gb200):
    run = gb200
    (template,) = run.of_type("kubernetes:resource.k8s.io/v1:ResourceClaimTemplate")
    (request,) = template["wire"]["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"]["count"] == 4 and request["exactly"]["deviceClassName"] == "gpu.nvidia.com"


def test_waits_longer_than_the_model_load(gb200):
    run = gb200
    r = resolved("gb200-int4-vllm")
    sizing = size(r)
    (deployment,) = run.of_type("kubernetes:apps/v1:Deployment")
    for phase in ("create", "update"):
        assert seconds(deployment["timeouts"][phase]) > sizing.warm_start_seconds
        assert seconds(deployment["timeouts"][phase]) > 600  # the provider's default
    (job,) = run.of_type("kubernetes:batch/v1:Job")
    assert seconds(job["timeouts"]["create"]) > sizing.download_seconds
    # The engines wait for the verified weights, the claim template, the Caddyfile and the secrets.
    names = {r["type"]: r["name"] for r in run.resources}
    for prerequisite in ("kubernetes:batch/v1:Job", "kubernetes:resource.k8s.io/v1:ResourceClaimTemplate",
                         "kubernetes:core/v1:ConfigMap", "kubernetes:core/v1:Secret"):
        assert names[prerequisite] in deployment["dependencies"], prerequisite


def test_secrets_travel_only_as_secrets(gb200):
    run = gb200
    secrets = {r["wire"]["metadata"]["name"]: r for r in run.of_type("kubernetes:core/v1:Secret")}
    assert set(secrets) == {manifests.API_KEY_SECRET, manifests.HF_TOKEN_SECRET}
    for secret in secrets.values():
        assert list(secret_paths(secret["wire"])), f"{secret['name']} carries its value in plain text"
    for registration in run.resources:
        if registration["type"] == "kubernetes:core/v1:Secret":
            continue
        plain = str(registration["wire"])
        assert API_KEY not in plain and HF_TOKEN not in plain, registration["name"]


def test_outputs(gb200):
    assert gb200.outputs == {
        "endpoint_url": "https://kimi-gb200.example.com",
        "openai_base_url": "https://kimi-gb200.example.com/v1",
        "node_ids": ["kimi-engine-on-demand"],
        "market": "on-demand",
        "hourly_cost_usd": None,
    }


def test_mi355x_without_hf_token_uses_the_vendor_resource():
    run = run_kubernetes_endpoint("mi355x-int4-sglang")
    assert not run.of_type("kubernetes:resource.k8s.io/v1:ResourceClaimTemplate")
    assert len(run.of_type("kubernetes:core/v1:Secret")) == 1
    (deployment,) = run.of_type("kubernetes:apps/v1:Deployment")
    engine = deployment["wire"]["spec"]["template"]["spec"]["containers"][0]
    assert engine["resources"]["limits"]["amd.com/gpu"] == "4"
    assert deployment["wire"]["spec"]["replicas"] == 2
    assert run.outputs["node_ids"] == ["kimi-engine-on-demand"]
