"""Every file a stack puts on its nodes or cluster, rendered offline for review (build/STACK/)."""

from __future__ import annotations

import json

from kimi_fleet.launch import Launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import Sizing


def render_artifacts(r: Resolved, sizing: Sizing, launch: Launch) -> dict[str, str]:
    """Relative file name -> text. No secret values: secrets are referenced, never rendered."""
    if r.multi_node and (missing := r.target.multi_node_missing(r)):
        # Sized, laid out per node and checked against the engine's parser (the plan prints it);
        # what would run it is not declared yet: a refusal before anything is, never half a replica.
        raise ValueError(
            f"field kimi-fleet:parallelism.nodes (given {r.nodes_per_replica}): kimi-fleet sizes this multi-node "
            f"replica and renders each node's engine line (the plan prints the layout) but does not deploy one "
            f"on {r.spec.target.kind} yet: {missing} are not declared (issue 22)")
    artifacts = {
        "launch.json": json.dumps({
            "engine": launch.engine,
            "image": launch.image,
            "quant": launch.quant,
            "weights": launch.weights_host_dir,
            "engines": [
                {"index": i.index, "port": i.port, "devices": list(i.device_ids), "argv": list(i.argv),
                 "probe": i.probe.path}
                for i in launch.instances
            ],
        }, indent=2) + "\n",
        "sizing.json": json.dumps(sizing.as_dict(), indent=2) + "\n",
    }
    if r.target.renders_manifests:
        from kimi_fleet.k8s_manifests import render_k8s_artifacts
        from kimi_fleet.k8s_wake import render_wake_artifacts

        artifacts.update(render_k8s_artifacts(r, sizing, launch))
        artifacts.update(render_wake_artifacts(r, sizing, launch))  # scale to zero: the wake front
        from kimi_fleet.k8s_deletion_cost import render_deletion_cost_yaml

        artifacts.update(render_deletion_cost_yaml(r, sizing))
    else:
        from kimi_fleet.node_files import render_node_artifacts

        artifacts.update(render_node_artifacts(r, sizing, launch))
    from kimi_fleet.mirror import plan_mirror, render_fill_user_data

    mirror = plan_mirror(r)
    if mirror:  # what the managed mirror's fill instance boots with
        artifacts["mirror-fill-user-data.yaml"] = render_fill_user_data(mirror)
    return artifacts
