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
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

import yaml

from kimi_fleet import catalog, node_guard
from kimi_fleet.caddy import API_KEY_PATTERN, render_caddyfile
from kimi_fleet.launch import ENV_DIR, Launch, docker_argv, docker_run_command, plain_value, render_env_file
from kimi_fleet.node_scripts import GENERATION_PROBE_SCRIPT, GENERATION_PROBE_TIMEOUT_SECONDS, node_script
from kimi_fleet.resolve import Resolved
from kimi_fleet.sizing import Sizing
from kimi_fleet.spec import SAFE_VALUE

SBIN = "/usr/local/sbin"
UNIT_DIR = "/etc/systemd/system"
SECRETS_DIR = f"{ENV_DIR}/secrets"
API_KEY_FILE = f"{SECRETS_DIR}/api-key"
HF_TOKEN_FILE = f"{SECRETS_DIR}/hf-token"
NODE_ENV_FILE = f"{ENV_DIR}/node.env"
#: The node's release id (the digest its Caddy stamps on every answer).
RELEASE_FILE = f"{ENV_DIR}/release"
CADDYFILE = "/etc/caddy/Caddyfile"
CADDY_API_KEY_ENV = "KIMI_API_KEY"
#: EC2 refuses user data above 16 KB (before its own base64; after our gzip).
EC2_USER_DATA_LIMIT = 16 * 1024
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

    def __post_init__(self):
        if self.kind == "ssm" and not (self.api_key_parameter and self.region):
            raise ValueError("SecretsSource ssm needs api_key_parameter and region")

    @classmethod
    def ssm(cls, prefix: str, region: str, *, hf_token: bool, api_key_version: int | None = None) -> "SecretsSource":
        prefix = prefix.rstrip("/")
        return cls("ssm", f"{prefix}/api-key", f"{prefix}/hf-token" if hf_token else None, region,
                   api_key_version=api_key_version)


def default_ssm_prefix(stack: str) -> str:
    return f"/kimi-fleet/{stack}"


#: The keys node.env may hold: the settings loader on the node accepts these and nothing else.
NODE_SETTINGS_KEYS = (
    "STACK", "VENDOR", "ENGINE_COUNT", "WEIGHTS_VOLUME", "WEIGHTS_ROOT", "WEIGHTS_DIR", "EBS_VOLUME_ID",
    "MODEL_REPO", "MODEL_REVISION", "WEIGHTS_SOURCE", "S3_MIRROR_URI", "DOWNLOAD_ATTEMPT_TIMEOUT",
    "HF_HUB_VERSION", "EXPECTED_READY_MINUTES", "SECRETS_KIND", "AWS_REGION", "SSM_API_KEY_PARAMETER",
    "SSM_HF_TOKEN_PARAMETER", "SSM_API_KEY_VERSION", "API_KEY_FILE", "HF_TOKEN_FILE", "CHECKPOINT_BYTES",
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
APPLY_RELEASE = f"{LIB_DIR}/apply_release.py"
#: The cold start as data (phase, download progress); the proxy serves it behind the key.
STATUS_FILE = "/run/kimi-fleet/status.json"
WATCHDOG = f"{LIB_DIR}/watchdog.py"
#: Caddy's loopback-only plain-HTTP listener for the node's own checks (outside the engine port ranges).
LOCAL_PROXY_PORT = 9180
#: Written by the watchdog (the release id) only when the node generates through its own Caddy.
READY_FILE = "/run/kimi-fleet/ready"
#: A fleet node's health-check listener for its load balancer (caddy.READY_PATH; VPC only).
READY_PORT = 9181
#: Every WATCHDOG_INTERVAL_SECONDS one tiny generation per engine; an admitted engine that fails
#: WATCHDOG_FAILURES in a row is restarted.
WATCHDOG_INTERVAL_SECONDS = 30
WATCHDOG_FAILURES = 3
WATCHDOG_PROBE_TIMEOUT_SECONDS = GENERATION_PROBE_TIMEOUT_SECONDS
SETTINGS_LOADER = r"""# kimi-fleet: the node settings loader (a library: `source`d by the node's scripts).
# shellcheck shell=bash
load_settings() {
  local file=$1 line key value number=0 known=" __KEYS__ "
  [[ -f $file ]] || { echo "settings file $file is missing" >&2; exit 1; }
  while IFS= read -r line || [[ -n $line ]]; do
    number=$((number + 1))
    [[ -z $line || $line == \#* ]] && continue
    if [[ ! $line =~ ^([A-Z][A-Z0-9_]*)=(__SAFE_VALUE__)$ ]]; then
      echo "$file:$number: refused: not KEY=VALUE with a plain value" >&2
      exit 1
    fi
    key=${BASH_REMATCH[1]}
    value=${BASH_REMATCH[2]}
    case $known in
      *" $key "*) ;;
      *) echo "$file:$number: refused: unknown setting $key" >&2; exit 1 ;;
    esac
    printf -v "$key" '%s' "$value"
    export "${key?}"
  done <"$file"
}
""".replace("__KEYS__", " ".join(NODE_SETTINGS_KEYS)).replace("__SAFE_VALUE__", SAFE_VALUE)

_LOG_FUNCTIONS = r"""
# Everything the bootstrap does is appended here, timestamped: `tail -f` it during a cold start.
ROOT="${KIMI_ROOT:-/}"
ROOT="${ROOT%/}"
LOG="$ROOT/var/log/kimi-fleet/bootstrap.log"
mkdir -p "${LOG%/*}"
log() { printf '%s [%s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${0##*/}" "$*" | tee -a "$LOG" >&2; }
run() { log "+ $*"; "$@" >>"$LOG" 2>&1; }
"""

# --- what each unit restarts for ---------------------------------------------------------------
# The bootstrap restarts a unit only when one of its inputs changed; the planner reads the same
# lists to say which units a change restarts.
FIREWALL_UNIT_INPUTS = (node_guard.FIREWALL_RULES_PATH, f"{UNIT_DIR}/kimi-firewall.service")
FAIL2BAN_INPUTS = (node_guard.FAIL2BAN_FILTER_PATH, node_guard.FAIL2BAN_JAIL_PATH)
WATCHDOG_INPUTS = (f"{UNIT_DIR}/kimi-watchdog.timer", f"{UNIT_DIR}/kimi-watchdog.service", GENERATION_PROBE, WATCHDOG,
                   NODE_STATUS)
#: Caddy's file inputs; the API key (a secret, not in any rendered file) is its other input.
CADDY_FILE_INPUTS = (CADDYFILE, f"{UNIT_DIR}/caddy.service.d/kimi-fleet.conf")


def engine_unit_inputs(index: int | str) -> tuple[str, ...]:
    return (f"{ENV_DIR}/engine-{index}.env", f"{ENV_DIR}/engine-{index}.argv.json", f"{UNIT_DIR}/kimi-engine@.service")


def _shell_paths(paths: tuple[str, ...]) -> str:
    return " ".join(f'"$ROOT{path}"' for path in paths)


def unit_inputs(launch: Launch) -> dict[str, tuple[str, ...]]:
    """Unit -> the rendered files whose change restarts it (firewall only where it is shipped)."""
    units = {"kimi-firewall.service": FIREWALL_UNIT_INPUTS, "fail2ban.service": FAIL2BAN_INPUTS}
    units.update({f"kimi-engine@{i.index}.service": engine_unit_inputs(i.index) for i in launch.instances})
    units["caddy.service"] = CADDY_FILE_INPUTS
    units["kimi-watchdog.timer"] = WATCHDOG_INPUTS
    return units


def unit_digests(files: dict[str, NodeFile], launch: Launch) -> dict[str, str]:
    """Unit -> digest of its rendered inputs: two releases differ for a unit exactly when the
    bootstrap would restart it (key rotation aside)."""
    return {unit: files_digest({p: files[p] for p in paths if p in files})
            for unit, paths in unit_inputs(launch).items() if any(p in files for p in paths)}


BOOTSTRAP = r"""#!/bin/bash
# kimi-fleet node bootstrap. Idempotent: a re-run changes nothing unless an input changed.
# KIMI_ROOT=/some/dir runs it against a scratch root (tests): no systemctl, docker or block devices.
# KIMI_DRY_GPU=1 skips GPU preparation.
set -Eeuo pipefail
""" + _LOG_FUNCTIONS + r"""
trap 'log "FAILED at line $LINENO (exit $?)"' ERR
LIVE=1
[[ -n $ROOT ]] && LIVE=0
# shellcheck source=/dev/null
. "$ROOT__SETTINGS_LIBRARY__"
load_settings "$ROOT/etc/kimi-fleet/node.env"
: "${STACK:?}" "${VENDOR:?}" "${WEIGHTS_VOLUME:?}" "${WEIGHTS_ROOT:?}" "${WEIGHTS_DIR:?}" "${ENGINE_COUNT:?}"
SBIN_DIR="$ROOT/usr/local/sbin"
STATE_DIR="$ROOT/var/lib/kimi-fleet"

live() {
  if (( LIVE )); then "$@"; else log "scratch root: skipped: $*"; fi
}

# The cold start as data for `pulumi up` to show (never fatal: it only reports).
NODE_STATUS="$ROOT__NODE_STATUS__"
status() { KIMI_ROOT="$ROOT" python3 "$NODE_STATUS" phase "$1" || log "status: could not record phase $1"; }
trap 'status failed' EXIT

prepare_gpus() {
  if [[ ${KIMI_DRY_GPU:-0} == 1 ]]; then log "GPU preparation skipped (KIMI_DRY_GPU=1)"; return; fi
  case $VENDOR in
    nvidia)
      if command -v nvidia-smi >/dev/null; then
        # Persistence keeps the driver loaded between engine restarts (faster, stable device state).
        if systemctl list-unit-files nvidia-persistenced.service >/dev/null 2>&1; then
          live systemctl enable --now nvidia-persistenced.service
        else
          live nvidia-smi -pm 1
        fi
      else
        log "nvidia-smi not found: persistence mode skipped"
      fi
      if command -v nvidia-ctk >/dev/null; then
        # CDI spec for `--device nvidia.com/gpu=N` with plain runc (seed 003: no legacy --gpus hook).
        mkdir -p "$ROOT/etc/cdi"
        run nvidia-ctk cdi generate --output="$ROOT/etc/cdi/nvidia.yaml"
        enable_docker_cdi
      else
        log "nvidia-ctk not found: CDI spec not generated"
      fi
      ;;
    amd)
      if [[ -e /dev/kfd ]]; then log "AMD: /dev/kfd present"; else log "AMD: /dev/kfd missing: is amdgpu loaded?"; fi
      ;;
    huawei)
      if [[ -e /dev/davinci_manager ]]; then log "Ascend: /dev/davinci_manager present"
      else log "Ascend: /dev/davinci_manager missing: is the NPU driver installed?"; fi
      ;;
  esac
}

enable_docker_cdi() {
  local daemon_json="$ROOT/etc/docker/daemon.json" merged
  mkdir -p "${daemon_json%/*}"
  merged=$(python3 - "$daemon_json" <<'PY'
import json, os, sys
path = sys.argv[1]
config = json.load(open(path)) if os.path.exists(path) and os.path.getsize(path) else {}
config.setdefault("features", {})["cdi"] = True
print(json.dumps(config, indent=2, sort_keys=True))
PY
)
  if [[ -f $daemon_json && $(<"$daemon_json") == "$merged" ]]; then return; fi
  printf '%s\n' "$merged" >"$daemon_json"
  log "docker CDI enabled in $daemon_json"
  live systemctl restart docker.service
}

ensure_fstab() {
  local source=$1
  if ! grep -qs " $WEIGHTS_ROOT " "$ROOT/etc/fstab"; then
    printf '%s %s xfs defaults,noatime,nofail 0 2\n' "$source" "$WEIGHTS_ROOT" >>"$ROOT/etc/fstab"
    log "fstab: $source on $WEIGHTS_ROOT"
  fi
}

format_if_blank() {
  local device=$1
  if blkid "$device" >/dev/null 2>&1; then log "$device already has a filesystem: kept"
  else run mkfs.xfs -L kimi-weights "$device"; fi
}

mount_weights() {
  mkdir -p "$ROOT$WEIGHTS_ROOT"
  if (( ! LIVE )) || [[ $WEIGHTS_VOLUME == host-path ]]; then
    log "weights: directory $ROOT$WEIGHTS_ROOT ($WEIGHTS_VOLUME)"
    return
  fi
  if mountpoint -q "$WEIGHTS_ROOT"; then log "weights: $WEIGHTS_ROOT already mounted"; return; fi
  local device
  case $WEIGHTS_VOLUME in
    instance-store)
      # Instance store is erased on stop: the array is rebuilt from whatever disks are there.
      device=/dev/md/kimi-weights
      mdadm --assemble --scan >>"$LOG" 2>&1 || true
      if [[ ! -e $device ]]; then
        mapfile -t disks < <(lsblk -dnpo NAME,MODEL | awk '/Amazon EC2 NVMe Instance Storage/ {print $1}')
        (( ${#disks[@]} > 0 )) || { log "no instance-store NVMe disks found"; exit 1; }
        if (( ${#disks[@]} == 1 )); then
          device=${disks[0]}
        else
          run mdadm --create "$device" --run --level=0 --raid-devices="${#disks[@]}" "${disks[@]}"
        fi
      fi
      format_if_blank "$device"
      ensure_fstab "LABEL=kimi-weights"
      ;;
    ebs)
      device="/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_${EBS_VOLUME_ID/-/}"
      # The attachment is declared after the instance exists: wait for the device to appear.
      for _ in $(seq 1 120); do [[ -e $device ]] && break; sleep 5; done
      [[ -e $device ]] || { log "EBS volume $EBS_VOLUME_ID not attached after 10 min"; exit 1; }
      format_if_blank "$device"
      ensure_fstab "LABEL=kimi-weights"
      ;;
  esac
  run mount "$WEIGHTS_ROOT"
}

write_secret() {
  local dest=$1 value=$2
  mkdir -p "${dest%/*}"
  chmod 700 "${dest%/*}"
  (umask 077; printf '%s' "$value" >"$dest.tmp")
  mv "$dest.tmp" "$dest"
}

fetch_ssm() {
  local name=$1 dest=$2 value attempt
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    # The instance role may take a moment to propagate after launch.
    if value=$(aws ssm get-parameter --region "$AWS_REGION" --with-decryption --name "$name" \
        --query Parameter.Value --output text 2>>"$LOG"); then
      write_secret "$dest" "$value"
      log "secret $name -> $dest"
      return
    fi
    log "ssm get-parameter $name failed (attempt $attempt), retrying"
    sleep $((attempt * 3))
  done
  exit 1
}

fetch_secrets() {
  case $SECRETS_KIND in
    ssm)
      fetch_ssm "$SSM_API_KEY_PARAMETER" "$ROOT$API_KEY_FILE"
      if [[ -n ${SSM_HF_TOKEN_PARAMETER:-} ]]; then fetch_ssm "$SSM_HF_TOKEN_PARAMETER" "$ROOT$HF_TOKEN_FILE"; fi
      ;;
    files)
      local file mode
      for file in "$ROOT$API_KEY_FILE" "$ROOT$HF_TOKEN_FILE"; do
        [[ $file == "$ROOT$HF_TOKEN_FILE" && ! -e $file ]] && continue
        [[ -s $file ]] || { log "secret file $file is missing or empty"; exit 1; }
        mode=$(stat -c %a "$file")
        [[ $mode == 600 || $mode == 400 ]] || { log "secret file $file has mode $mode, want 600"; exit 1; }
      done
      log "secrets: files present and root-only"
      ;;
  esac
}

ensure_hf_cli() {
  [[ $WEIGHTS_SOURCE == huggingface ]] || return 0
  if command -v hf >/dev/null; then HF_CLI=$(command -v hf); return; fi
  HF_CLI="$ROOT/opt/kimi-fleet/hf/bin/hf"
  [[ -x $HF_CLI ]] && return
  run python3 -m venv "$ROOT/opt/kimi-fleet/hf"
  run "$ROOT/opt/kimi-fleet/hf/bin/pip" install --quiet "huggingface_hub[hf_xet]==$HF_HUB_VERSION"
}

download_weights() {
  HF_CLI=""
  ensure_hf_cli
  log "weights: $MODEL_REPO@$MODEL_REVISION from $WEIGHTS_SOURCE into $ROOT$WEIGHTS_DIR"
  status download
  mkdir -p "$ROOT$WEIGHTS_DIR"
  KIMI_ROOT="$ROOT" python3 "$NODE_STATUS" watch-download "$ROOT$WEIGHTS_DIR" "$CHECKPOINT_BYTES" &
  local sampler=$!
  WEIGHTS_DIR="$ROOT$WEIGHTS_DIR" HF_TOKEN_FILE="$ROOT$HF_TOKEN_FILE" HF_CLI="$HF_CLI" \
    "$SBIN_DIR/kimi-download-weights" 2>&1 | while IFS= read -r line; do log "$line"; done
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  log "weights verified"
}

# Restart a unit only when one of its inputs changed (or it is not running): a re-run is a no-op.
apply_unit() {
  local unit=$1; shift
  local stamp="$STATE_DIR/applied/$unit.sha256" digest
  mkdir -p "${stamp%/*}"
  digest=$(cat "$@" | sha256sum | cut -d' ' -f1)
  if [[ -f $stamp && $(<"$stamp") == "$digest" ]] && { (( ! LIVE )) || systemctl is-active --quiet "$unit"; }; then
    log "$unit: unchanged"
    return
  fi
  live systemctl enable "$unit"
  # --no-block: engine units order themselves after this bootstrap unit.
  live systemctl restart --no-block "$unit"
  printf '%s\n' "$digest" >"$stamp"
  log "$unit: (re)started"
}

prepare_access_log() {
  # fail2ban's jail needs the file to exist before Caddy's first request; Caddy's user appends.
  local file="$ROOT__ACCESS_LOG__"
  [[ -e $file ]] && return
  mkdir -p "${file%/*}"
  if (( LIVE )); then install -m 0640 -o caddy -g caddy /dev/null "$file"; else : >"$file"; fi
}

start_services() {
  live systemctl daemon-reload
  # The opt-in host firewall first: the proxy's ports are never open unfiltered.
  if [[ -f $ROOT__FIREWALL_RULES__ ]]; then
    apply_unit kimi-firewall.service __FIREWALL_INPUTS__
  fi
  prepare_access_log
  apply_unit fail2ban.service __FAIL2BAN_INPUTS__
  local i
  for ((i = 0; i < ENGINE_COUNT; i++)); do
    apply_unit "kimi-engine@$i.service" __ENGINE_INPUTS__
  done
  apply_unit caddy.service __CADDY_INPUTS__ "$ROOT$API_KEY_FILE"
  # Admission and liveness by real generations, from now on every few seconds.
  apply_unit kimi-watchdog.timer __WATCHDOG_INPUTS__
}

log "bootstrap of stack $STACK: $ENGINE_COUNT engine(s), weights on $WEIGHTS_VOLUME; expected ready ${EXPECTED_READY_MINUTES:-?} min after the download"
mkdir -p "$STATE_DIR"
prepare_gpus
mount_weights
fetch_secrets
download_weights
start_services
status loading
trap - EXIT
log "bootstrap done: engines are loading (journalctl -fu 'kimi-engine@*'); the endpoint answers once they are ready"
""".replace("__SETTINGS_LIBRARY__", SETTINGS_LIBRARY).replace("__ACCESS_LOG__", node_guard.ACCESS_LOG).replace(
    "__FIREWALL_RULES__", node_guard.FIREWALL_RULES_PATH).replace("__NODE_STATUS__", NODE_STATUS).replace(
    "__FIREWALL_INPUTS__", _shell_paths(FIREWALL_UNIT_INPUTS)).replace(
    "__FAIL2BAN_INPUTS__", _shell_paths(FAIL2BAN_INPUTS)).replace(
    "__ENGINE_INPUTS__", _shell_paths(engine_unit_inputs("$i"))).replace(
    "__CADDY_INPUTS__", _shell_paths(CADDY_FILE_INPUTS)).replace("__WATCHDOG_INPUTS__", _shell_paths(WATCHDOG_INPUTS))

DOWNLOAD_WEIGHTS = r"""#!/bin/bash
# Download the pinned revision into WEIGHTS_DIR, resumably, and verify every file's size and
# content (SHA-256 of LFS files, git blob SHA-1 of the rest) against the repository tree at that
# revision. A `.kimi-verified` marker holding the revision makes a
# re-run a no-op. The Hugging Face token is read from HF_TOKEN_FILE and never printed.
set -euo pipefail
: "${WEIGHTS_DIR:?}" "${MODEL_REPO:?}" "${MODEL_REVISION:?}" "${WEIGHTS_SOURCE:?}"
MARKER="$WEIGHTS_DIR/.kimi-verified"
ATTEMPTS="${DOWNLOAD_ATTEMPTS:-5}"
ATTEMPT_TIMEOUT="${DOWNLOAD_ATTEMPT_TIMEOUT:-7200}"

if [[ -f $MARKER && $(<"$MARKER") == "$MODEL_REVISION" ]]; then
  echo "weights $MODEL_REPO@$MODEL_REVISION already verified"
  exit 0
fi
mkdir -p "$WEIGHTS_DIR"
if [[ -s ${HF_TOKEN_FILE:-} ]]; then
  HF_TOKEN=$(<"$HF_TOKEN_FILE")
  export HF_TOKEN
fi

fetch() {
  if [[ $WEIGHTS_SOURCE == s3-mirror ]]; then
    # Parallel transfers are what make the in-region mirror fast (~4 GB/s).
    local config
    config=$(mktemp)
    printf '[default]\ns3 =\n  max_concurrent_requests = 64\n  multipart_chunksize = 64MB\n' >"$config"
    AWS_CONFIG_FILE="$config" timeout "$ATTEMPT_TIMEOUT" aws s3 sync --only-show-errors \
      --region "$AWS_REGION" "${S3_MIRROR_URI%/}/$MODEL_REPO/$MODEL_REVISION/" "$WEIGHTS_DIR/"
    local status=$?
    rm -f "$config"
    return $status
  fi
  # hf resumes partial files; a hung transfer is killed by timeout and resumed by the next attempt.
  HF_XET_HIGH_PERFORMANCE=1 timeout "$ATTEMPT_TIMEOUT" "${HF_CLI:-hf}" download "$MODEL_REPO" \
    --revision "$MODEL_REVISION" --local-dir "$WEIGHTS_DIR"
}

verify() {
  python3 - "$MODEL_REPO" "$MODEL_REVISION" "$WEIGHTS_DIR" <<'PY'
import concurrent.futures, hashlib, json, os, re, sys, urllib.parse, urllib.request
repo, revision, local = sys.argv[1:4]
endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
url = f"{endpoint}/api/models/{repo}/tree/{revision}?recursive=true"
headers = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else {}
expected = {}
while url:  # the tree API pages through a Link: <...>; rel="next" header
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
        for entry in json.load(response):
            if entry.get("type") == "file":
                # LFS files (the shards) carry their SHA-256; the others a git blob SHA-1.
                expected[entry["path"]] = (entry["size"], (entry.get("lfs") or {}).get("oid"), entry.get("oid"))
        following = re.search(r'<([^>]+)>;\s*rel="next"', response.headers.get("Link") or "")
        url = urllib.parse.urljoin(url, following.group(1)) if following else None
# Hash one file (hashlib releases the GIL: the files hash in parallel); a file whose content is
# wrong is removed, with hf's resume metadata, so the next attempt fetches it again.
def content_problem(path, size, lfs_oid, git_oid):
    want = lfs_oid or git_oid
    if not want:
        return None
    digest = hashlib.sha256() if lfs_oid else hashlib.sha1(b"blob %d\0" % size)
    full = os.path.join(local, path)
    with open(full, "rb") as stream:
        for chunk in iter(lambda: stream.read(16 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() == want:
        return None
    for stale in (full, os.path.join(local, ".cache", "huggingface", "download", path + ".metadata")):
        if os.path.exists(stale):
            os.remove(stale)
    kind = "sha256" if lfs_oid else "git sha1"
    return f"content of {path}: {kind} {digest.hexdigest()}, repository says {want} (removed, fetched again next)"
problems = []
present = []
for path, (size, lfs_oid, git_oid) in sorted(expected.items()):
    full = os.path.join(local, path)
    if not os.path.isfile(full):
        problems.append(f"missing {path}")
    elif os.path.getsize(full) != size:
        problems.append(f"size of {path}: {os.path.getsize(full)} bytes, repository says {size}")
    else:
        present.append((path, size, lfs_oid, git_oid))
with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 4)) as pool:
    problems += [p for p in pool.map(lambda item: content_problem(*item), present) if p]
total = sum(size for size, _, _ in expected.values())
print(f"verify: {len(expected)} files, {total} bytes expected, contents hashed; {len(problems)} problem(s)")
if problems:
    print("\n".join(problems[:20]))
sys.exit(1 if problems or not expected else 0)
PY
}

for ((attempt = 1; attempt <= ATTEMPTS; attempt++)); do
  echo "download attempt $attempt/$ATTEMPTS of $MODEL_REPO@$MODEL_REVISION ($WEIGHTS_SOURCE)"
  if fetch && verify; then
    printf '%s\n' "$MODEL_REVISION" >"$MARKER"
    echo "weights verified: $MARKER"
    exit 0
  fi
  sleep $((attempt * 20))
done
echo "weights download failed after $ATTEMPTS attempts" >&2
exit 1
"""

WAIT_GPUS_FREE = r"""#!/bin/bash
# Before an engine (re)starts, wait until no process holds its GPUs: a stopped engine's NCCL
# teardown keeps device memory for 30-60 s and a new engine started on top of it OOMs (seed 003).
# Usage: kimi-wait-gpus-free GPU_IDS (comma-separated). Bounded; exits 1 so systemd retries later.
set -euo pipefail
ids=${1:?GPU ids, e.g. 0,1,2,3}
timeout=${GPU_FREE_TIMEOUT:-__GPU_FREE_TIMEOUT__}

busy() {
  if command -v nvidia-smi >/dev/null; then
    [[ -n $(nvidia-smi --query-compute-apps=pid --format=csv,noheader -i "$ids" 2>/dev/null) ]]
  elif [[ -e /dev/davinci_manager ]] && command -v fuser >/dev/null; then
    local id
    for id in ${ids//,/ }; do fuser -s "/dev/davinci$id" 2>/dev/null && return 0; done
    return 1
  else
    return 1
  fi
}

if ! command -v nvidia-smi >/dev/null && [[ ! -e /dev/davinci_manager ]]; then
  echo "no per-GPU process query on this host: not waiting"
  exit 0
fi
for ((waited = 0; waited < timeout; waited += 5)); do
  if ! busy; then echo "GPUs $ids free"; exit 0; fi
  sleep 5
done
echo "GPUs $ids still in use after ${timeout}s" >&2
exit 1
""".replace("__GPU_FREE_TIMEOUT__", str(GPU_FREE_TIMEOUT_SECONDS))

ENGINE_RUN = r"""#!/bin/bash
# Start engine N: its whole `docker run` command is a JSON list written by kimi-fleet
# (/etc/kimi-fleet/engine-N.argv.json), handed to exec one element per argument: nothing is
# split, globbed or evaluated on the way.
set -euo pipefail
index=${1:?usage: kimi-engine-run ENGINE_INDEX}
[[ $index =~ ^[0-9]+$ ]] || { echo "engine index must be a number, got $index" >&2; exit 1; }
argv_file="${KIMI_ROOT:-}/etc/kimi-fleet/engine-$index.argv.json"
decoded=$(mktemp)
trap 'rm -f "$decoded"' EXIT
python3 - "$argv_file" >"$decoded" <<'PY'
import json, sys
argv = json.load(open(sys.argv[1]))
if not (isinstance(argv, list) and argv[:2] == ["docker", "run"]
        and all(isinstance(a, str) and a and "\0" not in a for a in argv)):
    sys.exit(f"{sys.argv[1]}: not a docker run argument list")
sys.stdout.write("".join(a + "\0" for a in argv))
PY
mapfile -d '' -t argv <"$decoded"
exec "${argv[@]}"
"""

CADDY_ENV = r"""#!/bin/bash
# Hand the API key to Caddy as an environment variable, from the root-only secret file.
# Runs as root (ExecStartPre=+) before Caddy, which itself runs unprivileged.
set -euo pipefail
# shellcheck source=/dev/null
. "${KIMI_ROOT:-}__SETTINGS_LIBRARY__"
load_settings "${KIMI_ROOT:-}/etc/kimi-fleet/node.env"
key=$(<"${API_KEY_FILE:?}")
# An env file holds bare values: refuse anything that would need quoting.
[[ $key =~ __API_KEY_PATTERN__ ]] || { echo "API key in $API_KEY_FILE is too short or has unsafe characters" >&2; exit 1; }
mkdir -p /run/kimi-fleet
(umask 077; printf '%s=%s\n' __CADDY_KEY_ENV__ "$key" >/run/kimi-fleet/caddy.env.tmp)
mv /run/kimi-fleet/caddy.env.tmp /run/kimi-fleet/caddy.env
""".replace("__CADDY_KEY_ENV__", CADDY_API_KEY_ENV).replace("__SETTINGS_LIBRARY__", SETTINGS_LIBRARY).replace(
    "__API_KEY_PATTERN__", API_KEY_PATTERN.pattern)


def _engine_unit(r: Resolved) -> str:
    return f"""[Unit]
Description=Kimi-K2.6 engine %i (kimi-fleet stack {r.spec.stack})
Documentation=file:///etc/kimi-fleet/stack.json
Wants=network-online.target
After=network-online.target docker.service kimi-bootstrap.service
Requires=docker.service
RequiresMountsFor={r.spec.weights.host_path}

[Service]
Type=simple
EnvironmentFile=/etc/kimi-fleet/engine-%i.env
# A container left over from a crash would block the name.
ExecStartPre=-/usr/bin/docker rm --force ${{CONTAINER_NAME}}
# Pinned tags do not move: pull only when missing (locally built images are never pulled).
ExecStartPre=/bin/sh -c 'docker image inspect "$IMAGE" >/dev/null 2>&1 || docker pull "$IMAGE"'
ExecStartPre=/usr/local/sbin/kimi-wait-gpus-free ${{GPU_IDS}}
ExecStartPre=/usr/bin/test -f ${{WEIGHTS_DIR}}/.kimi-verified
ExecStart=/usr/local/sbin/kimi-engine-run %i
ExecStop=/usr/bin/docker stop --time={ENGINE_STOP_GRACE_SECONDS} ${{CONTAINER_NAME}}
TimeoutStartSec={ENGINE_START_TIMEOUT_SECONDS}
TimeoutStopSec={ENGINE_STOP_GRACE_SECONDS + 60}
Restart=on-failure
RestartSec=30

[Install]
WantedBy=multi-user.target
"""


BOOTSTRAP_UNIT = """[Unit]
Description=kimi-fleet node bootstrap (GPUs, weight volume, secrets, weights, engines, proxy)
Documentation=file:///var/log/kimi-fleet/bootstrap.log
Wants=network-online.target
After=network-online.target docker.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/kimi-bootstrap
# A cold download of ~595 GB can take most of an hour.
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""

def _watchdog_unit(engines: int) -> str:
    # One probe per engine plus two through Caddy, each at most the probe timeout.
    timeout = (engines + 2) * WATCHDOG_PROBE_TIMEOUT_SECONDS + 30
    return f"""[Unit]
Description=kimi-fleet watchdog: admit engines by a real generation, restart one that stops generating
Documentation=file://{WATCHDOG}
After=kimi-bootstrap.service

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 {WATCHDOG}
TimeoutStartSec={timeout}
"""


WATCHDOG_TIMER = f"""[Unit]
Description=kimi-fleet watchdog every {WATCHDOG_INTERVAL_SECONDS} s

[Timer]
OnBootSec=120
OnUnitActiveSec={WATCHDOG_INTERVAL_SECONDS}
AccuracySec=5

[Install]
WantedBy=timers.target
"""


CADDY_OVERRIDE = f"""# kimi-fleet: Caddy reads the API key from the environment, written from the root-only secret.
[Service]
ExecStartPre=+{SBIN}/kimi-caddy-env
EnvironmentFile=-/run/kimi-fleet/caddy.env
# The access log (fail2ban reads it) lives in /var/log/caddy, owned by Caddy's user.
LogsDirectory=caddy
# The packaged unit runs `caddy run --environ`, which prints the environment (the key) to the journal.
ExecStart=
ExecStart=/usr/bin/caddy run --config {CADDYFILE} --adapter caddyfile
# `admin off` leaves nothing to reload: apply a new Caddyfile with `systemctl restart caddy`.
ExecReload=
"""


def _setting(key: str, value: str) -> str:
    if key not in NODE_SETTINGS_KEYS:
        raise ValueError(f"node.env: {key} is not a known setting")
    return f"{key}={plain_value(key, value)}"


def _node_env(r: Resolved, launch: Launch, sizing: Sizing, secrets: SecretsSource,
              ebs_volume_id: str | None) -> str:
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
        "CHECKPOINT_BYTES": str(r.checkpoint.size_bytes),
    }
    lines = [f"# kimi-fleet node settings for stack {spec.stack} (no secrets: those are in {SECRETS_DIR})."]
    lines += [_setting(key, value) for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _stack_json(r: Resolved, launch: Launch, sizing: Sizing) -> str:
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
            {"index": i.index, "port": i.port, "gpus": list(i.device_ids), "health": i.probe.path}
            for i in launch.instances
        ],
        "weights": {"volume": r.weights_volume, "dir": launch.weights_host_dir, "source": spec.weights.source},
        "market": spec.capacity.effective_market,
        "expected_seconds": {"cold_start": sizing.cold_start_seconds, "warm_start": sizing.warm_start_seconds},
        "log": "/var/log/kimi-fleet/bootstrap.log",
        "local_proxy": f"http://127.0.0.1:{LOCAL_PROXY_PORT}",
        "ready_file": READY_FILE,
        "watchdog": {"interval_seconds": WATCHDOG_INTERVAL_SECONDS, "failures": WATCHDOG_FAILURES,
                     "probe_timeout_seconds": WATCHDOG_PROBE_TIMEOUT_SECONDS},
    }
    return json.dumps(facts, indent=2) + "\n"


def behind_load_balancer(r: Resolved) -> bool:
    """An AWS fleet: its NLB routes only to nodes whose ready listener says the watchdog admitted them."""
    return r.target.behind_load_balancer(r)


def render_caddyfile_for(r: Resolved, launch: Launch, *, release: str | None = None, **listener) -> str:
    """The stack's Caddyfile, stamping answers with `release`. `listener` (domain, tls, https_port,
    http_port, bind_host, access_log) lets a test run the same configuration on loopback."""
    options = {"domain": r.spec.domain, "tls": "acme", "acme_email": r.spec.acme_email,
               "access_log": node_guard.ACCESS_LOG, "local_port": LOCAL_PROXY_PORT, "status_file": STATUS_FILE,
               **listener}
    if behind_load_balancer(r):
        options = {"ready_port": READY_PORT, "ready_file": READY_FILE, **options}
    return render_caddyfile(
        options.pop("domain"), launch.upstreams, launch.health_path, api_key_env=CADDY_API_KEY_ENV,
        release=release, **options,
    )


def files_digest(files: dict[str, NodeFile]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        f = files[path]
        digest.update(f"{path}\0{f.mode:o}\0{len(f.content)}\0".encode() + f.content.encode())
    return digest.hexdigest()[:16]


def node_release(r: Resolved, launch: Launch, sizing: Sizing) -> str:
    """The release id of what runs on the stack's nodes: the digest of the node files as the planner
    renders them (deploy-time ids such as the EBS volume as placeholders, the Caddyfile without its
    own stamp). The same stack file and catalog give the same id in `plan` and under `pulumi up`;
    any change to an image, flag, unit, script or the Caddyfile gives a new one."""
    aws = r.spec.target.aws
    secrets = (SecretsSource.ssm(aws.ssm_prefix or default_ssm_prefix(r.spec.stack), aws.region, hf_token=False)
               if r.target.secrets_from_ssm else SecretsSource("files"))
    ebs = EBS_VOLUME_PLACEHOLDER if r.weights_volume == "ebs" else None
    return files_digest(_render_files(r, launch, sizing, secrets=secrets, ebs_volume_id=ebs, release=None))


def render_node_files(r: Resolved, launch: Launch, sizing: Sizing, *, secrets: SecretsSource,
                      ebs_volume_id: str | None = None) -> dict[str, NodeFile]:
    """Every file a node needs, keyed by its absolute path, stamped with the stack's release."""
    return _render_files(r, launch, sizing, secrets=secrets, ebs_volume_id=ebs_volume_id,
                         release=node_release(r, launch, sizing))


def _render_files(r: Resolved, launch: Launch, sizing: Sizing, *, secrets: SecretsSource,
                  ebs_volume_id: str | None, release: str | None) -> dict[str, NodeFile]:
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
        NodeFile(NODE_STATUS, node_script("node_status.py"), 0o644),
        NodeFile(APPLY_RELEASE, node_script("apply_release.py"), 0o644),
        NodeFile(f"{UNIT_DIR}/kimi-watchdog.service", _watchdog_unit(len(launch.instances)), 0o644),
        NodeFile(f"{UNIT_DIR}/kimi-watchdog.timer", WATCHDOG_TIMER, 0o644),
        NodeFile(f"{UNIT_DIR}/kimi-engine@.service", _engine_unit(r), 0o644),
        NodeFile(f"{UNIT_DIR}/caddy.service.d/kimi-fleet.conf", CADDY_OVERRIDE, 0o644),
        NodeFile(CADDYFILE, render_caddyfile_for(r, launch, release=release), 0o644),
        NodeFile(node_guard.FAIL2BAN_FILTER_PATH, node_guard.render_fail2ban_filter(), 0o644),
        NodeFile(node_guard.FAIL2BAN_JAIL_PATH, node_guard.render_fail2ban_jail(), 0o644),
        NodeFile(NODE_ENV_FILE, _node_env(r, launch, sizing, secrets, ebs_volume_id), 0o644),
        NodeFile(f"{ENV_DIR}/stack.json", _stack_json(r, launch, sizing), 0o644),
    ]
    host = r.spec.target.host
    if host is not None:
        # Only a machine you already have gets the host firewall: AWS nodes have security groups.
        files += [
            NodeFile(node_guard.FIREWALL_RULES_PATH, node_guard.render_firewall(
                enabled=host.firewall, ssh_port=host.port, ssh_allowlist=host.ssh_allowlist, stack=r.spec.stack,
            ), 0o644),
            NodeFile(f"{UNIT_DIR}/kimi-firewall.service", node_guard.FIREWALL_UNIT, 0o644),
        ]
    files += [NodeFile(i.env_file_path, render_env_file(launch, i, r.spec.stack), 0o644) for i in launch.instances]
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


def render_user_data(r: Resolved, launch: Launch, sizing: Sizing, *, ssm_prefix: str, region: str,
                     ebs_volume_id: str | None = None, hf_token: bool = False,
                     api_key_version: int | None = None) -> str:
    """A #cloud-config document holding the node files (plain text, for review); EC2 gets
    `user_data_bytes` of it. Secrets appear only as SSM parameter names (and the key's version)."""
    secrets = SecretsSource.ssm(ssm_prefix, region, hf_token=hf_token, api_key_version=api_key_version)
    files = render_node_files(r, launch, sizing, secrets=secrets, ebs_volume_id=ebs_volume_id)
    text = _cloud_config(files)
    size = len(user_data_bytes(text))
    if size > EC2_USER_DATA_LIMIT:
        raise ValueError(
            f"stack {r.spec.stack}: user data is {size} bytes even compressed; EC2 accepts "
            f"{EC2_USER_DATA_LIMIT}. Move large files to an S3 object the bootstrap fetches."
        )
    return text


# --- releases applied in place (AWS single node) --------------------------------------------------

#: Pulumi waits for a bootstrap through two full download attempts (it resumes) plus package setup.
BOOTSTRAP_ATTEMPTS_WAITED = 2
BOOTSTRAP_SETUP_SECONDS = 30 * 60


def bootstrap_timeout_seconds(sizing: Sizing) -> int:
    attempt = max(sizing.download_seconds * DOWNLOAD_ATTEMPT_SLACK, MIN_DOWNLOAD_ATTEMPT_SECONDS)
    return attempt * BOOTSTRAP_ATTEMPTS_WAITED + BOOTSTRAP_SETUP_SECONDS


def release_pointer(ssm_prefix: str) -> str:
    """The SSM parameter naming the node's current release bundle (under the stack's prefix, which
    the node's role may already read)."""
    return f"{ssm_prefix.rstrip('/')}/release"


def release_bundle(files: dict[str, NodeFile]) -> str:
    """Every node file as one JSON document, byte-for-byte deterministic: the object stored under
    its own SHA-256 and applied by apply_release.py."""
    entries = [{"path": f.path, "mode": f"0{f.mode:o}", "content": f.content} for _, f in sorted(files.items())]
    return json.dumps({"files": entries}, sort_keys=True, separators=(",", ":"))


def bundle_digest(bundle: str) -> str:
    return hashlib.sha256(bundle.encode()).hexdigest()


def render_boot_stub(*, pointer: str, region: str) -> str:
    """User data for a node that takes its releases in place: only the packages and the applier.
    It names the release pointer, not a release, so a new release leaves the launch template
    (and the instance) alone; the applier fetches whatever the pointer names at boot."""
    applier = NodeFile(APPLY_RELEASE, node_script("apply_release.py"), 0o644)
    return _cloud_config({applier.path: applier},
                         runcmd=[["python3", APPLY_RELEASE, "--pointer", pointer, "--region", region, "--boot"]])


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
    if aws is not None:
        ssm_prefix = aws.ssm_prefix or default_ssm_prefix(spec.stack)
        secrets = SecretsSource.ssm(ssm_prefix, aws.region, hf_token=False)
    else:
        secrets = SecretsSource("files")
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
    }
    if node_guard.FIREWALL_RULES_PATH in files:
        artifacts["firewall.nft"] = files[node_guard.FIREWALL_RULES_PATH].content
        artifacts["kimi-firewall.service"] = files[f"{UNIT_DIR}/kimi-firewall.service"].content
    for instance in launch.instances:
        artifacts[f"engine-{instance.index}.env"] = files[instance.env_file_path].content
        artifacts[f"engine-{instance.index}.argv.json"] = files[instance.argv_file_path].content
        artifacts[f"docker-run-engine-{instance.index}.sh"] = (
            "#!/bin/bash\n# The engine's container, as one command (what kimi-engine-run executes).\n"
            + docker_run_command(launch, instance) + "\n"
        )
    if spec.target.host is not None and spec.target.host.startup_script_only:
        artifacts["startup-script.yaml"] = render_startup_script(r, launch, sizing)
    if aws is not None:
        ssm_prefix = secrets.api_key_parameter.rsplit("/", 1)[0]
        if behind_load_balancer(r):  # a fleet's template carries the release
            artifacts["user-data.yaml"] = render_user_data(
                r, launch, sizing, ssm_prefix=ssm_prefix, region=aws.region, ebs_volume_id=ebs_volume_id)
        else:  # one node boots the applier; its release is the bundle of the files above
            artifacts["user-data.yaml"] = render_boot_stub(pointer=release_pointer(ssm_prefix), region=aws.region)
    return artifacts
