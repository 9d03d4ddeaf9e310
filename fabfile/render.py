"""Pure rendering: (inventory, host) -> every directory and file the host must hold.

No SSH, no clock, no randomness: the same inventory gives the same bytes. Secrets are
not rendered at all; they are made once on the host (fabfile/synapse.py) and the
rendered files only name the paths where they live.

Each file says what must act when it changes (its `trigger`):

    proxy:stack          `up` the reverse-proxy stack
    proxy:reload         `nginx -t`, then reload nginx
    synapse:<sn>:stack   `up` that homeserver's stack (recreates what changed)
    synapse:<sn>:restart restart that homeserver's Synapse
    systemd:<unit>       reload systemd's units, then enable and start <unit>
    ""                   nothing (static content served as it is)

Periodic jobs are rendered twice: as systemd timers (`when="systemd"`) and as
/etc/cron.d files (`when="no-systemd"`); the plan keeps the kind the host's init
runs (a fact), so rendering stays a function of the inventory alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jinja2
import yaml

from . import shell, workers as workers_mod
from .errors import InventoryError
from .inventory import Homeserver, Host, Inventory
from .layout import (BASE_RECORD, CERTIFICATES_LOCK, CRON_DIR, FIREWALL_DIR, LOCK_DIR, POSTGRES_UID, ROOT,  # noqa: F401
                     SYNAPSE_UID, SYSTEMD_DIR, Layout)

from .workers import REDIS_SERVICE

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

NETWORK = "synapse-fabric"
FIREWALL_UNIT = "synapse-fabric-firewall.service"
PROXY_PROJECT = "synapse-fabric-proxy"
# where Synapse's processes (and psql) read an external database's CA
DB_CA_MOUNT = "/run/db-ca.pem"


@dataclass(frozen=True)
class RemoteDir:
    path: str
    mode: int = 0o755
    owner: str = ROOT


# RemoteFile.secret: what a diff of the file may show (fabfile/report.py)
SHOW = ""              # everything (lines that look like secrets are masked all the same)
SETTINGS = "settings"  # YAML Synapse settings: values masked unless known to hold no secret
HIDDEN = "hidden"      # nothing


@dataclass(frozen=True)
class RemoteFile:
    path: str
    content: bytes
    mode: int = 0o644
    owner: str = ROOT
    trigger: str = ""
    when: str = ""  # "systemd" / "no-systemd": only on hosts whose PID 1 is (not) systemd
    secret: str = SHOW


@dataclass(frozen=True)
class Guest:
    """Workers of another host's homeserver that this host runs."""
    hs: Homeserver
    workers: tuple
    image: str  # the Synapse image its main process runs (read there), else the inventory's

    @property
    def project(self) -> str:
        return guest_project(self.hs)


@dataclass(frozen=True)
class Database:
    """The database of another host's homeserver that this host runs (postgres.host)."""
    hs: Homeserver
    image: str

    @property
    def project(self) -> str:
        return database_project(self.hs)


@dataclass(frozen=True)
class DesiredState:
    host: Host
    dirs: tuple[RemoteDir, ...]
    files: tuple[RemoteFile, ...]
    homeservers: tuple[Homeserver, ...] = field(default=())
    forwarded: tuple[Homeserver, ...] = field(default=())  # moved away; this host forwards them
    images: tuple[str, ...] = field(default=())  # image references the host needs
    image_refs: dict = field(default_factory=dict)  # role (synapse, nginx, ...) -> reference
    acme: object = None  # the inventory's Acme settings when ACME is enabled
    postgres_images: dict = field(default_factory=dict)  # server_name -> its PostgreSQL image
    synapse_images: dict = field(default_factory=dict)  # server_name -> its Synapse image
    proxied: tuple[Homeserver, ...] = field(default=())  # homeservers whose federation this host serves
    certificates: dict = field(default_factory=dict)  # cert name -> the names it covers, for this host
    turn: object = None  # this host's TURN server (fabfile/turn.py Turn), when it runs one
    workers: dict = field(default_factory=dict)  # server_name -> its Synapse workers (fabfile/workers.py)
    # server_name -> the workers of another host's homeserver this host runs
    # (workers.hosts), in <base>/synapse-workers/<sn>
    guests: dict = field(default_factory=dict)
    # server_name -> the database of another host's homeserver this host runs
    # (postgres.host), in <base>/synapse-db/<sn>
    databases: dict = field(default_factory=dict)

    @property
    def layout(self) -> Layout:
        return Layout(self.host.base_dir)

    def postgres_image(self, hs: Homeserver) -> str:
        return self.postgres_images[hs.server_name]

    def synapse_image(self, hs: Homeserver) -> str:
        return self.synapse_images[hs.server_name]

    def synapse_services(self, hs: Homeserver) -> list[str]:
        """The compose services of a homeserver's stack: Synapse's main process and
        the workers on its host, PostgreSQL, and with workers Redis."""
        has_workers = bool(self.workers.get(hs.server_name))
        postgres = [] if hs.postgres.elsewhere else ["postgres"]
        return self.synapse_processes(hs) + postgres + ([REDIS_SERVICE] if has_workers else [])

    def synapse_processes(self, hs: Homeserver) -> list[str]:
        """The services that run Synapse (main first): what a restart of its settings restarts."""
        return workers_mod.synapse_processes(hs)

    def image_triggers(self, ref: str) -> set[str]:
        """What must be recreated when the image behind `ref` changes."""
        proxy = (self.image_refs.get("nginx"), self.image_refs.get("admin_ui"), self.image_refs.get("coturn"))
        out = {"proxy:stack"} if ref in proxy else set()
        out |= {f"synapse:{hs.server_name}:stack" for hs in self.homeservers
                if ref == self.synapse_image(hs) or (ref == self.postgres_image(hs) and not hs.postgres.elsewhere)
                or (self.workers.get(hs.server_name) and ref == self.image_refs.get("redis"))}
        out |= {f"workers:{sn}:stack" for sn, g in self.guests.items() if ref == g.image}
        out |= {f"database:{sn}:stack" for sn, d in self.databases.items() if ref == d.image}
        return out

    def file(self, path: str) -> RemoteFile:
        return next(f for f in self.files if f.path == path)


def synapse_project(hs: Homeserver) -> str:
    return f"synapse-{hs.slug}"


def database_project(hs: Homeserver) -> str:
    """The compose project of a homeserver's database on another host (not
    `synapse-...`: no homeserver's project can take its name)."""
    return f"postgres-{hs.slug}"


def guest_project(hs: Homeserver) -> str:
    """The compose project of a homeserver's workers on another host."""
    return f"synapse-{hs.slug}-workers"


def synapse_upstream(hs: Homeserver) -> str:
    """The name nginx uses for this homeserver's Synapse on its network."""
    return f"synapse-{hs.slug}"


def synapse_network(hs: Homeserver) -> str:
    """The network this homeserver's Synapse shares with nginx and nothing else:
    Synapse trusts X-Forwarded-For, so only nginx may reach it (not another
    homeserver's Synapse, not certbot)."""
    return f"{NETWORK}-{hs.slug}"


def admin_ui_service(hs: Homeserver) -> str:
    """The admin UI's service in the reverse-proxy stack (nginx reaches it by this name)."""
    return f"admin-ui-{hs.slug}"


def url_host(address: str) -> str:
    """An address as the host part of a URL: IPv6 in brackets."""
    return f"[{address}]" if ":" in address else address


def public_names(hs: Homeserver) -> list[str]:
    """Every public name of a homeserver."""
    names = [hs.server_name, hs.hostname]
    for site in (hs.element, hs.admin_ui):
        if site.enabled:
            names.append(site.hostname)
    return list(dict.fromkeys(names))


def cert_names(hs: Homeserver) -> list[str]:
    """The names its own host serves; one certificate (named after the server_name)
    covers them all. Not the server_name when another host serves its federation
    (federation.via): that host has the certificate for it."""
    return [n for n in public_names(hs) if not (hs.federation.via and n == hs.server_name)]


def _bytecode_cache() -> jinja2.BytecodeCache | None:
    """Compiled templates kept between runs (keyed by each template's source), so a
    no-op deploy does not compile them again; none when there is nowhere to keep them."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "synapse-fabric" / "templates"
    try:
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        return None
    return jinja2.FileSystemBytecodeCache(str(base))


_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    auto_reload=False,  # one run, one set of templates: no stat of each per use
    autoescape=False,
    bytecode_cache=_bytecode_cache(),
)


def _template(name: str, **context) -> bytes:
    try:
        return _env.get_template(name).render(**context).encode()
    except jinja2.TemplateNotFound as exc:  # a packaging bug, not an operator error
        raise RuntimeError(f"template missing: templates/{exc.name}") from None


def _read_local(path: Path, key: str, read: Callable[[Path], bytes]) -> bytes:
    try:
        return read(path)
    except OSError as exc:
        raise InventoryError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def _periodic(name: str, **ctx) -> list[RemoteFile]:
    """A periodic job: a systemd timer + service where systemd runs, a cron.d file
    elsewhere (templates/systemd/, templates/cron.d/)."""
    timer = f"{name}.timer"
    return [
        RemoteFile(f"{SYSTEMD_DIR}/{name}.service", _template(f"systemd/{name}.service.j2", **ctx),
                   trigger=f"systemd:{timer}", when="systemd"),
        RemoteFile(f"{SYSTEMD_DIR}/{timer}", _template(f"systemd/{timer}.j2", **ctx),
                   trigger=f"systemd:{timer}", when="systemd"),
        RemoteFile(f"{CRON_DIR}/{name}", _template(f"cron.d/{name}.j2", **ctx), when="no-systemd"),
    ]


ELEMENT_LOCK = f"{LOCK_DIR}/element.lock"  # a root-only directory: /run/lock is everyone's
ELEMENT_UNPACKED_MAX_BYTES = 1_000_000_000  # a release's tar stream (a gzip bomb is refused unread)


def element_settings(sites, lock_file: str = ELEMENT_LOCK,
                     unpacked_max_bytes: int = ELEMENT_UNPACKED_MAX_BYTES) -> bytes:
    """sites.json: what element-update needs of hosts.yaml for each Element site
    (objects with .hostname .version .keep .feed), and its host-wide limits (the
    tests lower them). Data only: the program reads it with jq and checks every value."""
    doc = {
        "lock_file": lock_file,
        "unpacked_max_bytes": int(unpacked_max_bytes),
        "sites": [{"hostname": s.hostname, "version": s.version, "keep": int(s.keep), "feed": s.feed}
                  for s in sites],
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _settings_file(what: str, doc: dict) -> bytes:
    """Synapse settings as data (YAML dumped, never templated), with our marker."""
    head = f"# Managed by synapse-fabric: {what}.\n"
    return (head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)).encode()


def worker_routes(hs: Homeserver, workers: list, private: dict[str, str] | None = None) -> list[dict]:
    """nginx's routes to a homeserver's workers, in the order nginx must try them:
    for each kind that has workers, its path regexes, how requests are spread
    (`user` or `origin`), and where nginx reaches its workers: their names on its
    network, or a private address and port on another host (`private`: host ->
    its private address)."""
    def target(w) -> str:
        if w.host in ("", hs.host):
            return f"{synapse_upstream(hs)}-{w.name}:{workers_mod.HTTP_PORT}"
        host, port = workers_mod.endpoint(hs, f"{w.name}:http", hs.host, private or {})
        return f"{url_host(host)}:{port}"
    out = []
    for kind, regexes in workers_mod.ROUTES.items():
        names = [target(w) for w in workers if w.kind == kind]
        if not hs.federation.enabled:  # nginx serves no federation path at all
            regexes = [r for r in regexes if not r.startswith(("^/_matrix/federation", "^/_matrix/key"))]
        if names and regexes:
            out.append({"kind": kind, "regexes": regexes, "balance": workers_mod.BALANCE[kind],
                        "buckets": workers_mod.split(names), "var": f"{hs.slug.replace('-', '_')}_{kind}"})
    return out


def _published(hs: Homeserver, host_name: str, private: dict[str, str]) -> dict[str, str]:
    """Compose `ports` entries (service -> "address:port:inner") of what the
    homeserver's other hosts reach on `host_name` (fabfile/workers.py published)."""
    address = url_host(private.get(host_name, ""))
    return {svc: f"{address}:{port}:{inner}" for svc, (port, inner) in workers_mod.published(hs, host_name).items()}


def _shared_workers_file(hs: Homeserver, host_name: str, private: dict[str, str], path: str,
                         trigger: str) -> RemoteFile:
    """conf.d/60-workers.yaml as the processes on `host_name` reach the others."""
    doc = workers_mod.shared_settings(
        workers_mod.placed(hs), where=lambda svc: workers_mod.endpoint(hs, svc, host_name, private))
    return RemoteFile(path, _settings_file("the settings every process of this homeserver shares (workers)", doc),
                      0o644, ROOT, trigger)


def _worker_files(hs: Homeserver, host_name: str, directory: str, trigger: str, files: list) -> list[dict]:
    """Each worker on `host_name`: its own file (appended to `files`), and what its
    compose entry needs. The entry carries the file's hash, so `up` recreates
    exactly the worker whose file changed."""
    out = []
    for w in workers_mod.placed(hs):
        if w.host != host_name:
            continue
        own = _settings_file(f"worker {w.name} ({w.kind}) of {hs.server_name}", workers_mod.worker_settings(w))
        files.append(RemoteFile(f"{directory}/{w.config_file}", own, 0o644, ROOT, trigger))
        out.append({"worker": w, "alias": f"{synapse_upstream(hs)}-{w.name}",
                    "config": hashlib.sha256(own).hexdigest()[:16]})
    return out


# What a host running another host's workers copies from that host (fabfile/guests.py
# reads them there): Synapse's generated files, and the secrets its processes read.
GUEST_DATA = ("homeserver.yaml", "{sn}.signing.key", "{sn}.log.config")
GUEST_SECRETS = ("replication_secret", "redis_password")


def _guest_stack(inv: Inventory, hs: Homeserver, host_name: str, lay: Layout, private: dict[str, str],
                 copies: dict | None, synapse_image: str, redis_image: str,
                 dirs: list, files: list, read: Callable[[Path], bytes]) -> None:
    """The stack of `hs`'s workers on `host_name` (not its host): the same settings
    as its own host's processes, reaching main, PostgreSQL and Redis at its host's
    private address. `copies`: the files read from its host (None: not read, the
    paths alone, for the facts)."""
    sn = hs.server_name
    root = lay.guest(sn)
    stack, restart = f"workers:{sn}:stack", f"workers:{sn}:restart"
    from . import turn as turn_mod  # (turn.py imports the inventory, not this module)
    home = sorted(inv.homeservers_on(hs.host), key=lambda h: h.server_name)
    turn = turn_mod.settings(inv, hs.host, home, cert_names)
    dirs += [RemoteDir(f"{lay.base}/synapse-workers"), RemoteDir(root), RemoteDir(f"{root}/data", 0o750, SYNAPSE_UID),
             RemoteDir(f"{root}/conf.d"), RemoteDir(f"{root}/workers"), RemoteDir(f"{root}/secrets", 0o700)]
    got = (copies or {}).get("files", {})

    def copy(path: str, name: str, mode: int, trigger: str) -> None:
        if copies is None or name in got:
            files.append(RemoteFile(path, got.get(name, b""), mode, SYNAPSE_UID, trigger, secret=HIDDEN))

    for pattern in GUEST_DATA:
        name = pattern.format(sn=sn)
        copy(f"{root}/data/{name}", name, 0o600, restart)
    for name in GUEST_SECRETS + (("turn_shared_secret",) if turn else ()):
        copy(f"{root}/secrets/{name}", name, 0o400, restart)
    db_host, db_port = workers_mod.endpoint(hs, "postgres", host_name, private)
    if copies is None or "postgres_password" in got:
        # libpq's passfile for PostgreSQL on the homeserver's host (':' and '\' escaped)
        esc = lambda v: v.replace("\\", "\\\\").replace(":", "\\:")  # noqa: E731
        password = got.get("postgres_password", b"").decode().strip()
        line = f"{esc(db_host)}:{db_port}:{hs.postgres.database}:{hs.postgres.user}:{esc(password)}\n"
        files.append(RemoteFile(f"{root}/secrets/pgpass", line.encode() if copies else b"", 0o400, SYNAPSE_UID,
                                restart, secret=HIDDEN))
    files.append(_shared_workers_file(hs, host_name, private, f"{root}/conf.d/60-workers.yaml", restart))
    ctx = {"hs": hs, "upstream": synapse_upstream(hs), "project": guest_project(hs), "synapse_image": synapse_image,
           "turn": turn, "redis_image": redis_image, "replication_listener": None, "db": (db_host, db_port), "db_ca": "",
           "publish": _published(hs, host_name, private), "guest": True, "main_host": hs.host,
           "postgres_image": "", "hs_network": ""}
    ctx["workers"] = _worker_files(hs, host_name, f"{root}/workers", stack, files)
    files.append(RemoteFile(f"{root}/.env", _template("synapse/.env.j2", **ctx), 0o644, ROOT, stack))
    files.append(RemoteFile(f"{root}/docker-compose.yml", _template("synapse/workers-compose.yml.j2", **ctx),
                            0o644, ROOT, stack))
    files.append(RemoteFile(f"{root}/conf.d/50-synapse-fabric.yaml",
                            _template("synapse/conf.d/50-synapse-fabric.yaml.j2", **ctx), 0o644, ROOT, restart))
    if hs.synapse_settings:
        files.append(RemoteFile(f"{root}/conf.d/90-operator.yaml", _operator_settings(hs), 0o644, ROOT, restart,
                                secret=SETTINGS))
    if hs.federation.trusted_ca:
        dirs.append(RemoteDir(f"{root}/ca"))
        files.append(RemoteFile(f"{root}/ca/federation-roots.pem",
                                _read_local(hs.federation.trusted_ca, f"homeservers.{sn}.federation.trusted_ca",
                                            read), trigger=restart))


def passfile_for(hs: Homeserver, private: dict[str, str]) -> bytes:
    """What `Layout.passfile_for` holds: the database host, address and port."""
    host, port = workers_mod.endpoint(hs, "postgres", hs.host, private)
    return f"{hs.postgres.host} {host}:{port}\n".encode()


def _operator_settings(hs: Homeserver) -> bytes:
    """The operator's extra settings are data, dumped as YAML, never templated."""
    extra = "# Managed by synapse-fabric: synapse_settings from hosts.yaml.\n"
    extra += yaml.safe_dump(hs.synapse_settings, sort_keys=True, default_flow_style=False)
    return extra.encode()


def render_host(
    inv: Inventory, host_name: str, read: Callable[[Path], bytes] = Path.read_bytes,
    keep_postgres: dict[str, str] | None = None, keep_synapse: dict[str, str] | None = None,
    guest_copies: dict[str, dict] | None = None, db_passfiles: dict[str, bytes] | None = None,
) -> DesiredState:
    """Everything host `host_name` must hold. `read` loads the local files the
    inventory names (CA bundles). `keep_postgres` names, per homeserver, the
    PostgreSQL image its existing database needs when the inventory's has another
    major version (see fabfile/postgres.py); `keep_synapse`, the Synapse image a
    homeserver keeps until `inv upgrade` moves it (fabfile/versions.py);
    `guest_copies`, per homeserver whose workers this host runs, what was read
    from its host (fabfile/guests.py: files, and the Synapse image it runs);
    `db_passfiles`, per homeserver whose database another host runs and whose
    passfile this host lacks, that passfile (fabfile/database.py passfiles)."""
    host = inv.hosts[host_name]
    lay = Layout(host.base_dir)
    servers = sorted(inv.homeservers_on(host_name), key=lambda hs: hs.server_name)
    images = {name: inv.image(name)
              for name in ("synapse", "postgres", "nginx", "certbot", "admin_ui", "coturn", "redis")}
    workers = {hs.server_name: workers_mod.placed(hs) for hs in servers}
    workers = {sn: ws for sn, ws in workers.items() if ws}
    admin_uis = [hs for hs in servers if hs.admin_ui.enabled]
    from . import turn as turn_mod  # (turn.py imports the inventory, not this module)
    turn = turn_mod.settings(inv, host_name, servers, cert_names)
    # homeservers on hosts without a public address whose federation this host serves
    proxied = sorted((hs for hs in inv.homeservers.values() if hs.federation.via == host_name),
                     key=lambda hs: hs.server_name)
    # every certificate this host holds (cert name -> the names it covers)
    certificates = {**{hs.server_name: tuple(cert_names(hs)) for hs in servers},
                    **{hs.server_name: (hs.server_name,) for hs in proxied},
                    **({turn.hostname: (turn.hostname,)} if turn and turn.cert_name == turn.hostname else {})}
    common = {"host": host, "network": NETWORK, "images": images}
    private = {name: h.private_address for name, h in inv.hosts.items() if h.private_address}
    postgres_images = {hs.server_name: (keep_postgres or {}).get(hs.server_name)
                       or hs.postgres.image or images["postgres"] for hs in servers}
    synapse_images = {hs.server_name: (keep_synapse or {}).get(hs.server_name) or images["synapse"]
                      for hs in servers}

    dirs: list[RemoteDir] = [
        RemoteDir(lay.base),
        RemoteDir(f"{lay.base}/synapse"),
        RemoteDir(lay.proxy),
        RemoteDir(f"{lay.proxy}/nginx"),
        RemoteDir(lay.nginx_conf_d),
        RemoteDir(f"{lay.proxy}/nginx/upstream-ca"),
        RemoteDir(f"{lay.proxy}/bin"),
        RemoteDir(f"{lay.proxy}/certs", 0o700),
        RemoteDir(lay.acme, 0o700),
        RemoteDir(f"{lay.acme}/webroot"),
        RemoteDir(f"{lay.acme}/letsencrypt", 0o700),
        RemoteDir(f"{lay.acme}/lib", 0o700),
        RemoteDir(f"{lay.proxy}/well-known"),
        RemoteDir(f"{lay.proxy}/element"),
        RemoteDir(lay.admin_ui),
    ]
    files: list[RemoteFile] = [RemoteFile(BASE_RECORD, f"{lay.base}\n".encode())]
    dirs.append(RemoteDir(BASE_RECORD.rsplit("/", 1)[0]))

    def add(path, template, trigger="", mode=0o644, **ctx):
        files.append(RemoteFile(path, _template(template, **common, **ctx), mode, ROOT, trigger))

    # -- reverse proxy -------------------------------------------------------
    port_8448 = any(hs.federation.enabled and hs.federation.port_8448
                    for hs in servers + inv.forwarded_from(host_name))
    add(f"{lay.proxy}/.env", "reverse_proxy/.env.j2", "proxy:stack", project=PROXY_PROJECT)
    add(
        f"{lay.proxy}/docker-compose.yml",
        "reverse_proxy/docker-compose.yml.j2",
        "proxy:stack",
        port_8448=port_8448,
        acme_ca_bundle=inv.acme.ca_bundle is not None,
        homeserver_networks=[synapse_network(hs) for hs in servers],
        admin_uis={admin_ui_service(hs): hs for hs in admin_uis},
        turn=turn,
    )
    if turn:
        dirs.append(RemoteDir(lay.turn, 0o750))
        if turn.cert_name == turn.hostname:  # a name of its own: its own certificate
            dirs.append(RemoteDir(lay.certs(turn.hostname), 0o700))
            files.append(RemoteFile(f"{lay.certs(turn.hostname)}/names", f"{turn.hostname}\n".encode(),
                                    0o644, ROOT, f"acme:{turn.hostname}"))
            add(lay.vhost(f"turn-{turn.hostname}"), "reverse_proxy/nginx/conf.d/acme-only.conf.j2", "proxy:reload",
                acme_name=turn.hostname, purpose=f"coturn's TLS certificate (hosts.{host_name}.turn)")
        add(f"{lay.turn}/turnserver.conf", "reverse_proxy/coturn/turnserver.conf.j2", "turn:restart",
            turn_hostname=turn.hostname, cert_name=turn.cert_name, relay=turn.relay,
            secret_in_container="/run/secrets/turn_shared_secret")
    if inv.acme.ca_bundle is not None:
        files.append(
            RemoteFile(
                f"{lay.acme}/ca-bundle.pem",
                _read_local(inv.acme.ca_bundle, "acme.ca_bundle", read),
            )
        )
    if inv.acme.enabled and certificates:
        add(lay.bin("renew-certificates"), "reverse_proxy/bin/renew-certificates.j2", mode=0o755, project=PROXY_PROJECT,
            proxy_dir=lay.proxy, cert_names=sorted(certificates), turn=turn, lock_dir=LOCK_DIR,
            lock=CERTIFICATES_LOCK)
        files += _periodic("synapse-fabric-certificates", proxy_dir=lay.proxy)
    if host.firewall.enabled:
        from . import firewall  # (firewall.py imports the inventory, not this module)
        opened = firewall.openings(inv, host_name)
        render = lambda name, **ctx: _template(name, **ctx)  # noqa: E731
        dirs.append(RemoteDir(FIREWALL_DIR, 0o700))
        files += [RemoteFile(firewall.rules_path(family), firewall.rules(render, host, opened, family),
                             0o600, ROOT, "firewall") for family in (4, 6)]
        files.append(RemoteFile(firewall.PROGRAM, shell.script("firewall.sh"), 0o700, ROOT, "firewall"))
        files += [
            RemoteFile(f"{SYSTEMD_DIR}/{FIREWALL_UNIT}", _template("systemd/synapse-fabric-firewall.service.j2",
                                                                     program=firewall.PROGRAM),
                       trigger=f"systemd:{FIREWALL_UNIT}", when="systemd"),
            RemoteFile(f"{CRON_DIR}/synapse-fabric-firewall", _template("cron.d/synapse-fabric-firewall.j2",
                                                                        program=firewall.PROGRAM),
                       when="no-systemd"),
        ]
    if inv.backup.schedule and servers:
        from .backup import host_program  # (backup.py imports this module)
        files.append(RemoteFile(lay.bin("backup"), host_program(inv, servers), 0o700))
        files += _periodic("synapse-fabric-backup", proxy_dir=lay.proxy, schedule=inv.backup.schedule)
    add(lay.vhost("00-default"), "reverse_proxy/nginx/conf.d/00-default.conf.j2", "proxy:reload")
    add(f"{lay.nginx_conf_d}/proxy-headers.inc", "reverse_proxy/nginx/conf.d/proxy-headers.inc.j2", "proxy:reload")

    for hs in servers:
        sn = hs.server_name
        ctx = {"hs": hs, "upstream": synapse_upstream(hs), "cert_name": sn}
        dirs.append(RemoteDir(lay.certs(sn), 0o700))
        routes = worker_routes(hs, workers.get(sn, []), private)
        # the names one certificate must cover; a change means a new certificate
        files.append(RemoteFile(f"{lay.certs(sn)}/names", ("\n".join(cert_names(hs)) + "\n").encode(),
                                0o644, ROOT, f"acme:{sn}"))
        add(lay.vhost(hs.hostname), "reverse_proxy/nginx/conf.d/homeserver.conf.j2", "proxy:reload",
            routes=routes, **ctx)
        srv = hs.federation.enabled and hs.federation.delegation == "srv"
        if not hs.federation.via:  # else the server_name is served by that host
            if hs.hostname != sn:
                add(lay.vhost(sn), "reverse_proxy/nginx/conf.d/delegation.conf.j2", "proxy:reload", srv=srv, **ctx)
            wk = lay.well_known(sn)
            dirs += [RemoteDir(wk), RemoteDir(f"{wk}/matrix")]
            if not srv:
                add(f"{wk}/matrix/server", "reverse_proxy/well-known/matrix/server.j2", **ctx)
            add(f"{wk}/matrix/client", "reverse_proxy/well-known/matrix/client.j2", **ctx)
        if hs.element.enabled:
            eh = hs.element.hostname
            site = lay.element_site(eh)
            add(lay.vhost(eh), "reverse_proxy/nginx/conf.d/element.conf.j2", "proxy:reload", **ctx)
            dirs.append(RemoteDir(site))
            add(f"{site}/config.json", "reverse_proxy/element/config.json.j2", **ctx)
            # the inventory's choice; when it changes, deploy installs it
            files.append(RemoteFile(f"{site}/wanted-version",
                                    f"{hs.element.version}\n".encode(), trigger=f"element:{eh}"))
            for key, name in (("signing_key", "signing-key.gpg"), ("feed_ca", "feed-ca.pem")):
                local = getattr(hs.element, key)
                if local is not None:
                    files.append(RemoteFile(f"{site}/{name}",
                                            _read_local(local, f"homeservers.{sn}.element.{key}", read)))
        if hs.admin_ui.enabled:
            ah = hs.admin_ui.hostname
            add(lay.vhost(ah), "reverse_proxy/nginx/conf.d/admin-ui.conf.j2", "proxy:reload",
                admin_ui_upstream=admin_ui_service(hs), **ctx)
            add(lay.admin_ui_config(ah), "reverse_proxy/admin-ui/config.json.j2", **ctx)
    sites = [hs.element for hs in servers if hs.element.enabled]
    if sites:
        # the updater is a static program; its settings are data beside the sites
        dirs.append(RemoteDir(f"{lay.proxy}/bin"))
        files.append(RemoteFile(lay.bin("element-update"), shell.script("element-update.sh"), 0o755))
        files.append(RemoteFile(lay.element_settings, element_settings(sites)))
        files += _periodic("synapse-fabric-element", proxy_dir=lay.proxy)

    def trust_upstream(hs) -> str:
        """The CA bundle nginx verifies another host's certificate with when it passes
        a homeserver's requests on: its federation.trusted_ca when set."""
        if not hs.federation.trusted_ca:
            return "/etc/ssl/certs/ca-certificates.crt"
        files.append(RemoteFile(
            lay.upstream_ca(hs.server_name),
            _read_local(hs.federation.trusted_ca, f"homeservers.{hs.server_name}.federation.trusted_ca", read),
            trigger="proxy:reload"))
        return f"/etc/nginx/upstream-ca/{hs.server_name}.pem"

    # -- homeservers on hosts without a public address whose federation this host serves
    for hs in proxied:
        sn = hs.server_name
        dirs.append(RemoteDir(lay.certs(sn), 0o700))
        files.append(RemoteFile(f"{lay.certs(sn)}/names", f"{sn}\n".encode(), 0o644, ROOT, f"acme:{sn}"))
        upstream_ca = trust_upstream(hs)
        add(lay.vhost(f"{sn}-via"), "reverse_proxy/nginx/conf.d/federation-via.conf.j2", "proxy:reload",
            hs=hs, cert_name=sn, target=url_host(inv.hosts[hs.host].address), upstream_ca=upstream_ca)
        wk = lay.well_known(sn)
        dirs += [RemoteDir(wk), RemoteDir(f"{wk}/matrix")]
        files.append(RemoteFile(f"{wk}/matrix/server", (json.dumps({"m.server": f"{sn}:443"}) + "\n").encode()))
        add(f"{wk}/matrix/client", "reverse_proxy/well-known/matrix/client.j2", hs=hs)

    # -- homeservers that moved away: their names are forwarded to the new host
    forwarded = sorted(inv.forwarded_from(host_name), key=lambda hs: hs.server_name)
    for hs in forwarded:
        sn = hs.server_name
        dirs.append(RemoteDir(lay.certs(sn), 0o700))
        upstream_ca = trust_upstream(hs)
        add(lay.vhost(f"{sn}-forward"), "reverse_proxy/nginx/conf.d/forward.conf.j2", "proxy:reload",
            hs=hs, names=cert_names(hs), target=url_host(inv.hosts[hs.host].address), cert_name=sn,
            upstream_ca=upstream_ca)

    # -- one synapse stack per homeserver -----------------------------------
    for hs in servers:
        sn = hs.server_name
        root = lay.synapse(sn)
        hs_workers = workers.get(sn, [])
        ext = hs.postgres.external
        ctx = {"hs": hs, "upstream": synapse_upstream(hs), "project": synapse_project(hs),
               "postgres_image": postgres_images[sn], "synapse_image": synapse_images[sn],
               "hs_network": synapse_network(hs), "turn": turn, "workers": [], "redis_image": images["redis"],
               "replication_listener": workers_mod.main_replication_listener() if hs_workers else None,
               "publish": _published(hs, host_name, private), "guest": False,
               # the database: the stack's own PostgreSQL, or the operator's over verify-full TLS
               "db": workers_mod.endpoint(hs, "postgres", host_name, private) if hs.postgres.host
               else (ext.host, ext.port) if ext else ("postgres", 5432),
               "db_ca": DB_CA_MOUNT if ext else "", "own_db": not hs.postgres.elsewhere,
               # Redis, the secrets, egress: every homeserver with workers, even all elsewhere
               "has_workers": bool(hs_workers)}
        dirs += [
            RemoteDir(root),
            RemoteDir(lay.data(sn), 0o750, SYNAPSE_UID),
            RemoteDir(lay.conf_d(sn)),
            *([] if hs.postgres.elsewhere else [RemoteDir(lay.postgres(sn), 0o700, POSTGRES_UID)]),
            RemoteDir(lay.secrets(sn), 0o700),
        ]
        stack = f"synapse:{sn}:stack"
        restart = f"synapse:{sn}:restart"
        if hs_workers:
            dirs.append(RemoteDir(lay.workers(sn)))
            files.append(_shared_workers_file(hs, host_name, private, f"{lay.conf_d(sn)}/60-workers.yaml", restart))
            ctx["workers"] = _worker_files(hs, host_name, lay.workers(sn), stack, files)
        add(f"{root}/.env", "synapse/.env.j2", stack, **ctx)
        add(f"{root}/docker-compose.yml", "synapse/docker-compose.yml.j2", stack, **ctx)
        add(f"{lay.conf_d(sn)}/50-synapse-fabric.yaml", "synapse/conf.d/50-synapse-fabric.yaml.j2", restart, **ctx)
        if hs.synapse_settings:
            files.append(RemoteFile(f"{lay.conf_d(sn)}/90-operator.yaml", _operator_settings(hs), 0o644, ROOT,
                                    restart, secret=SETTINGS))
        if hs.postgres.host:
            if sn in (db_passfiles or {}):  # made once on the database's host, read there
                files.append(RemoteFile(lay.secret(sn, "pgpass"), db_passfiles[sn], 0o400, SYNAPSE_UID, stack,
                                        secret=HIDDEN))
            # which database that passfile is for: a deploy refuses to point it at another
            files.append(RemoteFile(lay.passfile_for(sn), passfile_for(hs, private), 0o644, ROOT))
        if ext:
            files.append(RemoteFile(lay.db_ca(sn), _read_local(ext.ca, f"homeservers.{sn}.postgres.external.ca", read),
                                    trigger=restart))
        if hs.federation.trusted_ca:
            dirs.append(RemoteDir(f"{root}/ca"))
            key = f"homeservers.{sn}.federation.trusted_ca"
            files.append(
                RemoteFile(
                    f"{root}/ca/federation-roots.pem",
                    _read_local(hs.federation.trusted_ca, key, read),
                    trigger=restart,
                )
            )

    # -- workers of other hosts' homeservers (workers.hosts) ---------------------
    guests = {}
    for hs in sorted(inv.homeservers.values(), key=lambda hs: hs.server_name):
        if hs.host == host_name or host_name not in workers_mod.worker_hosts(hs):
            continue
        copies = (guest_copies or {}).get(hs.server_name)
        image = (copies or {}).get("image") or images["synapse"]
        guests[hs.server_name] = Guest(hs, tuple(w for w in workers_mod.placed(hs) if w.host == host_name), image)
        _guest_stack(inv, hs, host_name, lay, private, copies, image, images["redis"], dirs, files, read)

    # -- databases of other hosts' homeservers (postgres.host) ----------------
    databases = {}
    for hs in sorted(inv.homeservers.values(), key=lambda hs: hs.server_name):
        if hs.postgres.host != host_name:
            continue
        db = Database(hs, (keep_postgres or {}).get(hs.server_name) or hs.postgres.image or images["postgres"])
        databases[hs.server_name] = db
        root = lay.database(hs.server_name)
        dirs += [RemoteDir(f"{lay.base}/synapse-db"), RemoteDir(root),
                 RemoteDir(lay.database_data(hs.server_name), 0o700, POSTGRES_UID), RemoteDir(f"{root}/secrets", 0o700)]
        files.append(RemoteFile(f"{root}/.env", _template("synapse/.env.j2", project=db.project), 0o644, ROOT,
                                f"database:{hs.server_name}:stack"))
        files.append(RemoteFile(f"{root}/docker-compose.yml",
                                _template("synapse/database-compose.yml.j2", hs=hs, project=db.project,
                                          postgres_image=db.image, publish=_published(hs, host_name, private)),
                                0o644, ROOT, f"database:{hs.server_name}:stack"))

    return DesiredState(
        host=host,
        dirs=tuple(sorted(set(dirs), key=lambda d: d.path)),
        files=tuple(sorted(files, key=lambda f: f.path)),
        homeservers=tuple(servers),
        forwarded=tuple(forwarded),
        proxied=tuple(proxied),
        certificates=certificates,
        image_refs={k: v for k, v in images.items()
                    if (k != "admin_ui" or admin_uis) and (k != "coturn" or turn) and (k != "redis" or workers)},
        turn=turn,
        workers=workers,
        guests=guests,
        databases=databases,
        acme=inv.acme if inv.acme.enabled else None,
        postgres_images=postgres_images,
        synapse_images=synapse_images,
        images=tuple(sorted({images["nginx"], images["certbot"]} | ({images["admin_ui"]} if admin_uis else set())
                            | ({images["coturn"]} if turn else set())
                            | ({images["redis"]} if workers else set())
                            | {*synapse_images.values(), *postgres_images.values(), *(g.image for g in guests.values()),
                               *(d.image for d in databases.values())})),
    )
