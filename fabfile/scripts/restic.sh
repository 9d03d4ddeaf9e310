# shellcheck shell=sh
# The start of every program that uses a homeserver's backup repository (backup.sh,
# snapshots.sh): restic installed, its password (made here once, 0600, never in
# argv), the repository's credentials the operator put in $env_file, and the
# repository itself, created on first use.
# Inputs (fabfile/shell.py): repository password_file env_file.
# shellcheck disable=SC2154
set -eu
umask 077
if ! command -v restic >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq restic >/dev/null 2>&1 \
    || { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq \
         && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq restic >/dev/null; } \
    || { echo "restic is not installed and apt could not install it" >&2; exit 3; }
fi
if [ ! -s "$password_file" ]; then
  mkdir -p -m 0700 "$(dirname "$password_file")"
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$password_file.new"
  mv "$password_file.new" "$password_file"
fi
if [ -f "$env_file" ]; then
  set -a
  # shellcheck disable=SC1090 # the operator's file
  . "$env_file"
  set +a
fi
export RESTIC_REPOSITORY="$repository" RESTIC_PASSWORD_FILE="$password_file"
export RESTIC_CACHE_DIR=/var/cache/synapse-fabric/restic
if ! restic cat config >/dev/null 2>&1; then
  case "$repository" in /*) mkdir -p -m 0700 "$repository" ;; esac
  restic init >/dev/null
fi
