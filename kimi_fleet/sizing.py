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
from typing import TYPE_CHECKING

from kimi_fleet import catalog
from kimi_fleet.node_scripts.weights_manifest import VERIFY_THREADS

if TYPE_CHECKING:  # type-only: the engines read this module's volume rate to choose their loader
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
    #: Each flag the engine's own post-init rewrites: given, effective, where in the pinned release.
    engine_adjustments: list[dict]
    fits: bool
    # time to ready (each phase, and the floor of its hardware: see ready_phases)
    download_seconds: int
    #: hashing every file against the manifest or the Hub's tree
    verify_seconds: int
    #: the engines' loader reading the checkpoint from the volume, cold (seed 003's rate or the volume's)
    read_seconds: int
    #: from the page cache to ready: weight processing, then warm-up (seed 003's warm restart)
    load_seconds: int
    warmup_seconds: int
    #: what each phase could be at its hardware's limit, and the stack choice that lowers it
    ready_phases: list[dict]
    #: building the EFA engine image on a new node (0: the image is pulled as pinned)
    image_build_seconds: int = 0
    #: what each node of the replica fetches, verifies and reads (node_weights)
    node_weights: list[dict] | None = None

    @property
    def cold_start_seconds(self) -> int:
        return (self.download_seconds + self.verify_seconds + self.image_build_seconds + self.read_seconds
                + self.load_seconds)

    @property
    def warm_start_seconds(self) -> int:
        """An engine restart on a node whose page cache holds the checkpoint (in place releases)."""
        return self.load_seconds

    def budget_seconds(self, phase: str) -> int:
        """A phase's seconds for a budget (a load's deadline, a group's grace): with an adopted loader,
        what the engine's default loader would take, whichever is longer (ready_phases)."""
        entry = next(p for p in self.ready_phases if p["phase"] == phase)
        return entry.get("budget_seconds", entry["seconds"])

    @property
    def volume_start_seconds(self) -> int:
        """A node that finds verified weights on its volume (EBS re-attached, a rebooted host)."""
        return self.read_seconds + self.load_seconds

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
            volume_start_seconds=self.volume_start_seconds,
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


def verification_concurrency(sizing: "Sizing", replicas: int) -> int:
    """Sequences the endpoint serves at once (every engine, every replica), within 1..64: what the
    verification suite keeps in flight (more would only queue)."""
    engines = sizing.concurrent_sequences_per_engine * sizing.engines_per_node * replicas
    return max(1, min(64, engines))


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
    # A pipeline stage caches its own layers' latents only (the largest stage is the one that fits).
    # An MLA draft (EAGLE3, the K2.6 recipes' draft) keeps one more latent layer per token in the pool.
    layers = r.largest_stage_layers + (1 if r.draft_has_mla else 0)
    kv_per_token = (catalog.KIMI_K26.kv_elements_per_token * layers // catalog.KIMI_K26.layers
                    * catalog.KV_DTYPE_BYTES[r.kv_cache_dtype])
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
    adjust = getattr(adapter, "post_init_adjustments", None)  # engines whose post-init rewrites flags

    phases = ready_phases(r)
    seconds = {phase["phase"]: phase["seconds"] for phase in phases}

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
        engine_adjustments=adjust(r) if adjust else [],
        fits=max_sequence >= context and fits_outside(outside_available, outside_need, adapter.outside_tolerance),
        download_seconds=seconds["download"],
        verify_seconds=seconds["verify"],
        read_seconds=seconds["read"],
        load_seconds=seconds["load"],
        warmup_seconds=min(r.engine.warmup_seconds, seconds["load"]),
        ready_phases=phases,
        image_build_seconds=seconds.get("image build", 0),
        node_weights=node_weights(r),
    )


def node_weights(r: Resolved) -> list[dict]:
    """What each node of one replica fetches, verifies and reads: the whole checkpoint, or, where each
    node fetches its pipeline stage's shards only (Resolved.stage_fetch), an ESTIMATE of that share.
    The node computes the real file set at boot from the checkpoint's own index; offline the index is
    not at hand, so: the checkpoint's bytes less the embedding, the output head (bf16, vocab x hidden
    each) and the vision encoder (bf16, on every stage) shared evenly over the layers, plus one
    average shard per neighbouring stage (a shard straddling the boundary is fetched by both)."""
    size, model = r.checkpoint.size_bytes, catalog.KIMI_K26
    if not r.stage_fetch:
        return [{"node_rank": rank, "bytes": size, "estimate": False, "files": "every file of the checkpoint"}
                for rank in range(r.nodes_per_replica)]
    embedding = model.vocab_size * model.hidden_size * catalog.BF16_BYTES
    vision = model.vision_encoder_params * catalog.BF16_BYTES
    per_layer = (size - 2 * embedding - vision) / model.layers
    shard = size / r.checkpoint.shards if r.checkpoint.shards else 0
    rows, last = [], len(r.stage_ranges) - 1
    for stage, (first, end) in enumerate(r.stage_ranges):
        neighbours = (stage > 0) + (stage < last)
        share = ((end - first) * per_layer + vision + (embedding if stage == 0 else 0)
                 + (embedding if stage == last else 0) + neighbours * shard)
        held = (["the embedding"] if stage == 0 else []) + (["the final norm and lm_head"] if stage == last else [])
        rows.append({
            "node_rank": stage, "bytes": min(size, math.ceil(share)), "estimate": True,
            "files": (f"the small files and the shards of layers {first}-{end - 1}, the vision tower"
                      + "".join(f", {item}" for item in held)),
            "basis": (f"estimate: {size / 1e9:.0f} GB less embedding and lm_head ({embedding / 1e9:.2f} GB each, "
                      f"bf16) and the vision encoder ({vision / 1e9:.2f} GB) over {model.layers} layers "
                      f"({per_layer / 1e9:.2f} GB each), + {neighbours} straddling shard(s) of "
                      f"{shard / 1e9:.1f} GB; the node picks the real shards from the index at boot"),
        })
    return rows


def fetch_bytes(r: Resolved) -> int:
    """What the slowest node of a replica fetches, verifies and reads (the replica is ready with it)."""
    return max(row["bytes"] for row in node_weights(r))


def whole_checkpoint_budget_seconds(r: Resolved) -> dict[str, int]:
    """The download, verify and read budget seconds (Sizing.budget_seconds) of a node that fetches
    the whole checkpoint (the catalog's size): the worst case of a node whose stage share is an
    estimate (node_weights), since its real share is picked from the index at boot. The same as the
    sizing's where every node fetches the whole checkpoint."""
    phases = ready_phases(r, fetched_bytes=r.checkpoint.size_bytes)
    return {p["phase"]: p.get("budget_seconds", p["seconds"]) for p in phases
            if p["phase"] in ("download", "verify", "read")}


def ready_phases(r: Resolved, fetched_bytes: int | None = None) -> list[dict]:
    """Time to ready, phase by phase: the expected seconds (from measurements: seeds 000 and 003,
    the handbook's mirror rate, this project's hash benchmark, the adopted loader's published figure),
    the floor of the hardware the stack chose, and the stack-file choice that would lower it.
    `fetched_bytes`: what the node fetches, verifies and reads (default: fetch_bytes)."""
    # A node of a multi-node replica that fetches its stage's shards only also verifies and reads only
    # those: vLLM's loader opens the shards present and listed (catalog.STAGE_FETCH_SOURCE).
    size, engines = (fetch_bytes(r) if fetched_bytes is None else fetched_bytes), r.engines_per_node
    whole = r.checkpoint.size_bytes
    share = (f" (the largest node's share of {whole / 1e9:.0f} GB, an estimate from its layers: plan's layout)"
             if size != whole else "")
    weights = r.spec.weights
    source = catalog.TRANSFER_SOURCES[weights.source]
    rate = int(weights.download_gbps * 10**9 / 8) if weights.download_gbps else source.bytes_per_second
    volume_rate = volume_read_bytes_per_second(r)
    cores = min(VERIFY_THREADS, (r.offer.vcpus if r.offer and r.offer.vcpus else VERIFY_THREADS))
    hash_rate = cores * catalog.SHA256_BYTES_PER_SECOND_PER_CORE
    mirror = catalog.TRANSFER_SOURCES["s3-mirror"].bytes_per_second
    download_hint = ("" if weights.source == "s3-mirror" else
                     f"weights.source s3-mirror (mirror: managed on AWS): ~{_minutes(size / mirror)} min")
    read_hint = ""
    if r.weights_volume == "ebs" and r.offer is not None and r.offer.local_nvme_disks:
        nvme = catalog.NVME_DISK_READ_BYTES_PER_SECOND * r.offer.local_nvme_disks
        read_hint = f"weights.volume instance-store ({r.offer.local_nvme_disks} NVMe striped, {nvme / 1e9:.0f} GB/s)"
    # The loader: the engine's default (seed 003's measured rate), or the adopted one, whose published
    # speed-up over the default on the same machine scales that rate (catalog.LOADERS), bounded by the volume.
    loader, loader_why = r.adapter.loader(r)
    loader_rate = catalog.LOADER_READ_BYTES_PER_SECOND * (loader.cold_speedup if loader else 1)
    cold_read = min(volume_rate, loader_rate)
    # Engines on one node each process the whole checkpoint; their warm-ups run side by side.
    processing = max(catalog.WARM_RESTART_SECONDS - r.engine.warmup_seconds, 0)
    load = catalog.WARM_RESTART_SECONDS + (engines - 1) * processing
    # What the engine's default loader would take: the budgets that kill a load and judge a new node
    # (health.windows) never count on a loader's published speed-up that this machine has not shown.
    default_read = math.ceil(size * engines / min(volume_rate, catalog.LOADER_READ_BYTES_PER_SECOND))
    default_load = load
    if loader is None:
        read_basis = (f"the default loader reads {engines} x {size / 1e9:.0f} GB at {cold_read / 1e9:.2f} GB/s cold "
                      f"({catalog.LOAD_SOURCE.where}); no faster loader: {loader_why}")
        load_basis = f"page cache to ready, warm-up included ({catalog.LOAD_SOURCE.where}), {engines} engine(s)"
    else:
        # From the page cache the loader's published cached ratio shortens the weight processing only.
        processing = math.ceil(processing * loader.cached_ratio)
        load = min(r.engine.warmup_seconds, catalog.WARM_RESTART_SECONDS) + engines * processing
        read_basis = (f"--load-format {loader.load_format} reads {engines} x {size / 1e9:.0f} GB at "
                      f"{cold_read / 1e9:.2f} GB/s cold: the default's {catalog.LOADER_READ_BYTES_PER_SECOND / 1e9:.2f} "
                      f"GB/s ({catalog.LOAD_SOURCE.where}) x {loader.cold_speedup:.2f}, its published cold speed-up "
                      f"({loader.figure}; {loader.figure_source.where}), bounded by the volume")
        load_basis = (f"page cache to ready: warm-up ({catalog.LOAD_SOURCE.where}) and weight processing x "
                      f"{loader.cached_ratio:.2f} ({loader.load_format}'s published cached ratio, "
                      f"{loader.figure_source.where}), {engines} engine(s)")
    phases = [
        {"phase": "download", "seconds": math.ceil(size / rate), "floor_seconds": math.ceil(size / max(rate, mirror)),
         "basis": f"{size / 1e9:.0f} GB{share} at {rate / 1e9:.2f} GB/s from {weights.source} ({source.source.where})",
         "lower_it": download_hint},
        {"phase": "verify", "seconds": math.ceil(size / min(volume_rate, hash_rate)),
         "floor_seconds": math.ceil(size / min(volume_rate, hash_rate)),
         "basis": f"SHA-256 of every file on {cores} threads ({hash_rate / 1e9:.0f} GB/s), read at "
                  f"{volume_rate / 1e9:.2f} GB/s", "lower_it": ""},
        {"phase": "read", "seconds": math.ceil(size * engines / cold_read),
         "floor_seconds": math.ceil(size * engines / volume_rate),
         "budget_seconds": max(math.ceil(size * engines / cold_read), default_read),
         "basis": f"{read_basis}; the {r.weights_volume} volume reads {volume_rate / 1e9:.2f} GB/s "
                  "sequentially (the floor, with the checkpoint in the page cache)",
         "lower_it": read_hint, "loader": loader.load_format if loader else "default"},
        {"phase": "load", "seconds": load, "floor_seconds": load, "budget_seconds": max(load, default_load),
         "basis": load_basis, "lower_it": ""},
    ]
    if r.builds_efa_image:  # the engine unit builds it after the weights, before the engine starts
        phases.insert(2, {"phase": "image build", "seconds": catalog.EFA_IMAGE_BUILD_SECONDS,
                          "floor_seconds": catalog.EFA_IMAGE_BUILD_SECONDS, "estimate": True,
                          "basis": f"the EFA engine image built on the new node, an ESTIMATE "
                                   f"({catalog.EFA_IMAGE_BUILD_SOURCE.where}, {catalog.EFA_IMAGE_BUILD_SOURCE.date})",
                          "lower_it": ""})
    return phases


def _minutes(seconds: float) -> int:
    return max(1, round(seconds / 60))
