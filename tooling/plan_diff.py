"""`plan.py --diff REF`: every stack planned at REF and in the work tree, as Markdown for a PR.

REF is checked out into a temporary git worktree and planned there with its own planner; the
work tree is planned the same way. Per stack, first every resource the change **replaces** (from the
providers' replace-on-change inputs, kimi_fleet/replacement.py) with the downtime it costs and
whether the weights survive, then what happens to running nodes, resources added/removed/changed,
changed launch flags, a unified diff of each rendered file, sizing and cost deltas, and the plan's
warnings. Untouched stacks get one line.
"""

from __future__ import annotations

import difflib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from kimi_fleet import key_rotation, lifecycle_rights
from kimi_fleet.replacement import previous_of, replacement_lines, replacements
from kimi_fleet.rollout import RolloutFacts, impact
from kimi_fleet.stackfile import PROJECT_ROOT

SIZING_KEYS = ("kv_dtype", "memory_knob", "kv_tokens_per_device", "largest_context",
               "concurrent_sequences_per_engine", "kv_pool_bytes_per_device", "cold_start_seconds")
COST_KEYS = ("market", "replicas", "on_demand_replicas", "fleet_usd_per_hour", "usd_per_million_output_tokens")
LONG_VALUE = 80


def plan_tree(root: Path, build_dir: Path) -> dict[str, dict]:
    """Run the tree's own planner; stack name -> plan."""
    planner = root / "scripts" / "plan.py"
    if not planner.is_file():
        return {}
    completed = subprocess.run(
        [sys.executable, str(planner), "--all", "--json", "--no-preflight", "--build-dir", str(build_dir)],
        cwd=root, capture_output=True, text=True, check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"planning {root} failed: {completed.stderr.strip()[-2000:]}")
    return {p["stack"]: p for p in json.loads(completed.stdout)}


def flag_items(argv: list[str]) -> list[str]:
    """`--flag value` pairs and bare flags, so a changed value shows as one line."""
    items, index = [], 0
    while index < len(argv):
        token = argv[index]
        if token.startswith("--") and "=" not in token and index + 1 < len(argv) and not argv[index + 1].startswith("--"):
            items.append(f"{token} {argv[index + 1]}")
            index += 2
        else:
            items.append(token)
            index += 1
    return items


def changed_paths(old, new, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += changed_paths(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    if old == new:
        return []
    if isinstance(old, (list, dict)) or isinstance(new, (list, dict)) or len(repr(old)) + len(repr(new)) > LONG_VALUE:
        return [f"`{path}` changed"]
    return [f"`{path}`: {old!r} → {new!r}"]


def stack_section(name: str, before: dict | None, after: dict | None, old_build: Path, new_build: Path) -> list[str]:
    if before is None:
        return [f"### {name}: new stack", f"valid: {after['valid']}"]
    if after is None:
        return [f"### {name}: removed (its resources are not destroyed by the deploy workflow)"]
    lines: list[str] = []
    if before["valid"] != after["valid"] or before["errors"] != after["errors"]:
        lines.append(f"- validity: {before['valid']} → {after['valid']}")
        lines += [f"  - {e}" for e in after["errors"]]

    replaced = replacements(before.get("resources", []), after.get("resources", []))
    lines += [f"- {line}" for line in replacement_lines(replaced, before.get("rollout"), after.get("rollout"))]
    if before.get("rollout") and after.get("rollout") and not any(r.gpu_node for r in replaced):
        effect = impact(RolloutFacts.from_dict(before["rollout"]), RolloutFacts.from_dict(after["rollout"]))
        if effect:
            lines.append(f"- **running nodes**: {effect}")
    lines += [f"- {line}" for line in key_rotation.rotation_lines(before.get("api_key"), after.get("api_key"))]
    lines += [f"- {line}" for line in lifecycle_rights.migration_lines(before.get("resources", []),
                                                                      after.get("resources", []))]
    if before.get("ami") != after.get("ami") and after.get("ami"):
        lines.append(f"- AMI: {after['ami']}")
    lines += [f"- warning: {w}" for w in after.get("warnings") or [] if w not in (before.get("warnings") or [])]

    old_res = {(r["type"], r["name"]): r for r in before.get("resources", [])}
    new_res = {(r["type"], r["name"]): r for r in after.get("resources", [])}
    # A resource registered under a new name with an alias of its old one is moved, not replaced.
    moved = {}
    for key in sorted(new_res.keys() - old_res.keys()):
        previous = previous_of(new_res[key], old_res)
        if previous is not None and (previous["type"], previous["name"]) not in new_res:
            moved[key] = (previous["type"], previous["name"])
    for key, old_key in moved.items():
        lines.append(f"- resource moved: `{key[0]}` {old_key[1]} → {key[1]} (an alias: the state moves, nothing "
                     "in the cloud is created or deleted)")
    for key in sorted(new_res.keys() - old_res.keys() - moved.keys()):
        lines.append(f"- resource added: `{key[0]}` {key[1]}")
    for key in sorted(old_res.keys() - new_res.keys() - set(moved.values())):
        lines.append(f"- resource removed: `{key[0]}` {key[1]}")
    pairs = [(key, key) for key in sorted(old_res.keys() & new_res.keys())] + [(old, new) for new, old in moved.items()]
    for old_key, key in pairs:
        changes = changed_paths(old_res[old_key]["inputs"], new_res[key]["inputs"])
        if changes:
            lines.append(f"- resource changed: `{key[0]}` {key[1]}: " + "; ".join(changes[:8]))

    old_launch = (before.get("launch") or {}).get("engines", [])
    new_launch = (after.get("launch") or {}).get("engines", [])
    for index, (old_argv, new_argv) in enumerate(zip(old_launch, new_launch)):
        old_items, new_items = flag_items(old_argv), flag_items(new_argv)
        removed = [i for i in old_items if i not in new_items]
        added = [i for i in new_items if i not in old_items]
        if removed or added:
            lines.append(f"- engine {index} flags: " + ", ".join([f"−`{i}`" for i in removed] + [f"+`{i}`" for i in added]))
    if (before.get("launch") or {}).get("image") != (after.get("launch") or {}).get("image"):
        lines.append(f"- image: `{before['launch']['image']}` → `{after['launch']['image']}`")

    for label, keys, field in (("sizing", SIZING_KEYS, "sizing"), ("cost", COST_KEYS, "cost")):
        old, new = before.get(field) or {}, after.get(field) or {}
        deltas = [f"{k} {old.get(k)} → {new.get(k)}" for k in keys if old.get(k) != new.get(k)]
        if deltas:
            lines.append(f"- {label}: " + "; ".join(deltas))

    old_dir, new_dir = old_build / name, new_build / name
    files = sorted({p.name for d in (old_dir, new_dir) if d.is_dir() for p in d.iterdir()})
    for file in files:
        old_text = (old_dir / file).read_text() if (old_dir / file).is_file() else ""
        new_text = (new_dir / file).read_text() if (new_dir / file).is_file() else ""
        if old_text == new_text:
            continue
        diff = difflib.unified_diff(old_text.splitlines(), new_text.splitlines(),
                                    f"a/{name}/{file}", f"b/{name}/{file}", lineterm="", n=2)
        lines += [f"<details><summary>{file}</summary>", "", "```diff", *diff, "```", "</details>"]
    return [f"### {name}", *lines] if lines else []


def diff_refused(markdown: str) -> bool:
    """Whether the diff holds a change the plan refuses (the PR check fails on it)."""
    return f"- {key_rotation.REFUSED}" in markdown


def diff_markdown(ref: str) -> str:
    with tempfile.TemporaryDirectory(prefix="kimi-plan-diff-") as tmp:
        tmp_path = Path(tmp)
        worktree = tmp_path / "ref"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(worktree), ref],
                       cwd=PROJECT_ROOT, check=True, capture_output=True, text=True)
        try:
            before = plan_tree(worktree, tmp_path / "build-ref")
            after = plan_tree(PROJECT_ROOT, tmp_path / "build-head")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=PROJECT_ROOT,
                           check=False, capture_output=True)
        sections, unchanged = [], []
        for name in sorted(set(before) | set(after)):
            section = stack_section(name, before.get(name), after.get(name), tmp_path / "build-ref",
                                    tmp_path / "build-head")
            (sections.append("\n".join(section)) if section else unchanged.append(name))
    header = f"## kimi-fleet plan diff against `{ref}`"
    if not before:
        header += f"\n\n`{ref}` has no planner: every stack is shown as new."
    body = "\n\n".join(sections) if sections else "No stack changes."
    footer = f"\n\nUnchanged: {', '.join(unchanged)}" if unchanged else ""
    return f"{header}\n\n{body}{footer}\n"
