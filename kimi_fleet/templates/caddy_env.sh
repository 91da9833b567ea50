#!/bin/bash
# Hand the API key (and, during a rotation, the previous key) to Caddy as environment variables,
# from the root-only secret files. Runs as root (ExecStartPre=+) before Caddy, which itself runs
# unprivileged.
set -euo pipefail
# shellcheck source=/dev/null
. "${KIMI_ROOT:-}__SETTINGS_LIBRARY__"
load_settings "${KIMI_ROOT:-}/etc/kimi-fleet/node.env"

# An env file holds bare values: refuse anything that would need quoting.
# The stack and the secret are checked with the same rule when the key is set (kimi_fleet.caddy):
# this is the last line of defence, one line (never the key) in the journal and the node status.
checked_key() {
  local file=$1 key
  key=$(<"$file")
  if [[ ! $key =~ __API_KEY_PATTERN__ ]]; then
    reason="the API key in $file is not 16-256 characters of letters, digits and . _ ~ + / = - (Caddy reads a trailing * as a wildcard and braces as a placeholder); set such a key (kimi-fleet:apiKey, kimi-fleet:apiKeyPrevious or the secret) and restart caddy"
    echo "kimi-caddy-env: refused: $reason" >&2
    library="${KIMI_ROOT:-}__SETTINGS_LIBRARY__"
    python3 "${library%/*}/node_status.py" refuse caddy.service "$reason" || true
    exit 1
  fi
  printf '%s' "$key"
}

key=$(checked_key "${API_KEY_FILE:?}")
previous=""
# A rotation that accepts the previous key: Caddy's configuration names its variable, and an empty
# one refuses every request (fail closed), so a missing file is a refusal here, not a silent gap.
if [[ -n ${PREVIOUS_API_KEY_FILE:-} ]]; then
  previous=$(checked_key "$PREVIOUS_API_KEY_FILE")
fi
# A host's scrape endpoint has its own key. Missing, the endpoint refuses every request (its site
# fails closed on an empty key); the tenants' endpoint is not held up for it.
metrics=""
if [[ -n ${METRICS_KEY_FILE:-} ]]; then
  if [[ -s $METRICS_KEY_FILE ]]; then
    metrics=$(checked_key "$METRICS_KEY_FILE")
  else
    echo "kimi-caddy-env: $METRICS_KEY_FILE is missing: the scrape endpoint refuses every request until it is there" >&2
  fi
fi
# Under $KIMI_ROOT in tests (unset on a node): two tests running at once never share one file.
run_dir="${KIMI_ROOT:-}/run/kimi-fleet"
mkdir -p "$run_dir"
(
  umask 077
  printf '%s=%s\n' __CADDY_KEY_ENV__ "$key" >"$run_dir/caddy.env.tmp"
  if [[ -n $previous ]]; then printf '%s=%s\n' __CADDY_PREVIOUS_KEY_ENV__ "$previous" >>"$run_dir/caddy.env.tmp"; fi
  if [[ -n $metrics ]]; then printf '%s=%s\n' __CADDY_METRICS_KEY_ENV__ "$metrics" >>"$run_dir/caddy.env.tmp"; fi
)
mv "$run_dir/caddy.env.tmp" "$run_dir/caddy.env"
