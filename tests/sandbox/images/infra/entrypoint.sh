#!/bin/bash
# Run challtestsrv, dnsmasq and pebble; if any of them exits, stop the container
# (so a broken sandbox shows up in `docker ps` / the logs instead of half working).
set -euo pipefail

# Unknown names get NO answer (empty -defaultIPv4/-defaultIPv6), not 127.0.0.1:
# a name a test forgot to set fails loudly instead of pointing at the wrong host.
pebble-challtestsrv \
    -defaultIPv4 "" -defaultIPv6 "" \
    -dns01 :8053 -management :8055 \
    -http01 "" -https01 "" -tlsalpn01 "" &

dnsmasq --keep-in-foreground --conf-file=/etc/sfab/dnsmasq.conf &

# pebble looks up challenge names (and only those) through challtestsrv.
# No random validation delay; no injected badNonce errors unless asked for.
export PEBBLE_VA_NOSLEEP=1
export PEBBLE_WFE_NONCEREJECT="${PEBBLE_WFE_NONCEREJECT:-0}"
pebble -config /etc/sfab/pebble-config.json -dnsserver 127.0.0.1:8053 &

# The hosts' registry mirror (and this machine's push target, published on 127.0.0.1).
docker-registry serve /etc/sfab/registry.yml &

status=0
wait -n || status=$?
echo "sfab-infra: a service exited (status $status); stopping" >&2
exit "$status"
