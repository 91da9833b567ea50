"""The fleet steward: a node's Auto Scaling calls on itself, and only on itself (issue 24).

A Lambda function behind a function URL with AuthType AWS_IAM (components/fleet_steward.py). A fleet
node's role may not complete lifecycle actions or set scale-in protection: IAM has no instance
condition for either, so a role that may do it for itself may do it for every peer of its group (cut
a busy peer's drain, abandon a peer's admission, unprotect a busy peer). The node asks the steward
instead, with a SigV4-signed POST (node_scripts/steward_client.py), and the steward acts on the
caller's own instance, which it learns from AWS, never from the request:
- Lambda puts the signer's identity in the event (requestContext.authorizer.iam.userArn: Lambda
  developer guide, "Invoking Lambda function URLs", request payload format);
- an EC2 instance profile's credentials are a session of the role named for the instance:
  arn:aws:sts::ACCOUNT:assumed-role/ROLE/i-0123456789abcdef0 (the aws:userid of the same session
  is <role id>:<instance id>: IAM user guide, policy variables).
It accepts the stack's node role only (exact name, same account and partition) with a session name
that is an instance id; the instance must be in the stack's group (DescribeAutoScalingInstances) and,
for a lifecycle completion, wait on that hook (Pending:Wait for the admission hook, Terminating:Wait
for the drain hook). Then it does exactly one of:
    {"action": "complete-admission", "result": "CONTINUE" | "ABANDON"}
    {"action": "complete-drain", "result": "CONTINUE"}
    {"action": "protect"} / {"action": "unprotect"}      (its own scale-in protection)
A body with anything else (another key, an instance id, a group) is refused with 400 before any AWS
call; an identity that is not a node of this stack with 403; a state with no such pending action
with 409. Every decision is one log line (CloudWatch Logs, the function's own group).

Shipped alone as the function's code (python3.13 runtime): the standard library and the runtime's
boto3 only, nothing else of the project. Configuration: the function's environment (ENVIRONMENT).
"""

from __future__ import annotations

import base64
import json
import os
import re

#: The function's environment, as components/fleet_steward.py sets it.
ENVIRONMENT = ("KIMI_STEWARD_GROUP", "KIMI_STEWARD_NODE_ROLE_ARN", "KIMI_STEWARD_ADMISSION_HOOK",
               "KIMI_STEWARD_DRAIN_HOOK")
#: What a body may ask: action -> the results it takes (None: no result key).
ACTIONS: dict[str, tuple[str, ...] | None] = {
    "complete-admission": ("CONTINUE", "ABANDON"),
    "complete-drain": ("CONTINUE",),
    "protect": None,
    "unprotect": None,
}
#: The lifecycle state an instance waits in for each hook's completion.
WAITS_IN = {"complete-admission": "Pending:Wait", "complete-drain": "Terminating:Wait"}
#: A body is a few dozen bytes: anything longer is not a request of ours.
MAX_BODY_BYTES = 256
INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")
#: An assumed-role session's ARN (IAM identifiers): partition, account, role name, session name.
SESSION_ARN = re.compile(r"arn:(aws[a-z-]*):sts::(\d{12}):assumed-role/([\w+=,.@-]{1,64})/([\w+=,.@-]{2,64})")
#: The node role's ARN (a path, if any, is not part of a session's ARN).
ROLE_ARN = re.compile(r"arn:(aws[a-z-]*):iam::(\d{12}):role/(?:[\w+=,.@/-]*/)?([\w+=,.@-]{1,64})")


class Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def settings(environ=os.environ) -> dict[str, str]:
    missing = [name for name in ENVIRONMENT if not environ.get(name)]
    if missing:
        raise RuntimeError(f"the steward's environment lacks {', '.join(missing)}")
    return {name: environ[name] for name in ENVIRONMENT}


def caller_instance(event: dict, node_role_arn: str) -> str:
    """The instance id of the caller, from the identity AWS authenticated; Refused(403) for anything but
    a session of the stack's node role named for an instance."""
    role = ROLE_ARN.fullmatch(node_role_arn)
    if role is None:
        raise RuntimeError(f"KIMI_STEWARD_NODE_ROLE_ARN is not a role ARN: {node_role_arn!r}")
    iam = ((event.get("requestContext") or {}).get("authorizer") or {}).get("iam") or {}
    user_arn = iam.get("userArn")
    if not isinstance(user_arn, str) or not user_arn:
        raise Refused(403, "no IAM identity in the request (the function URL's AuthType must be AWS_IAM)")
    session = SESSION_ARN.fullmatch(user_arn)
    if session is None:
        raise Refused(403, f"{user_arn} is not a role session: only the stack's node role may call")
    partition, account, role_name, session_name = session.groups()
    if (partition, account, role_name) != role.groups():
        raise Refused(403, f"{user_arn} is not a session of the stack's node role {node_role_arn}")
    if not INSTANCE_ID.fullmatch(session_name):
        raise Refused(403, f"session name {session_name!r} is not an instance id: not an instance's credentials")
    return session_name


def requested(event: dict) -> tuple[str, str | None]:
    """(action, result) from the body; Refused(400) for anything but one of ACTIONS, exactly."""
    method = ((event.get("requestContext") or {}).get("http") or {}).get("method")
    if method != "POST":
        raise Refused(405, f"method {method!r}: only POST")
    body = event.get("body") or ""
    if not isinstance(body, str):
        raise Refused(400, "the body is not text")
    if event.get("isBase64Encoded"):
        try:
            body = base64.b64decode(body, validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            raise Refused(400, "the body is not base64 of UTF-8 text") from None
    if len(body.encode()) > MAX_BODY_BYTES:
        raise Refused(400, f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        asked = json.loads(body)
    except ValueError:
        raise Refused(400, "the body is not JSON") from None
    if not isinstance(asked, dict):
        raise Refused(400, "the body is not a JSON object")
    action = asked.get("action")
    if not isinstance(action, str) or action not in ACTIONS:
        raise Refused(400, f"action {action!r} is not one of {', '.join(ACTIONS)}")
    results = ACTIONS[action]
    allowed_keys = {"action", "result"} if results else {"action"}
    extra = sorted(set(asked) - allowed_keys)
    if extra:
        raise Refused(400, f"{action} takes only {', '.join(sorted(allowed_keys))}; refused: {', '.join(extra)} "
                           "(the steward acts on the caller's own instance, named by AWS, never by the body)")
    result = asked.get("result")
    if results and result not in results:
        raise Refused(400, f"{action} takes result {' or '.join(results)}, not {result!r}")
    return action, result


def _response(status: int, **fields) -> dict:
    return {"statusCode": status, "headers": {"Content-Type": "application/json"},
            "body": json.dumps({"ok": status == 200, **fields})}


def handle(event: dict, autoscaling, environ=os.environ) -> dict:
    """One request: the function URL's event in, its response out; `autoscaling` a boto3 client."""
    config = settings(environ)
    group = config["KIMI_STEWARD_GROUP"]
    instance = None
    try:
        instance = caller_instance(event, config["KIMI_STEWARD_NODE_ROLE_ARN"])
        action, result = requested(event)
        described = autoscaling.describe_auto_scaling_instances(InstanceIds=[instance]).get("AutoScalingInstances") or []
        if not described or described[0].get("AutoScalingGroupName") != group:
            raise Refused(403, f"{instance} is not an instance of the stack's group {group}")
        state = described[0].get("LifecycleState")
        if action in WAITS_IN:
            hook = config["KIMI_STEWARD_ADMISSION_HOOK" if action == "complete-admission" else "KIMI_STEWARD_DRAIN_HOOK"]
            if state != WAITS_IN[action]:
                raise Refused(409, f"{instance} is {state}, not {WAITS_IN[action]}: no {hook} action pending")
            autoscaling.complete_lifecycle_action(AutoScalingGroupName=group, LifecycleHookName=hook,
                                                  InstanceId=instance, LifecycleActionResult=result)
            done = f"completed {hook} with {result}"
        else:
            autoscaling.set_instance_protection(InstanceIds=[instance], AutoScalingGroupName=group,
                                                ProtectedFromScaleIn=action == "protect")
            done = f"scale-in protection {'on' if action == 'protect' else 'off'}"
    except Refused as refused:
        print(json.dumps({"instance": instance, "refused": refused.status, "reason": refused.reason}))
        return _response(refused.status, reason=refused.reason)
    except Exception as error:  # AWS's refusal (botocore ClientError) or no answer: the node retries
        reason = f"{error.__class__.__name__}: {str(error)[:300]}"
        print(json.dumps({"instance": instance, "failed": reason}))
        return _response(502, reason=reason)
    print(json.dumps({"instance": instance, "group": group, "done": done}))
    return _response(200, instance=instance, group=group, done=done)


_CLIENT: list = []


def handler(event, context):  # noqa: ARG001  (the Lambda entry point: steward.handler)
    if not _CLIENT:
        import boto3  # the runtime's; imported here so the module loads without it
        _CLIENT.append(boto3.client("autoscaling"))
    return handle(event, _CLIENT[0])
