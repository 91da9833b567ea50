#!/bin/sh
# The wake front's readiness (kimi_fleet/k8s_wake.py): Ready exactly while NO engine pod is Ready.
# usage: wake_ready.sh NAME STATE_FILE
#   NAME        the headless Service of the engine pods (publishNotReadyAddresses false): it resolves to
#               the addresses of the Ready ones only
#   STATE_FILE  the last verdict, for an answer the resolver could not give
# Exit 0 (the front joins the public Service) when the cluster's DNS says the name has no address
# (NXDOMAIN, or no A record); exit 1 (the front leaves it) when the name has an address. When the
# resolver gives neither (timeout, refused), the last verdict stands: a DNS blip neither puts the front
# beside serving engines nor takes it away at zero; with no verdict yet the front stays out.
# busybox sh and busybox nslookup (the Caddy image's Alpine base); the output formats are busybox's
# (tests/test_k8s_wake.py runs this file against them).
name=$1
state=$2
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
[ "$verdict" = none ]
