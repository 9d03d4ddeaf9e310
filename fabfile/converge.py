"""One host, opened and locked: facts -> guard -> plan -> steps (or, with --dry-run,
the diffs and the steps that would run). fabfile/deploy.py runs it for every host."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from . import database, docker, facts as facts_mod, firewall, guard, guests, plan as plan_mod, postgres, steps, versions
from .plan import Plan
from .remote import Remote, RemoteError
from .render import PROXY_PROJECT, render_host, synapse_project
from .report import Reporter, masked_diff


@dataclass
class HostResult:
    host: str
    changed: int = 0
    ok: int = 0
    restarted: list[str] = field(default_factory=list)
    error: Optional[str] = None
    exit_code: int = 0  # of the failure (fabfile/errors.py)
    seconds: float = 0.0
    commands: int = 0

    @property
    def failed(self) -> bool:
        return self.error is not None


def converge(remote: Remote, state, local_images, report: Reporter, result: HostResult,
             dry_run: bool = False, install: bool = False, hold: tuple[str, ...] = (),
             pull: bool = False, migrating: str = "", facts_out: Optional[str] = None,
             synapse_pins: Optional[dict[str, str]] = None, inv=None) -> None:
    """One host, already opened and locked, to `state`, rendered from `inv` (default:
    the inventory the host was opened with). `hold`: homeservers whose Synapse must
    not start (a migration starts only their PostgreSQL, to restore into it);
    `migrating`: the homeserver a migration moves (its records do not stop it);
    `facts_out`: the facts script's output when the lock brought it; `synapse_pins`:
    the Synapse image of some homeservers, set by `inv upgrade` (the others keep the
    one they run: fabfile/versions.py)."""
    name = state.host.name
    inv = inv or remote.inv
    log = lambda msg: report.line(name, msg)  # noqa: E731
    if install:
        docker.install(remote, log)
        docker.start_engine(remote)
    gather = lambda: remote.run(facts_mod.script(state), what="gather facts").out  # noqa: E731
    facts = facts_mod.parse(facts_out if facts_out is not None else gather(), state)
    engine_started = False
    if facts.docker and not facts.engine and not dry_run:
        # e.g. after a reboot of a host without systemd: nothing started Docker
        log("the Docker engine is not running: starting it")
        docker.start_engine(remote)
        engine_started = True
        result.restarted.append("Docker engine (start)")
        facts = facts_mod.parse(gather(), state)
    if not facts.docker:
        raise RemoteError(f"{name}: Docker is not installed; run `fab -H {name} bootstrap` first")
    if not facts.compose:
        raise RemoteError(f"{name}: neither `docker compose` nor `docker-compose` is installed; run bootstrap")
    guard.check(state, facts, inv.path, migrating)
    database.check_before_deploy(state, facts)
    firewall.check_ssh(inv, name, facts.sshd_ports)
    keep, notes = postgres.keep_majors(state, facts)
    keep_synapse, synapse_notes = versions.keep_synapse(state, facts, synapse_pins)
    for note in notes + synapse_notes:
        log(note)
    for sn in sorted(facts.databases - set(state.databases)):  # never removed by a deploy: it holds data
        log(f"{state.layout.database(sn)} holds a database no homeserver of hosts.yaml runs here (postgres.host); "
            "it is left as it is: `inv uninstall` of its homeserver removes it, or remove it by hand")
    # workers of other hosts' homeservers: what they copy is read there (the paths
    # were in the facts script already; only the contents change)
    copies = guests.copies_for(inv, name) if state.guests else None
    # a database on another host: its password, read there, while the passfile is missing here
    passfiles = database.passfiles(inv, state, facts, dry_run)
    if keep or keep_synapse or copies or passfiles:  # same paths, other contents
        state = render_host(inv, name, keep_postgres=keep, keep_synapse=keep_synapse, guest_copies=copies,
                            db_passfiles=passfiles)
    push = state.host.images == "push"
    plan = plan_mod.make(state, facts, local_images, push, refresh_tags=pull)
    result.ok = plan.ok
    result.changed = len(plan.changes)
    for change in plan.changes:
        log(change.line())
    if dry_run:
        _show_diffs(remote, plan, report)
        result.restarted = plan.restarts
    elif not plan.empty:
        _apply(remote, plan, facts, log, result, hold)
    if engine_started:
        # the engine brings back its containers (restart: unless-stopped): "deployed"
        # means they are healthy again, not merely started
        docker.wait_healthy(remote, host_projects(state), log)


def converge_as(remote: Remote, inv, log, **options) -> None:
    """Converge the open, locked host `remote` to what `inv` says it holds, its
    lines going to `log`: a step of an operation (a migration, an uninstall, an
    upgrade) that changes the inventory it converges to. `options`: converge's."""
    from .deploy import local_images  # (deploy.py imports this module)
    from .report import LineWriter
    state = render_host(inv, remote.name)
    converge(remote, state, local_images(inv, [state]), Reporter(LineWriter(log)), HostResult(remote.name), inv=inv,
             **options)


def converge_other(inv, host_name: str, log, **options) -> None:
    """Lock another host of the operation and converge it to what `inv` says (e.g.
    the host of a homeserver's database, to let a new host in)."""
    from .remote import locked
    with locked(inv, inv.hosts[host_name]) as remote:
        converge_as(remote, inv, log, **options)


def host_projects(state) -> list[str]:
    """Every compose project this host runs."""
    return [PROXY_PROJECT] + [synapse_project(hs) for hs in state.homeservers] + [
        g.project for g in state.guests.values()] + [d.project for d in state.databases.values()]


def _show_diffs(remote: Remote, plan: Plan, report: Reporter) -> None:
    """--dry-run: the files as masked diffs, then every step with its reason."""
    old = remote.read_files([f.path for f in plan.files])
    for f in plan.files:
        report.diff(remote.name, masked_diff(f.path, old.get(f.path), f.content, f.secret))
    for action in plan.actions:
        if action.why or action.only_if is None:
            report.line(remote.name, action.line())


def _apply(remote: Remote, plan: Plan, facts, log, result: HostResult, hold=()) -> None:
    """Run the plan's steps in order (fabfile/steps.py)."""
    run = steps.Run(remote, log, docker.compose_cmd(facts), hold, restarted=result.restarted)
    for action in plan.actions:
        if action.only_if is None or action.only_if(run):
            action.how(run)
