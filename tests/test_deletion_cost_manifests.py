"""Issue 24 on Kubernetes, scale-in protection: the deletion-cost controller's objects
(kimi_fleet/k8s_deletion_cost.py) validated against the Kubernetes schemas the other k8s tests use,
its grant (exactly list/patch on pods, in its namespace, to its own ServiceAccount), its
NetworkPolicies, the engine pods unchanged, the YAML a hand-applier uses, and the component under
the mocks. The script itself runs in test_deletion_cost."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
import yaml

from kimi_fleet import catalog
from kimi_fleet import k8s_deletion_cost as rendering
from kimi_fleet import k8s_manifests as manifests
from kimi_fleet.artifacts import render_artifacts
from kimi_fleet.launch import render_launch
from kimi_fleet.pod_scripts import pod_script
from kimi_fleet.sizing import size
from tests.test_k8s_observability import (
    FIXED_STACKS, K8S_VERSION, KUBERNETES_STACKS, MULTI_NODE, SCALING_VARIANTS, rendered,
)

VARIANT_IDS = [f"{stack}-{i}" for i, (stack, _) in enumerate(SCALING_VARIANTS)]


def the(objects, kind, name=rendering.NAME):
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


@pytest.fixture(scope="module", params=range(len(SCALING_VARIANTS)), ids=VARIANT_IDS)
def scaling(request):
    stack, given = SCALING_VARIANTS[request.param]
    r, sizing, objects, monitoring = rendered(stack, given)
    return r, sizing, objects, rendering.render_deletion_cost(r, sizing, stack=stack)


def test_every_object_validates_against_the_kubernetes_schemas(scaling):
    _, _, _, cost = scaling
    assert [o["kind"] for o in cost] == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "NetworkPolicy",
                                         "NetworkPolicy", "Deployment"]
    for obj in cost:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_schemas_refuse_a_malformed_grant(scaling):
    """Negative: the strict schemas see a misspelt field, so the pass above is not vacuous."""
    role = json.loads(json.dumps(the(scaling[3], "Role")))
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(role, K8S_VERSION, strict=True)


def test_the_grant_is_exactly_list_patch_on_pods_to_its_own_account(scaling):
    """No `get`: the script lists and patches (test_deletion_cost sees its only GET is the list)."""
    r, _, _, cost = scaling
    ns = r.spec.target.kubernetes.namespace
    role = the(cost, "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "patch"]}]
    assert role["metadata"]["namespace"] == ns and not [o for o in cost if o["kind"].startswith("Cluster")]
    binding = the(cost, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": rendering.NAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": rendering.NAME, "namespace": ns}]
    # No other pod mounts the account's token by accident: the account says no, the controller's pod yes.
    assert the(cost, "ServiceAccount")["automountServiceAccountToken"] is False
    pod = the(cost, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == rendering.NAME and pod["automountServiceAccountToken"] is True


def test_the_controller_is_a_small_unprivileged_cpu_pod_running_the_shipped_script(scaling):
    r, _, _, cost = scaling
    deployment = the(cost, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == catalog.DOWNLOAD_IMAGE and manifests.image_python(container["image"])
    resources = json.dumps(container["resources"])
    assert not any(gpu in resources for gpu in manifests.VENDOR_RESOURCE.values())
    assert "tolerations" not in pod and "nodeSelector" not in pod and "resourceClaims" not in pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert "ports" not in container  # it listens on nothing
    config_map = the(cost, "ConfigMap")
    assert config_map["data"][rendering.SCRIPT] == pod_script(rendering.SCRIPT)
    assert container["command"] == ["python3", f"{rendering.MOUNT}/{rendering.SCRIPT}",
                                    f"{rendering.MOUNT}/{rendering.CONFIG_KEY}"]
    config = json.loads(config_map["data"][rendering.CONFIG_KEY])
    names = catalog.ENGINE_METRICS[r.spec.engine.name]
    assert (config["running"], config["waiting"]) == (names.running, names.waiting)
    assert (config["metrics_port"], config["metrics_path"]) == (manifests.METRICS_GATE_PORT,
                                                                manifests.ENGINE_METRICS_PATH)


def test_it_reads_exactly_the_pods_keda_scales(scaling):
    r, _, objects, cost = scaling
    config = json.loads(the(cost, "ConfigMap")["data"][rendering.CONFIG_KEY])
    selector = dict(pair.split("=", 1) for pair in config["label_selector"].split(","))
    scaled_name = manifests.scaled_deployment_start(r)[0]
    engines = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    assert selector == engines[scaled_name]["spec"]["selector"]["matchLabels"]
    for name, deployment in engines.items():  # the on-demand base under spot is not scaled in
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert (selector.items() <= labels.items()) == (name == scaled_name), name


def test_engine_pods_gain_no_token_and_no_account(scaling):
    _, _, objects, _ = scaling
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod


def test_nothing_reaches_the_controller_and_it_reaches_only_the_gates_and_the_api_server(scaling):
    r, _, objects, cost = scaling
    controller_labels = the(cost, "Deployment")["spec"]["template"]["metadata"]["labels"]
    own = the(cost, "NetworkPolicy")
    assert own["spec"]["podSelector"] == {"matchLabels": controller_labels}
    assert own["spec"]["policyTypes"] == ["Ingress", "Egress"] and own["spec"]["ingress"] == []
    scaled = {"matchLabels": rendering.engine_selector(r, r.spec.stack)}
    assert own["spec"]["egress"] == [
        {"to": [{"podSelector": scaled}], "ports": [{"port": manifests.METRICS_PORT_NAME, "protocol": "TCP"}]},
        {"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]},
    ]
    # The namespace's deny-all selects the controller too (every pod).
    assert the(objects, "NetworkPolicy", manifests.DENY_ALL_POLICY)["spec"]["podSelector"] == {}
    # The engine pods admit it on the gate's port only, from this namespace's controller pods only.
    scrape = the(cost, "NetworkPolicy", rendering.SCRAPE_POLICY)
    assert scrape["spec"]["podSelector"] == scaled and scrape["spec"]["policyTypes"] == ["Ingress"]
    assert scrape["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": controller_labels}}],
                                          "ports": [{"port": manifests.METRICS_PORT_NAME, "protocol": "TCP"}]}]
    # That named port is the metrics gate's, on the scaled engine pods.
    engine = [o for o in objects if o["kind"] == "Deployment"
              and o["metadata"]["name"] == manifests.scaled_deployment_start(r)[0]][0]
    ports = {p["name"]: p["containerPort"] for c in engine["spec"]["template"]["spec"]["containers"]
             for p in c.get("ports", [])}
    assert ports[manifests.METRICS_PORT_NAME] == manifests.METRICS_GATE_PORT
    # The controller's labels select no engine pod (no engine policy, Service or monitor opens it up).
    assert controller_labels["app.kubernetes.io/component"] == rendering.COMPONENT


@pytest.mark.parametrize("stack", [*FIXED_STACKS, MULTI_NODE])
def test_a_stack_that_does_not_scale_has_no_controller(stack):
    r, sizing, _, _ = rendered(stack)
    assert rendering.render_deletion_cost(r, sizing, stack=stack) == []
    assert "kubernetes-deletion-cost.yaml" not in render_artifacts(r, sizing, render_launch(r))


def test_the_hand_appliers_yaml_is_the_objects():
    stack, given = SCALING_VARIANTS[0]
    r, sizing, _, _ = rendered(stack, given)
    files = render_artifacts(r, sizing, render_launch(r))
    text = files["kubernetes-deletion-cost.yaml"]
    assert list(yaml.safe_load_all(text)) == rendering.render_deletion_cost(r, sizing, stack=stack)
    assert "&id" not in text and "pulumi.com/" not in text


def test_the_shipped_scaling_stacks_render_one():
    scaling_stacks = [name for name in KUBERNETES_STACKS if name not in FIXED_STACKS]
    assert scaling_stacks
    for stack in scaling_stacks:
        r, sizing, _, _ = rendered(stack)
        assert rendering.render_deletion_cost(r, sizing, stack=stack)


# --- the component under the mocks -----------------------------------------------------------------

DEPLOYMENT = "kubernetes:apps/v1:Deployment"


@pytest.fixture(scope="module")
def scaling_run():
    from tests.test_k8s_component import run_kubernetes_endpoint
    return run_kubernetes_endpoint("mi355x-int4-sglang")  # a shipped scaling stack


def test_the_component_declares_the_controller_apart_from_the_engines(scaling_run):
    run = scaling_run
    (endpoint,) = run.of_type("kimi-fleet:kubernetes:KubernetesEndpoint")
    (component,) = run.of_type("kimi-fleet:kubernetes:DeletionCostController")
    assert component["parent"] == endpoint["name"]
    children = [res for res in run.resources if res.get("parent") == component["name"]]
    assert sorted(res["type"] for res in children) == sorted([
        "kubernetes:core/v1:ServiceAccount", "kubernetes:rbac.authorization.k8s.io/v1:Role",
        "kubernetes:rbac.authorization.k8s.io/v1:RoleBinding", "kubernetes:core/v1:ConfigMap",
        "kubernetes:networking.k8s.io/v1:NetworkPolicy", "kubernetes:networking.k8s.io/v1:NetworkPolicy",
        DEPLOYMENT])
    r = __import__("tests.test_k8s_component", fromlist=["resolved"]).resolved("mi355x-int4-sglang")
    expected = {(o["kind"], o["metadata"]["name"]): o for o in rendering.render_deletion_cost(r, size(r),
                                                                                            stack=r.spec.stack)}
    (namespace,) = run.of_type("kubernetes:core/v1:Namespace")
    for child in children:
        kind = child["type"].rsplit(":", 1)[1]
        obj = expected[(kind, child["wire"]["metadata"]["name"])]
        applied = {"apiVersion": obj["apiVersion"], "kind": kind,
                   **{key: value for key, value in child["wire"].items() if key not in ("apiVersion", "kind")}}
        assert _integral(applied) == obj, kind  # as rendered, nothing added
        assert namespace["name"] in child["dependencies"], kind
    (controller,) = [c for c in children if c["type"] == DEPLOYMENT]
    others = {c["name"] for c in children if c is not controller}
    assert others <= set(controller["dependencies"])  # token, grant, script and policies first
    # No engine waits for it; the gate waits for the engines only.
    for engine in (d for d in run.of_type(DEPLOYMENT) if d is not controller):
        assert not {c["name"] for c in children} & set(engine["dependencies"])
    assert rendering.NAME not in json.dumps(run.outputs["fleet_rollout"])


def test_a_fixed_stack_declares_no_controller():
    from tests.test_k8s_component import run_kubernetes_endpoint
    run = run_kubernetes_endpoint("gb200-int4-vllm")
    assert not run.of_type("kimi-fleet:kubernetes:DeletionCostController")
    assert not run.of_type("kubernetes:rbac.authorization.k8s.io/v1:Role")


def _integral(value):
    """The mocks carry numbers as floats: back to the integers rendered."""
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


def test_every_declared_name_is_its_own(scaling_run):
    """No child shares its component's name (walks over the tree by name, as test_plan's, would not end)."""
    names = [res["name"] for res in scaling_run.resources]
    assert len(names) == len(set(names))


def test_the_liveness_probe_reads_a_heartbeat_on_an_emptydir_and_the_root_stays_read_only(scaling):
    """The probe runs the shipped script's --alive on the shipped config, whose heartbeat file is on
    the pod's one writable volume (the probe's verdicts: test_deletion_cost)."""
    r, _, _, cost = scaling
    pod = the(cost, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["livenessProbe"] == rendering.liveness_probe()
    assert container["livenessProbe"]["exec"]["command"][1:] == [
        f"{rendering.MOUNT}/{rendering.SCRIPT}", f"{rendering.MOUNT}/{rendering.CONFIG_KEY}", "--alive"]
    config = json.loads(the(cost, "ConfigMap")["data"][rendering.CONFIG_KEY])
    assert config["heartbeat_file"] == rendering.HEARTBEAT_FILE
    writable = {m["mountPath"]: m["name"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {rendering.HEARTBEAT_DIR: "heartbeat"}
    assert rendering.HEARTBEAT_FILE.startswith(rendering.HEARTBEAT_DIR + "/")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes["heartbeat"]) == {"name", "emptyDir"}
