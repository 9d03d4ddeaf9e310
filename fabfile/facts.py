"""What is on a host now, gathered in ONE remote command.

The script prints one tab-separated record a line:

    S  path type mode uid:gid      stat of every managed path that exists, and of what the
                                   directories wholly ours hold
    H  path sha256                 content hash of every managed file that exists
    B  docker                      the docker client is installed
    E  version                     the engine answers
    K  v2|v1                       compose flavour (plugin or docker-compose binary)
    C  project service state status id image workdir
                                   every compose container (image: the reference it was created
                                   from; workdir: the directory of its compose file)
    D  repo@digest id              every local image's registry digest
    I  repo:tag id                 every local image
    O  server_name path            a path under data/ not owned by 991:991
    1  comm                        what runs as PID 1 (systemd or not)
    M  path                        a file in a managed conf.d carrying our marker (a file in a
                                   dir wholly ours is one too: parse finds those in the S records)
    P  trigger                     a service action an interrupted run left undone
    L  site_dir target             the Element release a site serves (its `current` link)
    T  unit enabled active         a systemd timer of ours (systemd hosts only)
    V  server_name major           the PostgreSQL major version of a homeserver's database
    Y  server_name major           ... of a database this host runs for another host's homeserver
    Z  server_name                 a database stack this host holds (synapse-db/<sn>)
    G  server_name                 a homeserver whose stack is on this host (synapse/<sn>/docker-compose.yml)
    X  server_name record          a homeserver this host handed over (inv migrate-host)
    U  server_name record          a homeserver `inv uninstall` removed from this host
    R  server_name record          a migration of this homeserver in progress from this host
    F  up|down sshd_ports          the firewall's chains hooked in or not; sshd's ports
    W  base_dir names              the base_dir this host was deployed with, and the homeserver
                                   directories under it
    Q  server_name                 a stack of another host's homeserver's workers here
                                   (synapse-workers/<sn>/docker-compose.yml)
    A  held                        a certificate run (a renewal from cron or the timer) holds
                                   the certificates lock now: its certbot container is live
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from .errors import RemoteError
from .layout import BASE_RECORD, CERTIFICATES_LOCK, CRON_DIR, FIREWALL_DIR, LOCK_DIR, SYNAPSE_UID, SYSTEMD_DIR
from .render import DesiredState
from .shell import program
from .workers import SECRETS as WORKER_SECRETS


@dataclass
class Stat:
    kind: str  # "regular file", "directory", ...
    mode: int
    owner: str


@dataclass
class Container:
    project: str
    service: str
    state: str  # running, exited, ...
    status: str  # "Up 3 minutes (healthy)"
    id: str
    image: str = ""  # the reference the container was created from
    workdir: str = ""  # the directory of its compose file


@dataclass
class Facts:
    stats: dict[str, Stat] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    docker: bool = False
    engine: str = ""
    compose: str = ""  # "v2", "v1" or ""
    containers: list[Container] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)
    wrong_owner: dict[str, str] = field(default_factory=dict)
    pid1: str = ""
    managed: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)
    certificates_busy: bool = False  # the certificates lock is held (A)
    element: dict[str, str] = field(default_factory=dict)  # site dir -> current's target
    digests: dict[str, str] = field(default_factory=dict)  # repo@sha256:... -> image ID
    timers: dict[str, tuple[str, str]] = field(default_factory=dict)  # unit -> (enabled, active)
    pg_major: dict[str, int] = field(default_factory=dict)  # server_name -> its database's major
    # server_name -> the major of the database this host runs for it (postgres.host)
    database_major: dict[str, int] = field(default_factory=dict)
    databases: set[str] = field(default_factory=set)  # homeservers whose database has a stack here
    hosted: set[str] = field(default_factory=set)  # homeservers whose stack is here
    uninstalled: dict[str, dict[str, str]] = field(default_factory=dict)  # removed by inv uninstall
    handed_over: dict[str, dict[str, str]] = field(default_factory=dict)  # sn -> {to, address, at}
    migrating: dict[str, dict[str, str]] = field(default_factory=dict)  # sn -> {to, phase}
    base_record: tuple[str, list[str]] | None = None  # (recorded base_dir, homeservers there)
    firewall: str = ""  # "up": our chains hooked in; "down": not (or partly); "": not looked at / none
    sshd_ports: list[int] = field(default_factory=list)  # where sshd listens (looked at with a firewall)
    guests: set[str] = field(default_factory=set)  # homeservers whose workers have a stack here

    @property
    def systemd(self) -> bool:
        return self.pid1 == "systemd"

    def image_id(self, ref: str) -> str | None:
        """The local image ID a reference resolves to (a digest pin only by its
        digest; a bare name means :latest), or None when it is not present."""
        name, digest = ref.split("@", 1) if "@" in ref else (ref, "")
        if ":" in name.rsplit("/", 1)[-1]:
            repo, tag = name.rsplit(":", 1)
        else:
            repo, tag = name, "latest"
        if digest:
            return self.digests.get(f"{repo}@{digest}")
        return self.images.get(f"{repo}:{tag}")

    def container_image(self, project: str, service: str) -> str | None:
        """The reference a compose service's container was created from."""
        return next((c.image for c in self.containers if c.project == project and c.service == service), None)

    def running(self, project: str, service: str) -> bool:
        return any(
            c.project == project and c.service == service and c.state == "running"
            for c in self.containers
        )

    def exists(self, path: str) -> bool:
        return path in self.stats


# What facts stat beyond the rendered files (all paths from the host's Layout).

def secret_paths(state: DesiredState) -> list[str]:
    lay = state.layout
    return ([lay.secret(hs.server_name, name) for hs in state.homeservers for name in synapse_secrets(state, hs)]
            + [database_secret(state, sn) for sn in state.databases]
            + ([lay.turn_secret] if state.turn else []))


def database_secret(state: DesiredState, server_name: str) -> str:
    """The password of a database this host runs for another host's homeserver."""
    return state.layout.database_secret(server_name)


def synapse_secrets(state: DesiredState, hs) -> tuple[str, ...]:
    """The secrets a homeserver's processes read: its database's, and with workers
    the replication secret and Redis's password (fabfile/scripts/synapse-secrets.sh)."""
    database = ("pgpass",) if hs.postgres.elsewhere else ("postgres_password", "pgpass")
    return database + (WORKER_SECRETS if state.workers.get(hs.server_name) else ())


def generated_paths(state: DesiredState) -> list[str]:
    """Files Synapse's `generate` writes (never overwritten once there)."""
    return [p for hs in state.homeservers for p in state.layout.generated(hs.server_name)]


def cert_paths(state: DesiredState) -> list[str]:
    lay = state.layout
    return [f"{lay.certs(sn)}/{name}" for sn in state.certificates
            for name in ("fullchain.pem", "privkey.pem")] + [lay.acme_live(sn) for sn in state.certificates]


MARKER = "Managed by synapse-fabric"
# starts a section of the facts' output whose lines are records of the kind after
# it (no record starts with it: records start with their kind, paths with "/")
SECTION = "#"


def element_sites(state: DesiredState) -> dict[str, str]:
    """Element site directory -> the inventory's version for it."""
    return {state.layout.element_site(hs.element.hostname): hs.element.version
            for hs in state.homeservers if hs.element.enabled}


PERIODIC_JOBS = ("synapse-fabric-certificates", "synapse-fabric-element", "synapse-fabric-backup")


def optional_paths(state: DesiredState) -> list[str]:
    """Files that are ours only while the inventory (or the host's init) asks for
    them, removed after: an Element site's keys, and every periodic job's timer,
    service, cron file and script (and element-update's settings), so a feature
    turned off stops running."""
    lay = state.layout
    return ([f"{d}/{name}" for d in element_sites(state) for name in ("signing-key.gpg", "feed-ca.pem")]
            + [p for job in PERIODIC_JOBS for p in (f"{SYSTEMD_DIR}/{job}.timer", f"{SYSTEMD_DIR}/{job}.service",
                                                     f"{CRON_DIR}/{job}")]
            + [f"{SYSTEMD_DIR}/synapse-fabric-firewall.service", f"{CRON_DIR}/synapse-fabric-firewall"]
            + [lay.bin("renew-certificates"), lay.bin("element-update"), lay.bin("backup"), lay.element_settings])


def managed_dirs(state: DesiredState) -> list[str]:
    """Directories whose files carrying MARKER are ours: one no longer rendered
    is removed (e.g. the vhost of a homeserver that left this host)."""
    lay = state.layout
    return ([lay.nginx_conf_d] + [lay.conf_d(hs.server_name) for hs in state.homeservers]
            + [lay.workers(hs.server_name) for hs in state.homeservers]
            + [f"{lay.guest(sn)}/{d}" for sn in state.guests for d in ("conf.d", "workers")])


def owned_dirs(state: DesiredState) -> list[str]:
    """Directories whose every file is ours (files that cannot carry MARKER, like
    JSON): one no longer rendered is removed (an admin UI turned off)."""
    return [state.layout.admin_ui] + [f"{state.layout.well_known(hs.server_name)}/matrix" for hs in state.homeservers]


def timers(state: DesiredState) -> list[str]:
    """The systemd units this host must have enabled and active (on a systemd host):
    the periodic jobs' timers and the firewall's boot unit."""
    return list(dict.fromkeys(f.trigger.split(":", 1)[1] for f in state.files
                              if f.when == "systemd" and f.trigger.startswith("systemd:")))


def firewall_script(state: DesiredState) -> list[str]:
    """The F record (fabfile/scripts/firewall-facts.sh)."""
    return [program("firewall-facts.sh", dir=FIREWALL_DIR, wanted=int(state.host.firewall.enabled))]


# The facts' find names the paths it only looks at (S records) from here ("/./opt/...",
# the same files), so it tells them from the data directories it walks.
STAT_ROOT = "/."
# find's %y -> the names plan.py and its messages use
KINDS = {"f": "regular file", "d": "directory", "l": "symbolic link", "p": "fifo", "s": "socket",
         "b": "block special file", "c": "character special file"}
FACTS_SCRATCH = f"{LOCK_DIR}/facts"  # .0, .1: the small parts' answers; .headers: the engine's
END = ".\tend"  # the script's last line: facts without it are not the host's whole answer


def script(state: DesiredState) -> str:
    """The facts script for this desired state, for a run that holds the host's lock.
    Its parts ask independent things (files, systemd, the firewall, Docker), so they
    run side by side: the host's answer takes the slowest part's time, not their sum
    (a no-op deploy waits for nothing else)."""
    files = [f.path for f in state.files]
    certs = [p for p in cert_paths(state) if p.endswith("fullchain.pem")]
    extra = secret_paths(state) + generated_paths(state) + cert_paths(state) + optional_paths(state)
    stat_paths = [d.path for d in state.dirs] + files + extra
    stat_paths += [d for d in owned_dirs(state) if d not in stat_paths]  # parse asks what they are
    q = lambda paths: " ".join(shlex.quote(p) for p in paths)  # noqa: E731
    uid, gid = SYNAPSE_UID.split(":")
    # Few processes: a no-op deploy of many hosts pays each host's fork+exec of every
    # helper. Shell builtins (read, printf, parameter expansion) do the small parts;
    # the outputs of grep and sha256sum are sections (a SECTION line names their kind).
    data_dirs = {state.layout.data(hs.server_name): hs.server_name for hs in state.homeservers}
    on_disk = [
        f"printf '{SECTION}M\\n'",
        f"grep -l -s -m 1 {shlex.quote(MARKER)} -- "
        + " ".join(f"{shlex.quote(d)}/*" for d in managed_dirs(state)) + " 2>/dev/null",
        f"printf '{SECTION}H\\n'",
        f"sha256sum -- {q(files + certs)} 2>/dev/null",
        f"printf '{SECTION}\\n'",
        f"[ ! -f {shlex.quote(state.layout.pending)} ] || sed 's/^/P\t/' {shlex.quote(state.layout.pending)} 2>/dev/null",
        *(f"printf 'L\t%s\t%s\n' {shlex.quote(d)} \"$(readlink {shlex.quote(d + '/current')})\""
          for d in element_sites(state)),
        "c=; { read -r c </proc/1/comm; } 2>/dev/null; printf '1\\t%s\\n' \"$c\"",
        *(f"v=; {{ read -r v <{shlex.quote(state.layout.pg_version(hs.server_name))}; }} 2>/dev/null; "
          f"printf 'V\\t%s\\t%s\\n' {shlex.quote(hs.server_name)} \"$v\""
          for hs in state.homeservers),
        *(f"v=; {{ read -r v <{shlex.quote(state.layout.database_data(sn) + '/PG_VERSION')}; }} 2>/dev/null; "
          f"printf 'Y\\t%s\\t%s\\n' {shlex.quote(sn)} \"$v\""
          for sn in state.databases),
        f"for f in {shlex.quote(state.layout.base)}/synapse/*/docker-compose.yml; do [ -f \"$f\" ] && "
        "{ d=${f%/*}; printf 'G\\t%s\\n' \"${d##*/}\"; }; done",
        f"for f in {shlex.quote(state.layout.base)}/synapse-workers/*/docker-compose.yml; do [ -f \"$f\" ] && "
        "{ d=${f%/*}; printf 'Q\\t%s\\n' \"${d##*/}\"; }; done",
        f"for f in {shlex.quote(state.layout.base)}/synapse-db/*/docker-compose.yml; do [ -f \"$f\" ] && "
        "{ d=${f%/*}; printf 'Z\\t%s\\n' \"${d##*/}\"; }; done",
        f"for f in {shlex.quote(state.layout.handed_over_dir)}/*; do [ -f \"$f\" ] && "
        "printf 'X\\t%s\\t%s\\n' \"${f##*/}\" \"$(tr '\\n\\t' '  ' < \"$f\")\"; done",
        f"for f in {shlex.quote(state.layout.uninstalled_dir)}/*; do [ -f \"$f\" ] && "
        "printf 'U\\t%s\\t%s\\n' \"${f##*/}\" \"$(tr '\\n\\t' '  ' < \"$f\")\"; done",
        *(f"[ -f {shlex.quote(state.layout.migration_state(hs.server_name))} ] && printf 'R\\t%s\\t%s\\n' "
          f"{shlex.quote(hs.server_name)} \"$(tr '\\n\\t' '  ' < {shlex.quote(state.layout.migration_state(hs.server_name))})\""
          for hs in state.homeservers),
        # the base_dir recorded on this host, and what its synapse/ holds (ls -A, by globs)
        f"b=; {{ read -r b <{BASE_RECORD}; }} 2>/dev/null; [ -n \"$b\" ] && {{ l=; "
        "for e in \"$b\"/synapse/* \"$b\"/synapse/.[!.]* \"$b\"/synapse/..?*; do "
        "if [ -e \"$e\" ] || [ -L \"$e\" ]; then l=\"$l ${e##*/}\"; fi; done; "
        "printf 'W\\t%s\\t%s\\n' \"$b\" \"$l\"; }",
        # ONE find: the S records of the paths above, each spelled from STAT_ROOT and
        # not descended into, with what the directories wholly ours hold (by globs;
        # parse makes their files M records); then, from the data directories, what
        # is not owned by 991:991 down to depth 2 (%H: whose data)
        f"find {q([STAT_ROOT + p for p in stat_paths])} "
        + " ".join(f"{shlex.quote(STAT_ROOT + d)}/{g}" for d in owned_dirs(state) for g in ("*", ".[!.]*", "..?*"))
        + f" {q(data_dirs)} -maxdepth 2 \\( -path {shlex.quote(STAT_ROOT + '/*')} -printf 'S\\t%p\\t%y\\t%m\\t%U:%G\\n' "
        f"-prune \\) -o \\( ! -uid {uid} -o ! -gid {gid} \\) -printf 'O\\t%H\\t%p\\n' 2>/dev/null",
    ]
    # one systemctl for every timer: its enabled and active states, a T record each
    systemd = ([f"p=; {{ read -r p </proc/1/comm; }} 2>/dev/null; [ \"$p\" = systemd ] && systemctl show -p Id -p UnitFileState -p ActiveState "
                f"{' '.join(timers(state))} 2>/dev/null | awk -F= 'NF == 0 {{ t() }} $1 == \"Id\" {{ id = $2 }} "
                "$1 == \"UnitFileState\" { en = $2 } $1 == \"ActiveState\" { ac = $2 } END { t() } "
                "function t() { if (id != \"\") printf \"T\\t%s\\t%s\\t%s\\n\", id, en, ac; id = en = ac = \"\" }'"]
               if timers(state) else [])
    # The parts run side by side. The files' part writes straight to the output (the
    # only part that does while the others run); Docker's answer (large on a busy
    # host) is read into the shell; the small parts (systemd, the firewall) write to
    # scratch files of fixed names in the run lock's root-only directory (no mktemp,
    # no rm, no cat on every host: the facts are asked only by a run that holds the
    # host's lock, so no other run writes there meanwhile), read back by builtins.
    small = [p for p in (systemd, firewall_script(state)) if p]
    out = [f"[ -d {LOCK_DIR} ] || exit 3"]
    for i, part in enumerate(small):
        out += ["(", *part, f") >{FACTS_SCRATCH}.{i} &"]
    out += ["(", *on_disk, ") &"]
    out += ["docker_facts() {", program("docker-facts.sh", headers=f"{FACTS_SCRATCH}.headers"), "}",
            "d=$(docker_facts)"]
    out += ["wait"]
    if state.acme and state.certificates:
        # A renewal at work holds the lock from before its certbot container exists until
        # after it is gone: asked once every container was listed, a container seen then
        # is no leftover while the lock is held (75: held; no lock file: no run yet)
        out += [f"if [ -e {CERTIFICATES_LOCK} ]; then flock -n -E 75 {CERTIFICATES_LOCK} true 2>/dev/null; "
                "[ $? -ne 75 ] || printf 'A\\theld\\n'; fi"]
    out += ["[ -z \"$d\" ] || printf '%s\\n' \"$d\"",
            *(f"while IFS= read -r l || [ -n \"$l\" ]; do printf '%s\\n' \"$l\"; done <{FACTS_SCRATCH}.{i}"
              for i in range(len(small))),
            "printf '.\\tend\\n'", "exit 0"]  # END
    return "\n".join(out) + "\n"


def parse(output: str, state: DesiredState | None = None) -> Facts:
    """The facts script's records. `state` (the one the script was made for) maps
    the O records' data directories to homeservers. An answer the script did not
    finish raises RemoteError: planning from it would redo (or undo) what is there."""
    if END not in output.splitlines():
        raise RemoteError(f"{state.host.name if state else 'the host'}: the facts script did not finish "
                          "(nothing was changed)")
    facts = Facts()
    homeserver_of = {state.layout.data(hs.server_name): hs.server_name for hs in state.homeservers} if state else {}
    section = ""
    for line in output.splitlines():
        if line.startswith(SECTION):
            section = line[len(SECTION):]
            continue
        if section == "H":  # sha256sum: "<hash>  <path>"
            line = "H\t" + line.replace("  ", "\t", 1)
        elif section:
            line = f"{section}\t{line}"
        kind, _, rest = line.partition("\t")
        parts = rest.split("\t")
        if kind == "S" and len(parts) == 4:
            path = parts[0][len(STAT_ROOT):] if parts[0].startswith(STAT_ROOT + "/") else parts[0]
            facts.stats[path] = Stat(KINDS.get(parts[1], parts[1]), int(parts[2], 8), parts[3])
        elif kind == "H" and len(parts) == 2:
            facts.hashes[parts[1]] = parts[0]
        elif kind == "B":
            facts.docker = True
        elif kind == "E":
            facts.engine = parts[0]
        elif kind == "K":
            facts.compose = parts[0]
        elif kind == "C" and len(parts) in (5, 6, 7):
            facts.containers.append(Container(*parts))
        elif kind == "I" and len(parts) == 2:
            facts.images[parts[0]] = parts[1]
        elif kind == "D" and len(parts) == 2 and not parts[0].endswith("@<none>"):
            facts.digests[parts[0]] = parts[1]
        elif kind == "T" and len(parts) == 3:
            facts.timers[parts[0]] = (parts[1], parts[2])
        elif kind == "G" and parts[0]:
            facts.hosted.add(parts[0])
        elif kind == "Q" and parts[0]:
            facts.guests.add(parts[0])
        elif kind == "Z" and parts[0]:
            facts.databases.add(parts[0])
        elif kind == "X" and len(parts) == 2:
            facts.handed_over[parts[0]] = _fields(parts[1])
        elif kind == "U" and len(parts) == 2:
            facts.uninstalled[parts[0]] = _fields(parts[1])
        elif kind == "W" and len(parts) == 2:
            facts.base_record = (parts[0], parts[1].split())
        elif kind == "R" and len(parts) == 2:
            facts.migrating[parts[0]] = _fields(parts[1])
        elif kind == "V" and len(parts) == 2 and parts[1].strip().isdigit():
            facts.pg_major[parts[0]] = int(parts[1])
        elif kind == "Y" and len(parts) == 2 and parts[1].strip().isdigit():
            facts.database_major[parts[0]] = int(parts[1])
        elif kind == "O" and len(parts) == 2:
            facts.wrong_owner.setdefault(homeserver_of.get(parts[0].rstrip("/"), parts[0]), parts[1])
        elif kind == "L" and len(parts) == 2:
            facts.element[parts[0]] = parts[1]
        elif kind == "A":
            facts.certificates_busy = True
        elif kind == "P" and parts[0]:
            facts.pending.add(parts[0])
        elif kind == "M" and parts[0]:
            facts.managed.add(parts[0])
        elif kind == "F" and len(parts) == 2:
            facts.firewall = parts[0]
            facts.sshd_ports = [int(p) for p in parts[1].split() if p.isdigit()]
        elif kind == "1":
            facts.pid1 = parts[0]
    if state is not None:  # the files in directories wholly ours (stat-ed by their globs),
        # only where the directory is one: a link there leads elsewhere (the plan fixes it)
        owned = {d for d in owned_dirs(state) if (st := facts.stats.get(d)) and st.kind == "directory"}
        facts.managed.update(path for path, st in facts.stats.items()
                             if st.kind.startswith("regular") and path.rsplit("/", 1)[0] in owned)
    return facts


def _fields(text: str) -> dict[str, str]:
    """`key=value key=value` -> dict (values have no spaces)."""
    return dict(part.split("=", 1) for part in text.split() if "=" in part)
