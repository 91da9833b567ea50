"""What a stack costs: per hour from the catalog's price snapshots, and per million output tokens for
the chat and the agentic workload only where a Kimi-K2.6 throughput fact matches the stack's engine,
accelerator, checkpoint and engine layout exactly (catalog.MEASURED_THROUGHPUT), with the per-user
speed the fact was measured at and the fact's name. Otherwise it says none is published for this
layout and which facts exist for the hardware, instead of borrowing one."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kimi_fleet import catalog
from kimi_fleet.resolve import Resolved

#: The model this fleet serves: facts of other models are named, never priced.
PRICED_MODEL = "Kimi-K2.6"


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
    #: chat and agentic: the matching fact's figures for this stack (None: no fact matches)
    workloads: dict[str, dict | None]
    #: the chat workload's (the ranking's key): one replica's output tok/s, the fact, $/M, per-user speed
    measured_output_tokens_per_second: float | None
    measured_workload: str | None
    usd_per_million_output_tokens: float | None
    per_user_tokens_per_second: float | None
    #: Why no fact prices this stack (None when one does for every workload).
    throughput_note: str | None
    price_source: str | None
    note: str
    #: a scaling stack: the stack's price per hour at the bottom and the top of its replica range
    #: ({"min_replicas", "max_replicas", "low_usd_per_hour", "high_usd_per_hour"}); None without scaling
    scaling_range: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def stack_layout(r: Resolved) -> catalog.Layout:
    """One engine of the stack, in the terms the throughput facts are recorded in."""
    p, engine = r.spec.parallelism, r.spec.engine
    speculative = "off" if engine.speculative == "off" else f"{engine.speculative} {engine.speculative_draft_repo}"
    return catalog.Layout(tensor_parallel=r.tensor_parallel, data_parallel=p.data_parallel,
                          dp_attention=p.dp_attention, decode_context_parallel=p.decode_context_parallel,
                          pipeline_parallel=r.pipeline_parallel, expert_parallel=bool(p.expert_parallel),
                          speculative=speculative)


def same_hardware(t: catalog.Throughput, r: Resolved) -> bool:
    return t.engine == r.spec.engine.name and t.accelerator == r.accelerator.id and t.checkpoint == r.checkpoint.id


def matches(t: catalog.Throughput, r: Resolved) -> bool:
    """The fact may price this stack: K2.6, same engine, accelerator, checkpoint and engine layout."""
    return t.model == PRICED_MODEL and same_hardware(t, r) and t.layout == stack_layout(r)


def matching_facts(r: Resolved) -> dict[str, catalog.Throughput | None]:
    """Per priced workload, the matching fact with the most output per GPU (None: none matches)."""
    found = {}
    for kind in catalog.WORKLOAD_KINDS:
        candidates = [t for t in catalog.MEASURED_THROUGHPUT if t.workload.kind == kind and matches(t, r)]
        found[kind] = max(candidates, key=lambda t: t.output_tokens_per_second_per_gpu, default=None)
    return found


def describe(t: catalog.Throughput) -> str:
    concurrency = f", concurrency {t.concurrency} over {t.engines} engine(s)" if t.concurrency else ""
    user = f", {t.per_user_tokens_per_second:g} tok/s per user" if t.per_user_tokens_per_second else ""
    version = f" {t.engine_version}" if t.engine_version else ""
    return (f"{t.name}: {t.model}, {t.engine}{version}, {t.gpus_per_engine}x {t.accelerator} {t.checkpoint} "
            f"{t.layout.describe()}, {t.workload.description}{concurrency}: "
            f"{round(t.output_tokens_per_second_per_gpu, 1):g} tok/s per GPU{user} ({t.source.where}, {t.source.date})")


def why_unpriced(r: Resolved, kinds: list[str]) -> str:
    """One line saying none is published, then the facts that exist for the hardware, one a line."""
    near = [t for t in catalog.MEASURED_THROUGHPUT if same_hardware(t, r)]
    ours = [t for t in near if t.model == PRICED_MODEL]
    others = [t for t in near if t.model != PRICED_MODEL]
    lines = [f"no published throughput for this layout ({stack_layout(r).describe()}) of {PRICED_MODEL} on "
             f"{r.spec.engine.name} with {r.accelerator.id} {r.checkpoint.id}, for {' or '.join(kinds)}"]
    lines.append(f"{PRICED_MODEL} facts for this hardware:" + ("" if ours else " none"))
    lines += [f"- {describe(t)}" for t in ours]
    if others:
        lines.append("other models (never priced):")
        lines += [f"- {describe(t)}" for t in others]
    return "\n".join(lines)


def per_million(usd_per_hour: float, tokens_per_second: float) -> float:
    return round(usd_per_hour / (tokens_per_second * 3600 / 1e6), 2)


def replica_prices(r: Resolved) -> tuple[float | None, float | None]:
    """(on-demand, spot) USD per hour of one replica: every node it spans; spot within the stack's ceiling."""
    offer, capacity, nodes = r.offer, r.spec.capacity, r.nodes_per_replica
    if offer is None:  # a host or a cluster: the stack's own price per node whatever the market, if stated
        stated = capacity.node_hourly_usd * nodes if capacity.node_hourly_usd is not None else None
        return stated, stated
    od = offer.on_demand_usd_per_hour * nodes if offer and offer.on_demand_usd_per_hour is not None else None
    spot = offer.spot_typical_usd_per_hour * nodes if offer and offer.spot_typical_usd_per_hour is not None else None
    if capacity.max_spot_price_usd is not None and spot is not None:
        spot = min(spot, capacity.max_spot_price_usd * nodes)
    return od, spot


def on_demand_replicas(r: Resolved, replicas: int) -> int:
    """How many of `replicas` run on-demand: all of them unless the market is spot, else the base."""
    capacity = r.spec.capacity
    if capacity.effective_market != "spot":
        return replicas
    return min(capacity.effective_on_demand_base, replicas)


def hourly_usd(r: Resolved, replicas: int) -> float | None:
    """The stack's price per hour at `replicas` replicas (the on-demand ones at on-demand, the rest at
    the snapshot's spot price, or the stack's own capacity.nodeHourlyUsd where the catalog has no
    machine); None without a price for a market it uses."""
    od, spot = replica_prices(r)
    on_demand = on_demand_replicas(r, replicas)
    parts = [(on_demand, od), (replicas - on_demand, spot)]
    if any(price is None for count, price in parts if count):
        return None
    return round(sum(count * price for count, price in parts if count), 2)


def scaling_range(r: Resolved) -> dict | None:
    """A scaling stack's price per hour at the bottom and the top of its range (None without scaling)."""
    scaling = r.spec.capacity.scaling
    if scaling is None:
        return None
    return {"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "low_usd_per_hour": hourly_usd(r, scaling.min_replicas),
            "high_usd_per_hour": hourly_usd(r, scaling.max_replicas)}


def estimate(r: Resolved) -> Cost:
    offer, capacity = r.offer, r.spec.capacity
    market = capacity.effective_market
    on_demand_count = on_demand_replicas(r, capacity.replicas)
    # A replica is every node it spans.
    od, spot = replica_prices(r)
    fleet = hourly_usd(r, capacity.replicas)
    gpus_per_replica = r.spec.accelerator_count * r.nodes_per_replica
    workloads: dict[str, dict | None] = {}
    for kind, fact in matching_facts(r).items():
        if fact is None:
            workloads[kind] = None
            continue
        replica_rate = fact.output_tokens_per_second_per_gpu * gpus_per_replica
        workloads[kind] = {
            "fact": fact.name, "described": describe(fact), "conditions": fact.conditions,
            "output_tokens_per_second": round(replica_rate, 1),
            "per_user_tokens_per_second": fact.per_user_tokens_per_second,
            "usd_per_million_output_tokens": (per_million(fleet, replica_rate * capacity.replicas)
                                              if fleet is not None else None),
        }
    unpriced = [kind for kind, w in workloads.items() if w is None]
    chat = workloads.get("chat")
    if offer is None and fleet is not None:
        note = (f"the stack's own price: capacity.nodeHourlyUsd ${capacity.node_hourly_usd:.2f} per node-hour "
                "(the machine is yours or the cluster's)")
    elif offer is None:
        note = ("no price: the machine is yours (host) or the cluster's (kubernetes); set capacity.nodeHourlyUsd "
                "to price it")
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
        workloads=workloads,
        measured_output_tokens_per_second=chat["output_tokens_per_second"] if chat else None,
        measured_workload=chat["described"] if chat else None,
        usd_per_million_output_tokens=chat["usd_per_million_output_tokens"] if chat else None,
        per_user_tokens_per_second=chat["per_user_tokens_per_second"] if chat else None,
        throughput_note=why_unpriced(r, unpriced) if unpriced else None,
        price_source=(f"{offer.source.where}, {offer.source.date}" if offer
                      else "capacity.nodeHourlyUsd (the stack file)" if fleet is not None else None),
        note=note,
        scaling_range=scaling_range(r),
    )
