#!/bin/sh
# A new PostgreSQL cluster beside a homeserver's running one (fabfile/pg_upgrade.py):
# the new major's image on $root/postgres-new, initialised as the first one was
# (UTF8, C collation and ctype; the same role, database and password file), in a
# container of its own with no network; waits until its real server (not
# initdb's temporary one) answers on TCP.
# Inputs (fabfile/shell.py): root image name pg_user pg_db
# shellcheck disable=SC2154
set -eu
docker rm -f "$name" >/dev/null 2>&1 || true
rm -rf "$root/postgres-new"
mkdir -p "$root/postgres-new"
docker run -d --name "$name" --network none \
  -e POSTGRES_USER="$pg_user" -e POSTGRES_DB="$pg_db" -e POSTGRES_PASSWORD_FILE=/run/secrets/postgres_password \
  -e POSTGRES_INITDB_ARGS="-E UTF8 --lc-collate=C --lc-ctype=C" \
  -v "$root/postgres-new:/var/lib/postgresql/data" \
  -v "$root/secrets/postgres_password:/run/secrets/postgres_password:ro" \
  "$image" >/dev/null
for _ in $(seq 120); do
  docker exec "$name" pg_isready -q -h 127.0.0.1 -U "$pg_user" && exit 0
  sleep 1
done
echo "the new PostgreSQL did not start:" >&2
docker logs --tail 20 "$name" >&2
exit 1
