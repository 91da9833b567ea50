"""Check what the program registers for an AWS resource against the provider's schema, as the mocks
record it (camelCase inputs, numbers as floats, unknowns and secrets masked).

Two layers:
- the shape, from the pulumi_aws SDK the program runs (7.51.1): its input types are generated from
  the provider's schema, so each resource's Args class and each nested *Args class carry exactly the
  schema's property names (pulumi.getter(name=...)), their types and which are required. An unknown
  or misspelt property, a missing required one, a scalar where an object belongs, or a string where
  a number belongs is an error here, as it is for the engine's Check.
- the values AWS accepts where the schema says only "string" or "integer": VALUES below, each row
  with the API reference it comes from (the provider passes these through; AWS refuses them at
  create time, after the GPUs may already be billed).
"""

from __future__ import annotations

import collections.abc
import enum
import importlib
import keyword
import typing

import pulumi
import pulumi._types as pulumi_types
from pulumi.runtime import rpc as rpc_settings
from pulumi.output import Output

#: The wire signatures of an archive and an asset (pulumi.runtime.rpc).
_ARCHIVE_SIG, _ASSET_SIG = rpc_settings._special_archive_sig, rpc_settings._special_asset_sig
#: What the mock recorder shows in place of a value it cannot show (tooling/mock_run.py).
_MASKED = ("(known after apply)", "[secret]")

#: (type token, input path) -> (allowed values or an inclusive (low, high) range, source).
#: A path's `[]` is every item of a list.
VALUES: dict[tuple[str, str], tuple[object, str]] = {
    ("aws:cloudwatch/metricAlarm:MetricAlarm", "comparisonOperator"): (
        {"GreaterThanOrEqualToThreshold", "GreaterThanThreshold", "LessThanThreshold", "LessThanOrEqualToThreshold",
         "LessThanLowerOrGreaterThanUpperThreshold", "LessThanLowerThreshold", "GreaterThanUpperThreshold"},
        "CloudWatch API reference, PutMetricAlarm: ComparisonOperator"),
    ("aws:cloudwatch/metricAlarm:MetricAlarm", "statistic"): (
        {"SampleCount", "Average", "Sum", "Minimum", "Maximum"}, "PutMetricAlarm: Statistic"),
    ("aws:cloudwatch/metricAlarm:MetricAlarm", "treatMissingData"): (
        {"breaching", "notBreaching", "ignore", "missing"}, "PutMetricAlarm: TreatMissingData"),
    ("aws:cloudwatch/metricAlarm:MetricAlarm", "evaluationPeriods"): ((1, 100_000), "PutMetricAlarm: minimum 1"),
    ("aws:cloudwatch/metricAlarm:MetricAlarm", "datapointsToAlarm"): ((1, 100_000), "PutMetricAlarm: minimum 1"),
    ("aws:cloudwatch/metricAlarm:MetricAlarm", "metricQueries[].metric.stat"): (
        {"SampleCount", "Average", "Sum", "Minimum", "Maximum"}, "MetricStat: Stat (the plain statistics)"),
    ("aws:cloudwatch/metricAlarm:MetricAlarm", "name"): (
        (1, 255), "PutMetricAlarm: AlarmName, length 1-255"),
    ("aws:cloudwatch/dashboard:Dashboard", "dashboardName"): (
        (1, 255), "PutDashboard: DashboardName, length 1-255 (letters, digits, - and _)"),
    ("aws:autoscaling/lifecycleHook:LifecycleHook", "lifecycleTransition"): (
        {"autoscaling:EC2_INSTANCE_LAUNCHING", "autoscaling:EC2_INSTANCE_TERMINATING"},
        "EC2 Auto Scaling API reference, PutLifecycleHook: LifecycleTransition"),
    ("aws:autoscaling/lifecycleHook:LifecycleHook", "defaultResult"): (
        {"CONTINUE", "ABANDON"}, "PutLifecycleHook: DefaultResult"),
    ("aws:autoscaling/lifecycleHook:LifecycleHook", "heartbeatTimeout"): (
        (30, 7200), "PutLifecycleHook: HeartbeatTimeout, 30 to 7200 seconds"),
    ("aws:autoscaling/policy:Policy", "policyType"): (
        {"SimpleScaling", "StepScaling", "TargetTrackingScaling", "PredictiveScaling"},
        "PutScalingPolicy: PolicyType"),
    ("aws:autoscaling/policy:Policy", "targetTrackingConfiguration.customizedMetricSpecification.statistic"): (
        {"Average", "Minimum", "Maximum", "SampleCount", "Sum"}, "CustomizedMetricSpecification: Statistic"),
    ("aws:autoscaling/group:Group", "enabledMetrics[]"): (
        {"GroupMinSize", "GroupMaxSize", "GroupDesiredCapacity", "GroupInServiceInstances", "GroupPendingInstances",
         "GroupStandbyInstances", "GroupTerminatingInstances", "GroupTotalInstances", "GroupInServiceCapacity",
         "GroupPendingCapacity", "GroupStandbyCapacity", "GroupTerminatingCapacity", "GroupTotalCapacity",
         "WarmPoolDesiredCapacity", "WarmPoolWarmedCapacity", "WarmPoolPendingCapacity",
         "WarmPoolTerminatingCapacity", "WarmPoolTotalCapacity", "GroupAndWarmPoolDesiredCapacity",
         "GroupAndWarmPoolTotalCapacity"},
        "EC2 Auto Scaling API reference, EnableMetricsCollection: Metrics"),
}


def args_class(token: str) -> type:
    """The SDK's Args class of a resource type token (aws:cloudwatch/metricAlarm:MetricAlarm)."""
    _, module_path, name = token.split(":")
    module_name = module_path.split("/")[0]
    # A module named for a Python keyword is the SDK's <name>_ (aws:lambda/function:Function: pulumi_aws.lambda_).
    package = importlib.import_module(f"pulumi_aws.{module_name}{'_' if keyword.iskeyword(module_name) else ''}")
    # From the resource's own module; where a nested input type has the name <Name>Args (s3's Bucket
    # input BucketServerSideEncryptionConfigurationArgs), the SDK calls the resource's <Name>InitArgs.
    module = importlib.import_module(getattr(package, name).__module__)
    return getattr(module, f"{name}InitArgs", None) or getattr(module, f"{name}Args")


def _unwrap(hint) -> list:
    """The concrete types an input hint allows (Input[Optional[X]] is a Union of X, Awaitable[X], Output)."""
    if typing.get_origin(hint) is typing.Union:
        found = []
        for arg in typing.get_args(hint):
            if arg is type(None) or typing.get_origin(arg) is collections.abc.Awaitable:
                continue
            if arg is Output or typing.get_origin(arg) is Output:
                continue
            found += _unwrap(arg)
        return found
    return [hint]


def _check(value, hint, path: str, errors: list[str]) -> None:
    if value is None or (isinstance(value, str) and value in _MASKED):
        return
    allowed = _unwrap(hint)
    for typ in allowed:
        origin = typing.get_origin(typ)
        if origin in (collections.abc.Sequence, list) and isinstance(value, list):
            (item,) = typing.get_args(typ) or (typing.Any,)
            for i, element in enumerate(value):
                _check(element, item, f"{path}[{i}]", errors)
            return
        if origin in (collections.abc.Mapping, dict) and isinstance(value, dict):
            return
        if isinstance(typ, type) and pulumi_types.is_input_type(typ) and isinstance(value, dict):
            errors += object_errors(typ, value, path)
            return
        if isinstance(typ, type) and issubclass(typ, enum.Enum) and isinstance(value, str):
            if value in {member.value for member in typ}:
                return
            continue
        if typ is str and isinstance(value, str):
            return
        if typ is bool and isinstance(value, bool):
            return
        if typ is int and isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
            return
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if typ is typing.Any:
            return
        # An asset or archive, as the engine receives it: the special signature key and its kind.
        if isinstance(typ, type) and issubclass(typ, (pulumi.Archive, pulumi.Asset)) and isinstance(value, dict):
            kind = _ARCHIVE_SIG if issubclass(typ, pulumi.Archive) else _ASSET_SIG
            if value.get(rpc_settings._special_sig_key) == kind:
                return
    names = [getattr(t, "__name__", str(t)) for t in allowed]
    errors.append(f"{path}: {value!r} is not {' or '.join(names)}")


def object_errors(cls: type, inputs: dict, path: str = "") -> list[str]:
    """Errors of `inputs` (camelCase, as registered) against an SDK input type."""
    errors: list[str] = []
    types = pulumi_types.input_type_types(cls)
    for key, value in inputs.items():
        where = f"{path}.{key}" if path else key
        if key not in types:
            errors.append(f"{where}: not a property of {cls.__name__} (known: {', '.join(sorted(types))})")
            continue
        _check(value, types[key], where, errors)
    required = getattr(pulumi_types, "_required_property_names", lambda c: frozenset())(cls)
    for key in sorted(required - set(k for k, v in inputs.items() if v is not None)):
        errors.append(f"{path + '.' if path else ''}{key}: required by {cls.__name__}, not set")
    return errors


def _at(inputs: dict, path: str) -> list:
    """The values at `path` (a.b, a[].b) in registered inputs; [] where absent."""
    values = [inputs]
    for part in path.split("."):
        each = part.endswith("[]")
        key = part.removesuffix("[]")
        nxt = []
        for value in values:
            if isinstance(value, dict) and value.get(key) is not None:
                got = value[key]
                nxt += got if each and isinstance(got, list) else [got]
        values = nxt
    return values


def value_errors(token: str, inputs: dict) -> list[str]:
    errors = []
    for (typ, path), (allowed, source) in VALUES.items():
        if typ != token:
            continue
        for value in _at(inputs, path):
            if isinstance(value, str) and value in _MASKED:
                continue
            if isinstance(allowed, tuple):
                low, high = allowed
                measure = len(value) if isinstance(value, str) else value
                if not low <= measure <= high:
                    errors.append(f"{path}: {value!r} outside {low}-{high} ({source})")
            elif value not in allowed:
                errors.append(f"{path}: {value!r} not one of AWS's values ({source})")
    return errors


def schema_errors(token: str, inputs: dict) -> list[str]:
    """Everything wrong with one registration's inputs: its shape against the provider schema (the
    SDK's types), then the values AWS accepts."""
    return object_errors(args_class(token), inputs) + value_errors(token, inputs)
