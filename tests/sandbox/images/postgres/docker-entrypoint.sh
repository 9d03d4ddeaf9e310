#!/usr/bin/env bash
# Entrypoint of the sandbox's stand-in for the official postgres image.
#
# `postgres [ARGS]` (the default): on first start (no $PGDATA/PG_VERSION) create the
# cluster from POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB / POSTGRES_INITDB_ARGS
# (each may come from a *_FILE instead), allow password logins over TCP, create the
# database, run /docker-entrypoint-initdb.d/*, then run the server as user postgres.
# Any other command (psql, pg_dump, bash, ...) is run as given.
set -Eeuo pipefail

die() { echo "error: $*" >&2; exit 1; }

# VAR may be given directly or as VAR_FILE (a path whose content is the value).
from_env_or_file() {
	local var="$1" default="${2:-}" file_var="${1}_FILE" value
	if [ -n "${!var:-}" ] && [ -n "${!file_var:-}" ]; then
		die "both $var and $file_var are set; use one of them"
	fi
	value="$default"
	if [ -n "${!var:-}" ]; then
		value="${!var}"
	elif [ -n "${!file_var:-}" ]; then
		value="$(< "${!file_var}")"
	fi
	export "$var"="$value"
	unset "$file_var"
}

prepare_dirs() {
	mkdir -p "$PGDATA" /var/run/postgresql
	chmod 3777 /var/run/postgresql 2>/dev/null || :
	if [ "$(id -u)" = 0 ]; then
		find "$PGDATA" \! -user postgres -exec chown postgres:postgres '{}' +
		chown postgres:postgres /var/run/postgresql
	fi
	chmod 0700 "$PGDATA" 2>/dev/null || :
	if [ -n "${POSTGRES_INITDB_WALDIR:-}" ]; then
		mkdir -p "$POSTGRES_INITDB_WALDIR"
		[ "$(id -u)" != 0 ] || chown -R postgres:postgres "$POSTGRES_INITDB_WALDIR"
		chmod 0700 "$POSTGRES_INITDB_WALDIR"
	fi
}

psql_init() {
	psql -v ON_ERROR_STOP=1 --no-psqlrc --no-password --username "$POSTGRES_USER" "$@"
}

init_cluster() {
	local auth="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" pwfile f
	if [ -z "$POSTGRES_PASSWORD" ] && [ "$auth" != trust ]; then
		die "the database is uninitialized and no superuser password is set.
Set POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) to a non-empty value, or
POSTGRES_HOST_AUTH_METHOD=trust to allow every connection without a password."
	fi

	# The password goes to initdb through a private file, never on a command line.
	pwfile="$(mktemp)"
	printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
	# shellcheck disable=SC2034 # used inside the eval below
	local waldir=()
	# shellcheck disable=SC2034
	[ -z "${POSTGRES_INITDB_WALDIR:-}" ] || waldir=(--waldir "$POSTGRES_INITDB_WALDIR")
	# POSTGRES_INITDB_ARGS is a shell-quoted argument string, as for the official image.
	if ! eval 'initdb --username="$POSTGRES_USER" --pwfile="$pwfile" "${waldir[@]}" '"${POSTGRES_INITDB_ARGS:-}"; then
		rm -f "$pwfile"
		die "initdb failed"
	fi
	rm -f "$pwfile"

	printf '\n# Added by docker-entrypoint.sh: logins from other hosts.\nhost all all all %s\n' \
		"$auth" >> "$PGDATA/pg_hba.conf"

	export PGPASSWORD="${PGPASSWORD:-$POSTGRES_PASSWORD}"
	PGUSER="$POSTGRES_USER" pg_ctl -D "$PGDATA" -w start \
		-o "-c listen_addresses='' -p ${PGPORT:-5432}"

	if [ -z "$(psql_init --dbname postgres --set db="$POSTGRES_DB" -tA \
			<<< "SELECT 1 FROM pg_database WHERE datname = :'db';")" ]; then
		psql_init --dbname postgres --set db="$POSTGRES_DB" <<< 'CREATE DATABASE :"db";'
	fi

	for f in /docker-entrypoint-initdb.d/*; do
		[ -e "$f" ] || continue
		case "$f" in
			*.sh)
				# shellcheck disable=SC1090 # the image's init scripts, known only at run time
				if [ -x "$f" ]; then echo "$0: running $f"; "$f"
				else echo "$0: sourcing $f"; . "$f"; fi ;;
			*.sql)     echo "$0: running $f"; psql_init --dbname "$POSTGRES_DB" -f "$f" ;;
			*.sql.gz)  echo "$0: running $f"; gunzip -c "$f" | psql_init --dbname "$POSTGRES_DB" ;;
			*.sql.xz)  echo "$0: running $f"; xz -dc "$f" | psql_init --dbname "$POSTGRES_DB" ;;
			*)         echo "$0: ignoring $f" ;;
		esac
	done

	PGUSER="$POSTGRES_USER" pg_ctl -D "$PGDATA" -m fast -w stop
	unset PGPASSWORD
	echo
	echo 'PostgreSQL init process complete; ready for start up.'
	echo
}

# `docker run IMAGE -c foo=bar` means `postgres -c foo=bar`.
if [ "${1:0:1}" = '-' ]; then
	set -- postgres "$@"
fi

if [ "${1:-}" = postgres ]; then
	from_env_or_file POSTGRES_PASSWORD
	from_env_or_file POSTGRES_USER postgres
	from_env_or_file POSTGRES_DB "$POSTGRES_USER"
	from_env_or_file POSTGRES_INITDB_ARGS
	prepare_dirs
	if [ "$(id -u)" = 0 ]; then
		exec gosu postgres "${BASH_SOURCE[0]}" "$@"
	fi
	if [ -s "$PGDATA/PG_VERSION" ]; then
		echo
		echo 'PostgreSQL Database directory appears to contain a database; Skipping initialization'
		echo
	else
		init_cluster
	fi
fi

exec "$@"
