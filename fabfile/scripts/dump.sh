# shellcheck shell=sh
# A consistent dump of one homeserver's database into $staging (0700):
# database.pgdump (pg_dump's custom format) and schema-version (Synapse's). It goes
# beside the data and is refused before anything is written when it cannot fit.
# After fabfile/scripts/database.sh (psql_db, pgdump). Inputs (fabfile/shell.py):
#   project server_name staging, database.sh's, and
#   one_time_keys=no   leave out e2e_one_time_keys_json's rows (Synapse's backup
#                      guide: a restored backup must not hand out used keys)
#   cleanup=yes        remove $staging when the program ends (a backup's dump)
# shellcheck disable=SC2154
set -eu
umask 077
sql() { printf '%s\n' "$1" | psql_db; }
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
