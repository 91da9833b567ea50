"""Compile caches shared through the managed mirror (issue 10, item 4; issue 21, items 1 and 2),
against a real S3 and SSM API (moto's server on loopback) with the pinned s5cmd and the AWS CLI the
node uses, a fake IMDSv2 on loopback, and real filesystems.

A node publishes only a candidate under its stack and instance; the verification gate's
promote_compile_cache.py (the deployer's credentials) checks it, stores it under its own SHA-256 and
pins that digest in SSM; a node restores only the pinned key, and only when the bytes hash to the
pin. Reproduced attacks: an archive put over the shared key (plain put-object) is never restored; a
hostile candidate is never promoted; a directory swapped for a link to host files between the
publisher's listing and its reading never brings those files into the archive."""

from __future__ import annotations

import hashlib
import json
import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.fakes.aws_api import BIN, moto_server
from tests.test_weights_mirror import S5CMD, aws

PROJECT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT / "kimi_fleet" / "node_scripts" / "compile_cache.py"
PROMOTE = PROJECT / "scripts" / "promote_compile_cache.py"
REGION = "us-east-1"
BUCKET = "kimi-cache-test"
STACK = "h200-test"
CACHE = "hf/.compile-cache/vllm--img--h200"
LAUNCH = "0123456789abcdef"
ARCHIVE = f"s3://{BUCKET}/{CACHE}/{LAUNCH}.tar"
PIN = f"/kimi-fleet/{STACK}/compile-cache/{LAUNCH}"
NODE_A, NODE_B, STRANGER = "i-0aaaaaaaaaaaaaaa1", "i-0bbbbbbbbbbbbbbb2", "i-0ccccccccccccccc3"
pytestmark = [pytest.mark.skipif(not (BIN / "aws").exists(), reason="awscli not installed (requirements-dev.txt)"),
              pytest.mark.skipif(S5CMD is None, reason="s5cmd wheel not installed (requirements-dev.txt)"),
              pytest.mark.timeout(180)]


#: The role id part of a node's ${aws:userid} in keys these tests lay out by hand.
ROLE_ID = "AROAEXAMPLENODEROLE01"


def as_node(env: dict, instance: str) -> dict:
    """The environment of a node: its role's session credentials, named after its instance as EC2
    names them (so STS calls it <role id>:<instance id>, IAM's ${aws:userid})."""
    # The role exists, so STS names its sessions by its one role id (as AWS does).
    subprocess.run(["aws", "iam", "create-role", "--role-name", "kimi-node", "--assume-role-policy-document",
                    '{"Version": "2012-10-17", "Statement": []}'], env=env, capture_output=True, text=True)
    assumed = subprocess.run(["aws", "sts", "assume-role", "--role-arn", "arn:aws:iam::123456789012:role/kimi-node",
                              "--role-session-name", instance, "--output", "json"], env=env, capture_output=True,
                             text=True, check=True)
    credentials = json.loads(assumed.stdout)["Credentials"]
    return {**env, "AWS_ACCESS_KEY_ID": credentials["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": credentials["SecretAccessKey"], "AWS_SESSION_TOKEN": credentials["SessionToken"]}


def caller_of(env: dict) -> str:
    return subprocess.run(["aws", "sts", "get-caller-identity", "--query", "UserId", "--output", "text"], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def s3_env():
    with moto_server(REGION) as env:
        aws(env, "s3api", "create-bucket", "--bucket", BUCKET)
        yield {**as_node(env, NODE_A), "S5CMD": str(S5CMD), "AWS_REGION": REGION}


def settings_file(tmp_path: Path, *, pin: str = PIN) -> Path:
    path = tmp_path / f"node-{time.monotonic_ns()}.env"
    path.write_text(f"# node settings\nSTACK={STACK}\nAWS_REGION={REGION}\nCOMPILE_CACHE_ARCHIVE={ARCHIVE}\n"
                    f"COMPILE_CACHE_PIN_PARAMETER={pin}\n")
    return path


def cache_tool(env, action: str, directory: Path, tmp_path: Path, *extra: str,
               archive: str = ARCHIVE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), action, "--archive", archive, "--dir", str(directory),
                           "--settings", str(settings_file(tmp_path)), *extra],
                          env=env, capture_output=True, text=True, timeout=120)


def promote(env, *nodes: str, timeout: float = 0, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(PROMOTE), "--region", REGION, "--bucket", BUCKET, "--cache-prefix", CACHE,
            "--stack", STACK, "--launch", LAUNCH, "--pin-parameter", PIN, "--timeout", str(timeout), "--poll", "0.2",
            *extra]
    for node in nodes:
        argv += ["--instance-id", node]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def pin_value(env) -> str | None:
    result = subprocess.run(["aws", "ssm", "get-parameter", "--name", PIN, "--region", REGION, "--query",
                             "Parameter.Value", "--output", "text"], env=env, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def built_cache(directory: Path, *, age_seconds: float = 3600) -> dict[str, bytes]:
    """What an engine leaves behind: kernels in nested directories, a relative link, a lock."""
    files = {"triton/ab/kernel.cubin": os.urandom(4096), "torchinductor/fx/graph.py": b"def f(): pass\n",
             "vllm/torch_compile_cache/rank_0/model.so": os.urandom(20000)}
    old = time.time() - age_seconds
    for relative, content in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.utime(path, (old, old))
    (directory / "triton" / "latest").symlink_to("ab")
    (directory / "triton" / "cache.lock").write_text("")
    return files


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def keys(env) -> list[str]:
    listed = aws(env, "s3api", "list-objects-v2", "--bucket", BUCKET, "--query", "Contents[].Key", "--output", "text")
    return sorted(k for k in listed.split() if k != "None")


def _tar(build) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        build(archive)
    return buffer.getvalue()


def _put(env, tmp_path: Path, key: str, content: bytes) -> None:
    """A plain put-object, as anything with write access to the key could do."""
    local = tmp_path / f"upload-{time.monotonic_ns()}.tar"
    local.write_bytes(content)
    aws(env, "s3", "cp", str(local), f"s3://{BUCKET}/{key}")


def _member(archive: tarfile.TarFile, name: str, *, content: bytes = b"x", link: str | None = None,
            kind: bytes | None = None, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.mode = mode
    if link is not None:
        info.type, info.linkname = tarfile.SYMTYPE, link
        archive.addfile(info)
    elif kind is not None:
        info.type = kind
        archive.addfile(info)
    else:
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))


def _pin_archive(env, tmp_path: Path, content: bytes) -> str:
    """What a promotion leaves: the archive under its SHA-256 and the pin (for restore tests)."""
    sha256 = hashlib.sha256(content).hexdigest()
    _put(env, tmp_path, f"{CACHE}/sha256/{sha256}.tar", content)
    aws(env, "ssm", "put-parameter", "--name", PIN, "--type", "String", "--overwrite", "--value", sha256)
    return sha256


def test_a_candidate_is_promoted_by_the_deployer_and_restored_by_the_next_node(s3_env, tmp_path):
    first = tmp_path / "node-a" / "compile-cache" / "vllm--img--h200"
    files = built_cache(first)
    (first / "triton" / "fresh.cubin").write_bytes(b"still being written")  # younger than the settle time
    published = cache_tool(s3_env, "publish", first, tmp_path)
    assert published.returncode == 0, published.stdout + published.stderr
    # Under the node's own ${aws:userid}: the one prefix its role may write (components/gpu_node.py).
    node_a = caller_of(s3_env)
    assert node_a.endswith(f":{NODE_A}")
    candidate = f"{CACHE}/candidates/{STACK}/{node_a}/{LAUNCH}.tar"
    assert f"published 11 entries to s3://{BUCKET}/{candidate}" in published.stdout, published.stdout
    assert "left out 2" in published.stdout  # the lock and the fresh file
    assert keys(s3_env) == [candidate]  # the node wrote its candidate and nothing else
    again = cache_tool(s3_env, "publish", first, tmp_path)
    assert again.returncode == 0 and "already published" in again.stdout

    # No pin yet: the next node compiles, whatever lies in the bucket.
    second = tmp_path / "node-b" / "compile-cache" / "vllm--img--h200"
    unpinned = cache_tool(s3_env, "restore", second, tmp_path)
    assert unpinned.returncode == 0 and f"no cache pinned for launch {LAUNCH}" in unpinned.stdout

    promoted = promote(s3_env, NODE_A)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    sha256 = pin_value(s3_env)
    assert sha256 and f"pinned {PIN} = {sha256}" in promoted.stdout
    assert f"{CACHE}/sha256/{sha256}.tar" in keys(s3_env)
    assert "already pinned" in promote(s3_env, NODE_A).stdout

    (second / "triton").mkdir(parents=True)  # docker's volume mount creates it; an engine made a folder
    inode = second.stat().st_ino
    restored = cache_tool(s3_env, "restore", second, tmp_path)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert f"from s3://{BUCKET}/{CACHE}/sha256/{sha256}.tar (SHA-256 as pinned)" in restored.stdout
    assert tree(second) == files
    assert second.stat().st_ino == inode  # the same directory a running container has mounted
    assert os.readlink(second / "triton" / "latest") == "ab"
    assert not list(second.parent.glob(".*restoring*"))
    pinned = cache_tool(as_node(s3_env, NODE_B), "publish", second, tmp_path)
    assert pinned.returncode == 0 and "already has a pinned cache" in pinned.stdout


def test_an_archive_put_over_the_shared_cache_is_never_restored(s3_env, tmp_path):
    """Issue 21, item 1: a plain put-object over the launch's archive, or over the pinned key
    itself, does not reach a node: the node reads only the pinned key and checks its digest."""
    honest = _tar(lambda a: _member(a, "triton/kernel.cubin", content=b"honest kernel"))
    poisoned = _tar(lambda a: _member(a, "torchinductor/fx/graph.py", content=b"import os; os.system('evil')\n"))
    _put(s3_env, tmp_path, f"{CACHE}/{LAUNCH}.tar", poisoned)  # the key nodes used to restore from
    cache = tmp_path / "node" / "compile-cache" / "x"
    ignored = cache_tool(s3_env, "restore", cache, tmp_path)
    assert ignored.returncode == 0 and "no cache pinned" in ignored.stdout
    assert not cache.exists() or tree(cache) == {}

    sha256 = _pin_archive(s3_env, tmp_path, honest)
    _put(s3_env, tmp_path, f"{CACHE}/sha256/{sha256}.tar", poisoned)  # overwritten after promotion
    refused = cache_tool(s3_env, "restore", cache, tmp_path)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    got = hashlib.sha256(poisoned).hexdigest()
    line = next(line for line in refused.stdout.splitlines() if "refused" in line)
    assert f"SHA-256 expected {sha256}" in line and f"got {got}" in line and PIN in line
    assert not cache.exists() or tree(cache) == {}
    assert list((tmp_path / "node" / "compile-cache").iterdir()) in ([], [cache])  # no staging left


def test_a_pin_that_is_not_a_digest_is_refused(s3_env, tmp_path):
    aws(s3_env, "ssm", "put-parameter", "--name", PIN, "--type", "String", "--value", "../../etc/passwd")
    result = cache_tool(s3_env, "restore", tmp_path / "cache", tmp_path)
    assert result.returncode == 1 and "not a SHA-256" in result.stdout
    assert "etc/passwd" not in result.stdout + result.stderr  # the value is never logged (it could be a secret)


def test_a_node_that_kept_its_cache_keeps_it(s3_env, tmp_path):
    _pin_archive(s3_env, tmp_path, _tar(lambda a: _member(a, "triton/other.cubin")))
    kept = tmp_path / "b"
    (kept / "triton").mkdir(parents=True)
    (kept / "triton" / "mine.cubin").write_bytes(b"built here")
    result = cache_tool(s3_env, "restore", kept, tmp_path)
    assert result.returncode == 0 and "already holds a cache: kept" in result.stdout
    assert tree(kept) == {"triton/mine.cubin": b"built here"}


def test_nothing_to_publish_and_no_candidate_in_time(s3_env, tmp_path):
    nothing = cache_tool(s3_env, "publish", tmp_path / "empty", tmp_path)
    assert nothing.returncode == 0 and "nothing to publish" in nothing.stdout
    # A candidate of another instance (not this stack's node) or of another launch is not taken.
    other = _tar(lambda a: _member(a, "k.cubin"))
    _put(s3_env, tmp_path, f"{CACHE}/candidates/{STACK}/{ROLE_ID}:{STRANGER}/{LAUNCH}.tar", other)
    _put(s3_env, tmp_path, f"{CACHE}/candidates/{STACK}/{ROLE_ID}:{NODE_A}/fedcba9876543210.tar", other)
    _put(s3_env, tmp_path, f"{CACHE}/candidates/other-stack/{ROLE_ID}:{NODE_A}/{LAUNCH}.tar", other)
    # Not under an IAM user id (a key no node role could have written: IAM scopes each node to its
    # own <role id>:<instance id>), though it names this stack's node.
    _put(s3_env, tmp_path, f"{CACHE}/candidates/{STACK}/{NODE_A}/{LAUNCH}.tar", other)
    waited = promote(s3_env, NODE_A, timeout=1)
    assert waited.returncode == 0, waited.stderr
    assert "warning: no candidate of launch" in waited.stdout and "nothing promoted" in waited.stdout
    assert pin_value(s3_env) is None and not [k for k in keys(s3_env) if "/sha256/" in k]


@pytest.mark.parametrize("hostile, reason", [
    pytest.param(lambda a: _member(a, "../escaped"), "'..' in its name", id="dot-dot"),
    pytest.param(lambda a: _member(a, "ok/../../escaped"), "'..' in its name", id="dot-dot-inside"),
    pytest.param(lambda a: _member(a, "/etc/cron.d/x"), "absolute name", id="absolute-name"),
    pytest.param(lambda a: (_member(a, "out", link="/etc"), _member(a, "out/passwd")), "absolute path",
                 id="absolute-link"),
    pytest.param(lambda a: _member(a, "up", link="../../escaped"), "points outside", id="relative-link-out"),
    pytest.param(lambda a: _member(a, "dev", kind=tarfile.CHRTYPE), "device", id="device"),
    pytest.param(lambda a: _member(a, "ok/tool", mode=0o4755), "setuid", id="setuid"),
])
def test_a_hostile_archive_is_neither_promoted_nor_restored(s3_env, tmp_path, hostile, reason):
    content = _tar(lambda archive: (_member(archive, "ok/kernel.cubin"), hostile(archive)))
    candidate = f"{CACHE}/candidates/{STACK}/{ROLE_ID}:{NODE_A}/{LAUNCH}.tar"
    _put(s3_env, tmp_path, candidate, content)
    promoted = promote(s3_env, NODE_A)
    assert promoted.returncode == 0, promoted.stderr  # the gate still passes
    line = next(line for line in promoted.stdout.splitlines() if "refused" in line)
    assert f"refused candidate s3://{BUCKET}/{candidate}" in line and reason in line and "nothing promoted" in line
    assert pin_value(s3_env) is None and not [k for k in keys(s3_env) if "/sha256/" in k]

    # Had it been pinned anyway, the node applies the same rules while it unpacks.
    _pin_archive(s3_env, tmp_path, content)
    cache = tmp_path / "node" / "compile-cache" / "x"
    restored = cache_tool(s3_env, "restore", cache, tmp_path)
    assert restored.returncode == 1 and reason in restored.stdout, restored.stdout + restored.stderr
    assert not (tmp_path / "node" / "escaped").exists()
    assert list((tmp_path / "node" / "compile-cache").iterdir()) == []  # no cache, no staging left


def test_a_fleet_candidate_is_taken_from_any_instance_of_its_group(s3_env, tmp_path):
    """A fleet names its Auto Scaling group: a candidate of one of its instances is promoted."""
    import boto3

    session = boto3.session.Session(region_name=REGION)
    endpoint = s3_env["AWS_ENDPOINT_URL"]
    ec2 = session.client("ec2", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test")
    autoscaling = session.client("autoscaling", endpoint_url=endpoint, aws_access_key_id="test",
                                 aws_secret_access_key="test")
    ec2.create_launch_template(LaunchTemplateName="tpl", LaunchTemplateData={"ImageId": "ami-12c6146b",
                                                                            "InstanceType": "t3.micro"})
    autoscaling.create_auto_scaling_group(AutoScalingGroupName="fleet", LaunchTemplate={"LaunchTemplateName": "tpl"},
                                          MinSize=1, MaxSize=1, DesiredCapacity=1, AvailabilityZones=["us-east-1a"])
    member = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["fleet"])["AutoScalingGroups"][0][
        "Instances"][0]["InstanceId"]
    content = _tar(lambda a: _member(a, "k.cubin", content=b"fleet kernel"))
    _put(s3_env, tmp_path, f"{CACHE}/candidates/{STACK}/{ROLE_ID}:{member}/{LAUNCH}.tar", content)
    promoted = promote(s3_env, extra=("--group", "fleet"))
    assert promoted.returncode == 0 and pin_value(s3_env) == hashlib.sha256(content).hexdigest(), promoted.stdout


def test_the_publisher_never_follows_a_directory_swapped_for_a_link(tmp_path, monkeypatch):
    """Issue 21, item 2: between the publisher's listing and its reading, the container replaces a
    directory (or a file) of its cache by a link to host files: they never enter the archive."""
    sys.path.insert(0, str(SCRIPT.parent))
    import compile_cache

    host = tmp_path / "host-etc"
    host.mkdir()
    (host / "kernel.cubin").write_bytes(b"HOST SECRET: caddy's TLS key")
    cache = tmp_path / "cache"
    (cache / "sub").mkdir(parents=True)
    (cache / "sub" / "kernel.cubin").write_bytes(b"kernel")
    (cache / "file.cubin").write_bytes(b"kernel file")
    old = time.time() - 3600
    for path in (cache / "sub" / "kernel.cubin", cache / "file.cubin", host / "kernel.cubin"):
        os.utime(path, (old, old))
    swapped = []

    def swap(relative: str) -> None:
        if relative == "sub":  # listed and stat'ed as a directory; now a link to the host's files
            os.rename(cache / "sub", tmp_path / "moved-away")
            (cache / "sub").symlink_to(host)
            swapped.append(relative)
        if relative == "file.cubin":  # a regular file when listed; now a link to a host file
            (cache / "file.cubin").unlink()
            (cache / "file.cubin").symlink_to(host / "kernel.cubin")
            swapped.append(relative)

    real_stat = os.stat

    def stat_then_swap(path, *args, **kwargs):  # the swap lands after the check, before the open
        result = real_stat(path, *args, **kwargs)
        if kwargs.get("dir_fd") is not None:
            swap(path)
        return result

    monkeypatch.setattr(compile_cache.os, "stat", stat_then_swap)
    buffer = io.BytesIO()
    added, skipped = compile_cache.write_archive(buffer, str(cache), settle_seconds=60)
    monkeypatch.undo()
    assert sorted(swapped) == ["file.cubin", "sub"]
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as archive:
        contents = {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}
        links = [m.name for m in archive if m.issym()]
    assert b"HOST SECRET" not in buffer.getvalue()
    assert contents == {} and links == [] and skipped == 2

    # The same swaps seen by the listing: links out of the tree, left out.
    buffer = io.BytesIO()
    compile_cache.write_archive(buffer, str(cache), settle_seconds=60)
    assert b"HOST SECRET" not in buffer.getvalue()


def test_the_publisher_archives_a_link_as_a_link_and_leaves_out_links_that_point_outside(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import compile_cache

    cache = tmp_path / "cache"
    files = built_cache(cache)
    (cache / "outside").symlink_to("/etc")
    (cache / "absolute").symlink_to(cache / "triton")
    (cache / "up").symlink_to("../elsewhere")
    os.mkfifo(cache / "pipe")
    buffer = io.BytesIO()
    added, skipped = compile_cache.write_archive(buffer, str(cache), settle_seconds=60)
    assert skipped == 5  # the lock, three outward links and the fifo
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as archive:
        members = {m.name: m for m in archive}
        assert {name: archive.extractfile(m).read() for name, m in members.items() if m.isfile()} == files
    assert members["triton/latest"].issym() and members["triton/latest"].linkname == "ab"
    assert not {"outside", "absolute", "up", "pipe"} & set(members)
    assert all(compile_cache.archive_problem(m) is None for m in members.values())


def test_a_bad_archive_uri_is_a_usage_error(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "restore", "--archive", "http://example.com/x.tar",
                             "--dir", str(tmp_path), "--settings", str(tmp_path / "none.env")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "s3://" in result.stderr


def test_the_units_and_the_bootstrap_read_the_node_settings(s3_env, tmp_path):
    """What kimi-compile-cache.service runs (`publish --settings node.env`) and what the bootstrap
    runs (`restore --archive A --dir D --s5cmd S`, node.env found under $KIMI_ROOT)."""
    from kimi_fleet import node_files

    root = tmp_path / "root"
    cache = root / "weights" / "compile-cache" / "x"
    files = built_cache(cache)
    settings = root / node_files.NODE_ENV_FILE.lstrip("/")
    settings.parent.mkdir(parents=True)
    settings.write_text(settings_file(tmp_path).read_text() + "COMPILE_CACHE_DIR=/weights/compile-cache/x\n")
    unit = node_files.COMPILE_CACHE_PUBLISH_UNIT
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = exec_start.removeprefix("ExecStart=").split()
    assert argv[1] == node_files.COMPILE_CACHE_TOOL and argv[2:] == ["publish", "--settings", node_files.NODE_ENV_FILE]
    env = {k: v for k, v in s3_env.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    result = subprocess.run([sys.executable, str(SCRIPT), "publish", "--settings", str(settings)],
                            env={**env, "KIMI_ROOT": str(root)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "published" in result.stdout, result.stdout + result.stderr
    assert promote(s3_env, NODE_A).returncode == 0 and pin_value(s3_env)

    second = tmp_path / "second"
    (second / "etc").mkdir(parents=True)
    (second / "etc" / "kimi-fleet").mkdir()
    (second / node_files.NODE_ENV_FILE.lstrip("/")).write_text(settings.read_text())
    restored = subprocess.run([sys.executable, str(SCRIPT), "restore", "--archive", ARCHIVE, "--dir",
                               str(second / "weights" / "compile-cache" / "x"), "--s5cmd", str(S5CMD)],
                              env={**env, "KIMI_ROOT": str(second)}, capture_output=True, text=True, timeout=120)
    assert restored.returncode == 0 and "SHA-256 as pinned" in restored.stdout, restored.stdout + restored.stderr
    assert tree(second / "weights" / "compile-cache" / "x") == files
