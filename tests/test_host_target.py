"""HostEndpoint under Pulumi mocks, and the host bootstrap applied twice into a scratch root."""

import copy
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pulumi
import pytest

from kimi_fleet import node_files
from kimi_fleet.launch import render_launch
from kimi_fleet.node_files import SecretsSource, render_node_files
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.validation import parse_spec
from kimi_fleet.stackfile import load_stack_config, stack_file
from tests.test_k8s_component import API_KEY, HF_TOKEN
from tooling.mock_run import MockRun, is_secret, run_components, secret_paths

SSH_HOST = "203.0.113.7"
SSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key\n-----END OPENSSH PRIVATE KEY-----"
COMMAND = "command:remote:Command"


def resolved(stack: str, **overrides) -> Resolved:
    values = copy.deepcopy(load_stack_config(stack_file(stack)).values)
    values.update(overrides)
    return Resolved(parse_spec(values, stack, f"stacks/Pulumi.{stack}.yaml"))


def run_host_endpoint(r: Resolved, *, hf_token=None, ssh: bool = True) -> MockRun:
    from components.endpoint_outputs import TargetSecrets
    from components.host_endpoint import HostEndpoint, HostEndpointArgs

    # The component reads no config: __main__.py hands it the SSH secrets.
    given = TargetSecrets(ssh_host=pulumi.Output.secret(SSH_HOST), ssh_private_key=pulumi.Output.secret(SSH_KEY)) \
        if ssh else TargetSecrets()

    def declare():
        endpoint = HostEndpoint("kimi", HostEndpointArgs(
            resolved=r, sizing=size(r), launch=render_launch(r), api_key=pulumi.Output.secret(API_KEY),
            hf_token=hf_token, target_secrets=given,
        ))
        names = ["user_data", "endpoint_url", "node_ids", "market", "hourly_cost_usd"]
        return {name: getattr(endpoint, name) for name in names}

    return run_components(declare, r.spec.stack)


def commands(run: MockRun) -> dict[str, dict]:
    return {r["name"]: r for r in run.of_type(COMMAND)}


def plain(value) -> str:
    """A wire value with any secret-wrapped parts left out."""
    if isinstance(value, dict):
        if is_secret(value):
            return "<secret>"
        return " ".join(f"{k}={plain(v)}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(plain(v) for v in value)
    return str(value)


@pytest.mark.parametrize("stack, engines", [("rtxpro6000-int4-sglang", 1), ("mi300x-int4-sglang", 2)])
def test_copies_every_node_file_and_bootstraps(stack, engines):
    r = resolved(stack)
    run = run_host_endpoint(r, hf_token=pulumi.Output.secret(HF_TOKEN))
    declared = commands(run)
    files = render_node_files(r, render_launch(r), size(r), secrets=SecretsSource("files"))
    copied = [c for c in declared.values() if "stdin" in c["wire"] and c["name"].startswith("kimi-file-")]
    assert sorted(c["wire"]["stdin"] for c in copied) == sorted(f.content for f in files.values())
    env_files = [p for p in files if re.match(r"/etc/kimi-fleet/engine-\d+\.", p)]
    assert len(env_files) == 2 * engines  # engine-N.env and engine-N.argv.json
    for path in env_files:
        assert any(f"mv {path}.kimi-tmp {path}" in c["wire"]["create"] for c in copied)

    bootstrap = declared["kimi-bootstrap"]
    assert bootstrap["wire"]["create"] == "sudo /usr/local/sbin/kimi-bootstrap"
    assert len(bootstrap["wire"]["triggers"]) == len(files) + 2  # every file, and both secrets
    assert int(bootstrap["timeouts"]["create"].removesuffix("s")) > size(r).download_seconds
    assert set(bootstrap["dependencies"]) >= {n for n in declared if n != "kimi-bootstrap"}

    (proxy,) = run.of_type("kimi-fleet:proxy:AuthProxy")
    caddyfile = files[node_files.CADDYFILE].content
    upstreams = " ".join(f"127.0.0.1:{r.engine.port + i}" for i in range(engines))
    assert f"reverse_proxy @promised {upstreams} {{" in caddyfile
    assert proxy["wire"]["caddyfile"] == caddyfile
    assert run.outputs["endpoint_url"] == f"https://{r.spec.domain}" and run.outputs["market"] == "on-demand"
    assert run.outputs["user_data"] is None


def test_secrets_reach_the_host_only_through_stdin():
    r = resolved("mi300x-int4-sglang")
    run = run_host_endpoint(r, hf_token=pulumi.Output.secret(HF_TOKEN))
    declared = commands(run)
    for name in ("kimi-secret-api-key", "kimi-secret-hf-token"):
        wire = declared[name]["wire"]
        assert ".stdin" in list(secret_paths(wire))
        assert "umask 077" in wire["create"] and "chmod 600" in wire["create"]
    for command in declared.values():
        visible = plain({k: v for k, v in command["wire"].items() if k != "stdin"})
        for secret in (API_KEY, HF_TOKEN, "not-a-real-key"):
            assert secret not in visible, command["name"]
        assert ".connection.privateKey" in list(secret_paths(command["wire"])) or \
            "<secret>" in plain(command["wire"]["connection"])
    assert run.outputs["node_ids"] == [SSH_HOST]


def test_dns_record_points_at_the_host_when_a_zone_is_given():
    r = resolved("rtxpro6000-int4-sglang", target={"kind": "host", "host": {"address": SSH_HOST,
                                                                            "hostedZoneId": "Z0123456789"}})
    run = run_host_endpoint(r)
    (record,) = run.of_type("aws:route53/record:Record")
    assert record["wire"]["type"] == "A" and record["wire"]["records"] == [SSH_HOST]
    assert record["wire"]["name"] == "kimi-rtx.example.com"
    assert "kimi-secret-hf-token" not in commands(run)


def test_startup_script_only_declares_no_ssh_resources():
    r = resolved("mi300x-int4-sglang", target={"kind": "host", "host": {"startupScriptOnly": True}})
    run = run_host_endpoint(r)
    assert not [x for x in run.resources if x["type"].startswith("command:")]
    assert not run.of_type("aws:route53/record:Record")
    user_data = run.outputs["user_data"]
    assert user_data.startswith("#cloud-config\n")
    assert "/usr/local/sbin/kimi-bootstrap" in user_data and "/etc/kimi-fleet/engine-1.env" in user_data
    assert "SECRETS_KIND=files" in user_data
    assert run.outputs["node_ids"] == []


# --- the bootstrap itself, on this machine ----------------------------------------------------


def write_tree(root: Path, files) -> None:
    for file in files.values():
        target = root / file.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(file.content)
        target.chmod(file.mode)


def snapshot(root: Path) -> dict[str, tuple[str, str]]:
    """Every path under root with its mode and content digest, except the append-only log and the
    cold-start status (runtime state with timestamps, not configuration)."""
    tree = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if relative.startswith("var/log/") or relative == node_files.STATUS_FILE.lstrip("/"):
            continue
        mode = stat.filemode(path.lstat().st_mode)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        tree[relative] = (mode, digest)
    return tree


@pytest.mark.parametrize("stack", ["rtxpro6000-int4-sglang", "mi300x-int4-sglang"])
def test_bootstrap_applied_twice_changes_nothing(stack, tmp_path):
    r = resolved(stack)
    launch = render_launch(r)
    root, env = _scratch_node(tmp_path, r)
    # An `hf` on PATH so no CLI is installed; the verified marker means it is never called.
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "hf").write_text("#!/bin/sh\necho 'hf must not run: the weights are verified' >&2\nexit 1\n")
    (tools / "hf").chmod(0o755)
    env["PATH"] = f"{tools}:{os.environ['PATH']}"
    bootstrap = root / "usr/local/sbin/kimi-bootstrap"

    first = subprocess.run(["bash", str(bootstrap)], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    after_first = snapshot(root)
    second = subprocess.run(["bash", str(bootstrap)], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert snapshot(root) == after_first
    for index in range(len(launch.instances)):
        assert f"kimi-engine@{index}.service: unchanged" in second.stderr


def _scratch_node(tmp_path: Path, r: Resolved) -> tuple[Path, dict]:
    """A scratch root holding release N of `r` with its secrets and weights already verified at its
    revision, and the env that runs its bootstrap there (no systemctl, docker, GPUs or downloads)."""
    launch = render_launch(r)
    secrets = SecretsSource("files")
    root = tmp_path / "root"
    write_tree(root, render_node_files(r, launch, size(r), secrets=secrets))
    for path, value in ((secrets.api_key_file, "k" * 32), (secrets.hf_token_file, "hf_" + "t" * 32)):
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(value)
        target.chmod(0o600)
    weights = root / launch.weights_host_dir.lstrip("/")
    weights.mkdir(parents=True)
    (weights / ".kimi-verified").write_text(f"{r.revision}\n")
    return root, {**os.environ, "KIMI_ROOT": str(root), "KIMI_DRY_GPU": "1", "VERIFY_PYTHON": sys.executable}


def _restarted(stderr: str) -> set[str]:
    return {line.split("] ", 1)[1].split(":", 1)[0] for line in stderr.splitlines() if line.endswith(": (re)started")}


@pytest.mark.parametrize("edit, expected", [
    ({"engine": {"extraArgs": ["--enable-metrics"]}}, {"kimi-engine@0.service", "caddy.service"}),
    ({"acmeEmail": "ops-rotated@example.com"}, {"caddy.service"}),
])
def test_next_release_restarts_only_what_changed_as_the_plan_said(edit, expected, tmp_path):
    from kimi_fleet.cost import estimate
    from kimi_fleet.rollout import impact, rollout_facts

    stack = "rtxpro6000-int4-sglang"
    values = copy.deepcopy(load_stack_config(stack_file(stack)).values)
    release_n = resolved(stack)
    for key, value in edit.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    release_next = Resolved(parse_spec(values, stack, f"stacks/Pulumi.{stack}.yaml"))
    root, env = _scratch_node(tmp_path, release_n)
    bootstrap = root / "usr/local/sbin/kimi-bootstrap"
    first = subprocess.run(["bash", str(bootstrap)], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr

    launch = render_launch(release_next)
    files = render_node_files(release_next, launch, size(release_next), secrets=SecretsSource("files"))
    write_tree(root, files)  # what the copy commands of the next `pulumi up` do
    second = subprocess.run(["bash", str(bootstrap)], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert _restarted(second.stderr) == expected
    assert "fail2ban.service: unchanged" in second.stderr
    status = json.loads((root / node_files.STATUS_FILE.lstrip("/")).read_text())
    assert status["phase"] == "loading" and {"download", "loading"} <= set(status["phases"])
    release_file = (root / node_files.RELEASE_FILE.lstrip("/")).read_text().strip()
    assert release_file == node_files.node_release(release_next, launch, size(release_next))
    assert f"header_down X-Kimi-Fleet-Release {release_file}" in (root / "etc/caddy/Caddyfile").read_text()
    # The plan said the same before the change was made.
    facts = [rollout_facts(r, size(r), render_launch(r), estimate(r)) for r in (release_n, release_next)]
    line = impact(*facts)
    assert line.startswith(f"in place: {', '.join(sorted(expected))} restart")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_host_scripts_pass_shellcheck(tmp_path):
    r = resolved("mi300x-int4-sglang")
    files = render_node_files(r, render_launch(r), size(r), secrets=SecretsSource("files"))
    scripts = []
    for file in files.values():
        if file.executable:
            script = tmp_path / Path(file.path).name
            script.write_text(file.content)
            scripts.append(str(script))
    assert scripts
    result = subprocess.run(["shellcheck", "--severity=style", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_opt_in_firewall_reaches_the_host_and_its_change_reruns_the_bootstrap():
    stack = "rtxpro6000-int4-sglang"
    base = load_stack_config(stack_file(stack)).values["target"]
    target = copy.deepcopy(base)
    target.setdefault("host", {}).update({"firewall": True, "sshAllowlist": ["203.0.113.0/24", "2001:db8::/64"]})
    run = run_host_endpoint(resolved(stack, target=target))
    declared = commands(run)
    (rules,) = [c for c in declared.values() if "/etc/kimi-fleet/firewall.nft" in c["wire"].get("create", "")]
    assert "policy drop;" in rules["wire"]["stdin"]
    assert "elements = { 203.0.113.0/24 }" in rules["wire"]["stdin"]
    assert "elements = { 2001:db8::/64 }" in rules["wire"]["stdin"]
    # The rule set is a bootstrap input: turning the firewall on or off re-runs it.
    default_run = run_host_endpoint(resolved(stack))
    assert declared["kimi-bootstrap"]["wire"]["triggers"] != commands(default_run)["kimi-bootstrap"]["wire"]["triggers"]


def test_firewall_without_an_allowlist_is_refused_before_anything_is_declared():
    from kimi_fleet.spec import StackSpecError

    stack = "rtxpro6000-int4-sglang"
    target = copy.deepcopy(load_stack_config(stack_file(stack)).values["target"])
    target.setdefault("host", {})["firewall"] = True
    with pytest.raises(StackSpecError, match=r"(?s)Pulumi\.rtxpro6000-int4-sglang\.yaml.*firewall needs target\.host\.sshAllowlist"):
        resolved(stack, target=target)



def test_a_host_without_its_ssh_secrets_is_refused_naming_them():
    with pytest.raises(Exception, match="kimi-fleet:sshHost, kimi-fleet:sshPrivateKey"):
        run_host_endpoint(resolved("rtxpro6000-int4-sglang"), ssh=False)


def test_components_read_no_config():
    """Config and secrets are read in __main__.py only (issue 13): components get them as args."""
    offenders = [path.name for path in (Path(__file__).resolve().parents[1] / "components").glob("*.py")
                 if "pulumi.Config(" in path.read_text()]
    assert offenders == []
