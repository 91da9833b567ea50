"""AWS: EC2 GPU instances (one node, or an Auto Scaling fleet behind an NLB), EBS or instance-store
weights, secrets from SSM, spot/on-demand/Capacity Blocks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from kimi_fleet import catalog
from kimi_fleet.targets.base import FIELD, Target, cheapest_offer

if TYPE_CHECKING:
    from kimi_fleet.resolve import Resolved


class AWS(Target):
    kind = "aws"
    weight_volumes = ("ebs", "instance-store")
    secrets_from_ssm = True
    sells_capacity_blocks = True
    fills_managed_mirrors = True

    def default_weight_volume(self, r: Resolved) -> str:
        # A fleet's replicas (a scaling range above one counts) cannot share one EBS volume: they use
        # their own instance store.
        return "instance-store" if r.spec.capacity.is_fleet else "ebs"

    def offer(self, r: Resolved) -> catalog.MachineOffer | None:
        # target.aws.instanceType picks among the offers for one accelerator.
        wanted = r.spec.target.aws.instance_type
        if wanted:
            return catalog.MACHINE_OFFERS.get(wanted)
        return cheapest_offer(o for o in catalog.MACHINE_OFFERS.values()
                              if o.provider == "aws" and o.accelerator == r.spec.accelerator
                              and o.accelerator_count == r.spec.accelerator_count)

    def machine(self, r: Resolved) -> str:
        return r.offer.instance_type if r.offer else super().machine(r)

    def behind_load_balancer(self, r: Resolved) -> bool:
        # An Auto Scaling group whenever the stack may run more than one replica, even if it starts with one.
        return r.spec.capacity.is_fleet

    def checks_spot_offers(self, r: Resolved) -> bool:
        capacity = r.spec.capacity
        return r.offer is not None and capacity.most_replicas > capacity.effective_on_demand_base

    def multi_node_missing(self, r: Resolved) -> str | None:
        return None  # components/replica_fabric.py, gpu_node.NodeFabric, aws_endpoint._replica

    def problems(self, r: Resolved) -> Iterator[str]:
        spec, accel, offer = r.spec, r.accelerator, r.offer
        wanted = spec.target.aws.instance_type
        if offer is None:
            offers = sorted(o.instance_type for o in catalog.MACHINE_OFFERS.values() if o.provider == "aws")
            if wanted:
                yield (f"{FIELD}target.aws.instanceType (given {wanted!r}): not in the catalog "
                       f"(known: {', '.join(offers)}); use target kind kubernetes or host for other machines")
            else:  # the user chose the accelerators, not the instance type
                counts = sorted({o.accelerator_count for o in catalog.MACHINE_OFFERS.values()
                                 if o.provider == "aws" and o.accelerator == accel.id})
                allowed = (f"AWS sells {accel.id} in the catalog as {', '.join(map(str, counts))} per instance"
                           if counts else f"the catalog has no AWS instance with {accel.id}")
                yield (f"{FIELD}acceleratorCount (given {spec.accelerator_count}): no AWS instance type in the catalog "
                       f"carries {spec.accelerator_count}x {accel.name}: {allowed} (known: {', '.join(offers)}); "
                       "use target kind kubernetes or host for other machines")
        elif offer.accelerator != accel.id or offer.accelerator_count != spec.accelerator_count:
            yield (f"{FIELD}target.aws.instanceType (given {wanted!r}): carries {offer.accelerator_count}x "
                   f"{offer.accelerator}, the stack asks for {spec.accelerator_count}x {accel.id}")
        if r.weights_volume == "instance-store" and offer is not None and offer.local_nvme_disks == 0:
            yield f"{FIELD}weights.volume (given 'instance-store'): {offer.instance_type} has no local NVMe"
        if r.weights_volume == "ebs" and spec.capacity.is_fleet:
            yield (f"{FIELD}weights.volume (given 'ebs'): one EBS volume attaches to one node; a fleet of up to "
                   f"{spec.capacity.most_replicas} uses instance-store with an S3 mirror")
        if not spec.verification.enabled and self.behind_load_balancer(r):
            # The gate is what moves a fleet to a new release: it starts the instance refresh to the new
            # launch template version and rolls a failed one back (the provider's own refresh cannot:
            # components/gpu_node.py). Without it the group launches its first release forever, and the
            # node role's move to the steward would end while its nodes still call Auto Scaling directly
            # (kimi_fleet/lifecycle_rights.py).
            yield (f"{FIELD}verification.enabled (given False): allowed on an AWS fleet: true only. Its gate starts "
                   "every release's instance refresh and rolls a failed one back; without it the Auto Scaling group "
                   "keeps launching the release it was created with, and a fleet deployed before the steward would "
                   "lose its nodes' direct lifecycle rights while they still need them. Limit the suite with "
                   "verification.checks instead")
        scaling = spec.capacity.scaling
        if scaling is not None and scaling.min_replicas == 0:
            # What zero replicas would answer: the load balancer has no registered target, so a client's
            # TCP connection finds nothing behind port 443 (no HTTP answer at all, let alone a queue), and
            # the queue metric the policy follows is published by replicas: with none, there is no datum
            # and target tracking takes no action. Nothing a client sends could bring a replica back.
            yield (f"{FIELD}capacity.scaling.minReplicas (given 0): an AWS fleet cannot scale back up from zero: "
                   "with no replica the load balancer has no target (clients' connections fail, nothing is "
                   "queued) and no replica publishes the queue the policy follows; use minReplicas 1 (the "
                   "batch market's spot price keeps that replica cheap), or target kind kubernetes, where a wake "
                   "front answers at zero and brings a replica back (docs/observability.md)")
        prefix = spec.target.aws.ssm_prefix
        if prefix is not None and not _own_ssm_prefix(prefix, spec.stack):
            yield (f"{FIELD}target.aws.ssmPrefix (given {prefix!r}): must be /<namespace>/{spec.stack} (two levels, "
                   f"the second the stack's name, e.g. /kimi-fleet/{spec.stack}): the nodes may read every "
                   "parameter under it, so a shorter or a nested prefix would let them read other stacks' secrets")
        if r.multi_node and offer is not None and offer.instance_type not in catalog.FABRICS:
            with_fabric = ", ".join(sorted(catalog.FABRICS))
            yield (f"{FIELD}parallelism.nodes (given {spec.parallelism.nodes}): the catalog records no EFA fabric "
                   f"for {offer.instance_type} (its interfaces and devices); without one NCCL falls back to TCP "
                   f"sockets, an order of magnitude slower (recorded: {with_fabric})")
        market = spec.capacity.effective_market
        if offer is not None and market == "on-demand" and offer.on_demand_usd_per_hour is None:
            yield (f"{FIELD}capacity.market (given {market!r}): {offer.instance_type} is not sold on demand "
                   f"({offer.note}); use capacity-block or spot")


def _own_ssm_prefix(prefix: str, stack: str) -> bool:
    """/<namespace>/<stack>: a node role reads <prefix>/*, which then covers no other stack's prefix
    of the same shape (a stack name holds no slash)."""
    parts = prefix.rstrip("/").split("/")
    return len(parts) == 3 and parts[0] == "" and parts[2] == stack
