"""A spec with its defaults resolved against the catalog: what will actually run."""

from __future__ import annotations

import re

from dataclasses import dataclass
from functools import cached_property

from packaging.version import Version

from kimi_fleet import catalog, engines, targets
from kimi_fleet.spec import StackSpec


@dataclass(frozen=True)
class Resolved:
    spec: StackSpec

    @cached_property
    def accelerator(self) -> catalog.Accelerator:
        return catalog.ACCELERATORS[self.spec.accelerator]

    @cached_property
    def checkpoint(self) -> catalog.Checkpoint:
        return catalog.CHECKPOINTS[self.spec.checkpoint]

    @cached_property
    def engine(self) -> catalog.EngineProfile:
        return catalog.ENGINES[self.spec.engine.name]

    @cached_property
    def adapter(self) -> engines.Engine:
        """The engine module that renders and sizes this stack."""
        return engines.get(self.spec.engine.name)

    @cached_property
    def quirks(self) -> tuple[catalog.HardwareQuirk, ...]:
        """The catalog's hardware quirks that apply to this engine, accelerator and checkpoint."""
        return tuple(q for q in catalog.HARDWARE_QUIRKS
                     if q.matches(self.spec.engine.name, self.accelerator, self.spec.checkpoint))

    @property
    def quirk_flags(self) -> list[str]:
        return [flag for q in self.quirks for flag in q.flags]

    @property
    def quirk_env(self) -> dict[str, str]:
        return {key: value for q in self.quirks for key, value in q.env.items()}

    def _quirk_default(self, attribute: str):
        return next((getattr(q, attribute) for q in self.quirks if getattr(q, attribute) is not None), None)

    @property
    def repo(self) -> str | None:
        return self.spec.model.repo or self.checkpoint.repo

    @property
    def revision(self) -> str | None:
        return self.spec.model.revision or self.checkpoint.revision

    @cached_property
    def image(self) -> str | None:
        if self.spec.engine.image:
            return self.spec.engine.image
        return self._quirk_default("image") or catalog.DEFAULT_IMAGE.get((self.spec.engine.name, self.accelerator.arch))

    @property
    def compile_cache_dir_name(self) -> str:
        """One cache per engine image and accelerator: kernels built for one never load in another."""
        image = re.sub(r"[^A-Za-z0-9._-]+", "_", self.image or "unknown-image")
        return f"{self.spec.engine.name}--{image}--{self.spec.accelerator}"

    @property
    def image_entry(self) -> catalog.EngineImage | None:
        return catalog.ENGINE_IMAGES.get(self.image or "")

    @property
    def engine_version(self) -> Version | None:
        """The engine version the image carries, when the catalog knows the image."""
        return Version(self.image_entry.version) if self.image_entry else None

    @cached_property
    def tensor_parallel(self) -> int:
        if self.spec.parallelism.tensor_parallel:
            return self.spec.parallelism.tensor_parallel
        multiple = self._quirk_default("heads_per_rank_multiple")
        if multiple:
            # The largest TP whose heads per rank the kernel accepts.
            return min(self.spec.accelerator_count, catalog.KIMI_K26.attention_heads // multiple)
        return self.spec.accelerator_count // self.data_parallel_gpu_factor

    @property
    def data_parallel_gpu_factor(self) -> int:
        """How many times data parallelism multiplies the GPUs of one engine (the engine decides)."""
        return self.adapter.data_parallel_gpu_factor(self)

    @property
    def gpus_per_engine(self) -> int:
        return self.tensor_parallel * self.data_parallel_gpu_factor

    @property
    def nodes_per_replica(self) -> int:
        return self.spec.parallelism.nodes

    @property
    def multi_node(self) -> bool:
        return self.nodes_per_replica > 1

    @cached_property
    def pipeline_parallel(self) -> int:
        return self.spec.parallelism.pipeline_parallel or self.nodes_per_replica

    @cached_property
    def stage_layers(self) -> tuple[int, ...]:
        """Layers per pipeline stage, as the engine splits them by default (catalog.MultiNodeSupport)."""
        layers, stages = catalog.KIMI_K26.layers, self.pipeline_parallel
        base, extra = divmod(layers, stages)
        split = [base] * stages
        support = catalog.MULTI_NODE.get(self.spec.engine.name)
        if extra and support and support.extra_layers == "last":
            for index in range(stages - extra, stages):
                split[index] += 1
        elif extra:  # vLLM: the second-last stage, then backwards (stages > 2 spare the first)
            for index in range(2, extra + 2):
                split[-index] += 1
        return tuple(split)

    @property
    def largest_stage_layers(self) -> int:
        return max(self.stage_layers)

    @property
    def stage_ranges(self) -> tuple[tuple[int, int], ...]:
        """Each stage's layers as (first, end): end exclusive, as vLLM's get_pp_indices returns them."""
        ranges, first = [], 0
        for layers in self.stage_layers:
            ranges.append((first, first + layers))
            first += layers
        return tuple(ranges)

    @cached_property
    def stage_fetch(self) -> bool:
        """Each node of the replica fetches and verifies only its pipeline stage's shards: an engine
        whose loader skips absent shards (catalog.STAGE_FETCH_ENGINES), through the loader read for it.
        On AWS each node's download script fetches its stage; on Kubernetes each LeaderWorkerSet pod's
        init container does (weights on its node's disk, from the Hub: k8s_manifests.STAGE_DOWNLOAD_SCRIPT),
        while a weights claim shared by every pod is filled whole by the download Job."""
        if not self.multi_node or self.spec.engine.name not in catalog.STAGE_FETCH_ENGINES:
            return False
        if self.target.renders_manifests and (self.weights_volume != "host-path"
                                              or self.spec.weights.source != "huggingface"):
            return False
        loader, _ = self.adapter.loader(self)
        return (loader.load_format if loader else None) in catalog.STAGE_FETCH_LOAD_FORMATS

    @property
    def on_efa_fabric(self) -> bool:
        """A rank of a multi-node replica on an instance type with an RDMA fabric (catalog.FABRICS)."""
        return bool(self.multi_node and self.offer and self.offer.instance_type in catalog.FABRICS)

    @property
    def builds_efa_image(self) -> bool:
        """The node builds the EFA engine image itself (its engine unit, before the engine starts);
        Kubernetes pods run a prebuilt one (target.kubernetes.efaEngineImage)."""
        return self.on_efa_fabric and not self.target.renders_manifests

    @property
    def draft_has_mla(self) -> bool:
        """The speculative draft is the K2.6 MLA one: its KV is a latent layer in the engine's pool."""
        return (self.spec.engine.speculative != "off"
                and (self.spec.engine.speculative_draft_repo or "") in catalog.EAGLE3_MLA_DRAFT_REPOS)

    @cached_property
    def engines_per_node(self) -> int:
        if self.spec.parallelism.engines_per_node:
            return self.spec.parallelism.engines_per_node
        if self.multi_node:  # one engine over all the nodes of the replica
            return 1
        return max(1, self.spec.accelerator_count // self.gpus_per_engine)

    @cached_property
    def memory_knob(self) -> float:
        if self.spec.engine.memory_fraction is not None:
            return self.spec.engine.memory_fraction
        by_accel = catalog.DEFAULT_MEMORY_KNOB_BY_ACCELERATOR.get((self.spec.engine.name, self.accelerator.id))
        if by_accel is not None:
            return by_accel
        return catalog.DEFAULT_MEMORY_KNOB.get((self.spec.engine.name, self.accelerator.vendor), 0.85)

    @cached_property
    def kv_cache_dtype(self) -> str:
        if self.spec.kv_cache_dtype:
            return self.spec.kv_cache_dtype
        preferred = self.checkpoint.preferred_kv_dtype.get(self.spec.engine.name)
        return preferred or self._quirk_default("kv_dtype") or "auto"

    @property
    def mm_encoder_tp_mode(self) -> str | None:
        return self.adapter.mm_encoder_tp_mode(self)

    @property
    def max_num_batched_tokens(self) -> int:
        return self.spec.engine.max_num_batched_tokens or self.engine.default_batched_tokens

    @cached_property
    def target(self) -> targets.Target:
        """The target module that places, prices and constrains this stack."""
        return targets.for_spec(self.spec)

    @property
    def weights_volume(self) -> str:
        return self.spec.weights.volume or self.target.default_weight_volume(self)

    @cached_property
    def offer(self) -> catalog.MachineOffer | None:
        """The machine the stack rents, when the catalog knows one for its target."""
        return self.target.offer(self)

    @property
    def weights_dir_name(self) -> str:
        repo = (self.repo or "weights").replace("/", "--")
        return f"{repo}/{self.revision}"
