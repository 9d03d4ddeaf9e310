# shellcheck shell=sh
# After the prelude database.sh: does this host reach the homeserver's database
# (and does it take the password)? Exits non-zero, psql's message on stderr, if not.
echo 'SELECT 1;' | psql_db >/dev/null
