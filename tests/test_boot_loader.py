"""The frozen boot loader (issue 20): the user data that does not change between releases, run as
a node runs it (python3, a scratch root, an `aws` CLI and `apt-get` on PATH that serve and record)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kimi_fleet import boot_stub, node_files
from kimi_fleet.node_scripts import node_script
from tests.fakes.imds import start_imds

LOADER = Path(boot_stub.__file__).parent / "node_scripts" / "boot_loader.py"
POINTER, REGION = "/kimi-fleet/s/release", "us-east-1"
#: What the bundle's applier does here: record how it was handed over.
FAKE_APPLIER = ("import json, os, sys\n"
                "open(os.path.join(os.environ['KIMI_ROOT'], 'handed.json'), 'w').write(json.dumps(sys.argv[1:]))\n")


def bundle_text(packages: str | None = "caddy fail2ban\n", applier: str | None = FAKE_APPLIER) -> str:
    files = [{"path": "/etc/kimi-fleet/node.env", "mode": "0644", "content": "STACK=s\n"}]
    if applier is not None:
        files.append({"path": "/usr/local/lib/kimi-fleet/apply_release.py", "mode": "0644", "content": applier})
    if packages is not None:
        files.append({"path": "/etc/kimi-fleet/node-packages", "mode": "0644", "content": packages})
    return json.dumps({"files": files}, sort_keys=True, separators=(",", ":"))


def node(tmp_path: Path, bundle: str, *, pointer_digest: str | None = None, store_as: str | None = None):
    """A scratch node: root, a fake AWS holding the pointer and the bundle, a recording apt-get."""
    root, tools, aws_dir = tmp_path / "root", tmp_path / "bin", tmp_path / "aws"
    for d in (root, tools, aws_dir / "s3"):
        d.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(bundle.encode()).hexdigest()
    (aws_dir / "s3" / f"{store_as or digest}.json").write_text(bundle)
    (aws_dir / "pointer").write_text(f"s3://b/releases/{pointer_digest or digest}.json {pointer_digest or digest}\n")
    (tools / "aws").write_text(f"""#!/bin/bash
echo "$*" >> {aws_dir}/calls
case "$1 $2" in
  "ssm get-parameter") cat {aws_dir}/pointer ;;
  "s3 cp") f="{aws_dir}/s3/$(basename "$3")"; if [ -f "$f" ]; then cat "$f"; else echo "NoSuchKey: $3" >&2; exit 1; fi ;;
  *) echo "unexpected: $*" >&2; exit 2 ;;
esac
""")
    (tools / "apt-get").write_text(f"#!/bin/bash\necho \"$DEBIAN_FRONTEND $*\" >> {aws_dir}/apt\n")
    for tool in ("aws", "apt-get"):
        (tools / tool).chmod(0o755)
    env = {**os.environ, "KIMI_ROOT": str(root), "PATH": f"{tools}:{os.environ['PATH']}"}
    return root, aws_dir, env, digest


def boot(env, *extra, wait="3"):
    return subprocess.run([sys.executable, str(LOADER), "--pointer", POINTER, "--region", REGION, "--wait", wait,
                           "--retry-delay", "0.2", *extra], env=env, capture_output=True, text=True, timeout=120)


def test_the_loader_checks_the_bundle_installs_its_packages_and_hands_over_to_its_applier(tmp_path):
    root, aws_dir, env, digest = node(tmp_path, bundle_text())
    result = boot(env)
    assert result.returncode == 0, result.stderr
    assert json.loads((root / "handed.json").read_text()) == [
        "--pointer", POINTER, "--region", REGION, "--boot", "--expect", digest]
    assert (root / "usr/local/lib/kimi-fleet/apply_release.py").read_text() == FAKE_APPLIER
    apt = (aws_dir / "apt").read_text().splitlines()
    assert apt == ["noninteractive update", "noninteractive install -y --no-install-recommends caddy fail2ban"]
    assert f"release bundle {digest[:16]} verified" in result.stderr


def test_a_bundle_whose_digest_is_wrong_is_refused_and_nothing_runs(tmp_path):
    real = bundle_text()
    claimed = hashlib.sha256(b"another bundle").hexdigest()
    root, aws_dir, env, _ = node(tmp_path, real, pointer_digest=claimed, store_as=claimed)
    result = boot(env)
    assert result.returncode == 1
    assert f"expected {claimed}: refusing it" in result.stderr
    assert result.stderr.count("refusing it") == 1  # a refusal is not retried
    assert not (root / "handed.json").exists() and not (root / "usr/local/lib/kimi-fleet/apply_release.py").exists()
    assert not (aws_dir / "apt").exists()


def test_a_malformed_pointer_and_a_bundle_without_applier_are_refused(tmp_path):
    root, aws_dir, env, _ = node(tmp_path / "a", bundle_text())
    (aws_dir / "pointer").write_text("not-a-pointer\n")
    result = boot(env)
    assert result.returncode == 1 and "not 's3://... <sha256>'" in result.stderr
    root, aws_dir, env, _ = node(tmp_path / "b", bundle_text(applier=None))
    result = boot(env)
    assert result.returncode == 1 and "has no /usr/local/lib/kimi-fleet/apply_release.py" in result.stderr
    assert not (root / "handed.json").exists()


def test_a_bundle_not_yet_uploaded_is_retried_until_the_wait_runs_out(tmp_path):
    bundle = bundle_text()
    digest = hashlib.sha256(bundle.encode()).hexdigest()
    root, aws_dir, env, _ = node(tmp_path, bundle, store_as="elsewhere")
    (aws_dir / "pointer").write_text(f"s3://b/releases/{digest}.json {digest}\n")
    result = boot(env, wait="1")
    assert result.returncode == 1 and "retrying in" in result.stderr and "NoSuchKey" in result.stderr
    assert not (root / "handed.json").exists()


def test_a_bundle_without_a_package_list_installs_nothing(tmp_path):
    root, aws_dir, env, digest = node(tmp_path, bundle_text(packages=None))
    assert boot(env).returncode == 0
    assert not (aws_dir / "apt").exists() and (root / "handed.json").exists()


def test_a_fleet_node_boots_the_bundle_its_template_tags_not_the_pointer(tmp_path):
    """The pointer already names a newer release; the node's launch template version tags its own."""
    wanted = bundle_text(packages="caddy\n")
    root, aws_dir, env, newer = node(tmp_path, bundle_text())
    digest = hashlib.sha256(wanted.encode()).hexdigest()
    (aws_dir / "s3" / f"{digest}.json").write_text(wanted)
    with start_imds({f"tags/instance/{boot_stub.RELEASE_TAG}": digest}) as imds:
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = imds
        result = boot(env, "--expect-tag", boot_stub.RELEASE_TAG)
    assert result.returncode == 0, result.stderr
    assert newer != digest
    assert json.loads((root / "handed.json").read_text())[-1] == digest
    assert f"s3 cp s3://b/releases/{digest}.json" in (aws_dir / "calls").read_text()


# --- the user data itself -------------------------------------------------------------------------


def test_the_stub_is_valid_cloud_config_and_carries_only_the_loader(tmp_path):
    for fleet in (False, True):
        stub = boot_stub.render_frozen_boot_stub(pointer=POINTER, region=REGION, fleet=fleet)
        config = tmp_path / "user-data.yaml"
        config.write_text(stub)
        check = subprocess.run(["cloud-init", "schema", "--config-file", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        document = yaml.safe_load(stub)
        assert set(document) == {"write_files", "runcmd"}  # no packages: the bundle lists them
        assert [f["content"] for f in document["write_files"]] == [node_script("boot_loader.py")]
        assert ("--expect-tag" in document["runcmd"][0]) is fleet


def test_the_stub_does_not_change_when_a_node_file_changes(monkeypatch):
    """Any shipped file but the loader may change: the user data stays the same bytes."""
    from kimi_fleet import node_scripts

    before = boot_stub.render_frozen_boot_stub(pointer=POINTER, region=REGION)
    real = node_scripts.node_script

    def edited(name):
        text = real(name)
        return text if name == "boot_loader.py" else text + "\n# an edit\n"

    monkeypatch.setattr(boot_stub, "node_script", edited)
    assert boot_stub.render_frozen_boot_stub(pointer=POINTER, region=REGION) == before
    monkeypatch.setattr(boot_stub, "node_script", lambda name: real(name) + "\n# the loader changed\n")
    assert boot_stub.render_frozen_boot_stub(pointer=POINTER, region=REGION) != before


@pytest.mark.parametrize("script", ["boot_loader.py"])
def test_the_loader_is_standard_library_only(script):
    source = node_script(script)
    imports = {line.split()[1].split(".")[0] for line in source.splitlines()
               if line.startswith(("import ", "from ")) and not line.startswith("from __future__")}
    assert imports <= set(sys.stdlib_module_names), imports - set(sys.stdlib_module_names)


def test_the_loader_and_the_bundle_agree_on_paths():
    from kimi_fleet.node_scripts import boot_loader

    assert boot_loader.APPLY_RELEASE == node_files.APPLY_RELEASE
    assert boot_loader.NODE_PACKAGES_FILE.startswith("/etc/kimi-fleet/")


def _aws_stacks():
    from kimi_fleet.stackfile import load_stack_config, stack_file, stack_names
    from tests.matrix import REFUSED_STACKS

    found = []
    for name in stack_names():
        if name not in REFUSED_STACKS and load_stack_config(stack_file(name)).spec().target.kind == "aws":
            found.append(name)
    return found


@pytest.mark.parametrize("stack", _aws_stacks())
def test_what_is_reviewed_in_build_is_what_the_launch_template_carries(stack):
    """build/<stack>/user-data.yaml, byte for byte, is the launch template's user data."""
    import base64
    import gzip

    from kimi_fleet.artifacts import render_artifacts
    from kimi_fleet.launch import render_launch
    from kimi_fleet.resolve import Resolved
    from kimi_fleet.sizing import size
    from kimi_fleet.stackfile import load_stack_config, stack_file
    from tooling.mock_run import run_stack

    r = Resolved(load_stack_config(stack_file(stack)).spec())
    artifacts = render_artifacts(r, size(r), render_launch(r))
    # One launch template per node of a replica (rank 0's is the single node's), in rank order.
    templates = sorted(run_stack(stack).of_type("aws:ec2/launchTemplate:LaunchTemplate"), key=lambda t: t["name"])
    assert len(templates) == r.nodes_per_replica
    for rank, template in enumerate(templates):
        reviewed = artifacts["user-data.yaml" if rank == 0 else f"user-data-rank-{rank}.yaml"]
        carried = gzip.decompress(base64.b64decode(template["inputs"]["userData"])).decode()
        assert carried == reviewed
