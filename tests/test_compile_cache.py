"""Compile caches shared through the managed mirror (issue 10, item 4), against a real S3 API
(moto's server on loopback) with the pinned s5cmd the node uses: the first admitted node publishes
its cache once, the next node of the same engine configuration restores it before its engines start,
a node that kept its cache keeps it, and a hostile archive is refused without a byte outside the cache."""

from __future__ import annotations

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

SCRIPT = Path(__file__).resolve().parents[1] / "kimi_fleet" / "node_scripts" / "compile_cache.py"
REGION = "us-east-1"
BUCKET = "kimi-cache-test"
ARCHIVE = f"s3://{BUCKET}/hf/.compile-cache/vllm--img--h200/0123456789abcdef.tar"
pytestmark = [pytest.mark.skipif(not (BIN / "aws").exists(), reason="awscli not installed (requirements-dev.txt)"),
              pytest.mark.skipif(S5CMD is None, reason="s5cmd wheel not installed (requirements-dev.txt)"),
              pytest.mark.timeout(180)]


@pytest.fixture
def s3_env():
    with moto_server(REGION) as env:
        aws(env, "s3api", "create-bucket", "--bucket", BUCKET)
        yield {**env, "S5CMD": str(S5CMD)}


def cache_tool(env, action: str, directory: Path, *extra: str, archive: str = ARCHIVE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), action, "--archive", archive, "--dir", str(directory), *extra],
                          env=env, capture_output=True, text=True, timeout=120)


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


def test_the_first_node_publishes_once_and_the_next_node_restores_the_same_kernels(s3_env, tmp_path):
    first = tmp_path / "node-a" / "compile-cache" / "vllm--img--h200"
    files = built_cache(first)
    (first / "triton" / "fresh.cubin").write_bytes(b"still being written")  # younger than the settle time
    published = cache_tool(s3_env, "publish", first)
    assert published.returncode == 0, published.stdout + published.stderr
    assert "published" in published.stdout and "left out 2" in published.stdout  # the lock and the fresh file

    second = tmp_path / "node-b" / "compile-cache" / "vllm--img--h200"
    (second / "triton").mkdir(parents=True)  # docker's volume mount creates it; an engine made a folder
    inode = second.stat().st_ino
    restored = cache_tool(s3_env, "restore", second)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "restored" in restored.stdout
    assert tree(second) == files
    assert second.stat().st_ino == inode  # the same directory a running container has mounted
    assert os.readlink(second / "triton" / "latest") == "ab"
    assert not list(second.parent.glob(".*restoring*"))

    again = cache_tool(s3_env, "publish", second)
    assert again.returncode == 0 and "already shared" in again.stdout


def test_a_node_that_kept_its_cache_keeps_it(s3_env, tmp_path):
    published = tmp_path / "a"
    built_cache(published)
    assert cache_tool(s3_env, "publish", published).returncode == 0
    kept = tmp_path / "b"
    (kept / "triton").mkdir(parents=True)
    (kept / "triton" / "mine.cubin").write_bytes(b"built here")
    result = cache_tool(s3_env, "restore", kept)
    assert result.returncode == 0 and "already holds a cache: kept" in result.stdout
    assert tree(kept) == {"triton/mine.cubin": b"built here"}


def test_no_shared_cache_yet_means_the_engine_compiles(s3_env, tmp_path):
    result = cache_tool(s3_env, "restore", tmp_path / "empty")
    assert result.returncode == 0 and "no shared cache" in result.stdout
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())
    nothing = cache_tool(s3_env, "publish", tmp_path / "empty")
    assert nothing.returncode == 0 and "nothing to publish" in nothing.stdout
    assert "kimi-cache-test" not in aws(s3_env, "s3", "ls", "--recursive", f"s3://{BUCKET}/")


def _upload(env, tmp_path: Path, build) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        build(archive)
    (tmp_path / "hostile.tar").write_bytes(buffer.getvalue())
    aws(env, "s3", "cp", str(tmp_path / "hostile.tar"), ARCHIVE)


def _member(archive: tarfile.TarFile, name: str, *, content: bytes = b"x", link: str | None = None) -> None:
    info = tarfile.TarInfo(name)
    if link is not None:
        info.type, info.linkname = tarfile.SYMTYPE, link
        archive.addfile(info)
    else:
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))


@pytest.mark.parametrize("hostile", [
    pytest.param(lambda a: _member(a, "../escaped"), id="dot-dot"),
    pytest.param(lambda a: _member(a, "ok/../../escaped"), id="dot-dot-inside"),
    pytest.param(lambda a: (_member(a, "out", link="/etc"), _member(a, "out/passwd")), id="absolute-link"),
    pytest.param(lambda a: _member(a, "up", link="../../escaped"), id="relative-link-out"),
])
def test_a_hostile_archive_is_refused_and_leaves_nothing(s3_env, tmp_path, hostile):
    _upload(s3_env, tmp_path, lambda archive: (_member(archive, "ok/kernel.cubin"), hostile(archive)))
    cache = tmp_path / "node" / "compile-cache" / "x"
    result = cache_tool(s3_env, "restore", cache)
    assert result.returncode == 1 and "not restored" in result.stdout, result.stdout + result.stderr
    assert not (tmp_path / "node" / "escaped").exists()
    assert list((tmp_path / "node" / "compile-cache").iterdir()) == []  # no cache, no staging left


def test_an_absolute_member_lands_inside_the_cache(s3_env, tmp_path):
    # tarfile's data filter strips the leading slash: the file stays in the cache, nowhere else.
    outside = tmp_path / "outside-target"
    _upload(s3_env, tmp_path, lambda archive: _member(archive, str(outside), content=b"k"))
    cache = tmp_path / "cache"
    assert cache_tool(s3_env, "restore", cache).returncode == 0
    assert not outside.exists() and (cache / str(outside).lstrip("/")).read_bytes() == b"k"


def test_publish_leaves_out_links_that_point_outside(s3_env, tmp_path):
    cache = tmp_path / "cache"
    built_cache(cache)
    (cache / "outside").symlink_to("/etc")
    (cache / "absolute").symlink_to(cache / "triton")
    result = cache_tool(s3_env, "publish", cache)
    assert result.returncode == 0 and "left out 3" in result.stdout, result.stdout  # the lock and both links
    restored = tmp_path / "restored"
    assert cache_tool(s3_env, "restore", restored).returncode == 0
    assert not (restored / "outside").exists() and not (restored / "absolute").is_symlink()


def test_a_bad_archive_uri_is_a_usage_error(tmp_path):
    result = cache_tool(os.environ, "restore", tmp_path, archive="http://example.com/x.tar")
    assert result.returncode == 2 and "s3://" in result.stderr


def test_the_publish_unit_reads_the_node_settings(s3_env, tmp_path):
    """What kimi-compile-cache.service runs: `publish --settings node.env` under the node's root."""
    from kimi_fleet import node_files

    root = tmp_path / "root"
    cache = root / "weights" / "compile-cache" / "x"
    files = built_cache(cache)
    settings = root / node_files.NODE_ENV_FILE.lstrip("/")
    settings.parent.mkdir(parents=True)
    settings.write_text(f"# node settings\nAWS_REGION={REGION}\nCOMPILE_CACHE_ARCHIVE={ARCHIVE}\n"
                        "COMPILE_CACHE_DIR=/weights/compile-cache/x\n")
    unit = node_files.COMPILE_CACHE_PUBLISH_UNIT
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = exec_start.removeprefix("ExecStart=").split()
    assert argv[1] == node_files.COMPILE_CACHE_TOOL and argv[2:] == ["publish", "--settings", node_files.NODE_ENV_FILE]
    env = {k: v for k, v in s3_env.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    result = subprocess.run([sys.executable, str(SCRIPT), "publish", "--settings", str(settings)],
                            env={**env, "KIMI_ROOT": str(root)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "published" in result.stdout, result.stdout + result.stderr
    restored = tmp_path / "restored"
    assert cache_tool(s3_env, "restore", restored).returncode == 0
    assert tree(restored) == files
