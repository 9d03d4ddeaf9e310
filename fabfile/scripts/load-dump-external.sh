# shellcheck shell=sh
# A dump back into an external database (inv upgrade's way back), after
# fabfile/scripts/database.sh. The database cannot be dropped and made again as
# synapse-fabric's own is (the role may not create databases): its public schema is
# dropped and made again instead, in ONE transaction with the restore (a failure
# leaves the database as it was). That needs the role to own the schema and to
# create in the database. action=check says whether it can, and whether the client
# tools are as new as the server (pg_dump refuses a newer server); action=load does
# it with $dump, with forget=1 empties the one-time keys, and prints Synapse's
# schema version; with keep set, what the database held is dumped there first
# ("kept PATH"), so a restore over it loses nothing.
# Inputs: action dump forget keep server_name, and database.sh's.
# shellcheck disable=SC2154
set -eu
can=$(echo "SELECT pg_has_role(current_user, nspowner, 'MEMBER') AND has_database_privilege(current_database(), 'CREATE') FROM pg_namespace WHERE nspname = 'public';" | psql_db)
if [ "$can" != t ]; then
  echo "$server_name: the role $pg_user cannot drop and make again the public schema of $pg_db on $db_host (it must own that schema and may create in the database), so a dump cannot be put back there by itself; grant that (ALTER DATABASE $pg_db OWNER TO $pg_user) or upgrade by hand" >&2
  exit 3
fi
server=$(echo "SELECT current_setting('server_version_num')::int / 10000;" | psql_db)
tools=$(client pg_dump --version | sed -n 's/^pg_dump (PostgreSQL) \([0-9]*\).*/\1/p')
if [ -z "$tools" ] || [ "$tools" -lt "$server" ]; then
  echo "$server_name: $db_host runs PostgreSQL $server but the client tools' image ($pg_image) has pg_dump ${tools:-?}: set homeservers.$server_name.postgres.image to a PostgreSQL $server image (or newer)" >&2
  exit 3
fi
[ "$action" = load ] || exit 0
if [ ! -s "$dump" ]; then
  echo "$server_name: no dump at $dump; the database was not touched" >&2
  exit 1
fi
if [ -n "$keep" ] && [ "$(echo "SELECT count(*) FROM pg_tables WHERE schemaname = 'public';" | psql_db)" != 0 ]; then
  mkdir -p "${keep%/*}"
  pgdump -Fc > "$keep.tmp"
  mv -f "$keep.tmp" "$keep"
  echo "kept $keep"
fi
# COMMIT only after pg_restore read the whole dump: a stream cut short ends the
# session inside the transaction, which the server rolls back
rc=$(mktemp)
trap 'rm -f "$rc"' EXIT HUP INT TERM
{
  printf '%s\n' 'BEGIN;' 'DROP SCHEMA public CASCADE;' 'CREATE SCHEMA public;'
  if client pg_restore --no-owner --no-acl -f - < "$dump"; then echo 'COMMIT;'; echo ok > "$rc"; fi
} | client psql -X -q -w -v ON_ERROR_STOP=1 "$conninfo" -f - > /dev/null
if [ "$(cat "$rc")" != ok ]; then
  echo "$server_name: pg_restore could not read $dump; the database was left as it was" >&2
  exit 1
fi
if [ "$forget" = 1 ]; then echo 'TRUNCATE e2e_one_time_keys_json;' | psql_db; fi
echo 'SELECT version FROM schema_version;' | psql_db
