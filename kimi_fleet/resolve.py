"""A spec with its defaults resolved against the catalog: what will actually run."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from kimi_fleet import catalog
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
        if self.spec.checkpoint == "nvfp4" and self.spec.engine.name == "vllm" and self.accelerator.arch == "sm_120":
            return catalog.NVFP4_SM120_IMAGE
        return catalog.DEFAULT_IMAGE.get((self.spec.engine.name, self.accelerator.arch))

    @property
    def image_entry(self) -> catalog.EngineImage | None:
        return catalog.ENGINE_IMAGES.get(self.image or "")

    @cached_property
    def tensor_parallel(self) -> int:
        if self.spec.parallelism.tensor_parallel:
            return self.spec.parallelism.tensor_parallel
        if self.accelerator.vendor == "amd" and self.spec.engine.name == "sglang":
            # Largest TP the AITER MLA kernel accepts (heads per GPU a multiple of 16).
            largest = catalog.KIMI_K26.attention_heads // catalog.AITER_MLA_HEADS_MULTIPLE
            return min(self.spec.accelerator_count, largest)
        return self.spec.accelerator_count // self.data_parallel_gpu_factor

    @property
    def data_parallel_gpu_factor(self) -> int:
        """DP that multiplies GPUs: vLLM DP, or SGLang DP without DP attention (replicas in one server)."""
        p = self.spec.parallelism
        if self.spec.engine.name == "sglang" and p.dp_attention:
            return 1
        return p.data_parallel

    @property
    def gpus_per_engine(self) -> int:
        return self.tensor_parallel * self.data_parallel_gpu_factor

    @cached_property
    def engines_per_node(self) -> int:
        if self.spec.parallelism.engines_per_node:
            return self.spec.parallelism.engines_per_node
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
        if preferred:
            return preferred
        if self.accelerator.vendor == "amd" and self.spec.engine.name == "sglang":
            return "fp8_e4m3"  # seed 001: the AMD generator's default
        return "auto"

    @property
    def mm_encoder_tp_mode(self) -> str | None:
        if self.spec.engine.name != "vllm" or self.spec.engine.language_model_only:
            return None
        return self.spec.engine.mm_encoder_tp_mode or "data"

    @property
    def max_num_batched_tokens(self) -> int:
        return self.spec.engine.max_num_batched_tokens or self.engine.default_batched_tokens

    @property
    def weights_volume(self) -> str:
        if self.spec.weights.volume:
            return self.spec.weights.volume
        kind = self.spec.target.kind
        if kind == "kubernetes":
            return "pvc"
        if kind == "host":
            return "host-path"
        # A fleet's replicas cannot share one EBS volume: they use their own instance store.
        return "ebs" if self.spec.capacity.replicas == 1 else "instance-store"

    @cached_property
    def offer(self) -> catalog.MachineOffer | None:
        """The machine the stack rents, when the catalog knows one for its target."""
        spec = self.spec
        if spec.target.kind == "aws":
            wanted = spec.target.aws.instance_type
            if wanted:
                return catalog.MACHINE_OFFERS.get(wanted)
            candidates = [
                o for o in catalog.MACHINE_OFFERS.values()
                if o.provider == "aws" and o.accelerator == spec.accelerator
                and o.accelerator_count == spec.accelerator_count
            ]
            # Prefer an offer sold on demand, then the cheaper one.
            candidates.sort(key=lambda o: (o.on_demand_usd_per_hour is None, o.on_demand_usd_per_hour or 0))
            return candidates[0] if candidates else None
        if spec.target.kind == "host" and spec.target.host.startup_script_only:
            for o in catalog.MACHINE_OFFERS.values():
                if o.provider == "gpu-cloud" and o.accelerator == spec.accelerator:
                    return o
        return None

    @property
    def weights_dir_name(self) -> str:
        repo = (self.repo or "weights").replace("/", "--")
        return f"{repo}/{self.revision}"
