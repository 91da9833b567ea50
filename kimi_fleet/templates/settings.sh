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

__WEIGHTS_MARKER_FUNCTIONS__