"""WeightVolume: where the ~595 GB of weights live on an AWS node.

"ebs": a gp3 volume in the node's zone that outlives the node (retain_on_delete), so a replaced
node mounts the weights it already has instead of downloading them again. The node attaches it.
Its zone is chosen once: the zones that sell the instance type change over time (a new zone that
sorts first would move it and orphan ~595 GB of verified weights), so the zone is an ignored change
after the first create. It is protected (Pulumi refuses to replace or delete it) unless the stack
sets weights.allowVolumeReplacement; the policy pack holds every stack to that.
"instance-store": no resource; the bootstrap assembles the local NVMe disks as RAID0 (erased on
stop: a fleet's replicas download again, which an S3 mirror makes fast).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from kimi_fleet import catalog
from kimi_fleet.resolve import Resolved

#: The tag that records a stack's opt-in to a replaceable weights volume (the policy pack reads it).
ALLOW_REPLACEMENT_TAG = "kimi-fleet:allow-volume-replacement"
#: Inputs the engine keeps from the volume's first create (their replace-on-change is the zone).
KEPT_INPUTS = ["availabilityZone"]


@dataclass
class WeightVolumeArgs:
    resolved: Resolved
    availability_zone: pulumi.Input[str]
    tags: dict[str, str]


class WeightVolume(pulumi.ComponentResource):
    kind: pulumi.Output[str]
    #: None for instance store.
    volume_id: pulumi.Output[str | None]
    monthly_cost_usd: pulumi.Output[float]

    def __init__(self, name: str, args: WeightVolumeArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:aws:WeightVolume", name, None, opts)
        r = args.resolved
        weights = r.spec.weights
        self.kind = pulumi.Output.from_input(r.weights_volume)
        self.volume_id = pulumi.Output.from_input(None)
        self.monthly_cost_usd = pulumi.Output.from_input(0.0)
        if r.weights_volume == "ebs":
            volume = aws.ebs.Volume(
                f"{name}-ebs",
                availability_zone=args.availability_zone,
                type="gp3",
                size=weights.ebs_size_gib,
                throughput=weights.ebs_throughput_mibps,
                iops=catalog.EBS_GP3_MAX_IOPS,
                encrypted=True,
                tags={**args.tags, "Name": f"{r.spec.stack}-weights",
                      **({ALLOW_REPLACEMENT_TAG: "true"} if weights.allow_volume_replacement else {})},
                # Deleting the stack leaves the weights behind on purpose: re-downloading costs an hour.
                opts=pulumi.ResourceOptions(parent=self, retain_on_delete=True,
                                            protect=not weights.allow_volume_replacement,
                                            ignore_changes=KEPT_INPUTS),
            )
            self.volume_id = volume.id
            self.monthly_cost_usd = pulumi.Output.from_input(
                round(weights.ebs_size_gib * catalog.GiB / catalog.GB * catalog.EBS_GP3_USD_PER_GB_MONTH, 2)
            )
        elif r.weights_volume != "instance-store":
            raise ValueError(f"stack {r.spec.stack}: weights volume {r.weights_volume!r} is not an AWS volume")
        self.register_outputs({"kind": self.kind, "volume_id": self.volume_id,
                               "monthly_cost_usd": self.monthly_cost_usd})
