"""KubernetesEndpoint under Pulumi mocks: what it declares, how long it waits, where the secrets go."""

import copy

import kubernetes_validate
import pulumi
import pytest

from components.kubernetes_endpoint import SCALED_REPLICAS_PATH, SKIP_AWAIT_ANNOTATION

from kimi_fleet import k8s_manifests as manifests
from kimi_fleet.k8s_deletion_cost import NAME as DELETION_COST
from kimi_fleet.launch import render_launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import load_stack_config, stack_file
from kimi_fleet.validation import parse_spec
from tooling.mock_run import MockRun, run_components, secret_paths

API_KEY = "sk-test-not-a-real-key-0123456789"
HF_TOKEN = "hf_test_not_a_real_token"
K8S_VERSION = kubernetes_validate.latest_version()


def seconds(text: str) -> int:
    assert text.endswith("s"), text
    return int(text[:-1])


def resolved(stack: str) -> Resolved:
    return Resolved(load_stack_config(stack_file(stack)).spec())


def run_kubernetes_endpoint(stack: str, *, hf_token=None, api_key: str = API_KEY, r: Resolved | None = None) -> MockRun:
    """`r`: the stack as resolved by the caller (a change the stack file does not carry)."""
    from components.kubernetes_endpoint import KubernetesEndpoint, KubernetesEndpointArgs
    given = r

    def declare():
        r = given or resolved(stack)
        endpoint = KubernetesEndpoint("kimi", KubernetesEndpointArgs(
            resolved=r, sizing=size(r), launch=render_launch(r),
            api_key=pulumi.Output.secret(api_key), hf_token=hf_token,
        ))
        names = ["endpoint_url", "openai_base_url", "node_ids", "market", "hourly_cost_usd", "fleet_rollout"]
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


def test_the_gate_not_pulumi_awaits_the_deployments(gb200):
    """Issue 20: the provider would wait out the whole deadline on a crash-looping pod and leave the
    Deployment on the bad release; the gate's wait fails within minutes and undoes it."""
    run = gb200
    r = resolved("gb200-int4-vllm")
    sizing = size(r)
    (deployment,) = run.of_type("kubernetes:apps/v1:Deployment")
    # Forced: a fixed stack's count is its own (test_k8s_scaling_to_fixed).
    assert deployment["wire"]["metadata"]["annotations"] == {SKIP_AWAIT_ANNOTATION: "true",
                                                             "pulumi.com/patchForce": "true"}
    assert not deployment["timeouts"]  # nothing to wait for: the gate's wait has its own deadline
    # What Pulumi applies is still a valid Deployment (the annotation is metadata, not spec).
    applied = {"apiVersion": "apps/v1", "kind": "Deployment",
               **{key: value for key, value in deployment["wire"].items() if key in ("metadata", "spec")}}
    template = applied["spec"]["template"]["metadata"]["annotations"]
    assert template[manifests.RELEASE_ANNOTATION] == manifests.manifest_release(r, sizing, render_launch(r),
                                                                                stack="gb200-int4-vllm")
    kubernetes_validate.validate(applied, K8S_VERSION, strict=True)
    # The gate waits for the Deployments as applied, with the sizing's windows.
    assert gb200.outputs["fleet_rollout"] == {
        **manifests.rollout_wait(r, sizing), "deployments": [deployment["wire"]["metadata"]["name"]]}
    wait = gb200.outputs["fleet_rollout"]
    assert wait["kind"] == "kubernetes" and wait["namespace"] == "kimi-gb200"
    assert wait["pod_ready_seconds"] > manifests.startup_window_seconds(sizing) > sizing.volume_start_seconds
    assert wait["timeout_seconds"] >= wait["pod_ready_seconds"] * manifests.engine_pod_count(r)
    (job,) = run.of_type("kubernetes:batch/v1:Job")
    assert seconds(job["timeouts"]["create"]) > sizing.download_seconds
    # The engines wait for the verified weights, the claim template, the Caddyfile and the secrets.
    # Every one of them, not the last registered of each type (the mocks' order varies); the Grafana
    # dashboard's ConfigMap is monitoring, which no workload waits for.
    for prerequisite in ("kubernetes:batch/v1:Job", "kubernetes:resource.k8s.io/v1:ResourceClaimTemplate",
                         "kubernetes:core/v1:ConfigMap", "kubernetes:core/v1:Secret"):
        wanted = [r["name"] for r in run.of_type(prerequisite)
                  if r["wire"]["metadata"]["name"] != manifests.DASHBOARD_CONFIGMAP]
        assert wanted and all(name in deployment["dependencies"] for name in wanted), (prerequisite, wanted)
    (dashboard,) = [r for r in run.of_type("kubernetes:core/v1:ConfigMap")
                    if r["wire"]["metadata"]["name"] == manifests.DASHBOARD_CONFIGMAP]
    assert dashboard["name"] not in deployment["dependencies"]


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
        "fleet_rollout": gb200.outputs["fleet_rollout"],
    }


def test_mi355x_without_hf_token_uses_the_vendor_resource():
    run = run_kubernetes_endpoint("mi355x-int4-sglang")
    assert not run.of_type("kubernetes:resource.k8s.io/v1:ResourceClaimTemplate")
    assert len(run.of_type("kubernetes:core/v1:Secret")) == 1
    (deployment,) = engine_deployments(run)
    engine = deployment["wire"]["spec"]["template"]["spec"]["containers"][0]
    assert engine["resources"]["limits"]["amd.com/gpu"] == "4"
    # The stack scales (2-6 on its queue): created at its start count, which KEDA's HPA owns after.
    assert deployment["wire"]["spec"]["replicas"] == 2
    assert deployment["ignore_changes"] == [SCALED_REPLICAS_PATH]
    (scaled,) = run.of_type("kubernetes:keda.sh/v1alpha1:ScaledObject")
    assert (scaled["wire"]["spec"]["minReplicaCount"], scaled["wire"]["spec"]["maxReplicaCount"]) == (2, 6)
    assert scaled["wire"]["spec"]["scaleTargetRef"]["name"] == deployment["wire"]["metadata"]["name"]
    assert run.outputs["node_ids"] == ["kimi-engine-on-demand"]


@pytest.mark.parametrize("stack", ["gb200-int4-vllm", "mi355x-int4-sglang"])
def test_the_stacks_gate_waits_for_the_rollout_and_has_time_to_undo_it(stack):
    """The whole program: the gate runs scripts/await_k8s_rollout.py (with the Deployments as applied)
    before the suite, and Pulumi gives its command the rollout and an undo as long, or the suite's wait."""
    from components.verification_gate import K8S_ROLLOUT_SCRIPT, k8s_rollout_wait_seconds
    from tooling.mock_run import run_stack

    run = run_stack(stack)
    assert run.error is None, run.error
    (gate,) = [c for c in run.of_type("command:local:Command") if c["name"].endswith("-gate-verify")]
    steps = gate["wire"]["create"].split(" && ")
    wait = next(i for i, step in enumerate(steps) if K8S_ROLLOUT_SCRIPT in step)
    assert "scripts/verify.py" in steps[wait + 1]
    r = resolved(stack)
    sizing = size(r)
    rollout = manifests.rollout_wait(r, sizing)
    for name in rollout["deployments"]:
        assert f"--deployment {name}" in steps[wait]
    assert f"--timeout {rollout['timeout_seconds']}" in steps[wait]
    ready = int(steps[wait + 1].split("--wait-ready ")[1].split()[0])
    for phase in ("create", "update"):
        budget = seconds(gate["timeouts"][phase])
        assert budget > k8s_rollout_wait_seconds(rollout)
        assert budget > rollout["timeout_seconds"] + ready


# --- replicas KEDA owns: set on create, kept across a fixed -> scaling change and later updates ---------

def _with_capacity(stack: str, capacity: dict) -> Resolved:
    values = copy.deepcopy(load_stack_config(stack_file(stack)).values)
    values["capacity"] = capacity
    if "scaling" in capacity:
        values["target"]["kubernetes"]["prometheusUrl"] = "http://prometheus.observability.svc:9090"
    return Resolved(parse_spec(values, stack, f"stacks/Pulumi.{stack}.yaml"))


def _path_get(obj: dict, path: str):
    for key in path.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _path_set(obj: dict, path: str, value) -> dict:
    obj = copy.deepcopy(obj)
    *parents, leaf = path.split(".")
    node = obj
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return obj


def applied_on_update(old_inputs: dict, new_inputs: dict, ignore_changes: list[str], live: dict,
                      other_managers: set[str]) -> dict:
    """What `pulumi up` sends to the API server when it updates an object, as the two steps that read
    ignore_changes do it (a model of their source, not the engine run):
    1. the engine: each ignored path takes its old input's value, or is removed when the old inputs had
       none (resource.PropertyPath.Reset, processIgnoreChanges in pulumi/pulumi);
    2. the provider (server-side apply, provider/pkg/await/await.go handleSSAIgnoreFields in
       pulumi/pulumi-kubernetes): an ignored field another manager owns (and Pulumi does not) is left
       out of the apply; otherwise it takes the live value.
    `other_managers`: the ignored paths a manager other than Pulumi owns (the HPA's scale writes)."""
    sent = new_inputs
    for path in ignore_changes:
        sent = _path_set(sent, path, _path_get(old_inputs, path))
    for path in ignore_changes:
        if path in other_managers:
            sent = _path_set(sent, path, None)
        elif _path_get(live, path) is not None:
            sent = _path_set(sent, path, _path_get(live, path))
    return sent


def replicas_after_apply(sent: dict, live: dict, owned_by_others: bool) -> int:
    """The Deployment's count after a server-side apply of `sent`: the sent count; else the live one
    while another manager owns it; else the field is released and takes its default, 1 (the
    Kubernetes server-side apply docs, "Field management"; the HPA docs' warning)."""
    if "replicas" in sent["spec"]:
        return sent["spec"]["replicas"]
    return live["spec"]["replicas"] if owned_by_others else 1


def engine_deployments(run: MockRun) -> list[dict]:
    """The engines' Deployments (a scaling stack also runs its deletion-cost controller's)."""
    return [d for d in run.of_type("kubernetes:apps/v1:Deployment")
            if d["wire"]["metadata"]["name"] != DELETION_COST]


def _the_deployment(run: MockRun) -> dict:
    (deployment,) = engine_deployments(run)
    return deployment


SCALING_1_TO_4 = {"replicas": 1, "scaling": {"minReplicas": 1, "maxReplicas": 4, "waitingPerReplica": 8}}


def test_a_new_scaling_stack_starts_at_its_start_count_and_keda_owns_it_after():
    r = _with_capacity("gb200-int4-vllm", SCALING_1_TO_4)
    deployment = _the_deployment(run_kubernetes_endpoint("gb200-int4-vllm", r=r))
    # Created with the count a first deploy starts with (the range's minimum here), not the default 1 by
    # accident of a missing field; the count is ignored on every update after.
    assert deployment["wire"]["spec"]["replicas"] == 1 == manifests.scaled_deployment_start(r)[1]
    assert deployment["ignore_changes"] == [SCALED_REPLICAS_PATH]
    # The YAML a hand-applier uses names no count (a `kubectl apply` of one would reset the HPA's).
    (rendered,) = [o for o in manifests.render_manifests(r, size(r), render_launch(r), stack=r.spec.stack)
                   if o["kind"] == "Deployment"]
    assert "replicas" not in rendered["spec"]
    # A later `pulumi up` with KEDA at 4: the HPA owns the field, the apply leaves it out, 4 stays.
    live = {"spec": {"replicas": 4}}
    sent = applied_on_update(deployment["wire"], deployment["wire"], deployment["ignore_changes"], live,
                             other_managers={SCALED_REPLICAS_PATH})
    assert replicas_after_apply(sent, live, owned_by_others=True) == 4


def test_a_fixed_stack_keeps_its_count_in_pulumis_hands():
    r = _with_capacity("gb200-int4-vllm", {"replicas": 3})
    deployment = _the_deployment(run_kubernetes_endpoint("gb200-int4-vllm", r=r))
    assert deployment["wire"]["spec"]["replicas"] == 3 and deployment["ignore_changes"] == []
    assert manifests.scaled_deployment_start(r) is None


def test_a_running_fixed_stack_turned_scaling_keeps_its_pods_until_keda_acts():
    """Fixed at 3 pods, then capacity.scaling 1-4 (start count 1): the update keeps 3 (Pulumi owned the
    field and keeps it at the live value) where a Deployment without the field dropped to 1; once KEDA
    has set 2, the next `pulumi up` leaves 2."""
    fixed = _the_deployment(run_kubernetes_endpoint(
        "gb200-int4-vllm", r=_with_capacity("gb200-int4-vllm", {"replicas": 3})))
    scaling = _the_deployment(run_kubernetes_endpoint(
        "gb200-int4-vllm", r=_with_capacity("gb200-int4-vllm", SCALING_1_TO_4)))
    assert scaling["name"] == fixed["name"] and scaling["type"] == fixed["type"]  # an update, not a replacement
    live = {"spec": {"replicas": 3}}
    sent = applied_on_update(fixed["wire"], scaling["wire"], scaling["ignore_changes"], live, other_managers=set())
    assert replicas_after_apply(sent, live, owned_by_others=False) == 3
    # KEDA scales to 2 (the HPA's scale write takes the field); the next update leaves it there.
    live = {"spec": {"replicas": 2}}
    sent = applied_on_update(scaling["wire"], scaling["wire"], scaling["ignore_changes"], live,
                             other_managers={SCALED_REPLICAS_PATH})
    assert replicas_after_apply(sent, live, owned_by_others=True) == 2
