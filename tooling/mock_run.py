"""Run the real Pulumi program under the SDK's mock runtime and record what it declares.

The mock monitor is given every registration, so we keep each resource's type, name, parent,
inputs (secrets masked), custom timeouts and dependencies, and the stack's outputs. Config comes
from Pulumi.yaml and the stack file (secure values stay encrypted: the program sees a marked
placeholder through `get_secret`, shown as secret, never decrypted).
"""

from __future__ import annotations

import logging
import runpy
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pulumi
from google.protobuf import json_format
from pulumi.runtime import mocks, settings
from pulumi.runtime.sync_await import _sync_await

from kimi_fleet.spec import CONFIG_NAMESPACE
from kimi_fleet.stackfile import DEPLOY_TIME_SECRETS, PROJECT_ROOT, StackConfig, load_stack_config, stack_file

PROGRAM = PROJECT_ROOT / "__main__.py"
SECRET_SIG_KEY = "4dabf18193072939515e22adb298388d"
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"
UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"
SECRET_SHOWN = "[secret]"
#: What a secure config value looks like to the program offline.
ENCRYPTED_PLACEHOLDER = "encrypted-in-stack-file"


@dataclass
class MockRun:
    stack: str
    resources: list[dict] = field(default_factory=list)
    outputs: dict = field(default_factory=dict)
    error: str | None = None
    #: secrets the target needs that the stack file does not hold yet (placeholders were used)
    missing_secrets: list[str] = field(default_factory=list)

    def of_type(self, typ: str) -> list[dict]:
        return [r for r in self.resources if r["type"] == typ]

    def named(self, name: str) -> dict:
        return next(r for r in self.resources if r["name"] == name)


def _quiet_closed_loops(unraisable) -> None:
    """Each mock run leaves an event loop whose late finalizer trips on a closed fd: not ours to report."""
    if not (isinstance(unraisable.exc_value, ValueError) and "file descriptor" in str(unraisable.exc_value)):
        sys.__unraisablehook__(unraisable)


sys.unraisablehook = _quiet_closed_loops
# A failed run leaves futures nobody awaits; the failure itself is reported in MockRun.error.
logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def unwrap(node, reveal: bool = False):
    """Wire form -> plain values; secrets become {"secret": True, "value": ...} or the mask."""
    if isinstance(node, dict):
        if node.get(SECRET_SIG_KEY) == SECRET_SIG:
            if reveal:
                return {"secret": True, "value": unwrap(node.get("value"), reveal)}
            return SECRET_SHOWN
        return {key: unwrap(value, reveal) for key, value in node.items()}
    if isinstance(node, list):
        return [unwrap(value, reveal) for value in node]
    if node == UNKNOWN:
        return "(known after apply)"
    return node


class EchoMocks(pulumi.runtime.Mocks):
    """Resources echo their inputs and get a stable id; lookups return plausible shapes."""

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        state = dict(args.inputs)
        if args.typ == "random:index/randomPassword:RandomPassword":
            state["result"] = "mock" + "x" * (int(args.inputs.get("length", 16)) - 4)
        if args.typ in ("aws:ec2/eip:Eip", "aws:ec2/instance:Instance"):
            state.setdefault("publicIp", "203.0.113.10")
        if args.typ == "aws:lb/loadBalancer:LoadBalancer":
            state.setdefault("dnsName", f"{args.name}.elb.amazonaws.com")
        state.setdefault("arn", f"arn:aws:mock:::{args.name}")
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs):
        token = args.token
        if token == "aws:ssm/getParameter:getParameter":
            return {**args.args, "value": "ami-0123456789abcdef0", "type": "String"}
        if token == "aws:ec2/getInstanceTypeOfferings:getInstanceTypeOfferings":
            offered = args.args["filters"][0]["values"][0]
            return {"locations": ["us-east-1a", "us-east-1b"], "locationTypes": ["availability-zone"] * 2,
                    "instanceTypes": [offered] * 2}
        if token == "aws:ec2/getVpc:getVpc":
            return {"id": "vpc-mock", "cidrBlock": "172.31.0.0/16"}
        if token == "aws:ec2/getSubnets:getSubnets":
            return {"ids": ["subnet-mock-a", "subnet-mock-b"]}
        if token == "aws:ec2/getSubnet:getSubnet":
            return {"id": args.args.get("id", "subnet-mock-a"), "availabilityZone": "us-east-1a"}
        if token == "aws:index/getAvailabilityZones:getAvailabilityZones":
            return {"names": ["us-east-1a", "us-east-1b"], "zoneIds": ["use1-az1", "use1-az2"]}
        if token == "aws:index/getRegion:getRegion":
            return {"name": "us-east-1", "region": "us-east-1"}
        if token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"accountId": "123456789012"}
        return dict(args.args)


class RecordingMonitor(mocks.MockMonitor):
    def __init__(self, run: MockRun, mocks_impl: pulumi.runtime.Mocks, reveal: bool):
        super().__init__(mocks_impl)
        self.run, self.reveal = run, reveal
        self.by_urn: dict[str, dict] = {}

    def RegisterResource(self, request):
        response = super().RegisterResource(request)
        timeouts = request.customTimeouts
        record = {
            "type": request.type,
            "name": request.name,
            "urn": response.urn,
            "parent": self.by_urn.get(request.parent, {}).get("name"),
            "custom": request.custom,
            "inputs": unwrap(json_format.MessageToDict(request.object), self.reveal),
            "dependencies": [self.by_urn.get(u, {}).get("name", u) for u in request.dependencies],
            "timeouts": {k: v for k, v in (("create", timeouts.create), ("update", timeouts.update)) if v},
        }
        self.by_urn[response.urn] = record
        if request.type != "pulumi:pulumi:Stack":
            self.run.resources.append(record)
        return response



async def collect_outputs(run: MockRun, reveal: bool) -> None:
    """The mock root stack registers its outputs before the program runs: read the exports directly."""
    root = settings.get_root_resource()
    for name, value in dict(root.outputs).items():
        output = pulumi.Output.from_input(value)
        plain, secret = await output.future(), await output.is_secret()
        if secret:
            plain = {"secret": True, "value": plain} if reveal else SECRET_SHOWN
        run.outputs[name] = plain


def run_program(run: MockRun, reveal: bool) -> None:
    runpy.run_path(str(PROGRAM), run_name="__pulumi_program__")
    _sync_await(collect_outputs(run, reveal))


def run_config(config: StackConfig, *, reveal_secrets: bool = False) -> MockRun:
    """Run the program for one stack config; errors are captured, never raised."""
    run = MockRun(config.stack)
    values = dict(config.pulumi_config)
    secret_keys = list(config.secure_keys)
    for key in config.secure_keys:
        values[key] = ENCRYPTED_PLACEHOLDER
    target_kind = (config.values.get("target") or {}).get("kind")
    for name in DEPLOY_TIME_SECRETS.get(target_kind, ()):
        key = f"{CONFIG_NAMESPACE}:{name}"
        if key not in values:
            run.missing_secrets.append(key)
            values[key] = ENCRYPTED_PLACEHOLDER
            secret_keys.append(key)
    pulumi.runtime.set_all_config(values, secret_keys)
    mocks_impl = EchoMocks()
    monitor = RecordingMonitor(run, mocks_impl, reveal_secrets)
    mocks.set_mocks(mocks_impl, project="kimi-fleet", stack=config.stack, preview=False, monitor=monitor)
    settings.SETTINGS.rpc_manager.clear()
    settings.SETTINGS.outputs.clear()
    try:
        _sync_await(mocks.run_pulumi_func(lambda: run_program(run, reveal_secrets)))
    except Exception as exc:  # the program's own refusal or a bug: reported, not raised
        run.error = str(exc) or type(exc).__name__
    return run


def run_stack(stack: str, *, reveal_secrets: bool = False) -> MockRun:
    return run_config(load_stack_config(stack_file(stack)), reveal_secrets=reveal_secrets)


def run_stack_file(path: Path, *, reveal_secrets: bool = False) -> MockRun:
    return run_config(load_stack_config(path), reveal_secrets=reveal_secrets)
