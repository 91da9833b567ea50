"""GitHub Actions workflows: valid against the vendored workflow schema (check-jsonschema, offline)
and wired the way the project relies on (PR previews per stack with the policy pack, gated
deploys of changed stacks, least-privilege tokens)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
FILES = ["ci.yml", "preview.yml", "deploy.yml"]
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"


def load(name: str) -> dict:
    # PyYAML (YAML 1.1) reads the bare key `on` as True.
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    if True in data:
        data["on"] = data.pop(True)
    return data


def steps_using(job: dict, action: str) -> list[dict]:
    return [s for s in job.get("steps", []) if str(s.get("uses", "")).split("@")[0] == action]


def run_step(job: dict, step_id: str) -> str:
    return next(s["run"] for s in job["steps"] if s.get("id") == step_id)


@pytest.mark.parametrize("name", FILES)
def test_schema_valid(name):
    if not CHECK_JSONSCHEMA.exists():
        pytest.skip(f"{CHECK_JSONSCHEMA} not installed")
    result = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.github-workflows", str(WORKFLOWS / name)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", FILES)
def test_least_privilege_and_pinned_actions(name):
    workflow = load(name)
    assert workflow["permissions"] == {"contents": "read"}
    for job_name, job in workflow["jobs"].items():
        permissions = job.get("permissions", workflow["permissions"])
        uses_oidc = any(steps_using(job, "aws-actions/configure-aws-credentials"))
        assert (permissions.get("id-token") == "write") == uses_oidc, job_name
        comments = steps_using(job, "marocchino/sticky-pull-request-comment") or [
            s for s in steps_using(job, "pulumi/actions") if s["with"].get("comment-on-pr") is True]
        assert (permissions.get("pull-requests") == "write") == bool(comments), job_name
        for step in job.get("steps", []):
            if "uses" in step:
                assert "@" in step["uses"] and not step["uses"].endswith(("@main", "@master")), step["uses"]


def test_ci():
    workflow = load("ci.yml")
    assert "pull_request" in workflow["on"] and workflow["on"]["push"]["branches"] == ["main"]
    jobs = workflow["jobs"]
    test = jobs["test"]
    assert steps_using(test, "actions/setup-python")[0]["with"]["python-version"] in ("3.11", "${{ env.PYTHON_VERSION }}")
    assert workflow["env"]["PYTHON_VERSION"] == "3.11"
    assert any(s.get("run") == "bash .ci/run" for s in test["steps"])
    plan = jobs["plan"]
    assert any("python scripts/plan.py --all" in s.get("run", "") for s in plan["steps"])
    assert steps_using(plan, "actions/upload-artifact")[0]["with"]["path"] == "build/"
    diff = jobs["plan-diff"]
    assert diff["if"] == "github.event_name == 'pull_request'"
    assert steps_using(diff, "actions/checkout")[0]["with"]["fetch-depth"] == 0
    run = next(s for s in diff["steps"] if "--diff" in s.get("run", ""))
    assert 'scripts/plan.py --diff "origin/${BASE_REF}"' in run["run"]
    assert run["env"]["BASE_REF"] == "${{ github.base_ref }}"
    comment = steps_using(diff, "marocchino/sticky-pull-request-comment")[0]
    assert comment["with"]["path"] == "build/plan-diff.md"


def _pulumi_step(job: dict) -> dict:
    (step,) = steps_using(job, "pulumi/actions")
    assert step["uses"] == "pulumi/actions@v6"
    return step["with"]


def _common_pulumi_job(job: dict) -> dict:
    inputs = _pulumi_step(job)
    assert inputs["policyPacks"] == "policy"
    assert "matrix.stack" in inputs["stack-name"]
    assert "s3://{0}', vars.PULUMI_STATE_BUCKET" in inputs["cloud-url"]
    assert "vars.PULUMI_SECRETS_PROVIDER" in inputs["secrets-provider"]
    assert job["env"]["PULUMI_ACCESS_TOKEN"] == "${{ secrets.PULUMI_ACCESS_TOKEN }}"
    assert job["env"]["PULUMI_CONFIG_PASSPHRASE"] == "${{ secrets.PULUMI_CONFIG_PASSPHRASE }}"
    (aws,) = steps_using(job, "aws-actions/configure-aws-credentials")
    assert aws["uses"].endswith("@v4") and aws["with"]["role-to-assume"] == "${{ vars.AWS_ROLE_TO_ASSUME }}"
    kube = next(s for s in job["steps"] if s.get("name") == "Kubeconfig")
    assert kube["env"]["KUBECONFIG_DATA"] == "${{ secrets.KUBECONFIG }}" and "kubernetes" in kube["if"]
    install = next(s["run"] for s in job["steps"] if ".venv/bin/pip install -r requirements.txt" in s.get("run", ""))
    assert "policy/.venv/bin/pip install -r policy/requirements.txt" in install
    return inputs


def test_preview():
    workflow = load("preview.yml")
    assert list(workflow["on"]) == ["pull_request"]
    stacks, preview = workflow["jobs"]["stacks"], workflow["jobs"]["preview"]
    assert "ls stacks/Pulumi.*.yaml" in run_step(stacks, "list")
    assert stacks["outputs"]["stacks"] == "${{ steps.list.outputs.stacks }}"
    assert preview["needs"] == "stacks"
    assert preview["strategy"]["matrix"]["stack"] == "${{ fromJSON(needs.stacks.outputs.stacks) }}"
    assert preview["strategy"]["fail-fast"] is False
    inputs = _common_pulumi_job(preview)
    assert inputs["command"] == "preview"
    assert inputs["comment-on-pr"] is True and inputs["diff"] is True


def test_deploy():
    workflow = load("deploy.yml")
    assert workflow["on"] == {"push": {"branches": ["main"]}}
    changes, deploy = workflow["jobs"]["changes"], workflow["jobs"]["deploy"]
    assert steps_using(changes, "actions/checkout")[0]["with"]["fetch-depth"] == 0
    assert deploy["environment"] == "production"
    assert deploy["concurrency"] == {"group": "deploy-${{ matrix.stack }}", "cancel-in-progress": False}
    assert deploy["strategy"]["matrix"]["stack"] == "${{ fromJSON(needs.changes.outputs.stacks) }}"
    inputs = _common_pulumi_job(deploy)
    assert inputs["command"] == "up" and "comment-on-pr" not in inputs


def test_stack_matrix_lists_the_real_stacks(tmp_path):
    if not shutil.which("jq"):
        pytest.skip("jq not installed")
    out = tmp_path / "out"
    script = run_step(load("preview.yml")["jobs"]["stacks"], "list")
    subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, env={**os.environ, "GITHUB_OUTPUT": str(out)},
                   check=True, capture_output=True, timeout=60)
    stacks = json.loads(out.read_text().strip().removeprefix("stacks="))
    assert sorted(stacks) == sorted(p.name[len("Pulumi."):-len(".yaml")] for p in (ROOT / "stacks").glob("Pulumi.*.yaml"))


def test_deploy_change_detection(tmp_path):
    if not (shutil.which("jq") and shutil.which("git")):
        pytest.skip("jq or git not installed")
    script = run_step(load("deploy.yml")["jobs"]["changes"], "changed")
    repo = tmp_path / "repo"
    (repo / "stacks").mkdir(parents=True)
    (repo / "kimi_fleet").mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": os.devnull}

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True,
                              text=True, timeout=60).stdout.strip()

    def commit(files: dict[str, str | None]) -> str:
        for path, text in files.items():
            if text is None:
                (repo / path).unlink()
            else:
                (repo / path).write_text(text)
        git("add", "-A")
        git("commit", "-q", "-m", "x")
        return git("rev-parse", "HEAD")

    def changed(before: str, after: str) -> list[str]:
        out = tmp_path / f"out-{before[:7]}-{after[:7]}"
        subprocess.run(["bash", "-c", script], cwd=repo, check=True, capture_output=True, timeout=60,
                       env={**env, "BEFORE": before, "AFTER": after, "GITHUB_OUTPUT": str(out)})
        return json.loads(out.read_text().strip().removeprefix("stacks="))

    git("init", "-q")
    first = commit({"stacks/Pulumi.a.yaml": "a", "stacks/Pulumi.b.yaml": "b", "kimi_fleet/x.py": "1", "README.md": "r"})
    one = commit({"stacks/Pulumi.a.yaml": "a2"})
    assert changed(first, one) == ["a"]
    docs = commit({"README.md": "r2"})
    assert changed(one, docs) == []
    shared = commit({"kimi_fleet/x.py": "2"})
    assert changed(docs, shared) == ["a", "b"]
    removed = commit({"stacks/Pulumi.b.yaml": None})
    assert changed(shared, removed) == []
    assert changed("0" * 40, removed) == ["a"]
    assert changed("f" * 40, removed) == ["a"]  # unknown commit (force push): everything
