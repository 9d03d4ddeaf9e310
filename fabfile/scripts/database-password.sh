# shellcheck shell=sh
# An external database's password (inv database-password), after the prelude
# database.sh: stdin holds libpq's passfile line, then the CA that signed the
# server's certificate. The password is tried first (psql_db with these two as
# its passfile and CA); only when the server takes it does it replace
# secrets/pgpass.
# Inputs: secrets server_name synapse_uid, and database.sh's.
# shellcheck disable=SC2154,SC2034 # inputs (fabfile/shell.py); pgpass, db_ca: read by the prelude
set -e
umask 077
t=$(mktemp -d /run/sfab-db-password.XXXXXX)  # memory, not disk; root's
trap 'rm -rf "$t"' EXIT HUP INT TERM
IFS= read -r line
printf '%s\n' "$line" > "$t/pgpass"
cat > "$t/ca.pem"
pgpass="$t/pgpass"
db_ca="$t/ca.pem"
if ! out=$(echo 'SELECT 1;' | psql_db 2>&1); then
  printf '%s: %s:%s did not take the password (nothing was changed):\n%s\n' "$server_name" "$db_host" "$db_port" "$out" >&2
  exit 1
fi
mkdir -p "$secrets"
cp "$t/pgpass" "$secrets/pgpass.new"
chown "$synapse_uid" "$secrets/pgpass.new"
chmod 0400 "$secrets/pgpass.new"
mv -f "$secrets/pgpass.new" "$secrets/pgpass"
