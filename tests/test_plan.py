"""The offline planner and the whole program under the mock runtime, for every stack."""

import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from kimi_fleet.stackfile import PROJECT_ROOT, stack_names
from policy.validators import check_resources
from tooling.mock_run import run_stack

PLAN = [sys.executable, str(PROJECT_ROOT / "scripts" / "plan.py")]
_SPEC = importlib.util.spec_from_file_location("plan_script", PROJECT_ROOT / "scripts" / "plan.py")
PLAN_SCRIPT = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(PLAN_SCRIPT)
from tests.matrix import REFUSED_STACKS as REFUSED  # noqa: E402
#: Its VM is launched by pasting the startup script: nothing for Pulumi to declare inside the endpoint.
STARTUP_SCRIPT_ONLY = {"spheron-h200-int4-vllm"}
PLANNED = [name for name in stack_names() if name not in REFUSED]
ENDPOINT_TYPES = {
    "aws": "kimi-fleet:aws:AwsEndpoint",
    "kubernetes": "kimi-fleet:kubernetes:KubernetesEndpoint",
    "host": "kimi-fleet:host:HostEndpoint",
}


def plan(*args, cwd=PROJECT_ROOT, **kwargs) -> subprocess.CompletedProcess:
    """`python scripts/plan.py ARGS`: its main() in this process (the program's imports, about 3.5 s of
    CPU a run, are already here), or a process of its own for another directory or environment (the
    README's `plan.py --all` runs as a process in the plan_all fixture, the diff test too)."""
    if cwd != PROJECT_ROOT or kwargs:
        return subprocess.run([*PLAN, *args], cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = PLAN_SCRIPT.main(list(args))
        except SystemExit as exit_:  # argparse's refusals
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess([*PLAN, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def runs():
    return {name: run_stack(name) for name in PLANNED}


@pytest.mark.parametrize("name", PLANNED)
def test_every_stack_declares_its_endpoint_and_passes_the_mandatory_policies(runs, name):
    run = runs[name]
    assert run.error is None, run.error
    types = {r["type"] for r in run.resources}
    assert types & set(ENDPOINT_TYPES.values())
    for component in ("kimi-fleet:fleet:Fleet", "kimi-fleet:engine:EngineRelease",
                      "kimi-fleet:capacity:CapacityPolicy", "kimi-fleet:proxy:AuthProxy"):
        assert component in types, component
    violations = check_resources([{"type": r["type"], "name": r["name"], "props": r["inputs"],
                                   "options": {"protect": r["protect"], "ignoreChanges": r["ignore_changes"]}}
                                  for r in run.resources])
    assert [v for v in violations if v["enforcement"] == "mandatory"] == []


@pytest.mark.parametrize("name", PLANNED)
def test_every_stack_runs_the_verification_gate_after_its_endpoint(runs, name):
    run = runs[name]
    gate = run.named("kimi-gate-verify")
    endpoint = next(r for r in run.resources if r["type"] in ENDPOINT_TYPES.values())
    # depends_on a component waits for every resource inside it: the node, the proxy, the DNS.
    descendants, frontier = set(), {endpoint["name"]}
    while frontier:
        frontier = {r["name"] for r in run.resources if r["parent"] in frontier}
        descendants |= frontier
    inside = {r["name"] for r in run.resources if r["name"] in descendants and r["custom"]}
    assert inside <= set(run.named("kimi-gate")["dependencies"])
    # A pasted startup script's endpoint declares only its generated secrets (the host's metrics key).
    machines = {r["name"] for r in run.resources if r["name"] in inside and not r["type"].startswith("random:")}
    assert bool(machines) is (name not in STARTUP_SCRIPT_ONLY)
    create = gate["inputs"]["create"]
    assert "scripts/verify.py" in create and "--wait-ready" in create
    assert "--api-key" not in create  # the key travels in the environment, as a secret
    assert gate["inputs"]["environment"]["KIMI_API_KEY"] == "[secret]"
    assert len(gate["inputs"]["triggers"]) >= 3
    wait = int(create.split("--wait-ready ")[1].split()[0])
    assert int(gate["timeouts"]["create"].rstrip("s")) > wait


@pytest.mark.parametrize("name", PLANNED)
def test_client_outputs_and_a_secret_key(runs, name):
    outputs = runs[name].outputs
    assert outputs["openai_base_url"].startswith("https://") and outputs["openai_base_url"].endswith("/v1")
    assert outputs["api_key"] == "[secret]"
    assert outputs["model"] == "kimi-k2.6"
    # A host's scrape endpoint has a key of its own, exported only as a secret; other targets have none.
    from kimi_fleet.stackfile import load_stack_config, stack_file
    host = load_stack_config(stack_file(name)).spec().target.kind == "host"
    assert outputs["metrics_key"] == ("[secret]" if host else None), outputs["metrics_key"]


def test_all_prints_one_row_per_stack(plan_all):
    result = plan_all
    assert result.returncode == 0, result.stderr
    table = result.stdout.strip().split("\n\n")[0]  # the footnotes on $/M follow a blank line
    header, *rows = table.splitlines()
    assert header.split()[:2] == ["stack", "status"]
    assert [row.split()[0] for row in rows] == stack_names()
    for row in rows:
        name, status = row.split()[:2]
        assert status == ("REFUSED" if name in REFUSED else "ok"), row
        if name in REFUSED:  # the field, and where the whole reason is: never a reason cut mid-word
            assert row.endswith(f"by kimi-fleet:{REFUSED[name]}: plan.py {name} says why"), row
    legend = result.stdout.strip().split("\n\n")[1]
    for column in ("res:", "context:", "max ctx:", "seqs:", "KV GiB:", "replicas:", "$/hour:", "$/M out:"):
        assert column in legend
    from kimi_fleet.stackfile import load_stack_config, stack_file

    for row in rows:  # the replicas column: a fixed stack's count, a scaling stack's range
        name, status, *columns = row.split()
        if status == "ok":
            capacity = load_stack_config(stack_file(name)).spec().capacity
            expected = (f"{capacity.scaling.min_replicas}-{capacity.scaling.max_replicas}" if capacity.scaling
                        else str(capacity.replicas))
            assert columns[5] == expected, row


def test_json_has_the_documented_fields_and_artifacts_are_written(tmp_path):
    result = plan("h200-int4-sglang", "--json", "--build-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (doc,) = json.loads(result.stdout)
    for key in ("stack", "valid", "errors", "resources", "sizing", "cost", "artifacts"):
        assert key in doc
    assert doc["valid"] and doc["errors"] == []
    assert {"type", "name", "parent", "inputs"} <= set(doc["resources"][0])
    assert doc["cost"]["usd_per_million_output_tokens"] is None  # no measurement of DP attention on H200
    assert "no published throughput for this layout" in doc["cost"]["throughput_note"]
    assert doc["spot_preflight"] is None  # interactive on-demand: nothing to pre-flight
    written = {p.name for p in (tmp_path / "h200-int4-sglang").iterdir()}
    assert {"user-data.yaml", "Caddyfile", "kimi-engine@.service", "engine-0.env", "launch.json"} <= written


def test_spot_stack_says_the_preflight_could_not_check_offline(tmp_path, monkeypatch):
    # In this process, with no AWS settings: the pre-flight makes its boto3 session at the call, from
    # this environment (as a process of its own started with it would).
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    result = plan("h200-int4-vllm", "--build-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "spot pre-flight: could not check" in result.stdout


def test_human_output_shows_node_volume_proxy_dns_and_market(tmp_path):
    result = plan("h200-int4-sglang", "--build-dir", str(tmp_path))
    out = result.stdout
    for needle in ("kimi-fleet:aws:GpuNode", "kimi-fleet:aws:WeightVolume", "kimi-fleet:proxy:AuthProxy",
                   "kimi-fleet:aws:DnsRecord", "market on-demand", "no $/M tokens: no published throughput",
                   "per rank: prefill tokens per step 1,024", "outside the knob: needs",
                   "AMI: ami-0123456789abcdef0, read from SSM", "WARNING: no acmeEmail for kimi-h200.example.com"):
        assert needle in out, needle


def test_an_invalid_stack_file_exits_2_and_declares_nothing(tmp_path):
    bad = tmp_path / "Pulumi.bad.yaml"
    bad.write_text("config:\n  kimi-fleet:accelerator: mi300x\n  kimi-fleet:engine: {name: sglang}\n"
                   "  kimi-fleet:parallelism: {tensorParallel: 8}\n  kimi-fleet:target: {kind: host}\n"
                   "  kimi-fleet:domain: kimi.example.com\n")
    result = plan("--stack-file", str(bad), "--build-dir", str(tmp_path / "build"))
    assert result.returncode == 2
    assert result.stderr.strip() == "plan.py: bad refused by kimi-fleet:parallelism.tensorParallel"
    assert "tensor parallel <= 4" in result.stdout and str(bad) in result.stdout
    assert "REFUSED, nothing declared" in result.stdout
    assert not (tmp_path / "build").exists()


def test_a_refused_matrix_stack_exits_2():
    result = plan("ascend-a3-w4a8-sglang")
    assert result.returncode == 2 and "model.revision" in result.stderr
    # The reasons once (under the refusal), one line naming the fields on stderr.
    assert result.stderr.strip() == "plan.py: ascend-a3-w4a8-sglang refused by kimi-fleet:model.revision"
    assert result.stdout.count("no pinned 40-hex commit") == 1


def test_a_mistyped_stack_name_gets_the_nearest_one():
    result = plan("h200-int4-vlm")
    assert result.returncode == 2 and "unknown stack 'h200-int4-vlm' (did you mean 'h200-int4-vllm'?)" in result.stderr


def test_diff_shows_exactly_a_kv_dtype_change(tmp_path):
    """`plan --diff HEAD~1` on a commit that changes one stack's KV dtype."""
    repo = tmp_path / "repo"
    shutil.copytree(PROJECT_ROOT, repo, ignore=shutil.ignore_patterns(".venv", "build", ".git", "__pycache__",
                                                                      ".pytest_cache"))
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}

    def git(*args):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=env)

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "base")
    stack = repo / "stacks" / "Pulumi.h200-int4-sglang.yaml"
    stack.write_text(stack.read_text().replace("  kimi-fleet:accelerator: h200\n",
                                               "  kimi-fleet:accelerator: h200\n  kimi-fleet:kvCacheDtype: fp8_e4m3\n"))
    git("commit", "-qam", "fp8 KV on h200-int4-sglang")

    result = subprocess.run([sys.executable, "scripts/plan.py", "--diff", "HEAD~1"], cwd=repo, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    markdown = result.stdout
    sections = [line for line in markdown.splitlines() if line.startswith("### ")]
    assert sections == ["### h200-int4-sglang"]
    assert "+`--kv-cache-dtype fp8_e4m3`" in markdown
    assert "kv_dtype auto → fp8_e4m3" in markdown
    assert "kv_tokens_per_device" in markdown
    assert "engine-0.argv.json" in markdown and "fp8_e4m3" in markdown.split("engine-0.argv.json", 1)[1]
    assert "Unchanged:" in markdown and "gb200-int4-vllm" in markdown.split("Unchanged:")[1]


def test_startup_script_cloud_gets_a_valid_pasteable_cloud_config(tmp_path):
    """Seed 000's GPU cloud takes only a startup script: plan writes it, cloud-init accepts it."""
    result = plan("spheron-h200-int4-vllm", "--build-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "set before `pulumi up`" not in result.stdout  # no SSH for a pasted script
    script = tmp_path / "spheron-h200-int4-vllm" / "startup-script.yaml"
    check = subprocess.run(["cloud-init", "schema", "--config-file", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "kimi-bootstrap" in script.read_text()


# --- issue 20: replacements first, in words; the AMI's origin; the ACME contact --------------------


def test_the_plan_records_what_decides_a_replacement(tmp_path):
    result = plan("h200-int4-sglang", "--json", "--no-preflight", "--build-dir", str(tmp_path))
    (doc,) = json.loads(result.stdout)
    (volume,) = [r for r in doc["resources"] if r["type"] == "aws:ebs/volume:Volume"]
    assert volume["protect"] is True and volume["ignore_changes"] == ["availabilityZone"]
    assert volume["id"] and doc["ami"].startswith("ami-0123456789abcdef0")
    assert doc["warnings"] == [w for w in doc["warnings"] if "acmeEmail" in w] and len(doc["warnings"]) == 1
    assert not [v for v in doc["policy_violations"] if v["policy"] == "weights-volume-protected"]


def _resolved(stack, **changes):
    from kimi_fleet.resolve import Resolved
    from kimi_fleet.stackfile import load_stack_config, stack_file

    spec = load_stack_config(stack_file(stack)).spec()
    return Resolved(spec.model_copy(update=changes))


@pytest.mark.parametrize("stack", ["h200-int4-sglang", "mi300x-int4-sglang"])
def test_acme_without_an_email_is_one_warning_and_an_email_silences_it(stack):
    from kimi_fleet.replacement import acme_warning

    warning = acme_warning(_resolved(stack))
    assert warning.startswith("no acmeEmail for kimi-") and "kimi-fleet:acmeEmail" in warning
    assert "\n" not in warning
    assert acme_warning(_resolved(stack, acme_email="ops@example.com")) is None


def test_a_kubernetes_proxy_without_a_public_certificate_needs_no_email():
    from kimi_fleet.k8s_manifests import proxy_tls
    from kimi_fleet.replacement import acme_warning

    r = _resolved("gb200-int4-vllm")
    assert (acme_warning(r) is None) is (proxy_tls(r) == "internal")


def _plan(resources, rollout, **extra):
    return {"valid": True, "errors": [], "resources": resources, "rollout": rollout, **extra}


def test_the_diff_prints_replacements_first_and_no_in_place_story_for_a_replaced_node(tmp_path):
    from tooling.plan_diff import stack_section

    rollout = {"target": "aws", "replicas": 1, "rollout": "one-at-a-time", "release": "r1", "machine": "p5en",
               "node_shape": "p5en/200GiB", "weights_volume": "ebs", "warm_start_seconds": 270,
               "cold_start_seconds": 1700, "node_usd_per_hour": 63.3, "units": {"caddy.service": "a"},
               "checkpoint": "m@1", "checkpoint_bytes": 1, "weights_volume_bytes": 2, "fetch_seconds": 600,
               "volume_start_seconds": 900}
    node = {"type": "kimi-fleet:aws:GpuNode", "name": "n", "parent": None, "inputs": {}}

    def instance(version):
        return {"type": "aws:ec2/instance:Instance", "name": "i", "parent": "n", "id": "i-id", "protect": False,
                "ignore_changes": [], "inputs": {"launchTemplate": {"id": "lt", "version": version}}}

    before = _plan([node, instance("1")], rollout)
    after = _plan([node, instance("2")], {**rollout, "release": "r2", "units": {"caddy.service": "b"}},
                  warnings=["no acmeEmail for x: ..."])
    lines = stack_section("s", before, after, tmp_path, tmp_path)
    assert lines[0] == "### s"
    assert lines[1].startswith("- **replaced**: the GPU node `i`") and "about 30 min without service" in lines[1]
    assert not any("in place (SSM)" in line for line in lines)
    assert "- warning: no acmeEmail for x: ..." in lines
    same = stack_section("s", before, _plan([node, instance("1")], {**rollout, "release": "r2",
                                                                     "units": {"caddy.service": "b"}}),
                         tmp_path, tmp_path)
    assert any("in place (SSM): caddy.service restart" in line for line in same)
    assert not any("replaced" in line for line in same)


def test_a_resource_registered_under_an_alias_of_its_old_name_is_a_move_not_a_removal_and_an_addition(tmp_path):
    """The drain hook moved from FleetScaling to the fleet (an alias keeps its state): the PR's diff must
    not show it deleted and created, and a replace-on-change input is still compared with the old one."""
    from kimi_fleet.replacement import replacements
    from tooling.plan_diff import stack_section

    hook = "aws:autoscaling/lifecycleHook:LifecycleHook"
    inputs = {"name": "kimi-drain", "autoscalingGroupName": "g", "heartbeatTimeout": 7200}
    before = _plan([{"type": hook, "name": "n-scaling-drain", "parent": "n-scaling", "inputs": inputs}], None)
    moved = {"type": hook, "name": "n-drain", "parent": "n", "inputs": inputs, "aliases": ["n-scaling-drain"]}
    lines = stack_section("s", before, _plan([moved], None), tmp_path, tmp_path)
    assert any(line.startswith(f"- resource moved: `{hook}` n-scaling-drain → n-drain") for line in lines), lines
    assert not any("resource added" in line or "resource removed" in line for line in lines), lines
    # Moved and renamed in AWS: still a replacement (the provider replaces a hook whose name changes).
    renamed = {**moved, "inputs": {**inputs, "name": "other"}}
    assert [r.name for r in replacements(before["resources"], [renamed])] == ["n-drain"]
    # Without the alias it is what it would be: one removed, one added.
    plain = stack_section("s", before, _plan([{**moved, "aliases": []}], None), tmp_path, tmp_path)
    assert f"- resource added: `{hook}` n-drain" in plain and f"- resource removed: `{hook}` n-scaling-drain" in plain


# --- issue 24, item 3: a scaling stack's range, cost range, time to ready, cooldowns, what it absorbs ---


def scaling_stack_file(tmp_path, stack: str, capacity: dict, name: str = "scaling", **config) -> "Path":
    """A stack of stacks/ with a scaling range, as a file of its own (stacks/ are not the tests')."""
    import yaml

    data = yaml.safe_load((PROJECT_ROOT / "stacks" / f"Pulumi.{stack}.yaml").read_text())
    data["config"]["kimi-fleet:capacity"] = capacity
    data["config"].update({f"kimi-fleet:{key}": value for key, value in config.items()})
    path = tmp_path / f"Pulumi.{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_scaling_stack_prints_its_range_cost_range_time_to_ready_cooldowns_and_what_it_absorbs(tmp_path):
    from kimi_fleet import catalog, health
    from kimi_fleet.resolve import Resolved
    from kimi_fleet.sizing import size
    from kimi_fleet.stackfile import load_stack_config

    path = scaling_stack_file(tmp_path, "h200-int4-vllm", {
        "workload": "batch", "replicas": 2, "scaling": {"minReplicas": 1, "maxReplicas": 4, "waitingPerReplica": 4}})
    result = plan("--stack-file", str(path), "--no-preflight", "--build-dir", str(tmp_path / "build"))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # Batch on spot with no on-demand base: every replica at the snapshot's spot price.
    spot = catalog.MACHINE_OFFERS["p5en.48xlarge"].spot_typical_usd_per_hour
    assert (f"  scaling: 1 to 4 replicas following 4 requests waiting per replica; ${spot:,.2f}/h at 1 to "
            f"${4 * spot:,.2f}/h at 4 (the prices above; the stack's ${2 * spot:,.2f}/h and $/M are at the 2 "
            "replica(s) a first deploy starts with)") in out
    sizing = size(Resolved(load_stack_config(path).spec()))
    ready = health.BOOT_SECONDS + health.IMAGE_PULL_SECONDS + sizing.cold_start_seconds
    assert (f"    a new replica needs about {ready / 60:.0f} min to serve: boot 5 min + image pull 10 min + "
            f"cold start (download, verify, read, load) {sizing.cold_start_seconds / 60:.0f} min") in out
    scale_in = math.ceil(ready / 60)
    assert "cooldowns: scale out at most every 1 min (one metric period" in out
    assert f"scale in only after {scale_in} min below the target (one time to ready" in out
    assert "drain: a replica removed stops taking requests and finishes its running ones for up to 120 min" in out
    # What the AWS group really does with it (components/fleet_scaling.py: target tracking, no cooldowns).
    assert (f"on AWS a launched replica stays out of service until admitted (its {ready / 60:.0f} min above" in out
            and f"then warms up for the load balancer's checks ({health.REFRESH_WARMUP_SECONDS} s)" in out
            and "scales in by AWS's own managed low alarm, not by the window above" in out)
    assert (f"absorbs: a new replica serves about {ready / 60:.0f} min after the queue crosses its target "
            f"(plus up to 60 s for the metric): a spike shorter than that is absorbed only by the replicas "
            f"already running (1 x {sizing.concurrent_sequences_per_engine} full-context sequences") in out

    doc, = json.loads(plan("--stack-file", str(path), "--json", "--no-preflight", "--build-dir",
                           str(tmp_path / "build")).stdout)
    assert doc["scaling"]["instance_warmup_seconds"] == ready and doc["scaling"]["scale_in_cooldown_seconds"] == scale_in * 60
    assert doc["cost"]["scaling_range"] == {"min_replicas": 1, "max_replicas": 4, "low_usd_per_hour": round(spot, 2),
                                            "high_usd_per_hour": round(4 * spot, 2)}
    sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
    from plan import SUMMARY_HEADER, summary_row

    columns = dict(zip(SUMMARY_HEADER.replace("max ctx", "max_ctx").replace("KV GiB", "KV_GiB").replace(
        "$/M out", "$/M_out").split(), summary_row(doc).split()))
    assert columns["replicas"] == "1-4" and columns["$/hour"] == f"${2 * spot:,.2f}"


def test_an_interactive_spot_range_keeps_its_on_demand_base_at_both_ends():
    from kimi_fleet import catalog
    from kimi_fleet.cost import estimate
    from kimi_fleet.resolve import Resolved
    from kimi_fleet.validation import parse_spec
    from kimi_fleet.stackfile import load_stack_config, stack_file

    values = load_stack_config(stack_file("h200-int4-vllm")).values
    values = {**values, "capacity": {"workload": "interactive", "market": "spot", "onDemandBase": 1, "replicas": 1,
                                     "scaling": {"minReplicas": 1, "maxReplicas": 3, "ttftP99Seconds": 8}}}
    cost = estimate(Resolved(parse_spec(values, "h200-int4-vllm", "f")))
    offer = catalog.MACHINE_OFFERS["p5en.48xlarge"]
    assert cost.scaling_range["low_usd_per_hour"] == round(offer.on_demand_usd_per_hour, 2)
    assert cost.scaling_range["high_usd_per_hour"] == round(offer.on_demand_usd_per_hour
                                                            + 2 * offer.spot_typical_usd_per_hour, 2)
    assert cost.fleet_usd_per_hour == cost.scaling_range["low_usd_per_hour"]  # a first deploy starts with 1


def test_a_fixed_stack_prints_no_scaling(tmp_path):
    result = plan("h200-int4-sglang", "--no-preflight", "--build-dir", str(tmp_path))
    assert result.returncode == 0 and "  scaling:" not in result.stdout


def test_a_batch_stack_scaling_to_zero_is_refused_with_what_a_first_request_would_meet(tmp_path):
    path = scaling_stack_file(tmp_path, "h200-int4-vllm", {
        "workload": "batch", "replicas": 1, "scaling": {"minReplicas": 0, "maxReplicas": 4, "waitingPerReplica": 4}})
    result = plan("--stack-file", str(path), "--no-preflight", "--build-dir", str(tmp_path / "build"))
    assert result.returncode == 2
    assert "capacity.scaling.minReplicas" in result.stderr
    assert "cannot scale back up from zero" in result.stdout and "nothing is queued" in result.stdout
