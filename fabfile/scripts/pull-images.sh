#!/bin/sh
# `docker pull` each of $refs on the host (its own registries and mirrors); print
# the references whose image ID changed (they were present before, now another).
# shellcheck disable=SC2154 # input: refs (fabfile/shell.py)
set -e
for r in $refs; do
  before=$(docker image inspect -f '{{.Id}}' "$r" 2>/dev/null || true)
  if ! out=$(docker pull -q "$r" 2>&1); then
    echo "could not pull $r: $out" >&2
    exit 1
  fi
  after=$(docker image inspect -f '{{.Id}}' "$r")
  if [ -n "$before" ] && [ "$before" != "$after" ]; then echo "$r"; fi
done
