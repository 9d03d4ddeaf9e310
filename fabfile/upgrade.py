"""`inv upgrade`: move homeservers to the Synapse image hosts.yaml names, one at a
time, with a way back (a deploy never does it: fabfile/versions.py).

For each homeserver whose Synapse runs another image than the inventory's:
  1. the new image onto the host (pulled, or pushed from here) while the old one
     still serves;
  2. Synapse stopped, then its database dumped (so the dump is exactly what the
     new version will migrate) with its schema version, on the host (0600);
  3. the homeserver converged onto the new image: started, healthy, and a real
     client request answered (a sync, with a token minted on the host);
  4. if any of that fails: the failed Synapse's logs kept on the host, the
     database restored from the dump (Synapse's migrations only go forward), the
     previous image started again, and the task fails saying so.
The downtime (Synapse stopped to answering again) is measured and printed.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .converge import converge_as
from . import database
from . import admin, docker
from .docker import COMPOSE_FN, container
from .errors import RolledBack, SfabError
from .facts import parse as parse_facts, script as facts_script
from .inventory import Homeserver, Inventory
from .layout import Layout
from .remote import Remote, locked
from .render import render_host, synapse_project
from .restore import external_load_program, load_dump
from .shell import program
from .workers import processes, refuse_remote

Log = Callable[[str], None]


@dataclass
class Step:
    server_name: str
    host: str
    running: Optional[str]  # None: no Synapse container
    wanted: str

    @property
    def due(self) -> bool:
        return self.running is not None and self.running != self.wanted

    def line(self) -> str:
        if self.running is None:
            return f"{self.server_name} ({self.host}): not running; a deploy starts it on {self.wanted}"
        if not self.due:
            return f"{self.server_name} ({self.host}): runs {self.running}: up to date"
        return (f"{self.server_name} ({self.host}): runs {self.running}, the inventory asks for {self.wanted}: "
                f"would bring {self.wanted} onto the host, stop Synapse, dump its database, start {self.wanted}, "
                f"check it answers a sync; on failure restore the dump and start {self.running} again")


def _facts(remote: Remote, inv: Inventory):
    state = render_host(inv, remote.name)
    return state, parse_facts(remote.run(facts_script(state), what="gather facts").out, state)


def plan(inv: Inventory, homeserver: Optional[str]) -> list[Step]:
    servers = [inv.homeserver(homeserver)] if homeserver else sorted(inv.homeservers.values(),
                                                                      key=lambda h: h.server_name)
    steps = []
    for host_name in dict.fromkeys(hs.host for hs in servers):
        with locked(inv, inv.hosts[host_name]) as remote:
            _, facts = _facts(remote, inv)
        for hs in servers:
            if hs.host == host_name:
                steps.append(Step(hs.server_name, host_name, facts.container_image(synapse_project(hs), "synapse"),
                                  inv.image("synapse")))
    return steps


def _converge(remote: Remote, inv: Inventory, hs: Homeserver, image: str, log: Log) -> None:
    converge_as(remote, inv, log, synapse_pins={hs.server_name: image})


def check_answers(remote: Remote, hs: Homeserver) -> None:
    """A real client request through the new Synapse: whoami and a sync."""
    admin.call(remote, hs, "GET", "/_matrix/client/v3/account/whoami")
    admin.call(remote, hs, "GET", "/_matrix/client/v3/sync?timeout=0")


def upgrade_one(remote: Remote, inv: Inventory, hs: Homeserver, old: str, new: str, log: Log) -> float:
    """Steps 1-4 on an open, locked host; the downtime in seconds."""
    sn = hs.server_name
    lay = Layout(inv.hosts[hs.host].base_dir)
    root = shlex.quote(lay.synapse(sn))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    work = f"{lay.base}/.synapse-fabric/upgrade/{sn}"
    dump_dir = f"{work}/{stamp}"
    if inv.hosts[hs.host].images == "push":
        docker.push_images(remote, [new], log)
    else:
        docker.pull_images(remote, [new], log)
    if hs.postgres.elsewhere:  # its way back must be possible before Synapse stops
        remote.run(external_load_program(remote, hs, "check"), what=f"{sn}: can a dump go back into its database")
    t0 = time.monotonic()
    remote.run(f"{COMPOSE_FN}cd {root} && compose stop {processes(hs)}", what=f"{sn}: stop Synapse")
    log(f"{sn}: Synapse stopped")
    try:
        remote.run(program("database.sh", "dump.sh", project=synapse_project(hs), server_name=sn,
                           **database.inputs(inv, hs), staging=dump_dir), what=f"{sn}: dump its database", timeout=7200)
    except SfabError:  # nothing changed yet: the same Synapse serves again
        remote.run(f"{COMPOSE_FN}cd {root} && compose start {processes(hs)}", what=f"{sn}: start Synapse again")
        log(f"{sn}: no dump, no upgrade: {old} serves again")
        raise
    schema = remote.run(f"cat {shlex.quote(dump_dir)}/schema-version", what="schema version").out.strip()
    log(f"{sn}: database dumped ({dump_dir}/database.pgdump, schema version {schema})")
    try:
        _converge(remote, inv, hs, new, log)
        check_answers(remote, hs)
    except SfabError as exc:
        failed_log = f"{dump_dir}/failed-synapse.log"
        remote.run(f"c={container(synapse_project(hs), 'synapse')}; c=${{c:-$(docker ps -aq --filter "
                   f"label=com.docker.compose.project={synapse_project(hs)} --filter "
                   f"label=com.docker.compose.service=synapse | head -n 1)}}; "
                   f"[ -n \"$c\" ] && docker logs --tail 2000 \"$c\" > {shlex.quote(failed_log)} 2>&1; "
                   f"{COMPOSE_FN}cd {root} && compose stop {processes(hs)}; true",
                   what=f"{sn}: keep the failed Synapse's logs, stop it and its workers")
        log(f"{sn}: {new} failed ({str(exc).splitlines()[0]}); rolling back to {old}")
        load_dump(remote, hs, dump_dir, log, recreate=True, forget_one_time_keys=False)
        _converge(remote, inv, hs, old, log)
        check_answers(remote, hs)
        raise RolledBack(f"{sn}: the upgrade to {new} failed and was rolled back: {old} runs again on the database "
                        f"as it was before (restored from {dump_dir}/database.pgdump, schema version {schema}). "
                        f"The failed Synapse's logs are on {hs.host} in {failed_log}") from None
    downtime = time.monotonic() - t0
    # the newest dump is kept (the way back by hand); older ones go
    remote.run(f"cd {shlex.quote(work)} && for d in *; do [ \"$d\" = {shlex.quote(stamp)} ] || rm -rf \"$d\"; done",
               what="older upgrade dumps")
    log(f"{sn}: runs {new} (downtime {downtime:.1f}s: Synapse stopped, dump, start, healthy, a sync answered); "
        f"the dump taken before is kept in {dump_dir}")
    return downtime


def upgrade(inv: Inventory, homeserver: Optional[str], check: bool, log: Log) -> dict[str, float]:
    """Upgrade one homeserver, or every one that needs it, one at a time; the
    downtime of each."""
    steps = plan(inv, homeserver)
    for step in steps:
        log(step.line())
    if check:
        return {}
    for step in steps:
        if step.due:
            refuse_remote(inv.homeserver(step.server_name), "inv upgrade")
    downtimes = {}
    for step in steps:
        if not step.due:
            continue
        hs = inv.homeserver(step.server_name)
        with locked(inv, inv.hosts[hs.host]) as remote:
            downtimes[hs.server_name] = upgrade_one(remote, inv, hs, step.running, step.wanted, log)
    if not any(step.due for step in steps):
        log("nothing to upgrade")
    return downtimes
