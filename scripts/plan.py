#!/usr/bin/env python3
"""The offline plan: what a stack would create, how it fits in GPU memory, what it costs.

Runs the real Pulumi program under the SDK's mock runtime (no cloud, no CLI) with config merged
from Pulumi.yaml and the stack file, checks the result against the policy pack, and writes every
rendered artifact to build/STACK/.

    python scripts/plan.py h200-int4-sglang
    python scripts/plan.py --all
    python scripts/plan.py --stack-file path/to/Pulumi.mystack.yaml
    python scripts/plan.py --all --json
    python scripts/plan.py --diff HEAD~1        # Markdown for a PR comment

Exit codes: 0 planned (with --all: every stack planned or refused with its reason), 2 a stack
that was asked for by name is invalid or the arguments are wrong, 1 an unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import textwrap
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from kimi_fleet import catalog, engine_bugs, health, k8s_manifests, key_rotation, lifecycle_rights  # noqa: E402
from kimi_fleet.artifacts import render_artifacts  # noqa: E402
from kimi_fleet.autoscaling import scaling_policy  # noqa: E402
from kimi_fleet.cost import estimate  # noqa: E402
from kimi_fleet.launch import render_launch  # noqa: E402
from kimi_fleet.mirror import plan_mirror, shared_mirror_problems  # noqa: E402
from kimi_fleet.node_files import ADMISSION_DEADLINE_SECONDS, behind_load_balancer, compile_cache_archive  # noqa: E402
from kimi_fleet.resolve import Resolved  # noqa: E402
from kimi_fleet.replacement import acme_warning, ami_origin  # noqa: E402
from kimi_fleet.rollout import PERSISTENT_WEIGHTS, RolloutFacts, checkpoint_room, rollout_facts  # noqa: E402
from kimi_fleet.sizing import gib, node_weights, size  # noqa: E402
from kimi_fleet.spec import StackSpecError, did_you_mean  # noqa: E402
from kimi_fleet.stackfile import (  # noqa: E402
    STACKS_DIR, StackConfig, StackFileError, load_stack_config, stack_file, stack_names, validate_stack_name,
)

BUILD_DIR = PROJECT_ROOT / "build"
EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def node_layout(r: Resolved) -> list[dict]:
    """A multi-node replica, node by node: its role, pipeline stage, layers, what it fetches and its
    engine line."""
    rows, weights = [], {row["node_rank"]: row for row in node_weights(r)}
    for rank, (first, end) in enumerate(r.stage_ranges):
        instance = render_launch(r, rank).instances[0]
        fetch = weights[rank]
        rows.append({"node_rank": rank, "role": "leader (serves the API)" if rank == 0 else "worker (headless)",
                     "stage": rank, "layers": f"{first}-{end - 1}", "gpus": list(instance.device_ids),
                     "fetches": fetch["files"], "fetch_bytes": fetch["bytes"], "fetch_estimate": fetch["estimate"],
                     "fetch_basis": fetch.get("basis", ""), "argv": list(instance.argv)})
    return rows


def artifact_dir(build_dir: Path, stack: str) -> Path:
    """build/<stack>, the only directory the planner ever removes: refuse anything else."""
    validate_stack_name(stack, "build directory")
    out = (build_dir / stack).resolve()
    if out.parent != build_dir.resolve() or out == PROJECT_ROOT or PROJECT_ROOT.is_relative_to(out):
        raise StackFileError(f"refusing to write artifacts to {out}: not a directory below {build_dir}")
    return out


def plan_config(config: StackConfig, build_dir: Path, *, preflight: bool = True) -> dict:
    """Plan one stack: a JSON-ready dict. An invalid stack declares nothing."""
    result = {"stack": config.stack, "file": str(config.relative_path), "valid": False, "errors": [],
              "resources": [], "outputs": {}, "sizing": None, "cost": None, "artifacts": [],
              "policy_violations": [], "missing_secrets": [], "spot_preflight": None, "launch": None,
              "rollout": None, "mirror": None, "compile_cache": None, "ami": None, "warnings": [], "health": None,
              "kubernetes_rollout": None, "api_key": None, "layout": None, "scaling": None}
    try:
        spec = config.spec()
    except StackSpecError as error:
        result["errors"] = [f"{error.stack_file}: {p}" for p in error.problems]
        return result
    resolved = Resolved(spec)
    sizing = size(resolved)
    launch = render_launch(resolved)
    result["sizing"] = sizing.as_dict()
    result["cost"] = estimate(resolved).as_dict()
    policy = scaling_policy(resolved, sizing)
    result["scaling"] = policy.as_dict() if policy else None
    result["scaling_lines"] = policy.lines() if policy else []
    if resolved.target.renders_manifests:  # scale to zero: what the wake front answers and costs
        from kimi_fleet.k8s_wake import plan_lines as wake_plan_lines
        result["scaling_lines"] += wake_plan_lines(resolved, sizing)
    result["launch"] = {"image": launch.image, "engines": [list(i.argv) for i in launch.instances]}
    result["rollout"] = rollout_facts(resolved, sizing, launch, estimate(resolved)).as_dict()
    result["layout"] = node_layout(resolved) if resolved.multi_node else None
    result["api_key"] = key_rotation.api_key_facts(spec, config.secure_fingerprints)
    shared_node = None
    if resolved.target.renders_manifests:  # pods: the gate waits for the rollout and undoes a failed one
        result["kubernetes_rollout"] = k8s_manifests.rollout_cost(resolved, sizing)
    else:  # nodes: a watchdog and, on a fleet, its group's health check
        windows = health.windows(sizing, verification_seconds=ADMISSION_DEADLINE_SECONDS,
                                 fleet=behind_load_balancer(resolved))
        result["health"] = windows.lines()
        # One pod per engine on Kubernetes (readiness by generation): only a node's proxy shares engines.
        shared_node = health.shared_node_exposure(
            resolved.spec.engine.name, resolved.engine.health_path, resolved.engine.health_runs_generation,
            resolved.engines_per_node, windows)
    archive = compile_cache_archive(resolved, launch)
    result["compile_cache"] = {"volume": resolved.weights_volume, "shared_archive": archive,
                               "expiry_days": catalog.MIRROR_COMPILE_CACHE_EXPIRY_DAYS if archive else None}
    mirror = plan_mirror(resolved)
    if mirror:
        result["mirror"] = {"uri": mirror.uri, "creates_bucket": mirror.create_bucket, "fill_id": mirror.fill_id,
                            "fill_seconds": mirror.fill_seconds, "fill_usd": mirror.fill_usd,
                            "monthly_storage_usd": mirror.monthly_storage_usd, "lines": mirror.describe()}
    try:  # what lands on nodes is rendered before anything is declared: a file too big is a refusal
        artifacts = render_artifacts(resolved, sizing, launch)
    except ValueError as error:
        result["errors"] = [f"{config.relative_path}: {error}"]
        return result

    from tooling.mock_run import run_config  # imports Pulumi: only once the spec is valid

    run = run_config(config)
    result["missing_secrets"] = run.missing_secrets
    if run.error:
        result["errors"] = [run.error]
        return result
    result["resources"] = [
        {k: r[k] for k in ("type", "name", "parent", "inputs", "dependencies", "timeouts", "id", "protect",
                           "ignore_changes", "aliases")} for r in run.resources
    ]
    result["ami"] = ami_origin(spec, result["resources"])
    result["warnings"] = ([w for w in (acme_warning(resolved), shared_node) if w]
                          + engine_bugs.warnings_for(resolved))
    result["outputs"] = run.outputs

    from policy.validators import check_resources

    result["policy_violations"] = check_resources(
        [{"type": r["type"], "name": r["name"], "props": r["inputs"],
          "options": {"protect": r["protect"], "ignoreChanges": r["ignore_changes"]}} for r in run.resources]
    )
    mandatory = [v for v in result["policy_violations"] if v["enforcement"] == "mandatory"]
    result["errors"] = [f"policy {v['policy']} on {v['resource']}: {v['message']}" for v in mandatory]

    out = artifact_dir(build_dir, config.stack)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name, text in sorted(artifacts.items()):
        (out / name).write_text(text)
        path = out / name
        result["artifacts"].append(str(path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path))
    if preflight and resolved.target.checks_spot_offers(resolved):
        from kimi_fleet.spot_preflight import spot_preflight

        check = spot_preflight(resolved.offer.instance_type, spec.target.aws.region, spec.capacity.replicas)
        result["spot_preflight"] = {"checked": check.checked, "reason": check.reason,
                                    "placement_scores": check.placement_scores,
                                    "current_prices": check.current_prices}
    result["valid"] = not result["errors"]
    return result


# --- human-readable output ---------------------------------------------------------------------


def _min(seconds: int) -> str:
    return f"{seconds / 60:.0f}" if seconds >= 60 else f"{seconds / 60:.1f}"


def _money(value) -> str:
    return "n/a" if value is None else f"${value:,.2f}"


def print_tree(resources: list[dict]) -> None:
    children: dict[str | None, list[dict]] = {}
    names = {r["name"] for r in resources}
    for r in resources:
        parent = r["parent"] if r["parent"] in names else None
        children.setdefault(parent, []).append(r)

    def walk(parent: str | None, depth: int) -> None:
        for r in children.get(parent, []):
            print(f"  {'  ' * depth}{r['type']}  {r['name']}")
            walk(r["name"], depth + 1)

    walk(None, 0)


def _release_mechanism(rollout: dict) -> str:
    if rollout["target"] == "host":
        return "re-runs the bootstrap over SSH, which restarts only the units whose inputs changed"
    if rollout["target"] == "aws" and rollout["replicas"] == 1:
        return ("is applied in place by an SSM association (only changed units restart); a new instance "
                "type replaces the instance")
    return f"rolls the {rollout['replicas']} replicas ({rollout['rollout']})"


def print_layout(p: dict) -> None:
    layout = p.get("layout")
    if not layout:
        return
    print(f"  one replica over {len(layout)} nodes (tensor parallel inside each, one pipeline stage per node):")
    for node in layout:
        print(f"    node {node['node_rank']}: {node['role']}, stage {node['stage']}, layers {node['layers']}, "
              f"GPUs {','.join(map(str, node['gpus']))}")
        bytes_ = f"{'~' if node['fetch_estimate'] else ''}{node['fetch_bytes'] / 1e9:.0f} GB"
        print(f"      fetches and verifies {bytes_}: {node['fetches']}"
              + (f" ({node['fetch_basis']})" if node["fetch_basis"] else ""))
        print(f"      {shlex.join(node['argv'])}")


def print_plan(p: dict) -> None:
    print(f"== {p['stack']} ({p['file']})")
    if p["errors"] and not p["resources"]:
        print("  REFUSED, nothing declared:")
        for e in p["errors"]:
            print(f"  - {e}")
        if p.get("layout"):  # sized and laid out, not deployable yet: show what was checked
            print_sizing(p)
            print_layout(p)
            print_cost(p)
            print_scaling(p)
        return
    print(f"  resources ({len(p['resources'])}):")
    print_tree(p["resources"])
    print_sizing(p)
    print_layout(p)
    print_operations(p)
    print_cost(p)
    print_scaling(p)
    print_tail(p)


def print_sizing(p: dict) -> None:
    s = p["sizing"]
    g = s["gib"]
    print("  sizing (per device):")
    engine_items = ", ".join(f"{name} {gib(value)}" for name, value in s["reserve_items"].items())
    print(f"    memory {g['device_memory']} GiB x knob {s['memory_knob']} = budget {g['budget']} GiB: weights "
          f"{g['weights_per_device']}, vision {g['vision_per_device']}, engine {g['reserve_per_device']} "
          f"({engine_items}), KV pool {g['kv_pool_per_device']} GiB")
    if s["outside_items"]:
        outside = ", ".join(f"{name} {gib(value)}" for name, value in s["outside_items"].items())
        print(f"    outside the knob: needs {g['outside_need']} GiB ({outside}), {g['outside_available']} GiB free")
    print("    per rank: " + ", ".join(f"{name} {value:,}" for name, value in s["per_rank"].items()))
    for a in s.get("engine_adjustments") or []:
        print(f"    the engine runs {a['flag']} {a['given']} as {a['effective']:,} on {a['scope']} "
              f"({a['where']}: \"{a['log']}\")")
    print(f"    KV {s['kv_bytes_per_token']} B/token ({s['kv_dtype']}), replicated on {s['kv_replication']} rank(s): "
          f"{s['kv_tokens_per_device']:,} tokens per device; one sequence up to {s['largest_context']:,} tokens; "
          f"{s['concurrent_sequences_per_engine']} x {s['context_length']:,}-token sequences per engine, "
          f"{s['engines_per_node']} engine(s) per node")
    print(f"    time to ready: cold {_min(s['cold_start_seconds'])} min (new node), from its volume "
          f"{_min(s['volume_start_seconds'])} min (verified weights kept), warm {_min(s['warm_start_seconds'])} min "
          "(engine restart, checkpoint in the page cache):")
    for phase in s["ready_phases"]:
        floor = f"; floor {_min(phase['floor_seconds'])} min" if phase["floor_seconds"] < phase["seconds"] else ""
        lower = f"; lower it: {phase['lower_it']}" if phase["lower_it"] else ""
        print(f"      {phase['phase']:<8} {_min(phase['seconds']):>3} min{floor}: {phase['basis']}{lower}")


def print_operations(p: dict) -> None:
    if p.get("mirror"):
        print("  weights mirror (managed): " + "\n    ".join(p["mirror"]["lines"]))
    cache = p["compile_cache"]
    shared = (f"shared through the mirror beside {cache['shared_archive']}: a node uploads a candidate once "
              "admitted, the gate (your credentials) checks and promotes it by its SHA-256 into the stack's SSM "
              "prefix, and a node whose volume has none restores only that digest (promoted archives expire "
              f"{cache['expiry_days']} days after)"
              if cache["shared_archive"] else "not shared between nodes (no managed mirror, or the ranks of a "
              "multi-node replica, whose launches name their peers)")
    print(f"  compile caches: beside the weights on the {cache['volume']} volume; {shared}")
    rollout = p["rollout"]
    print(f"  release {rollout['release']} (every proxied answer carries it in X-Kimi-Fleet-Release); "
          f"a new release {_release_mechanism(rollout)}")
    if p.get("kubernetes_rollout"):
        print(f"  rollout: {p['kubernetes_rollout']}")
    for line in p.get("health") or []:
        print(f"  health: {line}")
    rights = lifecycle_rights.plan_line(p["resources"])
    if rights:
        print(f"  {rights}")
    if rollout["weights_volume"] in PERSISTENT_WEIGHTS:
        print(f"  a new checkpoint revision is downloaded {checkpoint_room(RolloutFacts.from_dict(rollout))}")


def print_cost(p: dict) -> None:
    c = p["cost"]
    nodes = f" ({c['nodes_per_replica']} nodes each)" if c["nodes_per_replica"] > 1 else ""
    print(f"  cost: {c['instance_type'] or 'no catalog machine'}; market {c['market']}, {c['replicas']} replica(s)"
          f"{nodes}, {c['on_demand_replicas']} on demand; on-demand {_money(c['on_demand_usd_per_hour'])}/h, spot "
          f"{_money(c['spot_usd_per_hour'])}/h per replica; stack {_money(c['fleet_usd_per_hour'])}/h")
    for line in throughput_lines(c):
        print(f"    {line}")
    print(f"    {c['note']}")


def print_scaling(p: dict) -> None:
    """A scaling stack: its range, its cost per hour at both ends, a new replica's time to ready, the
    cooldowns, the drain and what it can absorb (kimi_fleet.autoscaling)."""
    policy = p.get("scaling")
    if not policy:
        return
    c = p["cost"]
    priced = c.get("scaling_range") or {}
    low, high = policy["min_replicas"], policy["max_replicas"]
    target = (f"{policy['target_value']:g} requests waiting per replica" if policy["metric"] == "waiting"
              else f"a p99 time to first token of {policy['target_value']:g} s")
    if priced.get("low_usd_per_hour") is None:  # a cluster's nodes: the catalog prices no pod
        print(f"  scaling: {low} to {high} replicas following {target}; no price per hour (the cluster's nodes are "
              "not in the catalog's price snapshots)")
    else:
        print(f"  scaling: {low} to {high} replicas following {target}; {_money(priced.get('low_usd_per_hour'))}/h "
              f"at {low} to {_money(priced.get('high_usd_per_hour'))}/h at {high} (the prices above; the stack's "
              f"{_money(c['fleet_usd_per_hour'])}/h and $/M are at the {c['replicas']} replica(s) a first deploy "
              "starts with)")
    for line in p.get("scaling_lines") or []:
        print(f"    {line}")
    if policy["target"] == "aws":  # components/fleet_scaling.py: EC2 target tracking takes no cooldowns
        print(f"    on AWS a launched replica stays out of service until admitted (its {_min(policy['instance_warmup_seconds'])} "
              "min above, already in the desired count: no second launch for one spike), then warms up for the load "
              f"balancer's checks ({health.REFRESH_WARMUP_SECONDS} s); the group scales in by AWS's own managed low "
              "alarm, not by the window above: a lull shorter than it may remove a replica")


def throughput_lines(c: dict) -> list[str]:
    """$/M for each workload a Kimi-K2.6 fact prices, at the per-user speed it was measured at, and the
    fact's name; for the others, why not and which facts exist."""
    lines = []
    for kind, w in c["workloads"].items():
        if w is None:
            continue
        user = (f"{w['per_user_tokens_per_second']:g} tok/s per user" if w["per_user_tokens_per_second"]
                else "per-user speed not published")
        price = (f"{_money(w['usd_per_million_output_tokens'])} per million output tokens"
                 if w["usd_per_million_output_tokens"] is not None else "no price to turn it into $/M tokens")
        lines.append(f"{kind}: {price} at {user}, {w['output_tokens_per_second']:g} tok/s per replica "
                     f"(fact {w['described']})")
        if w["conditions"]:
            lines.append(f"  measured with: {w['conditions']}")
    if c["throughput_note"]:
        first, *rest = c["throughput_note"].splitlines()
        lines += [f"no $/M tokens: {first}", *(f"  {line}" for line in rest)]
    return lines


def print_tail(p: dict) -> None:
    if p["spot_preflight"]:
        print(f"  spot pre-flight: {p['spot_preflight']['reason']}")
    if p.get("api_key"):
        print(f"  API key: {key_rotation.describe(p['api_key'])}")
    if p.get("ami"):
        print(f"  AMI: {p['ami']}")
    for warning in p.get("warnings") or []:
        print(f"  WARNING: {warning}")
    if p["missing_secrets"]:
        print(f"  set before `pulumi up`: {', '.join(p['missing_secrets'])} (pulumi config set --secret ...)")
    for v in p["policy_violations"]:
        print(f"  policy {v['enforcement']}: {v['policy']} on {v['resource']}: {v['message']}")
    if p["errors"]:
        print("  INVALID:")
        for e in p["errors"]:
            print(f"  - {e}")
    print(f"  outputs: {', '.join(f'{k}={v}' for k, v in p['outputs'].items() if k != 'verification')}")
    print(f"  artifacts: {Path(p['artifacts'][0]).parent}/ ({len(p['artifacts'])} files)" if p["artifacts"] else "")


def refused_fields(errors: list[str]) -> list[str]:
    """The fields the refusals name, in order, once each."""
    return list(dict.fromkeys(re.findall(r"field ([\w-]+:[\w.\[\]]+)", " ".join(errors))))


def summary_row(p: dict) -> str:
    if not p["valid"]:
        fields = ", ".join(refused_fields(p["errors"])) or "the stack file"
        return f"{p['stack']:<26} REFUSED  by {fields}: plan.py {p['stack']} says why"
    s, c = p["sizing"], p["cost"]
    return (f"{p['stack']:<26} ok       {len(p['resources']):>4}  {s['context_length']:>8,}  "
            f"{s['largest_context']:>8,}  {s['concurrent_sequences_per_engine'] * s['engines_per_node']:>5}  "
            f"{gib(s['kv_pool_bytes_per_device']):>7}  {_replicas(p):>8}  {_money(c['fleet_usd_per_hour']):>9}  "
            f"{_money(c['usd_per_million_output_tokens']):>7}  {_speed(c['per_user_tokens_per_second']):>6}  "
            f"{c['market']}")


def _replicas(p: dict) -> str:
    """The replicas column: the fixed count, or a scaling stack's range."""
    policy = p.get("scaling")
    return f"{policy['min_replicas']}-{policy['max_replicas']}" if policy else str(p["cost"]["replicas"])


def _speed(value) -> str:
    return "-" if value is None else f"{value:g}"


def ranked_lines(plans: list[dict]) -> list[str]:
    """The planned stacks a Kimi-K2.6 fact prices, cheapest chat $/M first, each at the per-user speed
    the fact was measured at; then the ones no fact matches."""
    valid = [p for p in plans if p["valid"]]
    priced = sorted((p for p in valid if p["cost"]["usd_per_million_output_tokens"] is not None),
                    key=lambda p: p["cost"]["usd_per_million_output_tokens"])
    lines = ["$/M output tokens, ranked (chat, then agentic; only where a Kimi-K2.6 fact matches the stack's "
             "engine, hardware, checkpoint and layout, at the per-user speed it was measured at):"]
    for rank, p in enumerate(priced, 1):
        parts = []
        for kind, w in p["cost"]["workloads"].items():
            if w and w["usd_per_million_output_tokens"] is not None:
                parts.append(f"{kind} {_money(w['usd_per_million_output_tokens'])} at "
                             f"{_speed(w['per_user_tokens_per_second'])} tok/s/user ({w['fact']})")
        lines.append(f"  {rank}. {p['stack']}: " + "; ".join(parts))
    if not priced:
        lines.append("  none: no planned stack runs a layout a Kimi-K2.6 fact was published for")
    unpriced = [p["stack"] for p in valid if p["cost"]["usd_per_million_output_tokens"] is None]
    if unpriced:
        lines.append(f"  not priced: {', '.join(unpriced)} (no fact for its layout or no hourly price; "
                     "plan.py STACK names the facts that exist for its hardware)")
    return lines


SUMMARY_HEADER = (f"{'stack':<26} {'status':<8} {'res':>4}  {'context':>8}  {'max ctx':>8}  {'seqs':>5}  "
                  f"{'KV GiB':>7}  {'replicas':>8}  {'$/hour':>9}  {'$/M out':>7}  {'tok/s/u':>6}  market")
SUMMARY_LEGEND = (
    "res: resources the stack declares; context: the context it promises (contextLength); max ctx: the longest "
    "sequence its KV pool holds; seqs: full-context sequences served at once per node; KV GiB: the KV pool per "
    "accelerator; replicas: the stack's replicas, or its scaling range (min-max); $/hour: every node of the "
    "stack at the replicas a first deploy starts with; $/M out: dollars per million output tokens of the chat "
    "workload, where a Kimi-K2.6 measurement matches the stack's layout (ranked below); tok/s/u: the output "
    "speed each user saw in that measurement")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plan.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("stack", nargs="?", help=f"one of: {', '.join(stack_names())}")
    parser.add_argument("--all", action="store_true", help="plan every stack in stacks/")
    parser.add_argument("--stack-file", type=Path, help="plan a stack file that is not in stacks/")
    parser.add_argument("--json", action="store_true", help="print one JSON object per stack (a list)")
    parser.add_argument("--diff", metavar="REF", help="Markdown diff of every stack between REF and the work tree")
    parser.add_argument("--build-dir", type=Path, default=BUILD_DIR, help="where artifacts go (default build/)")
    parser.add_argument("--no-preflight", action="store_true", help="skip the AWS spot pre-flight")
    args = parser.parse_args(argv)

    if args.diff:
        from tooling.plan_diff import diff_markdown, diff_refused

        markdown = diff_markdown(args.diff)
        print(markdown)
        return EXIT_INVALID if diff_refused(markdown) else EXIT_OK
    chosen = sum(bool(x) for x in (args.stack, args.all, args.stack_file))
    if chosen != 1:
        parser.error("give exactly one of STACK, --all, --stack-file")
    if args.stack_file:
        if not args.stack_file.is_file():
            parser.error(f"--stack-file {args.stack_file}: no such file")
        paths = [args.stack_file.resolve()]
    elif args.all:
        # Every stack file, also one whose name is not a valid stack name: it is listed as refused.
        paths = sorted(STACKS_DIR.glob("Pulumi.*.yaml"))
    else:
        if args.stack not in stack_names():
            parser.error(f"unknown stack {args.stack!r}{did_you_mean(args.stack, stack_names())}; known: "
                         f"{', '.join(stack_names())}")
        paths = [stack_file(args.stack)]

    plans, specs = [], []
    for path in paths:
        try:
            config = load_stack_config(path)
        except ValueError as error:
            plans.append({"stack": path.name, "file": str(path), "valid": False, "errors": [str(error)],
                          "resources": []})
            continue
        plans.append(plan_config(config, args.build_dir, preflight=not args.no_preflight))
        if plans[-1]["valid"]:
            specs.append(config.spec())

    if args.json:
        print(json.dumps(plans, indent=2, default=str))
    elif args.all:
        print(SUMMARY_HEADER)
        for p in plans:
            print(summary_row(p))
        print("\n" + textwrap.fill(SUMMARY_LEGEND, width=110))
        print()
        for line in ranked_lines(plans):
            print(textwrap.fill(line, width=110, subsequent_indent="     "))
        pairing = shared_mirror_problems(specs)
        sharing = [p for p in plans if p.get("mirror")]
        if sharing:
            print("\nmanaged weights mirrors: " + "; ".join(
                f"{p['stack']} {'creates' if p['mirror']['creates_bucket'] else 'adopts'} {p['mirror']['uri']}"
                for p in sharing))
        for problem in pairing:
            print(f"  MIRROR PROBLEM: {problem}")
        if pairing:
            return EXIT_INVALID
    else:
        for p in plans:
            print_plan(p)
    if not args.all and not plans[0]["valid"]:
        # The reasons are printed once, above (or in the JSON); here the one line a script greps.
        fields = ", ".join(refused_fields(plans[0]["errors"])) or "its stack file"
        print(f"plan.py: {plans[0]['stack']} refused by {fields}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
