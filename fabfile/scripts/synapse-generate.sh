# shellcheck shell=sh
# Synapse's own `generate` (config, signing key, secrets) unless its output is
# already there: an existing config or key is never overwritten. The image's
# start.py writes the log config as root and chowns only the data directory
# itself, so the data is then given to 991:991 (fabfile/synapse.py).
# Inputs: root (the homeserver's directory), server_name, compose (its command).
# shellcheck disable=SC2154 # inputs (fabfile/shell.py)
cd "$root" || exit 1
if [ -s data/homeserver.yaml ] && [ -s "data/$server_name.signing.key" ]; then exit 0; fi
# shellcheck disable=SC2086 # $compose is one or two words
$compose run --rm --no-deps -T synapse generate </dev/null || exit 1
if ! [ -s data/homeserver.yaml ] || ! [ -s "data/$server_name.signing.key" ]; then
  echo "$server_name: Synapse's generate wrote no homeserver.yaml or signing key" >&2
  exit 1
fi
