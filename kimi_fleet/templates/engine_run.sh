#!/bin/bash
# Start engine N: its whole `docker run` command is a JSON list written by kimi-fleet
# (/etc/kimi-fleet/engine-N.argv.json), handed to exec one element per argument: nothing is
# split, globbed or evaluated on the way.
set -euo pipefail
index=${1:?usage: kimi-engine-run ENGINE_INDEX}
[[ $index =~ ^[0-9]+$ ]] || { echo "engine index must be a number, got $index" >&2; exit 1; }
argv_file="${KIMI_ROOT:-}/etc/kimi-fleet/engine-$index.argv.json"
# Weights the download did not finish verifying are never served: refuse in one line, in the
# journal and the node status (node_status.py, shipped by every release).
# The marker must say what this release verified: its revision and, on a node of a multi-node
# replica, its pipeline stage (node.env, read by the node's strict settings loader), or the revision
# alone (the whole checkpoint). A directory verified for another stage lacks shards this one loads.
weights=${KIMI_ROOT:-}${WEIGHTS_DIR:?WEIGHTS_DIR comes from the engine env file}
refuse() {
  echo "kimi-engine@$index refused to start: $1" >&2
  python3 "${KIMI_ROOT:-}__NODE_STATUS__" refuse "kimi-engine@$index" "$1" || true
  exit 1
}
# shellcheck source=/dev/null
. "${KIMI_ROOT:-}__SETTINGS_LIBRARY__"
if ! expected=$(load_settings "${KIMI_ROOT:-}/etc/kimi-fleet/node.env" 2>&1 && weights_verified_as 2>&1); then
  refuse "node settings /etc/kimi-fleet/node.env do not say which weights to expect: ${expected//$'\n'/; }"
fi
if [[ ! -f $weights/__VERIFIED_MARKER__ ]]; then
  refuse "weights in $WEIGHTS_DIR have no verified marker (__VERIFIED_MARKER__): the download did not finish or failed its check; see /var/log/kimi-fleet/bootstrap.log and run kimi-bootstrap again"
fi
if ! weights_marker_accepts "$weights/__VERIFIED_MARKER__" "$expected"; then
  seen=$(head -c 200 "$weights/__VERIFIED_MARKER__" | tr '\n' ';' | tr -c '[:alnum:] ./:;@-' '?')
  refuse "weights in $WEIGHTS_DIR were verified as '${seen%;}', not '$expected' (another revision or pipeline stage: not every shard this engine loads is there); run kimi-bootstrap again"
fi
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
