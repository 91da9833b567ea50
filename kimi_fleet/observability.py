"""Seeing an endpoint without SSH: which metrics a node exposes, where, and what the alerts and
dashboards read from them (issue 24).

Pure data and rendering, no Pulumi: the node files, the Kubernetes manifests, the AWS components
(CloudWatch agent, dashboard, alarms, scaling policy), the plan and the tests all read this module,
so a metric name, a port or a threshold is written once.

Every exporter listens on the node's loopback only (the firewall and the proxy's route allowlist
keep them from the outside, like the engine port):
- each engine's own /metrics on its engine port (launch.EngineProcess.port);
- the GPU exporter (DCGM exporter, pinned in the catalog) on GPU_EXPORTER_PORT;
- Caddy's metrics on PROXY_METRICS_PORT (a loopback-only site; Caddy's admin API stays off);
- the node's release and admission state on NODE_STATE_PORT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import yaml

from kimi_fleet import catalog
from kimi_fleet.paths import LOOPBACK

if TYPE_CHECKING:  # type-only: launch imports the resolver; this module stays a leaf
    from kimi_fleet.launch import Launch

#: Loopback ports of the node's exporters (the engines keep their own ports).
GPU_EXPORTER_PORT = 9400
PROXY_METRICS_PORT = 9182  # 9180: the local proxy listener, 9181: the ready listener (node_files)
NODE_STATE_PORT = 9183

#: CloudWatch namespace the nodes publish to, and the dimensions every datum carries.
#: Each stack publishes to a namespace of its own, KimiFleet/<stack>: IAM can condition PutMetricData on
#: the namespace and never on a dimension, so with one shared namespace a node of any stack in the
#: account could write another stack's queue (its scaling) and alarms (its pages).
CLOUDWATCH_NAMESPACE_PREFIX = "KimiFleet"
STACK_DIMENSION = "Stack"
REPLICA_DIMENSION = "Replica"

#: The Prometheus job names (one per exporter kind): scrape configs, rules and dashboards agree on them.
ENGINE_JOB = "kimi-engine"
GPU_JOB = "kimi-gpu"
PROXY_JOB = "kimi-proxy"
NODE_STATE_JOB = "kimi-node"


def cloudwatch_namespace(stack: str) -> str:
    """The stack's own CloudWatch namespace (the node role may write this one and no other)."""
    return f"{CLOUDWATCH_NAMESPACE_PREFIX}/{stack}"


@dataclass(frozen=True)
class ScrapeTarget:
    """One exporter on a node's loopback."""
    job: str
    port: int
    path: str = "/metrics"
    #: labels this target's series get besides the stack's (an engine's index: ENGINE_INDEX_LABEL)
    labels: tuple[tuple[str, str], ...] = field(default=())

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def engine(self) -> str | None:
        """The engine index (kimi-engine targets): the ENGINE_INDEX_LABEL its series get."""
        return dict(self.labels).get(ENGINE_INDEX_LABEL)


# --- what a node exposes ------------------------------------------------------------------------

#: The node's release/admission state (served on NODE_STATE_PORT by the node; names fixed here).
RELEASE_INFO = "kimi_fleet_release_info"  # {release="<id>"} 1
NODE_ADMITTED = "kimi_fleet_node_admitted"  # 0/1
ENGINE_UP = "kimi_fleet_engine_up"  # {engine="<index>"} 0/1
GATE_PASSED = "kimi_fleet_gate_passed"  # 0/1: the node's last self-verification

#: Labels every series of a stack gets from the scrape configuration (the CloudWatch dimensions'
#: Prometheus spelling): the stack, and the replica (its index, or the node's name).
STACK_LABEL = "stack"
REPLICA_LABEL = "replica"
#: The node's engine index on an engine target's series. Not "engine": vLLM's own series carry
#: engine="<DP engine>" (loggers.py:414), which a target label of that name would rename.
ENGINE_INDEX_LABEL = "engine_index"

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
#: label values we write into configs and PromQL: the stack/replica alphabet, no quotes or braces
_LABEL_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,127}")


def _engine_serves_metrics(argv: tuple[str, ...]) -> bool:
    """A worker rank started with its engine's worker flag (vLLM's --headless) runs no API server,
    so no /metrics; SGLang's worker ranks serve a dummy server with the scheduler metrics
    (entrypoints/engine.py:812-829 in 0.5.12.post1) and have no such flag."""
    worker_flags = {m.worker_flag for m in catalog.MULTI_NODE.values() if m.worker_flag}
    return not worker_flags.intersection(argv)


def _vendor_of(launch: Launch) -> str:
    entry = catalog.ENGINE_IMAGES.get(launch.image)
    if entry is not None:
        return entry.vendor
    if launch.build is not None:
        return "nvidia"  # a node builds images only to add AWS EFA (NVIDIA instances)
    raise ValueError(f"image {launch.image!r} is not in the catalog: pass vendor= (the accelerator's vendor) "
                     "to say whether the node runs the GPU exporter")


def node_scrape_targets(launch: Launch, vendor: str | None = None) -> list[ScrapeTarget]:
    """Every exporter of one node, all on its loopback: each engine's own /metrics (a vLLM worker
    rank has none), the DCGM exporter (NVIDIA only: catalog.GPU_EXPORTER), Caddy's metrics site and
    the node's state. `vendor`: the accelerator's (default: the catalog's entry for the image)."""
    vendor = vendor or _vendor_of(launch)
    targets = [ScrapeTarget(ENGINE_JOB, i.port, "/metrics", ((ENGINE_INDEX_LABEL, str(i.index)),))
               for i in launch.instances if _engine_serves_metrics(i.argv)]
    if vendor == "nvidia":
        targets.append(ScrapeTarget(GPU_JOB, GPU_EXPORTER_PORT))
    targets.append(ScrapeTarget(PROXY_JOB, PROXY_METRICS_PORT))
    targets.append(ScrapeTarget(NODE_STATE_JOB, NODE_STATE_PORT))
    return targets


def _check_labels(labels: dict[str, str]) -> None:
    for key, value in labels.items():
        if not _LABEL_NAME.fullmatch(key) or key.startswith("__"):
            raise ValueError(f"label name {key!r} is not a Prometheus label name")
        if not _LABEL_VALUE.fullmatch(str(value)):
            raise ValueError(f"label {key}={value!r}: letters, digits and . _ : / @ + = - only")


def render_prometheus_scrape_config(stack: str, targets: list[ScrapeTarget], labels: dict[str, str] | None = None,
                                    *, scrape_interval: str = "15s", rule_files: tuple[str, ...] = ()) -> str:
    """A Prometheus configuration (YAML) scraping `targets`: one scrape job per exporter kind and
    path, every series labelled stack=<stack> plus `labels` (e.g. replica=<index>), engine targets
    also engine_index=<index>. `promtool check config` accepts it (tests/test_prometheus_scrape.py)."""
    base = {STACK_LABEL: stack, **(labels or {})}
    _check_labels(base)
    if not re.fullmatch(r"[1-9][0-9]*(ms|s|m)", scrape_interval):
        raise ValueError(f"scrape_interval {scrape_interval!r}: a Prometheus duration such as 15s")
    jobs: dict[tuple[str, str], list[dict]] = {}
    for target in targets:
        target_labels = {**base, **dict(target.labels)}
        _check_labels(target_labels)
        if not target.path.startswith("/") or not re.fullmatch(r"/[A-Za-z0-9_/.-]*", target.path):
            raise ValueError(f"scrape path {target.path!r} is not a plain absolute path")
        jobs.setdefault((target.job, target.path), []).append(
            {"targets": [target.address], "labels": target_labels})
    names: dict[str, int] = {}
    scrape_configs = []
    for (job, path), static in jobs.items():
        # Prometheus needs unique job names; a second path of one kind gets a suffix, its job label stays.
        names[job] = names.get(job, 0) + 1
        entry = {"job_name": job if names[job] == 1 else f"{job}-{names[job]}", "metrics_path": path,
                 "static_configs": static}
        if names[job] > 1:
            entry["relabel_configs"] = [{"target_label": "job", "replacement": job}]
        scrape_configs.append(entry)
    config = {"global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
              "scrape_configs": scrape_configs}
    if rule_files:
        config["rule_files"] = list(rule_files)
    return yaml.safe_dump(config, sort_keys=False)


# --- the PromQL every consumer shares -------------------------------------------------------------

def _selector(stack: str | None, extra: str = "") -> str:
    parts = [f'{STACK_LABEL}="{stack}"'] if stack else []
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def engine_metric_names(engine: str) -> catalog.EngineMetricNames:
    """The engine's metric names; an engine registered without its catalog row is refused by name."""
    try:
        return catalog.ENGINE_METRICS[engine]
    except KeyError:
        raise ValueError(f"engine {engine!r} has no metric names in catalog.ENGINE_METRICS: its dashboards, alerts "
                         "and scaling read them (add its row, from the engine's own source)") from None


def promql_names(engine: str) -> dict[str, str]:
    """The placeholders panel and rule queries are written with, for one engine."""
    e = engine_metric_names(engine)
    p = catalog.PROXY_METRICS
    return {
        "generated": e.generated_tokens, "progress": e.progress_tokens, "prompt": e.prompt_tokens, "running": e.running, "waiting": e.waiting,
        "kv": e.kv_cache_usage, "ttft": e.ttft_histogram, "itl": e.itl_histogram, "e2e": e.e2e_histogram,
        "proxy_requests": f"{p.request_duration}_count", "not_scrape": f'{p.server_label}!="{p.metrics_server_name}"',
        "code": p.code_label,
    }


def _fill(template: str, engine: str, stack: str | None) -> str:
    """A query template with {name[extra]} selectors: `{running}` becomes
    vllm:num_requests_running{stack="x"}; `{proxy_requests|code=~"5.."}` adds that matcher."""
    names = promql_names(engine)

    def one(match: re.Match) -> str:
        key, _, extra = match.group(1).partition("|")
        base, suffix = key, ""
        for ending in ("_bucket", "_sum", "_count"):
            if key.endswith(ending) and key[: -len(ending)] in names:
                base, suffix = key[: -len(ending)], ending
        metric = names.get(base, base) + suffix
        matchers = [names["not_scrape"]] if key == "proxy_requests" else []
        if extra:
            matchers.append(extra)
        return metric + _selector(stack, ",".join(matchers))

    return re.sub(r"\{([A-Za-z_:][A-Za-z0-9_:]*(?:\|[^{}]*)?)\}", one, template)


@dataclass(frozen=True)
class PanelQuery:
    legend: str
    #: PromQL with {placeholder} selectors (promql_names; other names are metric names), filled per stack
    template: str

    def promql(self, engine: str, stack: str | None = None) -> str:
        return _fill(self.template, engine, stack)


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str  # Grafana unit id
    queries: tuple[PanelQuery, ...]
    #: the CloudWatch metrics (namespace cloudwatch_namespace(stack)) the CloudWatch dashboard's twin panel
    #: shows; () where CloudWatch has no such metric (the release is a label, not a number)
    cloudwatch_metrics: tuple[str, ...]
    #: the CloudWatch statistic the twin panel reads
    cloudwatch_stat: str = "Average"


_R = f"by ({REPLICA_LABEL})"
_RL = f"by ({REPLICA_LABEL}, le)"

#: The panels, in order: the Grafana dashboard draws them from Prometheus, the CloudWatch dashboard
#: (AWS) the same titles from the metrics the node publishes.
DASHBOARD_PANELS: tuple[Panel, ...] = (
    Panel("Generated tokens per second", "short",
          (PanelQuery("{{replica}}", f"sum {_R} (rate({{generated}}[1m]))"),), ("GeneratedTokensPerSecond",), "Sum"),
    Panel("Time to first token (p50, p99)", "s",
          (PanelQuery("p50 {{replica}}", f"histogram_quantile(0.5, sum {_RL} (rate({{ttft_bucket}}[5m])))"),
           PanelQuery("p99 {{replica}}", f"histogram_quantile(0.99, sum {_RL} (rate({{ttft_bucket}}[5m])))")),
          ("TtftP99Seconds",), "Maximum"),
    Panel("Inter-token latency (p50, p99)", "s",
          (PanelQuery("p50 {{replica}}", f"histogram_quantile(0.5, sum {_RL} (rate({{itl_bucket}}[5m])))"),
           PanelQuery("p99 {{replica}}", f"histogram_quantile(0.99, sum {_RL} (rate({{itl_bucket}}[5m])))")),
          ("ItlP99Seconds",), "Maximum"),
    Panel("Requests running and waiting", "short",
          (PanelQuery("running {{replica}}", f"sum {_R} ({{running}})"),
           PanelQuery("waiting {{replica}}", f"sum {_R} ({{waiting}})")),
          ("RequestsRunning", "RequestsWaiting"), "Maximum"),
    Panel("KV cache use", "percentunit",
          (PanelQuery("{{replica}}", f"max {_R} ({{kv}})"),), ("KvCacheUsage",), "Maximum"),
    Panel("Proxy requests per second", "reqps",
          (PanelQuery("{{replica}}", f"sum {_R} (rate({{proxy_requests}}[5m]))"),), ("ProxyRequestsPerSecond",), "Sum"),
    # A code Caddy never answered has no series: "or ... * 0" draws 0 for it instead of nothing.
    Panel("Proxy 5xx ratio", "percentunit",
          (PanelQuery("{{replica}}", f'(sum {_R} (rate({{proxy_requests|code=~"5.."}}[5m])) or '
                                     f"sum {_R} (rate({{proxy_requests}}[5m])) * 0) / "
                                     f"sum {_R} (rate({{proxy_requests}}[5m]))"),), ("Proxy5xxRatio",), "Average"),
    Panel("Proxy 401 per second", "reqps",
          (PanelQuery("{{replica}}", f'sum {_R} (rate({{proxy_requests|code="401"}}[5m])) or '
                                     f"sum {_R} (rate({{proxy_requests}}[5m])) * 0"),),
          ("Proxy401PerSecond",), "Sum"),
    Panel("GPU utilisation", "percent",
          (PanelQuery("{{replica}}", f"avg {_R} ({{DCGM_FI_DEV_GPU_UTIL}})"),), ("GpuUtilization",), "Average"),
    Panel("GPU memory used", "percentunit",
          (PanelQuery("{{replica}}", f"sum {_R} ({{DCGM_FI_DEV_FB_USED}}) / "
                                     f"(sum {_R} ({{DCGM_FI_DEV_FB_USED}}) + sum {_R} ({{DCGM_FI_DEV_FB_FREE}}))"),),
          ("GpuMemoryUsedRatio",), "Maximum"),
    Panel("GPU power", "watt",
          (PanelQuery("{{replica}}", f"sum {_R} ({{DCGM_FI_DEV_POWER_USAGE}})"),), ("GpuPowerWatts",), "Average"),
    Panel("GPU XID errors (last window)", "short",
          (PanelQuery("{{replica}}", f"sum {_R} ({{DCGM_EXP_XID_ERRORS_COUNT}}) or sum {_R} ({{DCGM_FI_DEV_GPU_UTIL}}) * 0"),),
          ("GpuXidErrors",), "Sum"),
    Panel("Admitted and gate passed", "short",
          (PanelQuery("admitted {{replica}}", f"min {_R} ({{{NODE_ADMITTED}}})"),
           PanelQuery("gate {{replica}}", f"min {_R} ({{{GATE_PASSED}}})")),
          ("NodeAdmitted", "GatePassed"), "Minimum"),
    Panel("Release per replica", "short",
          (PanelQuery("{{replica}} {{release}}", f"max by ({REPLICA_LABEL}, release) ({{{RELEASE_INFO}}})"),), ()),
)


# --- alerts ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CloudWatchAlarm:
    """The CloudWatch twin of a Prometheus rule, on a metric the node publishes (namespace
    cloudwatch_namespace(stack), dimensions Stack and Replica): same threshold, same span."""
    metric: str
    #: Average | Sum | Minimum | Maximum. The alarms read the stack-level series (a fleet's replica ids
    #: are the instances AWS picks later), where a period holds one datum per replica: a rule that
    #: holds per replica takes the extreme that any one replica reaches (Maximum of a bad value,
    #: Minimum of a good one), never the Average, which one healthy replica would dilute.
    statistic: str
    comparison: str  # a CloudWatch ComparisonOperator
    threshold: float
    period_seconds: int
    evaluation_periods: int
    #: metric math over the metric (as "m1"), alarmed on instead of the metric itself
    expression: str | None = None
    #: what a period without data means: a silent replica is not a healthy one for some alarms
    treat_missing_data: str = "notBreaching"


@dataclass(frozen=True)
class AlertRule:
    name: str
    #: PromQL: the rule fires for every series it returns
    expr: str
    for_minutes: int
    #: the number the expression compares with (the stack's monitoring setting it comes from)
    threshold: float
    severity: str  # critical | warning
    summary: str
    cloudwatch: CloudWatchAlarm

    @property
    def for_(self) -> str:
        return f"{self.for_minutes}m"


ALERT_NAMES = (
    "KimiEngineStalled", "KimiQueueGrowing", "KimiKvCacheNearFull", "KimiTtftAboveObjective",
    "KimiProxy5xxRatio", "KimiProxyUnauthorized", "KimiGpuXidErrors", "KimiNodeNotAdmitted", "KimiGateFailed",
)
#: How long a node may stay unadmitted before it alerts: a cold start loads ~600 GB of weights
#: (catalog.LOAD_SOURCE: 10-15 min from NVMe, longer from the mirror) and runs the gate. Assumed here.
NOT_ADMITTED_MINUTES = 60
#: The span the rate-based rules average over, and the minutes they must hold (5 one-minute
#: CloudWatch periods): the p99 and ratios are "over 5 minutes" (spec.MonitoringSpec).
WINDOW_MINUTES = 5

_PER_ENGINE = f"by ({STACK_LABEL}, {REPLICA_LABEL}, instance)"
_PER_REPLICA = f"by ({STACK_LABEL}, {REPLICA_LABEL})"


def _number(value: float) -> str:
    return repr(float(value)) if float(value) != int(value) else str(int(value))


def alert_rules(spec) -> list[AlertRule]:
    """The stack's alerts (spec: a StackSpec; thresholds from spec.monitoring, engine names from
    catalog.ENGINE_METRICS), each with its CloudWatch twin on the same threshold."""
    m, engine, stack = spec.monitoring, spec.engine.name, spec.stack
    w = WINDOW_MINUTES

    def q(template: str) -> str:
        return _fill(template, engine, stack)

    stalled, growing = m.stalled_minutes, m.queue_growing_minutes
    rules = [
        AlertRule(
            "KimiEngineStalled",
            # 1 where requests run and no token came for 2 minutes (a counter needs two scrapes to move); the
            # per-iteration counter (catalog progress_tokens), not SGLang's finish-time generation count
            q(f"(sum {_PER_ENGINE} ({{running}}) > bool 0) * (sum {_PER_ENGINE} (increase({{progress}}[2m])) == bool 0)"
              " >= 1"),
            stalled, 1, "critical",
            f"an engine has requests running and generated no token for {stalled} minutes",
            CloudWatchAlarm("EngineStalled", "Maximum", "GreaterThanOrEqualToThreshold", 1, 60, stalled)),
        AlertRule(
            "KimiQueueGrowing",
            q(f"(sum {_PER_ENGINE} ({{waiting}}) > 0) and on ({STACK_LABEL}, {REPLICA_LABEL}, instance) "
              f"(sum {_PER_ENGINE} (deriv({{waiting}}[{w}m])) > 0)"),
            growing, 0, "warning",
            f"requests keep waiting and the queue kept growing for {growing} minutes: add replicas or shed load",
            # each 5-minute average above the one before, for the same minutes
            CloudWatchAlarm("RequestsWaiting", "Average", "GreaterThanThreshold", 0, w * 60, max(1, growing // w),
                            expression="DIFF(m1)")),
        AlertRule(
            "KimiKvCacheNearFull",
            q(f"max {_PER_ENGINE} ({{kv}}) > {_number(m.kv_cache_full_ratio)}"),
            w, m.kv_cache_full_ratio, "warning",
            f"KV cache above {m.kv_cache_full_ratio:.0%}: new requests queue or get preempted",
            CloudWatchAlarm("KvCacheUsage", "Maximum", "GreaterThanThreshold", m.kv_cache_full_ratio, 60, w)),
        AlertRule(
            "KimiTtftAboveObjective",
            q(f"histogram_quantile(0.99, sum by ({STACK_LABEL}, {REPLICA_LABEL}, le) (rate({{ttft_bucket}}[{w}m]))) "
              f"> {_number(m.ttft_p99_seconds)}"),
            w, m.ttft_p99_seconds, "warning",
            f"p99 time to first token above the objective ({_number(m.ttft_p99_seconds)} s)",
            CloudWatchAlarm("TtftP99Seconds", "Maximum", "GreaterThanThreshold", m.ttft_p99_seconds, 60, w)),
        AlertRule(
            "KimiProxy5xxRatio",
            q(f'sum {_PER_REPLICA} (rate({{proxy_requests|code=~"5.."}}[{w}m])) / '
              f"sum {_PER_REPLICA} (rate({{proxy_requests}}[{w}m])) > {_number(m.error_ratio)}"),
            w, m.error_ratio, "critical",
            f"more than {m.error_ratio:.0%} of the requests answered 5xx",
            CloudWatchAlarm("Proxy5xxRatio", "Maximum", "GreaterThanThreshold", m.error_ratio, 60, w)),
        AlertRule(
            "KimiProxyUnauthorized",
            q(f'sum {_PER_REPLICA} (rate({{proxy_requests|code="401"}}[{w}m])) > {_number(m.unauthorized_per_second)}'),
            w, m.unauthorized_per_second, "warning",
            f"more than {_number(m.unauthorized_per_second)} requests per second refused for a wrong or missing key "
            "(an old key still in use, or a scan)",
            CloudWatchAlarm("Proxy401PerSecond", "Maximum", "GreaterThanThreshold", m.unauthorized_per_second, 60, w)),
        AlertRule(
            "KimiGpuXidErrors",
            q(f"sum by ({STACK_LABEL}, {REPLICA_LABEL}, gpu) ({{DCGM_EXP_XID_ERRORS_COUNT}}) > 0"),
            0, 0, "critical",
            "a GPU reported XID errors (driver-reported faults: see the xid label and NVIDIA's XID catalog)",
            CloudWatchAlarm("GpuXidErrors", "Sum", "GreaterThanThreshold", 0, 60, 1)),
        AlertRule(
            "KimiNodeNotAdmitted",
            q(f"min {_PER_REPLICA} ({{{NODE_ADMITTED}}}) == 0"),
            NOT_ADMITTED_MINUTES, 0, "warning",
            f"a node has not been admitted (self-verification not passed) for {NOT_ADMITTED_MINUTES} minutes",
            # Maximum: no replica admitted for the hour (the stack is down). Not Minimum: a one-at-a-time
            # refresh of 3 or more replicas keeps *some* replica unadmitted for longer than an hour while
            # each one's own cold start is shorter; per replica the series is the instance's, unknown when
            # the alarm is declared. A single replica stuck unadmitted is the admission hook's to end
            # (ABANDON at its heartbeat: the group replaces it).
            CloudWatchAlarm("NodeAdmitted", "Maximum", "LessThanOrEqualToThreshold", 0, 300,
                            NOT_ADMITTED_MINUTES // 5)),
        AlertRule(
            "KimiGateFailed",
            q(f"min {_PER_REPLICA} ({{{GATE_PASSED}}}) == 0"),
            0, 0, "critical",
            "a node's last self-verification (the gate) failed",
            CloudWatchAlarm("GatePassed", "Minimum", "LessThanOrEqualToThreshold", 0, 60, 1)),
    ]
    assert tuple(r.name for r in rules) == ALERT_NAMES
    return rules


def render_prometheus_rules(spec) -> str:
    """The stack's alerts as a Prometheus rules file (promtool check rules / test rules)."""
    group = {"name": f"kimi-fleet-{spec.stack}", "rules": [
        {"alert": r.name, "expr": r.expr, "for": r.for_,
         "labels": {"severity": r.severity, STACK_LABEL: spec.stack},
         "annotations": {"summary": r.summary,
                         "threshold": _number(r.threshold),
                         "cloudwatch": f"{cloudwatch_namespace(spec.stack)}/{r.cloudwatch.metric} {r.cloudwatch.statistic} "
                                       f"{r.cloudwatch.comparison} {_number(r.cloudwatch.threshold)}"}}
        for r in alert_rules(spec)]}
    return yaml.safe_dump({"groups": [group]}, sort_keys=False, width=1000)


# --- Kubernetes only: a stack that scales to zero -------------------------------------------------

#: A Kubernetes stack that scales to zero (kimi_fleet/k8s_wake.py) has one alert more than ALERT_NAMES (the
#: rules every target shares, each with its CloudWatch twin): its series are the wake front's, which only such
#: a stack runs, and AWS refuses scale to zero, so it has no CloudWatch twin to keep equal (the reverse of
#: k8s_manifests.UNSERVED_ALERTS: the parity tests compare ALERT_NAMES, which this is not in).
STUCK_AT_ZERO_ALERT = "KimiStuckAtZero"
#: Past the stack's time to ready (a plan, not a measurement: the weights' load and the image pull vary), the
#: minutes a wake may still take before the alert fires. Assumed here, like NOT_ADMITTED_MINUTES. The alert's
#: expression ends within its window (k8s_manifests.WAKE_ALERT_WINDOW_SECONDS, 2 min) of the last 503, so a
#: wake that ends up to the margin less that window past the time to ready does not page.
STUCK_AT_ZERO_MARGIN_MINUTES = 15


def stuck_at_zero_minutes(time_to_ready_seconds: int) -> int:
    """How long the front must keep answering valid requests before the alert fires: the time to ready
    (rounded up to a minute) and the margin."""
    return -(-time_to_ready_seconds // 60) + STUCK_AT_ZERO_MARGIN_MINUTES


def stuck_at_zero_rule(stack: str, answered_growth: str, time_to_ready_seconds: int) -> dict:
    """The rule (a rules file's entry): the wake front kept answering requests with a valid key 503 (no
    engine Ready) for longer than a wake takes. `answered_growth`: PromQL, per series of the front's 503
    answers, what it grew by within the alert's window (k8s_manifests.wake_answered_growth over
    WAKE_ALERT_WINDOW_SECONDS: two of the clients' retries). Fires when the woken pod cannot start
    (Pending: no GPU or spot capacity, quota; a failing image or load) or KEDA does not act; not while a
    wake goes as planned (the front leaves when an engine pod is Ready, its 503s stop, the expression ends
    within the window). A client must keep retrying (at most the window apart) for it to hold. Prometheus
    itself down fires nothing (that is the monitoring stack's own watchdog)."""
    minutes = stuck_at_zero_minutes(time_to_ready_seconds)
    ready = -(-time_to_ready_seconds // 60)
    return {"alert": STUCK_AT_ZERO_ALERT, "expr": f"sum({answered_growth}) > 0", "for": f"{minutes}m",
            "labels": {"severity": "critical", STACK_LABEL: stack},
            "annotations": {"summary": "the stack is stuck at zero: its wake front kept answering requests with "
                                       f"the key 503 for {minutes} minutes (a wake takes about {ready}): the woken engine pod "
                                       "is not Ready (Pending for GPU or spot capacity or quota, failing) or KEDA did "
                                       "not scale it",
                            "threshold": str(minutes),
                            "cloudwatch": "none: Kubernetes only (AWS refuses scale to zero)"}}


# --- Grafana --------------------------------------------------------------------------------------

def render_grafana_dashboard(spec) -> dict:
    """An importable Grafana dashboard (JSON model) of DASHBOARD_PANELS for the stack, its queries
    filtered to stack=<spec.stack>; the Prometheus data source is chosen at import (__inputs)."""
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    panels = []
    for index, panel in enumerate(DASHBOARD_PANELS):
        width = 12 if len(DASHBOARD_PANELS) > 1 else 24
        panels.append({
            "id": index + 1, "type": "timeseries", "title": panel.title, "datasource": datasource,
            "gridPos": {"h": 8, "w": width, "x": (index % 2) * 12, "y": (index // 2) * 8},
            "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{"refId": chr(ord("A") + n), "datasource": datasource, "expr": query.promql(spec.engine.name, spec.stack),
                         "legendFormat": query.legend} for n, query in enumerate(panel.queries)],
        })
    thresholds = {"ttft_p99_seconds": spec.monitoring.ttft_p99_seconds,
                  "kv_cache_full_ratio": spec.monitoring.kv_cache_full_ratio}
    for p in panels:
        # the alert thresholds as marker lines where a panel shows the same quantity
        value = {"Time to first token (p50, p99)": thresholds["ttft_p99_seconds"],
                 "KV cache use": thresholds["kv_cache_full_ratio"],
                 "Proxy 5xx ratio": spec.monitoring.error_ratio,
                 "Proxy 401 per second": spec.monitoring.unauthorized_per_second}.get(p["title"])
        if value is not None:
            p["fieldConfig"]["defaults"]["thresholds"] = {
                "mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "red", "value": value}]}
            p["fieldConfig"]["defaults"]["custom"] = {"thresholdsStyle": {"mode": "line"}}
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "description": "", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "__requires": [{"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
                       {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""}],
        "title": f"kimi-fleet {spec.stack}",
        "uid": f"kimi-{spec.stack}"[:40],
        "tags": ["kimi-fleet", spec.engine.name],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": panels,
    }
