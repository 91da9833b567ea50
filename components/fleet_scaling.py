"""FleetScaling: an AWS fleet that follows its queue, and gives a replica up only once it drained.

A target-tracking policy on the group (not a step policy): the tracked value is the replicas' own
queue, published by every node to CloudWatch (namespace KimiFleet/<stack>) once per minute with the
dimension sets [Stack, Replica] and [Stack]. The Average of the stack-level datum over a minute is
the mean over the replicas that published in it: requests waiting *per replica*, which is what
AWS asks a count metric to be ("the optimal average request or message count per instance during
any one-minute interval", API_TargetTrackingConfiguration). Target tracking then sizes the group
in proportion (twice the target: about twice the replicas), where a step policy adds fixed steps
from hand-set bounds. For a TTFT objective the tracked value is the slowest replica's p99 TTFT (the
Maximum over the replicas' data): a replica with no first token in the minute publishes no p99
and so cannot pull a slow one's down, and a fleet-wide p99 lies between the replicas' mean and their
maximum, so the policy errs toward adding a replica. Known limit: a fleet with no traffic publishes
no TTFT at all; target tracking takes no action without data, so an idle TTFT-tracking fleet keeps
its replicas until traffic returns (the queue target, always published, scales in when idle).

The second signal (autoscaling: never fewer replicas than keep their mean KV cache use under
capacity.scaling.kvCachePerReplica; interactive stacks only, a batch stack follows its queue alone:
kimi_fleet/autoscaling.py says why) is a second target-tracking policy on KvCacheUsage (the stack-level
series' Average: the mean over the replicas of each one's fullest engine). With several target-tracking
policies EC2 Auto Scaling takes the one that asks for the most capacity, scale-out and scale-in alike
(EC2 Auto Scaling user guide, "Dynamic scaling", multiple dynamic scaling policies): the larger ask
wins, as the policy says; a busy replica with an empty queue is not removed.

Cooldowns: EC2 Auto Scaling takes a cooldown for SimpleScaling only (PutScalingPolicy: "Cooldown ...
Valid only if the policy type is SimpleScaling"); a target-tracking policy takes the instances'
estimated warm-up, which AWS counts from InService ("until a new instance is considered to have
finished initializing ... after it enters the InService state": CreateAutoScalingGroup,
DefaultInstanceWarmup). A new instance of this group enters InService only once its watchdog
admitted it (the admission lifecycle hook holds it in Pending:Wait through its whole cold start, and
a pending instance is already in the desired count, so one spike does not launch a 25-minute cold
start twice). What is left to warm up is the load balancer's own health checks:
health.REFRESH_WARMUP_SECONDS, as for an instance refresh. (The whole time to ready there would keep
a replica that already serves out of the next scale-out's arithmetic for another half hour.)
Scale-in is AWS's own (slower than scale-out, by its managed alarms), and each removal waits in the
drain hook below.

Drain (components/gpu_node.py declares it for every fleet, scaling or not): the lifecycle hook
"kimi-drain" holds a terminating instance (scale-in or an instance refresh) in Terminating:Wait;
its node stops taking requests (the ready listener answers 503, so
the load balancer drains it), waits until its engines have nothing running or waiting, and
completes the action (CONTINUE); after the heartbeat the group continues anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from kimi_fleet import health, node_metrics, observability

#: The hook's name: the one the node's drain completes (stack.json's drain.hook).
DRAIN_HOOK_NAME = node_metrics.DRAIN_HOOK
#: AWS's bounds for a lifecycle hook's heartbeat (PutLifecycleHook: HeartbeatTimeout 30-7200 s).
HEARTBEAT_RANGE = (30, 7200)
#: The metric each target follows (CloudWatch names the nodes publish, fixed in the team contract)
#: and the statistic over the replicas' one-minute data: requests waiting per replica (their mean),
#: the slowest replica's p99 time to first token.
TARGET_METRICS = {"waiting": ("RequestsWaiting", "Average"), "ttft": ("TtftP99Seconds", "Maximum"),
                  "kv-cache": ("KvCacheUsage", "Average")}


@dataclass
class FleetScalingArgs:
    stack: str
    group_name: pulumi.Input[str]
    #: kimi_fleet.autoscaling.ScalingPolicy: the range, the target and the windows
    policy: object


def drain_heartbeat_seconds(drain_timeout_seconds: int) -> int:
    low, high = HEARTBEAT_RANGE
    return max(low, min(high, int(drain_timeout_seconds)))


def tracked_metric(stack: str, metric: str) -> dict:
    """The customized metric the policy tracks: the stack-level series over a minute."""
    name, statistic = TARGET_METRICS[metric]
    return {
        "namespace": observability.cloudwatch_namespace(stack),
        "metric_name": name,
        "metric_dimensions": [{"name": observability.STACK_DIMENSION, "value": stack}],
        "statistic": statistic,
    }


class FleetScaling(pulumi.ComponentResource):
    policy_name: pulumi.Output[str]
    kv_cache_policy_name: pulumi.Output[str] | None

    def __init__(self, name: str, args: FleetScalingArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("kimi-fleet:aws:FleetScaling", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        policy = args.policy
        warmup = health.REFRESH_WARMUP_SECONDS  # after admission (InService): see the module's docstring
        tracking = self._policy(name, args, policy.metric, policy.target_value, warmup, child)
        # The second signal (its target a ratio of the KV cache, 0-1); none on a batch stack.
        kv_cache = (None if policy.kv_cache_target is None
                    else self._policy(name, args, "kv-cache", policy.kv_cache_target, warmup, child))
        self.policy_name = tracking.name
        self.kv_cache_policy_name = kv_cache.name if kv_cache is not None else None
        self.register_outputs({"policy_name": self.policy_name, "kv_cache_policy_name": self.kv_cache_policy_name})

    @staticmethod
    def _policy(name: str, args: FleetScalingArgs, metric: str, target: float, warmup: int,
                opts: pulumi.ResourceOptions) -> aws.autoscaling.Policy:
        tracked = tracked_metric(args.stack, metric)
        return aws.autoscaling.Policy(
            f"{name}-follow-{metric}",
            autoscaling_group_name=args.group_name,
            policy_type="TargetTrackingScaling",
            estimated_instance_warmup=int(warmup),
            target_tracking_configuration=aws.autoscaling.PolicyTargetTrackingConfigurationArgs(
                target_value=float(target),
                customized_metric_specification=(
                    aws.autoscaling.PolicyTargetTrackingConfigurationCustomizedMetricSpecificationArgs(
                        namespace=tracked["namespace"], metric_name=tracked["metric_name"],
                        statistic=tracked["statistic"],
                        metric_dimensions=[
                            aws.autoscaling.PolicyTargetTrackingConfigurationCustomizedMetricSpecificationMetricDimensionArgs(
                                **dimension) for dimension in tracked["metric_dimensions"]]))),
            opts=opts)
