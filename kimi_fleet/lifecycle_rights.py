"""How an AWS fleet's node role moves from direct Auto Scaling writes to the fleet steward without
stranding a rollback (no Pulumi here: gpu_node declares the policies, plan_diff announces the move).

Before the steward, a fleet node completed its own lifecycle actions and set its own scale-in
protection directly (`autoscaling:CompleteLifecycleAction` / `SetInstanceProtection` on its group,
the node role policy `<node>-admission`). Since, the node role holds neither: a node asks its
steward (kimi_fleet/steward.py), which acts on the caller's own instance only.

A running fleet cannot lose the direct rights when the steward is declared: the group stays on its
last good launch template version until the gate's instance refresh to the new release succeeds
(scripts/await_fleet_release.py), and a refresh that fails rolls back to it, so every node the group
launches in the meantime (the rollback's, a scale-out's, a spot replacement's) boots the pre-steward
release, whose watchdog and drain call those two actions themselves: without them its admission is
refused, it is abandoned at the hook's timeout (a GPU node's whole boot and load, again and again),
and a draining node ends at the hook's timeout instead of when idle.

So the steward's caller rights are a policy of another name (`<node>-steward-caller`), and
`<node>-admission` is no longer declared at all: Pulumi deletes a resource the program no longer
declares only once the program has finished and every create and update succeeded (pulumi/pulumi
pkg/resource/deploy/deployment_executor.go: performDeletes runs when the program's events end, and
a failed step cancels the deployment before it). The program finishes only after the gate, and the
gate succeeds only once the refresh made the steward release the group's good version. So:
- a new fleet never holds the direct rights (its group starts on a steward release);
- a running fleet keeps them through the whole `pulumi up` that brings the steward, and loses them
  at its end, only if the gate succeeded; a failed gate leaves them (the rollback's nodes admit
  themselves), until a later `pulumi up` succeeds.
A fleet without the gate never moves its group to a new version at all (the gate starts every
refresh): the AWS target (kimi_fleet/targets/aws.py) refuses `verification.enabled: false` on a fleet.
"""

from __future__ import annotations

import fnmatch
import json

ROLE_POLICY_TYPE = "aws:iam/rolePolicy:RolePolicy"
#: What the pre-steward node role held on its group, and the steward now does for the caller alone.
DIRECT_LIFECYCLE_ACTIONS = ("autoscaling:CompleteLifecycleAction", "autoscaling:SetInstanceProtection")
#: The node role policy that held them (`<GpuNode name>-admission`): never declared again.
RETIRED_POLICY_SUFFIX = "-admission"
#: The node role policy that lets a node call its steward (`<GpuNode name>-steward-caller`).
STEWARD_CALLER_SUFFIX = "-steward-caller"
CHANGING_A_RUNNING_STACK = "docs/changing-a-running-stack.md#a-fleet-gains-its-steward"


def _listed(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value or ())


def direct_rights(resources: list[dict]) -> list[str]:
    """Names of the declared role policies that grant a direct lifecycle action (any resource)."""
    found = []
    for resource in resources:
        if resource.get("type") != ROLE_POLICY_TYPE:
            continue
        try:
            statements = json.loads((resource.get("inputs") or {}).get("policy") or "{}").get("Statement", [])
        except (TypeError, ValueError):
            continue
        actions = {a.lower() for s in statements if s.get("Effect") == "Allow" for a in _listed(s.get("Action"))}
        if any(fnmatch.fnmatchcase(wanted.lower(), a) for wanted in DIRECT_LIFECYCLE_ACTIONS for a in actions):
            found.append(resource["name"])
    return found


def migration_lines(before: list[dict], after: list[dict]) -> list[str]:
    """What `plan.py --diff` says when a fleet's node role gives up its direct lifecycle rights."""
    old, new = direct_rights(before), direct_rights(after)
    # A policy declared under that name, or under another with it as an alias (the state moves to it):
    # either way the engine updates it in place, while the program runs.
    after_names = {(r.get("type"), name) for r in after for name in [r.get("name"), *(r.get("aliases") or ())]}
    lines = []
    for name in old:
        if name in new:
            continue
        if (ROLE_POLICY_TYPE, name) in after_names:
            # Updated in place: it would go before the gate, while the group's good version may
            # still be a pre-steward release (gpu_node never does this; a hand edit could).
            lines.append(f"**node role loses its direct lifecycle rights before the gate**: `{name}` is updated in "
                         "place, so a rollback to a pre-steward release would launch nodes that cannot admit "
                         f"themselves; retire it under its own name instead ({CHANGING_A_RUNNING_STACK})")
        else:
            lines.append(f"**fleet steward migration**: the node role policy `{name}` (direct "
                         f"{' and '.join(DIRECT_LIFECYCLE_ACTIONS)}) is deleted at the end of `pulumi up`, only "
                         "if the gate's instance refresh made this release the group's good version; until then, "
                         "and after a failed gate, nodes of the older release still admit themselves and end "
                         f"their drains when idle. Run this `pulumi up` whole: no `--target`, no `--exclude`, no "
                         f"`--continue-on-error` ({CHANGING_A_RUNNING_STACK})")
    return lines


def plan_line(resources: list[dict]) -> str | None:
    """What `plan.py STACK` says of an AWS fleet's node role (None: no steward, not a fleet)."""
    callers = [r["name"] for r in resources
               if r.get("type") == ROLE_POLICY_TYPE and r.get("name", "").endswith(STEWARD_CALLER_SUFFIX)]
    if not callers:
        return None
    node = callers[0][: -len(STEWARD_CALLER_SUFFIX)]
    return (f"lifecycle rights: nodes complete their admission and drain and set their scale-in protection only "
            f"through the fleet steward (`{callers[0]}`); a fleet deployed before the steward keeps its direct "
            f"rights (`{node}{RETIRED_POLICY_SUFFIX}` in its state) until the `pulumi up` that brings the steward "
            f"succeeds, so a rollback to the older release still admits its nodes ({CHANGING_A_RUNNING_STACK})")
