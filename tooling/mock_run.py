"""Run the real Pulumi program under the SDK's mock runtime and record what it declares.

The mock monitor is given every registration, so we keep each resource's type, name, parent,
inputs (secrets masked), wire form (where secrets show as wrapped values), custom timeouts, retention,
protection, ignored changes and dependencies, and the stack's outputs. Config comes from Pulumi.yaml and the stack file (secure
values stay encrypted: the program sees a marked placeholder through `get_secret`, shown as secret,
never decrypted). `run_components` declares a few components the same way, for tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import runpy
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
from google.protobuf import json_format
from pulumi.runtime import mocks, settings
from pulumi.runtime.sync_await import _sync_await

from kimi_fleet.spec import CONFIG_NAMESPACE
from kimi_fleet.stackfile import PROJECT_ROOT, deploy_time_secrets, StackConfig, load_stack_config, stack_file

PROGRAM = PROJECT_ROOT / "__main__.py"
#: The marker Pulumi's wire format wraps a secret value in: {SECRET_SIG_KEY: SECRET_SIG, "value": ...}.
SECRET_SIG_KEY = "4dabf18193072939515e22adb298388d"
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"
UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"
SECRET_SHOWN = "[secret]"
#: What a secure config value looks like to the program offline.
ENCRYPTED_PLACEHOLDER = "encrypted-in-stack-file"

# What the mocked AWS provider answers with.
ZONES = ["us-east-1a", "us-east-1b"]
#: The zone of a subnet the stack names itself: not one the default lookups give, so it shows when followed.
GIVEN_SUBNET_ZONE = "us-east-1c"
AMI_ID = "ami-0123456789abcdef0"
PUBLIC_IP = "203.0.113.10"
EBS_VOLUME_ID = "vol-0123456789abcdef0"
EIP_ALLOCATION_ID = "eipalloc-0abc"
NLB_DNS_NAME = "kimi-nlb-123.elb.us-east-1.amazonaws.com"
NLB_ZONE_ID = "Z26RNL4JYFTOTI"


@dataclass
class MockRun:
    stack: str
    resources: list[dict] = field(default_factory=list)
    #: the stack's exports (secrets masked unless revealed); for `run_components`, the declared values, resolved
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


#: pulumi.runtime.resource._get_stack_trace as the pinned SDK (pulumi 3.272.0) has it: the SHA-256
#: of its source, and of the helper it calls, which `stack_trace` below does the same as.
SDK_STACK_TRACE_SOURCE_SHA256 = (
    "3943b2273016925109e1c3a7bc603db06a44ea09ff3494c29544e44bccf8dd1f",
    "9f78cc3180b00a12971fa82dd727d6e42aceec087259c9dae4f575a9d85944d2",
)
_FRAME_URIS: dict[str, str | None] = {}
_SDK_STACK_TRACE: list = []


def _frame_uri(filename: str) -> str | None:
    if filename not in _FRAME_URIS:
        try:
            _FRAME_URIS[filename] = Path(filename).as_uri() if filename else None
        except BaseException:  # noqa: BLE001  (the SDK's: a relative or odd name has no position)
            _FRAME_URIS[filename] = None
    return _FRAME_URIS[filename]


def stack_trace():
    """The same StackTrace the SDK's _get_stack_trace builds for every resource registration, without
    its cost: it calls traceback.extract_stack(), which stats every frame's source file and reads its
    line (linecache) only to keep the file name, line number and function name, and converts each
    file name to a URI again. Under the mocks, with pytest's deep stacks, that was ~15% of a stack's
    run. Here: the same frames (file, f_lineno, name; oldest first), the same cut (everything outside
    the third `__init__` from the top: the concrete resource's caller), the same SourcePosition per
    frame (the file's URI and the line; none for a nameless or relative file), each file's URI
    computed once. tests/test_mock_run.py checks it against the SDK's own function."""
    from pulumi.runtime.proto import source_pb2

    if getattr(sys, "tracebacklimit", None) is not None:  # extract_stack would cut the stack by it
        return _SDK_STACK_TRACE[0]()
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()  # oldest first, as extract_stack lists them (this function's own frame is not one)
    seen = 0
    for i in range(len(frames) - 1, -1, -1):
        if frames[i].f_code.co_name == "__init__":
            seen += 1
            if seen == 3:
                break
    else:
        i = 0
    if i < 1:
        return source_pb2.StackTrace()
    out = []
    for frame in reversed(frames[:i]):
        filename, line = frame.f_code.co_filename, frame.f_lineno
        uri = _frame_uri(filename) if line is not None else None
        out.append(source_pb2.StackFrame(pc=None if uri is None else source_pb2.SourcePosition(uri=uri, line=line)))
    return source_pb2.StackTrace(frames=out)


def _sdk_source_sha256() -> tuple[str, str]:
    import inspect

    from pulumi.runtime import resource
    sdk = _SDK_STACK_TRACE[0] if _SDK_STACK_TRACE else resource._get_stack_trace
    return tuple(hashlib.sha256(inspect.getsource(f).encode()).hexdigest()
                 for f in (sdk, resource._get_source_position_for_frame))


def use_fast_stack_trace() -> bool:
    """Register resources with `stack_trace` in place of the SDK's, only while the SDK's function is the
    one it reproduces (its source's digest); True when installed."""
    from pulumi.runtime import resource

    if resource._get_stack_trace is stack_trace:
        return True
    _SDK_STACK_TRACE[:] = [resource._get_stack_trace]
    if _sdk_source_sha256() != SDK_STACK_TRACE_SOURCE_SHA256:
        return False
    resource._get_stack_trace = stack_trace
    return True


use_fast_stack_trace()


def is_secret(node) -> bool:
    """Whether a wire-form value is a secret-wrapped one."""
    return isinstance(node, dict) and node.get(SECRET_SIG_KEY) == SECRET_SIG


def secret_paths(node, path=""):
    """Paths in a wire-form object that hold a secret-wrapped value ("" for the object itself)."""
    if is_secret(node):
        yield path
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from secret_paths(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from secret_paths(value, f"{path}[{index}]")


def unwrap(node, reveal: bool = False):
    """Wire form -> plain values; secrets become {"secret": True, "value": ...} or the mask."""
    if isinstance(node, dict):
        if is_secret(node):
            if reveal:
                return {"secret": True, "value": unwrap(node.get("value"), reveal)}
            return SECRET_SHOWN
        return {key: unwrap(value, reveal) for key, value in node.items()}
    if isinstance(node, list):
        return [unwrap(value, reveal) for value in node]
    if node == UNKNOWN:
        return "(known after apply)"
    return node


def mock_instance_id(name: str) -> str:
    """The id the mocks give an EC2 instance named `name`: EC2's shape (i- and 17 hex digits)."""
    return "i-" + hashlib.sha256(name.encode()).hexdigest()[:17]


def _content_number(value) -> int:
    """A positive number that changes with `value`: stands in for versions the cloud assigns."""
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    return int(digest[:8], 16) % 1_000_000 + 1


def _without_ignored(inputs: dict, ignored: set[str]) -> dict:
    """The inputs without the ignored paths: top-level keys, and `list[*].key` in each item of a list
    (Pulumi's ignoreChanges syntax), as the engine keeps their old values."""
    kept = {k: v for k, v in inputs.items() if k not in ignored}
    for path in ignored:
        name, _, rest = path.partition("[*].")
        if rest and isinstance(kept.get(name), list):
            kept[name] = [{k: v for k, v in item.items() if k != rest} if isinstance(item, dict) else item
                          for item in kept[name]]
    return kept


class EchoMocks(pulumi.runtime.Mocks):
    """Resources echo their inputs and get a stable id, plus the outputs the components read;
    lookups return plausible shapes, and a lookup nobody taught them fails the run."""

    def __init__(self):
        #: resource name -> its ignore_changes, as registered (the monitor fills it before new_resource)
        self.ignored: dict[str, list[str]] = {}

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        state = dict(args.inputs)
        state.setdefault("arn", f"arn:aws:mock:::{args.name}")
        resource_id = f"{args.name}-id"
        if args.typ == "random:index/randomPassword:RandomPassword":
            # Distinct per resource and keepers (a rotated slot gets a new value), letters and digits only.
            length = int(args.inputs.get("length", 16))
            seed = json.dumps([args.name, args.inputs.get("keepers")], sort_keys=True)
            state["result"] = ("mock" + hashlib.sha256(seed.encode()).hexdigest())[:length].ljust(length, "x")
        elif args.typ == "aws:ebs/volume:Volume":
            resource_id = EBS_VOLUME_ID
        elif args.typ == "aws:ec2/eip:Eip":
            state.setdefault("publicIp", PUBLIC_IP)
            state.setdefault("allocationId", EIP_ALLOCATION_ID)
        elif args.typ == "aws:ec2/instance:Instance":
            # EC2's shape (i- and 17 hex digits), distinct per instance: a replica's ranks carry them.
            resource_id = mock_instance_id(args.name)
            state.setdefault("publicIp", PUBLIC_IP)
            # AWS picks the primary address in the subnet: distinct per instance, known only after it exists.
            state.setdefault("privateIp", f"10.0.1.{10 + _content_number(args.name) % 200}")
            state.setdefault("primaryNetworkInterfaceId", f"eni-{args.name}")
        elif args.typ == "aws:ec2/placementGroup:PlacementGroup":
            state.setdefault("name", args.name)
        elif args.typ == "aws:lb/loadBalancer:LoadBalancer":
            state.setdefault("dnsName", NLB_DNS_NAME)
            state.setdefault("zoneId", NLB_ZONE_ID)
        elif args.typ in ("aws:iam/role:Role", "aws:autoscaling/group:Group", "aws:lambda/function:Function",
                          "aws:cloudwatch/logGroup:LogGroup"):
            state.setdefault("name", args.name)  # AWS auto-names these from the resource name
        elif args.typ == "aws:lambda/functionUrl:FunctionUrl":
            # Lambda's shape: https://<url-id>.lambda-url.<region>.on.aws/ (a 32-character id).
            url_id = hashlib.sha256(args.name.encode()).hexdigest()[:32]
            state.setdefault("functionUrl", f"https://{url_id}.lambda-url.us-east-1.on.aws/")
        elif args.typ == "aws:ec2/launchTemplate:LaunchTemplate":
            # AWS numbers each new version; here a changed template gets a different number. An ignored
            # input keeps its old value, so it makes no new version.
            ignored = set(self.ignored.get(args.name, ()))
            state["latestVersion"] = _content_number(_without_ignored(dict(args.inputs), ignored))
        elif args.typ == "aws:ssm/parameter:Parameter":
            state["version"] = _content_number(args.inputs.get("value"))
        elif args.typ == "kubernetes:core/v1:Secret":
            metadata = dict(state.get("metadata") or {})
            metadata["resourceVersion"] = str(_content_number(args.inputs.get("stringData")))
            state["metadata"] = metadata
        return resource_id, state

    def call(self, args: pulumi.runtime.MockCallArgs):
        token = args.token
        if token == "aws:ssm/getParameter:getParameter":
            return {**args.args, "value": AMI_ID, "type": "String"}
        if token == "aws:ec2/getInstanceTypeOfferings:getInstanceTypeOfferings":
            offered = args.args["filters"][0]["values"][0]
            return {"locations": ZONES, "locationTypes": ["availability-zone"] * 2, "instanceTypes": [offered] * 2}
        if token == "aws:ec2/getVpc:getVpc":
            return {"id": "vpc-mock", "cidrBlock": "172.31.0.0/16"}
        if token == "aws:ec2/getSubnets:getSubnets":
            zones = next((f["values"] for f in args.args["filters"] if f["name"] == "availability-zone"), ZONES)
            return {"ids": [f"subnet-{zone[-1]}" for zone in zones]}
        if token == "aws:ec2/getSubnet:getSubnet":
            return {"id": args.args["id"], "availabilityZone": GIVEN_SUBNET_ZONE, "vpcId": "vpc-mock"}
        if token == "aws:index/getAvailabilityZones:getAvailabilityZones":
            return {"names": ZONES, "zoneIds": ["use1-az1", "use1-az2"]}
        if token == "aws:index/getRegion:getRegion":
            return {"name": "us-east-1", "region": "us-east-1"}
        if token == "aws:s3/getBucket:getBucket":  # an adopted mirror: it exists
            return {"bucket": args.args["bucket"], "arn": f"arn:aws:s3:::{args.args['bucket']}", "id": args.args["bucket"]}
        if token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"accountId": "123456789012"}
        raise NotImplementedError(f"the mocks have no answer for invoke {token}")


class RecordingMonitor(mocks.MockMonitor):
    def __init__(self, run: MockRun, mocks_impl: pulumi.runtime.Mocks, reveal: bool):
        super().__init__(mocks_impl)
        self.run, self.reveal = run, reveal
        self.by_urn: dict[str, dict] = {}

    def RegisterResource(self, request):
        if isinstance(self.mocks, EchoMocks):
            self.mocks.ignored[request.name] = list(request.ignoreChanges)
        response = super().RegisterResource(request)
        timeouts = request.customTimeouts
        wire = json_format.MessageToDict(request.object)
        record = {
            "type": request.type,
            "name": request.name,
            "urn": response.urn,
            "id": response.id,
            "parent": self.by_urn.get(request.parent, {}).get("name"),
            "custom": request.custom,
            "inputs": unwrap(wire, self.reveal),
            "wire": wire,
            "dependencies": [self.by_urn.get(u, {}).get("name", u) for u in request.dependencies],
            "timeouts": {k: v for k, v in (("create", timeouts.create), ("update", timeouts.update)) if v},
            "retain_on_delete": request.retainOnDelete,
            # What the engine would do with a change (the replacement plan and the volume policy read them).
            "protect": bool(request.protect),
            "ignore_changes": list(request.ignoreChanges),
            "delete_before_replace": request.deleteBeforeReplace,
            # The names this resource was registered under before (its aliases): the engine moves the
            # old state to it, so a plan diff shows a move, not a removal and an addition.
            "aliases": sorted({a.spec.name or request.name for a in request.aliases if a.HasField("spec")}
                              | {u.rsplit("::", 1)[-1] for u in [*request.aliasURNs,
                                                                 *(a.urn for a in request.aliases if a.urn)]}),
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


def _install_mocks(run: MockRun, reveal: bool) -> None:
    mocks_impl = EchoMocks()
    monitor = RecordingMonitor(run, mocks_impl, reveal)
    mocks.set_mocks(mocks_impl, project="kimi-fleet", stack=run.stack, preview=False, monitor=monitor)
    forget_previous_run()


def forget_previous_run() -> None:
    """What an earlier program left in the process: pending outputs, and the exports on the mock root
    stack (set_mocks keeps the root stack of the first run, so another program would see them)."""
    settings.SETTINGS.rpc_manager.clear()
    settings.SETTINGS.outputs.clear()
    root = settings.get_root_resource()
    if root is not None:
        root.outputs.clear()


def run_components(declare: Callable[[], Mapping[str, Any]], stack: str, *,
                   config: Mapping[str, str] | None = None, secret_keys: Iterable[str] = ()) -> MockRun:
    """Declare some components (not the whole program) under the mocks, with only the given config.

    `declare` returns the values to keep as the run's outputs (Outputs or plain values); they are
    resolved to plain values, secrets included, for tests to check. Errors are raised, not captured.
    """
    run = MockRun(stack)
    pulumi.runtime.set_all_config(dict(config or {}), list(secret_keys))
    _install_mocks(run, reveal=False)

    def declare_and_keep() -> None:
        run.outputs.update(_sync_await(pulumi.Output.all(**declare()).future()))

    _sync_await(mocks.run_pulumi_func(declare_and_keep))
    return run


def run_config(config: StackConfig, *, reveal_secrets: bool = False) -> MockRun:
    """Run the program for one stack config; errors are captured, never raised."""
    run = MockRun(config.stack)
    values = dict(config.pulumi_config)
    secret_keys = list(config.secure_keys)
    for key in config.secure_keys:
        values[key] = ENCRYPTED_PLACEHOLDER
    for name in deploy_time_secrets(config.values.get("target") or {}):
        key = f"{CONFIG_NAMESPACE}:{name}"
        if key not in values:
            run.missing_secrets.append(key)
            values[key] = ENCRYPTED_PLACEHOLDER
            secret_keys.append(key)
    pulumi.runtime.set_all_config(values, secret_keys)
    _install_mocks(run, reveal_secrets)
    try:
        _sync_await(mocks.run_pulumi_func(lambda: run_program(run, reveal_secrets)))
    except Exception as exc:  # the program's own refusal or a bug: reported, not raised
        run.error = str(exc) or type(exc).__name__
    return run


def run_stack(stack: str, *, reveal_secrets: bool = False) -> MockRun:
    return run_config(load_stack_config(stack_file(stack)), reveal_secrets=reveal_secrets)


def run_stack_file(path: Path, *, reveal_secrets: bool = False) -> MockRun:
    return run_config(load_stack_config(path), reveal_secrets=reveal_secrets)
