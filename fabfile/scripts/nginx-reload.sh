# shellcheck shell=sh
# Test the new config in the running nginx; reload if accepted, otherwise put the
# previous files back (so the old config keeps serving) and fail with nginx's own
# error. Inputs: confs (the nginx files this run wrote or removed, space-separated;
# each one's previous version kept beside it as <file>$backup), backup, project.
# shellcheck disable=SC2154 # inputs: confs, backup, project (fabfile/shell.py)
c=$(docker ps -q --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.service=nginx)
if [ -z "$c" ]; then echo "nginx is not running" >&2; exit 1; fi
if ! out=$(docker exec "$c" nginx -t 2>&1); then
  for p in $confs; do
    if [ -e "$p$backup" ]; then mv -f "$p$backup" "$p"; else rm -f "$p"; fi
  done
  echo "nginx rejected the new configuration; the previous one is still serving:" >&2
  echo "$out" | grep -v 'test failed' >&2
  exit 1
fi
for p in $confs; do rm -f "$p$backup"; done
# `nginx -s reload` only signals the master, which starts new workers (new config)
# and only THEN tells the old ones to stop accepting: until an old worker has
# renamed itself "worker process is shutting down" (or exited) it may still take
# a new connection with the old config. "Deployed" means every new connection
# gets the new config, so wait for both: a new worker, and no old one accepting.
docker exec -i "$c" sh -s <<'IN_NGINX'
workers() { for p in /proc/[0-9]*; do tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q 'worker process *$' && echo "${p#/proc/}"; done; }
old=$(workers | sort)
nginx -s reload
i=0
while [ $i -lt 200 ]; do
  now=$(workers | sort)
  if echo "$now" | grep -vxF "$old" | grep -q . && ! echo "$now" | grep -xF "$old" | grep -q .; then exit 0; fi
  sleep 0.05; i=$((i+1))
done
echo "nginx did not move every worker to the new configuration within 10s" >&2
exit 1
IN_NGINX
