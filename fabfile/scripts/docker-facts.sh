# shellcheck shell=sh
# What Docker holds, as facts records (fabfile/facts.py): B docker installed, K compose
# flavour, E engine version, C compose containers, I image tags, D image digests.
# Part of the facts script, which it ends when Docker is absent or not running.
# The engine is asked once through its API socket (curl + jq, which bootstrap
# installs): five docker CLI runs cost a no-op deploy most of its remote time.
# Its version comes from the Server header of those answers, not from /version
# (which starts runc and docker-init to ask theirs: the slowest part of a no-op).
# Input: headers (a scratch file for curl's response headers).
# shellcheck disable=SC2154 # input: headers (fabfile/facts.py)
command -v docker >/dev/null 2>&1 || exit 0
printf 'B\tdocker\n'
# compose v2 is a CLI plugin: where the CLI looks for it, else the slow way
k=""
for d in /usr/libexec/docker/cli-plugins /usr/lib/docker/cli-plugins /usr/local/libexec/docker/cli-plugins \
         /usr/local/lib/docker/cli-plugins "$HOME/.docker/cli-plugins"; do
  if [ -x "$d/docker-compose" ]; then k=v2; break; fi
done
if [ -z "$k" ] && docker compose version >/dev/null 2>&1; then k=v2; fi
if [ -z "$k" ] && command -v docker-compose >/dev/null 2>&1; then k=v1; fi
[ -z "$k" ] || printf 'K\t%s\n' "$k"
sock=/var/run/docker.sock
if command -v curl >/dev/null 2>&1 && command -v jq >/dev/null 2>&1 && [ -S "$sock" ]; then
  out=$(curl -sf -D "$headers" --unix-socket "$sock" http://docker/containers/json?all=1 \
        http://docker/images/json) || exit 0
  v=""
  while IFS= read -r line; do  # "Server: Docker/26.1.5 (linux)"
    case $line in [Ss]erver:*/*) v=${line#*/}; v=${v%%[!0-9A-Za-z.+~-]*}; break ;; esac
  done < "$headers"
  printf 'E\t%s\n' "${v:-unknown}"
  printf '%s\n' "$out" | jq -r '
    if ((.[0] // {}) | has("Names")) then
      .[] | select(.Labels["com.docker.compose.project"] != null)
      | ["C", .Labels["com.docker.compose.project"], .Labels["com.docker.compose.service"], .State, .Status,
         .Id[0:12], .Image, (.Labels["com.docker.compose.project.working_dir"] // "")] | @tsv
    else
      .[] | .Id as $id
      | (((.RepoTags // [])[] | select(. != "<none>:<none>") | "I\t\(.)\t\($id)"),
         ((.RepoDigests // [])[] | select(endswith("@<none>") | not) | "D\t\(.)\t\($id)"))
    end'
else
  v=$(docker version --format '{{.Server.Version}}' 2>/dev/null) || exit 0
  printf 'E\t%s\n' "$v"
  docker ps -a --filter label=com.docker.compose.project --format \
    'C	{{.Label "com.docker.compose.project"}}	{{.Label "com.docker.compose.service"}}	{{.State}}	{{.Status}}	{{.ID}}	{{.Image}}	{{.Label "com.docker.compose.project.working_dir"}}'
  docker images --no-trunc --format 'I	{{.Repository}}:{{.Tag}}	{{.ID}}'
  docker images --digests --no-trunc --format 'D	{{.Repository}}@{{.Digest}}	{{.ID}}'
fi
