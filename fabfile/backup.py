"""Backups with restic: one snapshot per homeserver in the repository hosts.yaml
names (`backup.repository`), encrypted and deduplicated.

A snapshot holds a consistent database dump (pg_dump's custom format, never the
live database files), Synapse's schema version, and the homeserver's files
(Layout.backup_paths: config, signing key, media, secrets, certificate, certbot's
account). Snapshots carry the tag `synapse-fabric:<server_name>` and the homeserver
as their restic "host", so one repository may hold several homeservers.

The repository password is made on the host once (0600, BACKUP_PASSWORD) and a copy
is kept on this machine (password_copy()): without it, no snapshot can be read
after the host is lost. Credentials of a remote repository (S3 keys, a REST
server's password) are the operator's, in the host's BACKUP_ENV; none is in argv,
in the inventory or in a log.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from . import database
from .errors import SfabError, TaskError
from .inventory import Homeserver, Host, Inventory
from .layout import BACKUP_ENV, BACKUP_PASSWORD, Layout
from .remote import Remote, locked, session
from .render import synapse_project
from .shell import program


def tag(hs: Homeserver) -> str:
    return f"synapse-fabric:{hs.server_name}"


def repository(inv: Inventory, host_name: str) -> str:
    """The repository of one host: backup.repository with the host's name appended.
    Each host has its own, with its own password: a host can read its own snapshots
    only, and two hosts never fight over one repository's keys."""
    return f"{inv.backup.repository.rstrip('/')}/{host_name}"


def repository_inputs(inv: Inventory, host_name: str, create: bool = False) -> dict:
    """The inputs of fabfile/scripts/restic.sh; `create`: make the password and the
    repository when missing (a backup), not when reading one (a listing, a restore)."""
    return {"repository": repository(inv, host_name), "password_file": BACKUP_PASSWORD, "env_file": BACKUP_ENV,
            "create": "yes" if create else "no"}


@dataclass(frozen=True)
class Snapshot:
    server_name: str
    id: str
    time: str          # ISO 8601, as restic gives it
    size: Optional[int] = None   # bytes the snapshot's files hold (restic >= 0.17 says)
    added: Optional[int] = None  # bytes this snapshot added to the repository (when just taken)

    @property
    def short_id(self) -> str:
        return self.id[:8]


def password_copy(host: Host) -> Path:
    """Where this machine keeps its copy of a host's repository password."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "synapse-fabric" / "backup" / f"{host.name}.restic-password"


def keep_password(remote: Remote, host: Host) -> Path:
    """Copy the host's repository password here (0600, atomically) unless the same is
    kept already; a different one is kept beside the old, never over it."""
    secret = remote.run(f"cat {BACKUP_PASSWORD}", what="the repository password (kept on this machine)").out
    path = password_copy(host)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        if path.read_text() == secret:
            return path
        path.rename(path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}"))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(secret)
    os.replace(tmp, path)
    return path


def _snapshot_program(inv: Inventory, hs: Homeserver) -> str:
    lay = Layout(inv.hosts[hs.host].base_dir)
    return program("restic.sh", "database.sh", "dump.sh", "backup.sh", **repository_inputs(inv, hs.host, create=True),
                   one_time_keys="no", cleanup="yes", project=synapse_project(hs),
                   server_name=hs.server_name, **database.inputs(inv, hs),
                   staging=lay.backup_staging(hs.server_name), tag=tag(hs),
                   paths="\n".join(lay.backup_paths(hs.server_name)))


def host_program(inv: Inventory, servers: list[Homeserver]) -> bytes:
    """bin/backup, run by the backup timer (or cron): a snapshot of each homeserver
    on the host, then the retention (backup.keep); one failing does not stop the
    others, and the program exits 1 at the end. Pure: the host programs of
    fabfile/scripts/ with their inputs."""
    keep = inv.backup.keep
    parts = ["#!/bin/sh\n"
             "# Managed by synapse-fabric: the daily backup of this host's homeservers (fabfile/backup.py).\n"
             "# One subshell each, its status read after it (inside `if` or `||`, `set -e` would be\n"
             "# off in there): a failure is reported and the next homeserver still runs.\n"
             "# shellcheck disable=SC2030,SC2031,SC2181\n"
             "failed=\"\"\n"]
    for hs in servers:
        forget = program("forget.sh", server_name=hs.server_name, tag=tag(hs), keep_daily=keep.daily,
                         keep_weekly=keep.weekly, keep_monthly=keep.monthly)
        parts.append(f"echo \"{hs.server_name}: snapshot\"\n(\n{_snapshot_program(inv, hs)}{forget})\n"
                     f"[ $? -eq 0 ] || failed=\"$failed {hs.server_name}\"\n")
    parts.append('if [ -n "$failed" ]; then echo "backup FAILED for:$failed" >&2; exit 1; fi\necho "backup done"\n')
    return "".join(parts).encode()


def snapshot(remote: Remote, inv: Inventory, hs: Homeserver) -> Snapshot:
    """Take one snapshot of `hs` on its host (the caller holds the host's lock)."""
    out = remote.run(_snapshot_program(inv, hs), what=f"{hs.server_name}: snapshot", timeout=6 * 3600).out
    try:
        summary = json.loads(out.strip().splitlines()[-1])
        sid = summary["snapshot_id"]
    except (IndexError, ValueError, KeyError):
        raise TaskError(f"{hs.server_name}: restic did not report a snapshot: {out.strip()[-300:]}") from None
    return Snapshot(hs.server_name, sid, time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    summary.get("total_bytes_processed"), summary.get("data_added"))


def _by_host(inv: Inventory, servers: Iterable[Homeserver]) -> dict[str, list[Homeserver]]:
    out: dict[str, list[Homeserver]] = {}
    for hs in servers:
        out.setdefault(hs.host, []).append(hs)
    return out


def _select(inv: Inventory, homeserver: Optional[str]) -> list[Homeserver]:
    return [inv.homeserver(homeserver)] if homeserver else sorted(inv.homeservers.values(),
                                                                   key=lambda hs: hs.server_name)


def backup(inv: Inventory, homeserver: Optional[str], log: Callable[[str], None]) -> list[Snapshot]:
    """Snapshot one homeserver, or every one (host by host, under each host's lock)."""
    taken = []
    for host_name, servers in _by_host(inv, _select(inv, homeserver)).items():
        host = inv.hosts[host_name]
        with locked(inv, host) as remote:
            for hs in servers:
                t0 = time.monotonic()
                snap = snapshot(remote, inv, hs)
                log(f"{hs.server_name}: snapshot {snap.short_id} in {repository(inv, host_name)} "
                    f"({_size(snap.size)} of files, {_size(snap.added)} new) in {time.monotonic() - t0:.1f}s")
                taken.append(snap)
            kept = keep_password(remote, host)
        log(f"{host_name}: its repository password is kept on this machine in {kept} (0600): "
            "without it no snapshot can be read once the host is gone")
    return taken


def snapshots(inv: Inventory, homeserver: Optional[str]) -> list[Snapshot]:
    """Every snapshot of one homeserver, or of every one, oldest first."""
    found = []
    for host_name, servers in _by_host(inv, _select(inv, homeserver)).items():
        with locked(inv, inv.hosts[host_name]) as remote:
            for hs in servers:
                script = program("restic.sh", **repository_inputs(inv, host_name)) + f'restic snapshots --json --tag "{tag(hs)}"\n'
                res = remote.run(script, what=f"{hs.server_name}: snapshots", check=False)
                if res.code == 10:  # no repository yet: no snapshots
                    continue
                if res.code:
                    raise TaskError(f"{hs.server_name}: cannot list its snapshots on {host_name}: "
                                    + (res.err.strip().splitlines() or ["restic failed"])[-1])
                for s in json.loads(res.out or "[]") or []:
                    summary = s.get("summary") or {}
                    found.append(Snapshot(hs.server_name, s["id"], s["time"], summary.get("total_bytes_processed")))
    return sorted(found, key=lambda s: (s.server_name, s.time))


def format_snapshots(snaps: list[Snapshot]) -> str:
    if not snaps:
        return "no snapshots"
    rows = [f"{s.server_name:<24} {s.short_id}  {s.time[:19].replace('T', ' ')}  {_size(s.size):>9}" for s in snaps]
    return "\n".join([f"{'homeserver':<24} {'id':<8}  {'time (host)':<19}  {'size':>9}"] + rows)


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def newest(inv: Inventory, servers: list[Homeserver]) -> dict[str, Optional[Snapshot] | str]:
    """Each homeserver's newest snapshot (None: none yet), or why it could not be
    read; host by host, changing nothing there (restic is not installed for it)."""
    found: dict[str, Optional[Snapshot] | str] = {}
    for host_name, group in _by_host(inv, servers).items():
        script = ("command -v restic >/dev/null 2>&1 || { echo NONE; exit 0; }\n"
                  + program("restic.sh", **repository_inputs(inv, host_name))
                  + "".join(f'printf "%s\\t" {hs.server_name}; restic snapshots --json --latest 1 '
                            f'--host {hs.server_name} --tag "{tag(hs)}" | jq -c \'sort_by(.time) | last\'\n'
                            for hs in group))
        try:
            with session(inv, inv.hosts[host_name]) as remote:
                res = remote.run(script, check=False, what="newest snapshots")
        except SfabError as exc:
            found.update({hs.server_name: str(exc).splitlines()[0] for hs in group})
            continue
        if res.out.strip() == "NONE" or res.code == 10 or (res.code and "no repository password" in res.err):
            found.update({hs.server_name: None for hs in group})
            continue
        if res.code:
            found.update({hs.server_name: (res.err.strip().splitlines() or ["restic failed"])[-1] for hs in group})
            continue
        for line in res.out.splitlines():
            sn, _, doc = line.partition("\t")
            snap = json.loads(doc) if doc.strip() not in ("", "null") else None
            found[sn] = Snapshot(sn, snap["id"], snap["time"]) if snap else None
    return found


def age_problem(inv: Inventory, snap: Optional[Snapshot] | str, now: float) -> tuple[Optional[str], str]:
    """(why `inv check` fails, or None; what it says) for a homeserver's newest snapshot."""
    limit = inv.backup.stale_after_hours
    scheduled = inv.backup.schedule is not None
    if isinstance(snap, str):
        return (f"cannot read the backups: {snap}", "")
    if snap is None:
        if scheduled:
            return (f"no snapshot yet (backup.schedule is {inv.backup.schedule}; inv backup takes one now)", "")
        return (None, "no snapshot (backup.schedule is not set: only inv backup takes them)")
    # restic writes nanoseconds; Python reads at most microseconds
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", snap.time.replace("Z", "+00:00"))
    taken = datetime.datetime.fromisoformat(stamp).timestamp()
    hours = (now - taken) / 3600
    said = f"newest {snap.short_id}, {hours:.1f} h old"
    if hours > limit and scheduled:
        return (f"{said}: older than backup.stale_after_hours ({limit})", "")
    return (None, said + ("" if scheduled else " (no schedule)"))
