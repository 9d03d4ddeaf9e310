# shellcheck shell=sh
# One homeserver's database password, made ONCE on the host from its own
# /dev/urandom, and the libpq passfile Synapse reads (fabfile/synapse.py). Never
# printed, never in argv; an existing secret is never replaced.
# Inputs: dir (its secrets), pgdata, server_name, db, user, postgres_uid, synapse_uid,
# workers (1: the homeserver has workers), external (1: the database is the
# operator's: its passfile comes from `inv database-password`, nothing is made).
# shellcheck disable=SC2154 # inputs (fabfile/shell.py)
umask 077
mkdir -p "$dir"
if [ "$external" = 1 ]; then
  if [ ! -s "$dir/pgpass" ]; then
    echo "$server_name: its external database's password is not on this host yet: run inv database-password --homeserver $server_name" >&2
    exit 1
  fi
  chown "$synapse_uid" "$dir/pgpass" && chmod 0400 "$dir/pgpass"
elif [ ! -s "$dir/postgres_password" ] && [ -s "$pgdata/PG_VERSION" ]; then
  echo "$server_name: the database exists but secrets/postgres_password is missing; restore it from a backup (a new password would lock Synapse out)" >&2
  exit 1
fi
if [ "$external" != 1 ] && [ ! -s "$dir/postgres_password" ]; then
  head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40 > "$dir/postgres_password.tmp"
  mv -f "$dir/postgres_password.tmp" "$dir/postgres_password"
fi
if [ "$external" != 1 ] && [ ! -s "$dir/pgpass" ]; then
  { printf 'postgres:5432:%s:%s:' "$db" "$user"; cat "$dir/postgres_password"; printf '\n'; } > "$dir/pgpass.tmp"
  mv -f "$dir/pgpass.tmp" "$dir/pgpass"
fi
if [ "$external" != 1 ]; then
  chown "$postgres_uid" "$dir/postgres_password" && chmod 0400 "$dir/postgres_password"
  chown "$synapse_uid" "$dir/pgpass" && chmod 0400 "$dir/pgpass"
fi
if [ "$workers" = 1 ]; then
  # Workers: the replication secret every process checks, and Redis's password
  # (read by Synapse as 991 and by Redis as root in its container: 0440 root:991).
  for name in replication_secret redis_password; do
    if [ ! -s "$dir/$name" ]; then
      head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40 > "$dir/$name.tmp"
      mv -f "$dir/$name.tmp" "$dir/$name"
    fi
  done
  chown "$synapse_uid" "$dir/replication_secret" && chmod 0400 "$dir/replication_secret"
  chown "0:${synapse_uid#*:}" "$dir/redis_password" && chmod 0440 "$dir/redis_password"
fi
