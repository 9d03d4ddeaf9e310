# shellcheck shell=sh
# Print the password of the database this host runs for another host's homeserver
# (made by database-host-secret.sh), for that host's passfile; nothing if absent.
# Inputs: secret (the password's file).
# shellcheck disable=SC2154 # inputs (fabfile/shell.py)
pw=
{ IFS= read -r pw < "$secret"; } 2>/dev/null
[ -n "$pw" ] && printf '%s\n' "$pw"
exit 0
