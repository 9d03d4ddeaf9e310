"""The steps that change a host, as data: what each does, why (the change that
implies it) and how (its remote command). `plan.make` emits them in order, the
deploy runs them in one loop, and `--dry-run` prints the same list.

Adding a managed service: give its files a trigger in render.py, and here a
builder that returns its Action; `actions()` puts it in order.
"""

from __future__ import annotations

import io
import shlex
import tarfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import docker, element, proxy, synapse, turn
from .errors import RemoteError, SfabError
from .layout import FIREWALL_DIR, SYSTEMD_DIR
from .shell import program
from .render import HIDDEN, PROXY_PROJECT, RemoteFile, synapse_project

from .remote import Remote


@dataclass
class Run:
    """What the apply loop hands every step, and what steps leave for later ones."""

    remote: Remote
    log: Callable[[str], None]
    compose: str
    hold: tuple[str, ...] = ()  # homeservers whose Synapse must not start (a migration)
    restarted: list[str] = field(default_factory=list)  # for the summary line
    touched: list[str] = field(default_factory=list)  # compose projects to wait for
    new_images: set[str] = field(default_factory=set)  # references a pull gave a new image ID
    certificates: int = 0  # certificates installed: nginx reloads once after them
    deferred: list[str] = field(default_factory=list)  # failures raised after the rest ran


@dataclass(frozen=True)
class Action:
    what: str
    why: str
    how: Callable[[Run], None]
    restart: str = ""  # its name in the summary's "restarted" list (its `how` adds it when it acts)
    only_if: Optional[Callable[[Run], bool]] = None  # decided while applying

    def line(self) -> str:
        when = " if" + self.why[len("when"):] if self.why.startswith("when ") else f" ({self.why})"
        return f"would {self.what}" + (when if self.why else "")


def _because(reasons: list[str]) -> str:
    shown = list(dict.fromkeys(reasons))
    return ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")


# -- builders ---------------------------------------------------------------------


def start_engine() -> Action:
    def how(run: Run) -> None:
        run.log("starting the Docker engine")
        docker.start_engine(run.remote)
    return Action("start the Docker engine", "it is not running", how)


def push(refs: list[str]) -> Action:
    return Action(f"ship {len(refs)} image(s) over SSH: {', '.join(refs)}", "the host lacks their image IDs",
                  lambda run: docker.push_images(run.remote, refs, run.log))


def pull(refs: list[str]) -> Action:
    def how(run: Run) -> None:
        run.new_images.update(docker.pull_images(run.remote, refs, run.log))
    return Action(f"pull {', '.join(refs)}", "the host lacks it, a service switches to it, or --pull asks again", how)


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


def write(plan, owed: list[str], reload_confs: list[str]) -> Action:
    """Files, directories, secrets, ownership in ONE command, every file written
    beside its target as *.sfab-new and renamed over it. The service actions the
    new files need are appended to the pending journal first."""
    state = plan.state
    lay = state.layout
    by_name = {h.server_name: h for h in state.homeservers}

    def how(run: Run) -> None:
        files = list(plan.files)
        for sn in plan.placeholder_certs:  # made here: a key is never part of a plan
            chain, key = proxy.placeholder_cert(list(state.certificates[sn]))
            files += [RemoteFile(f"{lay.certs(sn)}/fullchain.pem", chain, 0o644),
                      RemoteFile(f"{lay.certs(sn)}/privkey.pem", key, 0o600, secret=HIDDEN)]
        lines = ["set -e"]
        if owed:
            lines.append(f"mkdir -p {shlex.quote(lay.base)} && printf '%s\\n' {' '.join(map(shlex.quote, owed))} "
                         f">> {shlex.quote(lay.pending)}")
        for d in plan.dirs:
            p = shlex.quote(d.path)
            lines.append(f"mkdir -p {p} && chmod {d.mode:o} {p} && chown {d.owner} {p}")
        if files:
            lines.append("tar -x -p --same-owner --numeric-owner -f - -C /")
            for f in files:
                p = shlex.quote(f.path)
                if f.path in reload_confs:  # kept aside until nginx accepts the new config
                    lines.append(f"if [ -e {p} ]; then cp -p {p} {p}{proxy.BACKUP}; fi")
                lines.append(f"mv -fT {p}.sfab-new {p}")
        for path in plan.remove:
            p = shlex.quote(path)
            if path.startswith(f"{SYSTEMD_DIR}/synapse-fabric-") and path.endswith((".timer", "-firewall.service")):
                lines.append(f"systemctl disable --now {shlex.quote(path.rsplit('/', 1)[1])} >/dev/null 2>&1 || true")
            lines.append(f"mv -f {p} {p}{proxy.BACKUP}" if path in reload_confs else f"rm -f {p}")
        lines += [synapse.secrets_script(lay, by_name[sn], bool(plan.state.workers.get(sn))) for sn in plan.secrets]
        lines += [synapse.chown_data_script(lay, by_name[sn]) for sn in plan.chown_data]
        lines += [synapse.database_secret_script(lay, state.databases[sn].hs) for sn in plan.database_secrets]
        if plan.turn_secret:
            lines.append(turn.secret_script(lay))
        run.remote.run("\n".join(lines) + "\n", stdin=_tar(files, ".sfab-new") if files else None,
                       what="write files")

    n = len(plan.files) + len(plan.dirs) + len(plan.remove)
    return Action(f"write {n} file(s) and director(ies)", _because([c.line()[2:] for c in plan.changes]), how)


def firewall(action: str, why: str) -> Action:
    """Load the rendered rules and hook our chains in (or remove them): one program,
    the one the host runs at boot (fabfile/scripts/firewall.sh)."""
    def how(run: Run) -> None:
        run.log("firewall: " + ("loading the rules" if action == "apply" else "removing it"))
        run.remote.run(program("firewall.sh", action=action, dir=FIREWALL_DIR), what=f"firewall {action}")
    return Action("load the firewall's rules" if action == "apply" else "remove the firewall", why, how)


def proxy_up(lay, why: str, only_if=None) -> Action:
    def how(run: Run) -> None:
        run.log("starting the reverse-proxy stack")
        run.remote.run(f"cd {shlex.quote(lay.proxy)} && {run.compose} up -d --remove-orphans", what="proxy up")
        run.restarted.append("reverse proxy (up)")
        run.touched.append(PROXY_PROJECT)
    return Action("start the reverse-proxy stack (up)", why, how, "reverse proxy (up)", only_if)


def nginx_reload(confs: list[str], why: str) -> Action:
    """A config nginx refuses is put back and the failure raised at the end (the
    other steps still run: the old config keeps serving)."""
    def how(run: Run) -> None:
        try:
            run.remote.run(proxy.reload_script(confs), what="nginx reload")
            run.restarted.append("nginx (reload)")
        except RemoteError as exc:
            run.deferred.append(str(exc))
            run.log(str(exc))
    return Action("reload nginx", why, how)


def generate(lay, hs) -> Action:
    def how(run: Run) -> None:
        run.log(f"{hs.server_name}: running Synapse generate (config, signing key)")
        run.remote.run(synapse.generate_script(lay, hs, run.compose), what=f"{hs.server_name}: generate",
                       timeout=300)
    return Action(f"run Synapse generate for {hs.server_name}", "no homeserver.yaml or signing key yet", how)


def synapse_up(lay, hs, why: str, only_if=None) -> Action:
    sn = hs.server_name

    def how(run: Run) -> None:
        if sn in run.hold and hs.postgres.elsewhere:  # held back, and no database of its own to start
            run.log(f"{sn}: its stack is held back (a migration)")
            return
        only = " postgres" if sn in run.hold else ""
        run.log(f"{sn}: starting its stack" + (" (PostgreSQL only)" if only else ""))
        run.remote.run(f"cd {shlex.quote(lay.synapse(sn))} && {run.compose} up -d --remove-orphans{only}",
                       what=f"{sn}: up")
        run.restarted.append(f"{sn} (up)")
        run.touched.append(synapse_project(hs))
    return Action(f"start the stack of {sn} (up)", why, how, f"{sn} (up)", only_if)


def _restart(run: Run, directory: str, project: str, services: list[str], what: str) -> None:
    """Restart `services` of the compose project in `directory` (stopped ones start,
    missing ones are made by `up`: fabfile/scripts/restart-services.sh)."""
    out = run.remote.run(program("restart-services.sh", project=project, services=" ".join(services),
                                 directory=directory, compose=run.compose), what=what).out.strip()
    if out:
        run.log(f"{what}: {out}")


def synapse_restart(lay, hs, why: str, processes: list[str]) -> Action:
    """Restart every Synapse process of `hs` (`processes`: main first, then its
    workers, which reconnect to it): they all load the settings that changed."""
    sn, project = hs.server_name, synapse_project(hs)
    what = "Synapse" if len(processes) == 1 else f"Synapse and its {len(processes) - 1} workers"

    def how(run: Run) -> None:
        if sn in run.hold:
            return
        run.log(f"{sn}: restarting {what}")
        _restart(run, lay.synapse(sn), project, processes, f"{sn}: restart")
        run.restarted.append(f"{sn} (restart)")
        if project not in run.touched:
            run.touched.append(project)
    # (after an `up` too: `up` recreates Synapse only when its compose entry changed)
    return Action(f"restart {what} of {sn}", why, how, f"{sn} (restart)")


def stop_elsewhere(hs, names: list[str], here: str) -> Action:
    """Before workers start on this host: the same workers on the other hosts of
    the private network (where they ran before a move) are stopped, so no worker
    ever runs twice under one name. A host that cannot be reached is reported."""
    from .remote import session
    from .render import guest_project

    def how(run: Run) -> None:
        inv = run.remote.inv
        for name, host in inv.hosts.items():
            if name == here or not host.private_address:
                continue
            try:
                with session(inv, host) as other:
                    out = other.run(program("stop-workers.sh", project=guest_project(hs), names=" ".join(names)),
                                    what=f"{hs.server_name}: stop moved workers").out.split()
            except SfabError as exc:
                run.log(f"{hs.server_name}: could not reach {name} to stop {', '.join(names)} there, where they "
                        f"may have run before ({str(exc).splitlines()[0]})")
                continue
            if out:
                run.log(f"{hs.server_name}: stopped {', '.join(out)} on {name} (they run here now)")
    return Action(f"stop {', '.join(names)} of {hs.server_name} on the other hosts if they run there",
                  "they start here", how)


def _stack_up(directory: str, project: str, sn: str, what: str, started: str, why: str, only_if) -> Action:
    """`up` the stack in `directory` that this host runs for another host's
    homeserver `sn` (its `what`: workers, database)."""
    def how(run: Run) -> None:
        run.log(f"{sn}: starting its {started} here")
        run.remote.run(f"cd {shlex.quote(directory)} && {run.compose} up -d --remove-orphans",
                       what=f"{sn}: {what} up")
        run.restarted.append(f"{sn} {what} (up)")
        run.touched.append(project)
    return Action(f"start the {what} of {sn} here (up)", why, how, f"{sn} {what} (up)", only_if)


def database_up(lay, db, why: str, only_if=None) -> Action:
    """`up` the stack of another host's homeserver's database on this host."""
    sn = db.hs.server_name
    return _stack_up(lay.database(sn), db.project, sn, "database", "database", why, only_if)


def guest_up(lay, guest, why: str, only_if=None) -> Action:
    """`up` the stack of another host's homeserver's workers on this host."""
    sn = guest.hs.server_name
    return _stack_up(lay.guest(sn), guest.project, sn, "workers",
                     f"workers ({', '.join(w.name for w in guest.workers)})", why, only_if)


def guest_restart(lay, guest, why: str, names: list[str]) -> Action:
    """Restart the workers of `guest` named (those that ran before this run)."""
    sn = guest.hs.server_name

    def how(run: Run) -> None:
        run.log(f"{sn}: restarting its workers here ({', '.join(names)})")
        _restart(run, lay.guest(sn), guest.project, names, f"{sn}: workers restart")
        run.restarted.append(f"{sn} workers (restart)")
        if guest.project not in run.touched:
            run.touched.append(guest.project)
    return Action(f"restart the workers of {sn} here", why, how, f"{sn} workers (restart)")


def guest_remove(lay, sn: str) -> Action:
    """Workers that left this host: their containers, then their directory (the
    copies of the homeserver's keys and secrets go with it; its own host keeps them)."""
    def how(run: Run) -> None:
        run.log(f"{sn}: removing its workers from this host")
        d = shlex.quote(lay.guest(sn))
        run.remote.run(f"cd {d} && {run.compose} down --remove-orphans && cd / && rm -rf -- {d}",
                       what=f"{sn}: workers down")
        run.restarted.append(f"{sn} workers (removed)")
    return Action(f"stop and remove the workers of {sn} here", "they no longer run on this host", how,
                  f"{sn} workers (removed)")


def turn_restart(lay, why: str, only_if=None) -> Action:
    """coturn reads its config, secret and certificate when it starts."""
    def how(run: Run) -> None:
        run.log("restarting coturn")
        _restart(run, lay.proxy, PROXY_PROJECT, [turn.SERVICE], "coturn restart")
        run.restarted.append("coturn (restart)")
    return Action("restart coturn", why, how, "coturn (restart)", only_if)


def wait_healthy() -> Action:
    return Action("wait until what was started is healthy", "",
                  lambda run: docker.wait_healthy(run.remote, run.touched, run.log),
                  only_if=lambda run: bool(run.touched))


def install_cert(lay, sn: str) -> Action:
    def how(run: Run) -> None:
        run.log(f"{sn}: serving certbot's certificate again")
        run.remote.run(proxy.install_cert_script(lay, sn), what=f"{sn}: install certificate")
        run.certificates += 1
    return Action(f"install certbot's certificate of {sn}", "nginx serves another one", how)


def certbot_leftovers(lay) -> Action:
    def how(run: Run) -> None:
        run.log("removing the certbot container a certificate run that died left")
        run.remote.run(f"{proxy.certificates_program(lay)} --leftovers", what="certbot leftovers", timeout=1200)
    return Action("remove certbot containers left by a certificate run that died",
                  "`run --rm` could not remove them", how)


def issue_cert(lay, sn: str, names: list[str], acme) -> Action:
    def how(run: Run) -> None:
        run.log(f"{sn}: asking the ACME CA ({acme.directory}) for a certificate")
        run.remote.run(proxy.issue_script(lay, sn, names, acme), what=f"{sn}: certificate",
                       timeout=900)
        run.certificates += 1
    return Action(f"ask the ACME CA for a certificate of {sn} ({', '.join(names)})",
                  "none yet, or its names changed", how)


def reload_for_certificates() -> Action:
    def how(run: Run) -> None:
        run.remote.run(proxy.reload_script([]), what="nginx reload")
        run.restarted.append("nginx (reload: new certificates)")
    return Action("reload nginx", "new certificates", how, only_if=lambda run: run.certificates > 0)


def element_install(lay, site: str, why: str) -> Action:
    def how(run: Run) -> None:
        run.log(f"{site}: installing Element Web")
        run.remote.run(element.update_script(lay, "--site", site), what=f"{site}: Element install",
                       timeout=900, on_stdout=run.log)
    return Action(f"install Element Web on {site}", why, how)


def timers(units: list[str]) -> Action:
    quoted = " ".join(shlex.quote(u) for u in units)

    def how(run: Run) -> None:
        run.log(f"systemd timers: {', '.join(units) or 'reloaded'}")
        run.remote.run("systemctl daemon-reload" + (f" && systemctl enable --now {quoted}" if units else ""),
                       what="enable timers")
    return Action(f"enable and start {', '.join(units)}" if units else "reload systemd's units",
                  "a timer changed, was disabled or is not running" if units else "a unit was removed", how)


def finish(lay, clear_journal: bool) -> Action:
    """Raise what was deferred (the run failed), else clear the pending journal:
    every service action it listed is done."""
    def how(run: Run) -> None:
        if run.deferred:
            raise RemoteError("\n".join(run.deferred))
        if clear_journal:
            run.remote.run(f"rm -f {shlex.quote(lay.pending)}", what="clear the pending actions")
    return Action("clear the pending actions", "", how, only_if=lambda run: bool(run.deferred) or clear_journal)


# -- the order ------------------------------------------------------------------------


def actions(plan) -> list[Action]:
    """Every step `plan` (a fabfile/plan.py Plan) needs, in the order they must run: images before anything
    stops, files, nginx's reload, the proxy stack (it owns the networks), generate,
    the homeservers, health, certificates, Element, timers."""
    state, lay = plan.state, plan.state.layout
    by_name = {h.server_name: h for h in state.homeservers}
    reasons = plan.triggers
    why = lambda trigger, default="": _because(reasons.get(trigger, [])) or default  # noqa: E731
    pulled = {t: [ref for ref in plan.pulls if t in state.image_triggers(ref)]
              for t in ["proxy:stack"] + [f"synapse:{sn}:stack" for sn in by_name]
              + [f"workers:{sn}:stack" for sn in state.guests] + [f"database:{sn}:stack" for sn in state.databases]}

    def if_pulled(trigger: str):
        refs = pulled.get(trigger)
        if not refs:
            return None
        return lambda run: bool(run.new_images & set(refs))

    out: list[Action] = []
    if plan.engine_start:
        out.append(start_engine())
    if plan.images:
        out.append(push(plan.images))
    if plan.pulls:
        out.append(pull(plan.pulls))
    conf_d = f"{lay.nginx_conf_d}/"
    reload_confs = ([f.path for f in plan.files if f.trigger == "proxy:reload"]
                    + [p for p in plan.remove if p.startswith(conf_d)]) if plan.nginx_reload else []
    # every action a change implies is journaled before the files are written: a run
    # killed after the write owes it (an Element release, a certificate for new names,
    # a reloaded timer, ...), and the next run's plan finds it in the journal
    owed = sorted(plan.triggers)
    if (plan.dirs or plan.files or plan.remove or plan.secrets or plan.chown_data or plan.placeholder_certs or owed
            or plan.turn_secret or plan.database_secrets):
        out.append(write(plan, owed, reload_confs))
    # the firewall before any stack starts: a port is never published unfiltered
    if plan.firewall:
        out.append(firewall(plan.firewall, why("firewall", "off in the inventory")))
    # the running nginx tests and loads new files BEFORE an `up` may recreate it: a
    # refused config is put back while the old one serves, and a container `up`
    # just made is never asked to reload while it starts
    if plan.nginx_reload:
        out.append(nginx_reload(reload_confs, why("proxy:reload")))
    if plan.proxy_up:
        out.append(proxy_up(lay, why("proxy:stack", "nginx is not running")))
    elif if_pulled("proxy:stack"):
        out.append(proxy_up(lay, "when the pull brings a new nginx image", if_pulled("proxy:stack")))
    # the databases this host runs for other hosts' homeservers (those hosts converge after this one)
    for sn, db in state.databases.items():
        if sn in plan.database_up:
            out.append(database_up(lay, db, why(f"database:{sn}:stack", "it is not running")))
        elif if_pulled(f"database:{sn}:stack"):
            out.append(database_up(lay, db, "when the pull brings a new image", if_pulled(f"database:{sn}:stack")))
    out += [generate(lay, by_name[sn]) for sn in plan.generate]
    for sn, names in plan.starting_workers.items():
        hs = by_name[sn] if sn in by_name else state.guests[sn].hs
        out.append(stop_elsewhere(hs, names, state.host.name))
    for sn, hs in by_name.items():
        if sn in plan.synapse_up:
            default = "its data is not owned by 991:991" if sn in plan.chown_data else "it is not running"
            out.append(synapse_up(lay, hs, why(f"synapse:{sn}:stack", default)))
        elif if_pulled(f"synapse:{sn}:stack"):
            out.append(synapse_up(lay, hs, "when the pull brings a new image", if_pulled(f"synapse:{sn}:stack")))
    out += [synapse_restart(lay, by_name[sn], why(f"synapse:{sn}:restart"),
                            plan.restart_processes.get(sn) or state.synapse_processes(by_name[sn]))
            for sn in plan.synapse_restart]
    out += [guest_remove(lay, sn) for sn in plan.guest_remove]
    for sn, guest in state.guests.items():
        if sn in plan.guest_up:
            out.append(guest_up(lay, guest, why(f"workers:{sn}:stack", "they are not running")))
        elif if_pulled(f"workers:{sn}:stack"):
            out.append(guest_up(lay, guest, "when the pull brings a new image", if_pulled(f"workers:{sn}:stack")))
    out += [guest_restart(lay, state.guests[sn], why(f"workers:{sn}:restart"), plan.restart_processes[f"workers:{sn}"])
            for sn in plan.guest_restart]
    if plan.turn_restart:
        out.append(turn_restart(lay, why("turn:restart")))
    out.append(wait_healthy())
    if plan.certbot_leftovers:
        out.append(certbot_leftovers(lay))
    out += [install_cert(lay, sn) for sn in plan.install_cert]
    out += [issue_cert(lay, sn, list(state.certificates[sn]), state.acme) for sn in plan.issue]
    if plan.install_cert or plan.issue:
        out.append(reload_for_certificates())
        if state.turn and any(sn == state.turn.cert_name for sn in plan.install_cert + plan.issue):
            out.append(turn_restart(lay, "when its certificate is new", lambda run: run.certificates > 0))
    out += [element_install(lay, site, why(f"element:{site}", "no release installed")) for site in plan.element_install]
    if plan.timers or any(p.startswith(SYSTEMD_DIR) for p in plan.remove):
        out.append(timers(plan.timers))
    out.append(finish(lay, bool(owed) or plan.pending_done))
    return out
