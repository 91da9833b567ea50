"""The interface every deployment target implements.

A target says where weights live (which volumes, which by default), which machine offer the stack
rents, what it can and cannot provide (market, replicas, volumes), how its nodes get secrets, how
a change reaches them, and how DNS is done. The rest of kimi-fleet asks the target through this
interface; the Pulumi side maps each target to its endpoint component (components/fleet.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

from kimi_fleet import catalog

if TYPE_CHECKING:  # type-only: resolve imports the registry at run time
    from kimi_fleet.resolve import Resolved
    from kimi_fleet.spec import StackSpec

FIELD = "field kimi-fleet:"


def cheapest_offer(candidates) -> catalog.MachineOffer | None:
    """The offer sold on demand before one that is not, then the cheaper one."""
    ranked = sorted(candidates, key=lambda o: (o.on_demand_usd_per_hour is None, o.on_demand_usd_per_hour or 0))
    return ranked[0] if ranked else None


class Target:
    #: The stack's target.kind.
    kind: ClassVar[str]
    #: Where this target can keep the weights (weights.volume values).
    weight_volumes: ClassVar[tuple[str, ...]]
    #: Kubernetes objects (True) or node files (bootstrap, units, Caddyfile) (False).
    renders_manifests: ClassVar[bool] = False
    #: Node secrets come from SSM parameters (True) or files the deploy writes (False).
    secrets_from_ssm: ClassVar[bool] = False
    #: Whether capacity.market: capacity-block (an AWS purchase option) applies.
    sells_capacity_blocks: ClassVar[bool] = False
    #: Whether weights.mirror: managed applies (the program creates and fills an S3 bucket on AWS).
    fills_managed_mirrors: ClassVar[bool] = False
    #: Whether its weights download can fetch from an S3 mirror (weights.source: s3-mirror): the
    #: node bootstrap can; a Kubernetes download Job fetches from the Hub.
    fetches_from_s3_mirror: ClassVar[bool] = True

    def default_weight_volume(self, r: Resolved) -> str:
        return self.weight_volumes[0]

    def offer(self, r: Resolved) -> catalog.MachineOffer | None:
        """The machine the stack rents, when the catalog knows one for this target."""
        return None

    def machine(self, r: Resolved) -> str:
        """What one node is, in a preview line."""
        return f"{r.spec.accelerator_count}x {r.spec.accelerator}"

    def behind_load_balancer(self, r: Resolved) -> bool:
        """Several nodes behind a load balancer that routes only to nodes that admitted themselves."""
        return False

    def checks_spot_offers(self, r: Resolved) -> bool:
        """Whether the planner's spot pre-flight (placement scores, prices) applies."""
        return False

    def dns_mechanism(self, spec: StackSpec) -> str:
        return f"{spec.domain}: point it at the endpoint yourself"

    def multi_node_missing(self, r: Resolved) -> str | None:
        """What this target does not declare yet for a replica over several nodes (None: it deploys one)."""
        return "a multi-node replica on this target"

    def problems(self, r: Resolved) -> Iterator[str]:
        """What this target cannot provide for the stack (each names the field, the value and why)."""
        return iter(())
