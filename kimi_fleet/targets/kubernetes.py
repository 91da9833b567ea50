"""Kubernetes: engine pods with a Caddy sidecar, weights on a PVC (filled once by a Job) or the
node's disk, GPUs by device plugin or DRA claim, rolling updates."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from kimi_fleet import catalog
from kimi_fleet.targets.base import FIELD, Target

if TYPE_CHECKING:
    from kimi_fleet.resolve import Resolved


class Kubernetes(Target):
    kind = "kubernetes"
    weight_volumes = ("pvc", "host-path")
    renders_manifests = True
    # The download Job (or init container) fetches from the Hub; the weights PVC is the cluster's copy.
    fetches_from_s3_mirror = False

    def dns_mechanism(self, spec) -> str:
        if spec.target.kubernetes.external_dns:
            return f"{spec.domain}: external-dns annotation on the proxy Service"
        return super().dns_mechanism(spec)

    def multi_node_missing(self, r: Resolved) -> str | None:
        return "the LeaderWorkerSet, its RDMA resources and the fabric check at admission"

    def problems(self, r: Resolved) -> Iterator[str]:
        spec = r.spec
        if spec.engine.speculative != "off":
            yield (f"{FIELD}engine.speculative (given {spec.engine.speculative!r}): the Kubernetes download Job "
                   f"fetches the pinned checkpoint only, not a draft model (and {catalog.EAGLE3_FINDING.summary})")
        if spec.target.kubernetes.gpu_claim == "dra" and r.accelerator.vendor != "nvidia":
            yield f"{FIELD}target.kubernetes.gpuClaim (given 'dra'): the DRA device class here is NVIDIA's (gpu.nvidia.com)"
