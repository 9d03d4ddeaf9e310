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
from .shell import program


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
    remote.run(program("install-docker.sh"), what="install Docker", timeout=900)


def start_engine(remote: Remote) -> None:
    remote.run(program("start-engine.sh"), what="start the Docker engine", timeout=120)


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
    script = program("pull-images.sh", refs=" ".join(refs))
    res = remote.run(script, what="pull images", timeout=1800)
    log(f"pulled in {time.monotonic() - started:.1f}s")
    return [line for line in res.out.splitlines() if line.strip()]


def wait_healthy(remote: Remote, projects: list[str], log: Callable[[str], None], timeout: int = 180) -> None:
    """Wait (on the host, in one command: fabfile/scripts/wait-healthy.sh) until
    every container of `projects` is healthy; on timeout, fail with the unhealthy
    containers' last log lines."""
    if not projects:
        return
    script = program("wait-healthy.sh", timeout=timeout, projects=" ".join(projects))
    remote.run(script, what=f"wait for {', '.join(projects)}", timeout=timeout + 60,
               on_stdout=lambda line: log(line))
