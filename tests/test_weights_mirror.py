"""The S3 weights mirror, against a real S3 API (moto's server on loopback) with the AWS CLI the
node uses: the fill uploads a verified checkpoint and its manifest last; a node downloads from the
mirror and verifies every file's SHA-256 against that manifest without calling the Hub; a corrupted
object or an unfilled mirror is refused (issue 10)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_fleet.node_files import WEIGHTS_MANIFEST_NAME
from tests.fakes.aws_api import BIN, moto_server
from tests.fakes.harness import free_port
from tests.test_node_files import HUB_FILES, fake_hub, node_files  # noqa: F401  (fixture)

SCRIPTS = Path(__file__).resolve().parents[1] / "kimi_fleet" / "node_scripts"
REGION = "us-east-1"
BUCKET = "kimi-weights-mirror-test"
REPO, REVISION = "moonshotai/Kimi-K2.6", "a" * 40
pytestmark = [pytest.mark.skipif(not (BIN / "aws").exists(), reason="awscli not installed (requirements-dev.txt)"),
              pytest.mark.timeout(300)]


def free_port_closed() -> int:
    """A port nothing listens on (the Hub, for a node that must not call it)."""
    return free_port()


@pytest.fixture
def s3_env():
    with moto_server(REGION) as env:
        aws(env, "s3api", "create-bucket", "--bucket", BUCKET)
        yield env


def aws(env, *args) -> str:
    result = subprocess.run(["aws", *args, "--region", REGION], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def checkpoint(directory: Path) -> Path:
    for path, size in HUB_FILES.items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_bytes(b"\0" * size)  # what the fake Hub's tree describes
    return directory


def fill(env, source: Path, hub: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / "fill_mirror.py"), "--repo", REPO, "--revision", REVISION,
                           "--mirror", f"s3://{BUCKET}/hf", "--region", REGION, "--from-dir", str(source)],
                          env={**env, "HF_ENDPOINT": hub}, capture_output=True, text=True, timeout=120)


def node_download(env, tmp_path: Path, weights: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "kimi-download-weights"
    script.write_text(node_files("b300-int4-sglang")["/usr/local/sbin/kimi-download-weights"].content)
    script.chmod(0o755)
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin" / "sleep").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "sleep").chmod(0o755)
    node_env = {**env, "PATH": f"{tmp_path / 'bin'}:{env['PATH']}", "WEIGHTS_DIR": str(weights),
                "MODEL_REPO": REPO, "MODEL_REVISION": REVISION, "WEIGHTS_SOURCE": "s3-mirror",
                "S3_MIRROR_URI": f"s3://{BUCKET}/hf", "AWS_REGION": REGION, "DOWNLOAD_ATTEMPTS": "2",
                "WEIGHTS_MANIFEST_TOOL": str(SCRIPTS / "weights_manifest.py"),
                # No Hub from the mirror path: any call to it would fail.
                "HF_ENDPOINT": f"http://127.0.0.1:{free_port_closed()}"}
    return subprocess.run([str(script)], env=node_env, capture_output=True, text=True, timeout=240)


def test_fill_then_a_node_downloads_and_verifies_against_the_manifest_without_the_hub(s3_env, tmp_path, fake_hub):
    filled = fill(s3_env, checkpoint(tmp_path / "src"), fake_hub)
    assert filled.returncode == 0, filled.stdout + filled.stderr
    listing = aws(s3_env, "s3", "ls", "--recursive", f"s3://{BUCKET}/hf/{REPO}/{REVISION}/")
    assert WEIGHTS_MANIFEST_NAME in listing and "sub/model-00002-of-00002.safetensors" in listing
    manifest = json.loads(aws(s3_env, "s3", "cp", f"s3://{BUCKET}/hf/{REPO}/{REVISION}/{WEIGHTS_MANIFEST_NAME}", "-"))
    assert {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]} == {
        p: (s, hashlib.sha256(b"\0" * s).hexdigest()) for p, s in HUB_FILES.items()}
    again = fill(s3_env, tmp_path / "nowhere", "http://127.0.0.1:9")  # filled: touches nothing
    assert again.returncode == 0 and "already holds" in again.stdout

    weights = tmp_path / "node" / "weights"
    result = node_download(s3_env, tmp_path, weights)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "expected by the mirror's manifest" in result.stdout
    assert (weights / ".kimi-verified").read_text().strip() == REVISION
    assert (weights / "model-00001-of-00002.safetensors").read_bytes() == b"\0" * 300


def test_a_corrupted_object_in_the_mirror_is_refused(s3_env, tmp_path, fake_hub):
    assert fill(s3_env, checkpoint(tmp_path / "src"), fake_hub).returncode == 0
    bad = tmp_path / "bad"
    bad.write_bytes(b"\1" * 300)  # right size, wrong content
    aws(s3_env, "s3", "cp", str(bad), f"s3://{BUCKET}/hf/{REPO}/{REVISION}/model-00001-of-00002.safetensors")
    weights = tmp_path / "node" / "weights"
    result = node_download(s3_env, tmp_path, weights)
    assert result.returncode == 1
    assert "content of model-00001-of-00002.safetensors: sha256" in result.stdout
    assert "the manifest says" in result.stdout and not (weights / ".kimi-verified").exists()


def test_an_unfilled_mirror_is_refused_by_name(s3_env, tmp_path):
    src = checkpoint(tmp_path / "src")
    aws(s3_env, "s3", "sync", str(src), f"s3://{BUCKET}/hf/{REPO}/{REVISION}/")  # files, no manifest
    result = node_download(s3_env, tmp_path, tmp_path / "node" / "weights")
    assert result.returncode == 1
    assert f"has no s3://{BUCKET}/hf/{REPO}/{REVISION}/{WEIGHTS_MANIFEST_NAME}: it is not filled" in result.stderr


def test_the_fill_uploads_nothing_that_does_not_match_the_hub(s3_env, tmp_path, fake_hub):
    src = checkpoint(tmp_path / "src")
    (src / "config.json").write_bytes(b"\1" * 17)
    filled = fill(s3_env, src, fake_hub)
    assert filled.returncode == 1 and "nothing uploaded" in filled.stderr
    assert aws(s3_env, "s3", "ls", "--recursive", f"s3://{BUCKET}/") == ""
