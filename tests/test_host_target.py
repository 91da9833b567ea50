"""HostEndpoint under Pulumi mocks, and the host bootstrap applied twice into a scratch root."""

import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
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


def host_bundle(run: MockRun) -> dict:
    return json.loads(commands(run)["kimi-bundle"]["wire"]["stdin"])


@pytest.mark.parametrize("stack, engines", [("rtxpro6000-int4-sglang", 1), ("mi300x-int4-sglang", 2)])
def test_ships_the_release_bundle_and_applies_it_with_the_staging_applier(stack, engines):
    r = resolved(stack)
    run = run_host_endpoint(r, hf_token=pulumi.Output.secret(HF_TOKEN))
    declared = commands(run)
    files = render_node_files(r, render_launch(r), size(r), secrets=SecretsSource("files"))
    bundle = node_files.release_bundle(files)
    digest = node_files.bundle_digest(bundle)
    # One content-addressed bundle, root-only, named by its SHA-256; the applier from the deployer.
    shipped = declared["kimi-bundle"]["wire"]
    assert shipped["stdin"] == bundle
    assert f"/var/lib/kimi-fleet/bundles/{digest}.json" in shipped["create"] and "chmod 600" in shipped["create"]
    applier = declared["kimi-applier"]["wire"]
    assert applier["stdin"] == node_files.node_script("apply_release.py") and "chmod 755" in applier["create"]
    env_files = [p for p in files if re.match(r"/etc/kimi-fleet/engine-\d+\.", p)]
    assert len(env_files) == 2 * engines  # engine-N.env and engine-N.argv.json
    # Each node file keeps a resource that removes it on destroy, and writes nothing itself.
    cleanups = {c["wire"]["delete"] for n, c in declared.items() if n.startswith("kimi-file-")}
    assert cleanups == {f"sudo rm -f {path}" for path in files}
    assert all(c["wire"]["create"] == "true" and "stdin" not in c["wire"]
               for n, c in declared.items() if n.startswith("kimi-file-"))

    bootstrap = declared["kimi-bootstrap"]
    script = shlex.split(bootstrap["wire"]["create"])[2]
    # A transient unit: a dropped SSH session does not stop the applier mid-swap or mid-rollback.
    assert "sudo systemd-run --unit=\"$unit\" --collect --wait" in script
    assert (f"/usr/bin/python3 /usr/local/lib/kimi-fleet-deploy/apply_release.py --bundle-file "
            f"/var/lib/kimi-fleet/bundles/{digest}.json --expect {digest} --secrets-from "
            "/var/lib/kimi-fleet/incoming-secrets") in script
    assert script.endswith("exit $status")
    assert len(bootstrap["wire"]["triggers"]) == 1 + 2  # the bundle, and both secrets
    assert int(bootstrap["timeouts"]["create"].removesuffix("s")) > size(r).download_seconds + 2 * size(r).warm_start_seconds
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
        # Into the deployer's drop box: the applier takes them in with the release, at its swap.
        assert f"/var/lib/kimi-fleet/incoming-secrets/{name.removeprefix('kimi-secret-')}" in wire["create"]
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
    ({"engine": {"extraArgs": ["--enable-cache-report"]}}, {"kimi-engine@0.service", "caddy.service"}),
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
    (rules,) = [f["content"] for f in host_bundle(run)["files"] if f["path"] == "/etc/kimi-fleet/firewall.nft"]
    assert "policy drop;" in rules
    assert "elements = { 203.0.113.0/24 }" in rules
    assert "elements = { 2001:db8::/64 }" in rules
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


# --- a release on an existing host: staged, admitted, or restored ---------------------------------

def _host_bundle_file(tmp_path: Path, r: Resolved) -> tuple[Path, str, str]:
    """What the deployer copies over SSH: the bundle, root-only, under its SHA-256."""
    files = render_node_files(r, render_launch(r), size(r), secrets=SecretsSource("files"))
    bundle = node_files.release_bundle(files)
    digest = node_files.bundle_digest(bundle)
    path = tmp_path / "bundles" / f"{digest}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(bundle)
    path.chmod(0o600)
    release = node_files.node_release(r, render_launch(r), size(r))
    return path, digest, release


def _apply_on_host(root: Path, tools: Path, bundle: Path, digest: str, *extra: str) -> subprocess.CompletedProcess:
    """The applier as the host's transient unit runs it (the drop box under the scratch root)."""
    from tests.test_apply_release import APPLIER

    env = {**os.environ, "KIMI_ROOT": str(root), "KIMI_DRY_GPU": "1", "PATH": f"{tools}:{os.environ['PATH']}",
           "VERIFY_PYTHON": sys.executable}
    return subprocess.run(["/usr/bin/python3", str(APPLIER), "--bundle-file", str(bundle), "--expect", digest,
                           "--secrets-from", str(root / "var/lib/kimi-fleet/incoming-secrets"),
                           "--admission-poll", "0.2", *extra], env=env, capture_output=True, text=True, timeout=180)


def test_a_broken_release_on_a_host_goes_back_by_itself(tmp_path):
    """Release N serves on an existing host; N+1's engine runs out of memory while loading. The
    same applier as an AWS single node stages N+1, swaps, sees the crash loop, restores N and fails
    naming N+1, so `pulumi up` fails while N serves again."""
    from tests.test_apply_release import OOM_FLAG, FakeNode, stub_node_tools

    stack = "rtxpro6000-int4-sglang"
    good = resolved(stack)
    values = copy.deepcopy(load_stack_config(stack_file(stack)).values)
    values["engine"] = {**values["engine"], "extraArgs": [OOM_FLAG]}
    broken = Resolved(parse_spec(values, stack, f"stacks/Pulumi.{stack}.yaml"))
    # The host already serves an older release, set up before the bundle applier (no record of it).
    older = resolved(stack, acmeEmail="ops-before@example.com")
    root, _ = _scratch_node(tmp_path, older)
    tools, state = tmp_path / "bin", tmp_path / "node"
    tools.mkdir()
    (tools / "hf").write_text("#!/bin/sh\necho 'hf must not run: the weights are verified' >&2\nexit 1\n")
    (tools / "hf").chmod(0o755)
    stub_node_tools(tools, state)
    ready = root / node_files.READY_FILE.lstrip("/")
    bundle_n, digest_n, release_n = _host_bundle_file(tmp_path, good)
    bundle_n1, digest_n1, release_n1 = _host_bundle_file(tmp_path, broken)
    key_file = root / "etc/kimi-fleet/secrets/api-key"
    serving_key = key_file.read_text()
    incoming = root / "var/lib/kimi-fleet/incoming-secrets"
    # The first apply keeps the unrecorded release as its rollback and waits for N's admission.
    with FakeNode(root, tools, state, readmits=True):
        first = _apply_on_host(root, tools, bundle_n, digest_n, "--admission-budget", "60")
        assert first.returncode == 0, first.stderr[-3000:]
        assert f"release {release_n} (bundle {digest_n[:16]}): staged" in first.stderr
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text().strip() == release_n) and time.monotonic() < deadline:
            time.sleep(0.1)
        # N+1 also rotates the key: the deployer drops it in the box, not over the live key.
        incoming.mkdir(parents=True, mode=0o700)
        (incoming / "api-key").write_text("rotated-key-0123456789abcdef")
        result = _apply_on_host(root, tools, bundle_n1, digest_n1, "--admission-budget", "120")
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"release {release_n1} failed on node" in result.stderr and "restarted 3 times" in result.stderr
    assert OOM_FLAG not in (root / "etc/kimi-fleet/engine-0.argv.json").read_text()
    assert (root / node_files.RELEASE_FILE.lstrip("/")).read_text().strip() == release_n
    assert (root / "var/lib/kimi-fleet/applied-release").read_text().strip() == digest_n
    assert f"release {release_n} restored and admitted again" in result.stderr
    status = json.loads((root / "run/kimi-fleet/status.json").read_text())
    assert status["failed_release"] == release_n1 and any("CUDA out of memory" in line
                                                            for line in status["engine_log_tail"])
    # N serves with N's key; the rotated key waits in the box for the retry.
    assert key_file.read_text() == serving_key
    assert (incoming / "api-key").read_text() == "rotated-key-0123456789abcdef"


@pytest.mark.parametrize("tamper", ["content", "mode"])
def test_the_host_applier_refuses_a_bundle_it_cannot_trust(tmp_path, tamper):
    r = resolved("rtxpro6000-int4-sglang")
    root, _ = _scratch_node(tmp_path, r)
    bundle, digest, _ = _host_bundle_file(tmp_path, r)
    if tamper == "content":
        bundle.write_text(bundle.read_text() + " ")
    else:
        bundle.chmod(0o666)
    tools = tmp_path / "bin"
    tools.mkdir()
    result = _apply_on_host(root, tools, bundle, digest)
    assert result.returncode == 1
    expected = "has SHA-256" if tamper == "content" else "writable by others"
    assert expected in result.stderr and "refusing it" in result.stderr
    assert not (root / "var/lib/kimi-fleet/applied-release").exists()
