"""The in-place path of an AWS node, run for real: the release bundle in S3 and the pointer and
secrets in SSM (moto's server on loopback, the AWS CLI talking to it), the shipped applier, and
the node's own bootstrap in a scratch root. Release N, then N+1: only what changed restarts."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kimi_fleet import node_files
from kimi_fleet.launch import compile_cache_host_dir, render_launch
from kimi_fleet.node_files import SecretsSource, bundle_digest, release_bundle, release_pointer, render_node_files
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.validation import parse_spec
from kimi_fleet.stackfile import load_stack_config, stack_file
from tests.fakes.aws_api import BIN, moto_server

STACK = "h200-int4-sglang"
REGION = "us-east-1"
PREFIX = f"/kimi-fleet/{STACK}"
BUCKET = "kimi-releases-test"
APPLIER = Path(node_files.__file__).parent / "node_scripts" / "apply_release.py"
pytestmark = [pytest.mark.skipif(not (BIN / "aws").exists(), reason="awscli not installed (requirements-dev.txt)"),
              pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def aws_env():
    with moto_server(REGION) as env:
        aws(env, "s3api", "create-bucket", "--bucket", BUCKET)
        aws(env, "ssm", "put-parameter", "--name", f"{PREFIX}/api-key", "--type", "SecureString",
            "--value", "k" * 40)
        yield env


def aws(env: dict, *args: str) -> str:
    result = subprocess.run(["aws", *args, "--region", REGION], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def resolved(edit=None) -> Resolved:
    values = copy.deepcopy(load_stack_config(stack_file(STACK)).values)
    if edit:
        edit(values)
    return Resolved(parse_spec(values, STACK, f"stacks/Pulumi.{STACK}.yaml"))


def publish(env: dict, tmp_path: Path, r: Resolved, *, tamper: bool = False) -> str:
    """What NodeRelease does: the bundle under its digest, then the pointer."""
    files = render_node_files(r, render_launch(r), size(r), ebs_volume_id="vol-0123456789abcdef0",
                              secrets=SecretsSource.ssm(PREFIX, REGION, hf_token=False, api_key_version=1))
    bundle = release_bundle(files)
    digest = bundle_digest(bundle)
    local = tmp_path / f"{digest}.json"
    local.write_text(bundle + (" " if tamper else ""))
    aws(env, "s3", "cp", str(local), f"s3://{BUCKET}/releases/{digest}.json")
    aws(env, "ssm", "put-parameter", "--name", release_pointer(PREFIX), "--type", "String", "--overwrite",
        "--value", f"s3://{BUCKET}/releases/{digest}.json {digest}")
    return digest


def apply(env: dict, root: Path, tools: Path, *args: str) -> subprocess.CompletedProcess:
    run_env = {**env, "KIMI_ROOT": str(root), "KIMI_DRY_GPU": "1", "PATH": f"{tools}:{env['PATH']}",
               "VERIFY_PYTHON": sys.executable}  # the suite's dependencies are here: no verifier venv
    return subprocess.run(["/usr/bin/python3", str(APPLIER), "--pointer", release_pointer(PREFIX), "--region", REGION,
                           "--pointer-wait", "5", *args], env=run_env, capture_output=True, text=True, timeout=180)


def scratch_node(tmp_path: Path, r: Resolved) -> tuple[Path, Path]:
    root = tmp_path / "root"
    weights = root / render_launch(r).weights_host_dir.lstrip("/")
    weights.mkdir(parents=True)
    (weights / ".kimi-verified").write_text(f"{r.revision}\n")  # the weights are already on the node
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "hf").write_text("#!/bin/sh\necho 'hf must not run: the weights are verified' >&2\nexit 1\n")
    (tools / "hf").chmod(0o755)
    return root, tools


def _restarted(stderr: str) -> set[str]:
    return {line.split("] ", 1)[1].split(":", 1)[0] for line in stderr.splitlines() if line.endswith(": (re)started")}


def test_release_n_then_n_plus_1_in_place(aws_env, tmp_path):
    first = resolved()
    root, tools = scratch_node(tmp_path, first)
    digest = publish(aws_env, tmp_path, first)
    result = apply(aws_env, root, tools, "--expect", digest)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (root / "var/lib/kimi-fleet/applied-release").read_text().strip() == digest
    assert (root / "etc/kimi-fleet/secrets/api-key").read_text() == "k" * 40  # fetched from SSM by the bootstrap
    assert "kimi-engine@0.service: (re)started" in result.stderr
    node_env = (root / "etc/kimi-fleet/node.env").read_text()
    assert "SSM_API_KEY_VERSION=1" in node_env and "EBS_VOLUME_ID=vol-0123456789abcdef0" in node_env

    def more_flags(values):
        values["engine"] = {**values["engine"], "extraArgs": ["--enable-metrics"]}

    second = resolved(more_flags)
    digest_2 = publish(aws_env, tmp_path, second)
    result = apply(aws_env, root, tools, "--expect", digest_2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _restarted(result.stderr) == {"kimi-engine@0.service", "caddy.service"}
    assert "--enable-metrics" in (root / "etc/kimi-fleet/engine-0.argv.json").read_text()
    assert (root / node_files.RELEASE_FILE.lstrip("/")).read_text().strip() == node_files.node_release(
        second, render_launch(second), size(second))
    # Applying the same release again changes nothing and restarts nothing.
    again = apply(aws_env, root, tools, "--expect", digest_2)
    assert again.returncode == 0 and _restarted(again.stderr) == set()
    assert "0 file(s) changed" in again.stderr


def test_a_new_node_restores_the_shared_compile_cache_before_its_engines_start(aws_env, tmp_path):
    r = resolved()
    archive = node_files.compile_cache_archive(r, render_launch(r))
    bucket = archive.removeprefix("s3://").split("/", 1)[0]
    # What the first admitted node of this launch published (compile_cache.py publish).
    kernels = tmp_path / "published"
    (kernels / "deep_gemm").mkdir(parents=True)
    (kernels / "deep_gemm" / "kernel.cubin").write_bytes(b"\x7fELF kernel")
    with tarfile.open(tmp_path / "cache.tar", "w") as tar:
        tar.add(kernels / "deep_gemm", arcname="deep_gemm")
    aws(aws_env, "s3api", "create-bucket", "--bucket", bucket)
    aws(aws_env, "s3", "cp", str(tmp_path / "cache.tar"), archive)

    root, tools = scratch_node(tmp_path, r)
    digest = publish(aws_env, tmp_path, r)
    result = apply(aws_env, root, tools, "--expect", digest)
    assert result.returncode == 0, result.stderr[-3000:]
    cache_dir = root / compile_cache_host_dir(r).lstrip("/")
    assert (cache_dir / "deep_gemm" / "kernel.cubin").read_bytes() == b"\x7fELF kernel"
    log = result.stderr
    assert "compile cache: restored" in log and log.index("compile cache: restored") < log.index("kimi-engine@0.service")
    # The cache now lives on the node's volume: the next bootstrap keeps it.
    again = apply(aws_env, root, tools, "--expect", digest)
    assert "already holds a cache: kept" in again.stderr, again.stderr[-3000:]


def test_a_tampered_or_unexpected_bundle_is_refused(aws_env, tmp_path):
    r = resolved()
    root, tools = scratch_node(tmp_path, r)
    digest = publish(aws_env, tmp_path, r, tamper=True)
    result = apply(aws_env, root, tools, "--expect", digest)
    assert result.returncode == 1 and "refusing it" in result.stderr
    assert not (root / "etc/kimi-fleet/node.env").exists()  # nothing written from a bad bundle
    digest = publish(aws_env, tmp_path, r)
    result = apply(aws_env, root, tools, "--expect", "0" * 64)
    assert result.returncode == 1 and f"names bundle {digest}, expected {'0' * 64}" in result.stderr


def test_the_boot_stub_is_valid_cloud_config_and_names_no_release(tmp_path):
    stub = node_files.render_boot_stub(pointer=release_pointer(PREFIX), region=REGION)
    config = tmp_path / "user-data.yaml"
    config.write_text(stub)
    check = subprocess.run(["cloud-init", "schema", "--config-file", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert len(node_files.user_data_bytes(stub)) < node_files.EC2_USER_DATA_LIMIT
    for digest in (bundle_digest("x"), node_files.node_release(resolved(), render_launch(resolved()), size(resolved()))):
        assert digest not in stub
    assert json.dumps(["python3", node_files.APPLY_RELEASE, "--pointer", release_pointer(PREFIX), "--region", REGION,
                       "--boot"]) in json.dumps(__import__("yaml").safe_load(stub)["runcmd"])


def test_a_fleet_node_boots_only_the_release_its_template_names(aws_env, tmp_path):
    """A fleet's stub passes --expect <digest>: a node launched before Pulumi moved the pointer waits
    for it, then applies exactly that bundle."""
    import threading

    old = resolved()

    def more_flags(values):
        values["engine"] = {**values["engine"], "extraArgs": ["--enable-mfu-metrics"]}

    new = resolved(more_flags)
    root, tools = scratch_node(tmp_path, old)
    publish(aws_env, tmp_path, old)  # the pointer still names the old release
    files = render_node_files(new, render_launch(new), size(new), ebs_volume_id="vol-0123456789abcdef0",
                              secrets=SecretsSource.ssm(PREFIX, REGION, hf_token=False, api_key_version=1))
    wanted = bundle_digest(release_bundle(files))
    later = threading.Timer(3.0, lambda: publish(aws_env, tmp_path, new))
    later.start()
    try:
        result = apply(aws_env, root, tools, "--boot", "--expect", wanted, "--pointer-wait", "60")
    finally:
        later.join()
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"waiting for {wanted[:16]}" in result.stderr
    assert (root / "var/lib/kimi-fleet/applied-release").read_text().strip() == wanted
    assert "--enable-mfu-metrics" in (root / "etc/kimi-fleet/engine-0.argv.json").read_text()
