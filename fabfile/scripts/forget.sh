# shellcheck shell=sh
# The retention of one homeserver's snapshots (backup.keep in hosts.yaml): restic
# keeps the newest of each of the last N days, weeks and months, forgets the
# others and prunes what no snapshot needs any more.
# Inputs (fabfile/shell.py): server_name tag keep_daily keep_weekly keep_monthly.
# After fabfile/scripts/restic.sh.
# shellcheck disable=SC2154
restic forget --quiet --prune --host "$server_name" --tag "$tag" \
  --keep-daily "$keep_daily" --keep-weekly "$keep_weekly" --keep-monthly "$keep_monthly"
