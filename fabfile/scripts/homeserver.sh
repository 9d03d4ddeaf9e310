# shellcheck shell=sh
# The start of every program that works on one running homeserver (users.sh,
# admin-api.sh), after fabfile/scripts/database.sh: its Synapse container ($syn),
# found by compose's labels whichever compose flavour made it, and psql() on its
# database. Inputs: project server_name, and database.sh's.
# shellcheck disable=SC2154,SC2034
syn=$(docker ps -q --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.service=synapse)
if [ -z "$syn" ]; then
  echo "$server_name is not running on this host (run inv deploy)" >&2
  exit 4
fi

# SQL on stdin; values reach it as psql variables (\set), which psql quotes
psql() { psql_db; }
