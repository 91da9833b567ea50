"""The fleet steward as an AWS fleet declares it (components/fleet_steward.py under the mocks): the node
role loses the two Auto Scaling actions that reach every peer and may call only its steward, through
the URL with IAM auth; the function's URL, its resource policy (the node role only) and its own role
(those two actions on this group only) are children of the steward, itself under the node."""

from __future__ import annotations

import json

import pytest

from components.fleet_steward import HANDLER, execution_policy
from kimi_fleet import catalog, health, node_files, node_metrics, steward
from tooling.mock_run import run_stack

FLEET, SINGLE = "h200-int4-vllm", "h200-int4-sglang"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
FUNCTION = "aws:lambda/function:Function"
#: What an IAM statement may hold (IAM JSON policy reference: the grammar's elements).
STATEMENT_KEYS = {"Sid", "Effect", "Action", "NotAction", "Resource", "NotResource", "Condition", "Principal"}


@pytest.fixture(scope="module")
def fleet():
    run = run_stack(FLEET)
    assert run.error is None, run.error
    return run


def _one(run, typ: str) -> dict:
    (found,) = run.of_type(typ)
    return found


def _node_role(run) -> dict:
    """The role of the GPU nodes (the instance profile's): the GpuNode's own."""
    resources = _by_name(run)
    (role,) = [r for r in run.of_type("aws:iam/role:Role")
               if resources[r["parent"]]["type"] == "kimi-fleet:aws:GpuNode"]
    assert "ec2.amazonaws.com" in role["inputs"]["assumeRolePolicy"]
    return role


def _by_name(run) -> dict[str, dict]:
    return {r["name"]: r for r in run.resources}


def _statements(policy: str) -> list[dict]:
    document = json.loads(policy)
    assert document["Version"] == "2012-10-17" and isinstance(document["Statement"], list)
    for statement in document["Statement"]:
        assert set(statement) <= STATEMENT_KEYS and statement["Effect"] in ("Allow", "Deny"), statement
        assert "Action" in statement and "Resource" in statement, statement
        for action in [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]:
            service, _, name = action.partition(":")
            assert service.isalnum() and service.islower() and name[:1].isupper() and "*" not in action, action
    return document["Statement"]


def _actions(statement: dict) -> list[str]:
    return [statement["Action"]] if isinstance(statement["Action"], str) else list(statement["Action"])


def test_the_node_role_may_call_its_steward_and_no_longer_act_on_the_group(fleet):
    node_role = _node_role(fleet)
    function = _one(fleet, FUNCTION)
    node_statements = [s for p in fleet.of_type(ROLE_POLICY) if p["inputs"]["role"] == f"{node_role['name']}-id"
                       for s in _statements(p["inputs"]["policy"])]
    actions = {a for s in node_statements for a in _actions(s)}
    assert not {"autoscaling:CompleteLifecycleAction", "autoscaling:SetInstanceProtection",
                "autoscaling:RecordLifecycleActionHeartbeat", "autoscaling:SetInstanceHealth"} & actions
    lambda_statements = [s for s in node_statements if any(a.startswith("lambda:") for a in _actions(s))]
    assert {(tuple(_actions(s)), s["Resource"], json.dumps(s["Condition"], sort_keys=True))
            for s in lambda_statements} == {
        (("lambda:InvokeFunctionUrl",), f"arn:aws:mock:::{function['name']}",
         json.dumps({"StringEquals": {"lambda:FunctionUrlAuthType": "AWS_IAM"}})),
        (("lambda:InvokeFunction",), f"arn:aws:mock:::{function['name']}",
         json.dumps({"Bool": {"lambda:InvokedViaFunctionUrl": "true"}}))}


def test_the_function_its_url_and_its_resource_policy_admit_the_node_role_only(fleet):
    resources = _by_name(fleet)
    function = _one(fleet, FUNCTION)
    steward_component = resources[function["parent"]]
    assert steward_component["type"] == "kimi-fleet:aws:FleetSteward"
    assert resources[steward_component["parent"]]["type"] == "kimi-fleet:aws:GpuNode"
    node_role = _node_role(fleet)
    group = _one(fleet, "aws:autoscaling/group:Group")
    inputs = function["inputs"]
    assert (inputs["runtime"], inputs["handler"]) == (catalog.STEWARD_RUNTIME, HANDLER) == ("python3.13", "steward.handler")
    assert inputs["environment"]["variables"] == {
        "KIMI_STEWARD_GROUP": group["name"], "KIMI_STEWARD_NODE_ROLE_ARN": f"arn:aws:mock:::{node_role['name']}",
        "KIMI_STEWARD_ADMISSION_HOOK": health.ADMISSION_HOOK_NAME, "KIMI_STEWARD_DRAIN_HOOK": node_metrics.DRAIN_HOOK}
    assert set(inputs["environment"]["variables"]) == set(steward.ENVIRONMENT)
    # The code: the handler file alone, as an archive.
    assert list(inputs["code"]["assets"]) == ["steward.py"]
    assert inputs["code"]["assets"]["steward.py"]["text"] == open(steward.__file__).read()
    url = _one(fleet, "aws:lambda/functionUrl:FunctionUrl")
    assert url["inputs"] == {"functionName": function["name"], "authorizationType": "AWS_IAM"}
    permissions = {p["inputs"]["action"]: p["inputs"] for p in fleet.of_type("aws:lambda/permission:Permission")}
    assert set(permissions) == {"lambda:InvokeFunctionUrl", "lambda:InvokeFunction"}
    for permission in permissions.values():
        assert permission["principal"] == f"arn:aws:mock:::{node_role['name']}"
        assert permission["function"] == function["name"]
    assert permissions["lambda:InvokeFunctionUrl"]["functionUrlAuthType"] == "AWS_IAM"
    assert permissions["lambda:InvokeFunction"]["invokedViaFunctionUrl"] is True
    for name in (url["name"], *(p["name"] for p in fleet.of_type("aws:lambda/permission:Permission"))):
        assert resources[name]["parent"] == steward_component["name"]
    # Where the nodes read the URL: the parameter node.env names.
    parameter = next(p for p in fleet.of_type("aws:ssm/parameter:Parameter")
                     if p["inputs"]["name"].endswith("/steward-url"))
    assert parameter["inputs"]["name"] == node_files.steward_url_parameter(node_files.default_ssm_prefix(FLEET))
    assert parameter["inputs"]["type"] == "String" and parameter["parent"] == steward_component["name"]


def test_the_functions_own_role_acts_on_this_group_only(fleet):
    function = _one(fleet, FUNCTION)
    roles = {r["name"]: r for r in fleet.of_type("aws:iam/role:Role")}
    role = roles[function["inputs"]["role"].removeprefix("arn:aws:mock:::")]
    assert json.loads(role["inputs"]["assumeRolePolicy"])["Statement"] == [
        {"Effect": "Allow", "Action": "sts:AssumeRole", "Principal": {"Service": "lambda.amazonaws.com"}}]
    (policy,) = [p for p in fleet.of_type(ROLE_POLICY) if p["inputs"]["role"] == f"{role['name']}-id"]
    group = _one(fleet, "aws:autoscaling/group:Group")
    logs = _one(fleet, "aws:cloudwatch/logGroup:LogGroup")
    statements = _statements(policy["inputs"]["policy"])
    assert statements == json.loads(execution_policy(f"arn:aws:mock:::{group['name']}",
                                                     f"arn:aws:mock:::{logs['name']}"))["Statement"]
    by_action = {a: s["Resource"] for s in statements for a in _actions(s)}
    assert by_action["autoscaling:CompleteLifecycleAction"] == by_action["autoscaling:SetInstanceProtection"] == \
        f"arn:aws:mock:::{group['name']}"
    assert by_action["autoscaling:DescribeAutoScalingInstances"] == "*"
    assert by_action["logs:PutLogEvents"] == f"arn:aws:mock:::{logs['name']}:log-stream:*"
    assert function["inputs"]["loggingConfig"]["logGroup"] == logs["name"]
    assert policy["name"] in function["dependencies"]  # its rights exist before its first call


def test_a_single_node_has_no_steward():
    run = run_stack(SINGLE)
    assert run.error is None, run.error
    assert not run.of_type(FUNCTION) and not run.of_type("aws:lambda/permission:Permission")
    assert not any("lambda:" in p["inputs"]["policy"] for p in run.of_type(ROLE_POLICY))
