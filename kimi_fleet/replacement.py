"""Which resources a change replaces, said in words before `pulumi up` does it (issue 20).

A provider replaces a resource (delete and create, here old first for the node) when an input it
cannot update changes: catalog.REPLACE_ON_CHANGE lists them per type, from the providers' schemas.
Two plans of a stack (their registered inputs, protection and ignored changes) are compared: a
resource is replaced when one of those inputs changed and is not an ignored change (the engine
keeps the old value of those), or when such an input names a resource that is itself replaced
(its id changes). For the GPU node the words carry the downtime from the sizing and whether the
weights volume survives; for the weights volume, that its checkpoint is downloaded again.
Pure: no Pulumi import; the plans are plan.py's JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kimi_fleet import catalog, health
from kimi_fleet.node_files import ADMISSION_DEADLINE_SECONDS

#: The component whose EC2 instance serves the model (its replacement costs a start).
GPU_NODE_COMPONENT = "kimi-fleet:aws:GpuNode"
INSTANCE = "aws:ec2/instance:Instance"
EBS_VOLUME = "aws:ebs/volume:Volume"
_MISSING = object()
#: Replacements that cost nothing, in words (the release bundle is content-addressed: a new release
#: is a new object key, so every release replaces that object).
NO_SERVICE_IMPACT = {
    "aws:s3/bucketObjectv2:BucketObjectv2": "the release bundle is stored under its new digest; no service impact",
}


@dataclass(frozen=True)
class Replacement:
    type: str
    name: str
    #: the replace-on-change inputs that changed (or "<input> (names replaced <resource>)")
    because: tuple[str, ...]
    #: Pulumi refuses to replace a protected resource: the plan says the update will fail
    protected: bool
    #: the GPU node's instance (its replacement stops the service)
    gpu_node: bool


def _value(inputs: dict, path: str):
    node = inputs
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _ignored(path: str, ignore_changes: list[str]) -> bool:
    return any(path == kept or path.startswith(kept + ".") for kept in ignore_changes)


def replace_triggers(resource_type: str, before: dict, after: dict, ignore_changes: list[str] = ()) -> list[str]:
    """The replace-on-change inputs of `resource_type` that differ between two input sets, except
    those the resource ignores (the engine keeps their old values)."""
    return [path for path in catalog.REPLACE_ON_CHANGE.get(resource_type, ())
            if not _ignored(path, list(ignore_changes)) and _value(before, path) != _value(after, path)]


def _strings(value) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(_strings(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_strings(v) for v in value)) if value else set()
    return set()


def previous_of(resource: dict, old: dict[tuple[str, str], dict]) -> dict | None:
    """The resource as the earlier plan had it: under its name, or under a name it aliases (the engine
    moves that state to it, nothing in the cloud changes for the move)."""
    kind = resource["type"]
    for name in (resource["name"], *(resource.get("aliases") or ())):
        if (kind, name) in old:
            return old[(kind, name)]
    return None


def replacements(before: list[dict], after: list[dict]) -> list[Replacement]:
    """Resources of both plans (by type and name) that `pulumi up` would replace, in plan order.

    Each resource dict is plan.py's: type, name, parent, inputs, and (when the planner recorded
    them) id, protect and ignore_changes."""
    old = {(r["type"], r["name"]): r for r in before}
    types = {r["name"]: r["type"] for r in after}
    found: list[Replacement] = []
    replaced_ids: dict[str, str] = {}  # id -> name of a replaced resource
    for resource in after:  # registration order: a resource comes after what it names
        previous = previous_of(resource, old)
        if previous is None:
            continue
        ignored = resource.get("ignore_changes") or []
        because = replace_triggers(resource["type"], previous["inputs"], resource["inputs"], ignored)
        for path in catalog.REPLACE_ON_CHANGE.get(resource["type"], ()):
            if path in because or _ignored(path, ignored):
                continue
            named = _strings(_value(resource["inputs"], path)) & replaced_ids.keys()
            because += [f"{path} (names the replaced {replaced_ids[i]})" for i in sorted(named)]
        if not because:
            continue
        found.append(Replacement(
            type=resource["type"], name=resource["name"], because=tuple(because),
            protected=bool(resource.get("protect")),
            gpu_node=resource["type"] == INSTANCE and types.get(resource.get("parent")) == GPU_NODE_COMPONENT))
        if resource.get("id"):
            replaced_ids[resource["id"]] = resource["name"]
    return found


def _minutes(seconds: int) -> int:
    return max(1, math.ceil(seconds / 60))


def replacement_lines(found: list[Replacement], before_facts: dict | None, after_facts: dict | None) -> list[str]:
    """One line per replaced resource: what, why, and for the node and its weights what it costs.
    The facts are plan.py's `rollout` dicts (sizing's starts, the weights volume, the checkpoint)."""
    facts = after_facts or {}
    volume_replaced = any(r.type == EBS_VOLUME for r in found)
    weights_kept = facts.get("weights_volume") in ("ebs",) and not volume_replaced
    new_checkpoint = bool(before_facts and facts and before_facts.get("checkpoint") != facts.get("checkpoint"))
    lines = []
    # What stops the service first, then the weights, then the rest.
    for r in sorted(found, key=lambda r: (not r.gpu_node, r.type != EBS_VOLUME, r.type in NO_SERVICE_IMPACT)):
        why = ", ".join(f"`{b}`" for b in r.because)
        refusal = (" — **Pulumi will refuse it: the resource is protected** (set "
                   "`weights.allowVolumeReplacement: true` to accept it)" if r.protected else "")
        if r.gpu_node:
            if weights_kept:
                seconds = facts.get("volume_start_seconds", 0) + (facts.get("fetch_seconds", 0) if new_checkpoint else 0)
                # A new instance builds the EFA engine image again (a cold start counts it already).
                seconds += facts.get("image_build_seconds", 0)
                weights = "the weights volume survives and moves to the new instance (verified weights read cold)"
            else:
                seconds = facts.get("cold_start_seconds", 0)
                weights = ("the weights are downloaded again (the weights volume is replaced too)" if volume_replaced
                           else "the weights are downloaded again (instance store does not survive)")
            # A new instance also boots and pulls the engine image before the load (health.py's terms),
            # and serves only once its own run of the suite passed.
            seconds += health.BOOT_SECONDS + health.IMAGE_PULL_SECONDS
            lines.append(f"**replaced**: the GPU node `{r.name}` ({why} changed): the old instance is terminated "
                         f"first, {weights}; about {_minutes(seconds)} min without service (boot, image pull, "
                         f"weights, load), plus up to {_minutes(ADMISSION_DEADLINE_SECONDS)} min of the node's own "
                         f"verification{refusal}")
        elif r.type == EBS_VOLUME:
            lines.append(f"**replaced**: the weights volume `{r.name}` ({why} changed): its verified checkpoint is "
                         "left behind on the retained old volume and downloaded again onto the new one "
                         f"(about {_minutes(facts.get('fetch_seconds', 0))} min of download and verify){refusal}")
        elif r.type in NO_SERVICE_IMPACT:
            lines.append(f"replaced: `{r.type}` {r.name} ({why} changed): {NO_SERVICE_IMPACT[r.type]}")
        else:
            lines.append(f"**replaced**: `{r.type}` {r.name} ({why} changed){refusal}")
    return lines


LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"


def ami_origin(spec, resources: list[dict]) -> str | None:
    """Which AMI the nodes boot and where it came from (None: no launch template)."""
    template = next((r for r in resources if r["type"] == LAUNCH_TEMPLATE), None)
    if template is None:
        return None
    ami = template["inputs"].get("imageId")
    pinned = spec.target.aws.ami_id if spec.target.aws is not None else None
    if pinned:
        return (f"{ami}, pinned by target.aws.amiId: a new value is a new launch template version, announced "
                "as a replacement of a single node by `plan.py --diff`")
    if "imageId" in (template.get("ignore_changes") or []):
        return (f"{ami}, read from SSM {catalog.DLAMI_SSM_PARAMETER} at the first create and kept (imageId is an "
                "ignored change): a newer AMI published there changes nothing; set target.aws.amiId to move")
    return (f"{ami}, read from SSM {catalog.DLAMI_SSM_PARAMETER} on every update: a newer AMI published there is a "
            "new launch template version, which replaces a single node; set target.aws.amiId to pin it")


def acme_warning(r) -> str | None:
    """One line when the stack's proxy takes a public certificate without an ACME account email."""
    from kimi_fleet.k8s_manifests import proxy_tls

    tls = proxy_tls(r) if r.target.renders_manifests else "acme"
    if tls != "acme" or r.spec.acme_email:
        return None
    return (f"no acmeEmail for {r.spec.domain}: Caddy registers its ACME account without a contact, so "
            "certificate expiry and revocation notices reach no one; set kimi-fleet:acmeEmail")
