"""`inv adopt`: bring a homeserver set up by hand (docker-compose or `docker run`,
PostgreSQL or SQLite) under management, keeping its identity: server_name,
signing key, database, media, users and their passwords.

    found      on --from: the Synapse container serving the server_name (or the one
               of --compose / --data), its homeserver.yaml, signing key, media and
               database (PostgreSQL in a container on its network, or SQLite);
               --dry-run stops here and prints what it found and would do
    begun      checks passed (database encoding, room on the target); hosts.yaml
               gets an entry for it if it had none; the target records the adoption
    copied     while the old one runs: its data directory (config files, appservice
               registrations, media), the signing key, the adopted homeserver.yaml
               (kept settings; see fabfile/adopt_config.py); the target converged
               with the homeserver held (its PostgreSQL started, Synapse not);
               SQLite: synapse_port_db's first pass on a snapshot
    stopped    the old Synapse stopped, its restart policy set to "no" (downtime)
    restored   PostgreSQL: pg_dump | pg_restore, streamed, into a new database with
               C collation; SQLite: synapse_port_db's final pass (new rows); media
               changed meanwhile copied again; the old database container stopped
    started    the target converged: Synapse starts on the old signing key
               (downtime ends)

The old containers are kept, stopped (never deleted) until `inv adopt --finish`,
which removes the containers and leaves their files; `--abort` puts the old
deployment back (restart policies too) and moves the new copy aside. A failure
before `started` rolls back by itself; a killed run is rolled back by the next.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from typing import Callable, Optional

import yaml

from .database import refuse_external
from . import adopt_config as ac
from .docker import COMPOSE_FN, container
from .errors import RolledBack, TaskError
from .inventory import Inventory, load, rewrite
from .layout import SYNAPSE_UID, Layout
from .remote import Remote, RemoteError, open_remote
from .render import synapse_project
from .restore import converge_holding, empty_database
from .schema import Homeserver, check_domain
from .shell import program

Log = Callable[[str], None]
PHASES = ["begun", "copied", "stopped", "restored", "started"]
# what never comes over from the old data directory (the database is dumped or
# ported; logs and the pid file are the old process's)
SKIPPED = ("*.db", "*.db-journal", "*.db-wal", "*.db-shm", "*.log", "*.log.*", "homeserver.pid")


@dataclass
class Found:
    """What `inv adopt` found of the hand-made homeserver on its host."""

    syn: ac.OldSynapse
    config_path: str          # on the host
    config_text: str
    config: dict
    data_dir: str             # the old data directory on the host (comes over whole)
    data_in_container: str
    signing_key: str          # on the host
    media: str                # on the host
    media_kib: int
    db_kind: str              # "postgres" | "sqlite"
    db_container: str = ""
    db_user: str = ""
    db_name: str = ""
    db_restart: str = ""
    db_encoding: str = ""
    db_collate: str = ""
    db_ctype: str = ""
    db_kib: int = 0
    sqlite: str = ""          # on the host
    sqlite_in_container: str = ""
    schema: str = ""

    @property
    def containers(self) -> list[str]:
        return [self.syn.container] + ([self.db_container] if self.db_container else [])


def _inspect(remote: Remote) -> list[dict]:
    out = remote.run("ids=$(docker ps -aq); [ -z \"$ids\" ] && echo '[]' || docker inspect $ids",
                     what="the host's containers").out
    return json.loads(out or "[]")


def _one(remote: Remote, script: str, what: str) -> str:
    return remote.run(script, what=what).out.strip()


def discover(remote: Remote, inv: Inventory, sn: str, compose: str = "", data: str = "", db: str = "") -> Found:
    """Find the hand-made homeserver `sn` on `remote` (see the module's docstring)."""
    inspects = _inspect(remote)
    managed = {synapse_project(hs) for hs in inv.homeservers.values()}
    candidates = ac.synapse_containers(inspects, managed, compose, data)
    matches = []
    paths = {cand.container: cand.host_path(cand.config_in_container) for cand in candidates}
    texts = remote.read_files(sorted({p for p in paths.values() if p}))  # one round trip
    for cand in candidates:
        path = paths[cand.container]
        text = texts.get(path) if path else None
        if text is None:
            continue
        try:
            config = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise TaskError(f"{remote.name}: {path} (container {cand.container}) is not valid YAML: {exc}") from None
        if isinstance(config, dict) and config.get("server_name") == sn:
            matches.append((cand, path, text.decode(), config))
    where = " of " + (compose or data) if (compose or data) else ""
    if not matches:
        seen = ", ".join(c.container for c in candidates) or "none"
        raise TaskError(f"{remote.name}: no Synapse container{where} serves {sn} (Synapse containers not managed "
                        f"by synapse-fabric: {seen}). Give --compose PATH (its docker-compose.yml) or --data PATH "
                        "(the directory mounted as its /data)")
    if len(matches) > 1:
        raise TaskError(f"{remote.name}: several containers serve {sn}: {', '.join(m[0].container for m in matches)}; "
                        "choose one with --compose or --data")
    syn, path, text, config = matches[0]
    if syn.auto_remove:
        raise TaskError(f"{remote.name}: {syn.container} runs with --rm, started by something else (a systemd "
                        "unit, as the Ansible playbook does), which would start it again after adopt stops it; "
                        "adopting such a deployment is not supported yet: stop and disable that unit, start the "
                        "container with `docker run` (no --rm), then adopt")
    mount = syn.data_mount
    if mount is None:
        raise TaskError(f"{remote.name}: {syn.container}'s config {syn.config_in_container} is not on a mounted "
                        "directory: nothing of it survives the container; adopt needs it on the host")
    key_in = config.get("signing_key_path") or f"{mount.destination.rstrip('/')}/{sn}.signing.key"
    key = syn.host_path(key_in)
    media_in = config.get("media_store_path") or "media_store"
    media = syn.host_path(media_in)
    if not key or not media:
        raise TaskError(f"{remote.name}: {syn.container} keeps its "
                        + ("signing key" if not key else "media store")
                        + f" ({key_in if not key else media_in}) inside the container, not on a mount: adopt cannot copy "
                        "it from the host")
    sizes = _one(remote, f"test -s {shlex.quote(key)} || echo nokey; "
                         f"if [ -d {shlex.quote(media)} ]; then du -sk {shlex.quote(media)} | cut -f1; else echo 0; fi",
                 "the signing key and media")
    if "nokey" in sizes:
        raise TaskError(f"{remote.name}: no signing key at {key} ({key_in} in the container): without it the "
                        f"homeserver would lose its identity")
    found = Found(syn=syn, config_path=path, config_text=text, config=config, data_dir=mount.source,
                  data_in_container=mount.destination, signing_key=key, media=media,
                  media_kib=int(sizes.split()[-1]), db_kind="")
    dbconf = config.get("database") or {"name": "sqlite3", "args": {"database": "homeserver.db"}}
    args = dbconf.get("args") or {}
    if dbconf.get("name") in ("psycopg2", "psycopg"):
        found.db_kind = "postgres"
        found.db_user = str(args.get("user") or "postgres")
        found.db_name = str(args.get("dbname") or args.get("database") or found.db_user)
        host = str(args.get("host") or "localhost")
        found.db_container = db or ac.database_container(inspects, syn, host) or ""
        if not found.db_container:
            raise TaskError(f"{remote.name}: {sn}'s database is on {host!r}, which is no container on a network "
                            f"{syn.container} shares; name its PostgreSQL container with --db CONTAINER")
        found.db_restart = next(((c.get("HostConfig") or {}).get("RestartPolicy") or {}).get("Name") or "no"
                                for c in inspects if c.get("Name", "").lstrip("/") == found.db_container)
        out = remote.run(program("adopt.sh", action="database", container=found.db_container,
                                 pg_user=found.db_user, pg_db=found.db_name), what="the old database").out.split()
        if len(out) < 4:
            raise TaskError(f"{remote.name}: could not read database {found.db_name} as {found.db_user} in "
                            f"{found.db_container}: give --db CONTAINER if that is not its PostgreSQL")
        found.db_encoding, found.db_collate, found.db_ctype, kib = out[:4]
        found.db_kib, found.schema = int(kib), out[4] if len(out) > 4 else ""
    elif dbconf.get("name") == "sqlite3":
        found.db_kind = "sqlite"
        sqlite = syn.host_path(str(args.get("database") or "homeserver.db"))
        if not sqlite:
            raise TaskError(f"{remote.name}: {syn.container}'s SQLite database is not on a mounted directory")
        found.sqlite, found.sqlite_in_container = sqlite, str(args.get("database") or "homeserver.db")
        kib = _one(remote, f"test -f {shlex.quote(sqlite)} && du -sk {shlex.quote(sqlite)} | cut -f1 || echo none",
                   "the SQLite database")
        if kib == "none":
            raise TaskError(f"{remote.name}: {sn}'s SQLite database {sqlite} does not exist")
        found.db_kib = int(kib)
    else:
        raise TaskError(f"{remote.name}: {sn}'s database engine {dbconf.get('name')!r} is not one Synapse supports")
    return found


def check_encoding(found: Found) -> list[str]:
    """Synapse needs UTF8 with C collation and ctype. The dump is restored into such
    a database, so a non-C collation is fixed on the way (Synapse's documented fix:
    dump, recreate with C, restore); an encoding without a conversion to UTF8 is
    refused."""
    if found.db_kind != "postgres":
        return []
    if found.db_encoding == "SQL_ASCII":
        raise TaskError(f"{found.db_container}: database {found.db_name} has encoding SQL_ASCII, which has no "
                        "conversion to the UTF8 Synapse requires; convert it first (Synapse's postgres guide: dump, "
                        "create the database with ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C', restore)")
    notes = []
    if (found.db_collate, found.db_ctype) != ("C", "C"):
        notes.append(f"the old database has collation {found.db_collate} / ctype {found.db_ctype}; Synapse requires "
                     "C (it refuses others unless allow_unsafe_locale is set). The adopted database is made with "
                     "C and the data restored into it: the fix Synapse's postgres guide documents")
    return notes


def describe(found: Found, remote_name: str, sn: str, target: str, settings: ac.Settings,
             entry: Optional[dict], notes: list[str]) -> str:
    syn = found.syn
    lines = [f"adopting {sn} from {remote_name} onto {target}",
             f"  Synapse     container {syn.container} ({syn.image}"
             + (f", compose project {syn.project} in {syn.workdir}" if syn.project else "") + ")",
             f"  config      {found.config_path}",
             f"  signing key {found.signing_key}",
             f"  media       {found.media} ({found.media_kib // 1024} MiB)"]
    if found.db_kind == "postgres":
        lines.append(f"  database    PostgreSQL in {found.db_container}: {found.db_name} (user {found.db_user}), "
                     f"{found.db_encoding}, collation {found.db_collate}/{found.db_ctype}, "
                     f"{found.db_kib // 1024} MiB, schema {found.schema}")
    else:
        lines.append(f"  database    SQLite {found.sqlite} ({found.db_kib // 1024} MiB): ported to PostgreSQL "
                     "with Synapse's synapse_port_db")
    lines.append(f"  kept in homeserver.yaml ({len(settings.kept)}): {', '.join(settings.kept) or '-'}")
    lines.append(f"  replaced by synapse-fabric: {', '.join(settings.replaced) or '-'}")
    if entry is not None:
        lines.append("  hosts.yaml gets: " + json.dumps(entry, sort_keys=True))
    else:
        overridden = [k for k in ac.CARRIED if k in found.config]
        lines.append("  hosts.yaml already describes it"
                     + (f": its entry wins over the old {', '.join(overridden)}" if overridden else ""))
    lines += [f"  note: {n}" for n in notes]
    lines.append("  steps: " + " -> ".join(PHASES) + "; the old containers "
                 f"({', '.join(found.containers)}) are kept stopped until --finish")
    return "\n".join(lines)


class Adoption:
    def __init__(self, inv: Inventory, sn: str, source: str, target: str, log: Log):
        self.inv, self.sn, self.log = inv, sn, log
        self.source, self.target = inv.hosts[source], inv.hosts[target]
        self.lay = Layout(self.target.base_dir)
        self.same = source == target
        self.src: Optional[Remote] = None
        self.dst: Optional[Remote] = None

    def open(self) -> None:
        self.dst = open_remote(self.inv, self.target)
        self.dst.lock(self.inv.ssh.lock_timeout)
        if self.same:
            self.src = self.dst
        else:
            self.src = open_remote(self.inv, self.source)

    def close(self) -> None:
        for r in {id(r): r for r in (self.src, self.dst) if r is not None}.values():
            r.close()

    # -- records on the target ------------------------------------------------------
    @property
    def record(self) -> str:
        """The adoption's facts (old containers, their restart policies), kept until
        --finish or --abort."""
        return f"{self.lay.synapse(self.sn)}/.adopted"

    def read_record(self) -> dict:
        out = self.dst.run(f"cat {shlex.quote(self.record)} 2>/dev/null || true", what="adoption record").out
        return json.loads(out) if out.strip() else {}

    def write_record(self, record: dict) -> None:
        r = shlex.quote(self.record)
        self.dst.run(f"mkdir -p {shlex.quote(self.lay.synapse(self.sn))} && cat > {r}.new && mv -f {r}.new {r}",
                     stdin=json.dumps(record).encode(), what="record the adoption")

    def set_phase(self, phase: str) -> None:
        m = shlex.quote(self.lay.migration_state(self.sn))
        self.dst.run(f"printf 'adopt=%s phase=%s\\n' {shlex.quote(self.source.name)} {phase} > {m}.new "
                     f"&& mv -f {m}.new {m}", what="record the adoption's step")

    def phase(self) -> str:
        out = self.dst.run(f"cat {shlex.quote(self.lay.migration_state(self.sn))} 2>/dev/null || true",
                           what="adoption state").out
        state = dict(p.split("=", 1) for p in out.split() if "=" in p)
        return state.get("phase", "") if "adopt" in state else ""

    # -- moving bytes ----------------------------------------------------------------
    def pipe(self, src_script: str, dst_script: str, what: str) -> None:
        """src_script's output into dst_script: on the host itself when both are one
        host, else streamed through this machine (never stored here)."""
        t0 = time.monotonic()
        if self.same:
            self.dst.run(f"( {src_script} ) | ( {dst_script} )", what=what, timeout=7200)
        else:
            self.dst.run(dst_script, stdin=self.src.stream(src_script, what=f"{what} (read)"), what=what,
                         timeout=7200)
        self.log(f"{what}: {time.monotonic() - t0:.1f}s")

    def converge(self, inv: Inventory, hold=()) -> None:
        converge_holding(self.dst, inv, self.log, self.sn, hold)

    # -- the steps ---------------------------------------------------------------------
    def copy(self, found: Found, config_text: str) -> None:
        """Everything but the database, while the old one runs."""
        q = shlex.quote
        data = self.lay.data(self.sn)
        excludes = " ".join(f"--exclude={q(p)}" for p in SKIPPED)
        rel_media = _inside(found.media, found.data_dir)
        self.pipe(f"cd {q(found.data_dir)} && tar -c -f - --warning=no-file-changed {excludes} . "
                  "; rc=$?; [ $rc -le 1 ]",
                  f"mkdir -p {q(data)} && tar -x -p --numeric-owner -f - -C {q(data)}",
                  "copy the data directory while it runs")
        if rel_media is None:
            self.pipe(f"cd {q(found.media)} && tar -c -f - --warning=no-file-changed . ; rc=$?; [ $rc -le 1 ]",
                      f"mkdir -p {q(data)}/media_store && tar -x -p --numeric-owner -f - -C {q(data)}/media_store",
                      "copy the media store while it runs")
        elif rel_media != "media_store":
            self.dst.run(f"cd {q(data)} && rm -rf media_store && mv {q(rel_media)} media_store", what="media_store")
        key = f"{data}/{self.sn}.signing.key"
        self.pipe(f"cat {q(found.signing_key)}", f"cat > {q(key)}.new && mv -f {q(key)}.new {q(key)}",
                  "copy the signing key")
        for path, text in ((f"{data}/homeserver.yaml", config_text), (f"{data}/{self.sn}.log.config", ac.LOG_CONFIG)):
            self.dst.run(f"umask 077 && cat > {q(path)}.new && mv -f {q(path)}.new {q(path)}", stdin=text.encode(),
                         what=f"write {path}")
        self.dst.run(f"chown -R {SYNAPSE_UID} {q(data)} && chmod 0750 {q(data)}", what="data to 991:991")

    def background_updates_done(self, found: Found, limit: float = 900) -> None:
        """A running Synapse on SQLite finishes its pending background updates before
        it is stopped (synapse_port_db refuses a database with any): no downtime for
        them. A young database has dozens; an old one, usually none."""
        script = program("adopt.sh", action="pending", container=found.syn.container,
                         sqlite=found.sqlite_in_container)
        t0 = time.monotonic()
        said = False
        while time.monotonic() - t0 < limit:
            left = self.src.run(script, what="background updates").out.strip()
            if left in ("0", "stopped"):
                if said:
                    self.log(f"background updates done in {time.monotonic() - t0:.0f}s")
                return
            if not said:
                self.log(f"the old Synapse has {left} background updates pending: waiting for it to finish them")
                said = True
            time.sleep(2)
        self.log(f"background updates still pending after {limit:.0f}s: Synapse's updater finishes them "
                 "after the stop (longer downtime)")

    def stop(self, containers: list[str]) -> None:
        self.src.run(program("adopt.sh", action="stop", containers=" ".join(containers)),
                     what="stop the old " + " and ".join(containers), timeout=300)

    @property
    def sqlite_work(self) -> str:
        """Where the SQLite copy and synapse_port_db's config stay between the passes."""
        return f"{self.lay.synapse(self.sn)}/adopt-sqlite"

    def port_sqlite(self, found: Found, config_text: str, final: bool) -> None:
        """Synapse's documented way off SQLite, in two passes: synapse_port_db first
        on a snapshot taken while the old Synapse runs (the schema, its background
        updates and every row so far: no downtime), then, after the stop, again on
        the final file: it adds the rows that are new and copies the other tables
        again."""
        q, work = shlex.quote, self.sqlite_work
        root = q(self.lay.synapse(self.sn))
        if not final:
            pg = self.inv.homeservers[self.sn].postgres
            # Synapse's guide: the homeserver's own config with the new database in it
            config = {**yaml.safe_load(config_text), "database": {"name": "psycopg2", "args": {
                "host": "postgres", "port": 5432, "dbname": pg.database, "user": pg.user,
                "passfile": "/run/secrets/pgpass"}}}
            self.dst.run(f"rm -rf {q(work)} && mkdir -p {q(work)} && chmod 700 {q(work)} && umask 077 && "
                         f"cat > {q(work)}/postgres.yaml", stdin=yaml.safe_dump(config).encode(),
                         what="synapse_port_db's config")
            # a consistent copy of a database in use: SQLite's online backup, in the container
            source = program("adopt.sh", action="snapshot", container=found.syn.container,
                             sqlite=found.sqlite_in_container)
            what = "copy a snapshot of the SQLite database while it runs"
        else:
            source, what = f"cat {q(found.sqlite)}", "copy the final SQLite database"
        self.pipe(source, f"cat > {q(work)}/homeserver.db.new && mv -f {q(work)}/homeserver.db.new "
                          f"{q(work)}/homeserver.db", what)
        t0 = time.monotonic()
        # it refuses a database with background updates pending (the old Synapse
        # was let finish them first; see background_updates_done)
        self.dst.run(COMPOSE_FN + f"cd {root} && compose run --rm --no-deps -T -v {q(work)}:/adopt "
                     "--entrypoint synapse_port_db synapse --sqlite-database /adopt/homeserver.db "
                     "--postgres-config /adopt/postgres.yaml </dev/null >/dev/null",
                     what="synapse_port_db (SQLite to PostgreSQL)", timeout=7200)
        self.log(f"synapse_port_db, {'final pass' if final else 'first pass (while it runs)'}: "
                 f"{time.monotonic() - t0:.1f}s")
        if final:
            self.dst.run(f"rm -rf {q(work)}", what="the SQLite copy")

    def restore(self, found: Found, hs: Homeserver, since: str, config_text: str) -> None:
        """The database after the stop, then the media written since the first copy."""
        q = shlex.quote
        pg = hs.postgres
        find_pg = f"pg={container(synapse_project(hs), 'postgres')}; "
        if found.db_kind == "postgres":
            empty_database(self.dst, hs)
            self.pipe(f"docker exec {q(found.db_container)} pg_dump -Fc -U {q(found.db_user)} -d {q(found.db_name)}",
                      find_pg + f'docker exec -i "$pg" pg_restore -U {pg.user} -d {pg.database} --no-owner --no-acl '
                      "--exit-on-error --single-transaction",
                      "stream the database (pg_dump | pg_restore)")
        else:
            self.port_sqlite(found, config_text, final=True)
        schema = self.dst.read(find_pg + f'docker exec "$pg" psql -X -At -U {pg.user} -d {pg.database} -c '
                              '"SELECT version FROM schema_version"', what="schema version").out.strip()
        if found.schema and schema != found.schema:
            raise TaskError(f"the new database has schema version {schema}, the old one {found.schema}")
        # what Synapse wrote between the first copy and the stop (uploads, thumbnails)
        data = self.lay.data(self.sn)
        self.pipe(f"cd {q(found.media)} && find . -newermt @{since} \\( -type f -o -type l \\) | tar -c -f - -T -",
                  f"tar -x -p --numeric-owner -f - -C {q(data)}/media_store", "copy media changed meanwhile")
        self.dst.run(f"chown -R {SYNAPSE_UID} {q(data)}/media_store", what="media to 991:991")

    def key_digest(self, remote: Remote, path: str) -> str:
        return remote.run(f"sha256sum {shlex.quote(path)} | cut -d' ' -f1", what="signing key digest").out.strip()


def _inside(path: str, directory: str) -> Optional[str]:
    d = directory.rstrip("/") + "/"
    return path[len(d):].rstrip("/") if path.startswith(d) else None


def _outermost(paths: list[str]) -> list[str]:
    """The paths not inside another of them."""
    paths = sorted({p for p in paths if p})
    return [p for p in paths if not any(o != p and _inside(p, o) is not None for o in paths)]


def _dirname(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _server_name(sn: str) -> str:
    try:
        return check_domain(sn)
    except ValueError as exc:
        raise TaskError(f"--homeserver: {exc}") from None


def _target_of(inv: Inventory, sn: str, source: str, to: Optional[str]) -> tuple[str, Optional[Homeserver]]:
    if source not in inv.hosts:
        raise TaskError(f"--from {source!r} is no host in {inv.path} (known hosts: {', '.join(inv.hosts)}); "
                        "add the host the homeserver runs on first")
    hs = inv.homeservers.get(sn)
    if hs is not None:
        if to and to != hs.host:
            raise TaskError(f"{inv.path} places {sn} on {hs.host}, not {to}: change homeservers.{sn}.host "
                            "or leave --to out")
        return hs.host, hs
    target = to or source
    if target not in inv.hosts:
        raise TaskError(f"--to {target!r} is no host in {inv.path} (known hosts: {', '.join(inv.hosts)})")
    return target, None


def adopt(inv: Inventory, sn: str, source: str, to: Optional[str], compose: str, data: str, db: str,
          dry_run: bool, log: Log) -> None:
    """Adopt `sn` from `source` (see the module's docstring)."""
    sn = _server_name(sn)
    target, hs = _target_of(inv, sn, source, to)
    if hs is not None:
        refuse_external(hs, "inv adopt", "adopting brings the database under synapse-fabric's own PostgreSQL; "
                        "remove postgres.external from its entry to adopt it, or deploy it as it is")
    a = Adoption(inv, sn, source, target, log)
    a.open()
    try:
        phase = a.phase()
        if phase:
            log(f"an adoption of {sn} was interrupted (after: {phase}); putting the old deployment back first")
            undo(a, a.read_record(), phase)
            if dry_run:
                return
            inv = a.inv = load(inv.path)
            target, hs = _target_of(inv, sn, source, to)
        elif a.read_record():
            raise TaskError(f"{sn} was adopted already (the old deployment is kept stopped on {source}): "
                            f"`inv adopt --homeserver {sn} --from {source} --finish` removes its containers, "
                            "--abort brings it back")
        found = discover(a.src, inv, sn, compose, data, db)
        extra = ac.also_replaced(bool(hs and hs.federation.trusted_ca), inv.hosts[target].turn.enabled)
        settings = ac.classify(found.config, sn, extra)
        entry = ac.inventory_entry(target, settings) if hs is None else None
        header = (f"# Adopted by synapse-fabric on {time.strftime('%Y-%m-%d')} from {source}:{found.config_path}.\n"
                  "# Kept as it was but for the settings synapse-fabric manages (conf.d/, hosts.yaml)\n"
                  "# and the paths of its layout. Edit it here; `inv deploy` never rewrites it.\n")
        text, more = ac.adopted_config(found.config_text, sn, settings, found.data_in_container, header)
        notes = check_encoding(found) + settings.notes + more
        log(describe(found, source, sn, target, settings, entry, notes))
        there = a.dst.run(f"test -e {shlex.quote(a.lay.generated(sn)[0])} && echo yes || true",
                          what="an existing copy").out.strip()
        if there:
            raise TaskError(f"{target} already holds a managed {sn} ({a.lay.synapse(sn)}); adopting would replace "
                            "it. If a deploy made it before the adoption, remove it with `inv uninstall "
                            f"--homeserver {sn} --no-backup` first")
        need = found.media_kib + found.db_kib * 3 + 512 * 1024
        free = int(a.dst.run(f"d={shlex.quote(a.lay.base)}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; "
                             "df -Pk \"$d\" | awk 'NR==2 {print $4}'", what="free space").out.split()[0])
        if free < need:
            raise TaskError(f"{target} has {free // 1024} MiB free; adopting {sn} needs about {need // 1024} MiB")
        if dry_run:
            log("dry run: nothing was changed")
            return
        if entry is not None:
            rewrite(inv.path, lambda doc: doc["homeservers"].__setitem__(sn, entry))
            log(f"{inv.path}: homeservers.{sn} added")
            inv = a.inv = load(inv.path)
        hs = inv.homeservers[sn]
        record = {"from": source, "containers": [
            {"name": found.syn.container, "restart": found.syn.restart}]
            + ([{"name": found.db_container, "restart": found.db_restart}] if found.db_container else []),
            "entry_added": entry is not None, "config": found.config_path,
            "files": _outermost([found.data_dir, found.media, found.sqlite])}
        a.dst.run(f"rm -f {shlex.quote(a.lay.uninstalled(sn))}", what="an earlier abort's record, if any")
        a.write_record(record)
        a.set_phase("begun")
        t_stop = None
        try:
            since = a.src.run("date +%s", what="the old host's clock").out.strip()
            if found.db_kind == "sqlite":
                a.background_updates_done(found)
            a.copy(found, text)
            a.converge(inv, hold=(sn,))
            if found.db_kind == "sqlite":
                empty_database(a.dst, hs)
                a.port_sqlite(found, text, final=False)
            a.set_phase("copied")
            t_stop = time.monotonic()
            a.stop([found.syn.container])
            a.set_phase("stopped")
            log(f"the old Synapse ({found.syn.container}) is stopped: downtime starts")
            a.restore(found, hs, since, text)
            if found.db_container:
                a.stop([found.db_container])
            a.set_phase("restored")
            if a.key_digest(a.src, found.signing_key) != a.key_digest(a.dst, a.lay.signing_key(sn)):
                raise TaskError(f"the copy on {target} does not hold {sn}'s signing key; not starting it")
            a.converge(inv)
        except BaseException as exc:
            log(f"adoption failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                "putting the old deployment back")
            undo(a, record, a.phase())
            raise RolledBack(f"adoption of {sn} failed and was rolled back: {exc}\n{sn} runs from its old "
                             f"deployment on {source} as before") from None
        a.set_phase("started")
        a.dst.run(f"rm -f {shlex.quote(a.lay.migration_state(sn))}", what="clear the adoption's step")
        log(f"{sn} runs on {target}, managed; it was stopped for {time.monotonic() - t_stop:.1f}s "
            "(old Synapse stopped to new Synapse healthy)")
        log(f"the old containers ({', '.join(found.containers)}) are stopped and kept, their files untouched. "
            f"When all is well: inv adopt --homeserver {sn} --from {source} --finish; to go back: --abort")
    finally:
        a.close()


def undo(a: Adoption, record: dict, phase: str) -> None:
    """Put the old deployment back: the new copy stopped and moved aside (never
    deleted), the target converged without it, the old containers started with
    their restart policies, hosts.yaml's added entry removed."""
    sn, q = a.sn, shlex.quote
    root = a.lay.synapse(sn)
    aside = f"{a.lay.base}/.synapse-fabric/adopt-aborted/{sn}-{time.strftime('%Y%m%dT%H%M%S')}"
    a.dst.run(COMPOSE_FN + f"if [ -f {q(root)}/docker-compose.yml ]; then (cd {q(root)} && compose down) >&2; fi; "
              f"if [ -d {q(root)} ]; then mkdir -p {q(_dirname(aside))} && mv {q(root)} {q(aside)}; fi",
              what="stop the new copy and move it aside", timeout=300)
    inv = a.inv
    if record.get("entry_added") and sn in inv.homeservers:
        rewrite(inv.path, lambda doc: doc["homeservers"].pop(sn, None))
        servers = {k: v for k, v in inv.homeservers.items() if k != sn}
        inv = inv.replace(homeservers=servers)
        a.log(f"{inv.path}: homeservers.{sn} removed (the adoption added it)")
    elif sn in inv.homeservers:
        servers = {k: v for k, v in inv.homeservers.items() if k != sn}
        inv = inv.replace(homeservers=servers)
        a.dst.run(f"mkdir -p {q(a.lay.uninstalled_dir)} && printf 'at=%s reason=adoption-aborted\\n' "
                  f"\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\" > {q(a.lay.uninstalled(sn))}", what="guard record")
        a.log(f"{inv.path} still places {sn} on {a.target.name}: a deploy there is refused until you remove that "
              f"entry (or adopt again)")
    try:  # the vhosts and certificate it got go
        a.converge(inv)
    except RemoteError as exc:
        a.log(f"{a.target.name}: converging without {sn} failed ({exc}); run inv deploy --host {a.target.name}")
    for c in reversed(record.get("containers", [])):
        a.src.run(program("adopt.sh", action="start", container=c["name"], restart=c["restart"]),
                  what=f"start {c['name']} again")
    a.dst.run(f"rm -f {q(a.lay.migration_state(sn))}", what="clear the adoption's step")
    a.log(f"the old deployment of {sn} runs again on {a.source.name}; what the new copy held is in {aside} "
          f"on {a.target.name}")


def abort(inv: Inventory, sn: str, source: str, log: Log) -> None:
    """Bring the old deployment back after an adoption (done or half-done)."""
    sn = _server_name(sn)
    target, _ = _target_of(inv, sn, source, None)
    a = Adoption(inv, sn, source, target, log)
    a.open()
    try:
        record = a.read_record()
        if not record:
            raise TaskError(f"no adoption of {sn} to undo on {target}")
        undo(a, record, a.phase() or "started")
    finally:
        a.close()


def finish(inv: Inventory, sn: str, source: str, log: Log) -> None:
    """Remove the old deployment's stopped containers (their files stay)."""
    sn = _server_name(sn)
    hs = inv.homeserver(sn)
    a = Adoption(inv, sn, source, hs.host, log)
    a.open()
    try:
        record = a.read_record()
        if not record:
            raise TaskError(f"no adoption of {sn} to finish on {hs.host}")
        if a.phase():
            raise TaskError(f"the adoption of {sn} is not complete (after: {a.phase()}); run it again first")
        names = " ".join(shlex.quote(c["name"]) for c in record.get("containers", []))
        running = a.src.run(f"docker ps -q --filter status=running $(for n in {names}; do echo --filter name=^$n$; "
                            "done) | head -n 1", what="are they stopped").out.strip()
        if running:
            raise TaskError(f"an old container of {sn} runs again on {source}; stop it or --abort")
        a.src.run(f"docker rm {names} >/dev/null", what="remove the old containers")
        a.dst.run(f"rm -f {shlex.quote(a.record)}", what="the adoption record")
        log(f"the old containers of {sn} are removed from {source}; their files are still there "
            f"({', '.join(record.get('files', []))}): delete them when you no longer need them")
    finally:
        a.close()
