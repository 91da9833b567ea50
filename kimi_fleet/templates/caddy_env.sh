#!/bin/bash
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
