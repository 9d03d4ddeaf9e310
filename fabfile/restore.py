"""`inv restore`: a homeserver back from a snapshot (fabfile/backup.py), onto the
host it ran on after a loss, or onto another host (`--to`, bare or not).

  1. refuse to make a second copy: with --to, the old host must not run it;
  2. its files back under the target's base_dir (scripts/restore.sh), whatever the
     target held for it moved aside, never deleted;
  3. the target converged with the homeserver held (Docker installed if missing,
     PostgreSQL started on an empty data directory, Synapse not started);
  4. the dump restored into that fresh database (never over an existing one), the
     one-time keys emptied (Synapse's backup guidance), the schema version checked.
     A database elsewhere (postgres.external, postgres.host; the latter's host
     converged first, letting the target in) is emptied in the same transaction
     that restores the dump, what it held dumped aside first;
  5. the target converged again: Synapse starts on the restored signing key,
     secrets and media; with --to, hosts.yaml records the new host.
A failure before step 5 leaves Synapse stopped and the snapshot untouched: run
it again.
"""

from __future__ import annotations

import shlex
import time
from typing import Callable, Optional

from .converge import converge_as, converge_other
from . import backup as backup_mod, database, docker
from .workers import refuse_remote
from .docker import COMPOSE_FN, container
from .errors import TaskError
from .inventory import Homeserver, Host, Inventory, rewrite
from .layout import Layout
from .remote import Remote, RemoteError, locked, open_remote
from .render import synapse_project
from .shell import program

Log = Callable[[str], None]


def _old_host_state(inv: Inventory, hs: Homeserver, log: Log) -> None:
    """With --to: the host it ran on must not serve it any more (lost, or emptied)."""
    old = inv.hosts[hs.host]
    try:
        remote = open_remote(inv, old)
    except RemoteError as exc:
        log(f"{old.name} does not answer ({str(exc).splitlines()[0]}): taken as lost")
        return
    try:
        root = shlex.quote(Layout(old.base_dir).synapse(hs.server_name))
        running = remote.run(f"[ -f {root}/docker-compose.yml ] && docker ps -q --filter "
                             f"label=com.docker.compose.project={synapse_project(hs)} | head -n 1 || true",
                             what="does the old host run it").out.strip()
    finally:
        remote.close()
    if running:
        raise TaskError(f"{hs.server_name} still runs on {old.name}: restoring it on another host would make a "
                        f"second copy with the same signing key. To move a running homeserver use "
                        f"`inv migrate-host --homeserver {hs.server_name} --to HOST`; to replace a broken one, "
                        f"take it down first (or restore onto {old.name})")


def converge_holding(remote: Remote, inv: Inventory, log: Log, migrating: str, hold=()) -> None:
    """Converge one host for an operation that brings a homeserver (`migrating`) in,
    Docker installed if missing, `hold`'s Synapse not started."""
    converge_as(remote, inv, log, install=True, hold=hold, migrating=migrating)


def empty_database(remote: Remote, hs: Homeserver, recreate: bool = False) -> str:
    """Wait for the homeserver's new PostgreSQL and make sure its database is empty
    (`recreate`: dropped and made again first, UTF8 with C collation and ctype): a
    dump is never restored over an existing database. Returns the shell that sets
    $pg to its container."""
    pg = hs.postgres
    find_pg = f"pg={container(synapse_project(hs), 'postgres')}; "
    # a fresh data directory: the image's first start runs initdb on a temporary
    # server (socket only) and stops it; the real one is the one that listens on TCP
    remote.run(find_pg + f'for i in $(seq 120); do docker exec "$pg" pg_isready -q -h 127.0.0.1 -U {pg.user} '
               '&& exit 0; sleep 1; done; echo "PostgreSQL did not start" >&2; exit 1',
               what="PostgreSQL ready", timeout=180)
    if recreate:  # identifiers validated by the inventory
        remote.run(find_pg + f'docker exec -i "$pg" psql -X -q -v ON_ERROR_STOP=1 -U {pg.user} -d postgres',
                   stdin=(f'DROP DATABASE IF EXISTS "{pg.database}";\n'
                          f'CREATE DATABASE "{pg.database}" OWNER "{pg.user}" ENCODING \'UTF8\' LC_COLLATE \'C\' '
                          "LC_CTYPE 'C' TEMPLATE template0;\n").encode(), what="an empty database")
    tables = remote.run(find_pg + f'docker exec "$pg" psql -X -At -U {pg.user} -d {pg.database} -c '
                        "\"SELECT count(*) FROM pg_tables WHERE schemaname = 'public'\"",
                        what="the database is empty").out.strip()
    if tables != "0":
        raise TaskError(f"{hs.server_name}'s database on {remote.name} already has {tables} tables: a dump is "
                        "never restored over an existing database (Synapse's guidance)")
    return find_pg


def load_dump(remote: Remote, hs: Homeserver, dump_dir: str, log: Log, recreate: bool = False,
              forget_one_time_keys: bool = True, keep: str = "") -> str:
    """pg_restore `dump_dir`/database.pgdump into the homeserver's database, which
    must be empty (`recreate`: dropped and made again first, UTF8 with C collation and
    ctype); `forget_one_time_keys`: empty that table after (a backup's restore). The
    schema version must be the one the dump recorded; returns it. An external
    database is emptied instead of made again (fabfile/scripts/load-dump-external.sh),
    what it held dumped to `keep` first when set."""
    if hs.postgres.elsewhere:
        return _load_external(remote, hs, dump_dir, log, forget_one_time_keys, keep)
    pg = hs.postgres
    find_pg = empty_database(remote, hs, recreate)
    dump = shlex.quote(f"{dump_dir}/database.pgdump")
    t0 = time.monotonic()
    remote.run(find_pg + f'docker exec -i "$pg" pg_restore -U {pg.user} -d {pg.database} --no-owner '
               f"--exit-on-error --single-transaction < {dump}", what="pg_restore", timeout=7200)
    expected = remote.run(f"cat {shlex.quote(dump_dir + '/schema-version')}", what="schema version").out.strip()
    sql = ("TRUNCATE e2e_one_time_keys_json; " if forget_one_time_keys else "") + "SELECT version FROM schema_version"
    found = remote.run(find_pg + f'docker exec "$pg" psql -X -At -U {pg.user} -d {pg.database} -c "{sql}"',
                       what="schema version").out.strip().splitlines()[-1]
    if found != expected:
        raise TaskError(f"{hs.server_name}: the restored database has schema version {found}, the dump "
                        f"recorded {expected}")
    log(f"{hs.server_name}: database restored in {time.monotonic() - t0:.1f}s (schema version {found})"
        + ("; one-time keys emptied: clients upload new ones" if forget_one_time_keys else ""))
    return found


def external_load_program(remote: Remote, hs: Homeserver, action: str, dump: str = "", forget: bool = False,
                          keep: str = "") -> str:
    return program("database.sh", "load-dump-external.sh", **database.inputs(remote.inv, hs), project=synapse_project(hs),
                   server_name=hs.server_name, action=action, dump=dump, forget=int(forget), keep=keep)


def _load_external(remote: Remote, hs: Homeserver, dump_dir: str, log: Log, forget_one_time_keys: bool,
                   keep: str = "") -> str:
    t0 = time.monotonic()
    out = remote.run(external_load_program(remote, hs, "load", f"{dump_dir}/database.pgdump", forget_one_time_keys,
                                           keep), what="empty the database elsewhere, pg_restore", timeout=7200).out
    lines = out.strip().splitlines()
    for line in lines:
        if line.startswith("kept "):
            log(f"{hs.server_name}: what its database held is kept aside in {line[5:]} (pg_dump -Fc)")
    found = lines[-1] if lines else ""
    expected = remote.run(f"cat {shlex.quote(dump_dir + '/schema-version')}", what="schema version").out.strip()
    if found != expected:
        raise TaskError(f"{hs.server_name}: the restored database has schema version {found}, the dump "
                        f"recorded {expected}")
    log(f"{hs.server_name}: database restored on {hs.postgres.where} in {time.monotonic() - t0:.1f}s "
        f"(schema version {found})" + ("; one-time keys emptied: clients upload new ones" if forget_one_time_keys else ""))
    return found


def restore(inv: Inventory, sn: str, snapshot: Optional[str], to: Optional[str], log: Log,
            confirm: Callable[[str], bool]) -> None:
    """Bring a homeserver back from its newest (or a given) snapshot."""
    hs = inv.homeserver(sn)
    refuse_remote(hs, "inv restore")
    target: Host = inv.host_by_name_or_address(to) if to else inv.hosts[hs.host]
    moving = target.name != hs.host
    if moving and inv.backup.repository.startswith("/"):
        raise TaskError(f"backup.repository ({inv.backup.repository}) is a directory on each host: the snapshots "
                        f"{hs.host} took are not on {target.name}. Restoring onto another host needs a repository "
                        "off the hosts (sftp:, rest:, s3:)")
    # the snapshots are in the repository of the host it ran on, under that host's password
    source = backup_mod.repository_inputs(inv, hs.host)
    if snapshot is not None and not all(c in "0123456789abcdef" for c in snapshot.lower()):
        raise TaskError(f"--snapshot {snapshot!r} is not a snapshot ID (hex, as `inv backups` shows)")
    password = backup_mod.password_copy(inv.hosts[hs.host])
    given = password.read_bytes() if password.exists() else b""
    if moving and not given:
        raise TaskError(f"the repository password of {hs.host} is not on this machine ({password}): put the "
                        "copy you kept there, or restore onto the host itself")
    if moving:
        _old_host_state(inv, hs, log)
    after = inv.with_homeserver(hs, host=target.name) if moving else inv
    lay = Layout(target.base_dir)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    keep_aside = f"{lay.base}/.synapse-fabric/before-restore/{sn}-{stamp}"
    if hs.postgres.host:  # its database's host first: running, and letting the target in
        converge_other(after, hs.postgres.host, log, migrating=sn)
    with locked(inv, target) as remote:
        running = remote.run(f"docker ps -q --filter label=com.docker.compose.project={synapse_project(hs)} "
                             "2>/dev/null | head -n 1; true", what="is it running here").out.strip()
        if running and not confirm(f"{sn} is running on {target.name}: replace it with the snapshot (its "
                                   f"current directory is kept aside in {lay.base}/.synapse-fabric/before-restore/)?"):
            raise TaskError("nothing was changed")
        dump_dir = f"{lay.base}/.synapse-fabric/restore/{sn}"
        docker.install(remote, log)  # a bare host: Docker, jq and restic first
        script = COMPOSE_FN + program(
            "restic.sh", "restore.sh", **source, password_stdin="yes" if given else "no", adopt="no" if moving else "yes",
            server_name=sn, tag=backup_mod.tag(hs), snapshot=snapshot or "latest", base=lay.base,
            staging=f"{lay.base}/.synapse-fabric/restore/{sn}.files", dump_dir=dump_dir,
            keep_aside=keep_aside)
        t0 = time.monotonic()
        out = remote.run(script, stdin=given, what=f"{sn}: files from the snapshot", timeout=6 * 3600).out
        log(f"{sn}: {out.strip().splitlines()[-1]} in {time.monotonic() - t0:.1f}s")
        remote.run(f"rm -f {shlex.quote(lay.uninstalled(sn))}", what="an uninstall's record, if any")
        if hs.postgres.host:  # the snapshot's passfile may hold a password its database's host no longer has
            remote.run(f"rm -f {shlex.quote(lay.secret(sn, 'pgpass'))}", what="the passfile, read again there")
        converge_holding(remote, after, log, sn, hold=(sn,))
        load_dump(remote, after.homeserver(sn), dump_dir, log, keep=f"{keep_aside}/database.pgdump")
        converge_holding(remote, after, log, sn)
        remote.run(f"rm -rf {shlex.quote(dump_dir)}", what="the restored dump")
        if moving:
            log(f"{sn}'s next snapshots go to {target.name}'s repository ({backup_mod.repository(inv, target.name)}); "
                f"the older ones stay in {backup_mod.repository(inv, hs.host)}")
    if moving:
        rewrite(inv.path, lambda doc: doc["homeservers"][sn].__setitem__("host", target.name))
        log(f"{inv.path} now says {sn} runs on {target.name}. Point the DNS records of "
            f"{', '.join(dict.fromkeys([hs.server_name, hs.hostname]))} at {target.address}.")
    log(f"done: {sn} runs on {target.name} from its snapshot")
