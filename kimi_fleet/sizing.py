"""Memory fit and time-to-ready: bytes inside, GiB shown.

Per device: the engine's memory knob gives a budget. Weights (with what every rank holds whole),
the vision encoder and what the engine keeps inside its knob (runtime, and for vLLM the start-up
profile run and, from 0.21, CUDA graphs) come out of it; what is left is the KV pool. What the
engine needs outside its knob (SGLang's own estimate; vLLM 0.19's CUDA graphs) must fit in the rest
of the device. The constants and the measured points that constrain them are in the catalog and
tests/test_memory_points.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from kimi_fleet import catalog
from kimi_fleet.resolve import Resolved


def gib(n: int | float) -> float:
    return round(n / catalog.GiB, 2)


@dataclass(frozen=True)
class Sizing:
    device_memory_bytes: int
    memory_knob: float
    budget_bytes: int
    weights_bytes_per_device: int
    vision_bytes_per_device: int
    reserve_bytes_per_device: int
    #: What reserve_bytes_per_device is made of, by name.
    reserve_items: dict[str, int]
    kv_pool_bytes_per_device: int
    #: What the engine needs outside its knob, and what the device leaves there.
    outside_need_bytes: int
    outside_items: dict[str, int]
    outside_available_bytes: int
    outside_tolerance: float
    kv_dtype: str
    kv_bytes_per_token: int
    kv_tokens_per_device: int
    #: How many ranks hold a copy of the same sequence's KV (TP without DP attention: all of them).
    kv_replication: int
    max_sequence_tokens: int
    engine_pool_tokens: int
    context_length: int
    concurrent_sequences_per_engine: int
    engines_per_node: int
    #: What each rank runs with after the engine's own adjustments (e.g. SGLang's DP split).
    per_rank: dict[str, int]
    fits: bool
    # time to ready
    download_seconds: int
    #: reading the weights from the node's volume; overlaps the CPU-bound load
    read_seconds: int
    load_seconds: int
    warmup_seconds: int

    @property
    def cold_start_seconds(self) -> int:
        return self.download_seconds + self.load_seconds + self.warmup_seconds

    @property
    def warm_start_seconds(self) -> int:
        return self.load_seconds + self.warmup_seconds

    @property
    def largest_context(self) -> int:
        return min(self.max_sequence_tokens, catalog.KIMI_K26.max_context_tokens)

    @property
    def outside_fits(self) -> bool:
        return fits_outside(self.outside_available_bytes, self.outside_need_bytes, self.outside_tolerance)

    def as_dict(self) -> dict:
        data = asdict(self)
        data.update(
            cold_start_seconds=self.cold_start_seconds,
            warm_start_seconds=self.warm_start_seconds,
            largest_context=self.largest_context,
            gib={
                "device_memory": gib(self.device_memory_bytes),
                "budget": gib(self.budget_bytes),
                "weights_per_device": gib(self.weights_bytes_per_device),
                "vision_per_device": gib(self.vision_bytes_per_device),
                "reserve_per_device": gib(self.reserve_bytes_per_device),
                "kv_pool_per_device": gib(self.kv_pool_bytes_per_device),
                "outside_need": gib(self.outside_need_bytes),
                "outside_available": gib(self.outside_available_bytes),
            },
        )
        return data

    def why_not(self) -> str:
        """Plain words for a stack that does not fit."""
        reserve = ", ".join(f"{name} {gib(value)}" for name, value in self.reserve_items.items())
        head = (
            f"per device {gib(self.device_memory_bytes)} GiB x knob {self.memory_knob} = "
            f"{gib(self.budget_bytes)} GiB budget; weights {gib(self.weights_bytes_per_device)} GiB, "
            f"vision encoder {gib(self.vision_bytes_per_device)} GiB, engine {gib(self.reserve_bytes_per_device)} "
            f"GiB ({reserve}) leave {gib(max(self.kv_pool_bytes_per_device, 0))} GiB "
            f"of KV ({self.kv_bytes_per_token} B/token {self.kv_dtype})"
        )
        problems = []
        if self.max_sequence_tokens <= 0:
            problems.append(f"{head}: weights, encoder and engine exceed the budget, no room for any context")
        elif self.max_sequence_tokens < self.context_length:
            problems.append(f"{head}: the pool holds {self.max_sequence_tokens} tokens, less than contextLength "
                            f"{self.context_length}; the largest context that fits is {self.largest_context}")
        if not self.outside_fits:
            items = ", ".join(f"{name} {gib(value)}" for name, value in self.outside_items.items())
            problems.append(
                f"outside the knob the engine needs {gib(self.outside_need_bytes)} GiB ({items}) but "
                f"{gib(self.device_memory_bytes)} GiB x (1 - {self.memory_knob}) leaves "
                f"{gib(self.outside_available_bytes)} GiB: it would run out of memory at start or under "
                "load; lower engine.memoryFraction, engine.maxNumBatchedTokens or engine.cudaGraphMaxBatch")
        return "; ".join(problems)


def fits_outside(available: int, need: int, tolerance: float) -> bool:
    """What the engine needs outside its knob is free (to the engine's measured tolerance)."""
    return available >= need * tolerance


def vision_per_device(r: Resolved) -> int:
    if r.spec.engine.language_model_only:  # the encoder is not loaded at all
        return 0
    encoder = catalog.KIMI_K26.vision_encoder_params * catalog.BF16_BYTES
    if r.mm_encoder_tp_mode == "weights":
        return encoder // r.tensor_parallel
    return encoder  # data-parallel encoder (vLLM 'data', SGLang): a full copy per rank


def volume_read_bytes_per_second(r: Resolved) -> int:
    volume = r.weights_volume
    if volume == "ebs":
        return r.spec.weights.ebs_throughput_mibps * catalog.MiB
    if volume == "instance-store" and r.offer is not None:
        return catalog.NVME_DISK_READ_BYTES_PER_SECOND * r.offer.local_nvme_disks
    return catalog.LOCAL_NVME_READ_BYTES_PER_SECOND


def size(r: Resolved) -> Sizing:
    accel, adapter = r.accelerator, r.adapter
    budget = int(accel.memory_bytes * r.memory_knob)
    weights = adapter.weights_per_device(r)
    vision = vision_per_device(r)
    reserve_items = adapter.inside_knob(r)
    reserve = sum(reserve_items.values())
    pool = budget - weights - vision - reserve
    outside_items = adapter.outside_knob(r)
    outside_need, outside_available = sum(outside_items.values()), accel.memory_bytes - budget
    kv_per_token = catalog.KIMI_K26.kv_elements_per_token * catalog.KV_DTYPE_BYTES[r.kv_cache_dtype]
    tokens_per_device = max(pool, 0) // kv_per_token
    spread, pools = adapter.kv_sharing(r)
    max_sequence = tokens_per_device * spread
    engine_pool = max_sequence * pools
    context = r.spec.context_length
    # A sequence lives in one pool: whole sequences per pool, times the pools.
    per_pool = max_sequence // context if context else 0
    concurrent = per_pool * pools
    replication = max(1, r.tensor_parallel // adapter.attention_groups(r))
    per_rank = {**adapter.per_rank(r), "full-context sequences": per_pool}

    source = catalog.TRANSFER_SOURCES[r.spec.weights.source]
    rate = source.bytes_per_second
    if r.spec.weights.download_gbps:
        rate = int(r.spec.weights.download_gbps * 10**9 / 8)
    download = math.ceil(r.checkpoint.size_bytes / rate)
    read = math.ceil(r.checkpoint.size_bytes * r.engines_per_node / volume_read_bytes_per_second(r))
    # Engines on one node load in parallel but compete for the same CPUs (MoE load is CPU-bound);
    # the volume read overlaps it, so the slower of the two sets the pace.
    cpu_load = math.ceil(r.checkpoint.size_bytes / r.engine.load_bytes_per_second) * r.engines_per_node
    load = max(read, cpu_load)

    return Sizing(
        device_memory_bytes=accel.memory_bytes,
        memory_knob=r.memory_knob,
        budget_bytes=budget,
        weights_bytes_per_device=weights,
        vision_bytes_per_device=vision,
        reserve_bytes_per_device=reserve,
        reserve_items=reserve_items,
        kv_pool_bytes_per_device=pool,
        outside_need_bytes=outside_need,
        outside_items=outside_items,
        outside_available_bytes=outside_available,
        outside_tolerance=adapter.outside_tolerance,
        kv_dtype=r.kv_cache_dtype,
        kv_bytes_per_token=kv_per_token,
        kv_tokens_per_device=tokens_per_device,
        kv_replication=replication,
        max_sequence_tokens=max_sequence,
        engine_pool_tokens=engine_pool,
        context_length=context,
        concurrent_sequences_per_engine=concurrent,
        engines_per_node=r.engines_per_node,
        per_rank=per_rank,
        fits=max_sequence >= context and fits_outside(outside_available, outside_need, adapter.outside_tolerance),
        download_seconds=download,
        read_seconds=read,
        load_seconds=load,
        warmup_seconds=r.engine.warmup_seconds,
    )
