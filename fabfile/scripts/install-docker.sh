#!/bin/sh
# Install Docker, compose and the tools the host-side programs use, through apt;
# a no-op when all are there. Where systemd runs, the engine becomes an enabled unit.
set -e
export DEBIAN_FRONTEND=noninteractive
if ! command -v apt-get >/dev/null 2>&1; then
  echo "only Debian/Ubuntu hosts (apt) are supported" >&2; exit 3
fi
if ! command -v docker >/dev/null 2>&1; then
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq docker.io >/dev/null
  # Debian 13 moved the client to docker-cli, only a Recommends of docker.io
  command -v docker >/dev/null 2>&1 \
    || apt-get -o DPkg::Lock::Timeout=300 install -y -qq docker-cli >/dev/null
fi
# what the host-side scripts use (Element updates, renewals, backups); their timers are
# systemd's where systemd runs, cron's elsewhere (a minimal Debian 13 has no cron)
tools="curl:curl jq:jq gpgv:gpgv flock:util-linux restic:restic"
[ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] || tools="$tools crontab:cron"
missing=""
for tool in $tools; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing="$missing ${tool#*:}"
done
if [ -n "$missing" ]; then
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  # shellcheck disable=SC2086 # a list of package names
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq $missing >/dev/null
fi
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  # Debian 13's docker-compose is v2 (the `docker compose` plugin); Debian 12's is
  # v1; Ubuntu ships the v2 plugin as docker-compose-v2.
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq docker-compose-v2 >/dev/null 2>&1 \
    || apt-get -o DPkg::Lock::Timeout=300 install -y -qq docker-compose >/dev/null
fi
# where systemd runs, the engine is a unit that comes back after a reboot
if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
  systemctl enable --now docker.service >/dev/null 2>&1
fi
