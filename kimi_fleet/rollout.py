"""What a change does to running nodes, said before it happens (the plan and the PR diff).

Each target takes a new release its own way: an AWS node applies it in place through an SSM
association (replaced only for a new instance type), an AWS fleet and a Kubernetes Deployment roll
replica by replica, an existing host re-runs its bootstrap over SSH. In place, only the units
whose inputs changed restart. The minutes come from
the sizing's time to ready: warm when the weights survive (EBS, a host's disk, a PVC), cold when
they are downloaded again (instance store). A new checkpoint revision is downloaded before the
engines restart (the old engine serves meanwhile), beside the old one when the volume holds both
(node_scripts/weights_room.py removes older checkpoints first when it does not).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from kimi_fleet import catalog, k8s_manifests, node_files
from kimi_fleet.cost import Cost
from kimi_fleet.launch import Launch
from kimi_fleet.release import stack_release
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import Sizing

#: Weight volumes that outlive a node or a pod restart: a replacement reads them warm.
PERSISTENT_WEIGHTS = ("ebs", "host-path", "pvc")


@dataclass(frozen=True)
class RolloutFacts:
    target: str
    replicas: int
    rollout: str
    release: str
    #: the machine, in words
    machine: str
    #: what a node cannot take in place (AWS: instance type and root volume): a change replaces it
    node_shape: str
    weights_volume: str
    warm_start_seconds: int
    cold_start_seconds: int
    node_usd_per_hour: float | None
    #: unit -> digest of its rendered inputs (hosts: what the bootstrap restarts)
    units: dict[str, str] = field(default_factory=dict)
    #: repo@revision of the checkpoint, its size, and the weights volume's (None: not known here,
    #: a host's disk). Defaults: facts planned by a ref from before these fields existed.
    checkpoint: str = ""
    checkpoint_bytes: int = 0
    weights_volume_bytes: int | None = None
    #: download and verify of a new checkpoint; then a cold read of it and the load
    fetch_seconds: int = 0
    volume_start_seconds: int = 0
    #: a new instance builds the EFA engine image (an estimate: catalog.EFA_IMAGE_BUILD_SECONDS)
    image_build_seconds: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RolloutFacts":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def weights_volume_bytes(r: Resolved) -> int | None:
    """What the weights volume holds, where the stack says or the machine fixes it."""
    volume = r.weights_volume
    if volume == "ebs":
        return r.spec.weights.ebs_size_gib * catalog.GiB
    if volume == "instance-store" and r.offer is not None:
        return r.offer.local_nvme_bytes
    if volume == "pvc":
        return k8s_manifests.weights_pvc_gib(r) * catalog.GiB
    return None


def rollout_facts(r: Resolved, sizing: Sizing, launch: Launch, cost: Cost) -> RolloutFacts:
    spec = r.spec
    units: dict[str, str] = {}
    if not r.target.renders_manifests:
        files = node_files.render_node_files(r, launch, sizing, secrets=node_files.SecretsSource("files"),
                                             ebs_volume_id=node_files.EBS_VOLUME_PLACEHOLDER)
        units = node_files.unit_digests(files, launch)
    machine = r.target.machine(r)
    aws = spec.target.aws
    node_shape = f"{machine}/{aws.root_volume_gib}GiB" if aws is not None else machine
    return RolloutFacts(
        target=spec.target.kind,
        node_shape=node_shape,
        replicas=spec.capacity.replicas,
        rollout=spec.capacity.rollout,
        release=stack_release(r, sizing, launch),
        machine=machine,
        weights_volume=r.weights_volume,
        warm_start_seconds=sizing.warm_start_seconds,
        cold_start_seconds=sizing.cold_start_seconds,
        node_usd_per_hour=cost.on_demand_usd_per_hour,
        units=units,
        checkpoint=f"{r.repo}@{r.revision}",
        checkpoint_bytes=r.checkpoint.size_bytes,
        weights_volume_bytes=weights_volume_bytes(r),
        fetch_seconds=sizing.download_seconds + sizing.verify_seconds,
        image_build_seconds=sizing.image_build_seconds,
        volume_start_seconds=sizing.volume_start_seconds,
    )


def _minutes(seconds: int) -> int:
    return max(1, math.ceil(seconds / 60))


def impact(before: RolloutFacts, after: RolloutFacts) -> str | None:
    """One line on what `pulumi up` does to running nodes, or None when nothing on them changes."""
    if before.release == after.release and before.node_shape == after.node_shape and before.target == after.target:
        return None
    if before.target != after.target:
        return f"replace: the stack moves from {before.target} to {after.target}; the old endpoint is destroyed"
    ebs = _ebs_gib(before, after)
    if ebs and ebs[1] < ebs[0]:
        return (f"refused by AWS: an EBS volume cannot shrink ({ebs[0]} GiB to {ebs[1]} GiB); "
                "`pulumi up` would fail at the volume")
    warm = after.weights_volume in PERSISTENT_WEIGHTS
    load = _minutes(after.warm_start_seconds if warm else after.cold_start_seconds)
    weights = "weights read again from the surviving volume" if warm else "weights downloaded again"
    new_checkpoint = bool(before.checkpoint) and before.checkpoint != after.checkpoint
    if new_checkpoint and warm:
        if after.weights_volume == "pvc":
            # The download Job runs before the Deployment changes: the old pods serve meanwhile.
            weights = (f"after the download Job fetched the new checkpoint {after.checkpoint} "
                       f"{checkpoint_room(after)} while the old pods serve "
                       f"(about {_minutes(after.fetch_seconds)} min); the new pods read it cold")
            load = _minutes(after.volume_start_seconds)
        else:
            weights = f"the new checkpoint {after.checkpoint} downloaded {checkpoint_room(after)}, then read cold"
            load = _minutes(after.cold_start_seconds)

    if after.target == "aws" and after.replicas == 1 and before.node_shape != after.node_shape:
        return (f"replace: a new {after.machine} instance (the old one is terminated first), {weights}; "
                f"about {load} min without service")
    how = "in place" if after.target == "host" else "in place (SSM)"
    if after.target == "host" or (after.target == "aws" and after.replicas == 1):
        line = (_new_checkpoint_in_place(before, after, how) if new_checkpoint
                else _in_place_impact(before, after, load, how))
        if ebs and ebs[1] > ebs[0]:
            line += f"; the weights volume and its filesystem grow online to {ebs[1]} GiB"
        return line
    unit = after.machine if after.target == "aws" else "pod"
    replicas = after.replicas
    if replicas == 1:
        return f"rolling (one replica): the pod restarts, {weights}; about {load} min without service"
    if after.rollout == "surge":
        extra = ""
        if after.node_usd_per_hour is not None:
            extra = f", about +${after.node_usd_per_hour * load / 60 * replicas:,.2f}"
        return (f"rolling: no downtime; one extra {unit} at a time for about {load} min per replica, "
                f"{replicas} replicas ({weights}{extra})")
    return (f"rolling: one of {replicas} replicas out at a time for about {load} min each "
            f"({replicas - 1}/{replicas} capacity meanwhile, about {load * replicas} min in all; {weights})")


def _ebs_gib(before: RolloutFacts, after: RolloutFacts) -> tuple[int, int] | None:
    """The EBS weights volume's size before and after, when both are one (facts of an older ref may
    not say)."""
    if before.weights_volume != "ebs" or after.weights_volume != "ebs":
        return None
    if before.weights_volume_bytes is None or after.weights_volume_bytes is None:
        return None
    return before.weights_volume_bytes // catalog.GiB, after.weights_volume_bytes // catalog.GiB


def checkpoint_room(facts: RolloutFacts) -> str:
    """Where a new checkpoint goes on a volume that holds the old one (weights_room.py decides on
    the node, from the real free space)."""
    if facts.weights_volume_bytes is None:
        return "beside the old one if the disk has room, else after deleting the old one"
    if facts.weights_volume_bytes >= 2 * facts.checkpoint_bytes:
        return "beside the old one (kept for a rollback)"
    return (f"after deleting the old one (the {facts.weights_volume_bytes / catalog.GiB:,.0f} GiB volume cannot "
            f"hold two {facts.checkpoint_bytes / catalog.GB:,.0f} GB checkpoints; a rollback downloads it again)")


def _restarted(before: RolloutFacts, after: RolloutFacts) -> list[str]:
    restarted = sorted(unit for unit, digest in after.units.items() if before.units.get(unit) != digest)
    return restarted + sorted(unit for unit in before.units.keys() - after.units.keys())


def _new_checkpoint_in_place(before: RolloutFacts, after: RolloutFacts, how: str) -> str:
    """The bootstrap downloads the new revision before it restarts the engines on it."""
    return (f"{how}: the new checkpoint {after.checkpoint} is downloaded {checkpoint_room(after)} while the old "
            f"engine serves (about {_minutes(after.fetch_seconds)} min); then {', '.join(_restarted(before, after))} "
            f"restart; about {_minutes(after.volume_start_seconds)} min without service (a cold read of the "
            "new checkpoint)")


def _in_place_impact(before: RolloutFacts, after: RolloutFacts, load: int, how: str) -> str:
    """The bootstrap re-run on the node: only the units whose inputs changed restart."""
    restarted = _restarted(before, after)
    engines = [unit for unit in restarted if unit.startswith("kimi-engine@")]
    if engines:
        return (f"{how}: {', '.join(restarted)} restart; about {load} min without service "
                "(the weights are already on the disk)")
    if "caddy.service" in restarted:
        return f"{how}: {', '.join(restarted)} restart; a few seconds without service, engines keep running"
    if restarted:
        return f"{how}: {', '.join(restarted)} restart; no interruption of service"
    return f"{how}: node files updated, no unit restarts"
