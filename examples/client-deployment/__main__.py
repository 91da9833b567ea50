"""A client of a kimi-fleet endpoint, fed from the fleet stack's outputs the Pulumi way.

A StackReference reads the fleet stack: the base URL and the model as plain values, the API key as
a secret (it stays encrypted in this stack's state and never becomes a plain output here). The
client Deployment gets them as the environment the OpenAI SDKs read (OPENAI_BASE_URL,
OPENAI_API_KEY) plus KIMI_MODEL: the URL and the model from a ConfigMap, the key from a Secret.
The key's fingerprint (a fleet output that is not secret) annotates the pod template, so a key
rotation in the fleet rolls the client's pods onto the new key on the next `pulumi up` here.
"""

import pulumi
import pulumi_kubernetes as k8s

config = pulumi.Config()
fleet = pulumi.StackReference("fleet", stack_name=config.require("fleetStack"))

base_url = fleet.require_output("openai_base_url")
model = fleet.require_output("model")
# Secret in the fleet stack; marked secret here too, whatever the reference reports.
api_key = pulumi.Output.secret(fleet.require_output("api_key"))
key_fingerprint = fleet.require_output("api_key_fingerprint")

labels = {"app.kubernetes.io/name": "kimi-client", "app.kubernetes.io/part-of": "kimi-fleet-example"}
namespace = k8s.core.v1.Namespace(
    "namespace", metadata=k8s.meta.v1.ObjectMetaArgs(name=config.get("namespace") or "kimi-client", labels=labels))


def metadata(name: str) -> k8s.meta.v1.ObjectMetaArgs:
    return k8s.meta.v1.ObjectMetaArgs(name=name, namespace=namespace.metadata.name, labels=labels)


endpoint = k8s.core.v1.ConfigMap(
    "endpoint", metadata=metadata("kimi-endpoint"), data={"OPENAI_BASE_URL": base_url, "KIMI_MODEL": model})
key = k8s.core.v1.Secret("api-key", metadata=metadata("kimi-api-key"), string_data={"OPENAI_API_KEY": api_key})

client = k8s.apps.v1.Deployment(
    "client",
    metadata=metadata("kimi-client"),
    spec=k8s.apps.v1.DeploymentSpecArgs(
        replicas=config.get_int("replicas") or 1,
        selector=k8s.meta.v1.LabelSelectorArgs(match_labels=labels),
        template=k8s.core.v1.PodTemplateSpecArgs(
            metadata=k8s.meta.v1.ObjectMetaArgs(
                labels=labels, annotations={"kimi-fleet/api-key-fingerprint": key_fingerprint}),
            spec=k8s.core.v1.PodSpecArgs(
                automount_service_account_token=False,
                containers=[k8s.core.v1.ContainerArgs(
                    name="client",
                    image=config.require("clientImage"),
                    env_from=[
                        k8s.core.v1.EnvFromSourceArgs(
                            config_map_ref=k8s.core.v1.ConfigMapEnvSourceArgs(name=endpoint.metadata.name)),
                        k8s.core.v1.EnvFromSourceArgs(
                            secret_ref=k8s.core.v1.SecretEnvSourceArgs(name=key.metadata.name)),
                    ],
                    security_context=k8s.core.v1.SecurityContextArgs(
                        run_as_non_root=True, allow_privilege_escalation=False, read_only_root_filesystem=True,
                        capabilities=k8s.core.v1.CapabilitiesArgs(drop=["ALL"])),
                )],
            ),
        ),
    ),
)

pulumi.export("namespace", namespace.metadata.name)
pulumi.export("openai_base_url", base_url)
pulumi.export("model", model)
