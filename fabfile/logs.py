"""`inv logs`: a homeserver's container logs, read on its host without the operator
knowing container names (compose's labels find them). The logs rotate (json-file,
5 x 10 MB per container: templates/*/docker-compose.yml.j2)."""

from __future__ import annotations

import re
import shlex
from typing import Callable

from .docker import container
from .errors import TaskError
from .inventory import Inventory
from .remote import session
from .render import PROXY_PROJECT, admin_ui_service, database_project, synapse_project

SERVICES = ("synapse", "postgres", "nginx", "admin-ui")
SINCE_RE = re.compile(r"^(\d+[smh]|\d{4}-\d\d-\d\d(T\d\d:\d\d(:\d\d)?(Z|[+-]\d\d:\d\d)?)?)$")


def logs(inv: Inventory, homeserver: str, service: str, since: str, tail: int, follow: bool,
         out: Callable[[str], None]) -> None:
    """Print the last `tail` lines since `since` (10m, 2h, or a date) of one service of
    the homeserver (nginx: its host's reverse proxy; admin-ui: its admin UI); `follow` goes on until Ctrl-C."""
    hs = inv.homeserver(homeserver)
    if service not in SERVICES:
        raise TaskError(f"unknown service {service!r}: one of {', '.join(SERVICES)}")
    if not SINCE_RE.match(since):
        raise TaskError(f"invalid --since {since!r}: 90s, 10m, 2h, or a date like 2026-11-30 or 2026-11-30T12:00")
    if tail < 1:
        raise TaskError("--tail must be at least 1")
    if service == "postgres" and hs.postgres.external:
        raise TaskError(f"{hs.server_name}'s database is external ({hs.postgres.external.host}): its logs are "
                        "that server's")
    if service == "admin-ui" and not hs.admin_ui.enabled:
        raise TaskError(f"{hs.server_name} has no admin UI (admin_ui.enabled is false)")
    project = synapse_project(hs) if service in ("synapse", "postgres") else PROXY_PROJECT
    host = hs.host
    if service == "postgres" and hs.postgres.host:  # the host that runs it for it
        project, host = database_project(hs), hs.postgres.host
    service = admin_ui_service(hs) if service == "admin-ui" else service
    flags = ["--since", since, "--tail", str(tail), "--timestamps"] + (["--follow"] if follow else [])
    script = (f"c={container(project, service)}\n"
              f'if [ -z "$c" ]; then echo "{service} of {hs.server_name} is not running on {host}" >&2; exit 4; fi\n'
              f'exec docker logs {" ".join(shlex.quote(f) for f in flags)} "$c" 2>&1\n')
    with session(inv, inv.hosts[host]) as remote:
        remote.run(script, what=f"{hs.server_name}: {service} logs", on_stdout=out,
                   timeout=30 * 24 * 3600 if follow else 300)
