# shellcheck shell=sh
# Put one homeserver's files back from a snapshot (fabfile/restore.py): its
# directory, certificate and certbot's state under this host's base_dir (the
# snapshot may come from another base_dir), and the database dump beside them
# for the database step. What the host held for it before is moved aside, never
# deleted. The operator's copy of the password (on stdin) is used for this run;
# with adopt=yes (the host the snapshots came from) the host gets it back as its
# password file if it lost it.
# Inputs (fabfile/shell.py): server_name tag snapshot base staging dump_dir keep_aside adopt
# After fabfile/scripts/restic.sh (with password_stdin=yes: $given).
# shellcheck disable=SC2154
if [ "$snapshot" = latest ]; then
  id=$(restic snapshots --json --host "$server_name" --tag "$tag" | jq -r 'sort_by(.time) | last | .id // empty')
else
  id=$(restic snapshots --json --host "$server_name" --tag "$tag" "$snapshot" | jq -r '.[0].id // empty')
fi
if [ -z "$id" ]; then
  echo "no snapshot ${snapshot#latest} of $server_name in $RESTIC_REPOSITORY" >&2
  exit 4
fi
old_base=$(restic snapshots --json "$id" | jq -r --arg s "/.synapse-fabric/backup/$server_name" \
  '.[0].paths[] | select(endswith($s)) | .[0:(length - ($s | length))]')
if [ -z "$old_base" ]; then
  echo "snapshot $id is not a synapse-fabric snapshot of $server_name (no database dump in it)" >&2
  exit 4
fi
rm -rf "$staging"
mkdir -p "$staging"
restic restore --quiet "$id" --target "$staging"
from=$staging$old_base

# what the host holds for it now goes aside (its stack down first)
root=$base/synapse/$server_name
if [ -e "$root" ]; then
  if [ -f "$root/docker-compose.yml" ]; then (cd "$root" && compose down --remove-orphans) >/dev/null 2>&1 || true; fi
  mkdir -p "$keep_aside"
  mv "$root" "$keep_aside/synapse"
fi
mkdir -p "$base/synapse"
mv "$from/synapse/$server_name" "$root"
le=reverse_proxy/acme/letsencrypt
for p in "reverse_proxy/certs/$server_name" "$le/live/$server_name" "$le/archive/$server_name" \
         "$le/renewal/$server_name.conf"; do
  [ -e "$from/$p" ] || continue
  if [ -e "$base/$p" ]; then mkdir -p "$keep_aside/$(dirname "$p")"; mv "$base/$p" "$keep_aside/$p"; fi
  mkdir -p "$(dirname "$base/$p")"
  mv "$from/$p" "$base/$p"
done
if [ -d "$from/$le/accounts" ]; then  # shared by the host's homeservers: added to, never replaced
  mkdir -p "$base/$le/accounts"
  cp -a -n "$from/$le/accounts/." "$base/$le/accounts/"
fi
rm -rf "$dump_dir"
mkdir -p "$(dirname "$dump_dir")"
mv "$from/.synapse-fabric/backup/$server_name" "$dump_dir"
rm -rf "$staging"

# the host lost its password with the rest: it gets back the operator's copy of it
if [ "$adopt" = yes ] && [ -n "$given" ] && [ -s "$given" ] && [ ! -s "$password_file" ]; then
  mkdir -p "$(dirname "$password_file")"
  cp "$given" "$password_file.new" && mv "$password_file.new" "$password_file"
fi
echo "restored $id from $old_base: schema $(cat "$dump_dir/schema-version" 2>/dev/null || echo '?')"
