#!/bin/sh
# The wake front's readiness (kimi_fleet/k8s_wake.py): Ready exactly while NO engine pod is Ready.
# usage: wake_ready.sh NAME STATE_FILE [CERTIFICATES DOMAIN PID]
#   NAME         the headless Service of the engine pods (publishNotReadyAddresses false): it resolves to
#                the addresses of the Ready ones only
#   STATE_FILE   the last verdict, for an answer the resolver could not give
#   CERTIFICATES (a public certificate) Caddy's certificates directory (<issuer>/<name>/<name>.crt),
#   DOMAIN       the site's name, and
#   PID          Caddy's process
# Exit 0 (the front joins the public Service) when the cluster's DNS says the name has no address
# (NXDOMAIN, or no A record); exit 1 (the front leaves it) when the name has an address. When the
# resolver gives neither (timeout, refused), the last verdict stands: a DNS blip neither puts the front
# beside serving engines nor takes it away at zero; with no verdict yet the front stays out.
# With CERTIFICATES: Caddy asks the CA for its certificate while the front may not be an endpoint (the
# CA's challenge then reaches an engine pod and fails) and backs off for longer after every failure.
# Alone (no engine Ready) and still without one RESTART_MINUTES after the probe first saw Caddy (or last
# restarted it), Caddy is restarted so that it asks again now, while the challenge reaches it.
# busybox sh and busybox nslookup (the Caddy image's Alpine base); the output formats are busybox's
# (tests/test_k8s_wake.py runs this file against them).
RESTART_MINUTES=10
name=$1
state=$2
certificates=$3
domain=$4
pid=$5
out=$(nslookup -type=a "$name" 2>&1)
case $out in
    *"Name:"*"Address"*) verdict=engine ;;
    *NXDOMAIN* | *"No answer"*) verdict=none ;;
    *) verdict=$(cat "$state" 2>/dev/null) || verdict=unknown ;;
esac
case $verdict in
    engine | none) echo "$verdict" > "$state.tmp" && mv "$state.tmp" "$state" ;;
esac
echo "wake front: engine ready=$verdict"
held=no
for found in "$certificates"/*/"$domain"/"$domain".crt; do
    [ -e "$found" ] && held=yes
done
asking=$state.asking
if [ -n "$certificates" ] && [ ! -e "$asking" ]; then
    touch "$asking"  # Caddy asks at its start: give it RESTART_MINUTES
elif [ "$verdict" = none ] && [ -n "$certificates" ] && [ "$held" = no ] \
        && [ -n "$(find "$asking" -mmin +$RESTART_MINUTES)" ]; then
    touch "$asking"
    echo "wake front: alone without a certificate: restarting Caddy so that it asks the CA now"
    kill "$pid"
fi
[ "$verdict" = none ]
