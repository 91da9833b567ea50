"""The in-place path of an AWS node, run for real: the release bundle in S3 and the pointer and
secrets in SSM (moto's server on loopback, the AWS CLI talking to it), the shipped applier, and
the node's own bootstrap in a scratch root. Release N, then N+1: only what changed restarts."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import socket
import stat
import tarfile
import threading
import time
from pathlib import Path

import pytest

from kimi_fleet import boot_stub, node_files
from kimi_fleet.launch import compile_cache_host_dir, render_launch
from kimi_fleet.node_files import SecretsSource, bundle_digest, release_bundle, release_pointer, render_node_files
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.validation import parse_spec
from kimi_fleet.stackfile import load_stack_config, stack_file
from tests.fakes.aws_api import BIN, aws_cli, moto_server
from tests.test_weights_mirror import S5CMD

STACK = "h200-int4-sglang"
REGION = "us-east-1"
PREFIX = f"/kimi-fleet/{STACK}"
BUCKET = "kimi-releases-test"
APPLIER = Path(node_files.__file__).parent / "node_scripts" / "apply_release.py"
pytestmark = [pytest.mark.skipif(not (BIN / "aws").exists(), reason="awscli not installed (requirements-dev.txt)"),
              pytest.mark.skipif(S5CMD is None, reason="s5cmd wheel not installed (requirements-dev.txt)"),
              pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def aws_env():
    with moto_server(REGION) as env:
        create_bucket(env, BUCKET)
        put_parameter(env, f"{PREFIX}/api-key", "k" * 40, secure=True)
        yield env


# What the deployer (Pulumi's NodeRelease, the compile-cache promotion) puts into S3 and SSM, put with
# boto3 in this process: an `aws` CLI process costs about a second of CPU, and the test made ~40 of
# them besides the node's. The node's side (the applier, its bootstrap) still runs the real AWS CLI.
def _client(env: dict, service: str):
    import boto3

    return boto3.client(service, region_name=REGION, endpoint_url=env["AWS_ENDPOINT_URL"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def create_bucket(env: dict, bucket: str) -> None:
    _client(env, "s3").create_bucket(Bucket=bucket)


def upload(env: dict, local: Path, uri: str) -> None:
    """`aws s3 cp LOCAL s3://BUCKET/KEY`."""
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    _client(env, "s3").put_object(Bucket=bucket, Key=key, Body=Path(local).read_bytes())


def put_parameter(env: dict, name: str, value: str, *, secure: bool = False) -> None:
    """`aws ssm put-parameter --overwrite` (String, or SecureString)."""
    _client(env, "ssm").put_parameter(Name=name, Value=value, Type="SecureString" if secure else "String",
                                      Overwrite=True)


def resolved(edit=None) -> Resolved:
    values = copy.deepcopy(load_stack_config(stack_file(STACK)).values)
    if edit:
        edit(values)
    return Resolved(parse_spec(values, STACK, f"stacks/Pulumi.{STACK}.yaml"))


def publish(env: dict, tmp_path: Path, r: Resolved, *, tamper: bool = False, api_key_version: int = 1) -> str:
    """What NodeRelease does: the bundle under its digest, then the pointer."""
    files = render_node_files(r, render_launch(r), size(r), ebs_volume_id="vol-0123456789abcdef0",
                              secrets=SecretsSource.ssm(PREFIX, REGION, hf_token=False,
                                                        api_key_version=api_key_version))
    bundle = release_bundle(files)
    digest = bundle_digest(bundle)
    local = tmp_path / f"{digest}.json"
    local.write_text(bundle + (" " if tamper else ""))
    upload(env, local, f"s3://{BUCKET}/releases/{digest}.json")
    put_parameter(env, release_pointer(PREFIX), f"s3://{BUCKET}/releases/{digest}.json {digest}")
    return digest


def released(tmp_path: Path, digest: str) -> str:
    """The release id inside a published bundle (what the node's proxy stamps and its status names)."""
    files = json.loads((tmp_path / f"{digest}.json").read_text())["files"]
    return next(f["content"] for f in files if f["path"] == node_files.RELEASE_FILE).strip()


def apply(env: dict, root: Path, tools: Path, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    run_env = {**env, "KIMI_ROOT": str(root), "KIMI_DRY_GPU": "1", "PATH": f"{tools}:{env['PATH']}",
               "VERIFY_PYTHON": sys.executable,  # the suite's dependencies are here: no verifier venv
               # the pinned s5cmd is here too: no fetch venv built from PyPI in every test (4-5 s of
               # CPU each; test_node_packages installs the hash-pinned wheel, test_node_files the venv step)
               "S5CMD": str(S5CMD),
               "RETRY_FIRST_DELAY": "1", **(extra_env or {})}
    return subprocess.run(["/usr/bin/python3", str(APPLIER), "--pointer", release_pointer(PREFIX), "--region", REGION,
                           "--pointer-wait", "5", "--retry-delay", "0.2", "--admission-poll", "0.2", *args],
                          env=run_env, capture_output=True, text=True, timeout=180)


#: The flag that makes the stub engine run out of memory while it loads (release N+1's mistake).
OOM_FLAG = "--enable-mfu-metrics"
#: A flag the engine takes that changes nothing else (SGLang reports cached tokens in usage): release
#: N+1's engine argv differs by it. Not --enable-metrics: kimi-fleet sets that one itself (1c4bb3f).
EXTRA_FLAG = "--enable-cache-report"


def stub_node_tools(tools: Path, state: Path) -> None:
    """Docker, systemctl and journalctl as the applier and kimi-engine-run see them on a node: docker
    pulls into a local image list and runs an engine that serves, or dies of OOM with OOM_FLAG;
    systemctl reports the engine's restart count; journalctl prints the engine's log."""
    state.mkdir(parents=True, exist_ok=True)
    (tools / "docker").write_text(f"""#!/usr/bin/env python3
import sys
state = {str(state)!r}
args = sys.argv[1:]
open(f"{{state}}/docker.log", "a").write(" ".join(args[:2]) + (" OOM" if {OOM_FLAG!r} in args else "") + "\\n")
try:
    images = open(f"{{state}}/images").read().split()
except OSError:
    images = []
if args[:2] == ["image", "inspect"]:
    sys.exit(0 if args[2] in images else 1)
if args[0] == "pull":
    open(f"{{state}}/images", "a").write(args[1] + "\\n")
    sys.exit(0)
if args[0] == "run":
    if {OOM_FLAG!r} in args:
        open(f"{{state}}/engine.log", "a").write("loading weights\\ntorch.OutOfMemoryError: CUDA out of memory. "
                                                "Tried to allocate 2.00 GiB\\n")
        sys.exit(1)
    open(f"{{state}}/engine.log", "a").write("The server is fired up and ready to roll!\\n")
    sys.exit(0)
""")
    (tools / "systemctl").write_text(f"""#!/bin/sh
if [ "$1" = show ] && [ "$3" = NRestarts ]; then cat {state}/restarts 2>/dev/null || echo 0; fi
exit 0
""")
    (tools / "journalctl").write_text(f"#!/bin/sh\ntail -n 20 {state}/engine.log 2>/dev/null\n")
    for name in ("docker", "systemctl", "journalctl"):
        (tools / name).chmod(0o755)


class FakeNode(threading.Thread):
    """What systemd and the watchdog do on the node, reduced to what the applier watches: whenever the
    live engine argv changes, the engine starts through the node's own kimi-engine-run (stub docker);
    one that exits is restarted every `restart_seconds` (systemd's NRestarts counts it); one that
    serves makes the node ready for the live release (the ready file names it)."""

    def __init__(self, root: Path, tools: Path, state: Path, restart_seconds: float = 0.3, readmits: bool = False):
        """readmits: a serving node whose ready file is gone admits itself again (the watchdog's next
        tick); without it, only an engine (re)start admits."""
        super().__init__(daemon=True)
        self.root, self.tools, self.state, self.restart_seconds = root, tools, state, restart_seconds
        self.readmits = readmits
        self.stopped = threading.Event()

    def run(self):
        argv_file = self.root / "etc/kimi-fleet/engine-0.argv.json"
        ready = self.root / node_files.READY_FILE.lstrip("/")
        started, serving = None, False
        while not self.stopped.wait(0.1):
            try:
                argv, release = argv_file.read_text(), (self.root / node_files.RELEASE_FILE.lstrip("/")).read_text()
                env_file = (self.root / "etc/kimi-fleet/engine-0.env").read_text()
            except OSError:
                continue
            if (argv, release) == started and serving and (ready.exists() or not self.readmits):
                continue
            if (argv, release) != started:
                ready.unlink(missing_ok=True)  # the old engine stops: not ready
                (self.state / "restarts").write_text("0")
            elif not serving:
                time.sleep(self.restart_seconds)
                count = int((self.state / "restarts").read_text()) + 1
                (self.state / "restarts").write_text(str(count))
            started = (argv, release)
            weights = next(line[12:] for line in env_file.splitlines() if line.startswith("WEIGHTS_DIR="))
            run = subprocess.run(["bash", str(self.root / "usr/local/sbin/kimi-engine-run"), "0"],
                                 env={**os.environ, "KIMI_ROOT": str(self.root), "WEIGHTS_DIR": weights,
                                      "PATH": f"{self.tools}:{os.environ['PATH']}"}, capture_output=True)
            serving = run.returncode == 0
            if serving:
                ready.parent.mkdir(parents=True, exist_ok=True)
                ready.write_text(release.strip() + "\n")

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *_):
        self.stopped.set()
        self.join(timeout=10)


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
    stub_node_tools(tools, tmp_path / "node")
    digest = publish(aws_env, tmp_path, first)
    with FakeNode(root, tools, tmp_path / "node"):
        _n_then_n_plus_1(aws_env, root, tools, digest)


def _n_then_n_plus_1(aws_env, root, tools, digest):
    result = apply(aws_env, root, tools, "--expect", digest)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (root / "var/lib/kimi-fleet/applied-release").read_text().strip() == digest
    assert (root / "etc/kimi-fleet/secrets/api-key").read_text() == "k" * 40  # fetched from SSM by the bootstrap
    assert "kimi-engine@0.service: (re)started" in result.stderr
    node_env = (root / "etc/kimi-fleet/node.env").read_text()
    assert "SSM_API_KEY_VERSION=1" in node_env and "EBS_VOLUME_ID=vol-0123456789abcdef0" in node_env

    def more_flags(values):
        values["engine"] = {**values["engine"], "extraArgs": [EXTRA_FLAG]}

    second = resolved(more_flags)
    digest_2 = publish(aws_env, root.parent, second)
    result = apply(aws_env, root, tools, "--expect", digest_2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _restarted(result.stderr) == {"kimi-engine@0.service", "caddy.service"}
    release_2 = node_files.node_release(second, render_launch(second), size(second))
    assert f"release {release_2} admitted" in result.stderr
    # Secrets, weights and caches were prepared from the staged files before any file went live.
    log = result.stderr
    assert log.index("bootstrap --prepare done") < log.index("file(s) changed; waiting up to")
    assert EXTRA_FLAG in (root / "etc/kimi-fleet/engine-0.argv.json").read_text()
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
    create_bucket(aws_env, bucket)
    # The deployer promoted it: stored under its SHA-256 and pinned for this launch (compile_cache.py).
    from kimi_fleet.node_scripts.compile_cache import launch_digest, pinned_uri
    sha256 = hashlib.sha256((tmp_path / "cache.tar").read_bytes()).hexdigest()
    upload(aws_env, tmp_path / "cache.tar", pinned_uri(archive, sha256))
    put_parameter(aws_env, f"{PREFIX}/compile-cache/{launch_digest(archive)}", sha256)

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
    """An AWS node's user data is the frozen loader: the pointer and region, no release, no digest."""
    r = resolved()
    bundle = node_files.release_bundle(node_files.render_node_files(
        r, render_launch(r), size(r), secrets=node_files.planned_secrets(r),
        ebs_volume_id=node_files.EBS_VOLUME_PLACEHOLDER))
    stub = node_files.render_aws_user_data(r, ssm_prefix=PREFIX, region=REGION)
    config = tmp_path / "user-data.yaml"
    config.write_text(stub)
    check = subprocess.run(["cloud-init", "schema", "--config-file", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert len(node_files.user_data_bytes(stub)) < node_files.EC2_USER_DATA_LIMIT
    for digest in (bundle_digest(bundle), node_files.node_release(r, render_launch(r), size(r))):
        assert digest not in stub
    assert stub == boot_stub.render_frozen_boot_stub(pointer=release_pointer(PREFIX), region=REGION)
    document = __import__("yaml").safe_load(stub)
    assert [f["path"] for f in document["write_files"]] == [boot_stub.BOOT_LOADER]
    assert document["runcmd"] == [["python3", boot_stub.BOOT_LOADER, "--pointer", release_pointer(PREFIX),
                                   "--region", REGION]]


def test_a_fleet_node_from_the_previous_template_version_boots_its_own_bundle_by_digest(aws_env, tmp_path):
    """The pointer already names release N+1 (or a bad release); a node launched from the template
    version of release N (an instance refresh rolled back, a scale-out from the retained version)
    fetches bundle N by its digest and runs N, without waiting for the pointer."""
    old = resolved()

    def more_flags(values):
        values["engine"] = {**values["engine"], "extraArgs": [OOM_FLAG]}

    root, tools = scratch_node(tmp_path, old)
    wanted = publish(aws_env, tmp_path, old)
    newer = publish(aws_env, tmp_path, resolved(more_flags))  # the pointer moves on to N+1
    assert newer != wanted
    result = apply(aws_env, root, tools, "--boot", "--expect", wanted, "--pointer-wait", "60")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"pointer names bundle {newer[:16]}; this node's template names {wanted[:16]}" in result.stderr
    assert "waiting for" not in result.stderr
    assert (root / "var/lib/kimi-fleet/applied-release").read_text().strip() == wanted
    assert OOM_FLAG not in (root / "etc/kimi-fleet/engine-0.argv.json").read_text()


def test_a_fleet_node_retries_a_bundle_not_yet_uploaded(aws_env, tmp_path):
    """A node may boot before Pulumi uploaded its template's bundle: the fetch by digest is retried
    (backoff with jitter) until the object is there, then applied."""
    # A bundle no other test published (the bucket is shared by the module's tests).
    new = resolved(lambda values: values.update(engine={**values["engine"], "extraArgs": [EXTRA_FLAG, OOM_FLAG]}))
    root, tools = scratch_node(tmp_path, new)
    publish(aws_env, tmp_path, resolved())  # the pointer names another release
    files = render_node_files(new, render_launch(new), size(new), ebs_volume_id="vol-0123456789abcdef0",
                              secrets=SecretsSource.ssm(PREFIX, REGION, hf_token=False, api_key_version=1))
    bundle = release_bundle(files)
    wanted = bundle_digest(bundle)
    (tmp_path / "wanted.json").write_text(bundle)
    log = root / "var/log/kimi-fleet/bootstrap.log"

    def upload_once_the_node_asked():
        wait_for(lambda: log.exists() and f"release bundle {wanted[:16]}: aws s3" in log.read_text())
        upload(aws_env, tmp_path / "wanted.json", f"s3://{BUCKET}/releases/{wanted}.json")

    later = threading.Thread(target=upload_once_the_node_asked)
    later.start()
    try:
        result = apply(aws_env, root, tools, "--boot", "--expect", wanted, "--pointer-wait", "60")
    finally:
        later.join()
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"release bundle {wanted[:16]}: aws s3" in result.stderr and "retrying in" in result.stderr
    assert (root / "var/lib/kimi-fleet/applied-release").read_text().strip() == wanted
    assert f"\"{EXTRA_FLAG}\", \"{OOM_FLAG}\"" in (root / "etc/kimi-fleet/engine-0.argv.json").read_text()


def flaky_aws(tools: Path, state: Path, failures: int) -> None:
    """`aws` that fails the first `failures` calls of each kind (SSM or S3 unreachable for a while),
    then is the real CLI; every call is counted by kind."""
    state.mkdir(parents=True, exist_ok=True)
    (tools / "aws").write_text(f"""#!/bin/bash
kind="$1-$2"
[[ " $* " == *" --with-decryption "* ]] && kind="$kind-secret"
count=$(( $(cat {state}/$kind 2>/dev/null || echo 0) + 1 ))
echo "$count" >{state}/$kind
if (( count <= {failures} )); then
  echo "Could not connect to the endpoint URL: (attempt $count)" >&2
  exit 255
fi
exec {aws_cli()} "$@"
""")
    (tools / "aws").chmod(0o755)


def test_ssm_and_s3_unreachable_for_a_while_are_retried_until_they_pass(aws_env, tmp_path):
    r = resolved()
    root, tools = scratch_node(tmp_path, r)
    flaky_aws(tools, tmp_path / "calls", failures=2)
    digest = publish(aws_env, tmp_path, r)
    result = apply(aws_env, root, tools, "--expect", digest, "--pointer-wait", "60")
    assert result.returncode == 0, result.stderr[-3000:]
    calls = {path.name: int(path.read_text()) for path in (tmp_path / "calls").iterdir()}
    # The pointer, the bundle and the API key each failed twice, then passed (the compile cache's pin
    # is one more plain SSM read, after the pointer's).
    assert calls["s3-cp"] == 3 and calls["ssm-get-parameter-secret"] == 3 and calls["ssm-get-parameter"] >= 3, calls
    assert result.stderr.count("release pointer: aws ssm") == 2
    # The key by the version the release names (publish: version 1).
    assert "ssm get-parameter /kimi-fleet/h200-int4-sglang/api-key:1 failed (attempt 2), retrying in" in result.stderr
    assert (root / "etc/kimi-fleet/secrets/api-key").read_text() == "k" * 40


def test_a_refusal_is_not_retried(aws_env, tmp_path):
    r = resolved()
    root, tools = scratch_node(tmp_path, r)
    flaky_aws(tools, tmp_path / "calls", failures=0)
    digest = publish(aws_env, tmp_path, r, tamper=True)
    result = apply(aws_env, root, tools, "--expect", digest, "--pointer-wait", "600")
    assert result.returncode == 1 and "refusing it" in result.stderr
    assert int((tmp_path / "calls" / "s3-cp").read_text()) == 1  # fetched once: a wrong hash stays wrong


def test_a_broken_release_goes_back_by_itself_and_the_status_names_it(aws_env, tmp_path):
    """Release N serves; N+1's engine runs out of memory while loading. The applier pulled N+1's
    image and checked its weights while N served, swapped, saw the engine crash-loop, restored N's
    files and restarted N: the node serves N again, the status names N+1, why, and the engine's
    last log lines, and the apply (what `pulumi up` waits on) fails naming the release and node."""
    good = resolved()

    def out_of_memory(values):
        values["engine"] = {**values["engine"], "extraArgs": [OOM_FLAG]}

    broken = resolved(out_of_memory)
    root, tools = scratch_node(tmp_path, good)
    state = tmp_path / "node"
    stub_node_tools(tools, state)
    ready = root / node_files.READY_FILE.lstrip("/")
    with FakeNode(root, tools, state):
        digest_n = publish(aws_env, tmp_path, good)
        release_n = released(tmp_path, digest_n)
        assert apply(aws_env, root, tools, "--expect", digest_n).returncode == 0
        wait_for(lambda: ready.exists() and ready.read_text().strip() == release_n)
        digest_n1 = publish(aws_env, tmp_path, broken)
        release_n1 = released(tmp_path, digest_n1)
        # A generous budget: the crash loop, not the budget, ends the wait.
        result = apply(aws_env, root, tools, "--expect", digest_n1, "--admission-budget", "120")
    assert result.returncode == 1, result.stderr[-3000:]
    node = socket.gethostname()
    assert (f"apply failed: release {release_n1} failed on node {node}: kimi-engine@0 restarted 3 times without "
            "admitting itself") in result.stderr
    # N serves again, from N's files.
    assert OOM_FLAG not in (root / "etc/kimi-fleet/engine-0.argv.json").read_text()
    assert (root / node_files.RELEASE_FILE.lstrip("/")).read_text().strip() == release_n
    assert (root / "var/lib/kimi-fleet/applied-release").read_text().strip() == digest_n
    assert ready.read_text().strip() == release_n and f"release {release_n} restored and admitted again" in result.stderr
    status = json.loads((root / "run/kimi-fleet/status.json").read_text())
    assert status["failed_release"] == release_n1 and status["failed_bundle"] == digest_n1 and status["node"] == node
    assert status["reason"] == "kimi-engine@0 restarted 3 times without admitting itself"
    assert any("CUDA out of memory" in line for line in status["engine_log_tail"])
    # Before the old engine stopped: N+1's image was pulled while N served (before N+1's first run).
    docker = (state / "docker.log").read_text().splitlines()
    first_pull = next(i for i, call in enumerate(docker) if call.startswith("pull "))
    first_broken_run = next(i for i, call in enumerate(docker) if call.startswith("run ") and call.endswith(" OOM"))
    assert first_pull < first_broken_run, docker
    assert not (root / "var/lib/kimi-fleet/staging").exists() or not any((root / "var/lib/kimi-fleet/staging").iterdir())


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_the_bootstrap_is_done_only_when_the_proxy_it_started_runs(aws_env, tmp_path):
    """Caddy refused to start (its pre-start refused the key): the bootstrap does not say "done"; it
    refuses in one line naming the unit and Caddy's own last words, records it in the node status,
    and exits 2, which kimi-bootstrap.service does not retry (RestartPreventExitStatus)."""
    r = resolved()
    root, tools = scratch_node(tmp_path, r)
    (tools / "systemctl").write_text("""#!/bin/sh
case "$1" in
  show) exit 0 ;;  # no job pending
  is-active) if [ "$2" = caddy.service ]; then echo failed; exit 3; fi; echo active ;;
esac
exit 0
""")
    (tools / "journalctl").write_text("""#!/bin/sh
echo "Starting caddy.service - Caddy..."
echo "kimi-caddy-env: refused: the API key in /etc/kimi-fleet/secrets/api-key is not 16-256 characters"
echo "caddy.service: Control process exited, code=exited, status=1/FAILURE"
echo "Failed to start caddy.service - Caddy."
""")
    for name in ("systemctl", "journalctl"):
        (tools / name).chmod(0o755)
    digest = publish(aws_env, tmp_path, r)
    result = apply(aws_env, root, tools, "--expect", digest, extra_env={"KIMI_CHECK_STARTED": "1"})
    assert result.returncode == 1 and "bootstrap failed (exit 2)" in result.stderr
    assert "bootstrap done" not in result.stderr
    refusal = ("REFUSED: caddy.service is failed after the bootstrap started it: kimi-caddy-env: refused: the API key "
               "in /etc/kimi-fleet/secrets/api-key is not 16-256 characters (journalctl -u caddy.service)")
    assert refusal in result.stderr
    status = json.loads((root / "run/kimi-fleet/status.json").read_text())
    assert status["phase"] == "failed" and status["refused"]["by"] == "kimi-bootstrap"
    assert status["refused"]["reason"] == refusal.removeprefix("REFUSED: ")
    # Fixed (here: Caddy runs): the next run says done, and the refusal no longer stands.
    (tools / "systemctl").write_text("#!/bin/sh\n[ \"$1\" = is-active ] && echo active\nexit 0\n")
    again = apply(aws_env, root, tools, "--expect", digest, extra_env={"KIMI_CHECK_STARTED": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "bootstrap done: proxy and watchdog running" in again.stderr
    assert "refused" not in json.loads((root / "run/kimi-fleet/status.json").read_text())


def test_a_key_rotation_counts_only_a_new_admission_and_a_failed_one_puts_the_old_key_back(aws_env, tmp_path):
    """A rotated key keeps the release id, so the ready file from before the swap already names it:
    the applier removes it first and waits for a new admission. A node that does not admit again
    fails the release and gets the old key back with the old files; one that does takes the new key
    (fetched under the stage while the old key served, moved in at the swap)."""
    r = resolved()
    root, tools = scratch_node(tmp_path, r)
    state = tmp_path / "node"
    stub_node_tools(tools, state)
    ready = root / node_files.READY_FILE.lstrip("/")
    key = root / "etc/kimi-fleet/secrets/api-key"
    try:
        with FakeNode(root, tools, state):  # admits on an engine (re)start only: a key alone is not admitted
            digest_n = publish(aws_env, tmp_path, r)
            release_n = released(tmp_path, digest_n)
            assert apply(aws_env, root, tools, "--expect", digest_n).returncode == 0
            wait_for(lambda: ready.exists() and ready.read_text().strip() == release_n)
            put_parameter(aws_env, f"{PREFIX}/api-key", "n" * 40, secure=True)
            digest_rotated = publish(aws_env, tmp_path, r, api_key_version=2)
            assert digest_rotated != digest_n and released(tmp_path, digest_rotated) == release_n
            failed = apply(aws_env, root, tools, "--expect", digest_rotated, "--admission-budget", "2")
        assert failed.returncode == 1, failed.stderr[-3000:]
        assert f"release {release_n} failed" in failed.stderr and "not admitted within 2 s" in failed.stderr
        assert key.read_text() == "k" * 40 and stat.S_IMODE(key.stat().st_mode) == 0o600  # the old key is back
        assert "SSM_API_KEY_VERSION=1" in (root / "etc/kimi-fleet/node.env").read_text()
        with FakeNode(root, tools, state, readmits=True):
            admitted = apply(aws_env, root, tools, "--expect", digest_rotated, "--admission-budget", "60")
        assert admitted.returncode == 0, admitted.stderr[-3000:]
        assert key.read_text() == "n" * 40 and stat.S_IMODE(key.stat().st_mode) == 0o600
        assert not (root / "var/lib/kimi-fleet/staging").exists() or not any(
            (root / "var/lib/kimi-fleet/staging").iterdir())  # no copy of a key left in a stage
    finally:
        put_parameter(aws_env, f"{PREFIX}/api-key", "k" * 40, secure=True)


def test_the_admission_budget_is_the_warm_start_the_nodes_own_deadline_and_two_watchdog_ticks(tmp_path):
    from kimi_fleet.node_scripts import apply_release

    r = resolved()
    files = render_node_files(r, render_launch(r), size(r), ebs_volume_id="vol-0123456789abcdef0",
                              secrets=SecretsSource.ssm(PREFIX, REGION, hf_token=False))
    staged = tmp_path / "staged"
    apply_release.write_files(json.loads(release_bundle(files)), staged)
    stack = json.loads((staged / apply_release.STACK_JSON).read_text())
    minutes = -(-size(r).warm_start_seconds // 60)
    expected = (minutes * 60 + node_files.ADMISSION_DEADLINE_SECONDS + 2 * stack["watchdog"]["interval_seconds"]
                + apply_release.ADMISSION_MARGIN_SECONDS)
    assert stack["admission"]["deadline_seconds"] == node_files.ADMISSION_DEADLINE_SECONDS
    assert apply_release.admission_budget(staged) == expected


def test_files_only_the_previous_bundle_had_are_removed_and_come_back_with_it(tmp_path, monkeypatch):
    """A release with fewer engines drops engine-1's files: the applier removes exactly those (never a
    file no bundle named), and a restore brings them back."""
    from kimi_fleet.node_scripts import apply_release

    monkeypatch.setattr(apply_release, "ROOT", tmp_path)
    monkeypatch.setattr(apply_release, "STATE", tmp_path / "var/lib/kimi-fleet")
    monkeypatch.setattr(apply_release, "LOG", tmp_path / "bootstrap.log")
    kept, dropped, foreign = "/etc/kimi-fleet/engine-0.env", "/etc/kimi-fleet/engine-1.env", "/etc/kimi-fleet/mine"
    old = {"files": [{"path": p, "mode": "0644", "content": p} for p in (kept, dropped)]}
    apply_release.write_files(old, tmp_path)
    (tmp_path / foreign.lstrip("/")).write_text("not the project's")
    apply_release.STATE.mkdir(parents=True)
    (apply_release.STATE / apply_release.APPLIED_FILES).write_text(json.dumps(apply_release.bundle_paths(old)))
    new = {"files": [{"path": kept, "mode": "0644", "content": "new"}]}
    assert apply_release.dropped_paths(new) == [dropped]
    saved = apply_release.snapshot(new, apply_release.dropped_paths(new))
    apply_release.write_files(new, tmp_path)
    apply_release.remove_paths(apply_release.dropped_paths(new))
    assert not (tmp_path / dropped.lstrip("/")).exists() and (tmp_path / foreign.lstrip("/")).exists()
    apply_release.restore(saved)
    assert (tmp_path / dropped.lstrip("/")).read_text() == dropped and (tmp_path / kept.lstrip("/")).read_text() == kept
