#!/bin/sh
# One call of Synapse's admin API on a homeserver, from its own host
# (fabfile/admin.py). The API stays closed to the outside: the call is made inside
# the Synapse container, to localhost.
#
# As whom: synapse-fabric's own server admin, @$admin:$server_name, registered once by
# Synapse's shared-secret registration with a random password nobody keeps. For each
# call it gets a token minted here (valid 5 minutes, in a variable and on stdin
# only), which Synapse's own /logout/all deletes afterwards, whatever happened.
#
# Inputs (fabfile/shell.py): project server_name pg_user pg_db admin method path
# register_python call_python; the request body, if any, on stdin.
# Prints the HTTP status on the first line, the response body after it.
# shellcheck disable=SC2154
# After fabfile/scripts/database.sh and homeserver.sh ($syn, psql()).
set -eu
uid="@$admin:$server_name"

# synapse-fabric's admin, once: Synapse's own registration, a password no one keeps
if [ "$(printf '%s\n' "\\set uid '$uid'" "SELECT count(*) FROM users WHERE name = :'uid';" | psql)" != 1 ]; then
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | docker exec -i "$syn" python -c "$register_python" >/dev/null
fi

body=$(cat)
tok=sfab_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
{ printf '%s\n' "\\set uid '$uid'" "\\set tok '$tok'"; cat <<'SQL'
INSERT INTO access_tokens (id, user_id, token, valid_until_ms)
SELECT COALESCE(max(id), 0) + 1000000000, :'uid', :'tok',
       (extract(epoch FROM now()) * 1000)::bigint + 300000 FROM access_tokens;
SQL
} | psql
# Synapse deletes the token (its caches forget it too), with any other session of
# its admin (shared-secret registration leaves one); SQL only if Synapse cannot
logout() {
  if ! printf '%s\n%s\n%s\n' "$tok" POST /_matrix/client/v3/logout/all |
    docker exec -i "$syn" python -c "$call_python" >/dev/null 2>&1; then
    printf '%s\n' "\\set tok '$tok'" "DELETE FROM access_tokens WHERE token = :'tok';" | psql
  fi
}
trap logout EXIT
printf '%s\n%s\n%s\n%s' "$tok" "$method" "$path" "$body" | docker exec -i "$syn" python -c "$call_python"
