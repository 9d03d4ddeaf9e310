#!/bin/sh
# synapse-fabric: the host firewall (fabfile/firewall.py). Installed on the host and
# run at boot (systemd unit or cron @reboot), and by `inv deploy` with its inputs set:
#   action  apply (default): load DIR/rules.v4 and rules.v6 and hook our chains in;
#           off: unhook and delete our chains, then remove DIR
#   dir     where the rules are (default /etc/synapse-fabric/firewall)
# Only our chains are written: SFAB-INPUT (from INPUT) and SFAB-FORWARD (from
# DOCKER-USER, which Docker consults before its own rules). Each family's rules
# load in one iptables-restore commit: no moment with half a rule set.
set -eu
action=${action:-apply}
dir=${dir:-/etc/synapse-fabric/firewall}

hook() {  # $1 iptables command, $2 chain, $3 our chain: first rule of $2, once
  "$1" -w -C "$2" -j "$3" 2>/dev/null || "$1" -w -I "$2" 1 -j "$3"
}

unhook() {
  while "$1" -w -D "$2" -j "$3" 2>/dev/null; do :; done
}

for family in 4 6; do
  ipt=iptables
  [ "$family" = 6 ] && ipt=ip6tables
  if ! command -v "$ipt" >/dev/null 2>&1 || ! "$ipt" -w -n -L INPUT >/dev/null 2>&1; then
    if [ "$action" = apply ] && [ "$family" = 4 ]; then
      echo "firewall: $ipt does not work on this host (install iptables)" >&2
      exit 1
    fi
    continue  # no IPv6 filtering in this kernel: nothing to open or close
  fi
  case "$action" in
    apply)
      rules="$dir/rules.v$family"
      [ -f "$rules" ] || { echo "firewall: $rules is missing" >&2; exit 1; }
      "$ipt-restore" -w --noflush < "$rules"
      "$ipt" -w -N DOCKER-USER 2>/dev/null || true  # Docker keeps it if it exists
      hook "$ipt" INPUT SFAB-INPUT
      hook "$ipt" DOCKER-USER SFAB-FORWARD
      ;;
    off)
      unhook "$ipt" INPUT SFAB-INPUT
      unhook "$ipt" DOCKER-USER SFAB-FORWARD
      for chain in SFAB-INPUT SFAB-FORWARD; do
        if "$ipt" -w -n -L "$chain" >/dev/null 2>&1; then
          "$ipt" -w -F "$chain"
          "$ipt" -w -X "$chain"
        fi
      done
      ;;
    *)
      echo "firewall: unknown action $action" >&2
      exit 2
      ;;
  esac
done
if [ "$action" = off ]; then
  rm -rf "$dir"
fi
