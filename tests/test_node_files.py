"""What lands on a node, checked with the real tools: cloud-init, shellcheck, systemd-analyze,
caddy; and the bootstrap run twice into a scratch root (stub aws/hf, a local fake Hub tree API)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from kimi_fleet import node_files as node_files_module
from kimi_fleet.launch import render_launch
from kimi_fleet.node_files import (
    API_KEY_FILE,
    COMPILE_CACHE_UNIT,
    EC2_USER_DATA_LIMIT,
    NODE_STATUS,
    STATUS_FILE,
    NodeFile,
    SecretsSource,
    render_node_artifacts,
    render_node_files,
    user_data_bytes,
)
from kimi_fleet.node_scripts.weights_manifest import manifest_document
from kimi_fleet.node_scripts.weights_room import NODE_VERIFIED_MARKER
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import load_stack_config, stack_file
from policy.validators import find_secret_patterns

AWS_STACKS = ["h200-int4-sglang", "h200-int4-vllm", "b200-nvfp4-vllm", "b300-int4-sglang"]
HOST_STACKS = ["rtxpro6000-int4-sglang", "mi300x-int4-sglang"]
FAKE_API_KEY = "fake-api-key-0f3b9a17c2d84e65"
FAKE_HF_TOKEN = "hf_FakeTokenForTestsOnly0123456789abcdef"
EBS_VOLUME_ID = "vol-0123456789abcdef0"


def tool(name: str):
    return pytest.mark.skipif(shutil.which(name) is None, reason=f"{name} not installed")


def resolved(stack: str) -> Resolved:
    return Resolved(load_stack_config(stack_file(stack)).spec())


def node_files(stack: str, secrets: SecretsSource | None = None) -> dict[str, NodeFile]:
    r = resolved(stack)
    if secrets is None:
        secrets = SecretsSource.ssm(f"/kimi-fleet/{stack}", "us-east-1", hf_token=True) if r.spec.target.aws \
            else SecretsSource("files")
    volume = EBS_VOLUME_ID if r.weights_volume == "ebs" else None
    return render_node_files(r, render_launch(r), size(r), secrets=secrets, ebs_volume_id=volume)


def user_data(stack: str) -> str:
    """What EC2 gets: the boot stub (the node files travel as the release bundle in S3)."""
    r = resolved(stack)
    return render_node_artifacts(r, size(r), render_launch(r))["user-data.yaml"]


def install(root: Path, files: dict[str, NodeFile]) -> None:
    for f in files.values():
        path = root / f.path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f.content)
        path.chmod(f.mode)


def scripts(stack: str) -> dict[str, str]:
    artifacts = render_node_artifacts(*(lambda r: (r, size(r), render_launch(r)))(resolved(stack)))
    return {name: text for name, text in artifacts.items() if name.endswith(".sh")}


# --- cloud-init ------------------------------------------------------------------------------

#: cloud-init's own user-data decoder (Debian's python3-cloudinit): what a node does with EC2's bytes.
CLOUD_INIT_DECODE = """
import sys
from cloudinit.helpers import Paths
from cloudinit.user_data import UserDataProcessor
message = UserDataProcessor(Paths({})).process(sys.stdin.buffer.read())
parts = [p for p in message.walk() if p.get_content_type() == "text/cloud-config"]
assert len(parts) == 1, [p.get_content_type() for p in message.walk()]
sys.stdout.buffer.write(parts[0].get_payload(decode=True))
"""


@tool("cloud-init")
@pytest.mark.parametrize("stack", AWS_STACKS)
def test_user_data_fits_and_cloud_init_decodes_it_to_a_valid_cloud_config(stack, tmp_path):
    text = user_data(stack)
    sent = user_data_bytes(text)
    assert len(sent) <= EC2_USER_DATA_LIMIT
    decoded = subprocess.run(["/usr/bin/python3", "-c", CLOUD_INIT_DECODE], input=sent, capture_output=True)
    assert decoded.returncode == 0, decoded.stderr.decode()
    assert decoded.stdout.decode() == text and text.startswith("#cloud-config\n")
    config = tmp_path / "user-data.yaml"
    config.write_bytes(decoded.stdout)
    result = subprocess.run(["cloud-init", "schema", "--config-file", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("stack", AWS_STACKS)
def test_user_data_boots_the_loader_and_the_bundle_carries_the_files_and_no_secrets(stack):
    import json

    from kimi_fleet import boot_stub
    from kimi_fleet.node_files import (APPLY_RELEASE, EBS_VOLUME_PLACEHOLDER, NODE_PACKAGES, VERIFIER_DIR,
                                       bundle_digest, planned_secrets, release_bundle)
    from kimi_fleet.node_scripts.boot_loader import NODE_PACKAGES_FILE

    r = resolved(stack)
    text = user_data(stack)
    document = yaml.safe_load(text)
    assert [entry["path"] for entry in document["write_files"]] == [boot_stub.BOOT_LOADER]
    (command,) = document["runcmd"]
    planned = render_node_files(r, render_launch(r), size(r), secrets=planned_secrets(r),
                                ebs_volume_id=EBS_VOLUME_PLACEHOLDER if r.weights_volume == "ebs" else None)
    bundle = release_bundle(planned)
    # No release in the user data: a fleet's loader reads its digest from the template's instance tag.
    assert bundle_digest(bundle) not in text and "--expect" not in command
    assert ("--expect-tag" in command) is (r.spec.capacity.replicas > 1)
    written = {entry["path"]: entry["content"] for entry in json.loads(bundle)["files"]}
    assert APPLY_RELEASE in written
    # The packages travel in the bundle, for the loader (first boot) and the bootstrap (a release that adds one).
    assert written[NODE_PACKAGES_FILE].split() == list(NODE_PACKAGES)
    assert {"caddy", "fail2ban", "nftables"} <= set(NODE_PACKAGES)
    assert f"SSM_API_KEY_PARAMETER=/kimi-fleet/{stack}/api-key\n" in written["/etc/kimi-fleet/node.env"]
    package = Path(__file__).resolve().parents[1]
    for path, content in written.items():
        assert FAKE_API_KEY not in content and FAKE_HF_TOKEN not in content
        if path.startswith(VERIFIER_DIR + "/"):
            # The project's own source, verbatim (its catalog's `experts_per_token=8` is not a token).
            assert content == (package / path.removeprefix(VERIFIER_DIR + "/")).read_text(), path
            continue
        assert find_secret_patterns(content) == [], path


def test_user_data_too_large_is_refused(monkeypatch):
    from kimi_fleet import boot_stub

    monkeypatch.setattr(boot_stub, "EC2_USER_DATA_LIMIT", 512)
    with pytest.raises(ValueError, match="boot stub is .* bytes even compressed"):
        user_data("h200-int4-sglang")


# --- scripts, units, env files, Caddyfile ----------------------------------------------------

@tool("shellcheck")
@pytest.mark.parametrize("stack", ["h200-int4-sglang", "b300-int4-sglang", "mi300x-int4-sglang"])
def test_scripts_pass_shellcheck(stack, tmp_path):
    for name, text in scripts(stack).items():
        path = tmp_path / name
        path.write_text(text)
        result = subprocess.run(["shellcheck", "--shell=bash", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{name}:\n{result.stdout}"


def _stub_docker(bin_dir: Path, record: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "docker").write_text(f"#!/usr/bin/env python3\nimport json, sys\n"
                                    f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    (bin_dir / "docker").chmod(0o755)


def engine_node(root: Path, files: dict[str, NodeFile]) -> str:
    """What kimi-engine-run reads besides its argv: the settings loader and node.env (the release's
    revision and stage); returns the marker line the release expects of its weights."""
    for path in (node_files_module.SETTINGS_LIBRARY, node_files_module.NODE_ENV_FILE):
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_text(files[path].content)
    settings = dict(line.split("=", 1) for line in files[node_files_module.NODE_ENV_FILE].content.splitlines()
                    if "=" in line and not line.startswith("#"))
    if not settings["PP_STAGES"]:
        return settings["MODEL_REVISION"]
    return (f"{settings['MODEL_REVISION']} stage {settings['PP_STAGE']}/{settings['PP_STAGES']} "
            f"layers {settings['PP_FIRST_LAYER']}-{int(settings['PP_END_LAYER']) - 1}")


def test_engine_run_hands_docker_the_json_argv_one_element_per_argument(tmp_path):
    """Argument lists travel as lists: an argument with spaces or shell syntax (here forced in past
    the spec, as a patched launch would) reaches docker as one argument, never as several."""
    files = node_files("h200-int4-sglang")
    argv = json.loads(files["/etc/kimi-fleet/engine-0.argv.json"].content)
    assert argv[:2] == ["docker", "run"] and "--host" in argv and argv[argv.index("--host") + 1] == "127.0.0.1"
    hostile = argv + ["marlin --privileged", "$(touch /tmp/kimi-pwned)", "a;b|c`d`"]
    root = tmp_path / "root"
    (root / "etc/kimi-fleet").mkdir(parents=True)
    (root / "etc/kimi-fleet/engine-0.argv.json").write_text(json.dumps(hostile))
    script = tmp_path / "kimi-engine-run"
    script.write_text(files["/usr/local/sbin/kimi-engine-run"].content)
    record = tmp_path / "docker-argv.json"
    _stub_docker(tmp_path / "bin", record)
    (root / "w").mkdir()
    (root / "w/.kimi-verified").write_text(engine_node(root, files) + "\n")
    env = {**os.environ, "KIMI_ROOT": str(root), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "WEIGHTS_DIR": "/w"}
    result = subprocess.run(["bash", str(script), "0"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(record.read_text()) == hostile[1:]
    assert not Path("/tmp/kimi-pwned").exists()
    # Not a docker run list: refused before anything runs.
    (root / "etc/kimi-fleet/engine-0.argv.json").write_text(json.dumps(["sh", "-c", "id"]))
    record.unlink()
    refused = subprocess.run(["bash", str(script), "0"], env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "not a docker run argument list" in refused.stderr and not record.exists()


def test_an_engine_without_verified_weights_refuses_in_one_line_in_the_journal_and_the_status(tmp_path):
    """The marker check is the engine's own start (kimi-engine-run): one line saying what, why and
    what to do, the same line in the node status, and docker never runs."""
    files = node_files("h200-int4-sglang")
    root = tmp_path / "root"
    (root / "etc/kimi-fleet").mkdir(parents=True)
    (root / "etc/kimi-fleet/engine-0.argv.json").write_text(files["/etc/kimi-fleet/engine-0.argv.json"].content)
    status_tool = root / node_files_module.NODE_STATUS.lstrip("/")
    status_tool.parent.mkdir(parents=True)
    status_tool.write_text(files[node_files_module.NODE_STATUS].content)
    (root / "w").mkdir()  # weights present, marker missing (a download that stopped half-way)
    revision = engine_node(root, files)
    script = tmp_path / "kimi-engine-run"
    script.write_text(files["/usr/local/sbin/kimi-engine-run"].content)
    record = tmp_path / "docker-argv.json"
    _stub_docker(tmp_path / "bin", record)
    env = {**os.environ, "KIMI_ROOT": str(root), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "WEIGHTS_DIR": "/w"}
    result = subprocess.run(["bash", str(script), "0"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and not record.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kimi-engine@0 refused to start: weights in /w have no verified "
                                                  "marker (.kimi-verified)") and "run kimi-bootstrap again" in lines[0]
    refused = json.loads((root / "run/kimi-fleet/status.json").read_text())["refused"]
    assert refused["by"] == "kimi-engine@0" and refused["reason"] == lines[0].split(": ", 1)[1]
    (root / "w/.kimi-verified").write_text("0" * 40 + "\n")  # another revision's
    other = subprocess.run(["bash", str(script), "0"], env=env, capture_output=True, text=True, timeout=30)
    assert other.returncode == 1 and not record.exists()
    assert f"verified as '{'0' * 40}', not '{revision}'" in other.stderr
    (root / "w/.kimi-verified").write_text(revision + "\n")
    assert subprocess.run(["bash", str(script), "0"], env=env, capture_output=True, timeout=30).returncode == 0
    assert record.exists()


def _settings_loader_script(tmp_path: Path) -> Path:
    """The rendered kimi-caddy-env: it loads node.env with the node's settings loader, then reads the key."""
    files = node_files("h200-int4-sglang")
    library = tmp_path / "root" / "usr/local/lib/kimi-fleet/settings.sh"
    library.parent.mkdir(parents=True, exist_ok=True)
    library.write_text(files["/usr/local/lib/kimi-fleet/settings.sh"].content)
    script = tmp_path / "kimi-caddy-env"
    script.write_text(files["/usr/local/sbin/kimi-caddy-env"].content)
    return script


@pytest.mark.parametrize("value", [
    "/data/x;touch MARK", "/data/x$(touch MARK)", "/data/x`touch MARK`", "/data/x\ntouch MARK",
    "/data/x|touch MARK", "/data/x && touch MARK", "'/data/x'; touch MARK",
])
def test_node_settings_are_data_no_command_in_a_value_runs(tmp_path, value):
    """node.env is never sourced: a value carrying shell syntax (written past the writer's guard, as a
    patched spec would) is refused by the loader and nothing in it runs."""
    root = tmp_path / "root"
    (root / "etc/kimi-fleet").mkdir(parents=True)
    mark = tmp_path / "MARK"
    node_env = node_files("h200-int4-sglang")["/etc/kimi-fleet/node.env"].content
    hostile = node_env.replace("WEIGHTS_ROOT=/data/kimi-fleet/weights", "WEIGHTS_ROOT=" + value.replace("MARK", str(mark)))
    assert hostile != node_env
    (root / "etc/kimi-fleet/node.env").write_text(hostile)
    result = subprocess.run(["bash", str(_settings_loader_script(tmp_path))], cwd=tmp_path, capture_output=True,
                            text=True, timeout=30, env={**os.environ, "KIMI_ROOT": str(root)})
    assert result.returncode != 0
    assert "refused" in result.stderr
    assert not mark.exists()


def test_node_settings_loader_refuses_unknown_keys_and_the_writer_refuses_shell_syntax(tmp_path):
    root = tmp_path / "root"
    (root / "etc/kimi-fleet").mkdir(parents=True)
    (root / "etc/kimi-fleet/node.env").write_text("STACK=x\nBASH_ENV=/tmp/evil\n")
    result = subprocess.run(["bash", str(_settings_loader_script(tmp_path))], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "KIMI_ROOT": str(root)})
    assert result.returncode != 0 and "unknown setting BASH_ENV" in result.stderr
    from kimi_fleet.launch import plain_value

    for value in ("a;b", "$(id)", "`id`", "a b", "a\nb", "{env.KIMI_API_KEY}", "%h"):
        with pytest.raises(ValueError, match="not plain"):
            plain_value("WEIGHTS_ROOT", value)


@pytest.mark.parametrize("stack", AWS_STACKS + HOST_STACKS)
def test_env_files_hold_only_bare_assignments(stack):
    files = node_files(stack)
    env_files = [f for path, f in files.items() if path.endswith(".env")]
    assert len(env_files) == len(render_launch(resolved(stack)).instances) + 1  # engines + node.env
    for f in env_files:
        for line in f.content.splitlines():
            if line.startswith("#"):
                continue
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*=[A-Za-z0-9._:/@,+=-]*", line), f"{f.path}: {line!r}"


def _systemd_root(root: Path, files: dict[str, NodeFile]) -> None:
    install(root, files)
    system = root / "lib/systemd/system"
    system.mkdir(parents=True)
    for target in Path("/lib/systemd/system").glob("*.target"):
        shutil.copy(target, system)
    for slice_unit in Path("/lib/systemd/system").glob("*.slice"):
        shutil.copy(slice_unit, system)
    # The packaged caddy unit (Debian/Ubuntu) is what the drop-in overrides; docker.service is a stand-in.
    packaged = Path("/lib/systemd/system/caddy.service")
    (system / "caddy.service").write_text(packaged.read_text() if packaged.exists() else
                                          "[Service]\nUser=caddy\nExecStart=/usr/bin/caddy run --environ\n")
    (system / "docker.service").write_text("[Unit]\nDescription=stand-in\n[Service]\nExecStart=/usr/bin/dockerd\n")
    for binary in ("usr/bin/docker", "usr/bin/dockerd", "usr/bin/caddy", "usr/bin/test", "bin/sh", "usr/sbin/nft",
                   "usr/bin/python3"):
        path = root / binary
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)


@tool("systemd-analyze")
@pytest.mark.parametrize("stack", ["h200-int4-sglang", "mi300x-int4-sglang"])
def test_units_pass_systemd_analyze_verify(stack, tmp_path):
    files = node_files(stack)
    _systemd_root(tmp_path, files)
    units = ["/etc/systemd/system/kimi-bootstrap.service", "/lib/systemd/system/caddy.service"]
    units += [f"/etc/systemd/system/kimi-engine@{i.index}.service" for i in render_launch(resolved(stack)).instances]
    # A host gets the firewall unit (AWS nodes have security groups instead).
    assert ("/etc/systemd/system/kimi-firewall.service" in files) is (resolved(stack).spec.target.host is not None)
    units += [path for path in files if path.endswith("/kimi-firewall.service")]
    units += ["/etc/systemd/system/kimi-watchdog.service", "/etc/systemd/system/kimi-watchdog.timer",
              f"/etc/systemd/system/{COMPILE_CACHE_UNIT}"]
    result = subprocess.run(["systemd-analyze", "verify", f"--root={tmp_path}", "--man=no", *units],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    drop_in = files["/etc/systemd/system/caddy.service.d/kimi-fleet.conf"].content
    exec_starts = [line for line in drop_in.splitlines() if line.startswith("ExecStart=")]
    assert exec_starts[0] == "ExecStart=" and "--environ" not in exec_starts[1]  # the key stays out of the journal
    assert "ExecReload=\n" in drop_in  # admin off: restart, never reload


@tool("caddy")
@pytest.mark.parametrize("stack", AWS_STACKS + HOST_STACKS)
def test_caddyfile_passes_caddy_validate(stack, tmp_path):
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(node_files(stack)["/etc/caddy/Caddyfile"].content)
    result = subprocess.run(["caddy", "validate", "--adapter", "caddyfile", "--config", str(caddyfile)],
                            capture_output=True, text=True, env={**os.environ, "KIMI_API_KEY": FAKE_API_KEY},
                            timeout=60)
    assert result.returncode == 0, result.stderr


# --- the bootstrap, twice, in a scratch root -------------------------------------------------

HUB_FILES = {"config.json": 17, "model-00001-of-00002.safetensors": 300, "sub/model-00002-of-00002.safetensors": 200}


def _hub_entry(path: str, size: int, content: bytes | None = None) -> dict:
    content = b"\0" * size if content is None else content
    entry = {"type": "file", "path": path, "size": size,
             "oid": hashlib.sha1(b"blob %d\0" % size + content).hexdigest()}
    if path.endswith(".safetensors"):
        entry["oid"] = "0" * 40  # the pointer file's blob, not the content
        entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": size, "pointerSize": 134}
    return entry


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The tree API of one revision, in two pages joined by a Link header."""
    #: path -> content the tree describes (None: HUB_FILES, zeros); a subclass serves another checkpoint
    files: dict[str, bytes] | None = None

    def do_GET(self):  # noqa: N802
        # As the Hub answers: LFS files (the shards) with their SHA-256, the rest with a git blob
        # SHA-1; the content is zeros (what the stub downloaders write) unless `files` says otherwise.
        entries = ([_hub_entry(p, s) for p, s in HUB_FILES.items()] if self.files is None
                   else [_hub_entry(p, len(c), c) for p, c in self.files.items()])
        entries.insert(1, {"type": "directory", "path": "sub", "size": 0})
        second = "cursor=2" in self.path
        body = json.dumps(entries[2:] if second else entries[:2]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if not second:
            self.send_header("Link", f'<{self.path}&cursor=2>; rel="next"')
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve_hub(handler: type[FakeHub] = FakeHub):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_hub():
    yield from serve_hub()


FILL = "\n".join(
    ["fill() { local dir=$1; mkdir -p \"$dir/sub\"; "]
    + [f"head -c {s} /dev/zero >\"$dir/{p}\"; " for p, s in HUB_FILES.items()]
    + ["}"]
)

#: The mirror's manifest of HUB_FILES (zeros), as the fill writes it.
MIRROR_MANIFEST = json.dumps(manifest_document("moonshotai/Kimi-K2.6", "a" * 40, {
    p: (s, hashlib.sha256(b"\0" * s).hexdigest()) for p, s in HUB_FILES.items()}))
NODE_SCRIPTS = Path(__file__).resolve().parents[1] / "kimi_fleet" / "node_scripts"

STUB_AWS = f"""#!/bin/bash
{FILL}
case $1 in
  ssm) name=${{*: -5:1}}
    # No compile cache pinned yet: SSM's answer for a parameter that does not exist.
    if [[ $* == *--name\ */compile-cache/* ]]; then
      echo "An error occurred (ParameterNotFound) when calling the GetParameter operation: " >&2; exit 254
    fi
    [[ $name == */hf-token ]] && printf '%s\\n' '{FAKE_HF_TOKEN}' || printf '%s\\n' '{FAKE_API_KEY}' ;;
  *) exit 2 ;;
esac
"""

#: The mirror's s5cmd: `cat` prints the manifest, `run` writes each requested file (zeros, as the fill).
STUB_S5CMD = f"""#!{sys.executable}
import json, os, re, sys
manifest = json.loads({MIRROR_MANIFEST!r})
if "cat" in sys.argv:  # the manifest of the revision asked for: s3://bucket/prefix/<org>/<name>/<revision>/...
    manifest["revision"] = sys.argv[-1].split("/")[-2]
    print(json.dumps(manifest))
elif "run" in sys.argv:
    sizes = {{f["path"]: f["size"] for f in manifest["files"]}}
    for line in open(sys.argv[-1]):
        source, destination = re.search(r'"([^"]+)" "([^"]+)"$', line.strip()).groups()
        path = next(p for p in sizes if source.endswith("/" + p))
        os.makedirs(os.path.dirname(destination), exist_ok=True)  # as s5cmd does
        open(destination, "wb").write(bytes(sizes[path]))
else:
    sys.exit(2)
"""

STUB_HF = f"""#!/bin/bash
{FILL}
while (($#)); do [[ $1 == --local-dir ]] && dir=$2; shift; done
fill "$dir"
"""


def _tree_digest(root: Path) -> dict[str, str]:
    digest = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        # The log is append-only and the cold-start status is runtime state with timestamps.
        if relative in ("var/log/kimi-fleet/bootstrap.log", "run/kimi-fleet/status.json"):
            continue  # the log grows by design
        mode = oct(path.lstat().st_mode)
        digest[relative] = mode + (":" + hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "")
    return digest


@pytest.mark.parametrize("stack", ["h200-int4-sglang", "b300-int4-sglang", "rtxpro6000-int4-sglang"])
def test_bootstrap_is_idempotent_in_a_scratch_root(stack, tmp_path, fake_hub):
    root, bin_dir = tmp_path / "root", tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("aws", STUB_AWS), ("hf", STUB_HF), ("s5cmd", STUB_S5CMD)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    files = node_files(stack)
    install(root, files)
    # The stub Hub and mirror serve HUB_FILES, not the real checkpoint: the volume's room is checked
    # for what is actually downloaded.
    node_env = root / "etc/kimi-fleet/node.env"
    node_env.write_text(re.sub(r"^CHECKPOINT_BYTES=\d+$", f"CHECKPOINT_BYTES={sum(HUB_FILES.values())}",
                               node_env.read_text(), count=1, flags=re.M))
    # The deployer's pin of the mirror's manifest (a deploy-time value): the stub mirror's bytes.
    from kimi_fleet.node_scripts.weights_manifest import manifest_sha256

    served = {**json.loads(MIRROR_MANIFEST), "revision": resolved(stack).revision}
    node_env.write_text(node_env.read_text().replace(
        "MIRROR_MANIFEST_SHA256=DEPLOY-TIME-MANIFEST-SHA256",
        f"MIRROR_MANIFEST_SHA256={manifest_sha256((json.dumps(served) + chr(10)).encode())}"))
    if files["/etc/kimi-fleet/node.env"].content.count("SECRETS_KIND=files"):
        secret = root / API_KEY_FILE.lstrip("/")
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text(FAKE_API_KEY)
        secret.chmod(0o600)
    env = {**os.environ, "KIMI_ROOT": str(root), "KIMI_DRY_GPU": "1", "HF_ENDPOINT": fake_hub, "VERIFY_PYTHON": sys.executable,
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "S5CMD": str(bin_dir / "s5cmd"), "HF_CLI": str(bin_dir / "hf")}
    bootstrap = root / "usr/local/sbin/kimi-bootstrap"

    first = subprocess.run([str(bootstrap)], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    after_first = _tree_digest(root)
    second = subprocess.run([str(bootstrap)], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert _tree_digest(root) == after_first

    r = resolved(stack)
    weights = root / render_launch(r).weights_host_dir.lstrip("/")
    assert (weights / ".kimi-verified").read_text().strip() == r.revision
    assert (weights / "sub/model-00002-of-00002.safetensors").stat().st_size == 200
    api_key = root / API_KEY_FILE.lstrip("/")
    assert api_key.read_text() == FAKE_API_KEY
    assert stat.S_IMODE(api_key.stat().st_mode) == 0o600
    log = (root / "var/log/kimi-fleet/bootstrap.log").read_text()
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \[kimi-bootstrap\] bootstrap done", log, re.M)
    assert "already verified" in log and "unchanged" in log  # the second run skipped the work
    assert FAKE_API_KEY not in log and FAKE_HF_TOKEN not in log


def _room_env(tmp_path, checkpoint_bytes: int = sum(HUB_FILES.values())) -> dict:
    # KIMI_ROOT: a refusal lands in the scratch root's node status, not this machine's /run.
    return {"WEIGHTS_ROOT": str(tmp_path), "CHECKPOINT_BYTES": str(checkpoint_bytes),
            "WEIGHTS_ROOM_TOOL": str(NODE_SCRIPTS / "weights_room.py"), "KIMI_ROOT": str(tmp_path / "root")}


def test_download_fails_on_a_size_mismatch(tmp_path, fake_hub):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hf").write_text("#!/bin/bash\nwhile (($#)); do [[ $1 == --local-dir ]] && d=$2; shift; done\n"
                                "mkdir -p \"$d/sub\"; head -c 5 /dev/zero >\"$d/config.json\"\n")
    (bin_dir / "hf").chmod(0o755)
    # The script backs off 20 s after a failed attempt, the last one too: not what this test is about.
    (bin_dir / "sleep").write_text("#!/bin/bash\n")
    (bin_dir / "sleep").chmod(0o755)
    script = tmp_path / "kimi-download-weights"
    script.write_text(node_files("h200-int4-sglang")["/usr/local/sbin/kimi-download-weights"].content)
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_ENDPOINT": fake_hub,
           "WEIGHTS_DIR": str(tmp_path / "w"), "MODEL_REPO": "moonshotai/Kimi-K2.6", "MODEL_REVISION": "a" * 40,
           "WEIGHTS_SOURCE": "huggingface", "DOWNLOAD_ATTEMPTS": "1",
           "WEIGHTS_MANIFEST_TOOL": str(NODE_SCRIPTS / "weights_manifest.py"), **_room_env(tmp_path)}
    result = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "size of config.json: 5 bytes, repository says 17" in result.stdout
    assert "missing sub/model-00002-of-00002.safetensors" in result.stdout
    assert not (tmp_path / "w/.kimi-verified").exists()


def test_download_on_a_volume_too_small_fails_before_any_transfer(tmp_path, fake_hub):
    """Room is checked first (tests/test_weights_room.py: what is removed to make it): a checkpoint
    larger than the volume fails at once, naming the numbers, instead of at the disk's end."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "hf-calls"
    (bin_dir / "hf").write_text(f"#!/bin/bash\necho call >>{calls}\n")
    (bin_dir / "hf").chmod(0o755)
    script = tmp_path / "kimi-download-weights"
    script.write_text(node_files("h200-int4-sglang")["/usr/local/sbin/kimi-download-weights"].content)
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_ENDPOINT": fake_hub,
           "WEIGHTS_DIR": str(tmp_path / "w" / "org--kimi" / "rev"), "MODEL_REPO": "moonshotai/Kimi-K2.6",
           "MODEL_REVISION": "a" * 40, "WEIGHTS_SOURCE": "huggingface", "DOWNLOAD_ATTEMPTS": "3",
           "WEIGHTS_MANIFEST_TOOL": str(NODE_SCRIPTS / "weights_manifest.py"),
           **_room_env(tmp_path / "w", checkpoint_bytes=shutil.disk_usage(tmp_path).total + 1)}
    result = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2  # a refusal: the bootstrap unit does not restart on it
    assert "no older checkpoint left to remove: grow the weights volume" in result.stdout
    status = json.loads((tmp_path / "w" / "root" / "run/kimi-fleet/status.json").read_text())
    assert "grow the weights volume" in json.dumps(status), status
    assert not calls.exists()
    assert (tmp_path / "w" / "org--kimi" / "rev" / ".kimi-checkpoint").exists() is False


def test_download_refetches_a_shard_of_the_right_size_with_the_wrong_content(tmp_path, fake_hub):
    """A corrupted shard passes a size check; its SHA-256 does not, and the next attempt fetches it again."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "hf-calls"
    # First call: every file, one shard corrupted (ones, not zeros); later calls: only what is missing.
    (bin_dir / "hf").write_text(
        "#!/bin/bash\nwhile (($#)); do [[ $1 == --local-dir ]] && d=$2; shift; done\n"
        f"echo call >>{calls}\nmkdir -p \"$d/sub\"\n"
        + "".join(f"[[ -f \"$d/{p}\" ]] || head -c {n} /dev/zero >\"$d/{p}\"\n" for p, n in HUB_FILES.items())
        + f"[[ $(wc -l <{calls}) == 1 ]] && head -c 300 /dev/zero | tr '\\0' '\\1' "
          ">\"$d/model-00001-of-00002.safetensors\"\nexit 0\n")
    (bin_dir / "hf").chmod(0o755)
    script = tmp_path / "kimi-download-weights"
    script.write_text(node_files("h200-int4-sglang")["/usr/local/sbin/kimi-download-weights"].content)
    script.chmod(0o755)
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")  # no back-off wait between attempts here
    (bin_dir / "sleep").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_ENDPOINT": fake_hub,
           "WEIGHTS_DIR": str(tmp_path / "w"), "MODEL_REPO": "moonshotai/Kimi-K2.6", "MODEL_REVISION": "a" * 40,
           "WEIGHTS_SOURCE": "huggingface", "DOWNLOAD_ATTEMPTS": "2",
           "WEIGHTS_MANIFEST_TOOL": str(NODE_SCRIPTS / "weights_manifest.py"), **_room_env(tmp_path)}
    result = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "content of model-00001-of-00002.safetensors: sha256" in result.stdout
    assert "(removed, fetched again next)" in result.stdout
    assert calls.read_text().count("call") == 2
    assert (tmp_path / "w/model-00001-of-00002.safetensors").read_bytes() == b"\0" * 300
    assert (tmp_path / "w/.kimi-verified").exists()
    assert (tmp_path / "w/.kimi-checkpoint").read_text() == f"moonshotai/Kimi-K2.6@{'a' * 40}\n"


def test_artifacts_for_the_planner():
    r = resolved("h200-int4-sglang")
    artifacts = render_node_artifacts(r, size(r), render_launch(r))
    for name in ("user-data.yaml", "Caddyfile", "kimi-engine@.service", "engine-0.env", "kimi-bootstrap.sh",
                 "kimi-download-weights.sh", "kimi-wait-gpus-free.sh", "kimi-engine-run.sh",
                 "caddy-override.conf", "docker-run-engine-0.sh", "fail2ban-filter.conf", "fail2ban-jail.local"):
        assert name in artifacts, name
    assert "firewall.nft" not in artifacts
    assert "EBS_VOLUME_ID=DEPLOY-TIME-EBS-VOLUME-ID" in artifacts["node.env"]
    assert "SSM_API_KEY_PARAMETER=/kimi-fleet/h200-int4-sglang/api-key" in artifacts["node.env"]
    host = resolved("rtxpro6000-int4-sglang")
    host_artifacts = render_node_artifacts(host, size(host), render_launch(host))
    assert "user-data.yaml" not in host_artifacts and "SECRETS_KIND=files" in host_artifacts["node.env"]
    assert "firewall.nft" in host_artifacts and "kimi-firewall.service" in host_artifacts


# --- in-place releases: what the bootstrap does while preparing, and on the live node (issue 20) ----------

def _edited(stack: str, edit) -> Resolved:
    import copy

    from kimi_fleet.validation import parse_spec

    values = copy.deepcopy(load_stack_config(stack_file(stack)).values)
    edit(values)
    return Resolved(parse_spec(values, stack, f"stacks/Pulumi.{stack}.yaml"))


def _ssm_files(r: Resolved, api_key_version: int) -> dict[str, NodeFile]:
    secrets = SecretsSource.ssm(f"/kimi-fleet/{r.spec.stack}", "us-east-1", hf_token=False,
                                api_key_version=api_key_version)
    return render_node_files(r, render_launch(r), size(r), secrets=secrets, ebs_volume_id=EBS_VOLUME_ID)


def test_prepare_keeps_the_serving_checkpoint_the_live_key_and_the_live_phase(tmp_path):
    """`kimi-bootstrap --prepare` of a release with a new revision while release N serves: the room
    tool is told to keep N's checkpoint, its refusal (exit 2) is the prepare's, the key it fetched is
    under the stage (N's Caddy keeps its own), and the node status keeps N's phase."""
    stack = "h200-int4-sglang"
    serving = resolved(stack)
    new = _edited(stack, lambda v: v.__setitem__("model", {**(v.get("model") or {}),
                                                          "revision": "0123456789abcdef0123456789abcdef01234567"}))
    root, stage, bin_dir = tmp_path / "root", tmp_path / "stage", tmp_path / "bin"
    install(root, _ssm_files(serving, 1))
    install(stage, _ssm_files(new, 2))
    live_key = root / API_KEY_FILE.lstrip("/")
    live_key.parent.mkdir(parents=True)
    live_key.write_text("the-serving-key-0123456789")
    live_key.chmod(0o600)
    bin_dir.mkdir()
    room_calls = tmp_path / "room-calls"
    (bin_dir / "room.py").write_text(f"""import json, sys
open({str(room_calls)!r}, "w").write(json.dumps(sys.argv[1:]))
print("weights: removing nothing: the serving checkpoint is kept: grow the weights volume (weights.ebsSizeGib) to hold both")
sys.exit(2)
""")
    for name, text in (("aws", STUB_AWS), ("s5cmd", STUB_S5CMD)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "KIMI_ROOT": str(root), "KIMI_STAGE": str(stage), "KIMI_DRY_GPU": "1",
           "VERIFY_PYTHON": sys.executable, "PATH": f"{bin_dir}:{os.environ['PATH']}", "S5CMD": str(bin_dir / "s5cmd"),
           "WEIGHTS_ROOM_TOOL": str(bin_dir / "room.py"), "RETRY_FIRST_DELAY": "1"}
    status = root / STATUS_FILE.lstrip("/")
    subprocess.run([sys.executable, str(root / NODE_STATUS.lstrip("/")), "phase", "loading"], env=env, check=True)
    before = json.loads(status.read_text())

    result = subprocess.run(["bash", str(stage / "usr/local/sbin/kimi-bootstrap"), "--prepare"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    args = json.loads(room_calls.read_text())
    serving_dir = root / render_launch(serving).weights_host_dir.lstrip("/")
    assert args[args.index("--keep") + 1] == str(serving_dir)
    assert args[args.index("--target") + 1] == str(root / render_launch(new).weights_host_dir.lstrip("/"))
    assert "grow the weights volume (weights.ebsSizeGib) to hold both" in result.stderr
    assert live_key.read_text() == "the-serving-key-0123456789"  # the serving Caddy's key is untouched
    staged_key = stage / API_KEY_FILE.lstrip("/")
    assert staged_key.read_text() == FAKE_API_KEY and stat.S_IMODE(staged_key.stat().st_mode) == 0o600
    after = json.loads(status.read_text())
    assert after["phase"] == before["phase"] == "loading" and after["phases"] == before["phases"]
    # The key the release names, by version: a restored release gets its own key back.
    assert f"secret /kimi-fleet/{stack}/api-key:2 -> {staged_key}" in result.stderr


def _host_scratch_root(tmp_path: Path, stack: str = "rtxpro6000-int4-sglang") -> tuple[Path, dict, Path]:
    """A host node's scratch root with its key in place and its weights verified (no download)."""
    r = resolved(stack)
    root, bin_dir = tmp_path / "root", tmp_path / "bin"
    install(root, node_files(stack))
    key = root / API_KEY_FILE.lstrip("/")
    key.parent.mkdir(parents=True)
    key.write_text(FAKE_API_KEY)
    key.chmod(0o600)
    weights = root / render_launch(r).weights_host_dir.lstrip("/")
    weights.mkdir(parents=True)
    (weights / ".kimi-verified").write_text(f"{r.revision}\n")
    bin_dir.mkdir()
    env = {**os.environ, "KIMI_ROOT": str(root), "KIMI_DRY_GPU": "1", "VERIFY_PYTHON": sys.executable,
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return root, env, bin_dir


def test_the_bootstrap_stops_engines_the_release_no_longer_runs_and_installs_packages_it_adds(tmp_path):
    root, env, bin_dir = _host_scratch_root(tmp_path)
    applied = root / "var/lib/kimi-fleet/applied"
    applied.mkdir(parents=True)
    for index in (1, 2):  # a release of three engines ran here before this one-engine release
        (applied / f"kimi-engine@{index}.service.sha256").write_text("0" * 64 + "\n")
    # dpkg as the node's: every listed package installed but mdadm.
    (bin_dir / "dpkg-query").write_text('#!/bin/sh\n[ "$3" = mdadm ] && exit 1\nprintf "install ok installed"\n')
    (bin_dir / "dpkg-query").chmod(0o755)
    result = subprocess.run(["bash", str(root / "usr/local/sbin/kimi-bootstrap")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for index in (1, 2):
        assert f"scratch root: skipped: systemctl disable --now kimi-engine@{index}.service" in result.stderr
        assert f"kimi-engine@{index}.service: stopped and disabled (this release runs 1 engine(s))" in result.stderr
        assert not (applied / f"kimi-engine@{index}.service.sha256").exists()
    assert "kimi-engine@0.service: (re)started" in result.stderr
    assert "kimi-engine@0.service: stopped" not in result.stderr
    assert "packages missing: mdadm: installing" in result.stderr
    assert ("scratch root: skipped: env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
            "mdadm") in result.stderr
    again = subprocess.run(["bash", str(root / "usr/local/sbin/kimi-bootstrap")], env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "stopped and disabled" not in again.stderr


def _bootstrap_functions(*names: str) -> str:
    return "".join(re.search(rf"^{name}\(\) \{{\n.*?^\}}\n", node_files_module.BOOTSTRAP, re.S | re.M).group(0)
                   for name in names)


#: What the extracted functions need from the bootstrap around them.
FUNCTION_HARNESS = """\
set -euo pipefail
log() { echo "log: $*"; }
run() { log "+ $*"; "$@"; }
refuse() { echo "REFUSED: $*"; exit 2; }
"""


def _venv_python(bin_dir: Path, version: str, calls: Path) -> None:
    """A python3 of `version` whose `-m venv DIR` makes a venv with a pip that records its arguments."""
    (bin_dir / "python3").write_text(f"""#!/bin/bash
if [[ $1 == -c ]]; then echo {version}; exit 0; fi
if [[ $1 == -m && $2 == venv ]]; then
  mkdir -p "$3/bin"
  printf '#!/bin/sh\\n' >"$3/bin/python"
  printf '#!/bin/sh\\necho "pip $*" >>{calls}\\n' >"$3/bin/pip"
  chmod +x "$3/bin/python" "$3/bin/pip"
  exit 0
fi
exit 1
""")
    (bin_dir / "python3").chmod(0o755)


def test_requirements_are_installed_again_only_when_they_change(tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    _venv_python(bin_dir, "3.12", calls)
    requirements = tmp_path / "verify-requirements.txt"
    requirements.write_text("jsonschema==4.23.0\n")
    script = FUNCTION_HARNESS + _bootstrap_functions("install_requirements") + (
        f'install_requirements {tmp_path / "venv"} {requirements} --only-binary=:all:\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def install_once() -> str:
        run = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout

    install_once()
    assert calls.read_text().splitlines() == [f"pip install --quiet --only-binary=:all: -r {requirements}"]
    assert "requirements unchanged" in install_once()  # a release that keeps them installs nothing
    assert len(calls.read_text().splitlines()) == 1
    requirements.write_text("jsonschema==4.24.0\n")
    install_once()
    assert len(calls.read_text().splitlines()) == 2


@pytest.mark.parametrize("python", ["3.12", "3.11"])
def test_the_hf_cli_comes_from_its_hash_pinned_closure_never_from_path(tmp_path, python):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    _venv_python(bin_dir, python, calls)
    (bin_dir / "hf").write_text("#!/bin/sh\nexit 0\n")  # an unpinned hf someone installed: never taken
    (bin_dir / "hf").chmod(0o755)
    stage = tmp_path / "stage"
    requirements = stage / node_files_module.HF_CLI_REQUIREMENTS_FILE.lstrip("/")
    requirements.parent.mkdir(parents=True)
    requirements.write_text(node_files_module.HF_CLI_REQUIREMENTS)
    script = FUNCTION_HARNESS + _bootstrap_functions("install_requirements", "ensure_hf_cli") + (
        'ensure_hf_cli\necho "cli: $HF_CLI"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ROOT": str(tmp_path / "root"),
           "STAGE": str(stage), "WEIGHTS_SOURCE": "huggingface"}
    env.pop("HF_CLI", None)
    run = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    if python != node_files_module.HF_CLI_PYTHON:
        assert run.returncode == 2 and not calls.exists()
        assert f"REFUSED: the hf CLI's hash pins are for Python 3.12 and this node's python3 is {python}" in run.stdout
        return
    assert run.returncode == 0, run.stdout + run.stderr
    assert calls.read_text().splitlines() == [
        f"pip install --quiet --require-hashes --no-deps --only-binary=:all: -r {requirements}"]
    assert f"cli: {tmp_path}/root/opt/kimi-fleet/hf/bin/hf" in run.stdout
    assert "huggingface-hub==" in requirements.read_text() and "--hash=sha256:" in requirements.read_text()


def test_engine_run_names_the_shipped_status_tool_and_marker():
    """engine_run.sh takes both from node_files (rendered markers), not its own copies."""
    source = (Path(node_files_module.__file__).parent / "templates" / "engine_run.sh").read_text()
    assert "/usr/local/lib/kimi-fleet" not in source and ".kimi-verified" not in source
    assert f'"${{KIMI_ROOT:-}}{NODE_STATUS}" refuse' in node_files_module.ENGINE_RUN
    assert f"$weights/{NODE_VERIFIED_MARKER} ]]" in node_files_module.ENGINE_RUN
    assert f'. "${{KIMI_ROOT:-}}{node_files_module.SETTINGS_LIBRARY}"' in node_files_module.ENGINE_RUN
