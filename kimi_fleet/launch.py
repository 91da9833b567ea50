"""Engine launch rendering: the exact command, container options, env file and readiness probe.

One node runs `engines_per_node` engines, each on its own GPUs and loopback port. The engine binds
127.0.0.1 only: the authenticating proxy is the one way in. Everything here is plain data so the
cloud-init, host and Kubernetes renderers share it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass

from kimi_fleet import catalog, templates
from kimi_fleet.paths import COMPILE_CACHE_MOUNT, DRAFT_MOUNT, ENGINE_SLICE, ENV_DIR, LOOPBACK, MODEL_MOUNT
from kimi_fleet.resolve import Resolved
from kimi_fleet.spec import SAFE_VALUE

_PLAIN = re.compile(SAFE_VALUE)


def plain_value(key: str, value: str) -> str:
    """The one guard for values written to node settings and env files: the alphabet the node's
    settings loader accepts (no whitespace, quotes, $, `, ;, |, &, <, >, (, ), #, %, \\, braces)."""
    if not _PLAIN.fullmatch(value):
        raise ValueError(f"value for {key} is not plain (letters, digits and . _ : / @ , + = -): {value!r}")
    return value

#: NCCL/RCCL/HCCL need shared memory and locked pages; Docker's 64 MB /dev/shm breaks TP (seed 003).
#: The engine slice puts the container where the node firewall can refuse it the metadata service;
#: without CAP_NET_RAW it cannot write raw frames past that firewall (packet sockets skip the IP
#: output hook), and no setuid binary in the image can give it back.
COMMON_DOCKER_ARGS = (
    f"--cgroup-parent={ENGINE_SLICE}",
    "--cap-drop=NET_RAW",
    "--security-opt=no-new-privileges",
    "--ipc=host",
    "--network=host",
    "--ulimit=memlock=-1",
    "--ulimit=nofile=1048576:1048576",
)
ASCEND_HOST_MOUNTS = (
    "/usr/local/Ascend/driver",
    "/usr/local/Ascend/firmware",
    "/usr/local/sbin",
    "/etc/ascend_install.info",
)


@dataclass(frozen=True)
class Probe:
    path: str
    port: int
    #: The route runs a real generation (SGLang's /health_generate: its HTTP server can outlive the scheduler).
    runs_generation: bool


@dataclass(frozen=True)
class EngineInstance:
    index: int
    port: int
    device_ids: tuple[int, ...]
    argv: tuple[str, ...]
    docker_args: tuple[str, ...]
    env: dict[str, str]
    probe: Probe

    @property
    def container_name(self) -> str:
        return f"kimi-engine-{self.index}"

    @property
    def upstream(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def env_file_path(self) -> str:
        return f"{ENV_DIR}/engine-{self.index}.env"

    @property
    def argv_file_path(self) -> str:
        """The engine's full `docker run` argv as a JSON list: lists travel as lists."""
        return f"{ENV_DIR}/engine-{self.index}.argv.json"


@dataclass(frozen=True)
class ImageBuild:
    """An engine image the node builds (docker build) from the pinned one: its tag names the
    Dockerfile's SHA-256, so a changed recipe is a new image and the old one is never reused."""
    dockerfile: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.dockerfile.encode()).hexdigest()

    @property
    def tag(self) -> str:
        return f"kimi-fleet/engine-efa:{self.digest[:16]}"

    @property
    def context_dir(self) -> str:
        """Where the node keeps the Dockerfile (the build context: nothing else)."""
        return f"{ENV_DIR}/images/{self.digest[:16]}"


def efa_image_build(base: str) -> ImageBuild:
    """`base` with the AWS EFA userspace from the digest-pinned installer (catalog.EFA_INSTALLER)."""
    efa = catalog.EFA_INSTALLER
    return ImageBuild(dockerfile=templates.render(
        "efa-engine.Dockerfile", BASE=base, VERSION=efa.version, LIBFABRIC=efa.libfabric, OFI_NCCL=efa.aws_ofi_nccl,
        RDMA_CORE=efa.rdma_core, URL=efa.url, SHA256=efa.sha256, LIBRARY_PATH=":".join(efa.library_path)))


@dataclass(frozen=True)
class Launch:
    engine: str
    #: what `docker run` starts: the pinned engine image, or the image built on the node from it
    image: str
    quant: str
    weights_host_dir: str
    instances: tuple[EngineInstance, ...]
    #: an image the node builds from the pinned one before the engines start (None: pulled as pinned)
    build: ImageBuild | None = None

    @property
    def upstreams(self) -> list[str]:
        return [i.upstream for i in self.instances]

    @property
    def health_path(self) -> str:
        return self.instances[0].probe.path


#: The leader's address where the rendering cannot know it (the plan, the parser check): the AWS
#: component renders each worker with the leader's private address, Kubernetes with LWS's variable.
LEADER_PLACEHOLDER = "leader.replica.internal"
#: Every rank's address, in rank order, in each rank's engine environment (read by nothing: its
#: change is what restarts every rank when one node of the replica is replaced).
REPLICA_PEERS_ENV = "KIMI_REPLICA_PEERS"


def engine_argv(r: Resolved, port: int, node_rank: int = 0, leader: str = LEADER_PLACEHOLDER,
                rendezvous_port: int | None = None) -> list[str]:
    """The engine's own command line (with its node's rank in a multi-node replica), then the
    checkpoint's flags, then the stack's extraArgs."""
    quant_flags = list(r.checkpoint.engine_flags.get(r.spec.engine.name, ()))
    ranks = r.adapter.multi_node_args(r, node_rank, leader, rendezvous_port) if r.multi_node else []
    return r.adapter.argv(r, port) + ranks + quant_flags + list(r.spec.engine.extra_args)


def device_args(r: Resolved, device_ids: tuple[int, ...]) -> tuple[list[str], dict[str, str]]:
    """Container flags and environment that give one engine its accelerators."""
    ids = ",".join(map(str, device_ids))
    vendor = r.accelerator.vendor
    if vendor == "nvidia":
        # CDI (nvidia-ctk cdi generate), plain runc: no legacy --gpus hook (seed 003).
        return [f"--device=nvidia.com/gpu={i}" for i in device_ids], {}
    if vendor == "amd":
        args = ["--device=/dev/kfd", "--device=/dev/dri", "--group-add=video", "--security-opt=seccomp=unconfined"]
        return args, {"HIP_VISIBLE_DEVICES": ids}
    args = [f"--device=/dev/davinci{i}" for i in device_ids]
    args += ["--device=/dev/davinci_manager", "--device=/dev/devmm_svm", "--device=/dev/hisi_hdc"]
    args += [f"--volume={path}:{path}:ro" for path in ASCEND_HOST_MOUNTS]
    return args, {"ASCEND_RT_VISIBLE_DEVICES": ids}


def compile_cache_env(engine: str) -> dict[str, str]:
    """The compile/JIT cache variables `engine` reads (its libraries' and its own), all under the cache mount."""
    caches = {**catalog.COMPILE_CACHE_ENV, **catalog.ENGINE_COMPILE_CACHE_ENV.get(engine, {})}
    return {key: f"{COMPILE_CACHE_MOUNT}/{sub}".rstrip("/") for key, sub in caches.items()}


def compile_cache_host_dir(r: Resolved) -> str:
    """Beside the weights on the node (on the same volume: an EBS volume carries it to the next node)."""
    return f"{r.spec.weights.host_path}/compile-cache/{r.compile_cache_dir_name}"


def fabric_args(r: Resolved) -> tuple[list[str], dict[str, str]]:
    """Container flags and environment that give a multi-node replica's engine its fabric: every EFA
    device of the instance type and libfabric's EFA provider, NCCL logging its transport."""
    if not r.on_efa_fabric:
        return [], {}
    # The whole directory: one missing uverbs device (fewer interfaces attached) would stop docker.
    return ["--device=/dev/infiniband"], dict(catalog.EFA_ENGINE_ENV)


def replica_env(r: Resolved, own_address: str | None, peers: tuple[str, ...]) -> dict[str, str]:
    """A rank's own address (the engine's variable for it) and every rank's, in rank order: a node
    replaced anywhere in the replica changes every rank's engine line, so every rank restarts into
    the new rendezvous together (a TP/PP group cannot re-admit one rank)."""
    if not r.multi_node or own_address is None:
        return {}
    support = catalog.MULTI_NODE[r.spec.engine.name]
    return {support.host_address_env: own_address, REPLICA_PEERS_ENV: ",".join(peers)}


def render_launch(r: Resolved, node_rank: int = 0, leader: str = LEADER_PLACEHOLDER, *,
                  own_address: str | None = None, peers: tuple[str, ...] = (),
                  rendezvous_port: int | None = None) -> Launch:
    """One node's engines; in a multi-node replica, node `node_rank`'s (0 is the leader, which serves
    the API), dialling `leader`, reachable at `own_address`, among `peers` (every rank's address)."""
    spec = r.spec
    weights_dir = f"{spec.weights.host_path}/{r.weights_dir_name}"
    per_engine = r.gpus_per_engine
    net_args, net_env = fabric_args(r)
    instances = []
    for index in range(r.engines_per_node):
        port = r.engine.port + index
        device_ids = tuple(range(index * per_engine, (index + 1) * per_engine))
        dev_args, dev_env = device_args(r, device_ids)
        # The fabric's settings last: NCCL's transport line is what the fabric check reads.
        env = {"HF_HUB_OFFLINE": "1", **compile_cache_env(spec.engine.name), **dev_env, **r.quirk_env,
               **spec.engine.env, **net_env, **replica_env(r, own_address, peers)}
        docker_args = [*COMMON_DOCKER_ARGS, *dev_args, *net_args, f"--volume={weights_dir}:{MODEL_MOUNT}:ro",
                       f"--volume={compile_cache_host_dir(r)}:{COMPILE_CACHE_MOUNT}"]
        if spec.engine.speculative != "off":
            draft_dir = f"{spec.weights.host_path}/draft"
            docker_args.append(f"--volume={draft_dir}:{DRAFT_MOUNT}:ro")
        docker_args += [f"--env={key}={value}" for key, value in sorted(env.items())]
        instances.append(EngineInstance(
            index=index,
            port=port,
            device_ids=device_ids,
            argv=tuple(engine_argv(r, port, node_rank, leader, rendezvous_port)),
            docker_args=tuple(docker_args),
            env=env,
            probe=Probe(r.engine.health_path, port, runs_generation=r.engine.health_runs_generation),
        ))
    # A rank on an EFA fabric runs the pinned image with the EFA userspace built in (the node builds it).
    build = efa_image_build(r.image) if net_args else None
    return Launch(
        engine=spec.engine.name,
        image=build.tag if build else r.image,
        quant=spec.checkpoint,
        weights_host_dir=weights_dir,
        instances=tuple(instances),
        build=build,
    )


#: The rendezvous ports a replica's releases take turns on, above the release's default port.
RENDEZVOUS_PORT_SPAN = 200


def replica_launches(r: Resolved, addresses: tuple[str, ...]) -> list[Launch]:
    """Every rank's launch of one replica release, `addresses` in rank order. The rendezvous port
    comes from all ranks' engine lines together: ranks of different releases (one rank rolled
    back, the other not; a flag change only one took) dial different ports and never form a
    replica that runs two configurations; the ranks of one release always meet."""
    def launches(port: int | None) -> list[Launch]:
        return [render_launch(r, rank, addresses[0], own_address=addresses[rank], peers=addresses,
                              rendezvous_port=port) for rank in range(len(addresses))]
    base = catalog.MULTI_NODE[r.spec.engine.name].rendezvous_port
    lines = json.dumps([[list(i.argv), sorted(i.env.items())] for launch in launches(None) for i in launch.instances])
    offset = int(hashlib.sha256(lines.encode()).hexdigest(), 16) % RENDEZVOUS_PORT_SPAN
    return launches(base + offset)


def render_env_file(launch: Launch, instance: EngineInstance, stack: str) -> str:
    """systemd EnvironmentFile: bare values, comments on their own lines only.

    systemd folds an inline `# comment` into the value (seed 003 lost HF_HOME that way), so no
    value may carry one. Switching engine or quantization is an edit of this file and a restart.
    """
    values = {
        "ENGINE": launch.engine,
        "QUANT": launch.quant,
        "IMAGE": launch.image,
        "CONTAINER_NAME": instance.container_name,
        "WEIGHTS_DIR": launch.weights_host_dir,
        "PORT": str(instance.port),
        # The engine unit builds IMAGE from this directory's Dockerfile when it is missing (none: pulled).
        "IMAGE_BUILD_DIR": launch.build.context_dir if launch.build else "",
        "HEALTH_PATH": instance.probe.path,
        "GPU_IDS": ",".join(map(str, instance.device_ids)),
    }
    lines = [
        f"# kimi-fleet stack {stack}: engine {instance.index} ({launch.engine}, {launch.quant}).",
        f"# Edit, then: systemctl restart kimi-engine@{instance.index}. Keep values bare: no inline comments.",
    ]
    lines += [f"{key}={plain_value(key, value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def docker_argv(launch: Launch, instance: EngineInstance) -> list[str]:
    """The engine's container as one argument list (engine-N.argv.json): never joined and re-split."""
    return ["docker", "run", "--rm", "--name", instance.container_name, *instance.docker_args,
            "--entrypoint", instance.argv[0], launch.image, *instance.argv[1:]]


def docker_run_command(launch: Launch, instance: EngineInstance) -> str:
    """The equivalent one-shot command, for docs and for clouds that take only a startup script."""
    return shlex.join(docker_argv(launch, instance))
