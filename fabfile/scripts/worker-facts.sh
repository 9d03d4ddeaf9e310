# shellcheck shell=sh
# inv check: each worker's health (`W<TAB>name<TAB>status`) and the check markers its
# access log holds (`L<TAB>name<TAB>marker`) from the last 5 minutes (fabfile/check.py).
# Inputs: project (compose project), workers (names), http (the names that serve HTTP).
# shellcheck disable=SC2154 # inputs (fabfile/shell.py)
for w in $workers; do
  c=$(docker ps -aq --filter "label=com.docker.compose.project=$project" \
    --filter "label=com.docker.compose.service=$w" | head -n 1)
  s=""
  if [ -n "$c" ]; then
    s=$(docker inspect -f '{{.State.Health.Status}}' "$c")
    # just (re)started: Docker's first check waits its interval; ask now, as it will
    if [ "$s" = starting ] && docker exec "$c" curl -fsS http://localhost:8008/health >/dev/null 2>&1; then
      s=healthy
    fi
  fi
  printf 'W\t%s\t%s\n' "$w" "$s"
  case " $http " in
    *" $w "*)
      if [ -n "$c" ]; then
        docker logs --since 5m "$c" 2>&1 | grep -o 'sfab-check-[0-9a-f]*' | sed "s/^/L\t$w\t/"
      fi
      ;;
  esac
done
exit 0
