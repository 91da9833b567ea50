"""CapacityPolicy: how a stack buys its machines (market, on-demand base, spot remainder).

Declares no cloud resource: the node components apply it. Recording it lets the policy pack
refuse an interactive stack that runs on spot without an on-demand base.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi


@dataclass
class CapacityPolicyArgs:
    workload: str
    market: str
    replicas: int
    on_demand_base: int
    max_spot_price_usd: float | None = None


class CapacityPolicy(pulumi.ComponentResource):
    market: pulumi.Output[str]

    def __init__(self, name: str, args: CapacityPolicyArgs, opts: pulumi.ResourceOptions | None = None):
        props = {
            "workload": args.workload,
            "market": args.market,
            "replicas": args.replicas,
            "onDemandBase": args.on_demand_base,
            "maxSpotPriceUsd": args.max_spot_price_usd,
        }
        super().__init__("kimi-fleet:capacity:CapacityPolicy", name, props, opts)
        self.market = pulumi.Output.from_input(args.market)
        self.register_outputs({"market": self.market, "onDemandBase": args.on_demand_base})
