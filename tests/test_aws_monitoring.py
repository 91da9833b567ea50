"""Issue 24 on AWS, under the mocks: the dashboard, the alarms, the scaling policy, the drain hook and
the node's IAM, as the whole program declares them for every AWS stack and for scaling variants of
them (stack files written here: no stack in stacks/ scales yet).

Each registration is checked against the provider schema (tooling/aws_schema.py: the pulumi_aws
SDK's generated input types, plus the values AWS's API references allow); alarm thresholds against
observability.alert_rules; the dashboard's metric names against what the node's publisher puts;
changes of a threshold or of the scaling range against the replace-on-change table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kimi_fleet import cloudwatch, lifecycle_rights, node_files, observability
from kimi_fleet.autoscaling import scaling_policy
from kimi_fleet.cost import estimate
from kimi_fleet.replacement import replacements
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.spec import ScalingSpec
from kimi_fleet.stackfile import load_stack_config, stack_file
from tests.test_replacement import plan_resources
from tests.test_rollout import _document
from tooling.aws_schema import object_errors, schema_errors
from tooling.mock_run import run_config, run_stack

AWS_STACKS = ["h200-int4-sglang", "h200-int4-vllm", "b200-nvfp4-vllm", "b300-int4-sglang", "h100-int4-vllm"]
ALARM = "aws:cloudwatch/metricAlarm:MetricAlarm"
DASHBOARD = "aws:cloudwatch/dashboard:Dashboard"
GROUP = "aws:autoscaling/group:Group"
POLICY = "aws:autoscaling/policy:Policy"
HOOK = "aws:autoscaling/lifecycleHook:LifecycleHook"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
INSTANCE = "aws:ec2/instance:Instance"
#: The fleet stack the scaling variants start from (batch, spot, an on-demand base of 1).
FLEET = "b300-int4-sglang"


def spec_of(path_or_stack) -> Resolved:
    path = path_or_stack if isinstance(path_or_stack, Path) else stack_file(path_or_stack)
    return Resolved(load_stack_config(path).spec())


def variant(stack: str, tmp_path: Path, name: str, change) -> tuple[Path, object]:
    """The stack file changed by `change(config)` in its own directory, and the program's run of it."""
    document = _document(stack)
    change(document["config"])
    directory = tmp_path / name
    directory.mkdir()
    path = directory / f"Pulumi.{stack}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(document))
    return path, run_config(load_stack_config(path))


def scaling(**values):
    def change(config):
        capacity = config.setdefault("kimi-fleet:capacity", {})
        capacity["scaling"] = values
    return change


@pytest.fixture(scope="module", params=AWS_STACKS)
def declared(request):
    run = run_stack(request.param)
    assert run.error is None, run.error
    return request.param, run


# --- the provider schema -----------------------------------------------------------------------

def test_every_aws_registration_validates_against_the_provider_schema(declared):
    stack, run = declared
    checked = 0
    for resource in run.resources:
        if resource["custom"] and resource["type"].startswith("aws:") and not resource["type"].startswith(
                "pulumi:providers"):
            assert schema_errors(resource["type"], resource["inputs"]) == [], (stack, resource["name"])
            checked += 1
    kinds = {r["type"] for r in run.resources}
    assert {ALARM, DASHBOARD, "aws:sns/topic:Topic"} <= kinds and checked > 20


def test_the_schema_check_fails_on_what_the_engine_would_refuse():
    import pulumi_aws as aws

    good = {"comparisonOperator": "GreaterThanThreshold", "evaluationPeriods": 5.0, "threshold": 1.0,
            "metricName": "KvCacheUsage", "namespace": f"KimiFleet/{FLEET}", "period": 60.0, "statistic": "Maximum",
            "treatMissingData": "notBreaching", "dimensions": {"Stack": "x"}}
    assert schema_errors(ALARM, good) == []
    assert any("not a property" in e for e in schema_errors(ALARM, {**good, "evaluationPeriod": 5.0}))
    assert any("is not int" in e for e in schema_errors(ALARM, {**good, "evaluationPeriods": 2.5}))
    assert any("AWS's values" in e for e in schema_errors(ALARM, {**good, "treatMissingData": "NotBreaching"}))
    assert any("AWS's values" in e for e in schema_errors(ALARM, {**good, "statistic": "p99"}))
    hook = {"autoscalingGroupName": "g", "lifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
            "name": "kimi-drain", "heartbeatTimeout": 7201.0, "defaultResult": "CONTINUE"}
    assert any("outside 30-7200" in e for e in schema_errors(HOOK, hook))
    policy = {"autoscalingGroupName": "g", "policyType": "TargetTrackingScaling",
              "targetTrackingConfiguration": {"targetValue": 4.0, "customizedMetricSpecification": {
                  "metricName": "RequestsWaiting", "namespace": f"KimiFleet/{FLEET}", "statistic": "Average",
                  "metricDimension": [{"name": "Stack", "value": "x"}]}}}
    (error,) = schema_errors(POLICY, policy)  # the nested type's own property names
    assert "targetTrackingConfiguration.customizedMetricSpecification.metricDimension: not a property" in error
    assert schema_errors(POLICY, {"policyType": "TargetTrackingScaling"}) == [
        "autoscalingGroupName: required by PolicyArgs, not set"]
    assert object_errors(aws.autoscaling.GroupArgs, {"maxSize": 2.0, "minSize": 1.0,
                                                     "enabledMetrics": ["GroupInService"]})


# --- alarms --------------------------------------------------------------------------------------

def _alarms_by_rule(run, stack: str) -> dict[str, dict]:
    prefix = f"kimi-fleet-{stack}-"
    return {a["inputs"]["name"].removeprefix(prefix): a["inputs"] for a in run.of_type(ALARM)}


def _alarm_metric(inputs: dict) -> tuple[str, str, int]:
    if "metricQueries" in inputs:
        (metric,) = [q["metric"] for q in inputs["metricQueries"] if "metric" in q]
        return metric["metricName"], metric["stat"], int(metric["period"])
    return inputs["metricName"], inputs["statistic"], int(inputs["period"])


def _check_alarms_follow_the_rules(run, r: Resolved) -> None:
    stack = r.spec.stack
    alarms = _alarms_by_rule(run, stack)
    rules = {rule.name: rule for rule in observability.alert_rules(r.spec)}
    assert set(alarms) == set(rules) == set(observability.ALERT_NAMES)
    topic = next(t for t in run.resources if t["type"] == "aws:sns/topic:Topic")
    for name, rule in rules.items():
        alarm, twin = alarms[name], rule.cloudwatch
        # The Prometheus rule's threshold, the twin's, the alarm's: one number.
        assert alarm["threshold"] == twin.threshold == rule.threshold, name
        assert alarm["comparisonOperator"] == twin.comparison
        assert _alarm_metric(alarm) == (twin.metric, twin.statistic, twin.period_seconds)
        assert alarm["evaluationPeriods"] == alarm["datapointsToAlarm"] == twin.evaluation_periods
        assert alarm["treatMissingData"] == cloudwatch.MISSING_DATA[name][0]
        dimensions = alarm.get("dimensions") or next(q["metric"]["dimensions"] for q in alarm["metricQueries"]
                                                     if "metric" in q)
        assert dimensions == {observability.STACK_DIMENSION: stack}
        assert alarm["alarmActions"] == alarm["okActions"] == [f"arn:aws:mock:::{topic['name']}"]
        if twin.expression:
            (expression,) = [q for q in alarm["metricQueries"] if q.get("expression")]
            assert expression["expression"] == twin.expression and expression["returnData"] is True


def test_alarm_thresholds_are_the_prometheus_rules(declared):
    stack, run = declared
    _check_alarms_follow_the_rules(run, spec_of(stack))


def test_alarms_follow_the_stacks_monitoring_settings(tmp_path):
    settings = {"ttftP99Seconds": 4.5, "kvCacheFullRatio": 0.9, "errorRatio": 0.02, "unauthorizedPerSecond": 3,
                "queueGrowingMinutes": 20, "stalledMinutes": 3}
    path, run = variant("h200-int4-sglang", tmp_path, "monitoring",
                        lambda config: config.__setitem__("kimi-fleet:monitoring", settings))
    assert run.error is None, run.error
    r = spec_of(path)
    _check_alarms_follow_the_rules(run, r)
    alarms = _alarms_by_rule(run, r.spec.stack)
    assert alarms["KimiTtftAboveObjective"]["threshold"] == 4.5
    assert alarms["KimiKvCacheNearFull"]["threshold"] == 0.9
    assert alarms["KimiEngineStalled"]["evaluationPeriods"] == 3


def test_every_alert_has_a_missing_data_choice_with_a_reason():
    assert set(cloudwatch.MISSING_DATA) == set(observability.ALERT_NAMES)
    for value, reason in cloudwatch.MISSING_DATA.values():
        assert value in cloudwatch.TREAT_MISSING and len(reason) > 20


# --- the dashboard ---------------------------------------------------------------------------------

def published_metric_names() -> set[str]:
    """Every metric name the node's publisher puts, from its own metrics() on two full scrapes."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "kimi_fleet/node_scripts/metrics_publisher.py"
    spec = importlib.util.spec_from_file_location("metrics_publisher_under_test", path)
    publisher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(publisher)

    def scrape(tokens: float, observations: float, requests: float) -> dict:
        buckets = {"0.5": observations / 2, "1.0": observations, "+Inf": observations}
        gpu = {"utilization": [["0", 90.0]], "memory_used": [["0", 70.0]], "memory_free": [["0", 10.0]],
               "power": [["0", 600.0]], "xid_count": [["0", 0.0]]}
        return {"engines": {"generated": tokens, "running": 3.0, "waiting": 2.0, "kv": 0.5,
                            "ttft": buckets, "itl": buckets},
                "proxy": {"200": requests, "401": 1.0, "502": 1.0}, "gpu": gpu,
                "node": {"admitted": 1.0, "gate_passed": 1.0}}

    return set(publisher.metrics(scrape(2000.0, 20.0, 100.0), scrape(1000.0, 10.0, 50.0), 60.0))


def _dashboard(run) -> dict:
    (dashboard,) = run.of_type(DASHBOARD)
    return dashboard["inputs"]


def test_the_dashboard_is_valid_and_names_only_published_metrics(declared):
    stack, run = declared
    r = spec_of(stack)
    inputs = _dashboard(run)
    assert inputs["dashboardName"] == f"kimi-fleet-{stack}"
    body = json.loads(inputs["dashboardBody"])
    published = published_metric_names()
    assert {"RequestsWaiting", "TtftP99Seconds", "GpuXidErrors", "NodeAdmitted"} <= published
    group = run.of_type(GROUP)
    enabled = set(group[0]["inputs"]["enabledMetrics"]) if group else set()
    titles = []
    for widget in body["widgets"]:
        assert widget["type"] in ("metric", "text")
        assert 0 <= widget["x"] and widget["x"] + widget["width"] <= 24 and widget["height"] > 0
        if widget["type"] == "text":
            assert widget["properties"]["markdown"]
            continue
        properties = widget["properties"]
        titles.append(properties["title"])
        assert properties["region"] == r.spec.target.aws.region and properties["period"] == 60
        assert properties["stat"] in cloudwatch.STATISTICS
        ids = []
        for row in properties["metrics"]:
            if isinstance(row[0], dict):  # an expression row: one line per replica
                (expression,) = row
                ids.append(expression["id"])
                assert re.fullmatch(r"[a-z][a-zA-Z0-9_]*", expression["id"])
                found = re.fullmatch(r"SEARCH\('\{\"KimiFleet/([^\"]+)\",Stack,Replica\} Stack=\"([^\"]+)\" "
                                     r"MetricName=\"(\w+)\"', '(\w+)', 60\)", expression["expression"])
                assert found and found.group(1) == found.group(2) == stack and found.group(3) in published, expression
                continue
            namespace, metric, dimension, value, options = row
            if namespace == observability.cloudwatch_namespace(stack):
                assert (dimension, value) == (observability.STACK_DIMENSION, stack)
                assert metric in published, metric
            else:  # the group's own metrics, only those the group collects
                assert (namespace, dimension) == ("AWS/AutoScaling", "AutoScalingGroupName")
                assert metric in enabled and value == group[0]["name"]
            assert options.get("stat", properties["stat"]) in cloudwatch.STATISTICS
        assert len(ids) == len(set(ids))
    panels = [p.title for p in observability.DASHBOARD_PANELS if p.cloudwatch_metrics]
    assert titles[:len(panels)] == panels
    assert titles[len(panels):] == (["Replicas (Auto Scaling group)"] if group else [])


def test_the_outputs_point_at_the_dashboard_and_the_metrics(declared):
    stack, run = declared
    region = spec_of(stack).spec.target.aws.region
    assert run.outputs["dashboard_url"] == (
        f"https://{region}.console.aws.amazon.com/cloudwatch/home?region={region}"
        f"#dashboards/dashboard/{_dashboard(run)['dashboardName']}")
    assert run.outputs["metrics_location"] == f"cloudwatch://KimiFleet/{stack}?Stack={stack}"
    assert run.outputs["alarm_topic_arn"].startswith("arn:")


# --- the node's IAM ------------------------------------------------------------------------------------

def _statements(run) -> list[dict]:
    found = []
    for policy in run.of_type(ROLE_POLICY):
        # The node role's own policies (the steward caller's under its own name: lifecycle_rights.py).
        if policy["name"].endswith(("-node", lifecycle_rights.STEWARD_CALLER_SUFFIX, lifecycle_rights.RETIRED_POLICY_SUFFIX)):
            found += json.loads(policy["inputs"]["policy"])["Statement"]
    return found


def _actions(statement) -> list[str]:
    return [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]


def test_nodes_put_metrics_only_in_the_stacks_namespace(declared):
    stack, run = declared
    metrics = [s for s in _statements(run) if any(a.startswith("cloudwatch:") for a in _actions(s))]
    assert metrics, stack
    for statement in metrics:
        assert _actions(statement) == ["cloudwatch:PutMetricData"]
        # The stack's own namespace: a node of another stack cannot write this one's queue or alarms.
        assert statement["Condition"] == {"StringEquals": {"cloudwatch:namespace": f"KimiFleet/{stack}"}}


def test_nodes_hold_no_auto_scaling_action_on_the_group_and_call_only_their_steward(declared):
    """Issue 24: no instance condition exists for CompleteLifecycleAction or SetInstanceProtection, so a
    node's role holds neither (it would hold them for every peer); it reads its group, and calls the
    stack's steward through its IAM-authenticated URL (components/fleet_steward.py)."""
    stack, run = declared
    groups = run.of_type(GROUP)
    functions = run.of_type("aws:lambda/function:Function")
    for statement in _statements(run):
        for action in _actions(statement):
            if action.startswith("autoscaling:"):
                assert action in ("autoscaling:DescribeAutoScalingInstances", "autoscaling:DescribeAutoScalingGroups")
                assert statement["Resource"] == "*"  # Describe actions take no resource ARN
            if action.startswith("lambda:"):
                (function,) = functions
                assert statement["Resource"] == f"arn:aws:mock:::{function['name']}"
                assert statement["Condition"] == {
                    "lambda:InvokeFunctionUrl": {"StringEquals": {"lambda:FunctionUrlAuthType": "AWS_IAM"}},
                    "lambda:InvokeFunction": {"Bool": {"lambda:InvokedViaFunctionUrl": "true"}}}[action]
    assert bool(groups) == bool(functions) == any(a.startswith("lambda:") for s in _statements(run) for a in _actions(s))


# --- scaling ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target, workload", [("waiting", "interactive"), ("ttft", "interactive"),
                                              ("waiting", "batch")])
def test_a_scaling_fleet_follows_its_target_and_drains(target, workload, tmp_path):
    values = {"minReplicas": 1, "maxReplicas": 4,
              **({"waitingPerReplica": 6} if target == "waiting" else {"ttftP99Seconds": 3})}

    def change(config):
        scaling(**values)(config)
        config["kimi-fleet:capacity"]["workload"] = workload

    path, run = variant(FLEET, tmp_path, f"{target}-{workload}", change)
    assert run.error is None, run.error
    r = spec_of(path)
    policy = scaling_policy(r, size(r))
    (group,) = run.of_type(GROUP)
    inputs = group["inputs"]
    assert (inputs["minSize"], inputs["maxSize"], inputs["desiredCapacity"]) == (1, 4, r.spec.capacity.replicas)
    # The policy's count survives the next `pulumi up`.
    assert "desiredCapacity" in group["ignore_changes"]
    policies = {p["inputs"]["targetTrackingConfiguration"]["customizedMetricSpecification"]["metricName"]: p["inputs"]
                for p in run.of_type(POLICY)}
    # The second signal, interactive stacks only: the replicas' mean KV cache use under the policy's
    # target; AWS takes the policy asking for the most capacity. A batch stack follows its queue alone.
    assert len(policies) == (2 if workload == "interactive" else 1)
    kv = policies.pop("KvCacheUsage", None)
    (declared_policy,) = policies.values()
    if workload == "batch":
        assert kv is None and policy.kv_cache_target is None
        kv = declared_policy  # the warm-up check below
    else:
        assert kv["targetTrackingConfiguration"]["targetValue"] == policy.kv_cache_target == 0.75
        assert kv["targetTrackingConfiguration"]["customizedMetricSpecification"]["statistic"] == "Average"
        assert kv["policyType"] == "TargetTrackingScaling" and kv["autoscalingGroupName"] == group["name"]
    assert declared_policy["policyType"] == "TargetTrackingScaling"
    assert declared_policy["autoscalingGroupName"] == group["name"]
    # AWS counts the warm-up from InService, which an instance here reaches only once admitted (the
    # admission hook covers its cold start): what is left is the load balancer's health checks.
    from kimi_fleet import health
    assert declared_policy["estimatedInstanceWarmup"] == kv["estimatedInstanceWarmup"] == health.REFRESH_WARMUP_SECONDS
    assert health.REFRESH_WARMUP_SECONDS < policy.instance_warmup_seconds
    tracking = declared_policy["targetTrackingConfiguration"]
    assert tracking["targetValue"] == (6 if target == "waiting" else 3)
    assert tracking["customizedMetricSpecification"] == {
        "namespace": f"KimiFleet/{FLEET}", "metricName": "RequestsWaiting" if target == "waiting" else "TtftP99Seconds",
        "metricDimensions": [{"name": "Stack", "value": FLEET}],
        "statistic": "Average" if target == "waiting" else "Maximum"}
    assert tracking["customizedMetricSpecification"]["metricName"] in published_metric_names()
    (drain,) = [h["inputs"] for h in run.of_type(HOOK) if h["inputs"]["name"] == "kimi-drain"]
    assert drain["lifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    assert drain["defaultResult"] == "CONTINUE"
    # The hook holds a replica exactly as long as its node is told to drain (node.env).
    assert drain["heartbeatTimeout"] == policy.drain_timeout_seconds == node_files.drain_timeout_seconds(r, size(r))
    assert drain["autoscalingGroupName"] == group["name"]
    for resource in run.resources:
        if resource["custom"] and resource["type"].startswith("aws:"):
            assert schema_errors(resource["type"], resource["inputs"]) == [], resource["name"]
    # The policy pack's budget check sees what the stack may cost at the top of its range.
    (fleet,) = run.of_type("kimi-fleet:fleet:Fleet")
    top = estimate(r).scaling_range["high_usd_per_hour"]
    assert fleet["inputs"]["hourlyCostUsd"] == top > estimate(r).fleet_usd_per_hour


def test_a_policy_and_a_drain_hook_exactly_where_the_stack_scales(declared):
    stack, run = declared
    r = spec_of(stack)
    policy = scaling_policy(r, size(r))
    drains = [h["inputs"] for h in run.of_type(HOOK) if h["inputs"]["name"] == "kimi-drain"]
    # The queue (or TTFT) policy, and the KV cache one on an interactive stack (a batch one follows its queue).
    expected = 0 if policy is None else 1 if r.spec.capacity.workload == "batch" else 2
    assert len(run.of_type(POLICY)) == expected, stack
    assert (policy is not None and policy.kv_cache_target is None) is (expected == 1)
    # Every fleet drains a terminating replica (a scale-in, or a fixed fleet's instance refresh), for as
    # long as its node is told to drain; a single node has no group and no hook.
    timeout = node_files.drain_timeout_seconds(r, size(r))
    assert len(drains) == (1 if timeout else 0), stack
    if timeout:
        assert drains[0]["heartbeatTimeout"] == min(timeout, 7200) and drains[0]["defaultResult"] == "CONTINUE"
        # The hook lived under FleetScaling: its alias keeps a scaling stack's hook in place (as registered).
        (record,) = [h for h in run.of_type(HOOK) if h["inputs"]["name"] == "kimi-drain"]
        assert record["aliases"] == [record["name"].replace("-drain", "-scaling-drain")], record["aliases"]
    if policy:
        (group,) = run.of_type(GROUP)
        assert (group["inputs"]["minSize"], group["inputs"]["maxSize"]) == (policy.min_replicas, policy.max_replicas)
        assert "desiredCapacity" in group["ignore_changes"]
        assert drains[0]["heartbeatTimeout"] == policy.drain_timeout_seconds


def test_a_single_node_stack_given_a_range_becomes_a_fleet(tmp_path):
    path, run = variant(FLEET, tmp_path, "from-one",
                        lambda config: (config["kimi-fleet:capacity"].update(replicas=1),
                                        scaling(minReplicas=1, maxReplicas=3, waitingPerReplica=4)(config)))
    assert run.error is None, run.error
    r = spec_of(path)
    assert r.spec.capacity.replicas == 1 and r.target.behind_load_balancer(r) and r.weights_volume == "instance-store"
    (group,) = run.of_type(GROUP)
    assert (group["inputs"]["minSize"], group["inputs"]["maxSize"]) == (1, 3)
    # No GpuNode instance (the managed mirror's fill instance is not a replica).
    assert not [i for i in run.of_type(INSTANCE) if i["parent"] == group["parent"]]
    assert run.of_type("aws:lb/loadBalancer:LoadBalancer")


def test_a_scaling_fleets_refresh_never_takes_more_than_one_replica_out():
    from components.aws_endpoint import _refresh_basis
    from components.gpu_node import refresh_percentages

    capacity = spec_of(FLEET).spec.capacity
    ranged = capacity.model_copy(update={"replicas": 1, "scaling": ScalingSpec(
        min_replicas=1, max_replicas=4, waiting_per_replica=2)})
    bounds = refresh_percentages(_refresh_basis(ranged), ranged.rollout)
    assert ranged.rollout == "one-at-a-time"
    # At the top of the range (4 replicas) at most one is out: 75% stay, never 0% as the first count gives.
    assert bounds == {"min_healthy_percentage": 75, "max_healthy_percentage": 100}
    surge = ranged.model_copy(update={"rollout": "surge"})
    assert refresh_percentages(_refresh_basis(surge), "surge") == {"min_healthy_percentage": 100,
                                                                  "max_healthy_percentage": 200}


def test_scale_to_zero_is_refused_on_aws_saying_why(tmp_path):
    _, run = variant(FLEET, tmp_path, "zero", lambda config: (
        config["kimi-fleet:capacity"].update(onDemandBase=0),
        scaling(minReplicas=0, maxReplicas=3, waitingPerReplica=4)(config)))
    assert run.error and "capacity.scaling.minReplicas" in run.error
    assert "no target" in run.error and "minReplicas 1" in run.error


def test_a_threshold_or_a_range_change_replaces_nothing(tmp_path):
    before_path, before = variant(FLEET, tmp_path, "before", scaling(minReplicas=1, maxReplicas=3,
                                                                     waitingPerReplica=4))
    assert before.error is None, before.error

    def change(config):
        scaling(minReplicas=2, maxReplicas=6, waitingPerReplica=8)(config)
        config["kimi-fleet:monitoring"] = {"ttftP99Seconds": 5, "kvCacheFullRatio": 0.9}

    _, after = variant(FLEET, tmp_path, "after", change)
    assert after.error is None, after.error
    # The changes are there, as updates of the same resources...
    (old_group,), (new_group,) = before.of_type(GROUP), after.of_type(GROUP)
    assert (old_group["inputs"]["maxSize"], new_group["inputs"]["maxSize"]) == (3, 6)
    old_alarms, new_alarms = _alarms_by_rule(before, FLEET), _alarms_by_rule(after, FLEET)
    assert old_alarms["KimiTtftAboveObjective"]["threshold"] != new_alarms["KimiTtftAboveObjective"]["threshold"]
    def queue_target(run):
        (policy,) = [p["inputs"]["targetTrackingConfiguration"] for p in run.of_type(POLICY)
                     if p["inputs"]["targetTrackingConfiguration"]["customizedMetricSpecification"]["metricName"]
                     == "RequestsWaiting"]
        return policy["targetValue"]

    assert (queue_target(before), queue_target(after)) == (4, 8)
    # ...and nothing is replaced: not the group, its template, an alarm, the policy or the dashboard.
    assert replacements(plan_resources(before), plan_resources(after)) == []
