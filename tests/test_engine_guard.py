"""Engines may not reach the instance metadata service (whose credentials are the node role's);
the node's own agents may. Proven on the real kernel: the rendered nftables guard loaded in a
private network namespace with a fake metadata server behind a veth, and a client run once from
a cgroup of the engines' shape and once from outside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import json

import pytest
import yaml

from kimi_fleet import catalog, node_files, node_guard
from kimi_fleet.artifacts import render_artifacts
from kimi_fleet.launch import COMMON_DOCKER_ARGS, render_launch
from kimi_fleet.paths import ENGINE_SLICE
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import size
from kimi_fleet.stackfile import PROJECT_ROOT, load_stack_config, stack_file
from tests.matrix import PLANNED_STACKS

METADATA_V4 = catalog.INSTANCE_METADATA_ADDRESSES[0]
#: nft resolves a cgroupv2 path under this directory.
NFT_CGROUP_BASE = Path("/sys/fs/cgroup")


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/mounts").read_text().splitlines():
        _, where, kind, *_ = line.split()
        if kind == "cgroup2" and Path(where).is_relative_to(NFT_CGROUP_BASE):
            return Path(where)
    return None


def _unavailable() -> str | None:
    for tool in ("ip", "nft", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if os.geteuid() != 0:
        return "needs root (network namespaces, cgroups)"
    mount = _cgroup2_mount()
    if mount is None:
        return "no cgroup2 mount under /sys/fs/cgroup"
    probe = mount / f"kimi-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as error:
        return f"cannot create a cgroup: {error}"
    return None


UNAVAILABLE = _unavailable()
#: The tests that load the rules into a real kernel; the others only render.
needs_kernel = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))

CLIENT = """
import os, sys, socket
cgroup = sys.argv[1]
if cgroup:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))
try:
    with socket.create_connection((sys.argv[2], 80), timeout=5) as s:
        s.sendall(b"PUT /latest/api/token HTTP/1.0\\r\\n\\r\\n")
        print(s.recv(100).split(b"\\r\\n")[0].decode())
except OSError as error:
    print(f"refused: {error}")
"""

SERVER = """
import http.server, sys
class Token(http.server.BaseHTTPRequestHandler):
    def do_PUT(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"a-token")
    def log_message(self, *a): pass
http.server.HTTPServer((sys.argv[1], 80), Token).serve_forever()
"""


class Namespaces:
    """A node namespace and a metadata namespace joined by a veth, the metadata address on the far side."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.node, self.metadata = f"kg-node-{tag}", f"kg-meta-{tag}"
        self.server = None

    def __enter__(self):
        for ns in (self.node, self.metadata):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "link", "add", "vkn", "netns", self.node, "type", "veth", "peer", "name", "vkm",
                        "netns", self.metadata], check=True)
        for ns, dev, address in ((self.node, "vkn", "169.254.0.2/16"), (self.metadata, "vkm", f"{METADATA_V4}/16")):
            subprocess.run(["ip", "-n", ns, "addr", "add", address, "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        self.server = subprocess.Popen(self.inside(self.metadata, sys.executable, "-c", SERVER, METADATA_V4))
        for _ in range(100):  # until it answers, so a refusal later is the guard's and not a slow start
            if "200" in self.connect(None):
                return self
            time.sleep(0.1)
        raise RuntimeError("the fake metadata service never answered")

    def inside(self, ns: str, *argv: str) -> list[str]:
        # nsenter keeps this mount namespace (ip netns exec would remount /sys and hide the cgroups).
        return ["nsenter", f"--net=/run/netns/{ns}", *argv]

    def connect(self, cgroup: Path | None) -> str:
        return subprocess.run(self.inside(self.node, sys.executable, "-c", CLIENT, str(cgroup or ""), METADATA_V4),
                              capture_output=True, text=True, timeout=30).stdout.strip()

    def __exit__(self, *exc):
        if self.server:
            self.server.kill()
            self.server.wait()
        for ns in (self.node, self.metadata):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def engine_cgroup():
    mount = _cgroup2_mount()
    path = mount / f"kimi-test-{uuid.uuid4().hex[:8]}.slice"
    path.mkdir()
    yield path
    # Processes in it have exited; move any straggler out before removing it.
    for pid in (path / "cgroup.procs").read_text().split():
        (mount / "cgroup.procs").write_text(pid)
    path.rmdir()


def _load(namespaces: Namespaces, rules: str, tmp_path: Path) -> None:
    path = tmp_path / "engine-guard.nft"
    path.write_text(rules)
    subprocess.run(namespaces.inside(namespaces.node, "nft", "-f", str(path)), check=True, capture_output=True)


@needs_kernel
def test_engines_are_refused_the_metadata_service_and_the_node_keeps_it(engine_cgroup, tmp_path):
    relative = engine_cgroup.relative_to(NFT_CGROUP_BASE)
    with Namespaces() as ns:
        assert "200" in ns.connect(None), "the fake metadata service does not answer"
        assert "200" in ns.connect(engine_cgroup), "without the guard an engine reaches it (the attack)"
        _load(ns, node_guard.render_engine_guard(stack="test", cgroup_path=str(relative)), tmp_path)
        assert "200" in ns.connect(None), "the node's own agents lost the metadata service"
        engine = ns.connect(engine_cgroup)
        assert engine.startswith("refused"), engine
        rules = subprocess.run(ns.inside(ns.node, "nft", "list", "table", "inet", node_guard.ENGINE_GUARD_TABLE),
                               capture_output=True, text=True, check=True).stdout
        assert node_guard.ENGINE_GUARD_LOG_PREFIX in rules
        assert "packets 0 " not in rules.split("counter", 1)[1].split("\n", 1)[0]  # the refusal was counted


@needs_kernel
def test_a_guard_for_another_cgroup_does_not_refuse_the_engine(engine_cgroup, tmp_path):
    """The mutation: the rule must name the engines' cgroup, or it refuses nothing."""
    other = engine_cgroup.parent / f"{engine_cgroup.name}-other"
    other.mkdir()
    try:
        with Namespaces() as ns:
            _load(ns, node_guard.render_engine_guard(stack="test", cgroup_path=str(other.relative_to(NFT_CGROUP_BASE))),
                  tmp_path)
            assert "200" in ns.connect(engine_cgroup)
    finally:
        other.rmdir()


def test_every_engine_container_runs_in_the_guarded_slice():
    assert f"--cgroup-parent={ENGINE_SLICE}" in COMMON_DOCKER_ARGS
    assert f'"{ENGINE_SLICE}"' in node_guard.render_engine_guard(stack="x")
    assert f"Requires={ENGINE_SLICE}" in node_guard.ENGINE_GUARD_UNIT


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_guard_units_pass_systemd_analyze_verify(tmp_path):
    unit_dir = tmp_path / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    (unit_dir / ENGINE_SLICE).write_text(node_guard.ENGINE_SLICE_UNIT)
    (unit_dir / node_guard.ENGINE_GUARD_UNIT_NAME).write_text(node_guard.ENGINE_GUARD_UNIT)
    nft = tmp_path / node_guard.NFT.lstrip("/")
    nft.parent.mkdir(parents=True)
    nft.write_text("#!/bin/sh\n")
    nft.chmod(0o755)
    result = subprocess.run(["systemd-analyze", "verify", f"--root={tmp_path}", "--man=no",
                             f"/etc/systemd/system/{ENGINE_SLICE}", f"/etc/systemd/system/{node_guard.ENGINE_GUARD_UNIT_NAME}"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- every node that runs engines in Docker gets the guard -----------------------------------------

def _resolved(stack: str) -> Resolved:
    return Resolved(load_stack_config(stack_file(stack)).spec())


ALL_STACKS = PLANNED_STACKS  # the refused ones render nothing
#: Kubernetes renders manifests: its pods are not docker-run, so it has no node files at all.
NODE_STACKS = [stack for stack in ALL_STACKS if not _resolved(stack).target.renders_manifests]
GUARD_PATHS = (node_guard.ENGINE_GUARD_PATH, f"{node_files.UNIT_DIR}/{ENGINE_SLICE}",
               f"{node_files.UNIT_DIR}/{node_guard.ENGINE_GUARD_UNIT_NAME}")


def _guard_files(stack: str) -> dict[str, str]:
    return dict(zip(GUARD_PATHS, (node_guard.render_engine_guard(stack=stack), node_guard.ENGINE_SLICE_UNIT,
                                  node_guard.ENGINE_GUARD_UNIT)))


def test_the_node_stacks_cover_every_node_target():
    kinds = {(_resolved(s).spec.target.kind, node_files.behind_load_balancer(_resolved(s)),
              bool(_resolved(s).spec.target.host and _resolved(s).spec.target.host.startup_script_only))
             for s in NODE_STACKS}
    # AWS single node and fleet, a host over SSH, a host that takes only a startup script.
    assert {("aws", False, False), ("aws", True, False), ("host", False, False), ("host", False, True)} <= kinds
    assert len(NODE_STACKS) < len(ALL_STACKS)  # the Kubernetes stacks are left out, and only they


@pytest.mark.parametrize("stack", NODE_STACKS)
def test_every_node_ships_the_engine_guard_and_the_bootstrap_can_apply_it(stack):
    r = _resolved(stack)
    sizing, launch = size(r), render_launch(r)
    files = node_files.render_node_files(r, launch, sizing, secrets=node_files.planned_secrets(r),
                                         ebs_volume_id=node_files.EBS_VOLUME_PLACEHOLDER)
    for path, text in _guard_files(r.spec.stack).items():
        assert files[path].content == text and files[path].mode == 0o644, path
    # Applied like the firewall: a unit whose inputs are exactly the shipped files.
    assert node_files.unit_inputs(launch)[node_guard.ENGINE_GUARD_UNIT_NAME] == GUARD_PATHS
    assert node_guard.ENGINE_GUARD_UNIT_NAME in node_files.unit_digests(files, launch)
    # An AWS node's files travel as the release bundle apply_release.py writes.
    bundled = {entry["path"] for entry in json.loads(node_files.release_bundle(files))["files"]}
    assert set(GUARD_PATHS) <= bundled
    artifacts = render_artifacts(r, sizing, launch)
    guard = _guard_files(r.spec.stack)
    assert artifacts["engine-guard.nft"] == guard[GUARD_PATHS[0]]
    assert artifacts[ENGINE_SLICE] == guard[GUARD_PATHS[1]]
    assert artifacts[node_guard.ENGINE_GUARD_UNIT_NAME] == guard[GUARD_PATHS[2]]
    if "startup-script.yaml" in artifacts:  # the startup-script host: its cloud-config writes them
        written = {f["path"]: f["content"] for f in yaml.safe_load(artifacts["startup-script.yaml"])["write_files"]}
        assert {path: written.get(path) for path in GUARD_PATHS} == guard


def test_kubernetes_stacks_ship_no_engine_guard():
    for stack in sorted(set(ALL_STACKS) - set(NODE_STACKS)):
        r = _resolved(stack)
        artifacts = render_artifacts(r, size(r), render_launch(r))
        assert "engine-guard.nft" not in artifacts and node_guard.ENGINE_GUARD_TABLE not in "".join(artifacts.values())


def test_the_planner_writes_the_guard_to_build(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_script", PROJECT_ROOT / "scripts" / "plan.py")
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    stack = "h200-int4-vllm"  # a fleet: the most files of any node target
    result = plan.plan_config(load_stack_config(stack_file(stack)), tmp_path, preflight=False)
    assert result["errors"] == [], result["errors"]
    out = tmp_path / stack
    guard = _guard_files(stack)
    assert (out / "engine-guard.nft").read_text() == guard[GUARD_PATHS[0]]
    assert (out / ENGINE_SLICE).read_text() == guard[GUARD_PATHS[1]]
    assert (out / node_guard.ENGINE_GUARD_UNIT_NAME).read_text() == guard[GUARD_PATHS[2]]


def test_the_bootstrap_applies_the_guard_before_any_engine_and_every_engine_requires_it():
    bootstrap = node_files.BOOTSTRAP
    guard = node_guard.ENGINE_GUARD_UNIT_NAME
    applied = f"apply_unit {guard} " + " ".join(f'"$ROOT{path}"' for path in GUARD_PATHS)
    assert applied in bootstrap
    assert bootstrap.index(applied) < bootstrap.index('apply_unit "kimi-engine@')
    started = next(line for line in bootstrap.splitlines() if line.strip().startswith("local units=("))
    assert guard in started  # the bootstrap refuses to finish with the guard not active
    r = _resolved("h200-int4-vllm")
    files = node_files.render_node_files(r, render_launch(r), size(r), secrets=node_files.planned_secrets(r),
                                         ebs_volume_id=node_files.EBS_VOLUME_PLACEHOLDER)
    unit = files[f"{node_files.UNIT_DIR}/kimi-engine@.service"].content.splitlines()
    for key in ("Requires=", "After="):
        (line,) = [line for line in unit if line.startswith(key)]
        assert guard in line.split("=", 1)[1].split(), line
