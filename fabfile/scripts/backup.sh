# shellcheck shell=sh
# One snapshot of one homeserver in its restic repository (fabfile/backup.py): the
# dump dump.sh just made in $staging (taken first, so every media file it names is
# already on disk when the files are read) and the homeserver's files ($paths:
# config, signing key, media, secrets, certificate, certbot's account). Not the
# live database files; not the remote media and URL-preview caches Synapse fills
# again (its backup guide).
# Inputs (fabfile/shell.py): server_name staging paths tag.
# Prints restic's summary (JSON) on its last line.
# After fabfile/scripts/restic.sh and dump.sh (one_time_keys=no cleanup=yes).
# shellcheck disable=SC2154
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
