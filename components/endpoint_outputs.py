"""The outputs every endpoint component publishes, whatever its target, set and registered once."""

from __future__ import annotations

import pulumi


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
