"""FleetSteward: a fleet's Auto Scaling calls on a node's own instance, made for it (issue 24).

A node's role cannot be limited to its own instance for CompleteLifecycleAction or
SetInstanceProtection (no instance condition exists), so it holds neither: it may only call this
stack's steward, a Lambda function behind a function URL with AuthType AWS_IAM
(kimi_fleet/steward.py), which acts on the caller's own instance as AWS authenticated it. What is
declared: the function (its one file), its execution role (those two actions on this group, the
instance lookup, its own log group), the URL, the resource policy (the node role only, through the
URL only) and the SSM parameter a node reads the URL from (node_files.steward_url_parameter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_aws as aws

from kimi_fleet import catalog, steward

#: The handler file, shipped alone (the runtime's boto3 is its only import beyond the standard library).
HANDLER_FILE = Path(steward.__file__)
HANDLER = f"{HANDLER_FILE.stem}.handler"
#: A request is one describe and one Auto Scaling call.
TIMEOUT_SECONDS = 30
MEMORY_MB = 128
#: The steward's decisions (one line each): kept as long as an incident review may need them.
LOG_RETENTION_DAYS = 90


@dataclass
class FleetStewardArgs:
    group_name: pulumi.Input[str]
    group_arn: pulumi.Input[str]
    #: The nodes' instance role: the only caller.
    node_role_arn: pulumi.Input[str]
    admission_hook: str
    drain_hook: str
    #: The SSM parameter a node reads the URL from.
    url_parameter: str
    tags: dict[str, str]


def execution_policy(group_arn: str, log_group_arn: str) -> str:
    """The function's whole policy: the two calls on this group, the lookup (no resource ARN), its logs."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "ActOnCallersInstance", "Effect": "Allow",
         "Action": ["autoscaling:CompleteLifecycleAction", "autoscaling:SetInstanceProtection"], "Resource": group_arn},
        {"Sid": "FindCallersGroup", "Effect": "Allow", "Action": "autoscaling:DescribeAutoScalingInstances",
         "Resource": "*"},
        {"Sid": "OwnLogs", "Effect": "Allow", "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
         "Resource": f"{log_group_arn}:log-stream:*"}]})


class FleetSteward(pulumi.ComponentResource):
    function_arn: pulumi.Output[str]
    url: pulumi.Output[str]

    def __init__(self, name: str, args: FleetStewardArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:aws:FleetSteward", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        role = aws.iam.Role(
            f"{name}-role", tags=args.tags, opts=child,
            assume_role_policy=json.dumps({"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Action": "sts:AssumeRole", "Principal": {"Service": "lambda.amazonaws.com"}}]}))
        logs = aws.cloudwatch.LogGroup(f"{name}-logs", retention_in_days=LOG_RETENTION_DAYS, tags=args.tags,
                                       opts=child)
        policy = aws.iam.RolePolicy(
            f"{name}-policy", role=role.id, opts=child,
            policy=pulumi.Output.all(args.group_arn, logs.arn).apply(lambda arns: execution_policy(*arns)))
        function = aws.lambda_.Function(
            f"{name}-function", role=role.arn, runtime=catalog.STEWARD_RUNTIME, handler=HANDLER,
            # Its text, not its path: the same code is the same archive wherever the program runs.
            code=pulumi.AssetArchive({HANDLER_FILE.name: pulumi.StringAsset(HANDLER_FILE.read_text())}),
            timeout=TIMEOUT_SECONDS, memory_size=MEMORY_MB,
            environment=aws.lambda_.FunctionEnvironmentArgs(variables={
                "KIMI_STEWARD_GROUP": args.group_name, "KIMI_STEWARD_NODE_ROLE_ARN": args.node_role_arn,
                "KIMI_STEWARD_ADMISSION_HOOK": args.admission_hook, "KIMI_STEWARD_DRAIN_HOOK": args.drain_hook}),
            logging_config=aws.lambda_.FunctionLoggingConfigArgs(log_format="Text", log_group=logs.name),
            tags=args.tags,
            # Its permissions (and its log group) exist before its first call.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[policy]))
        url = aws.lambda_.FunctionUrl(f"{name}-url", function_name=function.name, authorization_type="AWS_IAM",
                                      opts=child)
        # The node role only, and only through the URL with IAM auth (both actions: the October 2025 rule).
        aws.lambda_.Permission(f"{name}-invoke-url", function=function.name, action="lambda:InvokeFunctionUrl",
                               principal=args.node_role_arn, function_url_auth_type="AWS_IAM", opts=child)
        aws.lambda_.Permission(f"{name}-invoke", function=function.name, action="lambda:InvokeFunction",
                               principal=args.node_role_arn, invoked_via_function_url=True, opts=child)
        aws.ssm.Parameter(f"{name}-url-parameter", name=args.url_parameter, type="String",
                          value=url.function_url, tags=args.tags, opts=child)
        self.function_arn = function.arn
        self.url = url.function_url
        self.register_outputs({"function_arn": self.function_arn, "url": self.url})
