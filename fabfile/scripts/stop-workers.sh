# shellcheck shell=sh
# Stop the named Synapse workers of a compose project on this host, if they run
# (fabfile/steps.py stop_elsewhere): workers about to start on another host, which
# must never run twice under one name (an event persister, a stream writer).
# Inputs: project, names (worker names: letters, digits, '-').
# shellcheck disable=SC2154 # inputs (fabfile/shell.py)
for name in $names; do
  ids=$(docker ps -q --filter "label=com.docker.compose.project=$project" \
    --filter "label=com.docker.compose.service=$name")
  if [ -n "$ids" ]; then
    # shellcheck disable=SC2086 # container IDs
    docker stop $ids >/dev/null
    echo "$name"
  fi
done
exit 0
