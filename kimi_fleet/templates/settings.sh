# kimi-fleet: the node settings loader (a library: `source`d by the node's scripts).
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

# The verified-marker line this node's settings expect (kimi-download-weights writes it): the
# revision, and for a pipeline stage (PP_STAGE PP_STAGES PP_FIRST_LAYER PP_END_LAYER: all four
# integers, or none) "REVISION stage I/N layers A-B". Refuses anything else, on stderr.
weights_verified_as() {
  local setting given=0
  [[ -n ${MODEL_REVISION:-} ]] || { echo "MODEL_REVISION is not set" >&2; return 1; }
  for setting in PP_STAGE PP_STAGES PP_FIRST_LAYER PP_END_LAYER; do
    [[ -n ${!setting:-} ]] || continue
    [[ ${!setting} =~ ^(0|[1-9][0-9]{0,3})$ ]] || { echo "$setting must be a small integer" >&2; return 1; }
    given=$((given + 1))
  done
  if ((given == 0)); then
    printf '%s\n' "$MODEL_REVISION"
  elif ((given == 4 && PP_STAGE < PP_STAGES && PP_FIRST_LAYER < PP_END_LAYER)); then
    printf '%s stage %s/%s layers %s-%s\n' "$MODEL_REVISION" "$PP_STAGE" "$PP_STAGES" "$PP_FIRST_LAYER" \
      "$((PP_END_LAYER - 1))"
  else
    echo "PP_STAGE, PP_STAGES, PP_FIRST_LAYER and PP_END_LAYER: all four (a stage) or none" >&2
    return 1
  fi
}

# Whether the verified marker MARKER satisfies EXPECTED (weights_verified_as): one of its lines is
# EXPECTED, or the revision alone (the whole checkpoint verified, the marker of before stages: a
# superset of any stage's files, which loads, only slower).
weights_marker_accepts() {
  local marker=$1 expected=$2
  [[ -f $marker ]] && grep -qxF -e "$expected" -e "${expected%% *}" -- "$marker"
}
