"""Review finding F7 (issue 24): a scaling Kubernetes stack turned back into a fixed one, under the
mocks, with a model of what the API server does with the applies (tests/test_k8s_component's
applied_on_update models the two steps that read ignore_changes; this file adds the conflict rule).

What happens, from the sources (docs/changing-a-running-stack.md says it for an operator):
- Once KEDA's HPA has scaled the Deployment, "kube-controller-manager" (subresource scale) owns
  spec.replicas (pulumi/pulumi-kubernetes#2569, pulumi/pulumi#13321 show the conflict it makes), and
  its managedFields entry outlives the HPA.
- pulumi-kubernetes applies without force unless the object carries pulumi.com/patchForce (or the
  provider enables it): provider/pkg/await/await.go ssaUpdate and patchForce. A fixed count that
  differs from the HPA's is then a conflict ("Apply failed with 1 conflict"), at preview already
  (the preview is a dry-run apply), and forever after, since the entry stays.
- Pulumi deletes what the program no longer declares at the end of the update, after every create
  and update (pulumi/pulumi#16589, maintainer's answer): the ScaledObject, and with it KEDA's HPA,
  outlive the Deployment's update and can rescale it until then (the pods roll meanwhile: a fixed
  stack's pods differ, e.g. no drain hook). KEDA leaves the count where the HPA left it when its
  ScaledObject goes (advanced.restoreToOriginalReplicaCount defaults to false).
- A refresh takes the live value into the state's inputs for the fields the inputs hold
  (provider/pkg/provider/provider.go Read, pruneLiveState), so `pulumi up --refresh` sees the count
  the HPA left and applies the stack's.
So a Deployment whose count the stack declares is applied with force (with_forced_count), and the
transition is safe when the HPA is first pinned at the fixed count (minReplicas = maxReplicas = N);
a one-step transition may end at the HPA's last count until `pulumi up --refresh`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from components.kubernetes_endpoint import PATCH_FORCE_ANNOTATION, SCALED_REPLICAS_PATH, SKIP_AWAIT_ANNOTATION
from kimi_fleet import k8s_manifests as manifests
from tests.test_k8s_component import (
    SCALING_1_TO_4, _with_capacity, applied_on_update, engine_deployments, run_kubernetes_endpoint,
)

STACK = "gb200-int4-vllm"
HPA = "kube-controller-manager"  # with subresource scale: the HPA's writes (pulumi/pulumi-kubernetes#2569)
PULUMI = "pulumi-kubernetes-0a1b2c3d"  # the provider's per-resource field manager


class Conflict(Exception):
    pass


@dataclass
class LiveDeployment:
    """spec.replicas on the API server and who owns it (the Server-Side Apply docs, "Field management")."""
    replicas: int
    owners: set[str] = field(default_factory=set)

    def apply(self, sent: dict, manager: str, force: bool) -> None:
        """A server-side apply: a changed value another manager owns conflicts unless forced; forced or
        changed, the applier owns it alone; the same value, it joins the owners; left out, it lets go
        (and a field nobody owns any more takes its default, 1)."""
        if "replicas" not in sent["spec"]:
            self.owners.discard(manager)
            if not self.owners:
                self.replicas = 1
            return
        value = sent["spec"]["replicas"]
        others = self.owners - {manager}
        if value != self.replicas and others and not force:
            raise Conflict(f'Apply failed with 1 conflict: conflict with {sorted(others)} : .spec.replicas')
        if force or value != self.replicas:
            self.owners = {manager}
        else:
            self.owners.add(manager)
        self.replicas = value

    def scale(self, replicas: int) -> None:
        """The HPA's write to the scale subresource (an update: it takes the field when it changes it)."""
        if replicas != self.replicas:
            self.replicas = replicas
            self.owners = {HPA}


def forced(declared: dict) -> bool:
    """The provider's patchForce for an object (its annotation; the provider option is not set here)."""
    return declared["wire"]["metadata"].get("annotations", {}).get(PATCH_FORCE_ANNOTATION) == "true"


def engine(capacity: dict) -> tuple[dict, object]:
    r = _with_capacity(STACK, capacity)
    run = run_kubernetes_endpoint(STACK, r=r)
    (deployment,) = engine_deployments(run)
    return deployment, run


@pytest.fixture(scope="module")
def scaling():
    return engine(SCALING_1_TO_4)


@pytest.fixture(scope="module")
def fixed():
    return engine({"replicas": 3})


def live_after_keda(scaling_deployment: dict, count: int) -> LiveDeployment:
    """Created by Pulumi at the start count, then scaled by the HPA."""
    live = LiveDeployment(0)
    live.apply(scaling_deployment["wire"], PULUMI, forced(scaling_deployment))
    live.scale(count)
    return live


def test_a_declared_count_is_forced_and_the_scaled_one_is_not(scaling, fixed):
    scaled, _ = scaling
    declared, run = fixed
    assert forced(declared) and declared["ignore_changes"] == []
    assert declared["wire"]["metadata"]["annotations"] == {SKIP_AWAIT_ANNOTATION: "true", PATCH_FORCE_ANNOTATION: "true"}
    # The Deployment KEDA scales keeps the count out of Pulumi's hands instead (ignore_changes), unforced.
    assert not forced(scaled) and scaled["ignore_changes"] == [SCALED_REPLICAS_PATH]
    # The YAML a hand-applier uses carries no Pulumi annotation.
    r = _with_capacity(STACK, {"replicas": 3})
    from kimi_fleet.launch import render_launch
    from kimi_fleet.sizing import size
    assert "pulumi.com/" not in str(manifests.render_manifests(r, size(r), render_launch(r), stack=STACK))


def test_under_spot_the_on_demand_base_is_forced_and_the_scaled_spot_pods_are_not():
    """The base's count is declared: a stack moved to spot keeps its old scaled Deployment as the base."""
    r = _with_capacity("mi355x-int4-sglang", {"market": "spot", "replicas": 2, "onDemandBase": 1,
                                             "scaling": {"minReplicas": 1, "maxReplicas": 5, "waitingPerReplica": 4}})
    run = run_kubernetes_endpoint("mi355x-int4-sglang", r=r)
    by_name = {d["wire"]["metadata"]["name"]: d for d in engine_deployments(run)}
    assert forced(by_name[manifests.deployment_name("on-demand")])
    assert not forced(by_name[manifests.deployment_name("spot")])


def test_without_force_the_fixed_count_conflicts_with_the_hpa_for_good(scaling, fixed):
    """The finding, reproduced: what happened before with_forced_count (and what a stack without the
    annotation meets), at the first apply and after the HPA is gone (its managedFields entry stays)."""
    scaled, _ = scaling
    declared, _ = fixed
    live = live_after_keda(scaled, 4)
    sent = applied_on_update(scaled["wire"], declared["wire"], declared["ignore_changes"],
                             {"spec": {"replicas": live.replicas}}, other_managers={SCALED_REPLICAS_PATH})
    assert sent["spec"]["replicas"] == 3
    with pytest.raises(Conflict, match=HPA):
        live.apply(sent, PULUMI, force=False)
    # The ScaledObject deleted by hand first does not help: nothing removes the entry.
    with pytest.raises(Conflict, match=HPA):
        live.apply(sent, PULUMI, force=False)
    assert live.replicas == 4 and live.owners == {HPA}


def test_the_pinned_transition_ends_at_the_fixed_count(scaling, fixed):
    """The documented procedure: pin the range at the fixed count, `pulumi up`; then make the stack
    fixed, `pulumi up`. The HPA, alive until the end of the second update (deletes come last), can
    only hold the count where the stack puts it."""
    scaled, _ = scaling
    declared, fixed_run = fixed
    live = live_after_keda(scaled, 4)
    # Step 1: minReplicas = maxReplicas = 3; the Deployment's inputs are unchanged but for the ignored count.
    pinned, pinned_run = engine({"replicas": 3, "scaling": {"minReplicas": 3, "maxReplicas": 3, "waitingPerReplica": 8}})
    (scaled_object,) = pinned_run.of_type("kubernetes:keda.sh/v1alpha1:ScaledObject")
    low, high = scaled_object["wire"]["spec"]["minReplicaCount"], scaled_object["wire"]["spec"]["maxReplicaCount"]
    assert low == high == declared["wire"]["spec"]["replicas"]
    sent = applied_on_update(scaled["wire"], pinned["wire"], pinned["ignore_changes"],
                             {"spec": {"replicas": live.replicas}}, other_managers={SCALED_REPLICAS_PATH})
    live.apply(sent, PULUMI, forced(pinned))
    live.scale(min(max(4, low), high))  # whatever the load asks, the HPA clamps to its range
    assert live.replicas == 3
    # Step 2: the fixed stack. The Deployment is applied (forced); the HPA still runs until the end.
    sent = applied_on_update(pinned["wire"], declared["wire"], declared["ignore_changes"],
                             {"spec": {"replicas": live.replicas}}, other_managers={SCALED_REPLICAS_PATH})
    live.apply(sent, PULUMI, forced(declared))
    for wanted in (1, 4, 6):  # the load moves during the rollout: the pinned range holds it
        live.scale(min(max(wanted, low), high))
    assert not fixed_run.of_type("kubernetes:keda.sh/v1alpha1:ScaledObject")  # so it is deleted, at the end
    assert live.replicas == 3 and live.owners == {PULUMI}
    # A later count is the stack's alone: no conflict, no force needed any more.
    live.apply({"spec": {"replicas": 5}}, PULUMI, force=False)
    assert live.replicas == 5


def test_in_one_step_the_count_may_end_at_the_hpas_until_a_refresh(scaling, fixed):
    """Without the pin, the HPA may write once more before the ScaledObject's delete: the count ends
    where it left it, the state still says 3, and a plain `pulumi up` has no diff to apply. A
    refresh reads the live count into the inputs (pruneLiveState), so `pulumi up --refresh` applies 3."""
    scaled, _ = scaling
    declared, _ = fixed
    live = live_after_keda(scaled, 2)
    sent = applied_on_update(scaled["wire"], declared["wire"], declared["ignore_changes"],
                             {"spec": {"replicas": live.replicas}}, other_managers={SCALED_REPLICAS_PATH})
    live.apply(sent, PULUMI, forced(declared))
    assert live.replicas == 3  # forced: no conflict
    live.scale(4)  # the HPA (range 1-4, a queue) before the end of the update
    assert live.replicas == 4
    # `pulumi up` again: the state's inputs are the program's (3), so there is no diff and nothing is sent.
    state_inputs = declared["wire"]
    # `pulumi up --refresh`: the state's inputs take the live count, the program's differ, the apply is forced.
    refreshed = {**state_inputs, "spec": {**state_inputs["spec"], "replicas": live.replicas}}
    assert refreshed["spec"]["replicas"] != declared["wire"]["spec"]["replicas"]
    live.apply(applied_on_update(refreshed, declared["wire"], declared["ignore_changes"],
                                 {"spec": {"replicas": live.replicas}}, other_managers=set()), PULUMI, forced(declared))
    assert live.replicas == 3 and live.owners == {PULUMI}


def test_the_model_refuses_what_the_api_server_would():
    """The conflict rule is not vacuous: another manager's field, changed, unforced, is refused; the
    same value is shared; forced, it moves."""
    live = LiveDeployment(2, {HPA})
    with pytest.raises(Conflict):
        live.apply({"spec": {"replicas": 3}}, PULUMI, force=False)
    live.apply({"spec": {"replicas": 2}}, PULUMI, force=False)
    assert live.owners == {HPA, PULUMI}
    live.apply({"spec": {"replicas": 3}}, PULUMI, force=True)
    assert (live.replicas, live.owners) == (3, {PULUMI})
    # Left out by its only owner, the field takes its default (the HPA docs' warning).
    live.apply({"spec": {}}, PULUMI, force=False)
    assert live.replicas == 1
