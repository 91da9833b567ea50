"""What a stack costs: per hour from the catalog's price snapshots, per million output tokens only
where a measured throughput matches the stack's own configuration (engine, hardware, checkpoint and
parallelism); otherwise it says which figures exist and why none applies, instead of borrowing one."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kimi_fleet import catalog
from kimi_fleet.resolve import Resolved


@dataclass(frozen=True)
class Cost:
    instance_type: str | None
    #: nodes one replica spans (the per-replica prices below are all of them)
    nodes_per_replica: int
    replicas: int
    on_demand_replicas: int
    market: str
    on_demand_usd_per_hour: float | None  # one replica
    spot_usd_per_hour: float | None  # one replica, typical of the snapshot range
    fleet_usd_per_hour: float | None  # the stack as configured (on-demand base + spot remainder)
    measured_output_tokens_per_second: float | None  # one replica (node or pod group)
    measured_workload: str | None
    usd_per_million_output_tokens: float | None
    #: Why no measured figure prices this stack (None when one does).
    throughput_note: str | None
    price_source: str | None
    note: str

    def as_dict(self) -> dict:
        return asdict(self)


def stack_layout(r: Resolved) -> catalog.Layout:
    p = r.spec.parallelism
    return catalog.Layout(tensor_parallel=r.tensor_parallel, data_parallel=p.data_parallel,
                          dp_attention=p.dp_attention, decode_context_parallel=p.decode_context_parallel,
                          engines=r.engines_per_node, pipeline_parallel=r.pipeline_parallel)


def _same_hardware(t: catalog.Throughput, r: Resolved) -> bool:
    return (t.engine == r.spec.engine.name and t.accelerator == r.accelerator.id
            and t.accelerator_count == r.spec.accelerator_count and t.checkpoint == r.checkpoint.id)


def measured_throughput(r: Resolved) -> catalog.Throughput | None:
    """The best measured figure for exactly this configuration (the operating point a fleet is sized for)."""
    layout = stack_layout(r)
    matches = [t for t in catalog.MEASURED_THROUGHPUT if _same_hardware(t, r) and t.layout == layout]
    return max(matches, key=lambda t: t.output_tokens_per_second, default=None)


def describe(t: catalog.Throughput) -> str:
    concurrency = f", concurrency {t.concurrency}" if t.concurrency else ""
    return f"{t.model}, {t.workload}{concurrency}, {t.layout.describe()} ({t.source.where}, {t.source.date})"


def why_unpriced(r: Resolved) -> str:
    near = [t for t in catalog.MEASURED_THROUGHPUT if _same_hardware(t, r)]
    if not near:
        return (f"no published throughput for {r.spec.engine.name} on {r.spec.accelerator_count}x "
                f"{r.accelerator.id} with {r.checkpoint.id}")
    layouts = "; ".join(f"{t.output_tokens_per_second:g} tok/s: {describe(t)}" for t in near)
    return f"no published throughput for this layout ({stack_layout(r).describe()}); measured: {layouts}"


def estimate(r: Resolved) -> Cost:
    offer, capacity = r.offer, r.spec.capacity
    market = capacity.effective_market
    on_demand_count = capacity.effective_on_demand_base
    spot_count = capacity.replicas - on_demand_count
    # A replica is every node it spans.
    nodes = r.nodes_per_replica
    od = offer.on_demand_usd_per_hour * nodes if offer and offer.on_demand_usd_per_hour is not None else None
    spot = offer.spot_typical_usd_per_hour * nodes if offer and offer.spot_typical_usd_per_hour is not None else None
    if capacity.max_spot_price_usd is not None and spot is not None:
        spot = min(spot, capacity.max_spot_price_usd * nodes)
    fleet = None
    if offer is not None:
        parts = [(on_demand_count, od), (spot_count, spot)]
        if all(price is not None for count, price in parts if count):
            fleet = round(sum(count * price for count, price in parts if count), 2)
    measured = measured_throughput(r)
    per_million = None
    if measured and fleet is not None:
        fleet_tokens_per_hour = measured.output_tokens_per_second * 3600 * capacity.replicas
        per_million = round(fleet / (fleet_tokens_per_hour / 1e6), 2)
    if offer is None:
        note = "no price: the machine is yours (host) or the cluster's (kubernetes)"
    elif fleet is None:
        note = f"{offer.instance_type}: price unknown for market {market} ({offer.note or 'not in the snapshot'})"
    else:
        note = f"snapshot prices ({offer.source.where}, {offer.source.date}); check current prices"
    return Cost(
        instance_type=offer.instance_type if offer else None,
        nodes_per_replica=r.nodes_per_replica,
        replicas=capacity.replicas,
        on_demand_replicas=on_demand_count,
        market=market,
        on_demand_usd_per_hour=od,
        spot_usd_per_hour=spot,
        fleet_usd_per_hour=fleet,
        measured_output_tokens_per_second=measured.output_tokens_per_second if measured else None,
        measured_workload=describe(measured) if measured else None,
        usd_per_million_output_tokens=per_million,
        throughput_note=None if measured else why_unpriced(r),
        price_source=f"{offer.source.where}, {offer.source.date}" if offer else None,
        note=note,
    )
