"""The stack spec: what one stack file asks for, validated before anything is declared.

Config keys live under the `kimi-fleet:` namespace, one key per top-level field, camelCase
(`kimi-fleet:accelerator: h200`, `kimi-fleet:engine: {name: sglang}`). Defaults fill in what is
right for the hardware, so a stack file stays short. Compatibility rules live in `rules.py`.
"""

from __future__ import annotations

import difflib
import ipaddress
import posixpath
import re
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from kimi_fleet import catalog, engines
from kimi_fleet.pinning import image_is_pinned  # noqa: F401  (one predicate with the policy pack)

CONFIG_NAMESPACE = "kimi-fleet"
REVISION_PATTERN = re.compile(r"^[0-9a-f]{40}$")
DOMAIN_PATTERN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
SERVED_NAME_PATTERN = re.compile(r"^(?=.{1,128}$)[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")

# --- Shapes of free-text values -----------------------------------------------------------------
# Every string that reaches a node (a root shell's settings, a unit file, a Caddyfile, a manifest)
# has one of these shapes: nothing that a shell, systemd, Caddy or YAML would read as syntax.


def _shaped(pattern: str, what: str, max_length: int = 253):
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if len(value) > max_length or not compiled.fullmatch(value):
            raise ValueError(f"{value!r} is not {what}")
        return value

    return Annotated[str, AfterValidator(check)]


HfRepo = _shaped(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}",
                 "a Hugging Face repo id (owner/name: letters, digits, . _ -)", 193)
AwsRegion = _shaped(r"[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[0-9]", "an AWS region (e.g. us-east-1)", 32)
AvailabilityZone = _shaped(r"[a-z]{2}(-gov)?-[a-z]+-[0-9][a-z]", "an availability zone (e.g. us-east-1a)", 32)
InstanceType = _shaped(r"[a-z][a-z0-9-]*\.[a-z0-9]+", "an EC2 instance type (e.g. p5en.48xlarge)", 40)
OfferName = _shaped(r"[a-z0-9][a-z0-9-]{0,62}", "a GPU-cloud offer name (e.g. spheron-8x-h200-sxm5)", 63)
SubnetId = _shaped(r"subnet-[0-9a-f]{8,17}", "a subnet id (subnet-...)", 24)
VpcId = _shaped(r"vpc-[0-9a-f]{8,17}", "a VPC id (vpc-...)", 21)
HostedZoneId = _shaped(r"Z[A-Z0-9]{1,31}", "a Route53 hosted zone id (Z...)", 32)
KeyPairName = _shaped(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", "an EC2 key pair name (letters, digits, . _ -)", 128)
SsmPath = _shaped(r"(/[A-Za-z0-9_.-]{1,64}){1,8}", "an SSM parameter path (/a/b: letters, digits, _ . -)", 512)
ReservationId = _shaped(r"cr-[0-9a-f]{8,17}", "a capacity reservation id (cr-...)", 20)
AmiId = _shaped(r"ami-([0-9a-f]{8}|[0-9a-f]{17})", "an AMI id (ami- and 8 or 17 hex digits)", 21)
S3Uri = _shaped(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._-]+)*/?",
                "an s3://bucket/prefix URI (prefix: letters, digits, . _ - and /)", 512)
#: A DNS-1123 label: stack names, namespaces, and the parts of domains and email domains.
DNS_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
EMAIL_PATTERN = r"[A-Za-z0-9._%+-]{1,64}@" + DNS_LABEL + r"(\." + DNS_LABEL + r")*\.[a-z]{2,63}"
DnsLabel = _shaped(DNS_LABEL, "a DNS-1123 label (lowercase letters, digits, -)", 63)
DnsSubdomain = _shaped(DNS_LABEL + r"(\." + DNS_LABEL + r")*",
                       "a DNS-1123 subdomain (lowercase letters, digits, - and .)", 253)
LabelKey = _shaped(r"([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?",
                   "a Kubernetes label key ([prefix/]name)", 317)
LabelValue = _shaped(r"([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?", "a Kubernetes label value", 63)
ContextName = _shaped(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,252}", "a kubeconfig context name", 253)
UnixUser = _shaped(r"[a-z_][a-z0-9_-]{0,31}", "a Unix user name", 32)
Email = _shaped(EMAIL_PATTERN, "an email address (local@domain, lowercase domain)", 254)
EnvName = _shaped(r"[A-Z][A-Z0-9_]{0,63}", "an environment variable name (A-Z, 0-9, _; starts with a letter)", 64)
#: One character class for every value written to a node's settings, env files and argv:
#: no whitespace, quotes, $, backticks, ;, |, &, <, >, (, ), %, #, \, {, } or control characters.
SAFE_VALUE = r"[A-Za-z0-9._:/@,+=-]*"
EnvValue = _shaped(SAFE_VALUE, "a plain value (letters, digits and . _ : / @ , + = -)", 256)
Description = _shaped(r"[^\x00-\x1f\x7f]*", "one line of text without control characters", 500)
#: Where weights may live on a host: data mounts, never a system directory.
ALLOWED_HOST_PATH_ROOTS = ("/data", "/raid", "/mnt", "/srv", "/models", "/nvme", "/scratch", "/opt/kimi-fleet",
                          "/var/lib/kimi-fleet")  # /raid: a DGX's data array (seed 004)


def _host_path(value: str) -> str:
    if not re.fullmatch(r"(/[A-Za-z0-9._-]+)+", value) or posixpath.normpath(value) != value or any(
        part in (".", "..") for part in value.split("/")
    ):
        raise ValueError(f"{value!r} is not an absolute, normalised path of letters, digits, . _ -")
    if not any(value == root or value.startswith(root + "/") for root in ALLOWED_HOST_PATH_ROOTS):
        raise ValueError(f"{value!r} is not under an allowed root ({', '.join(ALLOWED_HOST_PATH_ROOTS)}): "
                         "weights never go in a system directory")
    return value


HostPath = Annotated[str, AfterValidator(_host_path)]


def _host_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not DOMAIN_PATTERN.match(value):
        raise ValueError(f"{value!r} is not an IP address or a DNS name")
    return value


HostAddress = Annotated[str, AfterValidator(_host_address)]
#: Namespaces the cluster owns: a stack never deploys into them.
RESERVED_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease", "default"})


class Spec(BaseModel):
    # Field docstrings become the descriptions in stacks/schema.json (what an editor shows).
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
                              allow_inf_nan=False, str_max_length=4096, use_attribute_docstrings=True)


class ModelSpec(Spec):
    repo: HfRepo | None = Field(None, description="Hugging Face repo; default: the checkpoint's")
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
            raise ValueError(f"served name {value!r} must be 1-128 chars of letters, digits, . _ - in /-separated "
                             "parts that start with a letter or digit")
        return value


def _registered_engine(value: str) -> str:
    if value not in engines.names():
        raise ValueError(f"unknown engine {value!r}; kimi-fleet has {', '.join(engines.names())}")
    return value


def _engine_enum(schema: dict) -> None:
    schema["enum"] = list(engines.names())


class EngineSpec(Spec):
    name: Annotated[str, AfterValidator(_registered_engine)] = Field(
        json_schema_extra=_engine_enum, description="the inference engine (one of kimi_fleet/engines/).")
    image: str | None = Field(None, description="pinned image tag; default from the catalog")
    memory_fraction: Annotated[float, Field(gt=0.3, le=0.98)] | None = Field(
        None, description="SGLang --mem-fraction-static / vLLM --gpu-memory-utilization"
    )
    max_num_batched_tokens: Annotated[int, Field(ge=256, le=1_048_576)] | None = None
    """tokens one rank prefills per step (vLLM --max-num-batched-tokens, SGLang --chunked-prefill-size;
    under SGLang DP attention the flag is rendered as this times dataParallel, which SGLang splits)."""
    cuda_graph_max_batch: Annotated[int, Field(ge=1, le=4096)] | None = None
    """SGLang --cuda-graph-max-bs: the largest decode batch captured per rank (default 512 on big GPUs;
    under DP attention graph memory grows with it times dataParallel)."""
    moe_backend: Literal["auto", "marlin", "triton", "cutlass", "flashinfer_cutlass", "flashinfer_trtllm"] | None = Field(
        None, description="vLLM --moe-backend (NVFP4 on sm_120: marlin)")
    language_model_only: bool = False
    """serve text only: no vision encoder (frees its memory; the vision check is skipped)."""
    mm_encoder_tp_mode: Literal["data", "weights"] | None = None
    """vLLM --mm-encoder-tp-mode: data (vision encoder replicated per rank) or weights (sharded)."""
    speculative: Literal["off", "eagle3"] = Field("off", description="EAGLE3 measured harmful for K2.6 (seed 004)")
    speculative_draft_repo: HfRepo | None = None
    """Hugging Face repo of the EAGLE3 draft model (with speculative: eagle3)."""
    extra_args: tuple[str, ...] = Field((), max_length=64)
    """more engine flags, one argument per item (flags the program manages are refused)."""
    env: dict[EnvName, EnvValue] = Field(default_factory=dict, max_length=64)
    """extra environment for the engine container: NAME: value."""

    @field_validator("image")
    @classmethod
    def _image_pinned(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[a-z0-9][A-Za-z0-9._/:@-]{0,254}", value):
            raise ValueError(f"image {value!r} is not an image reference (registry/name:tag or @sha256:...)")
        if value is not None and not image_is_pinned(value):
            raise ValueError(
                f"image {value!r} is not pinned: use a release tag (e.g. vllm/vllm-openai:v0.22.1) or a "
                "@sha256 digest; latest/nightly images change under a running fleet"
            )
        return value

    @field_validator("extra_args")
    @classmethod
    def _plain_args(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for arg in value:
            if not arg or len(arg) > 512 or not re.fullmatch(SAFE_VALUE, arg):
                raise ValueError(f"extra arg {arg!r} must be one non-empty argument of letters, digits and "
                                 ". _ : / @ , + = - (argv travels as a list; nothing is quoted or split)")
        return value


class ParallelismSpec(Spec):
    tensor_parallel: Annotated[int, Field(ge=1, le=64)] | None = None
    """ranks that split each layer; default: every accelerator of the engine."""
    data_parallel: Annotated[int, Field(ge=1, le=64)] = 1
    """SGLang --dp-size: attention replicas inside one engine."""
    dp_attention: bool = False
    """SGLang --enable-dp-attention: split the latent KV across DP ranks instead of replicating it."""
    expert_parallel: bool = False
    """spread the MoE experts across ranks (--enable-expert-parallel / --ep-size)."""
    decode_context_parallel: Annotated[int, Field(ge=1, le=64)] = 1
    """vLLM --decode-context-parallel-size: split the KV cache across TP ranks."""
    engines_per_node: Annotated[int, Field(ge=1, le=16)] | None = None
    """independent engines on one node, each on its share of the accelerators."""
    nodes: Annotated[int, Field(ge=1, le=8)] = 1
    """nodes one replica spans: tensor parallel inside each node, pipeline parallel across them
    (vLLM's multi_node_tp_pp recipe); the leader serves the API, the other ranks run headless."""
    pipeline_parallel: Annotated[int, Field(ge=1, le=8)] | None = None
    """pipeline stages (--pipeline-parallel-size / --pp-size); default: one per node."""


class WeightsSpec(Spec):
    source: Literal["huggingface", "s3-mirror"] = "huggingface"
    """where nodes fetch the checkpoint: the Hugging Face Hub or an S3 mirror."""
    s3_mirror_uri: S3Uri | None = Field(None, description="s3://bucket/prefix holding <repo>/<revision>/")
    mirror: Literal["external", "managed"] = "external"
    """external: s3MirrorUri is filled outside the stack (node_scripts/fill_mirror.py); managed: the stack
    creates or adopts its bucket and fills <repo>/<revision>/ on AWS before any GPU node starts."""
    mirror_bucket: Literal["create", "adopt"] = "create"
    """managed mirror: create the bucket (exactly one stack per bucket) or adopt the one another stack
    in the region created (plan.py --all checks the pairing)."""
    download_gbps: Annotated[float, Field(ge=0.1, le=800)] | None = None
    """expected download rate (Gbit/s) for the time-to-ready estimate; default: the offer's."""
    volume: Literal["instance-store", "ebs", "host-path", "pvc"] | None = None
    """where the weights live: instance-store (erased on stop), ebs (survives a node), host-path or pvc."""
    ebs_size_gib: Annotated[int, Field(ge=700, le=16384)] = 1000
    """EBS weight volume size (weights: ebs)."""
    ebs_throughput_mibps: Annotated[int, Field(ge=125, le=catalog.EBS_GP3_MAX_THROUGHPUT_MIBPS)] = (
        catalog.EBS_GP3_MAX_THROUGHPUT_MIBPS
    )
    """EBS gp3 throughput, MiB/s: the cold-load read rate."""
    host_path: HostPath = "/data/kimi-fleet/weights"
    """directory on the node that holds the weights (under an allowed root such as /data)."""
    allow_volume_replacement: bool = False
    """let a change replace the EBS weights volume (its verified checkpoint is then downloaded again):
    without it the volume is protected and Pulumi refuses to replace or delete it."""

    @property
    def s3_mirror_location(self) -> tuple[str, str]:
        """(bucket, key prefix without slashes at either end) of s3MirrorUri; ("", "") without one."""
        bucket, _, prefix = (self.s3_mirror_uri or "").removeprefix("s3://").partition("/")
        return bucket, prefix.strip("/")

    @model_validator(mode="after")
    def _mirror_needs_uri(self) -> "WeightsSpec":
        if self.source == "s3-mirror" and not (self.s3_mirror_uri or "").startswith("s3://"):
            raise ValueError("weights.source s3-mirror needs weights.s3MirrorUri like s3://bucket/prefix")
        if self.mirror == "managed" and self.source != "s3-mirror":
            raise ValueError(f"weights.mirror managed needs weights.source s3-mirror (given {self.source!r}): "
                             "the managed mirror is where the nodes fetch from")
        return self


def _ssh_cidr(cidr: str) -> str:
    """A canonical CIDR that is not the whole Internet (SSH allowlists of AWS and host targets)."""
    try:
        network = ipaddress.ip_network(cidr, strict=True)
    except ValueError:
        network = None
    if "/" not in cidr or network is None or str(network) != cidr:
        raise ValueError(f"sshAllowlist entry {cidr!r} is not a CIDR in canonical form (e.g. 203.0.113.7/32)")
    if network.prefixlen == 0:
        raise ValueError(f"sshAllowlist entry {cidr} opens SSH to the world: list your own CIDRs")
    return cidr


SshCidr = Annotated[str, Field(max_length=64), AfterValidator(_ssh_cidr)]


class AwsTarget(Spec):
    region: AwsRegion = "us-east-1"
    """AWS region, e.g. us-east-1."""
    instance_type: InstanceType | None = Field(None, description="default: the catalog's offer for the accelerator")
    availability_zones: tuple[AvailabilityZone, ...] = Field((), max_length=16)
    """restrict the node(s) to these zones; default: every zone that sells the instance type."""
    subnet_ids: tuple[SubnetId, ...] = Field((), max_length=16)
    """subnets for the node(s); default: the default VPC's subnets in the chosen zones."""
    vpc_id: VpcId | None = None
    """VPC of subnetIds; default: the default VPC."""
    hosted_zone_id: HostedZoneId | None = None
    """Route 53 zone for the domain's record; without it the plan says what record to create."""
    ssh_allowlist: tuple[SshCidr, ...] = Field((), max_length=32)
    """CIDRs that may reach SSH (port 22); none by default."""
    key_name: KeyPairName | None = None
    """EC2 key pair for SSH."""
    root_volume_gib: Annotated[int, Field(ge=100, le=16384)] = 200
    """root EBS volume size (engine images are 10-30 GB)."""
    ssm_prefix: SsmPath | None = Field(None, description="SSM Parameter Store prefix for secrets; default /kimi-fleet/<stack>")
    ami_id: AmiId | None = None
    """the nodes' AMI, pinned; a new one replaces a single node (the plan says so). Default: the Deep
    Learning Base AMI's SSM parameter, read at the first create and kept."""



class KubernetesTarget(Spec):
    #: A device plugin's extended resource: a DNS subdomain, a slash, a name (qualified-name rules).
    EXTENDED_RESOURCE: ClassVar[str] = (DNS_LABEL + r"(\." + DNS_LABEL + r")*/[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}"
                                        r"[A-Za-z0-9])?")
    namespace: DnsLabel = "kimi-fleet"
    """the stack's own namespace (not a system one such as kube-system)."""
    kubeconfig_context: ContextName | None = None
    """kubeconfig context to deploy to; default: the current one."""
    gpu_claim: Literal["dra", "extended-resource"] = "extended-resource"
    """how pods get accelerators: dra (ResourceClaimTemplate) or extended-resource (nvidia.com/gpu, amd.com/gpu)."""
    device_class: DnsSubdomain = "gpu.nvidia.com"
    """DRA DeviceClass of the accelerators (gpuClaim: dra)."""
    storage_class: DnsSubdomain | None = Field(None, description="local-NVMe storage class for the weights PVC")
    capacity_type_label: LabelKey = "karpenter.sh/capacity-type"
    """node label that says on-demand or spot (Karpenter's by default)."""
    node_selector: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=16)
    """more node labels the engine pods require."""
    external_dns: bool = False
    """annotate the proxy Service for external-dns to create the domain's record."""
    proxy_service_type: Literal["LoadBalancer", "NodePort", "ClusterIP"] = "LoadBalancer"
    """how the proxy is exposed: LoadBalancer (ACME certificate), NodePort or ClusterIP (internal TLS)."""
    pod_memory_gib: Annotated[int, Field(ge=16, le=4096)] = 256
    """memory request and limit of an engine pod."""
    pod_cpus: Annotated[int, Field(ge=2, le=512)] = 32
    """CPU request of an engine pod (no CPU limit: the weight load is CPU-bound)."""
    rdma_resource: Annotated[str, Field(max_length=253, json_schema_extra={"pattern": f"^{EXTENDED_RESOURCE}$"})] \
        | None = None
    """extended resource of the fabric's device plugin, for a replica over several pods
    (parallelism.nodes): vpc.amazonaws.com/efa (the EKS EFA device plugin), or an RDMA plugin's
    (rdma/rdma_shared_device_a, nvidia.com/hostdev) for InfiniBand/RoCE."""
    rdma_devices: Annotated[int, Field(ge=1, le=64)] | None = None
    """devices of rdmaResource per pod, requested = limit: every EFA interface of the node
    (p5.48xlarge: 32), or 1 share of an RDMA shared device."""
    prometheus_url: Annotated[str, Field(max_length=253, json_schema_extra={
        "pattern": r"^https?://[a-z0-9]([a-z0-9.-]{0,200}[a-z0-9])?(:[0-9]{1,5})?$"})] | None = None
    """the cluster's Prometheus that scrapes the stack's PodMonitor (the Prometheus Operator's), as KEDA
    reaches it (http://prometheus-operated.monitoring.svc:9090): KEDA's trigger for capacity.scaling
    asks it for the queue; needed when the stack scales."""
    prometheus_namespace: DnsLabel = "monitoring"
    """namespace of the Prometheus (the Prometheus Operator's) that scrapes the stack's PodMonitor: the
    stack's NetworkPolicy admits the metrics port from that namespace's Prometheus pods only."""
    prometheus_labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=8)
    """labels the Prometheus Operator selects monitors and rules by (its podMonitorSelector and
    ruleSelector, e.g. release: kube-prometheus-stack); set on the PodMonitor and PrometheusRule."""

    @field_validator("prometheus_url")
    @classmethod
    def _a_base_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[a-z0-9]([a-z0-9.-]{0,200}[a-z0-9])?(:[0-9]{1,5})?",
                                                  value):
            raise ValueError(f"{value!r} is not a Prometheus base URL (http[s]://host[:port], lowercase, no path)")
        return value

    efa_engine_image: str | None = None
    """the engine image with the AWS EFA userspace for a replica over EFA pods, by digest
    (registry/name@sha256:...): built from the Dockerfile scripts/efa_engine_dockerfile.py prints
    (the pinned engine image plus the digest-pinned EFA installer) and pushed where the nodes pull;
    a cluster's nodes cannot build it."""

    @field_validator("efa_engine_image")
    @classmethod
    def _image_by_digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[a-z0-9][a-z0-9._/:-]{0,200}@sha256:[0-9a-f]{64}", value):
            raise ValueError(f"{value!r} is not an image reference by digest (registry/name@sha256:<64 hex>): the "
                             "EFA engine image is the one built from the rendered Dockerfile, and only its digest "
                             "names those bytes")
        return value

    @field_validator("rdma_resource")
    @classmethod
    def _an_extended_resource(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not re.fullmatch(cls.EXTENDED_RESOURCE, value):
            raise ValueError(f"{value!r} is not an extended resource name (domain/name, e.g. vpc.amazonaws.com/efa)")
        domain = value.split("/")[0]
        if domain == "kubernetes.io" or domain.endswith((".kubernetes.io", "k8s.io")):
            raise ValueError(f"{value!r} is in a Kubernetes domain: the fabric's resource is its device plugin's own")
        return value

    @field_validator("namespace")
    @classmethod
    def _not_a_system_namespace(cls, value: str) -> str:
        if value in RESERVED_NAMESPACES:
            raise ValueError(f"namespace {value!r} belongs to the cluster: give the stack its own")
        return value


class HostTarget(Spec):
    address: HostAddress | None = Field(None, description="default: secret config kimi-fleet:sshHost")
    user: UnixUser = "ubuntu"
    """SSH user with sudo."""
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    """SSH port."""
    hosted_zone_id: str | None = None
    """Route 53 zone for the domain's record pointing at the host."""
    startup_script_only: bool = Field(False, description="a GPU cloud that only accepts a startup script (seed 000)")
    offer: OfferName | None = Field(
        None, description="with startupScriptOnly: the catalog's GPU-cloud offer to price (default: the cheapest "
                          "for the accelerator)")
    firewall: bool = Field(False, description="opt-in nftables rule set the bootstrap applies: 80/443 from anywhere, "
                                              "SSH only from sshAllowlist, everything else dropped")
    ssh_allowlist: tuple[SshCidr, ...] = Field((), max_length=32)
    """CIDRs the opt-in firewall admits to SSH (include the address you run pulumi up from)."""

    @model_validator(mode="after")
    def _firewall_keeps_ssh_reachable(self) -> "HostTarget":
        if self.firewall and not self.ssh_allowlist and not self.startup_script_only:
            raise ValueError("target.host.firewall needs target.host.sshAllowlist: Pulumi reaches the host over "
                             "SSH, and the rule set admits SSH only from the listed CIDRs (include your own)")
        if self.offer and not self.startup_script_only:
            raise ValueError("target.host.offer names a GPU-cloud offer: it applies with startupScriptOnly: true")
        if self.ssh_allowlist and not self.firewall:
            raise ValueError("target.host.sshAllowlist is applied only by target.host.firewall: set firewall: true")
        return self


# One variant per target kind (a discriminated union on `kind`): a stack file can hold only the
# settings of its own kind, and editors complete the right section. The other kinds' sections are
# class attributes that read as None, so code asks `spec.target.aws` whatever the kind.
class AwsTargetSpec(Spec):
    kind: Literal["aws"]
    """AWS: EC2 GPU instances, one node or an Auto Scaling fleet behind an NLB."""
    aws: AwsTarget = Field(default_factory=AwsTarget, description="AWS settings.")
    kubernetes: ClassVar[None] = None
    host: ClassVar[None] = None


class KubernetesTargetSpec(Spec):
    kind: Literal["kubernetes"]
    """a Kubernetes cluster: engine pods with a Caddy sidecar."""
    kubernetes: KubernetesTarget = Field(default_factory=KubernetesTarget, description="cluster settings.")
    aws: ClassVar[None] = None
    host: ClassVar[None] = None


class HostTargetSpec(Spec):
    kind: Literal["host"]
    """a machine you have (SSH), or a GPU cloud that takes a startup script."""
    host: HostTarget = Field(default_factory=HostTarget, description="existing machine settings.")
    aws: ClassVar[None] = None
    kubernetes: ClassVar[None] = None


TargetSpec = Annotated[AwsTargetSpec | KubernetesTargetSpec | HostTargetSpec, Field(discriminator="kind")]
#: The target kinds a stack can name (one variant each).
TARGET_KINDS = ("aws", "kubernetes", "host")


class ScalingSpec(Spec):
    """Replicas that follow the queue: the range, and the load one replica is sized for."""
    min_replicas: Annotated[int, Field(ge=0, le=64)] = 1
    """fewest replicas; 0 (scale to zero) only for batch work, which can wait a cold start."""
    max_replicas: Annotated[int, Field(ge=1, le=64)]
    """most replicas (the cost ceiling: the plan prints it per hour)."""
    waiting_per_replica: Annotated[float, Field(gt=0, le=10_000)] | None = None
    """target: requests waiting in each replica's engine queue (vllm:num_requests_waiting,
    sglang:num_queue_reqs); more than this adds replicas, less removes them."""
    ttft_p99_seconds: Annotated[float, Field(gt=0, le=600)] | None = None
    """target: the replicas' p99 time to first token; above it adds replicas."""
    kv_cache_per_replica: Annotated[float, Field(ge=0.3, le=0.95)] = 0.75
    """second signal, interactive stacks only: the replicas' mean KV cache use (0-1) the policy keeps
    them under. It keeps busy replicas whose queue is empty (the queue alone would remove them, and the
    requests they run would then queue on the rest for a whole time to ready) and adds replicas before a
    queue forms. A batch stack follows its queue target alone (a full cache shows as waiting requests)."""

    @model_validator(mode="after")
    def _coherent(self) -> "ScalingSpec":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"capacity.scaling.minReplicas {self.min_replicas} exceeds "
                             f"capacity.scaling.maxReplicas {self.max_replicas}")
        targets = [t for t in ("waiting_per_replica", "ttft_p99_seconds") if getattr(self, t) is not None]
        if len(targets) != 1:
            raise ValueError("capacity.scaling needs exactly one target: waitingPerReplica (requests queued "
                             "per replica) or ttftP99Seconds (time to first token objective); given "
                             f"{', '.join(to_camel(t) for t in targets) or 'none'}")
        return self

    @property
    def target_metric(self) -> str:
        """'waiting' or 'ttft': which signal the policy follows."""
        return "waiting" if self.waiting_per_replica is not None else "ttft"


class CapacitySpec(Spec):
    workload: Literal["interactive", "batch"] = "interactive"
    """interactive (keeps on-demand capacity) or batch (spot by default)."""
    market: Literal["on-demand", "spot", "capacity-block"] | None = Field(
        None, description="override; default on-demand for interactive, spot for batch"
    )
    replicas: Annotated[int, Field(ge=1, le=64)] = 1
    """nodes (AWS) or engine pods (Kubernetes) serving the endpoint."""
    on_demand_base: Annotated[int, Field(ge=0)] | None = None
    """replicas kept on on-demand under spot; default 1 for interactive, 0 for batch."""
    max_spot_price_usd: Annotated[float, Field(gt=0, le=1000)] | None = None
    """spot price ceiling per node-hour, USD."""
    node_hourly_usd: Annotated[float, Field(gt=0, le=10_000)] | None = None
    """what one node costs you per hour, USD, where the catalog has no price (an existing host, a
    cluster's node of this hardware): the plan then prices the stack, and its $/M tokens where a
    Kimi-K2.6 measurement matches the layout. AWS and GPU-cloud stacks are priced from the catalog."""
    capacity_reservation_id: ReservationId | None = Field(None, description="Capacity Block reservation (cr-...)")
    scaling: ScalingSpec | None = None
    """replicas that follow the load (AWS fleets, Kubernetes); capacity.replicas is then the count a
    first deploy starts with, inside the range."""
    rollout: Literal["one-at-a-time", "surge"] = Field(
        "one-at-a-time",
        description="how a new release replaces replicas (AWS fleet, Kubernetes): surge starts one extra "
                    "replica before stopping one (needs a spare replica's GPUs; costs one node for the "
                    "rollout), one-at-a-time stops one first (no extra GPUs; one replica less meanwhile)",
    )

    @property
    def effective_market(self) -> str:
        if self.market:
            return self.market
        return "on-demand" if self.workload == "interactive" else "spot"

    @property
    def most_replicas(self) -> int:
        """The replicas the stack may run at its peak: the scaling range's top, else the fixed count."""
        return self.scaling.max_replicas if self.scaling else self.replicas

    @property
    def is_fleet(self) -> bool:
        """More than one replica at some point: a group (AWS) or a Deployment that scales (Kubernetes),
        each replica with storage of its own."""
        return self.most_replicas > 1

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
        if self.scaling is not None:
            low, high = self.scaling.min_replicas, self.scaling.max_replicas
            if not low <= self.replicas <= high:
                raise ValueError(f"capacity.replicas {self.replicas} is outside capacity.scaling's range "
                                 f"{low}-{high}: it is the count a first deploy starts with")
            if self.workload == "batch" and "kv_cache_per_replica" in self.scaling.model_fields_set:
                raise ValueError("capacity.scaling.kvCachePerReplica is for interactive stacks: a batch stack "
                                 "follows its queue target alone (waitingPerReplica or ttftP99Seconds)")
            if low == 0 and self.workload != "batch":
                raise ValueError("capacity.scaling.minReplicas 0 (scale to zero) is for capacity.workload batch: "
                                 "an interactive client would wait a whole cold start for its first token")
            if self.on_demand_base is not None and self.on_demand_base > low:
                raise ValueError(f"capacity.onDemandBase {self.on_demand_base} exceeds capacity.scaling.minReplicas "
                                 f"{low}: scaling in would have to remove on-demand replicas the stack keeps")
        if self.max_spot_price_usd is not None and self.effective_market != "spot":
            raise ValueError("capacity.maxSpotPriceUsd given but the market is not spot")
        return self


class MonitoringSpec(Spec):
    """What the alerts hold the endpoint to: one set of thresholds for the Prometheus rules, the
    CloudWatch alarms and the dashboards' marker lines."""
    ttft_p99_seconds: Annotated[float, Field(gt=0, le=600)] = 10.0
    """time to first token objective (p99 over 5 minutes); the alert fires above it."""
    kv_cache_full_ratio: Annotated[float, Field(gt=0.5, le=1.0)] = 0.95
    """KV cache use (0-1) that counts as near full: new requests start to queue or be preempted."""
    error_ratio: Annotated[float, Field(gt=0, le=1.0)] = 0.05
    """share of requests answered 5xx over 5 minutes that fires the error alert."""
    unauthorized_per_second: Annotated[float, Field(gt=0, le=10_000)] = 1.0
    """rate of 401 answers (wrong or missing key) that fires the key alert: a leaked old key, or a scan."""
    queue_growing_minutes: Annotated[int, Field(ge=1, le=120)] = 10
    """how long requests must keep waiting and the queue keep growing before the alert fires."""
    stalled_minutes: Annotated[int, Field(ge=1, le=60)] = 5
    """how long an engine with running requests may generate no token before the alert fires."""


class VerificationSpec(Spec):
    enabled: bool = True
    """run the verification gate after every deploy (a failed check fails pulumi up)."""
    checks: tuple[
        Literal["auth", "models", "health", "thinking", "instant", "tool_call", "vision", "streaming", "context", "tls"], ...
    ] = ()
    """run only these checks; default: all."""
    load: Annotated[int, Field(ge=0, le=1024)] = 0
    """also run this many concurrent streams and report throughput."""
    timeout_seconds: Annotated[int, Field(ge=30, le=7200)] = 600
    """seconds per request of the gate."""


class ApiKeyRotationSpec(Spec):
    generation: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    """bump by one to rotate the generated key (a chosen key is rotated by setting kimi-fleet:apiKey)."""
    accept_previous: bool = False
    """while true, every node also accepts the previous key: the generated key of the generation
    before, or the secret kimi-fleet:apiKeyPrevious. Set it with the rotation, clear it once every
    client uses the new key (each change is a release: a rolling replace on fleets and pods)."""


class StackSpec(Spec):
    stack: DnsLabel = Field(description="the stack name (filled from the file name)")
    description: Description = ""
    """free prose about the stack (single-line text, no control characters)."""
    model: ModelSpec = ModelSpec()
    """which checkpoint and the name clients use."""
    accelerator: str
    """accelerator kind from the catalog, e.g. h200, b200, mi300x, rtxpro6000."""
    accelerator_count: Annotated[int, Field(ge=1, le=64)] = 8
    """accelerators per node."""
    checkpoint: Literal["int4", "nvfp4", "w4a8"] = "int4"
    """quantization: int4 (official), nvfp4 (Blackwell only) or w4a8 (Ascend)."""
    engine: EngineSpec
    """the inference engine and its settings."""
    context_length: Annotated[int, Field(ge=1024)] = catalog.KIMI_K26.max_context_tokens
    """longest sequence the stack promises (tokens, up to the model's 262,144)."""
    kv_cache_dtype: Literal["auto", "bf16", "fp8", "fp8_e4m3", "fp8_e5m2"] | None = None
    """KV cache precision; default: the engine's (auto = the model's, bf16)."""
    parallelism: ParallelismSpec = ParallelismSpec()
    """how an engine spreads over the accelerators."""
    weights: WeightsSpec = WeightsSpec()
    """where the checkpoint comes from and where it lives."""
    target: TargetSpec
    """where the stack runs."""
    capacity: CapacitySpec = CapacitySpec()
    """replicas, market (on-demand, spot, capacity block) and rollout."""
    domain: str
    """DNS name of the endpoint (Caddy obtains its certificate)."""
    acme_email: Email | None = None
    """contact address for the ACME account (certificate expiry notices)."""
    api_key_rotation: ApiKeyRotationSpec = ApiKeyRotationSpec()
    """rotating the endpoint's API key with an overlap (old and new both accepted)."""
    verification: VerificationSpec = VerificationSpec()
    """the post-deploy verification gate."""
    monitoring: MonitoringSpec = MonitoringSpec()
    """alert thresholds and objectives (metrics, dashboards and alerts are always on)."""
    budget_per_hour_usd: Annotated[float, Field(ge=1, le=10_000)] | None = None
    """hourly budget: the policy pack warns when the estimate exceeds it."""

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


def did_you_mean(key: str, known) -> str:
    """' (did you mean 'x'?)' for a near-miss or a snake_case spelling of a known key, else ''."""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close and to_camel(key) in known:  # budget_per_hour_usd -> budgetPerHourUsd
        close = [to_camel(key)]
    return f" (did you mean {close[0]!r}?)" if close else ""
