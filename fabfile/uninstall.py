"""`inv uninstall`: take one homeserver off its host (or everything synapse-fabric
put on a host), after a last snapshot (fabfile/backup.py).

One homeserver, in an order a re-run can finish from any point (hosts.yaml still
names it until the end):
  1. stop its Synapse (nothing is written after the snapshot), start its database
     if it is not running;
  2. the snapshot (or, with --no-backup, the operator typed its name);
  3. its stack down and its directory removed, then the host converged without
     it: vhosts, Element, admin UI, certificate renewal and timers as if it had
     never been there; the others keep serving;
  4. what certbot and the proxy kept for it (certificate, well-known, Element's
     releases, its network), and a record on the host that it was uninstalled, so
     a deploy from a stale hosts.yaml does not start an empty one under its name;
  5. its entry removed from hosts.yaml (comments kept).
"""

from __future__ import annotations

import shlex
import time
from typing import Callable, Optional

from .converge import converge_as
from . import backup as backup_mod
from .docker import COMPOSE_FN
from .errors import InventoryError, TaskError
from .facts import PERIODIC_JOBS
from .inventory import Homeserver, Inventory, rewrite
from .layout import BASE_RECORD, CRON_DIR, FIREWALL_DIR, SYSTEMD_DIR, Layout
from .remote import Remote, locked
from .render import FIREWALL_UNIT, public_names, synapse_network
from .shell import program
from .workers import processes, refuse_remote, worker_hosts

Log = Callable[[str], None]
Confirm = Callable[[str, str], bool]  # (question, the answer to type) -> typed it


def _without(inv: Inventory, names: set[str]) -> Inventory:
    return inv.replace(homeservers={k: v for k, v in inv.homeservers.items() if k not in names})


def _refuse_migrations(inv: Inventory, servers: list[Homeserver]) -> None:
    for hs in servers:
        if hs.migrated_from:
            raise TaskError(f"{hs.server_name} is being moved from {hs.migrated_from} (migrated_from in {inv.path}): "
                            f"finish the migration first (inv migrate-host --homeserver {hs.server_name} --finish)")


def _confirmed(servers: list[Homeserver], where: str, backup: bool, confirm: Confirm) -> None:
    if backup:
        return
    answer = " ".join(hs.server_name for hs in servers) or where
    if not confirm(f"Remove {where} and ALL its data WITHOUT a backup (messages, media, keys: gone for good)?",
                   answer):
        raise TaskError("nothing was removed (the confirmation did not match)")


def _take_down(remote: Remote, inv: Inventory, hs: Homeserver, backup: bool, log: Log) -> Optional[str]:
    """Steps 1-3a for one homeserver; its snapshot's ID (None without a backup, or
    when an earlier run already removed it)."""
    lay = Layout(inv.hosts[hs.host].base_dir)
    root = shlex.quote(lay.synapse(hs.server_name))
    present = remote.run(f"[ -f {root}/docker-compose.yml ] && echo yes || true", what="is it here").out.strip()
    if present != "yes":
        log(f"{hs.server_name}: its stack is already gone from {hs.host} (an earlier run): finishing")
        return None
    snap = None
    if backup:
        if hs.postgres.elsewhere:  # the operator's server, or another host's: it stays up
            remote.run(f"{COMPOSE_FN}cd {root} && compose stop {processes(hs)}",
                       what=f"{hs.server_name}: stop Synapse for the snapshot", timeout=300)
        else:
            remote.run(f"{COMPOSE_FN}cd {root} && compose stop {processes(hs)} && compose up -d --no-deps postgres",
                       what=f"{hs.server_name}: stop Synapse, keep its database up for the snapshot", timeout=300)
            remote.run(f"{COMPOSE_FN}cd {root} && for i in $(seq 60); do "
                       f"compose exec -T postgres pg_isready -q -U {shlex.quote(hs.postgres.user)} && exit 0; "
                       "sleep 1; done; exit 1", what=f"{hs.server_name}: wait for its database", timeout=120)
        t0 = time.monotonic()
        taken = backup_mod.snapshot(remote, inv, hs)
        snap = taken.id
        log(f"{hs.server_name}: last snapshot {taken.short_id} in {backup_mod.repository(inv, hs.host)} "
            f"in {time.monotonic() - t0:.1f}s")
    record = shlex.quote(lay.uninstalled(hs.server_name))
    fields = f"at={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}" + (
        f" snapshot={snap} repository={backup_mod.repository(inv, hs.host)}" if snap else " snapshot=")
    remote.run(f"{COMPOSE_FN}mkdir -p {shlex.quote(lay.uninstalled_dir)} && "
               f"printf '%s\\n' {shlex.quote(fields)} > {record}.new && mv {record}.new {record} && "
               f"cd {root} && compose down --remove-orphans && cd / && rm -rf {root}",
               what=f"{hs.server_name}: stack down, directory removed", timeout=600)
    log(f"{hs.server_name}: stopped and removed from {hs.host} ({lay.synapse(hs.server_name)})")
    return snap


def _leftovers(hs: Homeserver, lay: Layout) -> list[str]:
    """What the reverse proxy and certbot kept for a homeserver (not the ACME account,
    which the host's other homeservers share)."""
    paths = [f"{lay.base}/{p}" for p in Layout.acme_paths(hs.server_name) if not p.endswith("/accounts")]
    paths.append(lay.well_known(hs.server_name))
    if hs.element.enabled:
        paths.append(lay.element_site(hs.element.hostname))
    return paths


def _release_proxies(inv: Inventory, after: Inventory, servers: list[Homeserver], log: Log) -> None:
    """The hosts that served the federation of `servers` (federation.via): converged
    without them, then their certificate, well-known and upstream CA removed."""
    for via in sorted({hs.federation.via for hs in servers if hs.federation.via}):
        host = inv.hosts[via]
        lay = Layout(host.base_dir)
        gone = [hs for hs in servers if hs.federation.via == via]
        with locked(inv, host) as remote:
            converge_as(remote, after, log)
            paths = [p for hs in gone for p in _leftovers(hs, lay) + [lay.upstream_ca(hs.server_name)]]
            remote.run(f"rm -rf {' '.join(shlex.quote(p) for p in paths)}",
                       what=f"{', '.join(hs.server_name for hs in gone)}: certificate and well-known removed from {via}")
        log(f"{via} no longer serves {', '.join(hs.server_name for hs in gone)}")


def _release_databases(inv: Inventory, after: Inventory, servers: list[Homeserver], log: Log) -> None:
    """The databases other hosts ran for `servers` (postgres.host), after their last
    snapshot: each stack down, its directory (data, password) removed, and that host
    converged without it (its firewall closes the port)."""
    for hs in servers:
        if not hs.postgres.host:
            continue
        host = inv.hosts[hs.postgres.host]
        root = shlex.quote(Layout(host.base_dir).database(hs.server_name))
        with locked(inv, host) as remote:
            remote.run(f"{COMPOSE_FN}if [ -f {root}/docker-compose.yml ]; then (cd {root} && compose down "
                       f"--remove-orphans); fi && rm -rf {root}", what=f"{hs.server_name}: its database removed",
                       timeout=600)
            if host.name in after.hosts:
                converge_as(remote, after, log)
        log(f"{hs.server_name}: its database on {host.name} is removed ({Layout(host.base_dir).database(hs.server_name)})")


def _refuse_databases_of_others(inv: Inventory, host_name: str) -> None:
    for hs in inv.homeservers.values():
        if hs.postgres.host == host_name and hs.host != host_name:
            raise InventoryError(f"{host_name} runs the database of {hs.server_name} (on {hs.host}): uninstall "
                                 f"{hs.server_name} first, or move its database elsewhere (a dump and a restore)")


def uninstall_homeserver(inv: Inventory, sn: str, backup: bool, confirm: Confirm, log: Log) -> None:
    """Stop and remove one homeserver from its host (after a snapshot, or with the
    operator's typed confirmation); the host's other homeservers keep running."""
    hs = inv.homeserver(sn)
    refuse_remote(hs, "inv uninstall")
    _refuse_migrations(inv, [hs])
    _confirmed([hs], hs.server_name, backup, confirm)
    host = inv.hosts[hs.host]
    lay = Layout(host.base_dir)
    after = _without(inv, {hs.server_name})
    with locked(inv, host) as remote:
        snap = _take_down(remote, inv, hs, backup, log)
        converge_as(remote, after, log)
        remote.run(f"rm -rf {' '.join(shlex.quote(p) for p in _leftovers(hs, lay))}\n"
                   f"docker network rm {shlex.quote(synapse_network(hs))} >/dev/null 2>&1 || true",
                   what=f"{sn}: certificate, well-known and network removed")
        if backup:
            kept = backup_mod.keep_password(remote, host)
    _release_proxies(inv, after, [hs], log)
    _release_databases(inv, after, [hs], log)
    rewrite(inv.path, lambda doc: doc["homeservers"].pop(sn))
    log(f"done: {sn} is gone from {hs.host}; the others there keep serving. {inv.path} no longer names it."
        + (f" Its database on {hs.postgres.external.host} was not touched: that server is yours to clear."
           if hs.postgres.external else ""))
    if snap:
        log(f"Its last snapshot is {snap[:8]} in {backup_mod.repository(inv, hs.host)} "
            f"(repository password: {kept}); `inv backups --homeserver {sn}` lists it while hosts.yaml names it.")
    log(f"Remove the DNS records of {', '.join(public_names(hs))} when nothing should reach them any more.")


def uninstall_host(inv: Inventory, host_name: str, backup: bool, confirm: Confirm, log: Log) -> None:
    """Remove everything synapse-fabric put on a host: each homeserver (after its
    snapshot), the reverse proxy, timers and cron jobs, programs, records and the
    base directory. Docker, its images and the backup repository stay."""
    host = inv.host_by_name_or_address(host_name)
    servers = sorted(inv.homeservers_on(host.name), key=lambda hs: hs.server_name)
    for hs in servers:
        refuse_remote(hs, "inv uninstall")
    for hs in inv.homeservers.values():
        if host.name in worker_hosts(hs):
            raise InventoryError(f"{host.name} runs workers of {hs.server_name} (on {hs.host}): take {host.name} "
                                 f"out of homeservers.{hs.server_name}.workers.hosts and deploy first")
    _refuse_databases_of_others(inv, host.name)
    forwarded = inv.forwarded_from(host.name)
    if forwarded:
        raise TaskError(f"{host.name} still forwards {', '.join(hs.server_name for hs in forwarded)} to its new "
                        "host: finish those migrations first (inv migrate-host --homeserver S --finish)")
    _refuse_migrations(inv, servers)
    _confirmed(servers, f"everything synapse-fabric put on {host.name}", backup, confirm)
    lay = Layout(host.base_dir)
    units = [f"{job}.{kind}" for job in PERIODIC_JOBS for kind in ("timer", "service")] + [FIREWALL_UNIT]
    crons = [*PERIODIC_JOBS, "synapse-fabric-firewall"]
    with locked(inv, host) as remote:
        snaps = {hs.server_name: _take_down(remote, inv, hs, backup, log) for hs in servers}
        base = shlex.quote(lay.base)
        remote.run(
            f"{COMPOSE_FN}if [ -f {shlex.quote(lay.proxy)}/docker-compose.yml ]; then "
            f"(cd {shlex.quote(lay.proxy)} && compose down --remove-orphans); fi\n"
            # stacks of other hosts' homeservers the inventory no longer names (workers, a database)
            f"for f in {base}/synapse-workers/*/docker-compose.yml {base}/synapse-db/*/docker-compose.yml; do "
            "[ -f \"$f\" ] && (cd \"${f%/*}\" && compose down --remove-orphans); done\n"
            f"if [ \"$(cat /proc/1/comm)\" = systemd ]; then systemctl disable --now {' '.join(units)} "
            f">/dev/null 2>&1 || true; fi\n"
            f"rm -f {' '.join(shlex.quote(f'{SYSTEMD_DIR}/{u}') for u in units)} "
            f"{' '.join(shlex.quote(f'{CRON_DIR}/{job}') for job in crons)}\n"
            f"if [ \"$(cat /proc/1/comm)\" = systemd ]; then systemctl daemon-reload; fi\n"
            f"for n in $(docker network ls -q --filter name=^synapse-fabric); do docker network rm \"$n\" "
            f">/dev/null 2>&1 || true; done\n"
            f"rm -rf {base} {shlex.quote(BASE_RECORD)}\n"
            # the firewall's chains, rules and program (the host is as open as before it)
            + program("firewall.sh", action="off", dir=FIREWALL_DIR),
            what=f"{host.name}: reverse proxy, timers, firewall and {lay.base} removed", timeout=600)
        if backup and servers:
            kept = backup_mod.keep_password(remote, host)
    after = _without(inv, {hs.server_name for hs in servers})
    _release_proxies(inv, after.replace(hosts={k: v for k, v in after.hosts.items() if k != host.name}),
                     servers, log)
    _release_databases(inv, after, servers, log)

    def change(doc):
        for hs in servers:
            doc["homeservers"].pop(hs.server_name)
        doc["hosts"].pop(host.name)
    rewrite(inv.path, change)
    log(f"done: {host.name} holds nothing of synapse-fabric's any more ({lay.base} removed); Docker, its images, "
        f"the backup repository and its password ({backup_mod.BACKUP_PASSWORD}) are still there. "
        f"{inv.path} no longer names {host.name}"
        + (f" nor {', '.join(snaps)}" if snaps else "") + ".")
    for sn, snap in snaps.items():
        if snap:
            log(f"{sn}: last snapshot {snap[:8]} in {backup_mod.repository(inv, host.name)} "
                f"(repository password kept here: {kept})")
