#!/bin/bash
# Hand the API key to Caddy as an environment variable, from the root-only secret file.
# Runs as root (ExecStartPre=+) before Caddy, which itself runs unprivileged.
set -euo pipefail
# shellcheck source=/dev/null
. "${KIMI_ROOT:-}__SETTINGS_LIBRARY__"
load_settings "${KIMI_ROOT:-}/etc/kimi-fleet/node.env"
key=$(<"${API_KEY_FILE:?}")
# An env file holds bare values: refuse anything that would need quoting.
# The stack and the secret are checked with the same rule when the key is set (kimi_fleet.caddy):
# this is the last line of defence, one line (never the key) in the journal and the node status.
if [[ ! $key =~ __API_KEY_PATTERN__ ]]; then
  reason="the API key in $API_KEY_FILE is not 16-256 characters of letters, digits and . _ ~ + / = - (Caddy reads a trailing * as a wildcard and braces as a placeholder); set such a key (kimi-fleet:apiKey or the secret) and restart caddy"
  echo "kimi-caddy-env: refused: $reason" >&2
  library="${KIMI_ROOT:-}__SETTINGS_LIBRARY__"
  python3 "${library%/*}/node_status.py" refuse caddy.service "$reason" || true
  exit 1
fi
mkdir -p /run/kimi-fleet
(umask 077; printf '%s=%s\n' __CADDY_KEY_ENV__ "$key" >/run/kimi-fleet/caddy.env.tmp)
mv /run/kimi-fleet/caddy.env.tmp /run/kimi-fleet/caddy.env
