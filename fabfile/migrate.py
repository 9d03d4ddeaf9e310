"""Move a homeserver to another host; the old host forwards its names to the new
one until DNS has followed.

Steps (each recorded in `synapse/<sn>/.migration` on the old host, so a killed run
is resumed by running it again, or undone with --abort):

    checked   target reachable, Docker there (bootstrapped if not), room for the data
    copied    config, keys, media, secrets, certificates copied while Synapse runs;
              the target gets its files and PostgreSQL (Synapse held back)
    stopped   Synapse stopped on the old host (the downtime starts)
    restored  database dumped on the old host and restored on the new one, streamed
              through this machine (never stored here); media changed since `copied`
              copied again. A database elsewhere (postgres.external, postgres.host)
              stays where it is: the new host must reach it (checked at `copied`,
              before the stop; a database host first admits both hosts)
    started   Synapse started on the new host (with the original signing key), healthy
    switching the old host records the hand-over (<base>/.synapse-fabric/handed-over/<sn>,
              which stops any later deploy from starting a copy there), then its
              vhosts for the homeserver forward to the new address
    switched  the forwarding serves (the downtime ends)
    recorded  hosts.yaml says where the homeserver is now (comment-preserving edit)

Any failure before `switching` puts everything back: Synapse runs again on the
old host and the partial copy on the new host is removed. The rollback is itself
recorded (`undo=` in the state file) and resumed by the next run, whatever it was
asked: a half-done rollback is never mistaken for a half-done migration. The new
copy's Synapse is stopped BEFORE the old one restarts; if the new host cannot be
reached while its Synapse may run, the old one stays stopped (one copy at most).
Once `switching` is recorded, the forwarding may be live and the new copy may
have taken writes: the only way on is forward (`--abort` refuses).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Callable

from . import database
from .errors import SfabError, TaskError
from .converge import converge_as, converge_other
from .inventory import Homeserver, Inventory, InventoryError, rewrite
from .inventory import check as inventory_check
from .remote import Remote, RemoteError, locked, open_remote, session
from .docker import COMPOSE_FN, container
from .layout import Layout
from .render import synapse_project
from .shell import program
from .workers import processes, refuse_remote

PHASES = ["checked", "copied", "stopped", "restored", "started", "switching", "switched", "recorded"]
# A rollback's own steps (recorded as undo=<step done>), resumed by any later run.
UNDO = ["begun", "new-stopped", "old-started"]


def read_state(remote: Remote, lay: Layout, sn: str) -> dict[str, str]:
    """{to, phase[, undo]} of a migration in progress (or being rolled back), or {}."""
    out = remote.run(f"cat {shlex.quote(lay.migration_state(sn))} 2>/dev/null || true", what="read migration state").out
    return dict(part.split("=", 1) for part in out.split() if "=" in part)


def read_phase(remote: Remote, lay: Layout, sn: str) -> tuple[str, str]:
    """(target host, last phase done) of a migration in progress, or ("", "")."""
    state = read_state(remote, lay, sn)
    return state.get("to", ""), state.get("phase", "")


def _set_phase(remote: Remote, lay: Layout, sn: str, to: str, phase: str, undo: str = "") -> None:
    m = shlex.quote(lay.migration_state(sn))
    extra = f" undo={undo}" if undo else ""
    remote.run(f"printf 'to=%s phase=%s%s\\n' {shlex.quote(to)} {phase} {shlex.quote(extra)} > {m}.new "
               f"&& mv -f {m}.new {m}", what="record migration state")


class Migration:
    def __init__(self, inv: Inventory, hs: Homeserver, to: str, log: Callable[[str], None]):
        self.inv, self.hs, self.to, self.log = inv, hs, to, log
        self.sn = hs.server_name
        self.old_host = inv.hosts[hs.host]
        self.new_host = inv.hosts[to]
        self.old_lay = Layout(self.old_host.base_dir)
        self.new_lay = Layout(self.new_host.base_dir)
        self.moved = inv.with_homeserver(hs, host=to)  # where it runs after the move
        self.forwarding = inv.with_homeserver(hs, host=to, migrated_from=hs.host)
        self.src: Remote | None = None
        self.dst: Remote | None = None

    # -- plumbing ------------------------------------------------------------
    def open(self) -> None:
        """Both hosts, locked. An unreachable new host is not an error yet: a
        rollback must still be able to act on the old one (see undo)."""
        self.src = open_remote(self.inv, self.old_host)
        self.src.lock(self.inv.ssh.lock_timeout)
        try:
            self.dst = open_remote(self.inv, self.new_host)
            self.dst.lock(self.inv.ssh.lock_timeout)
        except RemoteError as exc:
            if self.dst is not None:
                self.dst.close()
            self.dst = _Unreachable(self.new_host.name, str(exc))

    def close(self) -> None:
        for r in (self.src, self.dst):
            if r is not None:
                r.close()

    def _converge(self, remote: Remote, inv: Inventory, hold=(), install=False) -> None:
        converge_as(remote, inv, self.log, install=install, hold=hold, migrating=self.sn)

    def _admit(self, inv: Inventory) -> None:
        """Converge the host of the homeserver's database (postgres.host) as `inv`
        says: its firewall lets in the hosts `inv` names for it."""
        converge_other(inv, self.hs.postgres.host, self.log, migrating=self.sn)

    def _copy(self, what: str, src_script: str) -> None:
        started = time.monotonic()
        dst_base = shlex.quote(self.new_lay.base)
        self.dst.run(f"mkdir -p {dst_base} && tar -x -p --numeric-owner -f - -C {dst_base}",
                     stdin=self.src.stream(src_script, what=f"{what} (read)"), what=f"{what} (write)", timeout=7200)
        self.log(f"{what}: {time.monotonic() - started:.1f}s")

    # -- the steps -------------------------------------------------------------
    def check(self, dry_run: bool) -> None:
        sn = self.sn
        data = shlex.quote(self.old_lay.synapse(sn))
        size = int(self.src.run(f"du -sk {data} | cut -f1", what="size of the homeserver").out.split()[0])
        # on the filesystem that will hold base_dir (its nearest existing parent today)
        free_kb = int(self.dst.run(
            f"d={shlex.quote(self.new_lay.base)}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; "
            "df -Pk \"$d\" | awk 'NR==2 {print $4}'", what="free space").out.split()[0])
        if free_kb < size * 2 + 512 * 1024:
            raise TaskError(f"{self.to} has {free_kb // 1024} MiB free; {sn} needs about {size * 2 // 1024} MiB "
                            "(files plus the restored database)")
        there = self.dst.run(f"test -e {shlex.quote(self.new_lay.generated(sn)[0])} && echo yes || true",
                             what="existing copy").out.strip()
        to, phase = read_phase(self.src, self.old_lay, sn)
        if there == "yes" and not phase:
            raise TaskError(f"{self.to} already holds a copy of {sn} ({self.new_lay.synapse(sn)}); "
                            "remove it first or choose another host")
        has_docker = self.dst.run("command -v docker >/dev/null && echo yes || true", what="docker?").out.strip()
        self.log(f"checks passed: {size // 1024} MiB to move, {free_kb // 1024} MiB free on {self.to}"
                 + ("" if has_docker else f"; Docker will be installed on {self.to}"))

    def copy_live(self) -> None:
        sn = self.sn
        base = shlex.quote(self.old_lay.base)
        mark = f"synapse/{sn}/.migration-mark"
        paths = " ".join(shlex.quote(p) for p in [f"synapse/{sn}"] + Layout.acme_paths(sn))
        # Synapse keeps writing (media): a file that changes while read is copied again
        # after the stop (`-newer` the mark), so tar's "file changed" (exit 1) is fine here.
        script = (f"cd {base} && touch {mark} && for p in {paths}; do [ -e \"$p\" ] && echo \"$p\"; done | "
                  f"{{ tar -c -f - --warning=no-file-changed --exclude=synapse/{sn}/postgres "
                  f"--exclude='synapse/{sn}/.migration*' -T -; rc=$?; [ $rc -le 1 ]; }}")
        self._copy("copy while running", script)
        pg = self.hs.postgres
        if pg.host:  # its database's host admits both ends of the move (until `--finish`)
            self._admit(self.forwarding)
            self.log(f"{pg.host} lets {self.old_host.name} and {self.to} reach {sn}'s database")
        self._converge(self.dst, self.moved, hold=(sn,), install=True)
        if pg.elsewhere:  # the server must take the new host before the old Synapse stops
            moved = self.moved.homeserver(sn)
            self.dst.run(program("database.sh", "database-reach.sh", **database.inputs(self.moved, moved),
                                 project=synapse_project(moved), server_name=sn),
                         what=f"{sn}: its database on {pg.where} from {self.to}")
            self.log(f"{self.to} reaches {sn}'s database on {pg.where}"
                     + (" (TLS verify-full)" if pg.external else " (private network)"))

    def stop_old(self) -> None:
        root = shlex.quote(self.old_lay.synapse(self.sn))
        self.src.run(f"{COMPOSE_FN}cd {root} && compose stop {processes(self.hs)}",
                     what="stop Synapse on the old host")
        self.log(f"Synapse of {self.sn} stopped on {self.old_host.name}")

    def restore(self) -> None:
        pg = self.hs.postgres
        if pg.elsewhere:  # the database stays where it is: only what changed meanwhile moves
            self._copy_changed()
            return
        project = synapse_project(self.hs)
        find_pg = f"pg={container(project, 'postgres')}; "
        db, user = pg.database, pg.user  # validated identifiers
        recreate = (f'DROP DATABASE IF EXISTS "{db}";\n'
                    f"CREATE DATABASE \"{db}\" OWNER \"{user}\" ENCODING 'UTF8' LC_COLLATE 'C' "
                    "LC_CTYPE 'C' TEMPLATE template0;\n")
        self.dst.run(find_pg + f'docker exec -i "$pg" psql -X -q -v ON_ERROR_STOP=1 -U {user} -d postgres',
                     stdin=recreate.encode(), what="empty database on the new host")
        started = time.monotonic()
        self.dst.run(find_pg + f'docker exec -i "$pg" pg_restore -U {user} -d {db} --no-owner --exit-on-error '
                     "--single-transaction",
                     stdin=self.src.stream(find_pg + f'docker exec "$pg" pg_dump -Fc -U {user} -d {db}',
                                           what="pg_dump on the old host"),
                     what="pg_restore on the new host", timeout=7200)
        self.log(f"database streamed from {self.old_host.name} to {self.to} in {time.monotonic() - started:.1f}s")
        self._copy_changed()

    def _copy_changed(self) -> None:
        sn = self.sn
        base = shlex.quote(self.old_lay.base)
        mark = f"synapse/{sn}/.migration-mark"
        self._copy("copy what changed meanwhile",
                   f"cd {base} && find synapse/{sn}/data -newer {mark} \\( -type f -o -type l \\) | tar -c -f - -T -")

    def _signing_key(self, remote: Remote, lay: Layout) -> str:
        key = shlex.quote(lay.signing_key(self.sn))
        return remote.run(f"sha256sum {key} 2>/dev/null | cut -d' ' -f1", what="signing key").out.strip()

    def start_new(self) -> None:
        # never start a copy that is not this homeserver (e.g. a fresh `generate`)
        old_key, new_key = self._signing_key(self.src, self.old_lay), self._signing_key(self.dst, self.new_lay)
        if not old_key or old_key != new_key:
            raise TaskError(f"the copy on {self.to} does not hold {self.sn}'s signing key; not starting it")
        self._converge(self.dst, self.moved)
        self.log(f"{self.sn} runs on {self.to}")

    def switch(self) -> None:
        """Record the hand-over on the old host, then make it forward. Raises
        ForwardingNotLive when it failed and the forwarding certainly does not
        serve (nginx refused it and kept the previous files)."""
        record = shlex.quote(self.old_lay.handed_over(self.sn))
        at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.src.run(f"mkdir -p {shlex.quote(self.old_lay.handed_over_dir)} && cat > {record}.new && "
                     f"mv -f {record}.new {record}",
                     stdin=f"to={self.to} address={self.new_host.address} at={at}\n".encode(),
                     what="record the hand-over")
        try:
            self._converge(self.src, self.forwarding)
        except RemoteError:
            conf = shlex.quote(self.old_lay.vhost(f"{self.sn}-forward"))
            live = self.src.run(f"test -f {conf} && echo yes || true", what="forwarding in place?").out.strip()
            if not live:
                self.src.run(f"rm -f {record}", what="withdraw the hand-over")
                raise ForwardingNotLive() from None
            raise
        # the new host serves it now: forget an older hand-over of it there (a move back)
        self.dst.run(f"rm -f {shlex.quote(self.new_lay.handed_over(self.sn))}", what="hand-over taken")
        self.log(f"{self.old_host.name} forwards {self.sn}'s names to {self.new_host.address}")

    def undo(self, phase: str, undone: str = "") -> None:
        """Back to the old host: the new copy stopped FIRST, then Synapse running on
        the old host, then the partial copy removed. Each step is recorded, so an
        interrupted rollback is resumed (never taken for a migration to resume)."""
        sn, to = self.sn, self.to
        done = UNDO.index(undone) if undone else -1
        self.log(f"rolling back: {sn} stays on {self.old_host.name}")
        if done < 0:
            _set_phase(self.src, self.old_lay, sn, to, phase, "begun")
        new_root = shlex.quote(self.new_lay.synapse(sn))
        # the new Synapse may run only if its start was attempted (after `restored`)
        may_run = PHASES.index(phase) >= PHASES.index("restored")
        if done < UNDO.index("new-stopped"):
            try:
                self.dst.run(f"{COMPOSE_FN}command -v docker >/dev/null || exit 0\n"
                             f"if [ -f {new_root}/docker-compose.yml ]; then cd {new_root} && compose stop; fi",
                             what="stop the new copy", timeout=180)
            except RemoteError as exc:
                if may_run:
                    raise TaskError(
                        f"cannot reach {to} to stop the copy of {sn} there ({exc}); the old copy stays "
                        f"STOPPED so that at most one serves. Run `inv migrate-host --homeserver {sn} --abort` "
                        f"again once {to} answers") from None
                self.log(f"{to} does not answer; its copy never started: going on ({exc})")
            _set_phase(self.src, self.old_lay, sn, to, phase, "new-stopped")
        if done < UNDO.index("old-started"):
            root = shlex.quote(self.old_lay.synapse(sn))
            self.src.run(f"{COMPOSE_FN}cd {root} && compose up -d", what="restart Synapse on the old host", timeout=300)
            _set_phase(self.src, self.old_lay, sn, to, phase, "old-started")
        nb = self.new_lay.base
        rm = " ".join(shlex.quote(f"{nb}/{p}") for p in [f"synapse/{sn}"] + Layout.acme_paths(sn)[:-1])
        # one command: the partial copy's containers and files go; says whether the host has Docker
        docker = self.dst.run(f"{COMPOSE_FN}if command -v docker >/dev/null; then echo docker; "
                              f"if [ -f {new_root}/docker-compose.yml ]; then (cd {new_root} && compose down) >&2 || exit 1; "
                              f"fi; fi\nrm -rf {rm}", what="remove the partial copy", timeout=300).out.strip()
        if docker == "docker":
            self._converge(self.dst, self.inv)  # drops the vhosts it got
        if self.hs.postgres.host:  # its database's host lets the old host only in again
            try:
                self._admit(self.inv)
            except SfabError as exc:  # the old host is let in either way (it was one end of the move)
                self.log(f"{self.hs.postgres.host} could not be converged ({str(exc).splitlines()[0]}); it may "
                         f"still let {to} reach {sn}'s database: deploy it once it answers")
        root = shlex.quote(self.old_lay.synapse(sn))
        self.src.run(f"rm -f {shlex.quote(self.old_lay.migration_state(sn))} {root}/.migration-mark", what="clear state")


class _Unreachable:
    """Stands for a host that could not be reached: every command fails."""

    def __init__(self, name: str, why: str):
        self.name, self.why = name, why

    def run(self, *args, **kwargs):
        raise RemoteError(self.why)

    def stream(self, *args, **kwargs):
        raise RemoteError(self.why)

    def close(self) -> None:
        pass


class ForwardingNotLive(Exception):
    """The switch failed and the old host still serves its previous files."""


def record_in_inventory(path: Path, sn: str, to: str, migrated_from: str | None) -> None:
    """Comment-preserving edit of hosts.yaml, written atomically."""
    def change(doc):
        entry = doc["homeservers"][sn]
        entry["host"] = to
        if migrated_from:
            entry["migrated_from"] = migrated_from
        elif "migrated_from" in entry:
            del entry["migrated_from"]
    rewrite(path, change)


def migrate(inv: Inventory, sn: str, to: str | None, dry_run: bool, abort: bool, log) -> None:
    hs = inv.homeserver(sn)
    refuse_remote(hs, "inv migrate-host")
    with session(inv, inv.hosts[hs.host]) as src_probe:
        marked_to, phase = read_phase(src_probe, Layout(inv.hosts[hs.host].base_dir), hs.server_name)
    if marked_to and to and to != marked_to:
        raise TaskError(f"a migration of {sn} to {marked_to} is in progress (done: {phase}); "
                        f"re-run with --to {marked_to} to finish it, or --abort")
    to = to or marked_to
    if abort:
        if not marked_to:
            raise TaskError(f"no migration of {sn} is in progress")
    elif not to:
        raise TaskError("--to HOST is required")
    if to not in inv.hosts:
        raise TaskError(f"no host {to!r} in the inventory (known hosts: {', '.join(inv.hosts)})")
    if to == hs.host:
        raise TaskError(f"{sn} already runs on {to}")
    if to == hs.postgres.host:
        raise TaskError(f"{to} runs {sn}'s database (postgres.host): a homeserver and its database on one host "
                        "is a database of its own; move it to another host")
    try:  # what hosts.yaml will say once it moved must hold (private addresses, no chains, ...)
        inventory_check(inv.with_homeserver(hs, host=to, migrated_from=hs.host))
    except InventoryError as exc:
        raise TaskError(f"{sn} cannot move to {to}: hosts.yaml would then break a rule: {exc}") from None
    if hs.federation.via and not marked_to:
        raise TaskError(f"{sn}'s federation is served by {hs.federation.via} (federation.via), which "
                        f"`inv migrate-host` does not move along yet: it would keep passing requests to {hs.host}. "
                        "Move it without a public address by backup and restore (inv restore --to), then "
                        f"`inv deploy --host {hs.federation.via}`")
    m = Migration(inv, hs, to, log)
    m.open()
    try:
        state = read_state(m.src, m.old_lay, sn)  # again, now that both hosts are locked
        phase = state.get("phase", "")
        if state.get("undo"):
            # a rollback was interrupted: whatever was asked, it is finished first
            log(f"a rollback of the migration of {sn} to {to} was interrupted (after: {state['undo']}); "
                "finishing it")
            m.undo(phase, state["undo"])
            log(f"aborted: {sn} runs on {hs.host} as before")
            if not abort:
                raise TaskError(f"the interrupted rollback of {sn} is complete; nothing was migrated "
                                "(run the migration again to start over)")
            return
        if abort:
            if PHASES.index(phase) >= PHASES.index("switching"):
                raise TaskError(f"{sn} already runs on {to} and the old host forwards (or may forward) to it: "
                                "too late to abort; re-run the migration to complete it, then --finish "
                                "after DNS moved")
            m.undo(phase)
            log(f"aborted: {sn} runs on {hs.host} as before")
            return
        done = PHASES.index(phase) if phase else -1
        if done >= 0:
            log(f"resuming the migration of {sn} to {to} after step '{phase}'")
        m.check(dry_run)
        if dry_run:
            log("dry run: " + " -> ".join(PHASES[done + 1:]) + " (nothing was changed)")
            return
        steps = [("copied", m.copy_live), ("stopped", m.stop_old), ("restored", m.restore),
                 ("started", m.start_new), ("switching", None), ("switched", m.switch)]
        if PHASES.index("stopped") <= done < PHASES.index("switching"):
            m.stop_old()  # resuming: make sure the old copy is stopped before going on
        stop_started = None
        for name, step in steps:
            if PHASES.index(name) <= done:
                continue
            if name == "stopped":
                stop_started = time.monotonic()
            if step is None:  # a point of no return, recorded before the step that passes it
                _set_phase(m.src, m.old_lay, sn, to, name)
                log(f"step '{name}' recorded")
                continue
            try:
                step()
            except ForwardingNotLive:
                log(f"step '{name}' failed: the old host refused the forwarding and serves as before")
                m.undo("started")
                raise TaskError(f"migration of {sn} failed at step '{name}' and was rolled back; "
                                f"{sn} runs on {hs.host} as before") from None
            except (RemoteError, TaskError) as exc:
                if PHASES.index(name) < PHASES.index("switching"):
                    log(f"step '{name}' failed: {exc}")
                    m.undo(PHASES[PHASES.index(name) - 1])
                    raise TaskError(f"migration of {sn} failed at step '{name}' and was rolled back; "
                                    f"{sn} runs on {hs.host} as before") from None
                raise TaskError(f"migration of {sn} failed at step '{name}': {exc}\n"
                                f"{sn} runs on {to}; re-run the same command to complete the switch") from None
            _set_phase(m.src, m.old_lay, sn, to, name)
            log(f"step '{name}' done")
            if name == "switched" and stop_started is not None:
                log(f"{sn} was stopped for {time.monotonic() - stop_started:.1f}s (stop to forwarding)")
        record_in_inventory(inv.path, sn, to, hs.host)
        _set_phase(m.src, m.old_lay, sn, to, "recorded")
        m.src.run(f"rm -f {shlex.quote(m.old_lay.migration_state(sn))}", what="clear state")
    finally:
        m.close()
    log(f"""done: {sn} runs on {to} ({inv.hosts[to].address}); {hs.host} forwards its names there.
{inv.path} now says host: {to} (migrated_from: {hs.host}).
Next:
  1. point the DNS records of {', '.join(dict.fromkeys([hs.server_name, hs.hostname] + ([hs.element.hostname] if hs.element.enabled else [])))} at {inv.hosts[to].address}
  2. wait for their TTL to pass (clients and other servers still using the old address are forwarded meanwhile)
  3. inv migrate-host --homeserver {sn} --finish""")


def finish(inv: Inventory, sn: str, yes: bool, keep_backup: bool, log, confirm) -> None:
    """Stop forwarding on the old host and remove the old copy (after a backup)."""
    hs = inv.homeserver(sn)
    old = hs.migrated_from
    if not old:
        raise TaskError(f"{sn} has no migration to finish (no migrated_from in {inv.path})")
    old_host = inv.hosts[old]
    lay = Layout(old_host.base_dir)
    if not yes and not confirm(f"Remove {sn}'s old copy from {old} ({lay.synapse(sn)})"
                               + (" after archiving it" if keep_backup else " WITHOUT a backup") + "?"):
        raise TaskError("nothing was removed")
    after = inv.with_homeserver(hs, migrated_from=None)
    with locked(inv, old_host) as remote:
        converge_as(remote, after, log)
        base = shlex.quote(lay.base)
        root = f"synapse/{sn}"
        paths = " ".join(shlex.quote(p) for p in [root] + Layout.acme_paths(sn)[:-1])
        archive = f"backups/{sn}-{time.strftime('%Y%m%dT%H%M%S')}.tar.gz"
        backup = (f"mkdir -p backups && chmod 700 backups && "
                  f"for p in {paths}; do [ -e \"$p\" ] && echo \"$p\"; done | tar -czf {archive} -T - && ") \
            if keep_backup else ""
        remote.run(f"{COMPOSE_FN}cd {base} && if [ -f {root}/docker-compose.yml ]; then (cd {root} && "
                   f"compose down); fi && {backup}rm -rf {paths}", what=f"remove {sn} from {old}")
    if hs.postgres.host:  # its database's host admits the new host only again
        converge_other(after, hs.postgres.host, log)
    record_in_inventory(inv.path, sn, hs.host, None)
    log(f"{old} no longer serves or forwards {sn}"
        + (f"; its old copy is archived on {old} in {lay.base}/{archive}" if keep_backup else ""))
