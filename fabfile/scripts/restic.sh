# shellcheck shell=sh
# The start of every program that uses a backup repository (backup.sh, restore.sh,
# the listings): restic installed, its password (never in argv), the repository's
# credentials the operator put in $env_file, and the repository itself.
# Inputs (fabfile/shell.py): repository password_file env_file, and
#   create=yes  make the password (here, once, 0600) and the repository when missing;
#               without it, a repository not made yet exits 10
#   password_stdin=yes  use the password on stdin (the operator's copy, for a
#               restore) in place of the host's; it is kept in $given (0600) for
#               this run only
# shellcheck disable=SC2154
set -eu
umask 077
given=""
if [ "${password_stdin:-no}" = yes ]; then
  given=$(mktemp)
  trap 'rm -f "$given"' EXIT
  cat > "$given"
fi
if ! command -v restic >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq restic >/dev/null 2>&1 \
    || { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq \
         && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq restic >/dev/null; } \
    || { echo "restic is not installed and apt could not install it" >&2; exit 3; }
fi
create=${create:-no}
if [ ! -s "$password_file" ] && [ "$create" = yes ]; then
  mkdir -p "$(dirname "$password_file")"  # 0700: umask 077
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$password_file.new"
  mv "$password_file.new" "$password_file"
fi
use_password=$password_file
[ -n "$given" ] && [ -s "$given" ] && use_password=$given
if [ ! -s "$use_password" ]; then
  echo "no repository password on this host ($password_file) and none given" >&2
  exit 4
fi
if [ -f "$env_file" ]; then
  set -a
  # shellcheck disable=SC1090 # the operator's file
  . "$env_file"
  set +a
fi
export RESTIC_REPOSITORY="$repository" RESTIC_PASSWORD_FILE="$use_password"
export RESTIC_CACHE_DIR=/var/cache/synapse-fabric/restic
if ! why=$(restic cat config 2>&1 >/dev/null); then
  if [ "$create" != yes ]; then
    case "$why" in
      *"does not exist"*|*"Is there a repository"*)  # restic >= 0.17 / 0.14
        echo "no backup repository yet at $repository" >&2; exit 10 ;;
    esac
    echo "cannot open the backup repository $repository:" >&2
    printf '%s\n' "$why" | tail -n 3 >&2
    exit 4
  fi
  case "$repository" in /*) mkdir -p "$repository" ;; esac  # 0700: umask 077
  restic init >/dev/null
fi
