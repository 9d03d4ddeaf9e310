# shellcheck shell=sh
# The firewall's facts record (fabfile/facts.py), part of the facts script.
# Inputs: dir (the firewall's directory), wanted (1: hosts.yaml turns it on).
#   F  up|down  sshd_ports
# up: our chains are hooked into INPUT and DOCKER-USER. Asked only where the firewall
# is wanted or its directory is left over; sshd's ports only where it is wanted (a
# deploy refuses to close one).
# shellcheck disable=SC2154 # inputs: dir, wanted (fabfile/shell.py)
if [ "$wanted" = 1 ] || [ -d "$dir" ]; then
  if iptables -w -C INPUT -j SFAB-INPUT 2>/dev/null && iptables -w -C DOCKER-USER -j SFAB-FORWARD 2>/dev/null; then
    hooked=up
  else
    hooked=down
  fi
  ports=""
  if [ "$wanted" = 1 ]; then
    sshd=$(command -v sshd 2>/dev/null || echo /usr/sbin/sshd)
    ports=$("$sshd" -T 2>/dev/null | awk '$1 == "port" { printf "%s ", $2 }')
  fi
  printf 'F\t%s\t%s\n' "$hooked" "$ports"
fi
