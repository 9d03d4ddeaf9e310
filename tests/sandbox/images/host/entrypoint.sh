#!/bin/sh
# Install the seeds mounted read-only under /etc/sfab-seed, start cron, run sshd.
#   /etc/sfab-seed/ssh_host_ed25519_key{,.pub}  this host's key (matches state/known_hosts)
#   /etc/sfab-seed/authorized_keys              the operator key
#   SFAB_LOGIN_USERS                            accounts that accept it (default: root)
set -eu
seed=/etc/sfab-seed

install -m 0600 -o root -g root "$seed/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key
install -m 0644 -o root -g root "$seed/ssh_host_ed25519_key.pub" /etc/ssh/ssh_host_ed25519_key.pub

for user in ${SFAB_LOGIN_USERS:-root}; do
    home=$(getent passwd "$user" | cut -d: -f6)
    group=$(id -gn "$user")
    install -d -m 0700 -o "$user" -g "$group" "$home/.ssh"
    # a real VPS keeps what its users add: only seed a missing file
    if [ ! -s "$home/.ssh/authorized_keys" ]; then
        install -m 0600 -o "$user" -g "$group" "$seed/authorized_keys" "$home/.ssh/authorized_keys"
    fi
done

mkdir -p /run/sshd
chmod 0755 /run/sshd
if command -v cron >/dev/null 2>&1; then
    # a boot empties /run (a tmpfs on a real VPS, not in this container): cron's
    # @reboot jobs run only when its boot marker is gone
    rm -f /run/crond.reboot /var/run/crond.reboot
    cron
fi
exec /usr/sbin/sshd -D -e
