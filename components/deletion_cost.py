"""DeletionCostController: a scaling Kubernetes stack's deletion-cost controller (issue 24), from the
objects kimi_fleet.k8s_deletion_cost renders: its ServiceAccount, Role and RoleBinding, its script's
ConfigMap, its NetworkPolicies and its one-pod Deployment.

No engine pod waits for it and it waits for none: it acts on whatever engine pods exist, and until it
runs the ReplicaSet picks as it did before (every cost 0). Pulumi awaits its Deployment (a small CPU
pod, ready in seconds), unlike the engines' (the verification gate waits for those)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from kimi_fleet.k8s_deletion_cost import NAME as _OBJECT_NAME

RESOURCE_CLASSES = {
    "ServiceAccount": k8s.core.v1.ServiceAccount,
    "Role": k8s.rbac.v1.Role,
    "RoleBinding": k8s.rbac.v1.RoleBinding,
    "ConfigMap": k8s.core.v1.ConfigMap,
    "NetworkPolicy": k8s.networking.v1.NetworkPolicy,
    "Deployment": k8s.apps.v1.Deployment,
}


def _snake(key: str) -> str:
    """automountServiceAccountToken -> automount_service_account_token, roleRef -> role_ref."""
    return re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()


@dataclass
class DeletionCostControllerArgs:
    #: k8s_deletion_cost.render_deletion_cost's objects, in apply order
    objects: list[dict]
    #: what every object waits for (the namespace)
    after: list[pulumi.Resource]


class DeletionCostController(pulumi.ComponentResource):
    #: the controller Deployment's name as applied
    deployment_name: pulumi.Output[str]

    def __init__(self, name: str, args: DeletionCostControllerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:kubernetes:DeletionCostController", name, None, opts)
        declared: list[pulumi.CustomResource] = []
        deployment = None
        for obj in args.objects:
            # Top-level fields are the typed class's keyword arguments (snake_case); nested ones pass unchanged.
            fields = {_snake(key): value for key, value in obj.items() if key not in ("apiVersion", "kind")}
            # The pod starts with its token, its Role bound and its script in place.
            after = declared if obj["kind"] == "Deployment" else []
            # The kind tells apart the objects that share the controller's name (and none is named as
            # this component: a name is a resource's handle in the state and the plan); the scrape
            # policy adds its suffix.
            suffix = obj["metadata"]["name"].removeprefix(_OBJECT_NAME)
            resource = RESOURCE_CLASSES[obj["kind"]](
                f"{name}-{obj['kind'].lower()}{suffix}",
                opts=pulumi.ResourceOptions(parent=self, depends_on=[*args.after, *after]), **fields)
            declared.append(resource)
            if obj["kind"] == "Deployment":
                deployment = resource
        if deployment is None:
            raise ValueError("the deletion-cost controller's objects hold no Deployment")
        self.deployment_name = deployment.metadata.apply(lambda meta: meta.name)
        self.register_outputs({"deploymentName": self.deployment_name})
