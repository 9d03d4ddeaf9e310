# shellcheck shell=sh
# The TURN shared secret of this host (fabfile/turn.py), made once from the host's
# /dev/urandom (an existing one is kept), readable by root (coturn) and the group
# Synapse runs as. Inputs: file, gid.
# shellcheck disable=SC2154 # inputs: file, gid (fabfile/shell.py)
umask 077
if [ ! -s "$file" ]; then
  head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 48 > "$file.tmp"
  mv -f "$file.tmp" "$file"
fi
chown "0:$gid" "$file" && chmod 0440 "$file"
