"""Docker on a host: install the engine and compose, start the engine (with or
without systemd), drive compose projects, ship images, wait for health."""

from __future__ import annotations

import shlex
import subprocess
import time
from typing import Callable, Iterator

from .facts import Facts
from .errors import InventoryError
from .remote import Remote, RemoteError

INSTALL_SCRIPT = r"""
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
# what the host-side scripts use (Element updates, renewals); their timers are
# systemd's where systemd runs, cron's elsewhere (a minimal Debian 13 has no cron)
tools="curl:curl jq:jq gpgv:gpgv flock:util-linux"
[ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] || tools="$tools crontab:cron"
missing=""
for tool in $tools; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing="$missing ${tool#*:}"
done
if [ -n "$missing" ]; then
  apt-get -o DPkg::Lock::Timeout=300 update -qq
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
"""

# Starts the engine so that it outlives the SSH session: systemd where it is PID 1,
# otherwise a detached dockerd (its own session, no controlling terminal).
START_ENGINE = r"""
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
for i in $(seq 1 60); do docker info >/dev/null 2>&1 && exit 0; sleep 1; done
echo "the Docker engine did not start; last lines of its log:" >&2
tail -n 20 /var/log/dockerd.log >&2 2>/dev/null || journalctl -u docker -n 20 --no-pager >&2
exit 1
"""


def compose_cmd(facts: Facts) -> str:
    return "docker compose" if facts.compose == "v2" else "docker-compose"


# Shell, for commands that run without facts: defines `compose ARGS...`, the host's
# compose (the v2 plugin, else the v1 binary), asked by the command itself.
COMPOSE_FN = ('compose() { if docker compose version >/dev/null 2>&1; then docker compose "$@"; '
              'else docker-compose "$@"; fi; }\n')


def container(project: str, service: str) -> str:
    """Shell: the ID of a compose service's container, found by compose's labels
    (v1 and v2 name containers differently); empty when it does not exist."""
    return (f"$(docker ps -q --filter label=com.docker.compose.project={shlex.quote(project)} "
            f"--filter label=com.docker.compose.service={shlex.quote(service)})")


def install(remote: Remote, log: Callable[[str], None]) -> None:
    """Install Docker and compose through apt (no-op when present)."""
    log("installing Docker and compose (apt)")
    remote.run(INSTALL_SCRIPT, what="install Docker", timeout=900)


def start_engine(remote: Remote) -> None:
    remote.run(START_ENGINE, what="start the Docker engine", timeout=120)


def local_image_ids(refs: list[str]) -> dict[str, str]:
    """Image IDs on this (the operator's) machine, for the `push` image source."""
    ids = {}
    for ref in refs:
        try:
            res = subprocess.run(
                ["docker", "image", "inspect", "--format", "{{.Id}}", ref],
                capture_output=True, text=True,
            )
        except FileNotFoundError:
            raise InventoryError("image source 'push' needs docker on this machine") from None
        if res.returncode == 0:
            ids[ref] = res.stdout.strip()
    return ids


def _stream(proc: subprocess.Popen, counter: list[int]) -> Iterator[bytes]:
    while True:
        chunk = proc.stdout.read(1 << 20)
        if not chunk:
            return
        counter[0] += len(chunk)
        yield chunk


def push_images(remote: Remote, refs: list[str], log: Callable[[str], None]) -> None:
    """`docker save | docker load` over the SSH connection, one stream for all."""
    if not refs:
        return
    started = time.monotonic()
    log(f"shipping {len(refs)} image(s) over SSH: {', '.join(refs)}")
    proc = subprocess.Popen(["docker", "save", *refs], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sent = [0]
    try:
        remote.run("docker load -q", stdin=_stream(proc, sent), what="docker load", timeout=1800)
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise RemoteError(f"{remote.name}: docker save failed locally: {err.strip()}")
    took = time.monotonic() - started
    log(f"shipped {sent[0] / 1e6:.0f} MB in {took:.1f}s")


def pull_images(remote: Remote, refs: list[str], log: Callable[[str], None]) -> list[str]:
    """`docker pull` on the host (its own registries and mirrors), in one command;
    returns the references whose image ID changed (they were present before)."""
    if not refs:
        return []
    started = time.monotonic()
    log(f"pulling {len(refs)} image(s): {', '.join(refs)}")
    script = "set -e\n" + "".join(
        f"before=$(docker image inspect -f '{{{{.Id}}}}' {shlex.quote(r)} 2>/dev/null || true)\n"
        f"if ! out=$(docker pull -q {shlex.quote(r)} 2>&1); then "
        f"echo \"could not pull {r}: $out\" >&2; exit 1; fi\n"
        f"after=$(docker image inspect -f '{{{{.Id}}}}' {shlex.quote(r)})\n"
        f"if [ -n \"$before\" ] && [ \"$before\" != \"$after\" ]; then echo {shlex.quote(r)}; fi\n"
        for r in refs)
    res = remote.run(script, what="pull images", timeout=1800)
    log(f"pulled in {time.monotonic() - started:.1f}s")
    return [line for line in res.out.splitlines() if line.strip()]


def wait_healthy(remote: Remote, projects: list[str], log: Callable[[str], None], timeout: int = 180) -> None:
    """Wait (on the host, in one command) until every container of `projects` is
    healthy (or running, when it has no health check): a container still
    `starting` counts as healthy as soon as its own health check command passes
    when run now. On timeout, fail with the unhealthy containers' last log lines."""
    if not projects:
        return
    filters = " ".join(f"--filter label=com.docker.compose.project={shlex.quote(p)}" for p in projects)
    script = f"""
deadline=$(( $(date +%s) + {timeout} ))
start=$(date +%s)
last=""
while :; do
  bad=""
  for p in {' '.join(shlex.quote(p) for p in projects)}; do
    ids=$(docker ps -aq --filter label=com.docker.compose.project=$p --filter label=com.docker.compose.oneoff=False)
    [ -n "$ids" ] || bad="$bad $p:no-containers"
    for id in $ids; do
      s=$(docker inspect -f '{{{{.Name}}}}={{{{if .State.Health}}}}{{{{.State.Health.Status}}}}{{{{else}}}}{{{{.State.Status}}}}{{{{end}}}}' $id)
      case "$s" in
        *=healthy|*=running) ;;
        *=starting)
          # Docker runs the first check only after its interval (10 s for Synapse):
          # run the container's own check now instead of waiting for it
          if probe=$(docker inspect $id | jq -r '.[0].Config.Healthcheck.Test | if .[0] == "CMD-SHELL" then .[1] else .[1:] | @sh end' 2>/dev/null) \
             && [ -n "$probe" ] && docker exec $id sh -c "$probe" >/dev/null 2>&1; then :; else bad="$bad ${{s#/}}"; fi ;;
        *) bad="$bad ${{s#/}}";;
      esac
    done
  done
  [ -z "$bad" ] && {{ echo "healthy after $(( $(date +%s) - start ))s"; exit 0; }}
  if [ "$bad" != "$last" ]; then echo "waiting ($(( $(date +%s) - start ))s):$bad"; last="$bad"; fi
  if [ $(date +%s) -ge $deadline ]; then
    echo "not healthy after {timeout}s:$bad" >&2
    for id in $(docker ps -aq {filters}); do
      s=$(docker inspect -f '{{{{if .State.Health}}}}{{{{.State.Health.Status}}}}{{{{else}}}}{{{{.State.Status}}}}{{{{end}}}}' $id)
      case "$s" in healthy|running) continue;; esac
      echo "--- last log lines of $(docker inspect -f '{{{{.Name}}}}' $id) ($s):" >&2
      docker logs --tail 25 $id 2>&1 | sed 's/^/    /' >&2
    done
    exit 1
  fi
  sleep 0.5
done
"""
    remote.run(script, what=f"wait for {', '.join(projects)}", timeout=timeout + 60,
               on_stdout=lambda line: log(line))
