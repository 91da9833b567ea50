"""The stack's CloudWatch side on AWS (issue 24, item 2): its dashboard's body and its alarms, from
the same panels and alert rules as the Grafana dashboard and the Prometheus rules
(kimi_fleet/observability.py). Pure: no Pulumi; components/aws_monitoring.py declares them.

What the node publishes (kimi_fleet/node_scripts/metrics_publisher.py): namespace KimiFleet/<stack>, every
datum twice, with [Stack, Replica] (Replica: the instance id) and with [Stack] alone. A replica's id
is not known when the stack is declared (AWS picks a fleet's instances), so:
- the alarms read the stack-level series [Stack] with the rule's statistic (Maximum: the worst
  replica; Sum: every replica's count; Average: the fleet's mean);
- the dashboard draws each panel's stack-level series and, per replica, a SEARCH over the
  [Stack, Replica] series of the same metric (one line per instance that published).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from kimi_fleet import observability

#: The CloudWatch metric period the publisher puts data at (one datum per minute).
PERIOD_SECONDS = 60
#: CloudWatch dashboard grid: 24 columns (Dashboard Body Structure and Syntax, "widgets": x 0-23,
#: width 1-24).
GRID_COLUMNS = 24
WIDGET_WIDTH, WIDGET_HEIGHT = 12, 6
#: The metrics an Auto Scaling group publishes once collection is enabled (gpu_node.GROUP_METRICS).
GROUP_NAMESPACE = "AWS/AutoScaling"
GROUP_DIMENSION = "AutoScalingGroupName"
#: PutMetricAlarm's values (CloudWatch API reference, PutMetricAlarm: ComparisonOperator,
#: TreatMissingData; Statistic: SampleCount | Average | Sum | Minimum | Maximum).
COMPARISONS = {">": "GreaterThanThreshold", ">=": "GreaterThanOrEqualToThreshold",
               "<": "LessThanThreshold", "<=": "LessThanOrEqualToThreshold"}
TREAT_MISSING = ("breaching", "notBreaching", "ignore", "missing")
STATISTICS = ("SampleCount", "Average", "Sum", "Minimum", "Maximum")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")


def dashboard_name(stack: str) -> str:
    """The dashboard's name: letters, digits, - and _ only (PutDashboard: DashboardName). Dashboards
    are global to the account, not regional (CloudFormation's AWS::CloudWatch::Dashboard): the name
    carries the stack's, unique in the project, and each widget names its region."""
    name = f"kimi-fleet-{stack}"
    if not _NAME.fullmatch(name):
        raise ValueError(f"dashboard name {name!r}: letters, digits, - and _ only, at most 255")
    return name


def console_host(region: str) -> str:
    """The AWS console's host for a region's partition."""
    if region.startswith("cn-"):
        return "console.amazonaws.cn"
    if region.startswith("us-gov-"):
        return "console.amazonaws-us-gov.com"
    return f"{region}.console.aws.amazon.com"


def dashboard_url(region: str, stack: str) -> str:
    """The CloudWatch console's page of the stack's dashboard."""
    return f"https://{console_host(region)}/cloudwatch/home?region={region}#dashboards/dashboard/{dashboard_name(stack)}"


def metrics_location(stack: str) -> str:
    """Where the stack's metrics are (the contract's spelling): the namespace and the Stack dimension."""
    return f"cloudwatch://{observability.cloudwatch_namespace(stack)}?{observability.STACK_DIMENSION}={stack}"


def _replica_search(stack: str, metric: str, stat: str) -> str:
    """One series per replica of `metric` (the [Stack, Replica] schema, this stack only)."""
    ns, s, rep = observability.cloudwatch_namespace(stack), observability.STACK_DIMENSION, observability.REPLICA_DIMENSION
    # The namespace in double quotes: it holds a slash and the stack's hyphens (CloudWatch search syntax).
    return (f"SEARCH('{{\"{ns}\",{s},{rep}}} {s}=\"{stack}\" MetricName=\"{metric}\"', '{stat}', {PERIOD_SECONDS})")


def _metric_widget(title: str, metrics: list, region: str, stat: str, index: int, *, y_label: str = "",
                   annotations: list | None = None) -> dict:
    properties = {"title": title, "region": region, "view": "timeSeries", "stacked": False, "stat": stat,
                  "period": PERIOD_SECONDS, "metrics": metrics}
    if y_label:
        properties["yAxis"] = {"left": {"label": y_label, "showUnits": False}}
    if annotations:
        properties["annotations"] = {"horizontal": annotations}
    columns = GRID_COLUMNS // WIDGET_WIDTH
    return {"type": "metric", "x": (index % columns) * WIDGET_WIDTH, "y": (index // columns) * WIDGET_HEIGHT,
            "width": WIDGET_WIDTH, "height": WIDGET_HEIGHT, "properties": properties}


def dashboard_body(stack: str, region: str, *, group_name: str | None = None,
                   thresholds: dict[str, float] | None = None) -> dict:
    """The CloudWatch dashboard: every observability.DASHBOARD_PANELS panel with a CloudWatch metric
    (same title, same order), each the stack-level series with the panel's statistic and one line
    per replica; the alarm thresholds (metric name -> threshold) as horizontal lines where a panel
    draws that metric; a fleet's group size; a text widget for the panel CloudWatch has no number
    for (the release, an answer header)."""
    ns, s = observability.cloudwatch_namespace(stack), observability.STACK_DIMENSION
    widgets = []
    for panel in observability.DASHBOARD_PANELS:
        if not panel.cloudwatch_metrics:
            continue
        metrics: list = []
        for i, metric in enumerate(panel.cloudwatch_metrics):
            metrics.append([ns, metric, s, stack, {"stat": panel.cloudwatch_stat, "label": f"{metric} (stack)"}])
            metrics.append([{"expression": _replica_search(stack, metric, panel.cloudwatch_stat),
                             "id": f"replicas{i}", "label": metric}])
        lines = [{"label": f"alarm: {metric}", "value": thresholds[metric]}
                 for metric in panel.cloudwatch_metrics if thresholds and metric in thresholds]
        widgets.append(_metric_widget(panel.title, metrics, region, panel.cloudwatch_stat, len(widgets),
                                      annotations=lines))
    if group_name is not None:
        widgets.append(_metric_widget("Replicas (Auto Scaling group)", [
            [GROUP_NAMESPACE, name, GROUP_DIMENSION, group_name, {"label": label}]
            for name, label in (("GroupInServiceInstances", "in service"), ("GroupDesiredCapacity", "desired"),
                                ("GroupMinSize", "min"), ("GroupMaxSize", "max"))], region, "Maximum", len(widgets)))
    without = [p.title for p in observability.DASHBOARD_PANELS if not p.cloudwatch_metrics]
    if without:
        rows = -(-len(widgets) // (GRID_COLUMNS // WIDGET_WIDTH))
        widgets.append({"type": "text", "x": 0, "y": rows * WIDGET_HEIGHT, "width": GRID_COLUMNS, "height": 2,
                        "properties": {"markdown": (
                            f"**{', '.join(without)}**: not a number CloudWatch can draw. Every answer carries its "
                            "release in the `X-Kimi-Fleet-Release` header; the stack output `release` is the one "
                            "the last deploy rolled out.")}})
    return {"widgets": widgets}


def dashboard_json(stack: str, region: str, **kwargs) -> str:
    return json.dumps(dashboard_body(stack, region, **kwargs), sort_keys=True)


@dataclass(frozen=True)
class Alarm:
    """One CloudWatch alarm, as aws.cloudwatch.MetricAlarm takes it."""
    #: the alert rule's name (observability.ALERT_NAMES)
    rule: str
    metric_name: str
    statistic: str
    comparison_operator: str
    threshold: float
    evaluation_periods: int
    datapoints_to_alarm: int
    treat_missing_data: str
    description: str
    period: int = PERIOD_SECONDS
    #: metric math over the metric (as "m1") the alarm compares instead of the metric itself
    expression: str | None = None


#: What a period without a datum means, per alert, and why. The publisher puts a metric only when it
#: has one (kimi_fleet/node_scripts/metrics_publisher.py): rates and p99s need two scrapes and a p99
#: needs observations in the period, so a missing datum is mostly "nothing to measure", not a fault.
#: An AWS stack always has a replica (scale to zero is refused on AWS): a stack-level series silent for
#: a whole hour is a stack no node publishes for, which only the admission alarm treats as breaching.
MISSING_DATA: dict[str, tuple[str, str]] = {
    "KimiEngineStalled": ("notBreaching", "EngineStalled needs two scrapes of a serving engine; silence is a "
                                          "starting or reloading engine (the admission alarm covers a dead one)"),
    "KimiQueueGrowing": ("notBreaching", "no RequestsWaiting is no engine answering: a growing queue cannot be "
                                         "told from it"),
    "KimiKvCacheNearFull": ("notBreaching", "no KvCacheUsage is no engine answering, not a full cache"),
    "KimiTtftAboveObjective": ("notBreaching", "TtftP99Seconds is left out of a period without a first token: "
                                               "no traffic is not a slow endpoint"),
    "KimiProxy5xxRatio": ("notBreaching", "the ratio needs two scrapes of Caddy's counters (none after a restart)"),
    "KimiProxyUnauthorized": ("notBreaching", "the rate needs two scrapes of Caddy's counters"),
    "KimiGpuXidErrors": ("notBreaching", "GpuXidErrors counts new XIDs; silence is an exporter not answering"),
    "KimiNodeNotAdmitted": ("breaching", "NodeAdmitted comes from the node's own state exporter every minute: an "
                                         "hour without it from any replica is an endpoint down or blind"),
    "KimiGateFailed": ("notBreaching", "one missing minute is a publisher hiccup, not a failed gate; a node "
                                       "that stops publishing is the admission alarm's"),
}


def alarms(spec) -> list[Alarm]:
    """The stack's CloudWatch alarms: one per observability.alert_rules(spec) rule, its CloudWatch twin
    as given (metric, statistic, comparison, threshold, period, periods, metric math), every period of
    the span breaching (datapoints to alarm = evaluation periods, as a Prometheus `for` holds), and
    MISSING_DATA's choice."""
    out = []
    for rule in observability.alert_rules(spec):
        twin = rule.cloudwatch
        if twin.statistic not in STATISTICS or twin.comparison not in COMPARISONS.values():
            raise ValueError(f"{rule.name}: {twin.statistic} / {twin.comparison} is not CloudWatch's")
        missing, _ = MISSING_DATA[rule.name]
        out.append(Alarm(
            rule=rule.name, metric_name=twin.metric, statistic=twin.statistic, comparison_operator=twin.comparison,
            threshold=float(twin.threshold), evaluation_periods=int(twin.evaluation_periods),
            datapoints_to_alarm=int(twin.evaluation_periods), treat_missing_data=missing,
            description=f"{rule.summary} (Prometheus twin: {rule.name}, severity {rule.severity})",
            period=int(twin.period_seconds), expression=twin.expression))
    return out


def alarm_name(stack: str, rule: str) -> str:
    return f"kimi-fleet-{stack}-{rule}"
