#!/bin/sh
# Stream a homeserver's database from its running PostgreSQL into the new cluster
# ($name): pg_dump's custom format into pg_restore, in one transaction, no copy on
# disk. Fails when either side fails.
# Inputs (fabfile/shell.py): project name pg_user pg_db
# shellcheck disable=SC2154
set -eu
old=$(docker ps -q --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.service=postgres)
[ -n "$old" ] || { echo "the old PostgreSQL is not running" >&2; exit 4; }
rc=$(mktemp)
trap 'rm -f "$rc"' EXIT
{ docker exec "$old" pg_dump -Fc -U "$pg_user" -d "$pg_db"; echo $? > "$rc"; } \
  | docker exec -i "$name" pg_restore -U "$pg_user" -d "$pg_db" --no-owner --exit-on-error --single-transaction
[ "$(cat "$rc")" = 0 ] || { echo "pg_dump failed" >&2; exit 1; }
