"""Shared by the e2e tests: run the real commands, probe hosts over SSH."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import yaml

from fabfile.inventory import load
from fabfile.remote import open_remote

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INVENTORY = REPO / "hosts.yaml"
ROOTS = REPO / "tests/sandbox/state/acme-roots.pem"


def https_get(name: str, path: str, headers: dict[str, str] | None = None,
              cafile: Path = ROOTS) -> tuple[int, dict, bytes]:
    """One HTTPS GET to a sandbox name (resolved by the sandbox DNS, verified against
    the sandbox CA): (status, lower-cased headers, body)."""
    from tests.sandbox.client import resolve

    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection((resolve(name), 443), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\n{extra}Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    found = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if found.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return int(lines[0].split()[1]), found, body


def run(argv: list[str], inventory: Path = INVENTORY, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "INVOKE_INVENTORY": str(inventory), "FABRIC_INVENTORY": str(inventory)}
    res = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    print(res.stdout[-4000:], res.stderr[-4000:])
    return res


def on_host(host: str, script: str, inventory: Path = INVENTORY) -> str:
    inv = load(inventory)
    remote = open_remote(inv, inv.hosts[host])
    try:
        return remote.run(script, what="test probe").out
    finally:
        remote.close()


# What a no-op run must leave alone: managed files (hash + mtime) and containers.
SNAPSHOT = r"""
find /opt/matrix -path '*/postgres' -prune -o -path '*/data' -prune -o -type f -printf '%p %T@ %m %U:%G\n' | sort
find /opt/matrix -type f -path '*/conf.d/*' -exec sha256sum {} + | sort
docker ps -aq | xargs -r docker inspect -f '{{.Name}} {{.State.StartedAt}} {{.State.Status}}' | sort
"""

STARTS = ("docker ps -aq | xargs -r docker inspect -f '{{index .Config.Labels \"com.docker.compose.project\"}}/"
          "{{index .Config.Labels \"com.docker.compose.service\"}} {{.State.StartedAt}}' | sort")


def ctr(project: str, service: str) -> str:
    """Shell for the container of a compose service, whichever compose flavour
    named it (v1: project_service_1, v2: project-service-1)."""
    return (f"$(docker ps -q --filter label=com.docker.compose.project={project} "
            f"--filter label=com.docker.compose.service={service})")


def starts(host: str) -> dict[str, str]:
    """{"project/service": start time} of every compose container on `host`."""
    return dict(line.split() for line in on_host(host, STARTS).splitlines())


def variant(tmp_name: str, change) -> Path:
    """A copy of hosts.yaml next to it, changed by `change(doc)`."""
    doc = yaml.safe_load(INVENTORY.read_text())
    change(doc)
    path = REPO / f".e2e-{tmp_name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class ArgvSampler:
    """Reads every process's argv (/proc/*/cmdline) over and over while a task runs.

    This machine's /proc shows the operator's processes (inv, fab, ssh) and, the
    sandbox hosts being containers on this kernel, every process of every host too:
    sshd and the shells it starts, `docker exec`, and the processes inside the
    homeservers' containers. One sampler here therefore watches the operator's
    machine and the hosts at once. Bounded: it stops after `limit` seconds."""

    def __init__(self, limit: float = 1200, pause: float = 0.01):
        import threading

        self.seen: set[str] = set()
        self.passes = 0
        self._stop = threading.Event()
        self._limit, self._pause = limit, pause
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import time

        deadline = time.monotonic() + self._limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            raw = f.read()
                    except OSError:
                        continue
                    if raw:
                        self.seen.add(raw.replace(b"\0", b" ").decode(errors="replace"))
            self.passes += 1
            self._stop.wait(self._pause)

    def __enter__(self) -> "ArgvSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def containing(self, needle: str) -> list[str]:
        return sorted(line for line in self.seen if needle in line)

    def matching(self, pattern: str) -> list[str]:
        import re

        rx = re.compile(pattern)
        return sorted(line for line in self.seen if rx.search(line))
