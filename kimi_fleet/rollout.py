"""What a change does to running nodes, said before it happens (the plan and the PR diff).

Each target takes a new release its own way: an AWS node applies it in place through an SSM
association (replaced only for a new instance type), an AWS fleet and a Kubernetes Deployment roll
replica by replica, an existing host re-runs its bootstrap over SSH. In place, only the units
whose inputs changed restart. The minutes come from
the sizing's time to ready: warm when the weights survive (EBS, a host's disk, a PVC), cold when
they are downloaded again (instance store).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from kimi_fleet import node_files
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

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RolloutFacts":
        return cls(**data)


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
    )


def _minutes(seconds: int) -> int:
    return max(1, math.ceil(seconds / 60))


def impact(before: RolloutFacts, after: RolloutFacts) -> str | None:
    """One line on what `pulumi up` does to running nodes, or None when nothing on them changes."""
    if before.release == after.release and before.node_shape == after.node_shape and before.target == after.target:
        return None
    if before.target != after.target:
        return f"replace: the stack moves from {before.target} to {after.target}; the old endpoint is destroyed"
    warm = after.weights_volume in PERSISTENT_WEIGHTS
    load = _minutes(after.warm_start_seconds if warm else after.cold_start_seconds)
    weights = "weights read again from the surviving volume" if warm else "weights downloaded again"

    if after.target == "aws" and after.replicas == 1 and before.node_shape != after.node_shape:
        return (f"replace: a new {after.machine} instance (the old one is terminated first), {weights}; "
                f"about {load} min without service")
    if after.target == "host":
        return _in_place_impact(before, after, load, "in place")
    if after.target == "aws" and after.replicas == 1:
        return _in_place_impact(before, after, load, "in place (SSM)")
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


def _in_place_impact(before: RolloutFacts, after: RolloutFacts, load: int, how: str) -> str:
    """The bootstrap re-run on the node: only the units whose inputs changed restart."""
    restarted = sorted(unit for unit, digest in after.units.items() if before.units.get(unit) != digest)
    restarted += sorted(unit for unit in before.units.keys() - after.units.keys())
    engines = [unit for unit in restarted if unit.startswith("kimi-engine@")]
    if engines:
        return (f"{how}: {', '.join(restarted)} restart; about {load} min without service "
                "(the weights are already on the disk)")
    if "caddy.service" in restarted:
        return f"{how}: {', '.join(restarted)} restart; a few seconds without service, engines keep running"
    if restarted:
        return f"{how}: {', '.join(restarted)} restart; no interruption of service"
    return f"{how}: node files updated, no unit restarts"
