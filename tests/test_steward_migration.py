"""A running AWS fleet gains its steward without stranding a rollback (kimi_fleet/lifecycle_rights.py).

The node role's statements in both phases, from what the program declares under the mocks and what
the state of a fleet deployed before the steward holds: during the `pulumi up` that brings the
steward (Pulumi deletes a resource the program no longer declares only after the program ended and
every step succeeded, so after the gate), and after it. Then the failure path to its end state: the
gate's refresh fails and rolls back, and the group relaunches the pre-steward release; each node's
own Auto Scaling calls, as that release's watchdog and drain make them, go to a real Auto Scaling API
on loopback (moto, tests/fakes/autoscaling_lifecycle.py) through an IAM check of the role's statements
in that phase: the node is admitted (InService) and its drain ends when it says so. The same path with
the policy replaced in place (what the steward's first merge declared) is denied and leaves the node
in Pending:Wait, which its hook abandons. A fleet without its gate is refused, naming the field.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import io
import json
import os

import boto3
import pytest
import yaml
from botocore.exceptions import ClientError

from kimi_fleet import health, lifecycle_rights
from kimi_fleet.stackfile import PROJECT_ROOT, stack_file
from tests.fakes.autoscaling_lifecycle import autoscaling_api, create_groups, hold
from tests.fakes.harness import environment
from tooling.mock_run import run_stack

FLEET = "h200-int4-vllm"
REGION = "us-east-1"
ROLE_POLICY = lifecycle_rights.ROLE_POLICY_TYPE
_PLAN = importlib.util.spec_from_file_location("plan_script", PROJECT_ROOT / "scripts" / "plan.py")
plan = importlib.util.module_from_spec(_PLAN)
_PLAN.loader.exec_module(plan)


def pre_steward_policy(group_arn: str) -> str:
    """The node role policy `<node>-admission` as every fleet declared it before the steward (commit
    6c637a2, components/gpu_node.py): what the state of a fleet deployed then holds."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "CompleteOwnLifecycleActions", "Effect": "Allow",
         "Action": "autoscaling:CompleteLifecycleAction", "Resource": group_arn},
        {"Sid": "ProtectWhileBusy", "Effect": "Allow", "Action": "autoscaling:SetInstanceProtection",
         "Resource": group_arn},
        {"Sid": "FindOwnGroup", "Effect": "Allow",
         "Action": ["autoscaling:DescribeAutoScalingInstances", "autoscaling:DescribeAutoScalingGroups"],
         "Resource": "*"}]})


@pytest.fixture(scope="module")
def fleet():
    run = run_stack(FLEET)
    assert run.error is None, run.error
    by_name = {r["name"]: r for r in run.resources}
    (node,) = [r for r in run.resources if r["type"] == "kimi-fleet:aws:GpuNode"]
    (role,) = [r for r in run.of_type("aws:iam/role:Role") if r["parent"] == node["name"]]
    (group,) = run.of_type("aws:autoscaling/group:Group")
    group_arn = f"arn:aws:mock:::{group['name']}"  # the mocks' ARN (tooling/mock_run.py)
    retired = {"type": ROLE_POLICY, "name": f"{node['name']}{lifecycle_rights.RETIRED_POLICY_SUFFIX}",
               "inputs": {"role": f"{role['name']}-id", "policy": pre_steward_policy(group_arn)}}
    return {"run": run, "by_name": by_name, "node": node["name"], "role_id": f"{role['name']}-id",
            "group": group, "group_arn": group_arn, "retired": retired}


def _node_policies(resources: list[dict], role_id: str) -> list[dict]:
    return [r for r in resources if r["type"] == ROLE_POLICY and r["inputs"]["role"] == role_id]


def during_the_up(declared: list[dict], state: list[dict]) -> list[dict]:
    """The role's policies while the `pulumi up` runs: every policy the program declares (created or
    updated as it registers them, under its name or an alias's) and every policy of the state the
    program no longer declares (deleted only once the program ended and every step succeeded)."""
    names = {(r["type"], n) for r in declared for n in [r["name"], *(r.get("aliases") or ())]}
    return declared + [r for r in state if (r["type"], r["name"]) not in names]


def statements(policies: list[dict]) -> list[dict]:
    return [s for p in policies for s in json.loads(p["inputs"]["policy"])["Statement"]]


def _listed(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def allows(found: list[dict], action: str, resource: str) -> bool:
    """IAM's identity-policy evaluation for one call: an explicit Deny wins, else an Allow whose action
    and resource match (IAM's `*` and `?` wildcards; actions case-insensitive). A statement with a
    condition is not counted: none of the calls here is meant to pass through one."""
    def matches(s):
        return ("Condition" not in s
                and any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in _listed(s["Action"]))
                and any(fnmatch.fnmatchcase(resource, r) for r in _listed(s["Resource"])))
    relevant = [s for s in found if matches(s)]
    return any(s["Effect"] == "Allow" for s in relevant) and not any(s["Effect"] == "Deny" for s in relevant)


def test_the_retired_policy_is_never_declared_so_its_state_copy_outlives_the_gate(fleet):
    """Not declared under its name nor as any resource's alias (either would update it in place, before
    the gate); the fleet's gate starts the refresh itself, so the program ends only after it."""
    declared = fleet["run"].resources
    retired = fleet["retired"]["name"]
    assert not [r for r in declared if r["type"] == ROLE_POLICY and retired in [r["name"], *r["aliases"]]]
    (caller,) = [r for r in _node_policies(declared, fleet["role_id"])
                 if r["name"].endswith(lifecycle_rights.STEWARD_CALLER_SUFFIX)]
    assert caller["name"] == f"{fleet['node']}{lifecycle_rights.STEWARD_CALLER_SUFFIX}"
    (gate,) = [r for r in declared if r["type"] == "command:local:Command" and r["name"].endswith("-gate-verify")]
    assert "scripts/await_fleet_release.py" in gate["inputs"]["create"]
    assert "--launch-template-id" in gate["inputs"]["create"]


def test_the_node_role_in_both_phases(fleet):
    declared = _node_policies(fleet["run"].resources, fleet["role_id"])
    function = f"arn:aws:mock:::{fleet['run'].of_type('aws:lambda/function:Function')[0]['name']}"
    after = statements(declared)  # a new fleet, and a running one once the up succeeded
    during = statements(during_the_up(declared, [fleet["retired"]]))
    group = fleet["group_arn"]
    for action in lifecycle_rights.DIRECT_LIFECYCLE_ACTIONS:
        assert not allows(after, action, group), action
        assert allows(during, action, group), action
    for phase in (after, during):
        # Steward-aware nodes reach their steward in both (its URL's conditions: test_fleet_steward.py).
        assert {"lambda:InvokeFunctionUrl", "lambda:InvokeFunction"} <= {
            a for s in phase if s["Resource"] == function for a in _listed(s["Action"])}
        assert allows(phase, "autoscaling:DescribeAutoScalingInstances", "*")
        assert not allows(phase, "autoscaling:SetInstanceHealth", group)
    # The direct rights during the up are exactly the state's: nothing the program declares adds them.
    assert lifecycle_rights.direct_rights(declared) == []
    assert lifecycle_rights.direct_rights(during_the_up(declared, [fleet["retired"]])) == [fleet["retired"]["name"]]


def _iam_checked(client, found: list[dict], group_arn: str):
    """Every Auto Scaling call of this client is first checked against the role's statements, as IAM
    checks an instance profile's: a call they do not allow is AWS's AccessDenied, and never reaches
    the API."""
    def check(model, params, **_):
        action = f"autoscaling:{model.name}"
        resource = "*" if model.name.startswith("Describe") else group_arn
        if not allows(found, action, resource):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": f"not authorized to perform: {action} "
                                         f"on resource: {resource}"}}, model.name)
    client.meta.events.register("before-call.auto-scaling.*", check)
    return client


def _state(client, group: str, instance: str) -> tuple[str, bool]:
    (found,) = [i for i in client.describe_auto_scaling_instances(InstanceIds=[instance])["AutoScalingInstances"]
                if i["AutoScalingGroupName"] == group]
    return found["LifecycleState"], found["ProtectedFromScaleIn"]


def _complete_own_hook(client, group: str, instance: str, hook: str) -> None:
    """What the pre-steward release's watchdog (its admission) and drain (once idle) call on their own
    instance: `aws autoscaling complete-lifecycle-action ... --lifecycle-action-result CONTINUE`
    (commit 6c637a2); its drain also drops its own protection (`set-instance-protection`)."""
    client.complete_lifecycle_action(AutoScalingGroupName=group, LifecycleHookName=hook, InstanceId=instance,
                                     LifecycleActionResult="CONTINUE")


def test_a_rollback_during_the_migration_relaunches_nodes_that_admit_themselves(fleet):
    declared = _node_policies(fleet["run"].resources, fleet["role_id"])
    hooks = {h["inputs"]["lifecycleTransition"]: h["inputs"]
             for h in fleet["run"].of_type("aws:autoscaling/lifecycleHook:LifecycleHook")}
    admission_hook = hooks["autoscaling:EC2_INSTANCE_LAUNCHING"]
    drain_hook = hooks["autoscaling:EC2_INSTANCE_TERMINATING"]
    assert admission_hook["name"] == health.ADMISSION_HOOK_NAME and admission_hook["defaultResult"] == "ABANDON"
    # What the steward's first merge declared: the steward's caller policy under the old name, so the
    # state's direct rights were replaced in place, before the gate.
    in_place = [{**p, "name": fleet["retired"]["name"]} if p["name"].endswith(lifecycle_rights.STEWARD_CALLER_SUFFIX)
                else p for p in declared]
    phases = {"fixed": during_the_up(declared, [fleet["retired"]]),
              "replaced in place": during_the_up(in_place, [fleet["retired"]])}
    group = "kimi-fleet-group"
    credentials = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": REGION}
    with environment(credentials), autoscaling_api(REGION) as (url, backend):
        create_groups(url, REGION, {group: 4},
                      {hook["name"]: hook["lifecycleTransition"] for hook in (admission_hook, drain_hook)})
        admin = boto3.client("autoscaling", endpoint_url=url, region_name=REGION)
        (described,) = admin.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"]
        instances = sorted(i["InstanceId"] for i in described["Instances"])
        ends = {}
        for phase, (relaunched, draining) in zip(phases, (instances[:2], instances[2:])):
            node = _iam_checked(boto3.client("autoscaling", endpoint_url=url, region_name=REGION),
                                statements(phases[phase]), fleet["group_arn"])
            # The rollback relaunches a pre-steward node: it waits on its admission hook until admitted.
            hold(backend, group, relaunched, "Pending:Wait")
            # An old node of the group being replaced: it was busy (protected), and drains.
            admin.set_instance_protection(AutoScalingGroupName=group, InstanceIds=[draining],
                                          ProtectedFromScaleIn=True)
            hold(backend, group, draining, "Terminating:Wait")
            errors = []
            for call in (lambda: _complete_own_hook(node, group, relaunched, health.ADMISSION_HOOK_NAME),
                         lambda: node.set_instance_protection(AutoScalingGroupName=group, InstanceIds=[draining],
                                                              ProtectedFromScaleIn=False),
                         lambda: _complete_own_hook(node, group, draining, drain_hook["name"])):
                try:
                    call()
                except ClientError as error:
                    errors.append(error.response["Error"]["Code"])
            ends[phase] = (_state(admin, group, relaunched), _state(admin, group, draining), errors)
    # Fixed: admitted, and the drain ends when the node says it is idle.
    assert ends["fixed"] == (("InService", False), ("Terminating:Proceed", False), [])
    # In place: every call denied; the relaunched node waits until its hook abandons it (ABANDON at the
    # heartbeat timeout, the group launches another), the old one until its drain hook times out.
    assert ends["replaced in place"] == (("Pending:Wait", False), ("Terminating:Wait", True), ["AccessDenied"] * 3)


def test_plan_diff_announces_the_migration_and_flags_an_in_place_loss(fleet):
    declared = fleet["run"].resources
    retired = fleet["retired"]
    before = [r for r in declared if not r["name"].endswith(lifecycle_rights.STEWARD_CALLER_SUFFIX)] + [retired]
    (line,) = lifecycle_rights.migration_lines(before, declared)
    assert line.startswith("**fleet steward migration**") and f"`{retired['name']}`" in line
    assert "deleted at the end of `pulumi up`, only if the gate" in line and "`--continue-on-error`" in line
    in_place = [{**r, "name": retired["name"]} if r["name"].endswith(lifecycle_rights.STEWARD_CALLER_SUFFIX) else r
                for r in declared]
    (line,) = lifecycle_rights.migration_lines(before, in_place)
    assert line.startswith("**node role loses its direct lifecycle rights before the gate**")
    aliased = [{**r, "aliases": [retired["name"]]} if r["name"].endswith(lifecycle_rights.STEWARD_CALLER_SUFFIX)
               else r for r in declared]
    assert "before the gate" in lifecycle_rights.migration_lines(before, aliased)[0]
    assert lifecycle_rights.migration_lines(declared, declared) == []  # already migrated: nothing to say
    single = lifecycle_rights.plan_line(declared)
    assert single and f"`{retired['name']}` in its state" in single


def test_an_aws_fleet_without_its_gate_is_refused_naming_the_field(tmp_path):
    document = yaml.safe_load(stack_file(FLEET).read_text())
    document["config"]["kimi-fleet:verification"] = {
        **(document["config"].get("kimi-fleet:verification") or {}), "enabled": False}
    path = tmp_path / f"Pulumi.{FLEET}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = plan.main(["--stack-file", str(path), "--no-preflight", "--build-dir", str(tmp_path / "build")])
    message = out.getvalue()
    assert code == 2, message
    assert "field kimi-fleet:verification.enabled (given False): allowed on an AWS fleet: true only" in message
    assert "starts every release's instance refresh" in message and "verification.checks" in message
    assert "verification.enabled" in err.getvalue()
    assert not (tmp_path / "build").exists()
