"""The release id of a stack: one digest of everything that runs on its nodes or pods.

The proxy stamps it on every proxied answer (caddy.RELEASE_HEADER), the gate waits for it and
fails on any answer from another release, and the planner prints it.
"""

from __future__ import annotations

from kimi_fleet import k8s_manifests, node_files
from kimi_fleet.launch import Launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import Sizing


def stack_release(r: Resolved, sizing: Sizing, launch: Launch) -> str:
    if r.target.renders_manifests:
        return k8s_manifests.manifest_release(r, sizing, launch, stack=r.spec.stack)
    return node_files.node_release(r, launch, sizing)
