"""`inv upgrade-postgres`: a homeserver's database onto a newer PostgreSQL major
version, beside the old one, with a way back.

  1. refused before anything stops when the filesystem cannot hold a second copy;
  2. the new image onto the host while the old database serves;
  3. Synapse stopped; a new cluster (the new major, initialised as the first one:
     UTF8, C collation and ctype) started beside the old one, and the database
     streamed into it (pg_dump | pg_restore, in one transaction, no copy on disk);
  4. the row count of every table, and Synapse's schema version, compared between
     the two: any difference and the new cluster is dropped, Synapse starts again on
     the old one, nothing else changed;
  5. the switch: the old data directory kept as postgres-<old major>.old, the new
     one in its place, hosts.yaml told the homeserver's image, the homeserver
     converged and checked (healthy, a sync answered); a failure there switches back.
`--rollback` returns to the kept directory (what was written since is lost, and
said so); `--finish` removes it.
"""

from __future__ import annotations

import shlex
import time
from typing import Callable, Optional

from .converge import converge_as
from .database import refuse_external
from . import docker
from .docker import COMPOSE_FN
from .errors import RolledBack, SfabError, TaskError
from .facts import parse as parse_facts, script as facts_script
from .inventory import Homeserver, Inventory, load, rewrite
from .layout import Layout
from .remote import Remote, locked
from .render import render_host, synapse_project
from .schema import postgres_major
from .shell import program
from .upgrade import check_answers
from .workers import processes, refuse_remote

Log = Callable[[str], None]
RECORD = ".postgres-upgrade"


def target_image(inv: Inventory, to: int) -> str:
    """The image of major `to`: the inventory's default when it is that major, else
    the official one (postgres:<to>-trixie)."""
    default = inv.image("postgres")
    return default if postgres_major(default) == to else f"postgres:{to}-trixie"


def _set_image(inv: Inventory, sn: str, image: Optional[str]) -> Inventory:
    """hosts.yaml (comments kept) and the loaded inventory: the homeserver's
    postgres.image set, or removed (None: the default)."""
    def change(doc):
        entry = doc["homeservers"][sn]
        pg = entry.setdefault("postgres", {})
        if image is None:
            pg.pop("image", None)
            if not pg:
                entry.pop("postgres")
        else:
            pg["image"] = image
    rewrite(inv.path, change)
    return load(inv.path)


def _converge(remote: Remote, inv: Inventory, log: Log) -> None:
    converge_as(remote, inv, log)


def _record(remote: Remote, root: str) -> dict[str, str]:
    text = remote.run(f"cat {shlex.quote(root)}/{RECORD} 2>/dev/null; true", what="an upgrade in progress").out
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _counts(remote: Remote, hs: Homeserver, **which: str) -> dict[str, str]:
    """{table: row count} of the homeserver's database, in the container `name=` or
    in its compose project's PostgreSQL (`project=`)."""
    out = remote.read(program("pg-counts.sh", **which, pg_user=hs.postgres.user, pg_db=hs.postgres.database),
                     what="row counts", timeout=3600).out
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def upgrade_postgres(inv: Inventory, sn: str, to: Optional[int], finish: bool, rollback: bool, log: Log) -> None:
    """Move one homeserver's database to PostgreSQL `to` (or finish / roll back)."""
    hs = inv.homeserver(sn)
    refuse_remote(hs, "inv upgrade-postgres")
    refuse_external(hs, "inv upgrade-postgres", "its major version is upgraded where that server runs")
    host = inv.hosts[hs.host]
    lay = Layout(host.base_dir)
    root = lay.synapse(sn)
    q = shlex.quote
    with locked(inv, host) as remote:
        record = _record(remote, root)
        if finish or rollback:
            if not record:
                raise TaskError(f"{sn} has no PostgreSQL upgrade to finish or roll back on {hs.host}")
            if finish:
                remote.run(f"rm -rf {q(root)}/postgres-{int(record['from'])}.old {q(root)}/{RECORD}",
                           what="remove the old data directory")
                log(f"{sn}: finished: its PostgreSQL {record['from']} data directory is removed")
                return
            _switch_back(remote, inv, hs, record, log)
            return
        if record:
            raise TaskError(f"{sn} was moved to PostgreSQL {record['to']} on {record.get('at', '?')}: finish it "
                            f"(--finish) or roll it back (--rollback) first")
        state = render_host(inv, remote.name)
        facts = parse_facts(remote.run(facts_script(state), what="gather facts").out, state)
        old = facts.pg_major.get(sn)
        if old is None:
            raise TaskError(f"{sn} has no database on {hs.host} yet")
        if to is None or to <= old:
            raise TaskError(f"{sn}'s database is PostgreSQL {old}: --to must name a newer major (e.g. --to 17)")
        new_image = target_image(inv, to)
        postgres_major(new_image)  # 18+ refused here, as in the inventory
        old_image = facts.container_image(synapse_project(hs), "postgres") or state.postgres_image(hs)
        # 1. room for a second copy, before anything stops
        used_kb, free_kb = (int(x) for x in remote.run(
            f"du -sk {q(root)}/postgres | cut -f1; df -Pk {q(root)} | awk 'NR == 2 {{ print $4 }}'",
            what="space").out.split())
        need_kb = 2 * used_kb + 64 * 1024
        if free_kb < need_kb:
            raise TaskError(f"{sn}: not enough space on {hs.host} for PostgreSQL {to} beside {old}: "
                            f"{free_kb // 1024} MiB free where {root} is, about {need_kb // 1024} MiB needed "
                            f"(the database takes {used_kb // 1024} MiB); nothing was changed")
        log(f"{sn}: PostgreSQL {old} -> {to} ({new_image}); {used_kb // 1024} MiB of data, {free_kb // 1024} MiB free")
        # 2. the image, while the old one serves
        (docker.push_images if host.images == "push" else docker.pull_images)(remote, [new_image], log)
        # 3. Synapse stopped; the new cluster beside the old; the data streamed
        t0 = time.monotonic()
        remote.run(f"{COMPOSE_FN}cd {q(root)} && compose stop {processes(hs)}", what=f"{sn}: stop Synapse")
        name = f"synapse-fabric-pg{to}-{hs.slug}"
        pg = hs.postgres
        try:
            remote.run(program("pg-new-cluster.sh", root=root, image=new_image, name=name, pg_user=pg.user,
                               pg_db=pg.database), what=f"PostgreSQL {to} beside {old}", timeout=300)
            remote.run(program("pg-copy.sh", project=synapse_project(hs), name=name, pg_user=pg.user,
                               pg_db=pg.database), what="pg_dump | pg_restore", timeout=6 * 3600)
            # 4. every table's row count, and the schema version, the same on both
            before = _counts(remote, hs, project=synapse_project(hs))
            after = _counts(remote, hs, name=name)
            if before != after or not before:
                differ = sorted(t for t in set(before) | set(after) if before.get(t) != after.get(t))
                raise TaskError(f"the copy differs from the original in {len(differ)} table(s): "
                                f"{', '.join(differ[:5]) or '(no tables read)'}")
            log(f"{sn}: {len(before) - 1} tables, the same row counts in PostgreSQL {old} and {to}, "
                f"Synapse's schema version {before.get('synapse schema version', '?')} in both")
        except SfabError as exc:
            remote.run(f"docker rm -f {q(name)} >/dev/null 2>&1; rm -rf {q(root)}/postgres-new; "
                       f"{COMPOSE_FN}cd {q(root)} && compose up -d synapse", what="drop the new cluster, start Synapse")
            raise RolledBack(f"{sn}: the move to PostgreSQL {to} stopped before the switch ({exc}); the new "
                             f"cluster is gone and Synapse runs again on PostgreSQL {old}, unchanged") from None
        # 5. the switch
        at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        fields = f"from={old}\nto={to}\nold_image={old_image}\nnew_image={new_image}\nat={at}\n" \
                 f"inventory_image={hs.postgres.image or ''}\n"
        remote.run(f"{COMPOSE_FN}docker rm -f {q(name)} >/dev/null && cd {q(root)} && compose stop postgres && "
                   f"cat > {RECORD}.new && mv {RECORD}.new {RECORD} && "
                   f"mv postgres postgres-{old}.old && mv postgres-new postgres",
                   stdin=fields.encode(), what="switch the data directories")
        after_inv = _set_image(inv, sn, None if postgres_major(inv.image("postgres")) == to else new_image)
        try:
            _converge(remote, after_inv, log)
            check_answers(remote, after_inv.homeserver(sn))
        except SfabError as exc:
            log(f"{sn}: PostgreSQL {to} did not come up ({str(exc).splitlines()[0]}); switching back")
            _switch_back(remote, after_inv, after_inv.homeserver(sn), _record(remote, root), log)
            raise RolledBack(f"{sn}: PostgreSQL {to} failed after the switch and was switched back to {old}") from None
        log(f"{sn}: runs on PostgreSQL {to} (downtime {time.monotonic() - t0:.1f}s: Synapse stopped to a sync "
            f"answered). PostgreSQL {old}'s data directory is kept in {root}/postgres-{old}.old: "
            f"`--finish` removes it, `--rollback` returns to it. {inv.path} now gives it {new_image}"
            + (" (the default)" if after_inv.homeserver(sn).postgres.image is None else ""))


def _switch_back(remote: Remote, inv: Inventory, hs: Homeserver, record: dict, log: Log) -> None:
    """The kept data directory back in place, hosts.yaml as it was, converged."""
    root = Layout(inv.hosts[hs.host].base_dir).synapse(hs.server_name)
    old, to = int(record["from"]), int(record["to"])
    q = shlex.quote
    stamp = time.strftime("%Y%m%dT%H%M%S")
    remote.run(f"{COMPOSE_FN}cd {q(root)} && compose stop {processes(hs)} postgres && "
               f"mv postgres postgres-{to}.rolled-back-{stamp} && mv postgres-{old}.old postgres && rm -f {RECORD}",
               what="switch the data directories back")
    back = _set_image(inv, hs.server_name, record.get("inventory_image") or None)
    _converge(remote, back, log)
    check_answers(remote, back.homeserver(hs.server_name))
    log(f"{hs.server_name}: back on PostgreSQL {old} with its data as it was before the move; what was written "
        f"on PostgreSQL {to} since is not in it (kept aside in {root}/postgres-{to}.rolled-back-{stamp})")
