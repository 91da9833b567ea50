
# Everything the bootstrap does is appended here, timestamped: `tail -f` it during a cold start.
ROOT="${KIMI_ROOT:-/}"
ROOT="${ROOT%/}"
LOG="$ROOT/var/log/kimi-fleet/bootstrap.log"
mkdir -p "${LOG%/*}"
log() { printf '%s [%s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${0##*/}" "$*" | tee -a "$LOG" >&2; }
run() { log "+ $*"; "$@" >>"$LOG" 2>&1; }
