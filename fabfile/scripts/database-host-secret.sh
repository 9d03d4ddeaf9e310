# shellcheck shell=sh
# The password of a database this host runs for another host's homeserver
# (postgres.host), made ONCE here from /dev/urandom; never printed, never in argv,
# never replaced. The homeserver's host reads it when it lacks its passfile.
# Inputs: dir (the database's secrets), pgdata, server_name, postgres_uid.
# shellcheck disable=SC2154 # inputs (fabfile/shell.py)
umask 077
mkdir -p "$dir"
if [ ! -s "$dir/postgres_password" ]; then
  if [ -s "$pgdata/PG_VERSION" ]; then
    echo "$server_name: its database exists here but $dir/postgres_password is missing; restore it from a backup (a new password would lock Synapse out)" >&2
    exit 1
  fi
  head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40 > "$dir/postgres_password.tmp"
  mv -f "$dir/postgres_password.tmp" "$dir/postgres_password"
fi
chown "$postgres_uid" "$dir/postgres_password" && chmod 0400 "$dir/postgres_password"
