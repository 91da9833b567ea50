"""The README is a map: small, the two commands on its first screen, every link and script it or the
docs name exists, and its stack matrix lists exactly the stacks in stacks/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kimi_fleet.memory_points import table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, *sorted((ROOT / "examples").rglob("README.md"))]
PLAN_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && "
                ".venv/bin/python scripts/plan.py --all")
TEST_COMMAND = "bash .ci/run"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCED = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_under_12_kb():
    assert README.stat().st_size < 12_000, f"{README.stat().st_size} bytes"


def test_both_commands_within_the_first_30_lines_with_one_sentence_between():
    lines = README.read_text().splitlines()
    head = lines[:30]
    assert PLAN_COMMAND in head and TEST_COMMAND in head
    plan, tests = head.index(PLAN_COMMAND), head.index(TEST_COMMAND)
    assert plan < tests
    # Between the two code blocks: the closing fence, one sentence, the opening fence.
    between = [line for line in lines[plan + 1:tests] if line.strip() and not line.startswith("```")]
    assert len(between) == 1 and between[0].rstrip().endswith(":"), between
    assert len(re.findall(r"[.!?](\s|$)", between[0])) == 0, "one sentence, not several"
    # And one sentence introduces the plan command, right under the section's heading.
    heading, sentence, fence = [line for line in lines[:plan] if line.strip()][-3:]
    assert heading.startswith("## ") and fence == "```bash", (heading, fence)
    assert sentence.endswith(":") and not re.findall(r"[.!?](\s|$)", sentence), sentence


def test_the_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv" in ci  # a fresh machine: the same venv the plan command makes
    assert ".venv/bin/python -m pytest -q" in ci
    assert (ROOT / "requirements.txt").is_file() and (ROOT / "scripts" / "plan.py").is_file()


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_resolves(page):
    text = FENCED.sub("", page.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_file() or not resolved.is_relative_to(ROOT):
            broken.append(target)
        elif anchor:
            headings = re.findall(r"^#+ (.+)$", FENCED.sub("", resolved.read_text()), re.MULTILINE)
            if anchor not in {slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{rel(page)}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_script_named_exists_and_runs_with_the_venv(page):
    text = page.read_text()
    missing = [name for name in re.findall(r"\bscripts/(\w+\.py)\b", text) if not (ROOT / "scripts" / name).is_file()]
    assert not missing, f"{rel(page)}: {missing}"
    assert (ROOT / "scripts" / "plan.py").is_file()
    # `python scripts/...` fails outside the venv (ModuleNotFoundError): always the venv's python.
    bare = re.findall(r"(?<![/\w])python3? scripts/\w+\.py", text)
    assert not bare, f"{rel(page)}: {bare}"


def test_every_plan_command_names_a_real_stack():
    stacks = {p.name[len("Pulumi."):-len(".yaml")] for p in (ROOT / "stacks").glob("Pulumi.*.yaml")}
    for page in PAGES:
        for name in re.findall(r"scripts/plan\.py ([a-z0-9][a-z0-9-]+)", page.read_text()):
            assert name in stacks, f"{rel(page)}: plan.py {name}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in LINK.findall(README.read_text())}
    assert {page.resolve() for page in DOCS} <= linked, [rel(p) for p in DOCS if p.resolve() not in linked]
    assert (ROOT / "docs" / "known-limits.md").resolve() in linked


def test_the_matrix_lists_exactly_the_stacks():
    stacks = {p.name[len("Pulumi."):-len(".yaml")] for p in (ROOT / "stacks").glob("Pulumi.*.yaml")}
    text = README.read_text()
    matrix = text[text.index("## The stack matrix"):]
    matrix = matrix[: matrix.index("\n## ", 1)]
    rows = [line.split("|")[1].strip() for line in matrix.splitlines() if line.startswith("| ")]
    assert rows[0] == "stack"
    assert sorted(rows[1:]) == sorted(stacks)


def test_the_multi_node_stacks_say_so_in_the_matrix():
    """A stack with parallelism.nodes > 1 reads as one replica over several nodes, not a fleet."""
    import yaml

    text = README.read_text()
    for path in (ROOT / "stacks").glob("Pulumi.*.yaml"):
        config = (yaml.safe_load(path.read_text()) or {}).get("config") or {}
        nodes = (config.get("kimi-fleet:parallelism") or {}).get("nodes", 1)
        if nodes > 1:
            stack = path.name[len("Pulumi."):-len(".yaml")]
            row = next(line for line in text.splitlines() if line.startswith(f"| {stack} |"))
            assert f"{nodes} nodes" in row, row


@pytest.mark.parametrize("page", [README, ROOT / "docs" / "sizing.md"], ids=rel)
def test_the_memory_points_table_is_current(page):
    assert table() in page.read_text(), "paste `.venv/bin/python scripts/memory_points.py` into " + rel(page)
