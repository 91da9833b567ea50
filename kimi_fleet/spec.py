"""The stack spec: what one stack file asks for, validated before anything is declared.

Config keys live under the `kimi-fleet:` namespace, one key per top-level field, camelCase
(`kimi-fleet:accelerator: h200`, `kimi-fleet:engine: {name: sglang}`). Defaults fill in what is
right for the hardware, so a stack file stays short. Compatibility rules live in `rules.py`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kimi_fleet import catalog

CONFIG_NAMESPACE = "kimi-fleet"
REVISION_PATTERN = re.compile(r"^[0-9a-f]{40}$")
UNPINNED_TAGS = frozenset({"latest", "nightly", "main", "dev", "edge", "stable"})
DOMAIN_PATTERN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
SERVED_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")


class Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


def image_is_pinned(image: str) -> bool:
    """A tag that names a release (not latest/nightly), or a digest."""
    if "@sha256:" in image:
        return bool(re.search(r"@sha256:[0-9a-f]{64}$", image))
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:  # no tag at all ("repo/img") or a registry port ("host:5000/img")
        return False
    return tag.lower() not in UNPINNED_TAGS and not tag.lower().startswith("nightly")


class ModelSpec(Spec):
    repo: str | None = Field(None, description="Hugging Face repo; default: the checkpoint's")
    revision: str | None = Field(None, description="the 40-hex commit; default: the catalog's pin")
    served_name: str = Field("kimi-k2.6", description="the model id clients send: keep it stable")

    @field_validator("revision")
    @classmethod
    def _revision_pinned(cls, value: str | None) -> str | None:
        if value is not None and not REVISION_PATTERN.match(value):
            raise ValueError(
                f"revision {value!r} is not a pinned commit: give the 40-hex commit sha "
                "(a branch or tag like 'main' moves under a running fleet)"
            )
        return value

    @field_validator("served_name")
    @classmethod
    def _served_name_shape(cls, value: str) -> str:
        if not SERVED_NAME_PATTERN.match(value):
            raise ValueError(f"served name {value!r} must be 1-128 chars of letters, digits, . _ / -")
        return value


class EngineSpec(Spec):
    name: Literal["vllm", "sglang"]
    image: str | None = Field(None, description="pinned image tag; default from the catalog")
    memory_fraction: Annotated[float, Field(gt=0.3, le=0.98)] | None = Field(
        None, description="SGLang --mem-fraction-static / vLLM --gpu-memory-utilization"
    )
    max_num_batched_tokens: Annotated[int, Field(ge=256)] | None = None
    moe_backend: str | None = Field(None, description="vLLM --moe-backend (NVFP4 on sm_120: marlin)")
    language_model_only: bool = False
    mm_encoder_tp_mode: Literal["data", "weights"] | None = None
    speculative: Literal["off", "eagle3"] = Field("off", description="EAGLE3 measured harmful for K2.6 (seed 004)")
    speculative_draft_repo: str | None = None
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("image")
    @classmethod
    def _image_pinned(cls, value: str | None) -> str | None:
        if value is not None and not image_is_pinned(value):
            raise ValueError(
                f"image {value!r} is not pinned: use a release tag (e.g. vllm/vllm-openai:v0.22.1) or a "
                "@sha256 digest; latest/nightly images change under a running fleet"
            )
        return value

    @field_validator("extra_args")
    @classmethod
    def _no_whitespace(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for arg in value:
            if not arg or any(ch.isspace() for ch in arg):
                raise ValueError(f"extra arg {arg!r} is empty or contains whitespace (args are passed unquoted)")
        return value


class ParallelismSpec(Spec):
    tensor_parallel: Annotated[int, Field(ge=1, le=64)] | None = None
    data_parallel: Annotated[int, Field(ge=1, le=64)] = 1
    dp_attention: bool = False
    expert_parallel: bool = False
    decode_context_parallel: Annotated[int, Field(ge=1, le=64)] = 1
    engines_per_node: Annotated[int, Field(ge=1, le=16)] | None = None


class WeightsSpec(Spec):
    source: Literal["huggingface", "s3-mirror"] = "huggingface"
    s3_mirror_uri: str | None = Field(None, description="s3://bucket/prefix holding <repo>/<revision>/")
    download_gbps: Annotated[float, Field(gt=0)] | None = None
    volume: Literal["instance-store", "ebs", "host-path", "pvc"] | None = None
    ebs_size_gib: Annotated[int, Field(ge=700)] = 1000
    ebs_throughput_mibps: Annotated[int, Field(ge=125, le=catalog.EBS_GP3_MAX_THROUGHPUT_MIBPS)] = (
        catalog.EBS_GP3_MAX_THROUGHPUT_MIBPS
    )
    host_path: str = "/data/kimi-fleet/weights"

    @model_validator(mode="after")
    def _mirror_needs_uri(self) -> "WeightsSpec":
        if self.source == "s3-mirror" and not (self.s3_mirror_uri or "").startswith("s3://"):
            raise ValueError("weights.source s3-mirror needs weights.s3MirrorUri like s3://bucket/prefix")
        return self


class AwsTarget(Spec):
    region: str = "us-east-1"
    instance_type: str | None = Field(None, description="default: the catalog's offer for the accelerator")
    availability_zones: tuple[str, ...] = ()
    subnet_ids: tuple[str, ...] = ()
    vpc_id: str | None = None
    hosted_zone_id: str | None = None
    ssh_allowlist: tuple[str, ...] = ()
    key_name: str | None = None
    root_volume_gib: Annotated[int, Field(ge=100)] = 200
    ssm_prefix: str | None = Field(None, description="SSM Parameter Store prefix for secrets; default /kimi-fleet/<stack>")

    @field_validator("ssh_allowlist")
    @classmethod
    def _no_world_ssh(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            if cidr in ("0.0.0.0/0", "::/0"):
                raise ValueError(f"sshAllowlist entry {cidr} opens SSH to the world: list your own CIDRs")
            if "/" not in cidr:
                raise ValueError(f"sshAllowlist entry {cidr!r} is not a CIDR (e.g. 203.0.113.7/32)")
        return value


class KubernetesTarget(Spec):
    namespace: str = "kimi-fleet"
    kubeconfig_context: str | None = None
    gpu_claim: Literal["dra", "extended-resource"] = "extended-resource"
    device_class: str = "gpu.nvidia.com"
    storage_class: str | None = Field(None, description="local-NVMe storage class for the weights PVC")
    capacity_type_label: str = "karpenter.sh/capacity-type"
    node_selector: dict[str, str] = Field(default_factory=dict)
    external_dns: bool = False
    proxy_service_type: Literal["LoadBalancer", "NodePort", "ClusterIP"] = "LoadBalancer"
    pod_memory_gib: Annotated[int, Field(ge=16)] = 256
    pod_cpus: Annotated[int, Field(ge=2)] = 32


class HostTarget(Spec):
    address: str | None = Field(None, description="default: secret config kimi-fleet:sshHost")
    user: str = "ubuntu"
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    hosted_zone_id: str | None = None
    startup_script_only: bool = Field(False, description="a GPU cloud that only accepts a startup script (seed 000)")


class TargetSpec(Spec):
    kind: Literal["aws", "kubernetes", "host"]
    aws: AwsTarget | None = None
    kubernetes: KubernetesTarget | None = None
    host: HostTarget | None = None

    @model_validator(mode="after")
    def _settings_for_kind(self) -> "TargetSpec":
        for other in ("aws", "kubernetes", "host"):
            if other != self.kind and getattr(self, other) is not None:
                raise ValueError(f"target.{other} given but target.kind is {self.kind!r}")
        if getattr(self, self.kind) is None:
            default = {"aws": AwsTarget, "kubernetes": KubernetesTarget, "host": HostTarget}[self.kind]()
            object.__setattr__(self, self.kind, default)
        return self


class CapacitySpec(Spec):
    workload: Literal["interactive", "batch"] = "interactive"
    market: Literal["on-demand", "spot", "capacity-block"] | None = Field(
        None, description="override; default on-demand for interactive, spot for batch"
    )
    replicas: Annotated[int, Field(ge=1, le=64)] = 1
    on_demand_base: Annotated[int, Field(ge=0)] | None = None
    max_spot_price_usd: Annotated[float, Field(gt=0)] | None = None
    capacity_reservation_id: str | None = Field(None, description="Capacity Block reservation (cr-...)")

    @property
    def effective_market(self) -> str:
        if self.market:
            return self.market
        return "on-demand" if self.workload == "interactive" else "spot"

    @property
    def effective_on_demand_base(self) -> int:
        """How many replicas stay on-demand: all of them unless the market is spot."""
        if self.effective_market != "spot":
            return self.replicas
        if self.on_demand_base is not None:
            return self.on_demand_base
        # Interactive traffic keeps one replica that a spot interruption cannot take.
        return 1 if self.workload == "interactive" else 0

    @model_validator(mode="after")
    def _coherent(self) -> "CapacitySpec":
        if self.on_demand_base is not None and self.on_demand_base > self.replicas:
            raise ValueError(f"capacity.onDemandBase {self.on_demand_base} exceeds capacity.replicas {self.replicas}")
        if self.effective_market == "capacity-block" and not self.capacity_reservation_id:
            raise ValueError("capacity.market capacity-block needs capacity.capacityReservationId (cr-...)")
        if self.workload == "interactive" and self.effective_market == "spot" and self.effective_on_demand_base < 1:
            raise ValueError(
                "capacity: an interactive stack on spot needs capacity.onDemandBase >= 1: a spot "
                "interruption would otherwise abort live sessions (seed 000)"
            )
        if self.max_spot_price_usd is not None and self.effective_market != "spot":
            raise ValueError("capacity.maxSpotPriceUsd given but the market is not spot")
        return self


class VerificationSpec(Spec):
    enabled: bool = True
    checks: tuple[
        Literal["auth", "models", "health", "thinking", "instant", "tool_call", "vision", "streaming", "context", "tls"], ...
    ] = ()
    load: Annotated[int, Field(ge=0, le=1024)] = 0
    timeout_seconds: Annotated[int, Field(ge=30)] = 600


class StackSpec(Spec):
    stack: str = Field(description="the stack name (filled from the file name)")
    description: str = ""
    model: ModelSpec = ModelSpec()
    accelerator: str
    accelerator_count: Annotated[int, Field(ge=1, le=64)] = 8
    checkpoint: Literal["int4", "nvfp4", "w4a8"] = "int4"
    engine: EngineSpec
    context_length: Annotated[int, Field(ge=1024)] = catalog.KIMI_K26.max_context_tokens
    kv_cache_dtype: Literal["auto", "bf16", "fp8", "fp8_e4m3", "fp8_e5m2"] | None = None
    parallelism: ParallelismSpec = ParallelismSpec()
    weights: WeightsSpec = WeightsSpec()
    target: TargetSpec
    capacity: CapacitySpec = CapacitySpec()
    domain: str
    acme_email: str | None = None
    verification: VerificationSpec = VerificationSpec()
    budget_per_hour_usd: Annotated[float, Field(gt=0)] | None = None

    @field_validator("accelerator")
    @classmethod
    def _known_accelerator(cls, value: str) -> str:
        if value not in catalog.ACCELERATORS:
            raise ValueError(f"unknown accelerator {value!r}; known: {', '.join(sorted(catalog.ACCELERATORS))}")
        return value

    @field_validator("domain")
    @classmethod
    def _domain_shape(cls, value: str) -> str:
        if not DOMAIN_PATTERN.match(value):
            raise ValueError(f"domain {value!r} is not a DNS name (lowercase, e.g. kimi.example.com)")
        return value

    @field_validator("context_length")
    @classmethod
    def _context_within_model(cls, value: int) -> int:
        limit = catalog.KIMI_K26.max_context_tokens
        if value > limit:
            raise ValueError(f"contextLength {value} exceeds the model's {limit} tokens")
        return value


class StackSpecError(ValueError):
    """A stack that must not deploy, with every reason, each naming file, field and value."""

    def __init__(self, stack_file: str, problems: list[str]):
        self.stack_file = stack_file
        self.problems = problems
        super().__init__("\n".join(f"{stack_file}: {p}" for p in problems))


def _field_path(loc: tuple) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]"
        elif isinstance(item, str) and not item.startswith("function-"):
            parts.append(to_camel(item) if "_" in item else item)
    return ".".join(parts)


def _value_at(raw: dict, loc: tuple):
    node = raw
    for item in loc:
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def parse_spec(raw: dict, stack: str, stack_file: str) -> StackSpec:
    """Build the spec from config values (keys without the namespace); raise StackSpecError."""
    data = {"stack": stack, **raw}
    try:
        spec = StackSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            path = _field_path(err["loc"]) or "(stack)"
            field = f"{CONFIG_NAMESPACE}:{path}"
            value = _value_at(data, err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            given = f" (given {value!r})" if value is not None and not isinstance(value, dict) else ""
            problems.append(f"field {field}{given}: {message}")
        raise StackSpecError(stack_file, problems) from None
    from kimi_fleet.rules import check_rules  # rules read the spec and the catalog

    problems = check_rules(spec)
    if problems:
        raise StackSpecError(stack_file, problems)
    return spec
