"""KubernetesEndpoint: the stack on an existing cluster, from the objects kimi_fleet.k8s_manifests renders.

Typed pulumi-kubernetes resources are built from the pure dicts, so the YAML `plan` writes and what
`pulumi up` applies cannot drift. Pulumi waits for the download Job with a timeout derived from the
sizing instead of the provider's 10-minute default. It does not wait for the Deployments
(pulumi.com/skipAwait): the verification gate does (scripts/await_k8s_rollout.py, from
`fleet_rollout`), fails within minutes of a pod's failure and undoes the rollout, where the
provider would wait out the whole deadline and leave the Deployment on the bad release.

A multi-node replica's LeaderWorkerSet is a custom resource (apiextensions.CustomResource): its CRD
and controller are the cluster operator's (kubectl apply --server-side -f
https://github.com/kubernetes-sigs/lws/releases/download/v0.10.0/manifests.yaml), and it is applied
without await like the Deployments (the gate waits for its group).

So are the monitoring objects: the Prometheus Operator's PodMonitor (and PrometheusRule) and, for a
scaling stack, KEDA's ScaledObject, applied after the Deployment it scales. The Deployment KEDA scales
is declared with spec.replicas (the count a first deploy starts with: k8s_manifests.scaled_deployment_start)
and ignore_changes on it, the way pulumi-kubernetes handles a field an HPA owns under server-side apply
(provider/pkg/await/await.go, handleSSAIgnoreFields, pulumi/pulumi-kubernetes#2566): on an update the
provider leaves an ignored field out of the apply when another manager owns it (the HPA's scale
writes: no conflict, pulumi/pulumi-kubernetes#2569), and sends the live value when Pulumi still owns it.
Leaving the field out of the inputs instead (what the rendered YAML does for `kubectl apply`) releases
Pulumi's ownership: a running fixed stack turned into a scaling one would drop to the default of one
pod until KEDA acted (the Kubernetes HPA docs' warning, kubernetes/website#29739). With ignore_changes
the engine keeps the old input (the fixed count) for that update, a later `pulumi up` keeps whatever
the HPA set, and a new stack is created at the start count, not at one.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from components.auth_proxy import AuthProxy, AuthProxyArgs
from components.deletion_cost import DeletionCostController, DeletionCostControllerArgs
from components.endpoint_outputs import EndpointArgs, publish_endpoint
from components.node_secrets import checked_api_key, checked_previous_api_key
from kimi_fleet import k8s_manifests as manifests
from kimi_fleet import k8s_wake
from kimi_fleet.cost import estimate
from kimi_fleet.k8s_deletion_cost import render_deletion_cost

RESOURCE_CLASSES = {
    "Namespace": k8s.core.v1.Namespace,
    "ConfigMap": k8s.core.v1.ConfigMap,
    "PersistentVolumeClaim": k8s.core.v1.PersistentVolumeClaim,
    "Job": k8s.batch.v1.Job,
    "ResourceClaimTemplate": k8s.resource.v1.ResourceClaimTemplate,
    "Deployment": k8s.apps.v1.Deployment,
    "Service": k8s.core.v1.Service,
    "NetworkPolicy": k8s.networking.v1.NetworkPolicy,
}


@dataclass
class KubernetesEndpointArgs(EndpointArgs):
    """The shared endpoint inputs; nothing Kubernetes-specific beyond the spec."""


#: pulumi-kubernetes' annotation (pulumi/pulumi-kubernetes#417): apply the object, do not await it.
SKIP_AWAIT_ANNOTATION = "pulumi.com/skipAwait"


def _seconds(value: int) -> str:
    return f"{value}s"


#: Rendered kinds that are custom resources (their CRDs are installed by the cluster's operator: LWS,
#: the Prometheus Operator, KEDA).
CUSTOM_KINDS = {"LeaderWorkerSet", "PodMonitor", "PrometheusRule", "ScaledObject"}
#: Applied once the workloads they act on exist (KEDA's webhook looks up the scaled Deployment).
AFTER_WORKLOADS = {"ScaledObject"}
#: What the gate waits for; the proxy's pods roll with a new key version.
ROLLED_KINDS = ("Deployment", "LeaderWorkerSet")
#: The field KEDA's HPA owns on the Deployment it scales: set on create, ignored after (module docstring).
SCALED_REPLICAS_PATH = "spec.replicas"


def declare_object(name: str, obj: dict, opts: pulumi.ResourceOptions) -> pulumi.CustomResource:
    """The typed resource for one rendered object; its camelCase fields pass through unchanged."""
    resource_name = f"{name}-{obj['metadata']['name']}"
    if obj["kind"] in CUSTOM_KINDS:
        return k8s.apiextensions.CustomResource(resource_name, api_version=obj["apiVersion"], kind=obj["kind"],
                                                metadata=obj["metadata"], spec=obj["spec"], opts=opts)
    fields = {key: value for key, value in obj.items() if key not in ("apiVersion", "kind")}
    return RESOURCE_CLASSES[obj["kind"]](resource_name, opts=opts, **fields)


def applied_name(resource: pulumi.CustomResource) -> pulumi.Output[str]:
    """The object's name once applied (a typed resource's ObjectMeta, a custom resource's mapping)."""
    return resource.metadata.apply(lambda meta: meta["name"] if isinstance(meta, dict) else meta.name)


def _with_template_annotation(template: dict, key: str, value: pulumi.Input[str]) -> dict:
    metadata = {**template["metadata"], "annotations": {**template["metadata"].get("annotations", {}), key: value}}
    return {**template, "metadata": metadata}


def with_pod_annotation(workload: dict, key: str, value: pulumi.Input[str]) -> dict:
    """The pods that run the proxy carry the annotation: a Deployment's template, a LeaderWorkerSet's
    leader template (its workers run no proxy)."""
    spec = workload["spec"]
    if workload["kind"] == "LeaderWorkerSet":
        group = spec["leaderWorkerTemplate"]
        group = {**group, "leaderTemplate": _with_template_annotation(group["leaderTemplate"], key, value)}
        return {**workload, "spec": {**spec, "leaderWorkerTemplate": group}}
    return {**workload, "spec": {**spec, "template": _with_template_annotation(spec["template"], key, value)}}


#: pulumi-kubernetes' annotation: apply with force, taking the fields it sends from any other field
#: manager (provider/pkg/await/await.go, patchForce; the Server-Side Apply docs' "Conflicts").
PATCH_FORCE_ANNOTATION = "pulumi.com/patchForce"


def with_forced_count(obj: dict) -> dict:
    """A Deployment whose spec.replicas the stack declares (a fixed stack's, the on-demand base under
    spot): applied with force. Once KEDA's HPA has scaled a Deployment, "kube-controller-manager"
    (subresource scale) owns spec.replicas for good: its entry outlives the HPA, so without force every
    later apply of another count by this stack fails with a conflict (pulumi/pulumi-kubernetes#2569),
    a scaling stack turned back into a fixed one first among them (docs/changing-a-running-stack.md)."""
    metadata = obj["metadata"]
    annotations = {**metadata.get("annotations", {}), PATCH_FORCE_ANNOTATION: "true"}
    return {**obj, "metadata": {**metadata, "annotations": annotations}}


def without_await(obj: dict) -> dict:
    """The object with the provider's await skipped (Pulumi-only: not in the YAML a hand-applier uses)."""
    metadata = obj["metadata"]
    annotations = {**metadata.get("annotations", {}), SKIP_AWAIT_ANNOTATION: "true"}
    return {**obj, "metadata": {**metadata, "annotations": annotations}}


class KubernetesEndpoint(pulumi.ComponentResource):
    endpoint_url: pulumi.Output[str]
    openai_base_url: pulumi.Output[str]
    node_ids: pulumi.Output[list[str]]
    market: pulumi.Output[str]
    hourly_cost_usd: pulumi.Output[float | None]
    #: what the gate waits for (k8s_manifests.rollout_wait with the applied Deployments' names)
    fleet_rollout: pulumi.Output[dict]
    #: the stack outputs metricsLocation and dashboardUrl: the PodMonitor that describes the scrape
    #: ("podmonitor://<namespace>/<name>"); no dashboard URL (the cluster's Grafana imports the
    #: dashboard ConfigMap where its operator points it)
    metrics_location: str
    dashboard_url: None

    def __init__(self, name: str, args: KubernetesEndpointArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:kubernetes:KubernetesEndpoint", name, None, opts)
        r, sizing = args.resolved, args.sizing
        target = r.spec.target.kubernetes
        # The monitoring objects' built-in kinds (the dashboard's ConfigMap) go first in the namespace, the
        # custom resources (PodMonitor, PrometheusRule, ScaledObject) last; no workload waits for them.
        monitoring = manifests.render_monitoring(r, sizing, stack=r.spec.stack)
        core = manifests.render_manifests(r, sizing, args.launch, stack=r.spec.stack)
        objects = [core[0], *[o for o in monitoring if o["kind"] not in CUSTOM_KINDS], *core[1:],
                   *[o for o in monitoring if o["kind"] in CUSTOM_KINDS]]
        monitoring_names = {(o["kind"], o["metadata"]["name"]) for o in monitoring}

        # No kubeconfig in config: the ambient one (KUBECONFIG / ~/.kube/config) with the stack's context.
        provider = k8s.Provider(
            f"{name}-cluster",
            kubeconfig=args.target_secrets.kubeconfig,
            context=target.kubeconfig_context,
            opts=pulumi.ResourceOptions(parent=self),
        )
        child = pulumi.ResourceOptions(parent=self, provider=provider)

        namespace_object, *namespaced = objects
        namespace = declare_object(name, namespace_object, child)
        in_namespace = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[namespace]))

        # The key's shape is checked here, where it is set, not by the pod's proxy after the deploy.
        keys = {manifests.API_KEY_SECRET_KEY: pulumi.Output.from_input(args.api_key).apply(checked_api_key)}
        if args.previous_api_key is not None:  # a rotation's overlap: the proxy accepts both
            keys[manifests.PREVIOUS_API_KEY_SECRET_KEY] = pulumi.Output.from_input(
                args.previous_api_key).apply(checked_previous_api_key)
        secret_values = {manifests.API_KEY_SECRET: keys}
        if args.hf_token is not None:
            secret_values[manifests.HF_TOKEN_SECRET] = {manifests.HF_TOKEN_SECRET_KEY: args.hf_token}
        secrets = [
            k8s.core.v1.Secret(
                f"{name}-{secret_name}",
                metadata={"name": secret_name, "namespace": target.namespace},
                type="Opaque",
                string_data={key: pulumi.Output.secret(value) for key, value in values.items()},
                opts=in_namespace,
            )
            for secret_name, values in secret_values.items()
        ]

        scaled = manifests.scaled_deployment_start(r)
        api_key_secret = secrets[0]  # secret_values starts with the API key
        prerequisites: list[pulumi.Resource] = [*secrets]
        rolled: dict[str, list[pulumi.CustomResource]] = {kind: [] for kind in ROLLED_KINDS}
        for obj in namespaced:
            kind = obj["kind"]
            if kind == "Job":
                timeout = _seconds(manifests.job_timeout_seconds(sizing))
                opts_for = pulumi.ResourceOptions(
                    depends_on=[*prerequisites],
                    custom_timeouts=pulumi.CustomTimeouts(create=timeout, update=timeout),
                    # A Job's template is immutable: a changed one replaces it under the same name.
                    delete_before_replace=True,
                )
            elif kind in ROLLED_KINDS:
                # The proxy reads the key at start: a rotated key (a new Secret version) rolls the pods.
                obj = with_pod_annotation(obj, manifests.API_KEY_VERSION_ANNOTATION,
                                          api_key_secret.metadata.apply(lambda m: m.resource_version or ""))
                # Applied, not awaited: the gate waits, and undoes a rollout that fails.
                obj = without_await(obj)
                opts_for = pulumi.ResourceOptions(depends_on=[*prerequisites])
                if scaled is not None and kind == "Deployment" and obj["metadata"]["name"] == scaled[0]:
                    # KEDA's HPA owns the count once it runs: the start count on create, then ignored.
                    obj = {**obj, "spec": {"replicas": scaled[1], **obj["spec"]}}
                    opts_for = pulumi.ResourceOptions(depends_on=[*prerequisites],
                                                      ignore_changes=[SCALED_REPLICAS_PATH])
                elif kind == "Deployment":
                    # A count the stack declares is the stack's, whoever wrote it last (with_forced_count).
                    obj = with_forced_count(obj)
            elif kind in AFTER_WORKLOADS:
                opts_for = pulumi.ResourceOptions(depends_on=[w for k in ROLLED_KINDS for w in rolled[k]])
            else:
                opts_for = pulumi.ResourceOptions()
            resource = declare_object(name, obj, pulumi.ResourceOptions.merge(in_namespace, opts_for))
            if kind in ROLLED_KINDS:
                rolled[kind].append(resource)
            elif kind != "Service" and (kind, obj["metadata"]["name"]) not in monitoring_names:
                prerequisites.append(resource)  # engines start only once weights, claim and Caddyfile exist

        # A scale-to-zero stack's wake front (kimi_fleet/k8s_wake.py), once the key's Secret and its own
        # ConfigMap, Service and NetworkPolicies exist (never after the weights' download): not a workload
        # the gate waits for (it is not Ready while an engine is), so applied without await.
        front: list[pulumi.Resource] = [*secrets]
        for obj in k8s_wake.render_wake_objects(r, sizing, args.launch, stack=r.spec.stack):
            if obj["kind"] == "Deployment":  # it reads the key at start, as the engine pods' proxy does
                version = api_key_secret.metadata.apply(lambda m: m.resource_version or "")
                obj = without_await(with_pod_annotation(obj, manifests.API_KEY_VERSION_ANNOTATION, version))
            front.append(declare_object(name, obj, pulumi.ResourceOptions.merge(
                in_namespace, pulumi.ResourceOptions(depends_on=list(front)))))

        # A scaling stack's scale-in takes the least busy engine pod first (k8s_deletion_cost).
        cost_objects = render_deletion_cost(r, sizing, stack=r.spec.stack)
        if cost_objects:
            self.deletion_cost = DeletionCostController(
                f"{name}-deletion-cost", DeletionCostControllerArgs(objects=cost_objects, after=[namespace]),
                pulumi.ResourceOptions(parent=self, provider=provider))

        self.proxy = AuthProxy(
            f"{name}-proxy",
            AuthProxyArgs(
                rendered=manifests.render_pod_proxy(
                    r, args.launch, manifests.manifest_release(r, sizing, args.launch, stack=r.spec.stack)),
                # Each pod runs engine 0's launch (more engines are more pods): one loopback upstream.
                allowed_upstreams=args.launch.upstreams[:1],
            ),
            pulumi.ResourceOptions(parent=self),
        )

        # The gate's wait names the Deployments (or the LeaderWorkerSet) as applied (and so runs only after).
        wait = manifests.rollout_wait(r, sizing)
        deployments, groups = rolled["Deployment"], rolled["LeaderWorkerSet"]
        self.fleet_rollout = pulumi.Output.all(
            pulumi.Output.all(*map(applied_name, deployments)), pulumi.Output.all(*map(applied_name, groups)),
        ).apply(lambda names: {**wait, "deployments": list(names[0]), "leaderworkersets": list(names[1])})

        self.metrics_location = manifests.metrics_location(r)
        self.dashboard_url = None

        # A cluster's GPUs are billed outside this stack: the cost is what the stack states
        # (capacity.nodeHourlyUsd x its nodes), else unknown here.
        publish_endpoint(self, domain=r.spec.domain,
                         node_ids=pulumi.Output.all(*map(applied_name, [*deployments, *groups])),
                         market=r.spec.capacity.effective_market, hourly_cost_usd=estimate(r).fleet_usd_per_hour)

