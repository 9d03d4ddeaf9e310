"""Converge hosts: render -> facts -> plan -> apply -> report (README, "How a deploy works").

Each host runs in its own thread with its own SSH connection and lock; a failing
host does not stop the others. A converged host costs two remote commands: the
lock and the facts.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from . import docker, facts as facts_mod, guard, plan as plan_mod, postgres, steps
from .errors import InventoryError, LockHeld, SfabError
from .inventory import Inventory
from .plan import Plan
from .remote import Remote, RemoteError, open_remote
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


def exit_code(results: list[HostResult]) -> int:
    """0 when every host converged; 75 when the only failures were held locks
    (try again later); else 1."""
    codes = {r.exit_code for r in results if r.failed}
    return 0 if not codes else 75 if codes == {75} else 1


def select_hosts(inv: Inventory, hosts: list[str] | None, homeservers: list[str] | None) -> list[str]:
    """Inventory host names to act on, from --host / --homeserver filters."""
    names = list(inv.hosts)
    if hosts:
        for h in hosts:
            if h not in inv.hosts:
                raise InventoryError(f"{inv.path}: no host {h!r} (known hosts: {', '.join(inv.hosts)})")
        names = [n for n in names if n in hosts]
    if homeservers:
        wanted = {inv.homeserver(s).host for s in homeservers}
        names = [n for n in names if n in wanted]
    if not hosts:
        # A host with no homeserver (e.g. a migration target) is left alone
        # unless named: deploying it would only start an idle proxy.
        names = [n for n in names if inv.homeservers_on(n)]
    return names


def deploy(
    inv: Inventory,
    host_names: list[str],
    dry_run: bool = False,
    install: bool = False,
    report: Optional[Reporter] = None,
    pull: bool = False,
) -> list[HostResult]:
    """Converge `host_names` in parallel. `install` (bootstrap) installs Docker first;
    `pull`: hosts that pull images ask their registry again for every tag."""
    report = report or Reporter()
    states = {name: render_host(inv, name) for name in host_names}  # render errors stop all
    local = local_images(inv, list(states.values()))
    with ThreadPoolExecutor(max_workers=max(1, len(host_names))) as pool:
        futures = [
            pool.submit(_converge_host, inv, states[n], local, dry_run, install, report, pull)
            for n in host_names
        ]
        results = [f.result() for f in futures]
    report.summary(results, dry_run)
    return results


def local_images(inv: Inventory, states) -> dict[str, str]:
    """IDs of the images that hosts with the `push` source need, on this machine."""
    wanted = sorted({ref for s in states for ref in s.images if inv.hosts[s.host.name].images == "push"})
    pinned = [ref for ref in wanted if "@" in ref]
    if pinned:
        raise InventoryError(
            f"{inv.path}: {', '.join(pinned)}: a digest pin needs a registry; hosts with "
            "`images: push` receive images by ID over SSH (use a tag for them, or `images: pull`)")
    local = docker.local_image_ids(wanted) if wanted else {}
    missing = [ref for ref in wanted if ref not in local]
    if missing:
        raise InventoryError(f"image source 'push' needs these images on this machine first: {', '.join(missing)}")
    return local


def _converge_host(inv, state, local_images, dry_run, install, report, pull=False) -> HostResult:
    name = state.host.name
    result = HostResult(name)
    started = time.monotonic()
    remote: Optional[Remote] = None
    try:
        remote = open_remote(inv, state.host)
        # the facts come with the lock, on its channel (bootstrap asks after installing Docker)
        facts_out = remote.lock(inv.ssh.lock_timeout, then="" if install else facts_mod.script(state))
        converge(remote, state, local_images, report, result, dry_run=dry_run, install=install, pull=pull,
                 facts_out=facts_out or None)
    except SfabError as exc:
        result.error = str(exc)
        result.exit_code = exc.exit_code if isinstance(exc, LockHeld) else 1
    except Exception as exc:  # an unexpected failure must not hide the other hosts
        result.error = f"{name}: unexpected {type(exc).__name__}: {exc}"
        result.exit_code = 1
    finally:
        if remote is not None:
            result.commands = remote.commands
            remote.close()
        result.seconds = time.monotonic() - started
    return result


def converge(remote: Remote, state, local_images, report: Reporter, result: HostResult,
             dry_run: bool = False, install: bool = False, hold: tuple[str, ...] = (),
             pull: bool = False, migrating: str = "", facts_out: Optional[str] = None) -> None:
    """One host, already opened and locked. `hold`: homeservers whose Synapse must
    not start (a migration starts only their PostgreSQL, to restore into it);
    `migrating`: the homeserver a migration moves (its records do not stop it);
    `facts_out`: the facts script's output when the lock brought it."""
    name = state.host.name
    log = lambda msg: report.line(name, msg)  # noqa: E731
    if install:
        docker.install(remote, log)
        docker.start_engine(remote)
    script = facts_mod.script(state)
    facts = facts_mod.parse(facts_out if facts_out is not None else remote.run(script, what="gather facts").out)
    engine_started = False
    if facts.docker and not facts.engine and not dry_run:
        # e.g. after a reboot of a host without systemd: nothing started Docker
        log("the Docker engine is not running: starting it")
        docker.start_engine(remote)
        engine_started = True
        result.restarted.append("Docker engine (start)")
        facts = facts_mod.parse(remote.run(script, what="gather facts").out)
    if not facts.docker:
        raise RemoteError(f"{name}: Docker is not installed; run `fab -H {name} bootstrap` first")
    if not facts.compose:
        raise RemoteError(f"{name}: neither `docker compose` nor `docker-compose` is installed; run bootstrap")
    guard.check(state, facts, remote.inv.path, migrating)
    keep, notes = postgres.keep_majors(state, facts)
    for note in notes:
        log(note)
    if keep:  # same paths, another image in those homeservers' compose files
        state = render_host(remote.inv, name, keep_postgres=keep)
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


def host_projects(state) -> list[str]:
    """Every compose project this host runs."""
    return [PROXY_PROJECT] + [synapse_project(hs) for hs in state.homeservers]


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
