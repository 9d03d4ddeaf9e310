# shellcheck shell=sh
# The start of every program that works on one running homeserver (users.sh,
# admin-api.sh): its Synapse container ($syn), found by compose's labels whichever
# compose flavour made it, and psql() on its database: in the stack's PostgreSQL
# container ($pg), or for an external database (external=1) in a throwaway
# container of the PostgreSQL image, over TLS that checks the server's name.
# Inputs (fabfile/database.py, fabfile/shell.py): project server_name pg_user pg_db
# external, and with external=1: db_host db_port db_ca db_ca_mount pgpass pg_image.
# shellcheck disable=SC2154,SC2034
syn=$(docker ps -q --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.service=synapse)
pg=""
if [ "$external" != 1 ]; then
  pg=$(docker ps -q --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.service=postgres)
fi
if [ -z "$syn" ] || { [ "$external" != 1 ] && [ -z "$pg" ]; }; then
  echo "$server_name is not running on this host (run inv deploy)" >&2
  exit 4
fi

# SQL on stdin; values reach it as psql variables (\set), which psql quotes
if [ "$external" = 1 ]; then
  psql() {
    docker run --rm -i -e PGPASSFILE=/run/secrets/pgpass -v "$pgpass:/run/secrets/pgpass:ro" \
      -v "$db_ca:$db_ca_mount:ro" "$pg_image" psql -X -q -At -w -v ON_ERROR_STOP=1 \
      "host=$db_host port=$db_port dbname=$pg_db user=$pg_user sslmode=verify-full sslrootcert=$db_ca_mount" -f -
  }
else
  psql() {
    docker exec -i "$pg" psql -X -q -At -v ON_ERROR_STOP=1 -U "$pg_user" -d "$pg_db" -f -
  }
fi
