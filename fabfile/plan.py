"""plan = diff(desired, facts): pure, so it is unit-tested without SSH.

A Plan lists every change a host needs and every service action they imply. An
empty plan means the host is converged: apply writes nothing, restarts nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .facts import (Facts, cert_paths, database_secret, element_sites, generated_paths, optional_paths,
                    secret_paths, synapse_secrets)
from .facts import timers as facts_timers
from . import steps
from .render import PROXY_PROJECT, DesiredState, RemoteDir, RemoteFile, admin_ui_service, synapse_project


@dataclass
class Change:
    kind: str  # create | update | chmod | chown | mkdir | fixdir
    path: str
    detail: str = ""

    def line(self) -> str:
        sign = {"create": "+", "mkdir": "+", "update": "~", "remove": "-"}.get(self.kind, "*")
        return f"{sign} {self.path}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Plan:
    state: DesiredState
    dirs: list[RemoteDir] = field(default_factory=list)
    files: list[RemoteFile] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)  # managed files no longer rendered
    changes: list[Change] = field(default_factory=list)
    ok: int = 0
    images: list[str] = field(default_factory=list)  # to push (image source "push")
    pulls: list[str] = field(default_factory=list)  # to pull on the host (image source "pull")
    timers: list[str] = field(default_factory=list)  # systemd timers to (re)enable and start
    secrets: list[str] = field(default_factory=list)  # server_names lacking secrets
    generate: list[str] = field(default_factory=list)  # server_names lacking generate's output
    chown_data: list[str] = field(default_factory=list)  # server_names with data not 991:991
    placeholder_certs: list[str] = field(default_factory=list)  # cert names lacking any cert
    issue: list[str] = field(default_factory=list)  # server_names whose certificate ACME must (re)issue
    install_cert: list[str] = field(default_factory=list)  # served certificate differs from certbot's
    element_install: list[str] = field(default_factory=list)  # Element sites lacking their release
    proxy_up: bool = False
    nginx_reload: bool = False
    synapse_up: list[str] = field(default_factory=list)
    synapse_restart: list[str] = field(default_factory=list)
    # server_name (or workers:<sn>, its workers here) -> the Synapse processes a
    # restart restarts: those running before this run (a worker `up` starts now
    # already reads the new settings)
    restart_processes: dict[str, list[str]] = field(default_factory=dict)
    guest_up: list[str] = field(default_factory=list)  # server_names: `up` their workers' stack here
    guest_restart: list[str] = field(default_factory=list)  # server_names: restart their workers here
    guest_remove: list[str] = field(default_factory=list)  # server_names: their workers left this host
    database_secrets: list[str] = field(default_factory=list)  # server_names: make their database's password here
    database_up: list[str] = field(default_factory=list)  # server_names: `up` their database's stack here
    # server_name -> its workers this run starts here that may run on another host of
    # the private network (a move): stopped there first
    starting_workers: dict[str, list[str]] = field(default_factory=dict)
    certbot_leftovers: bool = False  # certbot containers of certificate runs that died (a cut SSH session)
    engine_start: bool = False
    turn_secret: bool = False  # the host's TURN shared secret is to be made
    turn_restart: bool = False  # coturn's config or secret changed while it runs
    firewall: str = ""  # "apply" (load the rules, hook the chains) | "off" (remove them)
    triggers: dict[str, list[str]] = field(default_factory=dict)  # trigger -> the changes behind it
    pending_done: bool = False  # an interrupted run's journal to clear
    actions: list = field(default_factory=list)  # the steps, in order (fabfile/steps.py)

    @property
    def empty(self) -> bool:
        return not (
            self.changes or self.images or self.pulls or self.timers or self.issue or self.install_cert
            or self.pending_done
            or self.element_install or self.proxy_up or self.nginx_reload
            or self.synapse_up or self.synapse_restart or self.engine_start or self.firewall
            or self.guest_up or self.guest_restart or self.guest_remove or self.certbot_leftovers
            or self.database_up
            or self.turn_secret or self.turn_restart
        )

    @property
    def restarts(self) -> list[str]:
        """What the steps would restart (those decided while applying aside)."""
        return [a.restart for a in self.actions if a.restart and a.only_if is None]


def _pulls(state: DesiredState, facts: Facts, refresh_tags: bool) -> list[str]:
    """References a `pull` host must pull before anything stops: those it lacks
    (a digest pin is present only as that digest), a tag a service is about to
    switch to (a copy pulled long ago may be stale), and with `refresh_tags` every
    tag (a rebuilt tag upstream; digest pins never need it)."""
    services = {"nginx": [(PROXY_PROJECT, "nginx")],
                "admin_ui": [(PROXY_PROJECT, admin_ui_service(hs)) for hs in state.homeservers if hs.admin_ui.enabled],
                "coturn": [(PROXY_PROJECT, "coturn")]}
    wanted: dict[str, list[tuple[str, str]]] = {}
    for role, ref in state.image_refs.items():
        if role in ("postgres", "synapse", "redis"):
            continue
        wanted.setdefault(ref, []).extend(services.get(role, []))
    for hs in state.homeservers:  # each homeserver's own (an older major, a Synapse kept until upgraded)
        wanted.setdefault(state.postgres_image(hs), []).append((synapse_project(hs), "postgres"))
        wanted.setdefault(state.synapse_image(hs), []).extend(
            (synapse_project(hs), svc) for svc in state.synapse_processes(hs))
        if state.workers.get(hs.server_name):
            wanted.setdefault(state.image_refs["redis"], []).append((synapse_project(hs), "redis"))
    for g in state.guests.values():  # the workers of other hosts' homeservers: the image their main runs
        wanted.setdefault(g.image, []).extend((g.project, w.name) for w in g.workers)
    for db in state.databases.values():  # the databases of other hosts' homeservers
        wanted.setdefault(db.image, []).append((db.project, "postgres"))
    pulls = []
    for ref, users in sorted(wanted.items()):
        is_tag = "@" not in ref
        switching = any((img := facts.container_image(p, s)) is not None and img != ref for p, s in users)
        if facts.image_id(ref) is None or (is_tag and (refresh_tags or switching)):
            pulls.append(ref)
    return pulls


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def applicable(state: DesiredState, facts: Facts) -> list[RemoteFile]:
    """The rendered files this host takes: periodic jobs as systemd timers where
    systemd is PID 1, as cron.d files elsewhere."""
    kind = "systemd" if facts.systemd else "no-systemd"
    return [f for f in state.files if f.when in ("", kind)]


def make(state: DesiredState, facts: Facts, local_images: dict[str, str], push: bool,
         refresh_tags: bool = False) -> Plan:
    """Compare the desired state with the facts. `local_images` maps image
    references to IDs on the operator's machine (used when `push`); without push
    the host pulls what it lacks (`refresh_tags`: every tag again, see _pulls)."""
    plan = Plan(state)
    triggers: dict[str, list[str]] = {t: ["an interrupted run left it owed"] for t in facts.pending}

    def trigger(name: str, reason: str) -> None:
        triggers.setdefault(name, []).append(reason)

    files = applicable(state, facts)

    for d in state.dirs:
        st = facts.stats.get(d.path)
        if st is None:
            plan.dirs.append(d)
            plan.changes.append(Change("mkdir", d.path))
        elif st.kind != "directory":
            plan.changes.append(Change("fixdir", d.path, f"is a {st.kind}, expected a directory"))
            plan.dirs.append(d)
        elif st.mode != d.mode or st.owner != d.owner:
            plan.dirs.append(d)
            plan.changes.append(Change("chmod", d.path, f"{st.mode:o} {st.owner} -> {d.mode:o} {d.owner}"))
        else:
            plan.ok += 1

    for f in files:
        st = facts.stats.get(f.path)
        if st is None:
            kind = "create"
        elif facts.hashes.get(f.path) != sha256(f.content):
            kind = "update"
        elif st.mode != f.mode or st.owner != f.owner:
            kind = "chmod"
        else:
            plan.ok += 1
            continue
        plan.files.append(f)
        plan.changes.append(Change(kind, f.path))
        if f.trigger:
            trigger(f.trigger, f"{f.path.rsplit('/', 1)[1]} {'changed' if kind == 'update' else kind + 'd'}")

    desired = {f.path for f in files}
    lay = state.layout
    for path in sorted(facts.managed - desired):
        plan.remove.append(path)
        plan.changes.append(Change("remove", path, "no longer rendered"))
        gone = f"{path.rsplit('/', 1)[1]} removed"
        if path.startswith(lay.nginx_conf_d + "/"):
            trigger("proxy:reload", gone)
        for hs in state.homeservers:
            if path.startswith(lay.conf_d(hs.server_name) + "/"):
                trigger(f"synapse:{hs.server_name}:restart", gone)
            if path.startswith(lay.workers(hs.server_name) + "/"):
                trigger(f"synapse:{hs.server_name}:stack", gone)
        for sn in state.guests:
            if path.startswith(f"{lay.guest(sn)}/conf.d/"):
                trigger(f"workers:{sn}:restart", gone)
            if path.startswith(f"{lay.guest(sn)}/workers/"):
                trigger(f"workers:{sn}:stack", gone)

    for path in optional_paths(state):  # a feature turned off, or the other init's jobs
        if path in facts.stats and path not in desired:
            plan.remove.append(path)
            plan.changes.append(Change("remove", path, "not needed on this host"))
    for site, version in element_sites(state).items():
        target = facts.element.get(site, "")
        if not target or f"element:{site.rsplit('/', 1)[1]}" in triggers:
            plan.element_install.append(site.rsplit("/", 1)[1])
            plan.changes.append(Change("update", f"{site}/current",
                                       f"Element {version}" + (f" (serving {target})" if target else "")))

    existing_secrets = set(secret_paths(state)) & set(facts.stats)
    generated = set(generated_paths(state)) & set(facts.stats)
    certs = set(cert_paths(state)) & set(facts.stats)
    for hs in state.homeservers:
        sn = hs.server_name
        missing = {lay.secret(sn, name) for name in synapse_secrets(state, hs)} - existing_secrets
        if missing:
            plan.secrets.append(sn)
            new_db = bool({lay.secret(sn, "postgres_password"), lay.secret(sn, "pgpass")} & missing)
            what = "new database password" if new_db else "new worker secrets (replication, Redis)"
            plan.changes.append(Change("create", lay.secret(sn, "*"), what))
            trigger(f"synapse:{sn}:stack", f"a {what}" if new_db else what)
        if set(lay.generated(sn)) - generated:
            plan.generate.append(sn)
            plan.changes.append(Change("create", lay.generated(sn)[0], "Synapse generate"))
            trigger(f"synapse:{sn}:stack", "a new homeserver.yaml")
        if sn in facts.wrong_owner:
            plan.chown_data.append(sn)
            plan.changes.append(Change("chown", lay.data(sn), f"{facts.wrong_owner[sn]} not 991:991"))
    for sn in state.certificates:  # the homeservers' own, and those of federation served here
        if {f"{lay.certs(sn)}/fullchain.pem", f"{lay.certs(sn)}/privkey.pem"} - certs:
            plan.placeholder_certs.append(sn)
            plan.changes.append(Change("create", f"{lay.certs(sn)}/", "temporary self-signed certificate"))
            trigger("proxy:reload", f"a temporary certificate for {sn}")

    for sn in state.databases:
        if database_secret(state, sn) not in existing_secrets:
            plan.database_secrets.append(sn)
            plan.changes.append(Change("create", database_secret(state, sn), "new database password"))
            trigger(f"database:{sn}:stack", "a new database password")

    if state.turn and lay.turn_secret not in existing_secrets:
        plan.turn_secret = True
        plan.changes.append(Change("create", lay.turn_secret, "new TURN shared secret"))
        trigger("turn:restart", "a new TURN shared secret")
        for hs in state.homeservers:
            trigger(f"synapse:{hs.server_name}:restart", "a new TURN shared secret")

    # a certbot container while the lock is held is a renewal at work, not a leftover
    if state.acme and state.certificates and not facts.certificates_busy and any(
            c.project == PROXY_PROJECT and c.service == "certbot" for c in facts.containers):
        plan.certbot_leftovers = True
        plan.changes.append(Change("remove", "certbot container", "left by a certificate run that died"))
    if state.acme:
        for sn in state.certificates:
            pending = lay.acme_live(sn) not in facts.stats
            if pending or sn in plan.placeholder_certs or f"acme:{sn}" in triggers:
                plan.issue.append(sn)
                if not any(c.path == f"{lay.certs(sn)}/names" for c in plan.changes):
                    plan.changes.append(Change("update", f"{lay.certs(sn)}/", "certificate from the ACME CA"))
            elif facts.hashes.get(f"{lay.certs(sn)}/fullchain.pem") != facts.hashes.get(lay.acme_live(sn)):
                # nginx serves something else than certbot's certificate: put it back
                plan.install_cert.append(sn)
                plan.changes.append(Change("update", f"{lay.certs(sn)}/fullchain.pem", "not the ACME certificate"))

    if push:
        for ref in sorted(state.images):
            local = local_images.get(ref)
            if local and facts.images.get(ref) != local:
                plan.images.append(ref)
                plan.changes.append(Change("update" if facts.images.get(ref) else "create", f"image {ref}", "ship over SSH"))
                # a new image ID must reach the containers that use it
                if facts.images.get(ref):
                    for t in state.image_triggers(ref):
                        trigger(t, f"a new image {ref}")

    else:
        plan.pulls = _pulls(state, facts, refresh_tags)
        for ref in plan.pulls:
            plan.changes.append(Change("update" if facts.image_id(ref) else "create", f"image {ref}", "pull"))

    if facts.systemd:
        for unit in facts_timers(state):
            enabled, active = facts.timers.get(unit, ("", ""))
            if f"systemd:{unit}" in triggers or enabled != "enabled" or active != "active":
                plan.timers.append(unit)
                if f"systemd:{unit}" not in triggers:
                    plan.changes.append(Change("update", unit, f"timer {enabled or 'absent'}/{active or 'inactive'}"))

    if state.host.firewall.enabled:
        if "firewall" in triggers or facts.firewall != "up":
            plan.firewall = "apply"
            if "firewall" not in triggers:
                plan.changes.append(Change("update", "firewall", f"its chains are {facts.firewall or 'absent'}"))
                trigger("firewall", "its chains are not hooked in")
    elif facts.firewall:
        plan.firewall = "off"
        plan.changes.append(Change("remove", "firewall", "off in the inventory"))

    plan.triggers = triggers
    plan.pending_done = bool(facts.pending)
    if not facts.running(PROXY_PROJECT, "nginx"):
        trigger("proxy:stack", "nginx is not running")
    plan.turn_restart = bool(state.turn) and "turn:restart" in triggers and facts.running(PROXY_PROJECT, "coturn")
    plan.engine_start = facts.docker and not facts.engine
    proxy_running = facts.running(PROXY_PROJECT, "nginx")
    plan.proxy_up = "proxy:stack" in triggers or not proxy_running
    # `up` recreates nginx only when its own service changed: reload it anyway.
    plan.nginx_reload = "proxy:reload" in triggers and proxy_running
    for hs in state.homeservers:
        sn = hs.server_name
        project = synapse_project(hs)
        running = all(facts.running(project, svc) for svc in state.synapse_services(hs))
        if not running:
            trigger(f"synapse:{sn}:stack", "it is not running")
        if sn in plan.chown_data:
            trigger(f"synapse:{sn}:stack", "its data was not owned by 991:991")
        if f"synapse:{sn}:stack" in triggers:
            plan.synapse_up.append(sn)
            starting = [w.name for w in state.workers.get(sn, [])
                        if w.host == hs.host and not facts.running(project, w.name)]
            # only a host on a private network can start a worker that ran elsewhere before
            if starting and state.host.private_address:
                plan.starting_workers[sn] = starting
        # a restart is owed by the processes that run with the old settings: when
        # only a new worker is missing, the others still do
        if f"synapse:{sn}:restart" in triggers and facts.running(project, "synapse"):
            plan.synapse_restart.append(sn)
            plan.restart_processes[sn] = [p for p in state.synapse_processes(hs) if facts.running(project, p)]
    for sn, g in state.guests.items():
        project, ws = g.project, g.workers
        if not all(facts.running(project, w.name) for w in ws):
            trigger(f"workers:{sn}:stack", "its workers here are not all running")
        if f"workers:{sn}:stack" in triggers:
            plan.guest_up.append(sn)
            starting = [w.name for w in ws if not facts.running(project, w.name)]
            if starting:
                plan.starting_workers[sn] = starting
        running = [w.name for w in ws if facts.running(project, w.name)]
        if f"workers:{sn}:restart" in triggers and running:
            plan.guest_restart.append(sn)
            plan.restart_processes[f"workers:{sn}"] = running
    for sn, db in state.databases.items():
        if not facts.running(db.project, "postgres"):
            trigger(f"database:{sn}:stack", "it is not running")
        if f"database:{sn}:stack" in triggers:
            plan.database_up.append(sn)
    for sn in sorted(facts.guests - set(state.guests)):
        plan.guest_remove.append(sn)
        plan.changes.append(Change("remove", f"{lay.guest(sn)}/", "its workers no longer run on this host"))
    plan.actions = steps.actions(plan)
    return plan

