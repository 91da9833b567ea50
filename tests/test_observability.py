"""Metrics, alert rules and dashboards as code (issue 24): the catalog's names against the engines'
own, the rendered scrape configuration under `promtool check config`, every stack's rules under
`promtool check rules` and `promtool test rules` (the stalled and queue-growing alerts fire on a
stalled and a queueing series, and stay quiet on a healthy one), and the Grafana dashboard."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kimi_fleet import catalog, engines, observability
from kimi_fleet.launch import render_launch
from kimi_fleet.resolve import Resolved
from kimi_fleet.stackfile import load_stack_config, stack_file
from tests.matrix import PLANNED_STACKS

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (.ci/run installs prometheus)")


def spec_of(stack: str):
    return load_stack_config(stack_file(stack)).spec()


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


# --- catalog facts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", engines.names())
def test_the_watchdogs_load_metrics_are_the_catalogs_names(engine):
    """One set of names: the watchdog's (engine modules' LoadMetrics) are the dashboards'."""
    names, load = catalog.ENGINE_METRICS[engine], engines.get(engine).load_metrics
    # The watchdog's token counter is the progress one (SGLang's generation counter moves only when a
    # request finishes: a long generation would look stalled on it).
    assert (load.generated_tokens, load.running, load.waiting) == (names.progress_tokens, names.running,
                                                                   names.waiting)


def test_every_engine_release_the_catalog_pins_has_its_names_located():
    """Each pinned engine version was read: a file:line for every name."""
    for engine, names in catalog.ENGINE_METRICS.items():
        pinned = {i.package_version or i.version for i in catalog.ENGINE_IMAGES.values() if i.engine == engine}
        assert pinned <= set(names.where), (engine, pinned - set(names.where))
        for release, lines in names.where.items():
            assert set(lines) == set(names.fields), (engine, release)
            assert all(re.fullmatch(r"[\w/.]+\.py:\d+", where) for where in lines.values())


def _registered(name: str, text: str) -> bool:
    # prometheus_client adds _total to a counter registered without it (vLLM's way)
    return f'name="{name}"' in text or f'name="{name.removesuffix("_total")}"' in text


# KIMI_ENGINE_SOURCES="vllm 0.22.1=/path/site-packages,sglang 0.5.9=/path,...": unpacked engine wheels.
SOURCES = dict(item.split("=", 1) for item in os.environ.get("KIMI_ENGINE_SOURCES", "").split(",") if "=" in item)


@pytest.mark.skipif(not SOURCES, reason="set KIMI_ENGINE_SOURCES to unpacked engine wheels to re-read the names")
def test_the_names_are_registered_at_the_recorded_lines():
    checked = 0
    for key, root in SOURCES.items():
        engine, release = key.split()
        names = catalog.ENGINE_METRICS[engine]
        for field_name, where in names.where[release].items():
            path, line = where.rsplit(":", 1)
            text = (Path(root) / path).read_text().splitlines()
            assert _registered(getattr(names, field_name), text[int(line) - 1]), (key, field_name, where)
            checked += 1
    assert checked


def test_the_gpu_collectors_file_lists_the_metrics_the_panels_read():
    read = {name for panel in observability.DASHBOARD_PANELS for q in panel.queries
            for name in re.findall(r"DCGM_\w+", q.template)}
    rules = {name for r in observability.alert_rules(spec_of(PLANNED_STACKS[0])) for name in re.findall(r"DCGM_\w+", r.expr)}
    listed = {line.split(",")[0] for line in catalog.GPU_EXPORTER_COUNTERS.splitlines()}
    assert read | rules <= listed == set(catalog.GPU_METRICS)
    assert all(len(line.split(",", 2)) == 3 for line in catalog.GPU_EXPORTER_COUNTERS.splitlines())
    assert re.fullmatch(r"nvcr\.io/nvidia/k8s/dcgm-exporter:\d+\.\d+\.\d+-\d+\.\d+\.\d+-[a-z0-9.]+",
                        catalog.GPU_EXPORTER.image)


# --- scrape targets and the scrape configuration ---------------------------------------------------

@pytest.mark.parametrize("stack", PLANNED_STACKS)
def test_every_node_exporter_is_on_loopback_and_the_gpu_exporter_only_on_nvidia(stack):
    r = Resolved(spec_of(stack))
    launch = render_launch(r)
    targets = observability.node_scrape_targets(launch, r.accelerator.vendor)
    assert all(t.address.startswith("127.0.0.1:") for t in targets)
    engine_ports = [t.port for t in targets if t.job == observability.ENGINE_JOB]
    assert engine_ports == [i.port for i in launch.instances]
    assert [t.engine for t in targets if t.job == observability.ENGINE_JOB] == [str(i.index) for i in launch.instances]
    jobs = {t.job for t in targets}
    assert (observability.GPU_JOB in jobs) == (r.accelerator.vendor == "nvidia")
    assert {observability.PROXY_JOB, observability.NODE_STATE_JOB} <= jobs
    assert len({t.port for t in targets}) == len(targets)


def test_a_vllm_worker_rank_has_no_metrics_to_scrape():
    stack = next(s for s in PLANNED_STACKS if spec_of(s).engine.name == "vllm" and spec_of(s).parallelism.nodes > 1)
    r = Resolved(spec_of(stack))
    worker = render_launch(r, node_rank=1)
    assert [t.job for t in observability.node_scrape_targets(worker, "nvidia")].count(observability.ENGINE_JOB) == 0
    leader = render_launch(r, node_rank=0)
    assert [t.job for t in observability.node_scrape_targets(leader, "nvidia")].count(observability.ENGINE_JOB) == 1


def test_an_image_outside_the_catalog_needs_the_vendor_said():
    r = Resolved(spec_of(PLANNED_STACKS[0]))
    launch = render_launch(r)
    from dataclasses import replace
    with pytest.raises(ValueError, match="pass vendor="):
        observability.node_scrape_targets(replace(launch, image="example.com/custom:1", build=None))


@pytest.mark.parametrize("labels", [{"replica": "0\n- job_name: x"}, {"replica": 'a"b'}, {"__name__": "x"},
                                    {"bad-name": "x"}])
def test_label_values_cannot_inject_into_the_configuration(labels):
    with pytest.raises(ValueError):
        observability.render_prometheus_scrape_config("s", [observability.ScrapeTarget("j", 1)], labels)


@needs_promtool
@pytest.mark.parametrize("stack", PLANNED_STACKS)
def test_promtool_accepts_every_stacks_scrape_configuration(stack, tmp_path):
    r = Resolved(spec_of(stack))
    targets = observability.node_scrape_targets(render_launch(r), r.accelerator.vendor)
    (tmp_path / "rules.yml").write_text(observability.render_prometheus_rules(r.spec))
    text = observability.render_prometheus_scrape_config(stack, targets, {"replica": "0"}, rule_files=("rules.yml",))
    (tmp_path / "prometheus.yml").write_text(text)
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(text)
    assert {c["job_name"] for c in config["scrape_configs"]} == {t.job for t in targets}
    for c in config["scrape_configs"]:
        for static in c["static_configs"]:
            assert static["labels"]["stack"] == stack and static["labels"]["replica"] == "0"


# --- alert rules ---------------------------------------------------------------------------------

@needs_promtool
@pytest.mark.parametrize("stack", PLANNED_STACKS)
def test_promtool_accepts_every_stacks_rules(stack, tmp_path):
    path = tmp_path / "rules.yml"
    path.write_text(observability.render_prometheus_rules(spec_of(stack)))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(observability.ALERT_NAMES)} rules found" in result.stdout


@pytest.mark.parametrize("stack", PLANNED_STACKS)
def test_each_alarm_holds_the_rules_threshold_and_span(stack):
    spec = spec_of(stack)
    rules = observability.alert_rules(spec)
    assert tuple(r.name for r in rules) == observability.ALERT_NAMES
    for r in rules:
        cw = r.cloudwatch
        assert cw.threshold == r.threshold, r.name
        # the same minutes: the Prometheus `for` (plus the rate window) spans the alarm's periods
        assert cw.period_seconds * cw.evaluation_periods >= max(60, r.for_minutes * 60), r.name
        assert cw.metric in CLOUDWATCH_METRICS, r.name
    by_name = {r.name: r for r in rules}
    m = spec.monitoring
    assert by_name["KimiTtftAboveObjective"].threshold == m.ttft_p99_seconds
    assert by_name["KimiKvCacheNearFull"].threshold == m.kv_cache_full_ratio
    assert by_name["KimiProxy5xxRatio"].threshold == m.error_ratio
    assert by_name["KimiProxyUnauthorized"].threshold == m.unauthorized_per_second
    assert by_name["KimiEngineStalled"].for_minutes == m.stalled_minutes
    assert by_name["KimiQueueGrowing"].for_minutes == m.queue_growing_minutes
    names = catalog.ENGINE_METRICS[spec.engine.name]
    # Progress is the per-iteration counter (SGLang's generation counter moves only at a request's finish).
    assert names.progress_tokens in by_name["KimiEngineStalled"].expr
    assert names.waiting in by_name["KimiQueueGrowing"].expr
    assert all(f'stack="{stack}"' in r.expr for r in rules)


#: common.md's CloudWatch metric names (the node publishes them; "metrics-node" builds the publisher)
CLOUDWATCH_METRICS = {
    "GeneratedTokensPerSecond", "RequestsRunning", "RequestsWaiting", "KvCacheUsage", "TtftP99Seconds",
    "ItlP99Seconds", "ProxyRequestsPerSecond", "Proxy5xxRatio", "Proxy401PerSecond", "GpuUtilization",
    "GpuMemoryUsedRatio", "GpuPowerWatts", "GpuXidErrors", "NodeAdmitted", "GatePassed", "EngineStalled"}


def _series(metric: str, labels: dict[str, str], values: str) -> dict:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{inner}}}", "values": values}


def rule_tests(spec) -> dict:
    """promtool unit tests for the stack's rules: a stalled engine, a growing queue, and healthy twins."""
    names = catalog.ENGINE_METRICS[spec.engine.name]
    m = spec.monitoring
    stalled, growing = m.stalled_minutes, m.queue_growing_minutes
    base = {"stack": spec.stack, "replica": "0", "instance": "127.0.0.1:8000", "job": observability.ENGINE_JOB}
    healthy = {**base, "replica": "1", "instance": "127.0.0.1:8001"}
    span = max(stalled, growing) + 10
    alert = {"stack": spec.stack, "replica": "0", "instance": "127.0.0.1:8000", "severity": None}

    rendered = {r["alert"]: r for r in yaml.safe_load(observability.render_prometheus_rules(spec))["groups"][0]["rules"]}

    def expected(name: str) -> list[dict]:
        rule = next(r for r in observability.alert_rules(spec) if r.name == name)
        return [{"exp_labels": {k: (v if k != "severity" else rule.severity) for k, v in alert.items()},
                 "exp_annotations": rendered[name]["annotations"]}]

    return {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {   # replica 0 keeps 4 requests running and its token counter stops at minute 3;
                # replica 1 runs 4 and generates 600 tokens a minute throughout
                "interval": "1m",
                "input_series": [
                    _series(names.running, base, f"4x{span}"),
                    _series(names.progress_tokens, base, "0+600x3 1800x" + str(span - 3)),
                    _series(names.running, healthy, f"4x{span}"),
                    _series(names.progress_tokens, healthy, f"0+600x{span}"),
                ],
                "alert_rule_test": [
                    # no token since minute 3: the 2-minute window sees none from minute 5; not yet
                    # for `stalledMinutes` at minute 5 + stalled - 1
                    {"eval_time": f"{5 + stalled - 1}m", "alertname": "KimiEngineStalled", "exp_alerts": []},
                    {"eval_time": f"{5 + stalled}m", "alertname": "KimiEngineStalled",
                     "exp_alerts": expected("KimiEngineStalled")},
                ],
            },
            {   # replica 0's queue grows by 2 a minute; replica 1's holds at 5 (waiting, not growing);
                # both keep tokens flowing
                "interval": "1m",
                "input_series": [
                    _series(names.waiting, base, f"0+2x{span}"),
                    _series(names.waiting, healthy, f"5x{span}"),
                    _series(names.running, base, f"8x{span}"),
                    _series(names.progress_tokens, base, f"0+600x{span}"),
                ],
                "alert_rule_test": [
                    {"eval_time": f"{growing}m", "alertname": "KimiQueueGrowing", "exp_alerts": []},
                    {"eval_time": f"{growing + 2}m", "alertname": "KimiQueueGrowing",
                     "exp_alerts": expected("KimiQueueGrowing")},
                    {"eval_time": f"{span}m", "alertname": "KimiEngineStalled", "exp_alerts": []},
                ],
            },
            {   # one long, healthy generation: SGLang's generation counter stays flat until the request
                # finishes (review F6), its per-iteration counter moves: not a stall
                "interval": "1m",
                "input_series": [
                    _series(names.running, base, f"1x{span}"),
                    _series(names.progress_tokens, base, f"0+600x{span}"),
                    *([_series(names.generated_tokens, base, f"0x{span}")]
                      if names.generated_tokens != names.progress_tokens else []),
                ],
                "alert_rule_test": [
                    {"eval_time": f"{span}m", "alertname": "KimiEngineStalled", "exp_alerts": []},
                ],
            },
        ],
    }


@needs_promtool
@pytest.mark.parametrize("stack", PLANNED_STACKS)
def test_stalled_and_queue_growing_fire_on_the_bad_replica_only(stack, tmp_path):
    spec = spec_of(stack)
    (tmp_path / "rules.yml").write_text(observability.render_prometheus_rules(spec))
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(rule_tests(spec), sort_keys=False))
    result = promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_the_rule_test_fails_when_the_rule_is_wrong(tmp_path):
    """The unit test above can fail: with the stalled rule's `for` doubled it no longer fires in time."""
    spec = spec_of(PLANNED_STACKS[0])
    rules = observability.render_prometheus_rules(spec)
    broken = rules.replace(f"for: {spec.monitoring.stalled_minutes}m", f"for: {2 * spec.monitoring.stalled_minutes}m", 1)
    assert broken != rules
    (tmp_path / "rules.yml").write_text(broken)
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(rule_tests(spec), sort_keys=False))
    result = promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert result.returncode != 0 and "KimiEngineStalled" in result.stdout + result.stderr


# --- the dashboard -----------------------------------------------------------------------------

@pytest.mark.parametrize("stack", PLANNED_STACKS)
def test_the_grafana_dashboard_draws_every_panel_with_the_stacks_names(stack):
    spec = spec_of(stack)
    dashboard = json.loads(json.dumps(observability.render_grafana_dashboard(spec)))  # JSON all the way
    assert [p["title"] for p in dashboard["panels"]] == [p.title for p in observability.DASHBOARD_PANELS]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert all(f'stack="{stack}"' in e for e in exprs)
    names = catalog.ENGINE_METRICS[spec.engine.name]
    for name in (names.generated_tokens, names.running, names.waiting, names.kv_cache_usage,
                 names.ttft_histogram + "_bucket", names.itl_histogram + "_bucket"):
        assert any(name + "{" in e for e in exprs), name
    other = next(n for n in catalog.ENGINE_METRICS if n != spec.engine.name)
    assert not any(f"{other}:" in e for e in exprs)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    assert {m for p in observability.DASHBOARD_PANELS for m in p.cloudwatch_metrics} <= CLOUDWATCH_METRICS


def test_every_published_cloudwatch_metric_has_a_panel_or_an_alarm():
    shown = {m for p in observability.DASHBOARD_PANELS for m in p.cloudwatch_metrics}
    alarmed = {r.cloudwatch.metric for r in observability.alert_rules(spec_of(PLANNED_STACKS[0]))}
    assert CLOUDWATCH_METRICS == shown | alarmed


def test_the_script_writes_the_three_artifacts_and_refuses_a_refused_stack(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("observability_script", Path("scripts/observability.py").resolve())
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    stack = PLANNED_STACKS[0]
    assert script.main([stack, "--out", str(tmp_path)]) == 0
    assert yaml.safe_load((tmp_path / "prometheus-rules.yml").read_text())["groups"][0]["rules"]
    assert yaml.safe_load((tmp_path / "prometheus-scrape.yml").read_text())["rule_files"] == ["prometheus-rules.yml"]
    assert json.loads((tmp_path / "grafana-dashboard.json").read_text())["title"] == f"kimi-fleet {stack}"
    if PROMTOOL:
        result = promtool("check", "config", "prometheus-scrape.yml", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    assert script.main(["ascend-a3-w4a8-sglang", "--out", str(tmp_path / "refused")]) == 2
    assert "model.revision" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("engine, flag", [("vllm", "--disable-log-stats"), ("sglang", "--enable-metrics")])
def test_the_flag_that_switches_the_metrics_is_in_every_pinned_parser(engine, flag):
    """enabled_by names a real option of each pinned release (the parsers' manifests, read from the
    engines by scripts/engine_flags.py), and SGLang's argv passes its switch."""
    from kimi_fleet.engines.flags import load_manifest
    assert flag in catalog.ENGINE_METRICS[engine].enabled_by
    releases = {i.package_version or i.version for i in catalog.ENGINE_IMAGES.values() if i.engine == engine}
    manifests = {release: load_manifest(engine, release) for release in releases}
    checked = [release for release, manifest in manifests.items() if manifest is not None]
    assert checked, releases
    for release in checked:
        assert flag in manifests[release]["options"], (engine, release)
    stack = next(s for s in PLANNED_STACKS if spec_of(s).engine.name == engine)
    argv = render_launch(Resolved(spec_of(stack))).instances[0].argv
    assert (flag in argv) == (engine == "sglang")


def test_cloudwatch_twins_of_per_replica_rules_take_the_extreme_not_the_mean():
    """The alarms read the stack-level series, one datum per replica per period: a rule that holds
    per replica must fire when one replica is bad, so its twin takes Maximum of a bad value or
    Minimum of a good one. An Average would let one healthy replica hide a stalled one."""
    from kimi_fleet.observability import alert_rules
    from kimi_fleet.stackfile import load_stack_config, stack_file
    spec = load_stack_config(stack_file("h200-int4-vllm")).spec()
    twins = {r.name: r.cloudwatch for r in alert_rules(spec)}
    assert twins["KimiEngineStalled"].statistic == "Maximum"
    assert twins["KimiProxyUnauthorized"].statistic == "Maximum"
    assert twins["KimiProxy5xxRatio"].statistic == "Maximum"
    # ... except where the stack-level extreme misreads a normal rollout: a one-at-a-time refresh keeps
    # some replica unadmitted for longer than the hour, each for less; only "none admitted" is an alarm.
    assert twins["KimiNodeNotAdmitted"].statistic == "Maximum"
    assert twins["KimiGateFailed"].statistic == "Minimum"
    assert all(t.statistic != "Average" for name, t in twins.items() if name != "KimiQueueGrowing")
