# shellcheck shell=sh
# What a host running some of this homeserver's workers needs from here
# (fabfile/guests.py): Synapse's generated files and the secrets its processes
# read, each as one record `F<TAB>name<TAB>base64`, and the Synapse image main
# runs as `I<TAB>reference`. Read only; the output goes to the operator's
# synapse-fabric over SSH and is never printed.
# Inputs: data, secrets (directories), server_name, turn_secret (a path or ""), project.
# shellcheck disable=SC2154 # inputs (fabfile/shell.py)
set -e
for f in "$data/homeserver.yaml" "$data/$server_name.signing.key" "$secrets/postgres_password" \
         "$secrets/replication_secret" "$secrets/redis_password"; do
  if [ ! -s "$f" ]; then
    echo "$server_name: $f is not there yet: deploy its own host first" >&2
    exit 3
  fi
done
emit() { printf 'F\t%s\t%s\n' "$1" "$(base64 -w0 < "$2")"; }
emit homeserver.yaml "$data/homeserver.yaml"
emit "$server_name.signing.key" "$data/$server_name.signing.key"
if [ -s "$data/$server_name.log.config" ]; then emit "$server_name.log.config" "$data/$server_name.log.config"; fi
for name in postgres_password replication_secret redis_password; do emit "$name" "$secrets/$name"; done
if [ -n "$turn_secret" ] && [ -s "$turn_secret" ]; then emit turn_shared_secret "$turn_secret"; fi
# (a stopped main too: its workers must not start another version meanwhile)
id=$(docker ps -aq --filter "label=com.docker.compose.project=$project" \
  --filter label=com.docker.compose.service=synapse | head -n 1)
if [ -n "$id" ]; then printf 'I\t%s\n' "$(docker inspect -f '{{.Config.Image}}' "$id")"; fi
