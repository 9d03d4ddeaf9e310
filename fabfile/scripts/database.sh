# shellcheck shell=sh
# A homeserver's database, for the programs after this prelude: psql_db (SQL on
# stdin), pgdump ARGS and pgrestore ARGS (a dump on stdin). Its own PostgreSQL is
# the stack's container (found by compose's labels, whichever compose flavour made
# it); one elsewhere (external=1) is reached from a throwaway container of the
# PostgreSQL image: an external server over TLS that checks its name against
# db_ca, another inventory host's (db_ca empty) over the private network.
# Inputs (fabfile/database.py): project server_name pg_user pg_db external, and with
# external=1: db_host db_port db_ca db_ca_mount pgpass pg_image.
# shellcheck disable=SC2154,SC2317 # inputs; functions a program may not call
if [ "$external" = 1 ]; then
  conninfo="host=$db_host port=$db_port dbname=$pg_db user=$pg_user"
  if [ -n "$db_ca" ]; then
    conninfo="$conninfo sslmode=verify-full sslrootcert=$db_ca_mount"
    client() {
      docker run --rm -i -e PGPASSFILE=/run/secrets/pgpass -v "$pgpass:/run/secrets/pgpass:ro" \
        -v "$db_ca:$db_ca_mount:ro" "$pg_image" "$@"
    }
  else  # another inventory host's, on the private network
    conninfo="$conninfo sslmode=disable"
    client() {
      docker run --rm -i -e PGPASSFILE=/run/secrets/pgpass -v "$pgpass:/run/secrets/pgpass:ro" "$pg_image" "$@"
    }
  fi
  psql_db() { client psql -X -q -At -w -v ON_ERROR_STOP=1 "$conninfo" -f -; }
  pgdump() { client pg_dump -w -d "$conninfo" "$@"; }
  pgrestore() { client pg_restore -w -d "$conninfo" "$@"; }
else
  pg=$(docker ps -q --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.service=postgres)
  if [ -z "$pg" ]; then
    echo "$server_name's database is not running on this host (run inv deploy)" >&2
    exit 4
  fi
  psql_db() { docker exec -i "$pg" psql -X -q -At -v ON_ERROR_STOP=1 -U "$pg_user" -d "$pg_db" -f -; }
  pgdump() { docker exec "$pg" pg_dump -U "$pg_user" -d "$pg_db" "$@"; }
  pgrestore() { docker exec -i "$pg" pg_restore -U "$pg_user" -d "$pg_db" "$@"; }
fi
