"""AwsMonitoring: what an operator sees of an AWS stack without SSH (issue 24, item 2).

The stack's CloudWatch dashboard (the panels of the Grafana dashboard, from the metrics its nodes
publish), one CloudWatch alarm per alert rule with the Prometheus rule's threshold, and an SNS
topic the alarms notify (subscribe to it; nothing is subscribed here). Every AWS stack gets them: one
node, a fleet (its group's size on the dashboard too) and a multi-node replica (the leader publishes
the engine's metrics, every rank its GPUs'). The body and the alarms are kimi_fleet/cloudwatch.py's.

The topic is not encrypted with the AWS-managed SNS key: CloudWatch alarms cannot publish to a topic
under that key (it needs a customer-managed key whose policy lets CloudWatch use it), and alarm
notifications carry no secret (names, thresholds, states).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from kimi_fleet import cloudwatch, observability
from kimi_fleet.spec import StackSpec


@dataclass
class AwsMonitoringArgs:
    spec: StackSpec
    region: str
    tags: dict[str, str]
    #: a fleet's Auto Scaling group (its size is a dashboard panel); None for one node or a replica
    group_name: pulumi.Input[str] | None = None


class AwsMonitoring(pulumi.ComponentResource):
    dashboard_url: pulumi.Output[str]
    metrics_location: pulumi.Output[str]
    alarm_topic_arn: pulumi.Output[str]
    alarm_names: pulumi.Output[list[str]]

    def __init__(self, name: str, args: AwsMonitoringArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:aws:AwsMonitoring", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        spec = args.spec
        stack = spec.stack
        alarms = cloudwatch.alarms(spec)

        topic = aws.sns.Topic(f"{name}-alarms", tags=args.tags, opts=child)
        declared = []
        for alarm in alarms:
            declared.append(aws.cloudwatch.MetricAlarm(
                f"{name}-{alarm.rule}",
                name=cloudwatch.alarm_name(stack, alarm.rule),
                alarm_description=alarm.description,
                comparison_operator=alarm.comparison_operator,
                threshold=alarm.threshold,
                evaluation_periods=alarm.evaluation_periods,
                datapoints_to_alarm=alarm.datapoints_to_alarm,
                treat_missing_data=alarm.treat_missing_data,
                alarm_actions=[topic.arn], ok_actions=[topic.arn],
                tags=args.tags,
                **_alarm_metric(stack, alarm),
                opts=child))

        thresholds = {a.metric_name: a.threshold for a in alarms if a.expression is None}
        body = pulumi.Output.from_input(args.group_name).apply(
            lambda group: cloudwatch.dashboard_json(stack, args.region, group_name=group, thresholds=thresholds))
        dashboard = aws.cloudwatch.Dashboard(f"{name}-dashboard", dashboard_name=cloudwatch.dashboard_name(stack),
                                             dashboard_body=body, opts=child)

        # The console page, once the dashboard exists under its name.
        self.dashboard_url = dashboard.dashboard_name.apply(
            lambda _: cloudwatch.dashboard_url(args.region, stack))
        self.metrics_location = pulumi.Output.from_input(cloudwatch.metrics_location(stack))
        self.alarm_topic_arn = topic.arn
        self.alarm_names = pulumi.Output.all(*[a.name for a in declared])
        self.register_outputs({
            "dashboard_url": self.dashboard_url,
            "metrics_location": self.metrics_location,
            "alarm_topic_arn": self.alarm_topic_arn,
            "alarm_names": self.alarm_names,
        })


def _alarm_metric(stack: str, alarm: cloudwatch.Alarm) -> dict:
    """The alarm's metric: the stack-level series, or metric math over it (the metric as m1)."""
    dimensions = {observability.STACK_DIMENSION: stack}
    if alarm.expression is None:
        return {"namespace": observability.cloudwatch_namespace(stack), "metric_name": alarm.metric_name,
                "statistic": alarm.statistic, "period": alarm.period, "dimensions": dimensions}
    return {"metric_queries": [
        aws.cloudwatch.MetricAlarmMetricQueryArgs(
            id="m1", return_data=False,
            metric=aws.cloudwatch.MetricAlarmMetricQueryMetricArgs(
                namespace=observability.cloudwatch_namespace(stack), metric_name=alarm.metric_name,
                period=alarm.period, stat=alarm.statistic, dimensions=dimensions)),
        aws.cloudwatch.MetricAlarmMetricQueryArgs(
            id="e1", expression=alarm.expression, label=f"{alarm.metric_name}: {alarm.expression}",
            return_data=True),
    ]}
