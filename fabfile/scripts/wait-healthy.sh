#!/bin/sh
# Wait until every container of the compose projects $projects is healthy (or
# running, when it has no health check), at most $timeout seconds. A container
# still `starting` counts as healthy as soon as its own health check passes when
# run now (Docker runs the first one only after its interval: 10 s for Synapse).
# On timeout, or at once when a container is in a crash loop (restarted 3 times by
# its restart policy): the unhealthy containers' last log lines, and exit 1.
# shellcheck disable=SC2154 # inputs: timeout, projects (fabfile/shell.py)
deadline=$(( $(date +%s) + timeout ))
start=$(date +%s)
last=""
while :; do
  bad=""
  crashed=""
  for p in $projects; do
    ids=$(docker ps -aq --filter "label=com.docker.compose.project=$p" --filter label=com.docker.compose.oneoff=False)
    [ -n "$ids" ] || bad="$bad $p:no-containers"
    for id in $ids; do
      s=$(docker inspect -f '{{.Name}}={{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id")
      case "$s" in
        *=healthy|*=running) ;;
        *=starting)
          if probe=$(docker inspect "$id" | jq -r '.[0].Config.Healthcheck.Test | if .[0] == "CMD-SHELL" then .[1] else .[1:] | @sh end' 2>/dev/null) \
             && [ -n "$probe" ] && docker exec "$id" sh -c "$probe" >/dev/null 2>&1; then :; else bad="$bad ${s#/}"; fi ;;
        *)
          bad="$bad ${s#/}"
          # a crash loop (the restart policy started it again and again) will not heal
          if [ "$(docker inspect -f '{{.RestartCount}}' "$id")" -ge 3 ]; then crashed="$crashed $id"; fi ;;
      esac
    done
  done
  [ -z "$bad" ] && { echo "healthy after $(( $(date +%s) - start ))s"; exit 0; }
  if [ "$bad" != "$last" ]; then echo "waiting ($(( $(date +%s) - start ))s):$bad"; last="$bad"; fi
  if [ -n "$crashed" ] || [ "$(date +%s)" -ge "$deadline" ]; then
    if [ -n "$crashed" ]; then
      echo "restarting again and again (a crash loop) after $(( $(date +%s) - start ))s:$bad" >&2
    else
      echo "not healthy after ${timeout}s:$bad" >&2
    fi
    for p in $projects; do
      for id in $(docker ps -aq --filter "label=com.docker.compose.project=$p"); do
        s=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id")
        case "$s" in healthy|running) continue ;; esac
        echo "--- last log lines of $(docker inspect -f '{{.Name}}' "$id") ($s):" >&2
        docker logs --tail 25 "$id" 2>&1 | sed 's/^/    /' >&2
      done
    done
    exit 1
  fi
  sleep 0.5
done
