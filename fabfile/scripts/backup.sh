# shellcheck shell=sh
# One snapshot of one homeserver in its restic repository (fabfile/backup.py): a
# consistent dump of its database (pg_dump's custom format, taken first, so every
# media file the dump names is already on disk when the files are read), its
# schema version, and its files ($paths: config, signing key, media, secrets,
# certificate, certbot's account). Not the live database files. As Synapse's
# backup guide says: without the one-time keys' rows, without the remote media
# and URL-preview caches.
# Inputs (fabfile/shell.py): project server_name pg_user pg_db staging paths tag.
# Prints restic's summary (JSON) on its last line.
# After fabfile/scripts/restic.sh.
# shellcheck disable=SC2154
pg=$(docker ps -q --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.service=postgres)
if [ -z "$pg" ]; then
  echo "$server_name's database is not running on this host: nothing consistent to back up (run inv deploy)" >&2
  exit 4
fi
sql() {
  docker exec -i "$pg" psql -X -q -At -v ON_ERROR_STOP=1 -U "$pg_user" -d "$pg_db" -c "$1"
}
# the dump goes beside the data; refuse before writing when it cannot fit
mkdir -p "$staging"
chmod 0700 "$staging"
need=$(sql "SELECT pg_database_size(current_database())")
free=$(df -P -B1 "$staging" | awk 'NR == 2 { print $4 }')
if [ "$free" -le "$need" ]; then
  echo "not enough free space for $server_name's database dump in $staging: $free bytes free," \
       "the database takes $need" >&2
  exit 5
fi
trap 'rm -rf "$staging"' EXIT
# Synapse's guidance: one-time keys are not kept (a restore must not hand out used ones)
docker exec "$pg" pg_dump -Fc --exclude-table-data=e2e_one_time_keys_json -U "$pg_user" -d "$pg_db" \
  > "$staging/database.pgdump.new"
mv "$staging/database.pgdump.new" "$staging/database.pgdump"
sql "SELECT version FROM schema_version" > "$staging/schema-version"
set --
nl='
'
old_ifs=$IFS
IFS=$nl
for p in $paths; do
  [ -e "$p" ] && set -- "$@" "$p"
done
IFS=$old_ifs
# caches Synapse fills again from other servers (its guidance) are left out
restic backup --json --quiet --host "$server_name" --tag "$tag" \
  --exclude '*/media_store/remote_content' --exclude '*/media_store/remote_thumbnails' \
  --exclude '*/media_store/url_cache' --exclude '*/media_store/url_cache_thumbnails' \
  "$staging" "$@" | tail -n 1
