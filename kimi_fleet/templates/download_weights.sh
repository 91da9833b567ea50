#!/bin/bash
# Download the pinned revision into WEIGHTS_DIR, resumably, and verify every file's size and
# content (SHA-256 of LFS files, git blob SHA-1 of the rest) against the repository tree at that
# revision, or, from the S3 mirror, every file's SHA-256 against the mirror's manifest (no Hub
# call), which is refused unless its SHA-256 is MIRROR_MANIFEST_SHA256 (the deployer checked that
# manifest against the Hub and pinned it in node.env). A verified marker holding the revision makes a
# re-run a no-op. The Hugging Face token is read from HF_TOKEN_FILE and never printed.
# A node of a multi-node replica (PP_STAGE, PP_STAGES, PP_FIRST_LAYER, PP_END_LAYER: integers) fetches
# and verifies the small files and only the shards its pipeline stage loads, picked from the
# checkpoint's own index (weights_manifest.py stage_files); its marker records the stage, so a node
# whose stage changed fetches again. A marker holding the revision alone (the whole checkpoint
# verified, as before stages) satisfies any stage of that revision: a superset loads, only slower.
# WEIGHTS_DIR == KEEP_WEIGHTS_DIR (an in-place release: the running release serves this very
# directory): its marker is never removed and no shard is pruned while the download runs; the stage's
# files are verified and the marker rewritten (temp + mv) only after success, keeping the lines of
# the stages it already vouched for (their shards are all still there).
# Before a download, older checkpoints under WEIGHTS_ROOT are removed if the volume lacks room.
set -euo pipefail
: "${WEIGHTS_DIR:?}" "${WEIGHTS_ROOT:?}" "${CHECKPOINT_BYTES:?}" "${MODEL_REPO:?}" "${MODEL_REVISION:?}" \
  "${WEIGHTS_SOURCE:?}"
MARKER="$WEIGHTS_DIR/__VERIFIED_MARKER__"
ATTEMPTS="${DOWNLOAD_ATTEMPTS:-5}"
ATTEMPT_TIMEOUT="${DOWNLOAD_ATTEMPT_TIMEOUT:-7200}"
MANIFEST_TOOL="${WEIGHTS_MANIFEST_TOOL:-${KIMI_ROOT:-}__MANIFEST_TOOL__}"
FETCH_TOOL="${WEIGHTS_FETCH_TOOL:-${KIMI_ROOT:-}__FETCH_TOOL__}"
ROOM_TOOL="${WEIGHTS_ROOM_TOOL:-${KIMI_ROOT:-}__ROOM_TOOL__}"

# shellcheck disable=SC2153 # the PP_* settings come from the environment (the node's settings)
__WEIGHTS_MARKER_FUNCTIONS__
STAGE_ARGS=()
# The revision, or for a pipeline stage (all four PP_* integers) its line; anything else refused.
VERIFIED_AS=$(weights_verified_as) || { echo "weights: no revision and stage to verify as" >&2; exit 1; }
if [[ -n ${PP_STAGES:-} ]]; then
  STAGE_ARGS=(--stage "$PP_STAGE" --stages "$PP_STAGES" --first-layer "$PP_FIRST_LAYER" --end-layer "$PP_END_LAYER")
fi

# A line of the marker is this stage's, or the revision alone (the whole checkpoint: any stage's superset).
if weights_marker_accepts "$MARKER" "$VERIFIED_AS"; then
  touch "$MARKER"  # in use: the last checkpoint to be removed for room
  echo "weights $MODEL_REPO@$VERIFIED_AS already verified"
  exit 0
fi
SERVING=0 KEEP_ARGS=()
if [[ -n ${KEEP_WEIGHTS_DIR:-} && -d $KEEP_WEIGHTS_DIR && -d $WEIGHTS_DIR &&
  $(realpath -e -- "$KEEP_WEIGHTS_DIR") == $(realpath -e -- "$WEIGHTS_DIR") ]]; then
  SERVING=1
  echo "weights: $WEIGHTS_DIR is the serving checkpoint: its marker stays and no shard is removed"
  ((${#STAGE_ARGS[@]} == 0)) || KEEP_ARGS=(--keep-other-shards)
else
  rm -f "$MARKER"  # another stage's (a re-layout): nothing may start on it while this one downloads
fi

# The marker, atomically and only after a verified download. In the serving directory the stage
# lines of this revision it already held stay (their shards were verified and nothing was removed).
write_marker() {
  local temporary="$MARKER.tmp" line
  {
    if ((SERVING)) && [[ -f $MARKER ]]; then
      while IFS= read -r line; do
        if [[ $line != "$VERIFIED_AS" && $line =~ ^(.+)\ stage\ [0-9]{1,4}/[0-9]{1,4}\ layers\ [0-9]{1,4}-[0-9]{1,4}$ &&
          ${BASH_REMATCH[1]} == "$MODEL_REVISION" ]]; then
          printf '%s\n' "$line"
        fi
      done < <(head -n 64 -- "$MARKER")
    fi
    printf '%s\n' "$VERIFIED_AS"
  } >"$temporary"
  mv -f -- "$temporary" "$MARKER"
}
# A new revision goes beside the old one (kept for a rollback) when the volume has room; otherwise
# older checkpoints go first, and a volume too small even then fails now, not an hour in.
# KEEP_WEIGHTS_DIR: the serving release's checkpoint (an in-place release), never removed.
mkdir -p "$WEIGHTS_DIR"
python3 "$ROOM_TOOL" --root "$WEIGHTS_ROOT" --target "$WEIGHTS_DIR" --need "$CHECKPOINT_BYTES" \
  ${KEEP_WEIGHTS_DIR:+--keep "$KEEP_WEIGHTS_DIR"}
printf '%s@%s\n' "$MODEL_REPO" "$MODEL_REVISION" >"$WEIGHTS_DIR/__CHECKPOINT_MARKER__"
if [[ -s ${HF_TOKEN_FILE:-} ]]; then
  HF_TOKEN=$(<"$HF_TOKEN_FILE")
  export HF_TOKEN
fi

fetch() {
  if [[ $WEIGHTS_SOURCE == s3-mirror ]]; then
    # s5cmd, parallel and resumable; refuses an unfilled mirror or another revision's manifest.
    local status=0
    timeout "$ATTEMPT_TIMEOUT" python3 "$FETCH_TOOL" --mirror "$S3_MIRROR_URI" --repo "$MODEL_REPO" \
      --revision "$MODEL_REVISION" --manifest-sha256 "${MIRROR_MANIFEST_SHA256:-}" --dir "$WEIGHTS_DIR" \
      "${STAGE_ARGS[@]}" || status=$?
    if ((status == __MIRROR_REFUSED__)); then
      echo "weights: the mirror was refused; retrying cannot help" >&2
      exit 1
    fi
    return $status
  fi
  # hf resumes partial files; a hung transfer is killed by timeout and resumed by the next attempt.
  if ((${#STAGE_ARGS[@]} == 0)); then
    HF_XET_HIGH_PERFORMANCE=1 timeout "$ATTEMPT_TIMEOUT" "${HF_CLI:-hf}" download "$MODEL_REPO" \
      --revision "$MODEL_REVISION" --local-dir "$WEIGHTS_DIR"
    return
  fi
  # A stage: the small files (the index among them), then the shards the index says the stage
  # loads, named one by one (exact names, an argv list: never a pattern, never word-split).
  local listed shards=()
  HF_XET_HIGH_PERFORMANCE=1 timeout "$ATTEMPT_TIMEOUT" "${HF_CLI:-hf}" download "$MODEL_REPO" \
    --revision "$MODEL_REVISION" --local-dir "$WEIGHTS_DIR" --exclude '*.safetensors' || return 1
  listed=$(python3 "$MANIFEST_TOOL" stage-files --dir "$WEIGHTS_DIR" --hub "$MODEL_REPO" "$MODEL_REVISION" \
    "${STAGE_ARGS[@]}") || return 1
  mapfile -t shards <<<"$listed"
  if [[ -z ${shards[0]:-} ]]; then
    echo "weights: the index names no shard for stage $PP_STAGE" >&2
    return 1
  fi
  echo "weights: stage $PP_STAGE/$PP_STAGES: ${#shards[@]} shard(s)"
  HF_XET_HIGH_PERFORMANCE=1 timeout "$ATTEMPT_TIMEOUT" "${HF_CLI:-hf}" download "$MODEL_REPO" "${shards[@]}" \
    --revision "$MODEL_REVISION" --local-dir "$WEIGHTS_DIR"
}

verify() {
  if [[ $WEIGHTS_SOURCE == s3-mirror ]]; then
    # The mirror's own manifest (every path, size and SHA-256, written last by the fill): no Hub call.
    python3 "$MANIFEST_TOOL" verify --dir "$WEIGHTS_DIR" --manifest "$WEIGHTS_DIR/__LOCAL_MANIFEST__" \
      --manifest-sha256 "${MIRROR_MANIFEST_SHA256:-}" "${STAGE_ARGS[@]}" "${KEEP_ARGS[@]}"
  else
    python3 "$MANIFEST_TOOL" verify --dir "$WEIGHTS_DIR" --hub "$MODEL_REPO" "$MODEL_REVISION" "${STAGE_ARGS[@]}" \
      "${KEEP_ARGS[@]}"
  fi
}

for ((attempt = 1; attempt <= ATTEMPTS; attempt++)); do
  echo "download attempt $attempt/$ATTEMPTS of $MODEL_REPO@$VERIFIED_AS ($WEIGHTS_SOURCE)"
  if fetch && verify; then
    write_marker
    echo "weights verified: $MARKER"
    exit 0
  fi
  sleep $((attempt * 20))
done
echo "weights download failed after $ATTEMPTS attempts" >&2
exit 1
