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
weights=${KIMI_ROOT:-}${WEIGHTS_DIR:?WEIGHTS_DIR comes from the engine env file}
if [[ ! -f $weights/__VERIFIED_MARKER__ ]]; then
  reason="weights in $WEIGHTS_DIR have no verified marker (__VERIFIED_MARKER__): the download did not finish or failed its check; see /var/log/kimi-fleet/bootstrap.log and run kimi-bootstrap again"
  echo "kimi-engine@$index refused to start: $reason" >&2
  python3 "${KIMI_ROOT:-}__NODE_STATUS__" refuse "kimi-engine@$index" "$reason" || true
  exit 1
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
