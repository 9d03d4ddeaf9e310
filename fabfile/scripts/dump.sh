# shellcheck shell=sh
# A consistent dump of one homeserver's database into $staging (0700):
# database.pgdump (pg_dump's custom format) and schema-version (Synapse's). It goes
# beside the data and is refused before anything is written when it cannot fit.
# Inputs (fabfile/shell.py): project server_name staging, the database's
#   (fabfile/database.py: pg_user pg_db external, and for an external one db_host
#   db_port db_ca db_ca_mount pgpass pg_image: pg_dump runs in a throwaway container
#   of the PostgreSQL image, TLS verify-full), and
#   one_time_keys=no   leave out e2e_one_time_keys_json's rows (Synapse's backup
#                      guide: a restored backup must not hand out used keys)
#   cleanup=yes        remove $staging when the program ends (a backup's dump)
# shellcheck disable=SC2154
set -eu
umask 077
if [ "${external:-}" = 1 ]; then
  # the client tools: psql or pg_dump, in a container that reaches the server over TLS
  client() {
    docker run --rm -i -e PGPASSFILE=/run/secrets/pgpass -v "$pgpass:/run/secrets/pgpass:ro" \
      -v "$db_ca:$db_ca_mount:ro" "$pg_image" "$@"
  }
  conninfo="host=$db_host port=$db_port dbname=$pg_db user=$pg_user sslmode=verify-full sslrootcert=$db_ca_mount"
  sql() { client psql -X -q -At -w -v ON_ERROR_STOP=1 "$conninfo" -c "$1"; }
  pgdump() { client pg_dump -w -d "$conninfo" "$@"; }
else
  pg=$(docker ps -q --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.service=postgres)
  if [ -z "$pg" ]; then
    echo "$server_name's database is not running on this host: nothing consistent to dump (run inv deploy)" >&2
    exit 4
  fi
  sql() { docker exec -i "$pg" psql -X -q -At -v ON_ERROR_STOP=1 -U "$pg_user" -d "$pg_db" -c "$1"; }
  pgdump() { docker exec "$pg" pg_dump -U "$pg_user" -d "$pg_db" "$@"; }
fi
mkdir -p "$staging"
chmod 0700 "$staging"
need=$(sql "SELECT pg_database_size(current_database())")
free=$(df -P -B1 "$staging" | awk 'NR == 2 { print $4 }')
if [ "$free" -le "$need" ]; then
  echo "not enough free space for $server_name's database dump in $staging: $free bytes free," \
       "the database takes $need" >&2
  exit 5
fi
if [ "${cleanup:-no}" = yes ]; then trap 'rm -rf "$staging"' EXIT; fi
set -- -Fc
if [ "${one_time_keys:-yes}" = no ]; then set -- "$@" --exclude-table-data=e2e_one_time_keys_json; fi
pgdump "$@" > "$staging/database.pgdump.new"
mv "$staging/database.pgdump.new" "$staging/database.pgdump"
sql "SELECT version FROM schema_version" > "$staging/schema-version"
