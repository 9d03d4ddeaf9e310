# shellcheck shell=sh
# The steps of `inv adopt` (fabfile/adopt.py) on the host a hand-made homeserver
# runs on ($container: its Synapse or database container, a name docker printed).
#
#   action=database    its PostgreSQL started if it was not, then one line:
#                      encoding collate ctype KiB schema-version ($pg_user, $pg_db)
#   action=pending     how many background updates its SQLite database ($sqlite, a
#                      path in the container) has; "stopped" when it does not run
#   action=snapshot    a consistent copy of that SQLite database on stdout, taken
#                      with SQLite's online backup inside the running container
#   action=stop        $containers (space-separated) stopped, restart policy "no"
#   action=start       $container's restart policy back to $restart, then started
#
# Inputs (fabfile/shell.py): action, and what the action names.
# shellcheck disable=SC2154
set -eu
case $action in
  database)
    docker start "$container" >/dev/null
    i=0
    until docker exec "$container" pg_isready -q; do
      i=$((i + 1)); [ $i -lt 60 ] || { echo "its PostgreSQL ($container) does not answer" >&2; exit 1; }
      sleep 1
    done
    docker exec -i "$container" psql -X -At -F ' ' -U "$pg_user" -d "$pg_db" <<'SQL' | tr '\n' ' '
SELECT pg_encoding_to_char(encoding), datcollate, datctype, pg_database_size(datname) / 1024
  FROM pg_database WHERE datname = current_database();
SELECT version FROM schema_version;
SQL
    echo
    ;;
  pending)
    docker exec -i "$container" python - "$sqlite" <<'PY' 2>/dev/null || echo stopped
import sqlite3, sys
db = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True)
print(db.execute("SELECT count(*) FROM background_updates").fetchone()[0])
PY
    ;;
  snapshot)
    tmp=/tmp/synapse-fabric-snapshot.db
    trap 'docker exec "$container" rm -f "$tmp"' EXIT
    docker exec -i "$container" python - "$sqlite" "$tmp" <<'PY'
import sqlite3, sys
src = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True)
dst = sqlite3.connect(sys.argv[2])
src.backup(dst)
dst.close()
PY
    docker exec "$container" cat "$tmp"
    ;;
  stop)
    # shellcheck disable=SC2086 # container names: no spaces
    docker update --restart=no $containers >/dev/null
    # shellcheck disable=SC2086
    docker stop $containers >/dev/null
    ;;
  start)
    docker update --restart="$restart" "$container" >/dev/null
    docker start "$container" >/dev/null
    ;;
  *) echo "adopt.sh: unknown action $action" >&2; exit 64 ;;
esac
