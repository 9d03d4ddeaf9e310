"""What `inv adopt` makes of a homeserver set up by hand (pure: no SSH).

- `find_synapse`: among a host's containers (`docker inspect`), the Synapse that
  serves a server_name, and where its config and data are on the host;
- `classify`: the old homeserver.yaml's settings sorted into those kept (they stay
  in the adopted homeserver.yaml), those replaced (synapse-fabric's conf.d and
  layout set them) and those carried into hosts.yaml (the inventory is their one
  source from then on);
- `adopted_config`: the old homeserver.yaml's text with only those keys changed,
  its comments and order kept (ruamel.yaml).
"""

from __future__ import annotations

import io
import posixpath
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urlsplit

from .errors import TaskError

# Set by conf.d/50-synapse-fabric.yaml or by the layout whatever the old value was.
REPLACED = ("listeners", "database", "serve_server_wellknown", "report_stats", "signing_key_path",
            "media_store_path", "log_config", "pid_file")
# Expressed in hosts.yaml (where their value fits its schema; else synapse_settings).
CARRIED = ("public_baseurl", "max_upload_size", "enable_registration", "registration_requires_token",
           "enable_registration_without_verification", "federation_domain_whitelist", "ip_range_whitelist",
           "trusted_key_servers")
SIZE_RE = re.compile(r"^[1-9][0-9]*[KMG]$")
SYNAPSE_IMAGE = re.compile(r"(^|/)(synapse|matrix-synapse)(:|@|$)")
LOG_CONFIG = """\
# Written by synapse-fabric when it adopted this homeserver: Synapse logs to the
# container's output (`inv logs` reads it), as every managed homeserver does.
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  console:
    class: logging.StreamHandler
    formatter: precise
loggers:
  synapse.storage.SQL:
    level: INFO
root:
  level: INFO
  handlers: [console]
disable_existing_loggers: false
"""


class AdoptError(TaskError):
    """What was found cannot be adopted as it is; the message says why (exit 2)."""


@dataclass(frozen=True)
class Mount:
    source: str       # on the host
    destination: str  # in the container


@dataclass
class OldSynapse:
    """A hand-made Synapse container and where its things are on the host."""

    container: str            # name
    image: str
    project: str              # its compose project ("" for `docker run`)
    workdir: str              # its compose file's directory ("")
    restart: str              # its restart policy
    mounts: list[Mount]
    config_in_container: str
    cwd: str                  # the container's working directory (relative paths)
    networks: dict[str, list[str]]  # network -> aliases
    auto_remove: bool = False  # `docker run --rm`: something else (a systemd unit) runs it

    def host_path(self, path: str) -> Optional[str]:
        """A container path on the host (through the mount holding it), or None."""
        if not posixpath.isabs(path):
            path = posixpath.normpath(posixpath.join(self.cwd or "/", path))
        best = None
        for m in self.mounts:
            d = m.destination.rstrip("/") or "/"
            if path == d or path.startswith(d.rstrip("/") + "/"):
                if best is None or len(d) > len(best.destination):
                    best = m
        if best is None:
            return None
        return best.source.rstrip("/") + path[len(best.destination.rstrip("/")):]

    @property
    def data_mount(self) -> Optional[Mount]:
        """The mount holding homeserver.yaml: its directory comes over whole."""
        found = [m for m in self.mounts if self.config_in_container.startswith(m.destination.rstrip("/") + "/")]
        return max(found, key=lambda m: len(m.destination)) if found else None


def _config_path(cmd: list[str], env: dict[str, str]) -> str:
    for i, arg in enumerate(cmd):
        if arg in ("-c", "--config-path") and i + 1 < len(cmd):
            return cmd[i + 1]
        if arg.startswith("--config-path="):
            return arg.split("=", 1)[1]
    if env.get("SYNAPSE_CONFIG_PATH"):
        return env["SYNAPSE_CONFIG_PATH"]
    return f"{env.get('SYNAPSE_CONFIG_DIR', '/data').rstrip('/')}/homeserver.yaml"


def synapse_containers(inspects: list[dict], managed_projects: set[str], compose_file: str = "",
                       data: str = "") -> list[OldSynapse]:
    """The Synapse containers of `docker inspect` output that synapse-fabric does not
    manage; with `compose_file`, only that compose project's; with `data`, only one
    mounting that directory."""
    found = []
    for c in inspects:
        cfg = c.get("Config") or {}
        labels = cfg.get("Labels") or {}
        project = labels.get("com.docker.compose.project", "")
        if project in managed_projects or not SYNAPSE_IMAGE.search(cfg.get("Image", "").split("@")[0]):
            continue
        if compose_file:
            files = labels.get("com.docker.compose.project.config_files", "")
            wd = labels.get("com.docker.compose.project.working_dir", "")
            wanted = posixpath.normpath(compose_file)
            if wanted not in [posixpath.normpath(f) for f in files.split(",") if f] and wanted != wd \
                    and posixpath.dirname(wanted) != wd:
                continue
        mounts = [Mount(m.get("Source", ""), m.get("Destination", "")) for m in c.get("Mounts") or []]
        if data and posixpath.normpath(data) not in [posixpath.normpath(m.source) for m in mounts]:
            continue
        env = dict(e.split("=", 1) for e in cfg.get("Env") or [] if "=" in e)
        nets = {name: list(n.get("Aliases") or []) for name, n in
                ((c.get("NetworkSettings") or {}).get("Networks") or {}).items()}
        found.append(OldSynapse(
            container=c.get("Name", "").lstrip("/"), image=cfg.get("Image", ""), project=project,
            workdir=labels.get("com.docker.compose.project.working_dir", ""),
            restart=((c.get("HostConfig") or {}).get("RestartPolicy") or {}).get("Name", "") or "no",
            mounts=mounts, config_in_container=_config_path(list(cfg.get("Cmd") or []), env),
            cwd=cfg.get("WorkingDir") or "/", networks=nets,
            auto_remove=bool((c.get("HostConfig") or {}).get("AutoRemove"))))
    return found


def database_container(inspects: list[dict], syn: OldSynapse, db_host: str) -> Optional[str]:
    """The container that answers to `db_host` (the database host in homeserver.yaml)
    on a network it shares with Synapse: its compose service, alias or name."""
    for c in inspects:
        name = c.get("Name", "").lstrip("/")
        if name == syn.container:
            continue
        labels = (c.get("Config") or {}).get("Labels") or {}
        nets = ((c.get("NetworkSettings") or {}).get("Networks") or {})
        for net, n in nets.items():
            if net not in syn.networks:
                continue
            names = {name, *(n.get("Aliases") or [])}
            if labels.get("com.docker.compose.project") == syn.project and syn.project:
                names.add(labels.get("com.docker.compose.service", ""))
            if db_host in names:
                return name
    return None


@dataclass
class Settings:
    kept: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    carried: dict[str, Any] = field(default_factory=dict)        # hosts.yaml fields
    operator: dict[str, Any] = field(default_factory=dict)       # into synapse_settings
    notes: list[str] = field(default_factory=list)


def _size(value: Any) -> Optional[str]:
    if isinstance(value, int) and value > 0:
        for unit, n in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
            if value % n == 0:
                return f"{value // n}{unit}"
        return None
    text = str(value).strip().upper()
    return text if SIZE_RE.match(text) else None


def also_replaced(trusted_ca: bool, turn: bool) -> set[str]:
    """Keys conf.d sets only for some homeservers: the federation roots when hosts.yaml
    names a trusted_ca, the TURN settings when the target host runs coturn. Else
    the old values stay (the files they name come along with the data directory)."""
    return ({"federation_custom_ca_list"} if trusted_ca else set()) | (
        {"turn_uris", "turn_shared_secret", "turn_shared_secret_path", "turn_user_lifetime", "turn_allow_guests"}
        if turn else set())


def classify(config: dict[str, Any], server_name: str, extra: set[str] = frozenset()) -> Settings:
    """Sort the old settings (see the module's docstring); `extra`: also_replaced()."""
    s = Settings()
    if config.get("server_name") != server_name:
        raise AdoptError(f"its homeserver.yaml says server_name {config.get('server_name')!r}, not {server_name!r}")
    for key in config:
        if key in REPLACED or key in extra:
            s.replaced.append(key)
        elif key not in CARRIED:
            s.kept.append(key)
    url = config.get("public_baseurl")
    if url:
        host = urlsplit(str(url)).hostname or ""
        if host and host != f"matrix.{server_name}":
            s.carried["public_hostname"] = host
    if "max_upload_size" in config:
        size = _size(config["max_upload_size"])
        if size:
            s.carried["max_upload_size"] = size
        else:
            s.operator["max_upload_size"] = config["max_upload_size"]
    reg = bool(config.get("enable_registration"))
    if reg and config.get("registration_requires_token"):
        s.carried["registration"] = "token"
    elif reg and config.get("enable_registration_without_verification"):
        s.carried["registration"] = "open"
    elif reg:  # with e-mail or captcha verification: not in the schema, kept as it was
        for key in ("enable_registration", "enable_registration_without_verification", "registration_requires_token"):
            if key in config:
                s.operator[key] = config[key]
    fed: dict[str, Any] = {}
    if "federation_domain_whitelist" in config and config["federation_domain_whitelist"] is not None:
        domains = list(config["federation_domain_whitelist"])
        if domains:
            fed["allow_domains"] = domains
        else:
            fed["enabled"] = False
    if config.get("ip_range_whitelist"):
        fed["allow_ip_ranges"] = list(config["ip_range_whitelist"])
    if "trusted_key_servers" in config and config["trusted_key_servers"] is not None:
        fed["trusted_key_servers"] = list(config["trusted_key_servers"])
    if fed:
        s.carried["federation"] = fed
    if s.operator:
        s.carried["synapse_settings"] = dict(s.operator)
    db = config.get("database") or {}
    if db.get("allow_unsafe_locale"):
        s.notes.append("database.allow_unsafe_locale is dropped: the adopted database has C collation")
    return s


def rewrite_prefix(value: Any, old: str, new: str) -> Any:
    """Every string under `old` (a container directory) moved under `new`."""
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old.rstrip("/") + "/") else value
    if isinstance(value, list):
        for i, v in enumerate(value):
            value[i] = rewrite_prefix(v, old, new)
        return value
    if isinstance(value, dict):
        for k in list(value):
            value[k] = rewrite_prefix(value[k], old, new)
        return value
    return value


def adopted_config(text: str, server_name: str, settings: Settings, data_in_container: str,
                   header: str) -> tuple[str, list[str]]:
    """The old homeserver.yaml for its new home under /data: replaced and carried keys
    removed (conf.d and hosts.yaml set them), the layout's paths set, paths under the
    old data directory moved under /data, a registration secret added when it had
    none (`inv register-user` needs one). Returns (text, notes)."""
    from ruamel.yaml import YAML

    editor = YAML()
    editor.preserve_quotes = True
    doc = editor.load(text)
    notes = []
    for key in list(doc):
        if key in REPLACED or key in CARRIED or key in settings.replaced:
            del doc[key]
    if data_in_container.rstrip("/") != "/data":
        for key in list(doc):
            doc[key] = rewrite_prefix(doc[key], data_in_container, "/data")
    if not doc.get("registration_shared_secret") and not doc.get("registration_shared_secret_path"):
        doc["registration_shared_secret"] = secrets.token_urlsafe(32)
        notes.append("registration_shared_secret added (it had none; `inv register-user` uses it)")
    doc["signing_key_path"] = f"/data/{server_name}.signing.key"
    doc["media_store_path"] = "/data/media_store"
    doc["log_config"] = f"/data/{server_name}.log.config"
    doc["pid_file"] = "/data/homeserver.pid"
    out = io.StringIO()
    editor.dump(doc, out)
    return header + out.getvalue(), notes


def inventory_entry(host: str, settings: Settings) -> dict[str, Any]:
    """The hosts.yaml entry of an adopted homeserver no entry existed for."""
    return {"host": host, **settings.carried}
