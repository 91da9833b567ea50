"""The fleet steward (kimi_fleet/steward.py) against a real Auto Scaling API on loopback (moto's server,
tests/fakes/autoscaling_lifecycle.py), with events shaped as a function URL with AuthType AWS_IAM
delivers them (Lambda developer guide, "Invoking Lambda function URLs": requestContext.authorizer.iam).

The threat (issue 24): a node's root acting on its peers' Auto Scaling state. Whatever the caller
says, the steward acts on the instance AWS names as the caller, in the stack's group, in the state
the action needs; every refusal leaves the group as it was (read back from the API)."""

from __future__ import annotations

import base64
import json
import os

import boto3
import pytest

from kimi_fleet import steward
from tests.fakes.autoscaling_lifecycle import ACCOUNT, autoscaling_api, create_groups, hold
from tests.fakes.harness import environment

REGION = "us-east-1"
GROUP, OTHER_GROUP = "kimi-h200-int4-vllm-fleet-group-1a2b3c", "kimi-other-stack-group-4d5e6f"
ROLE_NAME = "kimi-fleet-node-role-7a8b9c"
NODE_ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/{ROLE_NAME}"
ADMISSION_HOOK, DRAIN_HOOK = "kimi-fleet-admitted", "kimi-drain"
ENVIRONMENT = {"KIMI_STEWARD_GROUP": GROUP, "KIMI_STEWARD_NODE_ROLE_ARN": NODE_ROLE_ARN,
               "KIMI_STEWARD_ADMISSION_HOOK": ADMISSION_HOOK, "KIMI_STEWARD_DRAIN_HOOK": DRAIN_HOOK}


@pytest.fixture(scope="module")
def fleet():
    """Two groups on one moto server: the stack's (three instances, both hooks) and another stack's (one)."""
    credentials = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": REGION}
    with environment(credentials), autoscaling_api(REGION) as (url, backend):
        create_groups(url, REGION, {GROUP: 3, OTHER_GROUP: 1},
                      {ADMISSION_HOOK: "autoscaling:EC2_INSTANCE_LAUNCHING",
                       DRAIN_HOOK: "autoscaling:EC2_INSTANCE_TERMINATING"})
        client = boto3.client("autoscaling", endpoint_url=url, region_name=REGION)
        mine, peer, third = [i["InstanceId"] for i in _instances(client, GROUP)]
        (stranger,) = [i["InstanceId"] for i in _instances(client, OTHER_GROUP)]
        yield {"client": client, "backend": backend, "mine": mine, "peer": peer, "third": third,
               "stranger": stranger}


def _instances(client, group: str) -> list[dict]:
    (described,) = client.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"]
    return sorted(described["Instances"], key=lambda i: i["InstanceId"])


def group_state(fleet) -> dict[str, tuple[str, bool]]:
    """Every instance of both groups as the API reports it: (lifecycle state, protected from scale-in)."""
    return {i["InstanceId"]: (i["LifecycleState"], i["ProtectedFromScaleIn"])
            for group in (GROUP, OTHER_GROUP) for i in _instances(fleet["client"], group)}


@pytest.fixture
def node(fleet):
    """Every instance InService and unprotected; the peer waits in Terminating:Wait (a busy peer being
    drained: the state an attacker would cut short) and the third in Pending:Wait (a peer's admission)."""
    for group in (GROUP, OTHER_GROUP):
        for state in fleet["backend"].autoscaling_groups[group].instance_states:
            state.lifecycle_state, state.protected_from_scale_in = "InService", False
    hold(fleet["backend"], GROUP, fleet["peer"], "Terminating:Wait")
    hold(fleet["backend"], GROUP, fleet["third"], "Pending:Wait")
    return fleet


def event(body, user_arn: str | None, *, method: str = "POST", encode: bool = False) -> dict:
    """A function URL's event (payload format 2.0) as Lambda builds it for a SigV4-signed request."""
    text = body if isinstance(body, str) else json.dumps(body)
    context = {"accountId": "anonymous", "apiId": "abcdefghijklmnopqrstuvwxyz012345",
               "domainName": f"abcdefghijklmnopqrstuvwxyz012345.lambda-url.{REGION}.on.aws",
               "http": {"method": method, "path": "/", "protocol": "HTTP/1.1", "sourceIp": "10.0.1.23",
                        "userAgent": "kimi-fleet-node"},
               "requestId": "6d2d8a3c-0000-4000-8000-000000000000", "routeKey": "$default", "stage": "$default",
               "time": "08/Dec/2026:03:00:00 +0000", "timeEpoch": 1796698800000}
    if user_arn is not None:
        context["authorizer"] = {"iam": {"accessKey": "ASIAEXAMPLEEXAMPLE12", "accountId": ACCOUNT,
                                         "callerId": "AROAEXAMPLEEXAMPLE123:i-x", "cognitoIdentity": None,
                                         "principalOrgId": None, "userArn": user_arn,
                                         "userId": "AROAEXAMPLEEXAMPLE123:i-x"}}
    return {"version": "2.0", "routeKey": "$default", "rawPath": "/", "rawQueryString": "",
            "headers": {"content-type": "application/json"}, "requestContext": context,
            "body": base64.b64encode(text.encode()).decode() if encode else text, "isBase64Encoded": encode}


def session(instance: str, role: str = ROLE_NAME, account: str = ACCOUNT) -> str:
    """An instance profile's credentials: a session of the role named for the instance."""
    return f"arn:aws:sts::{account}:assumed-role/{role}/{instance}"


def call(fleet, body, user_arn, **kwargs) -> tuple[int, dict]:
    answer = steward.handle(event(body, user_arn, **kwargs), fleet["client"], ENVIRONMENT)
    return answer["statusCode"], json.loads(answer["body"])


def test_a_node_protects_and_unprotects_itself_and_nothing_else(node):
    before = group_state(node)
    status, answer = call(node, {"action": "protect"}, session(node["mine"]))
    assert (status, answer["ok"], answer["instance"]) == (200, True, node["mine"]), answer
    assert group_state(node) == {**before, node["mine"]: ("InService", True)}
    status, _ = call(node, {"action": "unprotect"}, session(node["mine"]), encode=True)  # base64 bodies too
    assert status == 200 and group_state(node) == before


@pytest.mark.parametrize("result, after", [("CONTINUE", "InService"), ("ABANDON", "Terminating")])
def test_a_node_completes_its_own_pending_admission(node, result, after):
    hold(node["backend"], GROUP, node["mine"], "Pending:Wait")
    before = group_state(node)
    status, answer = call(node, {"action": "complete-admission", "result": result}, session(node["mine"]))
    assert status == 200 and answer["done"] == f"completed {ADMISSION_HOOK} with {result}", answer
    assert group_state(node) == {**before, node["mine"]: (after, False)}  # the third's admission still waits


def test_a_node_completes_its_own_drain(node):
    hold(node["backend"], GROUP, node["mine"], "Terminating:Wait")
    before = group_state(node)
    status, answer = call(node, {"action": "complete-drain", "result": "CONTINUE"}, session(node["mine"]))
    assert status == 200 and answer["done"] == f"completed {DRAIN_HOOK} with CONTINUE", answer
    assert group_state(node) == {**before, node["mine"]: ("Terminating:Proceed", False)}
    assert group_state(node)[node["peer"]] == ("Terminating:Wait", False)  # the busy peer still drains


@pytest.mark.parametrize("body", [
    lambda f: {"action": "complete-drain", "result": "CONTINUE", "instance": f["peer"]},
    lambda f: {"action": "complete-drain", "result": "CONTINUE", "InstanceId": f["peer"]},
    lambda f: {"action": "complete-admission", "result": "ABANDON", "instanceIds": [f["third"]]},
    lambda f: {"action": "unprotect", "AutoScalingGroupName": GROUP},
    lambda f: {"action": f["peer"]},
    lambda f: {"action": "complete-drain", "result": f["peer"]},
    lambda f: {"action": "protect", "result": "CONTINUE"},
    lambda f: {"action": "complete-drain", "result": "ABANDON"},
    lambda f: {"action": "complete-drain"},
    lambda f: [{"action": "protect"}],
    lambda f: f"action=protect&instance={f['peer']}",
    lambda f: {"action": "protect", "pad": "x" * 300},
], ids=["peer-instance", "peer-InstanceId", "peer-in-a-list", "group", "peer-as-action", "peer-as-result",
        "protect-with-result", "drain-abandon", "drain-without-result", "array", "form", "oversized"])
def test_a_body_naming_anything_but_the_action_is_refused_and_nothing_changes(node, body):
    """Review: the caller's own instance comes from AWS; a body that names a peer (or anything else) is
    a 400 before any Auto Scaling call, even from the peer's own group's legitimate node."""
    hold(node["backend"], GROUP, node["mine"], "Terminating:Wait")  # its own drain pending: still refused
    before = group_state(node)
    status, answer = call(node, body(node), session(node["mine"]))
    assert status == 400 and answer["ok"] is False and answer["reason"], answer
    assert group_state(node) == before


@pytest.mark.parametrize("caller, reason", [
    (lambda f: session(f["mine"], role="kimi-other-stack-node-role"), "is not a session of the stack's node role"),
    (lambda f: session(f["mine"], account="210987654321"), "is not a session of the stack's node role"),
    (lambda f: f"arn:aws:iam::{ACCOUNT}:user/alice", "is not a role session"),
    (lambda f: f"arn:aws:iam::{ACCOUNT}:root", "is not a role session"),
    (lambda f: session("botocore-session-1796698800"), "is not an instance id"),
    (lambda f: session(f"{f['peer']}-x"), "is not an instance id"),
    (lambda f: session(f["stranger"]), "is not an instance of the stack's group"),
    (lambda f: session("i-0123456789abcdef0"), "is not an instance of the stack's group"),
    (lambda f: None, "no IAM identity"),
], ids=["other-role", "other-account", "user", "root", "not-an-instance-session", "suffixed-id",
        "other-groups-instance", "unknown-instance", "no-identity"])
def test_a_caller_that_is_not_a_node_of_this_group_is_refused_and_nothing_changes(node, caller, reason):
    before = group_state(node)
    for body in ({"action": "complete-drain", "result": "CONTINUE"}, {"action": "protect"}):
        status, answer = call(node, body, caller(node))
        assert status == 403 and reason in answer["reason"], answer
    assert group_state(node) == before


@pytest.mark.parametrize("own_state, body", [
    ("InService", {"action": "complete-drain", "result": "CONTINUE"}),
    ("InService", {"action": "complete-admission", "result": "CONTINUE"}),
    ("Pending:Wait", {"action": "complete-drain", "result": "CONTINUE"}),
    ("Terminating:Wait", {"action": "complete-admission", "result": "ABANDON"}),
])
def test_a_node_with_no_such_pending_action_is_refused_and_nothing_changes(node, own_state, body):
    hold(node["backend"], GROUP, node["mine"], own_state)
    before = group_state(node)
    status, answer = call(node, body, session(node["mine"]))
    assert status == 409 and f"{node['mine']} is {own_state}" in answer["reason"], answer
    assert group_state(node) == before


def test_only_post(node):
    before = group_state(node)
    status, answer = call(node, {"action": "protect"}, session(node["mine"]), method="GET")
    assert status == 405 and group_state(node) == before, answer


def test_the_handler_file_stands_alone():
    """It is the function's whole code: nothing of the project, boto3 only at call time."""
    import ast
    tree = ast.parse(open(steward.__file__).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "base64", "json", "os", "re", "boto3"}, imported


def test_a_nodes_signed_request_reaches_the_group_through_the_url_for_its_own_instance_only(node, tmp_path):
    """End to end: the node's own scripts (watchdog.steward, in a process of their own, with IMDSv2's
    instance-profile credentials) sign a drain completion; the loopback function URL checks the signature
    and hands the real handler the caller's session; the API completes that instance's hook alone."""
    import subprocess
    import sys

    from tests.fakes import steward as fake
    from tests.fakes.imds import start_imds
    from tests.test_steward_client import CALL, NODE_SCRIPTS, STUB_AWS
    from tests.test_node_metrics import _node_root

    root, bin_dir, value = tmp_path / "root", tmp_path / "bin", tmp_path / "steward-url"
    _node_root(root, "h200-int4-vllm")
    bin_dir.mkdir()
    value.write_text(fake.function_url(REGION))
    (bin_dir / "aws").write_text(STUB_AWS.format(python=sys.executable, calls=str(tmp_path / "aws-calls"),
                                                 value=str(value)))
    (bin_dir / "aws").chmod(0o755)
    hold(node["backend"], GROUP, node["mine"], "Terminating:Wait")
    before = group_state(node)
    verdicts = []
    with start_imds({"instance-id": node["mine"], **fake.instance_metadata(ROLE_NAME)}) as imds, \
            fake.start_steward(REGION, ROLE_NAME, node["mine"], node["client"], ENVIRONMENT, verdicts) as url:
        done = subprocess.run([sys.executable, "-c", CALL, str(NODE_SCRIPTS), "complete-drain", "CONTINUE"],
                              env={**os.environ, "KIMI_ROOT": str(root), "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                   "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds, "KIMI_STEWARD_ENDPOINT": url},
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [(v["authenticated"], v["status"]) for v in verdicts] == [(True, 200)]
    assert group_state(node) == {**before, node["mine"]: ("Terminating:Proceed", False)}
