"""What hosts.yaml may say: the typed models, their defaults and per-field checks.

The models are frozen msgspec Structs with checks of their own (fabfile/structs.py).
Loading a file, reporting its errors and the rules that span entries are in
fabfile/inventory.py.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from msgspec import Meta

from .errors import InventoryError  # noqa: F401  (re-exported for fabfile.inventory)
from .structs import Model as _Model, checked, convert, field_check, model_check


# base_dir may not be one of these (it holds secrets and is removed from in places)
SYSTEM_DIRS = {"/opt", "/srv", "/var", "/home", "/root", "/mnt", "/media", "/var/lib", "/usr/local"}


def check_cidrs(values: list[str], key: str) -> list[str]:
    """Networks as written: host bits set is a mistake (203.0.113.7/0 is not
    203.0.113.7), never silently widened."""
    out = []
    for r in values:
        try:
            net = ipaddress.ip_network(r, strict=True)
        except ValueError as exc:
            if "host bits set" in str(exc):
                base = ipaddress.ip_network(r, strict=False)
                raise ValueError(f"{r!r} has host bits set: it would mean {base} ; write the network "
                                 f"(e.g. {base}) or a single address (e.g. {r.split('/')[0]}/"
                                 f"{base.max_prefixlen})") from None
            raise ValueError(f"{r!r} is not an IP network: {exc}") from None
        out.append(str(net))
    return out


# One DNS label: letters, digits, hyphens; no leading/trailing hyphen; 63 chars max.
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
DOMAIN_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})+$")
# Names used as host keys and compose project parts.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SIZE_RE = re.compile(r"^[1-9][0-9]*[KMG]$")

ACME_DIRECTORIES = {
    "staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
    "production": "https://acme-v02.api.letsencrypt.org/directory",
}

# Current, supported releases (README "Images"): Synapse's newest, PostgreSQL 17 on
# Debian 13 (what Synapse supports longest of the majors that keep the classic
# data directory), nginx's stable line, certbot 5. A homeserver whose database is
# an older major keeps running that major (fabfile/postgres.py).
DEFAULT_IMAGES = {
    "synapse": "matrixdotorg/synapse:v1.163.2",
    "postgres": "postgres:17-trixie",
    "nginx": "nginx:1.30",
    "certbot": "certbot/certbot:v5.8.0",
    # Ketesa, synapse-admin's maintained successor: deployed only for homeservers
    # whose admin_ui is enabled. It is on ghcr.io, not Docker Hub: a host with
    # `images: pull` must reach ghcr.io (a Docker Hub mirror does not serve it).
    "admin_ui": "ghcr.io/etkecc/ketesa:v1.0.0",
    # coturn's own image: deployed only on hosts whose turn is enabled.
    "coturn": "coturn/coturn:4.7.0",
    # Valkey (the BSD-licensed Redis) that workers replicate through: deployed only
    # for homeservers with workers, one per homeserver, on its internal network.
    "redis": "valkey/valkey:9.1.1-alpine",
}

# name[:tag][@sha256:<64 hex>], lower-case registry/repository path components.
IMAGE_RE = re.compile(
    r"^(?P<name>(?:[a-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


def check_image(value: str) -> str:
    """An image reference: `name:tag`, `name@sha256:...` or `name:tag@sha256:...`."""
    m = IMAGE_RE.match(value)
    if not m or not (m["tag"] or m["digest"]):
        raise ValueError(f"{value!r} is not an image reference like name:tag or name:tag@sha256:<digest>")
    return value


def postgres_major(ref: str) -> int:
    """The PostgreSQL major version an image reference names by its tag
    (postgres:17-trixie -> 17). A reference without one is refused: a database
    must never change major version because a tag moved."""
    m = IMAGE_RE.match(ref)
    major = re.match(r"^([0-9]+)(?:[.-]|$)", (m["tag"] or "") if m else "")
    if not major:
        raise ValueError(
            f"{ref!r} does not name a PostgreSQL major version in its tag; use one like "
            "postgres:17-trixie (a digest may follow: postgres:17-trixie@sha256:...)")
    n = int(major[1])
    if n >= 18:
        raise ValueError(
            f"{ref!r}: PostgreSQL {n} images keep their data in /var/lib/postgresql/{n}/docker "
            "(PGDATA moved in 18) and refuse the /var/lib/postgresql/data mount synapse-fabric "
            "uses; choose 17 or older")
    if n < 13:
        raise ValueError(f"{ref!r}: Synapse no longer supports PostgreSQL {n}")
    return n


def check_domain(value: str) -> str:
    """Lower-case `value` and check it is a fully qualified DNS name."""
    value = value.strip().lower().rstrip(".")
    if not DOMAIN_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid domain name (labels of letters, digits and "
            "hyphens, separated by dots, at least two labels)"
        )
    return value


class Firewall(_Model, kw_only=True):
    """What a host lets in from outside (fabfile/firewall.py). Only SSH, HTTP(S),
    federation on 8448 when a homeserver serves it, TURN when the host runs it, and
    what is listed here; Docker's published ports obey it too."""

    enabled: bool = False
    # The ports sshd listens on (default: the port synapse-fabric connects to). A
    # deploy refuses a firewall that would close a port sshd listens on.
    ssh_ports: list[int] = []
    # Networks let in on every port (a private network between hosts, a VPN).
    allow_from: list[str] = []
    # false: 80, 443 and 8448 only from allow_from (a host on a private network,
    # its federation served by another host: homeservers.X.federation.via).
    public_web: bool = True
    # More ports to open to everyone.
    open_tcp: list[int] = []
    open_udp: list[int] = []

    @field_check("ssh_ports", "open_tcp", "open_udp")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        bad = [p for p in v if not 1 <= p <= 65535]
        if bad:
            raise ValueError(f"{bad[0]} is not a port (1-65535)")
        return sorted(set(v))

    @field_check("allow_from")
    @classmethod
    def _allow(cls, v):
        nets = check_cidrs(v, "firewall.allow_from")
        if any(ipaddress.ip_network(n).prefixlen == 0 for n in nets):
            raise ValueError("a /0 network would let everyone in; list the networks that need every port")
        return nets


class Turn(_Model, kw_only=True):
    """coturn on this host, for the calls of the homeservers it runs (fabfile/turn.py)."""

    enabled: bool = False
    # The name clients reach TURN by (required): one of the public names of a
    # homeserver on this host, whose certificate coturn serves. Named, not derived:
    # a homeserver added later must not move every Synapse's turn_uris.
    hostname: Optional[str] = None
    # UDP ports coturn relays media through (both ends included).
    relay_ports: str = "49152-49251"

    @field_check("hostname")
    @classmethod
    def _hostname(cls, v):
        return None if v is None else check_domain(v)

    @field_check("relay_ports")
    @classmethod
    def _relay(cls, v: str) -> str:
        m = re.match(r"^([0-9]+)-([0-9]+)$", str(v).strip())
        if not m or not (1024 <= int(m[1]) <= int(m[2]) <= 65535):
            raise ValueError(f"{v!r} must be a port range like 49152-49251 (1024-65535, low-high)")
        return f"{int(m[1])}-{int(m[2])}"

    @model_check
    def _named(self):
        if self.enabled and not self.hostname:
            raise ValueError("turn.hostname is required when turn.enabled is true: the name clients reach TURN "
                             "by, one of the public names of a homeserver on this host")
        return self

    @property
    def relay_range(self) -> tuple[int, int]:
        low, high = self.relay_ports.split("-")
        return int(low), int(high)


class Host(_Model, kw_only=True):
    """A machine reached over SSH."""

    name: str = ""
    address: str
    user: str = "root"
    port: Annotated[int, Meta(ge=1, le=65535)] = 22
    key: Optional[Path] = None
    sudo: Optional[bool] = None  # default: True unless user is root
    images: Literal["pull", "push"] = "pull"
    base_dir: str = "/opt/matrix"
    firewall: Firewall = Firewall()
    turn: Turn = Turn()
    # Its address on the provider's private network (homeservers.<sn>.workers.hosts):
    # the ports one homeserver's processes share across hosts are published here only.
    private_address: Optional[str] = None

    @field_check("address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            return check_domain(v)

    @field_check("private_address")
    @classmethod
    def _private_address(cls, v):
        if v is None:
            return v
        addr = ipaddress.ip_address(v)
        if not addr.is_private or addr.is_loopback or addr.is_unspecified or addr.is_link_local or addr.is_reserved:
            raise ValueError(f"{v!r} is not an address of a private network (10/8, 172.16/12, 192.168/16, fc00::/7)")
        return str(addr)

    @field_check("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not re.match(r"^[a-z_][a-z0-9_-]{0,31}$", v):
            raise ValueError(f"{v!r} is not a valid Unix user name")
        return v

    @field_check("base_dir")
    @classmethod
    def _base_dir(cls, v: str) -> str:
        if not re.match(r"^/[A-Za-z0-9._/-]+$", v) or ".." in v.split("/") or "." in v.split("/"):
            raise ValueError(f"{v!r} must be an absolute path without '.' or '..'")
        v = re.sub("/+", "/", v).rstrip("/")
        top = v.split("/")[1] if v else ""
        if not v or v in SYSTEM_DIRS or top in ("tmp", "proc", "sys", "dev", "run", "boot", "etc", "bin", "sbin",
                                                "lib", "lib64", "usr"):
            raise ValueError(f"{v or '/'!r} is a system directory (or inside one): choose a directory of "
                             "its own, such as /opt/matrix or /srv/matrix")
        return v

    @property
    def use_sudo(self) -> bool:
        return self.user != "root" if self.sudo is None else self.sudo


class Federation(_Model, kw_only=True):
    enabled: bool = True
    # Also serve federation on 8448 (besides 443 through delegation).
    port_8448: bool = False
    # How other servers find this one: `.well-known/matrix/server` on the server_name
    # (default), or a DNS SRV record `_matrix-fed._tcp.<server_name>` the operator sets
    # (`inv dns` prints it); then the server_name's own vhost serves federation.
    delegation: Literal["well_known", "srv"] = "well_known"
    # An inventory host with a public address that serves this homeserver's
    # federation (its server_name points there): for a homeserver whose own host
    # has none, or is reached by clients only on a private network. That host
    # terminates TLS for the server_name and forwards only /_matrix/federation and
    # /_matrix/key to this homeserver's host; it serves no client API.
    via: Optional[str] = None
    # Only federate with these domains (None: with everyone).
    allow_domains: Optional[list[str]] = None
    # CA bundle (PEM) that Synapse trusts for outbound federation, in addition
    # to nothing else: when set, ONLY these roots are trusted (Synapse's own rule).
    trusted_ca: Optional[Path] = None
    # Private networks Synapse may federate into. Synapse blocks private
    # addresses by default; an explicit list here lifts that for these CIDRs only.
    allow_ip_ranges: list[str] = []
    # Notary servers for signing keys (None: Synapse's default, matrix.org).
    trusted_key_servers: Optional[list[dict[str, Any]]] = None

    @field_check("allow_domains")
    @classmethod
    def _domains(cls, v):
        return None if v is None else [check_domain(d) for d in v]

    @field_check("allow_ip_ranges")
    @classmethod
    def _ranges(cls, v):
        return check_cidrs(v, "federation.allow_ip_ranges")


class Element(_Model, kw_only=True):
    enabled: bool = False
    hostname: Optional[str] = None
    version: str = "latest"
    brand: str = "Element"
    keep: Annotated[int, Meta(ge=1, le=20)] = 3
    feed: str = "https://api.github.com/repos/element-hq/element-web/releases"
    # Binary OpenPGP keyring (gpg --export) that must have signed each release.
    signing_key: Optional[Path] = None
    # CA bundle for the feed and downloads (a private feed); default: system roots.
    feed_ca: Optional[Path] = None

    @field_check("feed")
    @classmethod
    def _feed(cls, v: str) -> str:
        if not re.match(r"^https://[A-Za-z0-9.-]+(:[0-9]+)?/[A-Za-z0-9._~/%-]*$", v):
            raise ValueError(f"{v!r} must be an https:// URL")
        return v

    @field_check("hostname")
    @classmethod
    def _hostname(cls, v):
        return None if v is None else check_domain(v)

    @field_check("version")
    @classmethod
    def _version(cls, v: str) -> str:
        v = v.removeprefix("v")
        if v != "latest" and not re.match(r"^[0-9]+(\.[0-9]+){1,3}(-rc\.?[0-9]+)?$", v):
            raise ValueError(f"{v!r} is not a version like 1.11.85 or 'latest'")
        return v


class AdminUI(_Model, kw_only=True):
    """An admin web UI (Ketesa) on its own name, served only to admin_api_allow."""

    enabled: bool = False
    hostname: Optional[str] = None

    @field_check("hostname")
    @classmethod
    def _hostname(cls, v):
        return None if v is None else check_domain(v)


class Workers(_Model, kw_only=True):
    """Synapse workers (fabfile/workers.py): a preset, and/or how many of each kind
    (a count replaces the preset's for that kind; 0 removes it)."""

    preset: Literal["none", "federation-helper", "balanced"] = "none"
    sync: Optional[Annotated[int, Meta(ge=0, le=16)]] = None
    client: Optional[Annotated[int, Meta(ge=0, le=16)]] = None
    federation_reader: Optional[Annotated[int, Meta(ge=0, le=16)]] = None
    federation_sender: Optional[Annotated[int, Meta(ge=0, le=16)]] = None
    event_persister: Optional[Annotated[int, Meta(ge=0, le=16)]] = None
    media: Optional[Annotated[int, Meta(ge=0, le=4)]] = None  # on the homeserver's host: media_store is one directory
    stream_writer: Optional[Annotated[int, Meta(ge=0, le=1)]] = None  # typing and presence allow one writer
    pusher: Optional[Annotated[int, Meta(ge=0, le=16)]] = None
    background: Optional[Annotated[int, Meta(ge=0, le=1)]] = None  # Synapse runs background tasks on one process
    # kind -> the inventory host its workers run on (default: the homeserver's host)
    hosts: dict[str, str] = {}
    # the first of the ports (port_base .. port_base+299) published on private
    # addresses when some workers run on another host (fabfile/workers.py PORTS)
    port_base: Annotated[int, Meta(ge=1024, le=65000)] = 7100

    @field_check("hosts")
    @classmethod
    def _hosts(cls, v: dict[str, str]) -> dict[str, str]:
        from .workers import KINDS  # (workers.py imports nothing of this module)
        for kind in v:
            if kind not in KINDS:
                raise ValueError(f"unknown worker kind {kind!r} (known: {', '.join(KINDS)})")
            if kind == "media":
                raise ValueError("media workers stay on the homeserver's host, beside the media store")
        return v


class ExternalPostgres(_Model, kw_only=True):
    """A PostgreSQL server the operator runs (a provider's, a cluster of their own):
    reached over TLS that checks its name against `ca` (libpq's verify-full)."""
    host: str
    port: Annotated[int, Meta(ge=1, le=65535)] = 5432
    # PEM file of the CA that signed the server's certificate (a local path)
    ca: Path

    @field_check("host")
    @classmethod
    def _host(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
            return v
        except ValueError:
            return check_domain(v)


class Postgres(_Model, kw_only=True):
    database: str = "synapse"
    user: str = "synapse"
    # This homeserver's PostgreSQL image (default: images.postgres); its major
    # version must be the one its database was created with. With `external`, the
    # image whose client tools (psql) reach that server.
    image: Optional[str] = None
    # The database is not run here: an existing server, its password set on the
    # homeserver's host with `inv database-password`.
    external: Optional[ExternalPostgres] = None
    # The database runs on this other inventory host (<base_dir>/synapse-db/<sn>),
    # published on its private address only and open to the homeserver's host only.
    host: Optional[str] = None

    @property
    def elsewhere(self) -> bool:
        """Not in the homeserver's own stack: an external server or another host's."""
        return self.external is not None or self.host is not None

    @property
    def where(self) -> str:
        """Where a database elsewhere runs, for messages."""
        return self.external.host if self.external is not None else f"host {self.host}"

    @field_check("image")
    @classmethod
    def _image(cls, v):
        if v is not None:
            postgres_major(check_image(v))
        return v

    @field_check("database", "user")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not re.match(r"^[a-z_][a-z0-9_]{0,62}$", v):
            raise ValueError(f"{v!r} must be lower-case letters, digits and '_'")
        return v


class Homeserver(_Model, kw_only=True):
    """One Synapse homeserver: its Matrix domain and where it runs."""

    server_name: str = ""
    host: str
    public_hostname: Optional[str] = None  # default: matrix.<server_name>
    registration: Literal["disabled", "open", "token"] = "disabled"
    admin_api_allow: list[str] = []
    max_upload_size: str = "50M"
    federation: Federation = Federation()
    element: Element = Element()
    admin_ui: AdminUI = AdminUI()
    postgres: Postgres = Postgres()
    workers: Workers = Workers()
    # Set by `inv migrate-host`: the host this homeserver left, which forwards its
    # names to the new host until `inv migrate-host --finish`.
    migrated_from: Optional[str] = None
    # Extra Synapse settings, merged into the managed override file.
    synapse_settings: dict[str, Any] = {}

    @field_check("public_hostname")
    @classmethod
    def _hostname(cls, v):
        return None if v is None else check_domain(v)

    @field_check("admin_api_allow")
    @classmethod
    def _cidrs(cls, v):
        nets = check_cidrs(v, "admin_api_allow")
        if any(ipaddress.ip_network(n).prefixlen == 0 for n in nets):
            raise ValueError("a /0 network would open the admin API to everyone; list the networks "
                             "that need it (anyone who can reach it can try admin tokens)")
        return nets

    @field_check("max_upload_size")
    @classmethod
    def _size(cls, v: str) -> str:
        if not SIZE_RE.match(str(v)):
            raise ValueError(f"{v!r} must be a size like 50M (K, M or G)")
        return v

    @model_check
    def _element_hostname(self):
        if self.element.enabled and not self.element.hostname:
            raise ValueError("element.hostname is required when element.enabled is true")
        if self.admin_ui.enabled:
            if not self.admin_ui.hostname:
                raise ValueError("admin_ui.hostname is required when admin_ui.enabled is true")
            if not self.admin_api_allow:
                raise ValueError("admin_ui.enabled needs admin_api_allow: the UI is served only to those "
                                 "networks, and the browser calls the admin API from them")
        return self

    @property
    def hostname(self) -> str:
        return self.public_hostname or f"matrix.{self.server_name}"

    @property
    def slug(self) -> str:
        """A name safe for compose projects and container aliases."""
        return self.server_name.replace(".", "-")


class Acme(_Model, kw_only=True):
    # false: certificates are the operator's business (put them in certs/<server_name>/)
    enabled: bool = True
    email: Optional[str] = None
    directory: str = "staging"
    # PEM bundle that verifies the ACME server itself (a private CA).
    ca_bundle: Optional[Path] = None

    @field_check("email")
    @classmethod
    def _email(cls, v):
        if v is not None and not re.match(r"^[^@\s]+@[^@\s]+\.[^@\s]+$", v):
            raise ValueError(f"{v!r} is not an e-mail address")
        return v

    @field_check("directory")
    @classmethod
    def _directory(cls, v: str) -> str:
        if v in ACME_DIRECTORIES or v.startswith("https://"):
            return v
        raise ValueError("must be 'staging', 'production' or an https:// URL")

    @property
    def directory_url(self) -> str:
        return ACME_DIRECTORIES.get(self.directory, self.directory)


class Keep(_Model, kw_only=True):
    """How many snapshots restic's `forget` keeps (the newest of each day, week, month)."""

    daily: Annotated[int, Meta(ge=0, le=3650)] = 7
    weekly: Annotated[int, Meta(ge=0, le=520)] = 4
    monthly: Annotated[int, Meta(ge=0, le=1200)] = 12

    @model_check
    def _something(self):
        if not (self.daily or self.weekly or self.monthly):
            raise ValueError("keeping no snapshot at all would delete every backup: keep at least one")
        return self


class Backup(_Model, kw_only=True):
    """Where restic keeps the homeservers' snapshots (fabfile/backup.py)."""

    # Any restic repository: a directory on the host (the default: it survives an
    # uninstall and a broken upgrade, not the loss of the host), sftp:user@host:/path,
    # rest:https://host:8000/, s3:https://host/bucket, ... Credentials never go here.
    repository: str = "/var/backups/synapse-fabric/restic"
    keep: Keep = Keep()
    # A snapshot of every homeserver each day at this time (HH:MM, the host's clock),
    # then the retention; none: only `inv backup` makes snapshots.
    # (an int only as YAML 1.1 reads an unquoted 03:30: refused by its check, with a hint)
    schedule: Union[str, int, None] = None
    # `inv check` fails when a homeserver's newest snapshot is older than this
    # (with a schedule, or once a snapshot exists).
    stale_after_hours: Annotated[int, Meta(ge=1, le=24 * 365)] = 26

    @field_check("schedule")
    @classmethod
    def _schedule(cls, v):
        if isinstance(v, int):  # YAML 1.1 reads an unquoted 03:30 as the number 210
            raise ValueError("write the time in quotes, like '03:30' (YAML reads 03:30 unquoted as a number)")
        if v is not None and not re.match(r"^([01][0-9]|2[0-3]):[0-5][0-9]$", str(v)):
            raise ValueError(f"{v!r} must be a time of day like 03:30 (the host's clock)")
        return v

    @field_check("repository")
    @classmethod
    def _repository(cls, v: str) -> str:
        if not v or any(c.isspace() or ord(c) < 32 for c in v):
            raise ValueError(f"{v!r} is not a restic repository")
        if re.search(r"//[^/@]*:[^/@]*@", v):
            raise ValueError("the repository must not carry a password (the inventory holds no secret): "
                             "give the host its credentials in /etc/synapse-fabric/backup/env instead")
        if v.startswith("/") and (v.rstrip("/") in SYSTEM_DIRS or v.rstrip("/") == ""):
            raise ValueError(f"{v!r} is a system directory: choose one of its own, such as "
                             "/var/backups/synapse-fabric/restic")
        return v


class Ssh(_Model, kw_only=True):
    # known_hosts file to check host keys against (default: ~/.ssh/known_hosts).
    known_hosts: Optional[Path] = None
    # Accept and record the key of a host never seen before (like OpenSSH's
    # StrictHostKeyChecking=accept-new). A CHANGED key is always refused.
    accept_new_hosts: bool = False
    connect_timeout: Annotated[int, Meta(ge=1, le=300)] = 10
    # How long a run waits for another run on the same host to finish.
    lock_timeout: Annotated[int, Meta(ge=0, le=3600)] = 60


class Check(_Model, kw_only=True):
    # DNS server `inv check` asks (default: this machine's resolver).
    resolver: Optional[str] = None

    @field_check("resolver")
    @classmethod
    def _resolver(cls, v):
        return None if v is None else str(ipaddress.ip_address(v))


class Inventory(_Model, kw_only=True):
    """The whole hosts.yaml."""

    path: Path = Path("hosts.yaml")
    ssh: Ssh = Ssh()
    check: Check = Check()
    acme: Acme = Acme()
    backup: Backup = Backup()
    images: dict[str, str] = {}
    hosts: dict[str, Host]
    homeservers: dict[str, Homeserver] = {}

    @field_check("images")
    @classmethod
    def _images(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = set(v) - set(DEFAULT_IMAGES)
        if unknown:
            raise ValueError(
                f"unknown image key {sorted(unknown)[0]!r} (known: {', '.join(DEFAULT_IMAGES)})"
            )
        for key, ref in v.items():
            try:
                check_image(ref)
                if key == "postgres":
                    postgres_major(ref)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return {**DEFAULT_IMAGES, **v}

    def image(self, name: str) -> str:
        return self.images.get(name) or DEFAULT_IMAGES[name]

    def homeservers_on(self, host: str) -> list[Homeserver]:
        return [hs for hs in self.homeservers.values() if hs.host == host]

    def forwarded_from(self, host: str) -> list[Homeserver]:
        """Homeservers that left `host`, which still forwards their names."""
        return [hs for hs in self.homeservers.values() if hs.migrated_from == host]

    def with_homeserver(self, hs: Homeserver, **changes) -> "Inventory":
        """A copy with one homeserver changed (e.g. moved to another host)."""
        servers = dict(self.homeservers)
        servers[hs.server_name] = hs.replace(**changes)
        return self.replace(homeservers=servers)

    def host_by_name_or_address(self, wanted: str) -> Host:
        for host in self.hosts.values():
            if wanted in (host.name, host.address):
                return host
        raise InventoryError(
            f"{self.path}: no host named or addressed {wanted!r} "
            f"(known hosts: {', '.join(f'{h.name} ({h.address})' for h in self.hosts.values())})"
        )

    def homeserver(self, wanted: str) -> Homeserver:
        try:
            return self.homeservers[wanted.lower()]
        except KeyError:
            raise InventoryError(
                f"{self.path}: no homeserver {wanted!r} "
                f"(known: {', '.join(self.homeservers) or 'none'})"
            ) from None


def build(data: dict, path: Path) -> Inventory:
    """The Inventory that hosts.yaml's mapping (names and paths filled in) describes:
    msgspec's checks of shape and types, host by host and homeserver by homeserver
    (its messages name no mapping key), then every model's own. Raises ModelError
    for the first problem."""
    top = {k: v for k, v in data.items() if k not in ("hosts", "homeservers")}
    inv = convert({**top, "path": path, "hosts": {}}, Inventory, ())
    hosts = {name: convert(raw, Host, ("hosts", name)) for name, raw in data.get("hosts", {}).items()}
    servers = {name: convert(raw, Homeserver, ("homeservers", name))
               for name, raw in data.get("homeservers", {}).items()}
    return checked(inv.replace(hosts=hosts, homeservers=servers), {**data, "path": path}, ())
