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
