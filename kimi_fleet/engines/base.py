"""The interface every inference engine implements.

An engine module says how its command line reads, which KV dtypes and options it has, which flags
it manages, how its memory and KV are laid out over ranks and what its health route means. The
rest of kimi-fleet asks the engine through this interface and never compares engine names.
Facts (ports, health routes, menus, memory profile) live in the catalog's EngineProfile.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from kimi_fleet import catalog
from kimi_fleet.sizing import vision_per_device, volume_read_bytes_per_second

if TYPE_CHECKING:  # type-only: resolve imports the registry at run time
    from kimi_fleet.resolve import Resolved

#: Spec options of `engine:` that only some engines read (spec field name -> stack key).
ENGINE_OPTIONS = {
    "language_model_only": "engine.languageModelOnly",
    "mm_encoder_tp_mode": "engine.mmEncoderTpMode",
    "moe_backend": "engine.moeBackend",
    "cuda_graph_max_batch": "engine.cudaGraphMaxBatch",
}
#: Parallelism options that only some engines read (spec field name -> stack key).
PARALLELISM_OPTIONS = {
    "dp_attention": "parallelism.dpAttention",
    "decode_context_parallel": "parallelism.decodeContextParallel",
}


@dataclass(frozen=True)
class LoadMetrics:
    """What the engine says it is doing, by its own names on its Prometheus /metrics: the node's
    watchdog tells a busy engine (tokens still generated while its probe waited) from a stalled one.
    Take them from the pinned engine source: they were renamed across releases."""

    #: Tokens generated since the engine started (a counter).
    generated_tokens: str
    #: Requests being generated now (a gauge).
    running: str
    #: Requests queued behind them (a gauge).
    waiting: str

    def as_dict(self) -> dict[str, str]:
        """stack.json's engines[].metrics, as generation_probe.engine_load reads them."""
        return {"generated": self.generated_tokens, "running": self.running, "waiting": self.waiting}


class Engine:
    name: ClassVar[str]
    #: Its /metrics names (no default: an engine without them would have every busy spell taken
    #: for a stall, and restarted).
    load_metrics: ClassVar[LoadMetrics]
    #: Flag -> the stack field that sets it: extraArgs may not set these, in any spelling.
    managed_flags: ClassVar[dict[str, str]]
    #: Which of ENGINE_OPTIONS / PARALLELISM_OPTIONS this engine reads; the others are refused.
    options: ClassVar[frozenset[str]] = frozenset()
    #: Extra words for a refused option (e.g. what this engine uses instead).
    options_hint: ClassVar[str] = ""

    @property
    def profile(self) -> catalog.EngineProfile:
        return catalog.ENGINES[self.name]

    # --- layout ---------------------------------------------------------------------------------

    def data_parallel_gpu_factor(self, r: Resolved) -> int:
        """How many times DP multiplies the GPUs of one engine."""
        return r.spec.parallelism.data_parallel

    def mm_encoder_tp_mode(self, r: Resolved) -> str | None:
        """How the vision encoder is spread (None: a full copy per rank, the engine's only way)."""
        return None

    def problems(self, r: Resolved) -> Iterator[str]:
        """Layout problems only this engine has (each names the field, the value and why)."""
        return iter(())

    # --- command line ---------------------------------------------------------------------------

    def kv_dtype_flag_value(self, kv_dtype: str) -> str:
        return self.profile.kv_dtype_spelling.get(kv_dtype, kv_dtype)

    def entrypoint_words(self, r: Resolved) -> list[str]:
        """The words of argv before the engine's own arguments (what its parser does not see)."""
        raise NotImplementedError

    def real_parser(self):
        """(argparse parser, version) of the installed engine, for scripts/engine_flags.py; needs the
        engine's own environment (ImportError otherwise)."""
        raise NotImplementedError

    def json_option_keys(self, dest: str) -> list[str] | None:
        """For options taking a JSON config (`--option.key=value`), the keys it accepts."""
        return None

    def argv(self, r: Resolved, port: int) -> list[str]:
        """The engine's command line, one argument per item, with the hardware quirk flags
        (r.quirk_flags) in place; the caller appends the checkpoint's flags and extraArgs."""
        raise NotImplementedError

    def multi_node_args(self, r: Resolved, node_rank: int, leader: str, port: int | None = None) -> list[str]:
        """What one node of a multi-node replica adds: its rank, the world, the leader's address and
        rendezvous port (None: the release's default, catalog.MULTI_NODE)."""
        raise NotImplementedError(f"{self.name} renders no multi-node flags")

    # --- memory model ---------------------------------------------------------------------------
    # Per device, in bytes. Weights and the vision encoder come first; then what the engine keeps
    # inside its memory knob besides the KV pool, and what it needs outside the knob.

    def weights_per_device(self, r: Resolved) -> int:
        """The text model's share on one rank: sharded weights over `weight_shards`, the attention over
        its attention group, and what every rank holds whole (down-projections, router gates)."""
        model, bf16 = catalog.KIMI_K26, catalog.BF16_BYTES
        text = r.checkpoint.size_bytes - model.vision_encoder_params * bf16
        attention = model.attention_params * bf16
        replicated = model.tp_replicated_params * bf16
        down_projections = replicated - model.moe_layers * model.routed_experts * model.hidden_size * bf16
        gates = replicated - down_projections
        rest = text - attention - gates
        groups = self.attention_replicas(r)
        attention_share = (attention - down_projections) * groups // r.tensor_parallel + down_projections
        per_device = rest // self.weight_shards(r) + attention_share + gates + self.replicated_embedding(r)
        if r.pipeline_parallel > 1:
            # A pipeline stage holds its layers only, plus one vocab table's shard (the embedding on
            # the first stage, the output head on the last): the largest stage is the one that fits.
            table = model.embedding_params * bf16 // r.tensor_parallel
            per_device = (per_device - 2 * table) * r.largest_stage_layers // model.layers + table
        return per_device

    def weight_shards(self, r: Resolved) -> int:
        """Ranks the experts (and the rest of the text model) are spread over."""
        return r.tensor_parallel

    def attention_replicas(self, r: Resolved) -> int:
        """Copies of the attention weights across the engine's TP ranks (DP attention: one per group)."""
        return 1

    def replicated_embedding(self, r: Resolved) -> int:
        """Embedding bytes a rank holds beyond its vocab shard."""
        return 0

    def kv_sharing(self, r: Resolved) -> tuple[int, int]:
        """(ranks one sequence's KV is spread over, independent KV pools in one engine)."""
        return 1, 1

    def attention_groups(self, r: Resolved) -> int:
        """Groups of ranks that hold distinct KV: ranks inside a group hold the same latent KV."""
        return self.kv_sharing(r)[0]

    def inside_knob(self, r: Resolved) -> dict[str, int]:
        """What the engine allocates inside its memory knob besides weights, encoder and KV pool."""
        items = {"runtime (CUDA context, collectives)": self.profile.runtime_overhead_bytes}
        if r.draft_has_mla:
            # Its KV is one more latent layer in the pool (sizing.kv_elements_per_token): weights only here.
            items["EAGLE3 draft weights (MLA draft)"] = catalog.EAGLE3_MLA_DRAFT_BYTES // r.tensor_parallel
        elif r.spec.engine.speculative != "off":
            items["EAGLE3 draft weights and KV"] = (
                catalog.EAGLE3_DRAFT_BYTES
                + catalog.EAGLE3_DRAFT_KV_BYTES_PER_TOKEN * r.spec.context_length) // r.tensor_parallel
        return items

    def outside_knob(self, r: Resolved) -> dict[str, int]:
        """What the engine needs outside its memory knob (an OOM at start or under load otherwise)."""
        return {}

    #: Share of outside_knob that must be free: below it the stack is refused.
    outside_tolerance: ClassVar[float] = 1.0

    def per_rank(self, r: Resolved) -> dict[str, int]:
        """What each rank will actually run with, after the engine's own adjustments."""
        return {"prefill tokens per step": r.max_num_batched_tokens}

    # --- weight loader --------------------------------------------------------------------------

    def loader(self, r: Resolved) -> tuple[catalog.Loader | None, str]:
        """(the loader rendered as --load-format, or None for the engine's default; why, in plain words).

        Only an adopted catalog.LOADERS row of this engine, in the stack's exact release and image, on
        one node (unless the row covers several), on a volume faster than the default loader's measured
        rate, with room on each device for the files the loader stages there."""
        version = r.image_entry.package_version if r.image_entry else None
        rows = [row for row in catalog.LOADERS if row.engine == self.name and row.adopted]
        if not rows:
            return None, f"no loader of {self.name} is adopted ({loader_rejections(self.name)})"
        reasons = []
        for row in rows:
            if version not in row.releases:
                reasons.append(f"{row.load_format} is adopted for {self.name} {', '.join(row.releases)} only "
                               f"(this image runs {version or 'an unknown release'})")
            elif r.image not in row.images:
                reasons.append(f"{row.load_format}: {r.image} is not known to carry {row.dependency} "
                               f"({row.dependency_basis})")
            elif r.multi_node and not row.multi_node:
                reasons.append(f"{row.load_format}: one node per replica only ({row.why})")
            elif volume_read_bytes_per_second(r) <= catalog.LOADER_READ_BYTES_PER_SECOND:
                reasons.append(f"{row.load_format} would gain nothing: the {r.weights_volume} volume reads "
                               f"{volume_read_bytes_per_second(r) / 1e9:.2f} GB/s, no faster than the default "
                               f"loader's {catalog.LOADER_READ_BYTES_PER_SECOND / 1e9:.2f} GB/s")
            elif self._staging_room(r, row, vision_per_device(r)) < 0:
                reasons.append(f"{row.load_format}: no room on each device for {row.staged_files_per_rank} "
                               "checkpoint file(s) beside the weights")
            else:
                return row, f"{row.load_format} ({row.figure_source.where})"
        return None, "; ".join(reasons)

    def _staging_room(self, r: Resolved, row: catalog.Loader, vision: int) -> int:
        """Device bytes left while the loader stages its files beside the weights (negative: none)."""
        if not row.staged_files_per_rank:
            return 0
        shards = r.checkpoint.shards
        if not shards:
            return -1  # file sizes not recorded for this checkpoint: not adopted
        staged = row.staged_files_per_rank * -(-r.checkpoint.size_bytes // shards)
        used = self.weights_per_device(r) + vision + self.profile.runtime_overhead_bytes
        return r.accelerator.memory_bytes - used - staged

    def loader_args(self, r: Resolved) -> list[str]:
        """The managed --load-format (nothing for the engine's default loader)."""
        row, _ = self.loader(r)
        return ["--load-format", row.load_format] if row else []


def loader_rejections(engine: str) -> str:
    """The catalog's rejected loaders of one engine, each with its reason."""
    return "; ".join(f"{row.load_format}: {row.why}" for row in catalog.LOADERS
                     if row.engine == engine and not row.adopted)
