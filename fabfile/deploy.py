"""Converge hosts: render -> facts -> plan -> apply -> report (README, "How a deploy works").

Each host runs in its own thread with its own SSH connection and lock; a failing
host does not stop the others. A converged host costs two remote commands: the
lock and the facts.
"""

from __future__ import annotations

import io
import shlex
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from . import docker, element, facts as facts_mod, guard, plan as plan_mod, postgres, proxy, synapse
from .errors import InventoryError, LockHeld, SfabError
from .inventory import Inventory
from .plan import Plan
from .remote import Remote, RemoteError, open_remote
from .render import HIDDEN, PROXY_PROJECT, SYSTEMD_DIR, RemoteFile, cert_names, render_host, synapse_project
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
        remote.lock(inv.ssh.lock_timeout)
        converge(remote, state, local_images, report, result, dry_run=dry_run, install=install, pull=pull)
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
             pull: bool = False, migrating: str = "") -> None:
    """One host, already opened and locked. `hold`: homeservers whose Synapse must
    not start (a migration starts only their PostgreSQL, to restore into it);
    `migrating`: the homeserver a migration moves (its records do not stop it)."""
    name = state.host.name
    log = lambda msg: report.line(name, msg)  # noqa: E731
    if install:
        docker.install(remote, log)
        docker.start_engine(remote)
    script = facts_mod.script(state)
    facts = facts_mod.parse(remote.run(script, what="gather facts").out)
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
    changed = [f for f in plan.files]
    old = remote.read_files([f.path for f in changed])
    for f in changed:
        report.diff(remote.name, masked_diff(f.path, old.get(f.path), f.content, f.secret))
    for ref in plan.pulls:
        report.line(remote.name, f"would pull: {ref}")
    for unit in plan.timers:
        report.line(remote.name, f"would enable and start: {unit}")
    for action in plan.restarts:
        report.line(remote.name, f"would restart: {action}")


def _tar(files: list[RemoteFile], suffix: str) -> bytes:
    buf = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            info = tarfile.TarInfo(f.path.lstrip("/") + suffix)
            info.size = len(f.content)
            info.mode = f.mode
            uid, gid = f.owner.split(":")
            info.uid, info.gid = int(uid), int(gid)
            info.mtime = now
            tar.addfile(info, io.BytesIO(f.content))
    return buf.getvalue()


def _apply(remote: Remote, plan: Plan, facts, log, result: HostResult, hold=()) -> None:
    state = plan.state
    lay = state.layout
    compose = docker.compose_cmd(facts)
    if plan.engine_start:
        log("starting the Docker engine")
        docker.start_engine(remote)
    docker.push_images(remote, plan.images, log)
    # pulled before anything stops; an image whose ID moved must reach its containers
    for ref in docker.pull_images(remote, plan.pulls, log):
        for trigger in plan_mod.image_triggers(state, ref):
            if trigger == "proxy:stack":
                plan.proxy_up = True
            else:
                sn = trigger.split(":")[1]
                if sn not in plan.synapse_up:
                    plan.synapse_up.append(sn)

    # Files, directories, secrets, ownership: one command, files written atomically
    # (extracted beside their target as *.sfab-new, then renamed over it).
    files = list(plan.files)
    for sn in plan.placeholder_certs:
        hs = next(h for h in state.homeservers if h.server_name == sn)
        chain, key = proxy.placeholder_cert(cert_names(hs))
        files += [
            RemoteFile(f"{lay.certs(sn)}/fullchain.pem", chain, 0o644),
            RemoteFile(f"{lay.certs(sn)}/privkey.pem", key, 0o600, secret=HIDDEN),
        ]
    conf_d = f"{lay.proxy}/nginx/conf.d/"
    reload_confs = (
        [f.path for f in plan.files if f.trigger == "proxy:reload"] + [p for p in plan.remove if p.startswith(conf_d)]
        if plan.nginx_reload else []
    )
    lines = ["set -e"]
    journal = shlex.quote(facts_mod.pending_file(state))
    owed = sorted(t for t in plan.triggers if t.split(":")[0] in ("proxy", "synapse"))
    if owed:
        lines.append(f"mkdir -p {shlex.quote(lay.base)} && printf '%s\\n' {' '.join(owed)} >> {journal}")
    for d in plan.dirs:
        p = shlex.quote(d.path)
        lines.append(f"mkdir -p {p} && chmod {d.mode:o} {p} && chown {d.owner} {p}")
    if files:
        lines.append("tar -x -p --same-owner --numeric-owner -f - -C /")
        for f in files:
            p = shlex.quote(f.path)
            if f.path in reload_confs:
                lines.append(f"if [ -e {p} ]; then cp -p {p} {p}{proxy.BACKUP}; fi")
            lines.append(f"mv -fT {p}.sfab-new {p}")
    for path in plan.remove:
        p = shlex.quote(path)
        if path.startswith(f"{SYSTEMD_DIR}/synapse-fabric-") and path.endswith(".timer"):
            lines.append(f"systemctl disable --now {shlex.quote(path.rsplit('/', 1)[1])} >/dev/null 2>&1 || true")
        # an nginx file is kept aside until nginx accepts the config without it
        lines.append(f"mv -f {p} {p}{proxy.BACKUP}" if path in reload_confs else f"rm -f {p}")
    hs_by_name = {h.server_name: h for h in state.homeservers}
    for sn in plan.secrets:
        lines.append(synapse.secrets_script(lay, hs_by_name[sn]))
    for sn in plan.chown_data:
        lines.append(synapse.chown_data_script(lay, hs_by_name[sn]))
    remote.run("\n".join(lines) + "\n", stdin=_tar(files, ".sfab-new") if files else None, what="write files")

    touched: list[str] = []
    nginx_error = None
    if plan.proxy_up:
        log("starting the reverse-proxy stack")
        remote.run(f"cd {shlex.quote(lay.proxy)} && {compose} up -d --remove-orphans", what="proxy up")
        result.restarted.append("reverse proxy (up)")
        touched.append(PROXY_PROJECT)
    if plan.nginx_reload:
        try:
            remote.run(proxy.reload_script(reload_confs), what="nginx reload")
            result.restarted.append("nginx (reload)")
        except RemoteError as exc:
            nginx_error = str(exc)
            log(nginx_error)
    for sn in plan.generate:
        log(f"{sn}: running Synapse generate (config, signing key)")
        remote.run(synapse.generate_script(lay, hs_by_name[sn], compose), what=f"{sn}: generate", timeout=300)
    for sn in plan.synapse_up:
        hs = hs_by_name[sn]
        only = " postgres" if sn in hold else ""
        log(f"{sn}: starting its stack" + (" (PostgreSQL only)" if only else ""))
        remote.run(f"cd {shlex.quote(lay.synapse(sn))} && {compose} up -d --remove-orphans{only}", what=f"{sn}: up")
        result.restarted.append(f"{sn} (up)")
        touched.append(synapse_project(hs))
    for sn in plan.synapse_restart:
        if sn in hold:
            continue
        # (after an `up`, too: `up` recreates Synapse only when its compose entry changed)
        hs = hs_by_name[sn]
        log(f"{sn}: restarting Synapse")
        project = synapse_project(hs)
        remote.run(
            f"docker restart $(docker ps -q --filter label=com.docker.compose.project={project} "
            "--filter label=com.docker.compose.service=synapse)",
            what=f"{sn}: restart",
        )
        result.restarted.append(f"{sn} (restart)")
        if project not in touched:
            touched.append(project)
    docker.wait_healthy(remote, touched, log)
    issued = []
    for sn in plan.install_cert:
        log(f"{sn}: serving certbot's certificate again")
        remote.run(proxy.install_cert_script(lay.proxy, sn), what=f"{sn}: install certificate")
        issued.append(sn)
    for sn in plan.issue:
        hs = hs_by_name[sn]
        log(f"{sn}: asking the ACME CA ({state.acme.directory}) for a certificate")
        remote.run(proxy.issue_script(lay.proxy, hs, cert_names(hs), state.acme),
                   what=f"{sn}: certificate", timeout=300)
        issued.append(sn)
    if issued:
        remote.run(proxy.reload_script([]), what="nginx reload")
        result.restarted.append("nginx (reload: new certificates)")
    for site in plan.element_install:
        log(f"{site}: installing Element Web")
        remote.run(element.update_script(lay.proxy, "--site", site), what=f"{site}: Element install", timeout=900,
                   on_stdout=log)
    if plan.timers or any(p.startswith(SYSTEMD_DIR) for p in plan.remove):
        units = " ".join(shlex.quote(u) for u in plan.timers)
        log(f"systemd timers: {', '.join(plan.timers) or 'reloaded'}")
        remote.run("systemctl daemon-reload" + (f" && systemctl enable --now {units}" if units else ""),
                   what="enable timers")
    if nginx_error:
        raise RemoteError(nginx_error)
    if owed or plan.pending_done:
        remote.run(f"rm -f {journal}", what="clear the pending actions")
