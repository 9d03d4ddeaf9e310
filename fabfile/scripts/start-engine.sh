#!/bin/sh
# Start the Docker engine so that it outlives the SSH session: systemd where it is
# PID 1, otherwise a detached dockerd (its own session, no controlling terminal).
# cron runs certificate renewals and Element updates; without systemd nobody starts it
if [ "$(cat /proc/1/comm 2>/dev/null)" != systemd ] && command -v cron >/dev/null 2>&1 \
   && ! pidof cron >/dev/null 2>&1; then
  cron
fi
if docker info >/dev/null 2>&1; then exit 0; fi
if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
  systemctl enable --now docker >/dev/null
else
  mkdir -p /var/log
  setsid nohup dockerd >>/var/log/dockerd.log 2>&1 </dev/null &
fi
for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && exit 0; sleep 1; done
echo "the Docker engine did not start; last lines of its log:" >&2
tail -n 20 /var/log/dockerd.log >&2 2>/dev/null || journalctl -u docker -n 20 --no-pager >&2
exit 1
