#!/bin/sh
# Matrix users of one homeserver, run on its host (fabfile/users.py).
#
#   action=exists     print 1 if $uid is a user, else 0
#   action=register   run $python in the Synapse container; the password on stdin
#   action=reset      hash the password on stdin with $python (Synapse's hash_password),
#                     keep the old hash in $backups/$backup_name.<time> (0600), then
#                     set the new one in ONE transaction that must change exactly one
#                     row; with logout=yes, Synapse then ends every session of $uid
#                     ($logout_python, a token minted for it). Prints the backup's path.
#
# Inputs (fabfile/shell.py): action project server_name uid pg_user pg_db, and per
# action python backups backup_name logout logout_python. $uid is a validated user
# ID (no quote, no space); it reaches SQL as a psql variable, which psql quotes.
# shellcheck disable=SC2154
# After fabfile/scripts/database.sh and homeserver.sh ($syn, psql()).
set -e

case $action in
  exists)
    printf '%s\n' "\\set uid '$uid'" "SELECT count(*) FROM users WHERE name = :'uid';" | psql
    exit 0
    ;;
  register)
    docker exec -i "$syn" python -c "$python" >/dev/null
    exit 0
    ;;
  reset) ;;
  *) echo "users.sh: unknown action $action" >&2; exit 64 ;;
esac

umask 077
mkdir -p "$backups"
old=$(printf '%s\n' "\\set uid '$uid'" "SELECT password_hash FROM users WHERE name = :'uid';" | psql)
if [ -z "$old" ]; then
  echo "no user $uid on $server_name; nothing was changed" >&2
  exit 5
fi
# hash_password may print a notice first (e.g. about bcrypt's 72-byte limit): the hash is the last line
hash=$(docker exec -i "$syn" python -c "$python" | tail -n 1)
# shellcheck disable=SC2016 # a bcrypt hash starts with a literal $2
case "$hash" in '$2'*) ;; *) echo "hash_password did not return a bcrypt hash" >&2; exit 1 ;; esac
backup="$backups/$backup_name.$(date -u +%Y%m%dT%H%M%SZ)"
# the old hash is kept before anything changes; no backup, no change
if ! { printf '%s\n' "$old" > "$backup.tmp" && mv -f "$backup.tmp" "$backup"; }; then
  echo "could not keep the old hash in $backup; nothing was changed" >&2
  exit 1
fi
res=$({ printf '\\set hash %s\n' "'$hash'"; printf '\\set uid %s\n' "'$uid'"; cat <<'SQL'
BEGIN;
WITH changed AS (UPDATE users SET password_hash = :'hash' WHERE name = :'uid' RETURNING 1)
SELECT CASE WHEN count(*) = 1 THEN 'true' ELSE 'false' END AS one_row FROM changed \gset
\if :one_row
COMMIT;
\echo sfab-updated
\else
ROLLBACK;
\echo sfab-not-updated
\endif
SQL
} | psql)
if [ "$res" != sfab-updated ]; then
  echo "the update did not change exactly one row; rolled back" >&2
  exit 1
fi

if [ "$logout" = yes ]; then
  # A token for the user, valid for 5 minutes, in a variable and on stdin only.
  # Synapse numbers access tokens in its own memory from the largest id it saw at
  # start, so this row takes an id far above it that Synapse will not reach while
  # the row lives; /logout/all deletes it with every other session of the user.
  tok=sfab_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  ended="the password of $uid was changed, but its sessions were not ended; run again with --logout"
  if ! { printf '%s\n' "\\set uid '$uid'" "\\set tok '$tok'"; cat <<'SQL'
INSERT INTO access_tokens (id, user_id, token, valid_until_ms)
SELECT COALESCE(max(id), 0) + 1000000000, :'uid', :'tok',
       (extract(epoch FROM now()) * 1000)::bigint + 300000 FROM access_tokens;
SQL
  } | psql; then
    echo "$ended" >&2
    exit 1
  fi
  if ! printf '%s' "$tok" | docker exec -i "$syn" python -c "$logout_python"; then
    printf '%s\n' "\\set tok '$tok'" "DELETE FROM access_tokens WHERE token = :'tok';" | psql
    echo "$ended" >&2
    exit 1
  fi
fi
echo "$backup"
