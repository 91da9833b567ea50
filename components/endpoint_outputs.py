"""What every endpoint component takes and publishes, whatever its target: defined once."""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi

from kimi_fleet.launch import Launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import Sizing


@dataclass
class TargetSecrets:
    """Secrets a target needs to be reached, read from config by `__main__.py` only (the
    components never read config): an existing host's address and SSH key, a cluster's kubeconfig."""

    ssh_host: pulumi.Input[str] | None = None
    ssh_private_key: pulumi.Input[str] | None = None
    kubeconfig: pulumi.Input[str] | None = None


@dataclass
class EndpointArgs:
    """The validated stack, its sizing and launch, and the secrets the endpoint needs."""

    resolved: Resolved
    sizing: Sizing
    launch: Launch
    api_key: pulumi.Input[str]
    hf_token: pulumi.Input[str] | None = None
    target_secrets: TargetSecrets = field(default_factory=TargetSecrets)
    #: the key clients used before a rotation, while the stack accepts it (apiKeyRotation)
    previous_api_key: pulumi.Input[str] | None = None


def publish_endpoint(component: pulumi.ComponentResource, *, domain: str, node_ids: pulumi.Input[list[str]],
                     market: pulumi.Input[str], hourly_cost_usd: pulumi.Input[float | None],
                     extra: dict[str, pulumi.Input] | None = None) -> None:
    """Set endpoint_url, openai_base_url, node_ids, market, hourly_cost_usd and register them."""
    component.endpoint_url = pulumi.Output.from_input(f"https://{domain}")
    component.openai_base_url = pulumi.Output.from_input(f"https://{domain}/v1")
    component.node_ids = pulumi.Output.from_input(node_ids)
    component.market = pulumi.Output.from_input(market)
    component.hourly_cost_usd = pulumi.Output.from_input(hourly_cost_usd)
    component.register_outputs({
        "endpoint_url": component.endpoint_url,
        "openai_base_url": component.openai_base_url,
        "node_ids": component.node_ids,
        "market": component.market,
        "hourly_cost_usd": component.hourly_cost_usd,
        **(extra or {}),
    })
