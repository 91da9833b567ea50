"""An existing host (SSH), and a GPU cloud whose VM takes only a startup script: one machine,
weights on its disk, the same idempotent bootstrap."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from kimi_fleet import catalog
from kimi_fleet.targets.base import FIELD, Target, cheapest_offer

if TYPE_CHECKING:
    from kimi_fleet.resolve import Resolved


class Host(Target):
    kind = "host"
    weight_volumes = ("host-path",)

    def dns_mechanism(self, spec) -> str:
        if spec.target.host.hosted_zone_id:
            return f"{spec.domain}: Route53 record to the host"
        return super().dns_mechanism(spec)

    def problems(self, r: Resolved) -> Iterator[str]:
        capacity = r.spec.capacity
        market = capacity.effective_market
        if market != "on-demand" or capacity.replicas != 1:
            yield (f"{FIELD}capacity: a host target is one machine you already have: "
                   f"market {market!r}, replicas {capacity.replicas} cannot apply (use on-demand, 1)")
        if capacity.scaling is not None:
            yield (f"{FIELD}capacity.scaling (given {capacity.scaling.min_replicas}-{capacity.scaling.max_replicas}): "
                   "a host target is one machine you already have and cannot add replicas; scale on AWS or Kubernetes")
        if r.multi_node:
            yield (f"{FIELD}parallelism.nodes (given {r.spec.parallelism.nodes}): a host target is one machine; a "
                   "replica across nodes runs on AWS (placement group, EFA) or Kubernetes (LeaderWorkerSet)")


class StartupScriptCloud(Host):
    """A GPU cloud whose VM is launched by pasting the rendered startup script (seed 000)."""

    def offer(self, r: Resolved) -> catalog.MachineOffer | None:
        # target.host.offer picks among the clouds' offers for one accelerator; default the cheapest.
        wanted = r.spec.target.host.offer
        return cheapest_offer(o for o in catalog.MACHINE_OFFERS.values()
                              if o.provider == "gpu-cloud" and o.accelerator == r.spec.accelerator
                              and (wanted is None or o.instance_type == wanted))

    def problems(self, r: Resolved) -> Iterator[str]:
        yield from super().problems(r)
        wanted = r.spec.target.host.offer
        if wanted and r.offer is None:
            known = sorted(o.instance_type for o in catalog.MACHINE_OFFERS.values()
                           if o.provider == "gpu-cloud" and o.accelerator == r.spec.accelerator)
            yield (f"{FIELD}target.host.offer (given {wanted!r}): no GPU-cloud offer of that name for "
                   f"{r.spec.accelerator} (known: {', '.join(known) or 'none'})")
