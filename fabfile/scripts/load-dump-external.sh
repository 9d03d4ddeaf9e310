# shellcheck shell=sh
# A dump back into an external database (inv upgrade's way back), after
# fabfile/scripts/database.sh. The database cannot be dropped and made again as
# synapse-fabric's own is (the role may not create databases): its public schema is
# dropped and made again instead, which needs the role to own it (PostgreSQL 15 and
# newer: to own the database). action=check says whether it can; action=load does it,
# pg_restores $dump, with forget=1 empties the one-time keys, and prints Synapse's
# schema version. Inputs: action dump forget server_name, and database.sh's.
# shellcheck disable=SC2154
set -eu
owner=$(echo "SELECT pg_has_role(current_user, nspowner, 'MEMBER') FROM pg_namespace WHERE nspname = 'public';" | psql_db)
if [ "$owner" != t ]; then
  echo "$server_name: the role $pg_user does not own the public schema of $pg_db on $db_host, so a dump cannot be put back there by itself; make it the owner (ALTER SCHEMA public OWNER TO $pg_user) or upgrade by hand" >&2
  exit 3
fi
[ "$action" = load ] || exit 0
printf '%s\n' 'DROP SCHEMA public CASCADE;' 'CREATE SCHEMA public;' | psql_db
pgrestore --no-owner --no-acl --exit-on-error --single-transaction < "$dump"
if [ "$forget" = 1 ]; then echo 'TRUNCATE e2e_one_time_keys_json;' | psql_db; fi
echo 'SELECT version FROM schema_version;' | psql_db
