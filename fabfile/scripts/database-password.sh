# shellcheck shell=sh
# An external database's password (inv database-password): stdin holds libpq's
# passfile line, then the CA that signed the server's certificate. The password is
# tried first (psql in a throwaway container of the PostgreSQL image, TLS
# verify-full); only when the server takes it does it replace secrets/pgpass.
# Inputs: secrets server_name synapse_uid db_host db_port pg_db pg_user pg_image.
# shellcheck disable=SC2154 # inputs (fabfile/shell.py)
set -e
umask 077
t=$(mktemp -d /run/sfab-db-password.XXXXXX)  # memory, not disk; root's
trap 'rm -rf "$t"' EXIT HUP INT TERM
IFS= read -r line
printf '%s\n' "$line" > "$t/pgpass"
cat > "$t/ca.pem"
if ! out=$(docker run --rm -e PGPASSFILE=/run/pgpass -v "$t/pgpass:/run/pgpass:ro" -v "$t/ca.pem:/run/db-ca.pem:ro" \
             "$pg_image" psql -X -q -At -w \
             "host=$db_host port=$db_port dbname=$pg_db user=$pg_user sslmode=verify-full sslrootcert=/run/db-ca.pem" \
             -c 'SELECT 1' 2>&1); then
  printf '%s: %s:%s did not take the password (nothing was changed):\n%s\n' "$server_name" "$db_host" "$db_port" "$out" >&2
  exit 1
fi
mkdir -p "$secrets"
cp "$t/pgpass" "$secrets/pgpass.new"
chown "$synapse_uid" "$secrets/pgpass.new"
chmod 0400 "$secrets/pgpass.new"
mv -f "$secrets/pgpass.new" "$secrets/pgpass"
