# shellcheck shell=sh
# Restart the named services of a compose project (fabfile/steps.py): they load
# the settings that changed. A container that was stopped meanwhile (a run cut
# short mid-restart: its `docker restart` goes on after its lock is released)
# starts again; a service with no container at all is made by `up`.
# Inputs: project, services (names: letters, digits, '-'), directory (the
# project's), compose (the host's compose command).
# Any failure (the engine's lookup too: no answer is not "no container") ends it
# non-zero, so the run reports it and the change stays owed.
# shellcheck disable=SC2154 # inputs (fabfile/shell.py)
set -e
ids=""
missing=""
for service in $services; do
  id=$(docker ps -aq --filter "label=com.docker.compose.project=$project" \
    --filter "label=com.docker.compose.service=$service" \
    --filter "label=com.docker.compose.oneoff=False")
  if [ -n "$id" ]; then ids="$ids $id"; else missing="$missing $service"; fi
done
if [ -n "$ids" ]; then
  # shellcheck disable=SC2086 # container IDs
  docker restart $ids >/dev/null
fi
if [ -n "$missing" ]; then
  echo "no container for:$missing (made by up)"
  cd "$directory" || exit 1
  # shellcheck disable=SC2086 # the compose command is two words for v2
  $compose up -d --remove-orphans >/dev/null
fi
