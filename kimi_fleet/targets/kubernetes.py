"""Kubernetes: engine pods with a Caddy sidecar, weights on a PVC (filled once by a Job) or the
node's disk, GPUs by device plugin or DRA claim, rolling updates; a replica over several nodes is a
LeaderWorkerSet group (one pod per node, the fabric's devices by their device plugin)."""

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
        # A LeaderWorkerSet group (k8s_manifests.leader_worker_set): every rank's pod with the fabric's
        # devices, the leader's address from LWS, a fabric check on every rank; problems() below
        # refuses what it cannot run. The pods run an image with the EFA userspace, which the cluster
        # cannot build: until the stack names it by digest, the group is planned, not deployed.
        k8s = r.spec.target.kubernetes
        if k8s.rdma_resource == catalog.EFA_K8S_RESOURCE and k8s.efa_engine_image is None:
            return ("the engine image with the EFA userspace (target.kubernetes.efaEngineImage, by digest: build "
                    f"the Dockerfile `.venv/bin/python scripts/efa_engine_dockerfile.py {r.spec.stack}` prints, "
                    f"the pinned {r.image} plus the EFA installer "
                    f"{catalog.EFA_INSTALLER.version} checked by its SHA-256, push it where the nodes pull, and "
                    "set its digest; a cluster's nodes cannot build it)")
        return None

    def problems(self, r: Resolved) -> Iterator[str]:
        spec = r.spec
        if spec.engine.speculative != "off":
            yield (f"{FIELD}engine.speculative (given {spec.engine.speculative!r}): the Kubernetes download Job "
                   f"fetches the pinned checkpoint only, not a draft model (and {catalog.EAGLE3_FINDING.summary})")
        if spec.target.kubernetes.gpu_claim == "dra" and r.accelerator.vendor != "nvidia":
            yield f"{FIELD}target.kubernetes.gpuClaim (given 'dra'): the DRA device class here is NVIDIA's (gpu.nvidia.com)"
        yield from self._multi_node_problems(r)
        yield from self._scaling_problems(r)

    def _scaling_problems(self, r: Resolved) -> Iterator[str]:
        """KEDA scales the engine pods on what the cluster's Prometheus has scraped from them."""
        scaling, k8s = r.spec.capacity.scaling, r.spec.target.kubernetes
        if scaling is None:
            return
        if k8s.prometheus_url is None:
            yield (f"{FIELD}target.kubernetes.prometheusUrl (not set): capacity.scaling is carried out by KEDA, "
                   f"whose Prometheus trigger asks the cluster's Prometheus for the stack's "
                   f"{'queue' if scaling.target_metric == 'waiting' else 'p99 time to first token'} (the engines' "
                   "metrics its PodMonitor scrapes): name that Prometheus as KEDA reaches it, e.g. "
                   "http://prometheus-operated.monitoring.svc:9090, or remove capacity.scaling")
        # minReplicas 0 (a batch stack: spec.py refuses it otherwise) is served by the wake front
        # (kimi_fleet/k8s_wake.py): an always-up CPU pod behind the public Service while no engine pod is
        # Ready, whose answered requests KEDA reads to bring the first replica back. A multi-node replica
        # does not scale at all (rules.py refuses capacity.scaling for it).

    def _multi_node_problems(self, r: Resolved) -> Iterator[str]:
        """A replica over several pods: the fabric's devices declared, the weights on every node."""
        k8s, nodes = r.spec.target.kubernetes, r.nodes_per_replica
        if not r.multi_node:
            if k8s.rdma_resource or k8s.rdma_devices:
                yield (f"{FIELD}target.kubernetes.rdmaResource (given {k8s.rdma_resource!r}, rdmaDevices "
                       f"{k8s.rdma_devices}): only a replica over several nodes (parallelism.nodes) talks over the "
                       "fabric; a one-node replica's collectives stay on NVLink: leave both unset")
            return
        if k8s.rdma_resource is None:
            yield (f"{FIELD}target.kubernetes.rdmaResource (not set): a replica over {nodes} pods needs the fabric's "
                   "devices in every pod, else NCCL falls back to TCP sockets (an order of magnitude slower): name "
                   "the device plugin's resource, vpc.amazonaws.com/efa on EKS (aws-efa-k8s-device-plugin) or the "
                   "RDMA plugin's (e.g. rdma/rdma_shared_device_a), with rdmaDevices")
        elif k8s.rdma_devices is None:
            yield (f"{FIELD}target.kubernetes.rdmaDevices (not set): how many {k8s.rdma_resource} devices each pod "
                   "requests: every EFA interface of the node (p5.48xlarge: 32), or 1 share of an RDMA shared device")
        if r.weights_volume == "pvc":
            yield (f"{FIELD}weights.volume (given 'pvc'): the weights claim is ReadWriteOnce on a node-local class, so "
                   f"the {nodes} pods of one replica (one per node) cannot all mount it; use weights.volume host-path "
                   "(each pod's init container fills and verifies its own node's disk once)")
