#!/bin/sh
# The row count of every table of a homeserver's database, "table<TAB>count" per
# line, from the container named $name, or else compose project $project's postgres.
# Inputs (fabfile/shell.py): name or project, pg_user pg_db
# shellcheck disable=SC2154
set -eu
container=${name:-}
if [ -z "$container" ]; then
  container=$(docker ps -q --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.service=postgres)
fi
[ -n "$container" ] || { echo "no PostgreSQL container to count rows in" >&2; exit 4; }
query=$(docker exec "$container" psql -X -At -U "$pg_user" -d "$pg_db" -c \
  "SELECT string_agg(format('SELECT %L || chr(9) || count(*) FROM public.%I', tablename, tablename), ' UNION ALL ' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'")
docker exec "$container" psql -X -At -U "$pg_user" -d "$pg_db" -c "$query"
docker exec "$container" psql -X -At -U "$pg_user" -d "$pg_db" -c \
  "SELECT 'synapse schema version' || chr(9) || version FROM schema_version"
