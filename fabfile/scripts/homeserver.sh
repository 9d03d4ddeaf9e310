# shellcheck shell=sh
# The start of every program that works on one running homeserver (users.sh,
# admin-api.sh): its Synapse and PostgreSQL containers ($syn, $pg, found by compose's
# labels, whichever compose flavour made them) and psql() on its database.
# Inputs (fabfile/shell.py): project server_name pg_user pg_db.
# shellcheck disable=SC2154,SC2034
syn=$(docker ps -q --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.service=synapse)
pg=$(docker ps -q --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.service=postgres)
if [ -z "$syn" ] || [ -z "$pg" ]; then
  echo "$server_name is not running on this host (run inv deploy)" >&2
  exit 4
fi

# SQL on stdin; values reach it as psql variables (\set), which psql quotes
psql() {
  docker exec -i "$pg" psql -X -q -At -v ON_ERROR_STOP=1 -U "$pg_user" -d "$pg_db" -f -
}
