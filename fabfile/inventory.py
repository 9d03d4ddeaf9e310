"""hosts.yaml -> a typed, validated Inventory (the models are in fabfile/schema.py).

Every problem in the file becomes ONE InventoryError whose message names the file,
the line, the key path and what is wrong, e.g.::

    hosts.yaml:14: homeservers.one.test.host: 'vps9' is not a host in this inventory
    (known hosts: vps1, vps2)

Paths inside the inventory (SSH keys, CA bundles) are relative to the file itself.
"""

from __future__ import annotations

import difflib
import functools
import os
from pathlib import Path
from typing import Any, Callable

import yaml

from .schema import (  # noqa: F401  (re-exported: the rest of fabfile imports them from here)
    ACME_DIRECTORIES,
    DEFAULT_IMAGES,
    NAME_RE,
    Acme,
    Element,
    Federation,
    Homeserver,
    Host,
    Inventory,
    InventoryError,
    build,
    check_domain,
)
from .structs import ModelError, field_types


# ---------------------------------------------------------------------------
# Loading and error reporting


# libyaml's parser where PyYAML has it (a no-op deploy of 20 hosts spent 35 ms in
# the pure-Python one); the same documents, the same errors
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Lines:
    """Key path -> line number, worked out when a message needs one: a valid
    inventory never pays for the second reading of its file."""

    def __init__(self, text: str):
        self._text = text

    @functools.cached_property
    def _map(self) -> dict[tuple, int]:
        return _line_map(self._text)

    def __contains__(self, loc: tuple) -> bool:
        return loc in self._map

    def __getitem__(self, loc: tuple) -> int:
        return self._map[loc]


def _line_map(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    try:
        walk(yaml.compose(text, Loader=_LOADER), ())
    except yaml.YAMLError:
        pass
    return lines


def _where(path: Path, lines: _Lines | dict[tuple, int], loc: tuple) -> str:
    loc = tuple(str(p) if not isinstance(p, int) else p for p in loc)
    while loc and loc not in lines:
        loc = loc[:-1]
    return f"{path}:{lines[loc]}" if loc in lines else str(path)


def _describe(err: ModelError) -> str:
    if err.unknown:
        known = [f for f in (field_types(err.model) if err.model else {}) if f not in ("name", "server_name", "path")]
        guess = difflib.get_close_matches(str(err.loc[-1]), known, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        return f"unknown key{hint} (known keys here: {', '.join(known)})"
    return str(err)


def load(path: str | Path) -> Inventory:
    """Read and validate an inventory file; raise InventoryError on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InventoryError(f"{path}: inventory file not found") from None
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read inventory: {exc.strerror}") from None
    return parse(text, path)


def parse(text: str, path: Path = Path("hosts.yaml")) -> Inventory:
    """Validate inventory text (as read from `path`); raise InventoryError."""
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise InventoryError(f"{where}: YAML syntax error: {problem}") from None
    lines = _Lines(text)
    if not isinstance(data, dict):
        raise InventoryError(f"{path}: the inventory must be a mapping with a 'hosts' key")
    for key in ("hosts", "homeservers"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise InventoryError(f"{_where(path, lines, (key,))}: {key}: must be a mapping of names to "
                                 f"{'hosts' if key == 'hosts' else 'homeservers'}")
        if isinstance(data.get(key), dict):
            for name, item in data[key].items():
                if item is not None and not isinstance(item, dict):
                    raise InventoryError(
                        f"{_where(path, lines, (key, name))}: {key}.{name}: must be a mapping"
                    )
    base = path.parent
    try:
        inv = build(_with_names_and_paths(data, base), path)
    except ModelError as err:
        dotted = ".".join(str(p) for p in err.loc) or "(top level)"
        raise InventoryError(f"{_where(path, lines, err.loc)}: {dotted}: {_describe(err)}") from None
    _cross_check(inv, path, lines)
    return inv


def _with_names_and_paths(data: dict, base: Path) -> dict:
    """Copy mapping keys into models (hosts.NAME.name, homeservers.DOMAIN.server_name)
    and resolve file paths relative to the inventory file."""
    data = dict(data)

    def rel(value):
        if value is None or not isinstance(value, str):
            return value
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    hosts = {}
    for name, host in (data.get("hosts") or {}).items():
        host = dict(host or {})
        host["name"] = str(name)
        if "key" in host:
            host["key"] = rel(host["key"])
        hosts[str(name)] = host
    data["hosts"] = hosts
    servers = {}
    for name, hs in (data.get("homeservers") or {}).items():
        hs = dict(hs or {})
        hs["server_name"] = str(name)
        fed = hs.get("federation")
        if isinstance(fed, dict) and "trusted_ca" in fed:
            hs["federation"] = {**fed, "trusted_ca": rel(fed["trusted_ca"])}
        pg = hs.get("postgres")
        if isinstance(pg, dict) and isinstance(pg.get("external"), dict) and "ca" in pg["external"]:
            hs["postgres"] = {**pg, "external": {**pg["external"], "ca": rel(pg["external"]["ca"])}}
        el = hs.get("element")
        if isinstance(el, dict):
            hs["element"] = {**el, **{k: rel(el[k]) for k in ("signing_key", "feed_ca") if k in el}}
        servers[str(name)] = hs
    data["homeservers"] = servers
    for section, key in (("acme", "ca_bundle"), ("ssh", "known_hosts")):
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section] = {**data[section], key: rel(data[section][key])}
    return data


def check(inv: Inventory) -> None:
    """The rules that span entries, for an inventory a task derives (what hosts.yaml
    would say after a move): InventoryError when it breaks one."""
    _cross_check(inv, inv.path, {})


def _cross_check(inv: Inventory, path: Path, lines: _Lines | dict) -> None:
    """Rules that span several entries."""

    def fail(loc: tuple, msg: str):
        dotted = ".".join(str(p) for p in loc)
        raise InventoryError(f"{_where(path, lines, loc)}: {dotted}: {msg}")

    for name in inv.hosts:
        if not NAME_RE.match(name):
            fail(("hosts", name), "host names are lower-case letters, digits, '-' and '_'")
    claimed: dict[str, str] = {}
    for key, hs in inv.homeservers.items():
        try:
            if check_domain(key) != key:
                raise ValueError(f"{key!r} must be written in lower case without a trailing dot")
        except ValueError as exc:
            fail(("homeservers", key), str(exc))
        if hs.host not in inv.hosts:
            fail(
                ("homeservers", key, "host"),
                f"{hs.host!r} is not a host in this inventory "
                f"(known hosts: {', '.join(inv.hosts) or 'none'})",
            )
        if hs.migrated_from is not None and (hs.migrated_from not in inv.hosts or hs.migrated_from == hs.host):
            fail(("homeservers", key, "migrated_from"),
                 f"{hs.migrated_from!r} must be another host of this inventory (known hosts: {', '.join(inv.hosts)})")
        via = hs.federation.via
        if via is not None:
            if via not in inv.hosts or via == hs.host:
                fail(("homeservers", key, "federation", "via"),
                     f"{via!r} must be another host of this inventory, with a public address (known hosts: "
                     f"{', '.join(inv.hosts)})")
            if hs.hostname == hs.server_name:
                fail(("homeservers", key, "federation", "via"),
                     f"the server_name {key!r} is served by {via}, so the homeserver needs a public_hostname "
                     "of its own for its clients")
            if hs.federation.delegation == "srv" or not hs.federation.enabled:
                fail(("homeservers", key, "federation", "via"),
                     "federation through another host is delegated by its .well-known (not SRV) and needs "
                     "federation enabled")
        names = [(("homeservers", key), hs.server_name), (("homeservers", key, "public_hostname"), hs.hostname)]
        for site in ("element", "admin_ui"):
            own = getattr(hs, site)
            if not own.enabled:
                continue
            if own.hostname in (hs.server_name, hs.hostname):
                fail(("homeservers", key, site, "hostname"),
                     f"{own.hostname!r} is already this homeserver's Matrix name; {site} needs its own")
            if site == "admin_ui" and hs.element.enabled and own.hostname == hs.element.hostname:
                fail(("homeservers", key, site, "hostname"), f"{own.hostname!r} is already Element's; the admin UI needs its own")
            names.append((("homeservers", key, site, "hostname"), own.hostname))
        for loc, name in names:
            owner = claimed.get(name)
            if owner is not None and owner != key:
                fail(loc, f"hostname {name!r} is already claimed by homeserver {owner!r}")
            claimed[name] = key
    for name, host in inv.hosts.items():
        owner = claimed.get(host.turn.hostname) if host.turn.enabled else None
        if owner is not None and inv.homeservers[owner].host != name:
            fail(("hosts", name, "turn", "hostname"),
                 f"{host.turn.hostname!r} is a name of homeserver {owner!r}, which runs on "
                 f"{inv.homeservers[owner].host}: TURN of {name} needs a name of its own or of a homeserver on {name}")
    # a.b-c.org and a-b.c.org share a compose project name (dots become '-'): on one
    # host, one tenant's stack would take over the other's
    slugs: dict[tuple[str, str], str] = {}
    for key, hs in inv.homeservers.items():
        other = slugs.get((hs.host, hs.slug))
        if other is not None:
            fail(("homeservers", key),
                 f"its compose project would be synapse-{hs.slug}, the same as {other!r}'s on host "
                 f"{hs.host!r}; put one of them on another host")
        slugs[(hs.host, hs.slug)] = key
    _check_worker_hosts(inv, fail)
    for key, hs in inv.homeservers.items():
        if hs.postgres.external and hs.workers.hosts:
            fail(("homeservers", key, "postgres", "external"),
                 "an external database with workers on other hosts is not supported yet: keep the workers "
                 "on the homeserver's host (remove workers.hosts)")
    _check_database_hosts(inv, fail)


def _check_database_hosts(inv: Inventory, fail) -> None:
    """postgres.host: a known host other than the homeserver's, both on one private
    network; not with an external server or workers elsewhere; and no chains (a
    database host converges before the homeserver's host, so it is neither one
    whose own database is elsewhere nor one running another host's workers)."""
    from . import workers as workers_mod
    worker_guests = {h for hs in inv.homeservers.values() for h in workers_mod.worker_hosts(hs)}
    for key, hs in inv.homeservers.items():
        where = hs.postgres.host
        if where is None:
            continue
        loc = ("homeservers", key, "postgres", "host")
        if where not in inv.hosts:
            fail(loc, f"{where!r} is not a host in this inventory (known hosts: {', '.join(inv.hosts)})")
        if where == hs.host:
            fail(loc, f"{where} is the homeserver's own host, where its database runs anyway: remove postgres.host")
        if hs.postgres.external:
            fail(loc, "a homeserver's database is either external or on an inventory host, not both")
        if hs.workers.hosts:
            fail(loc, "a database on another host with workers on other hosts is not supported yet: keep the "
                      "workers on the homeserver's host (remove workers.hosts)")
        for name in (hs.host, where):
            if inv.hosts[name].private_address is None:
                fail(("hosts", name), f"{key}'s database on {where} is reached over the private network: "
                                      f"{name} needs a private_address")
        if (":" in inv.hosts[hs.host].private_address) != (":" in inv.hosts[where].private_address):
            fail(loc, f"the private addresses of {hs.host} and {where} are not both IPv4 or both IPv6")
        if where in worker_guests:
            fail(loc, f"{where} runs workers of another host's homeserver; a database host may not (no chains)")
        if any(o.host == where and o.postgres.host for o in inv.homeservers.values()):
            fail(loc, f"{where} is the host of a homeserver whose own database is on another host (no chains)")
    # one compose project and one published port per database on a host
    ports: dict[tuple[str, int], str] = {}
    slugs: dict[tuple[str, str], str] = {}
    for key, hs in inv.homeservers.items():
        if hs.postgres.host:
            other = slugs.get((hs.postgres.host, hs.slug))
            if other is not None:
                fail(("homeservers", key, "postgres", "host"),
                     f"its database's compose project on {hs.postgres.host} would be postgres-{hs.slug}, the same "
                     f"as {other!r}'s there; put one of them on another host")
            slugs[(hs.postgres.host, hs.slug)] = key
            host = inv.hosts[hs.postgres.host]
            port = workers_mod.service_port(hs, "postgres")
            taken = set(host.firewall.ssh_ports or [host.port]) | set(host.firewall.open_tcp)
            if host.turn.enabled:
                taken |= {3478, 5349}
                low, high = host.turn.relay_range
                taken |= {port} if low <= port <= high else set()
            if port in taken:
                fail(("homeservers", key, "workers", "port_base"),
                     f"its database would be published on {hs.postgres.host} at port {port}, which that host "
                     "already uses (SSH, firewall.open_tcp or TURN): choose another port_base")
            slot = (hs.postgres.host, workers_mod.service_port(hs, "postgres"))
            if slot in ports:
                fail(("homeservers", key, "workers", "port_base"),
                     f"its database would be published on {slot[0]} at port {slot[1]}, like {ports[slot]}'s: "
                     f"choose another port_base (the database takes port_base)")
            ports[slot] = key
            for other, ohs in inv.homeservers.items():
                span = ohs.workers.port_base
                if (workers_mod.worker_hosts(ohs) and slot[0] in [ohs.host] + workers_mod.worker_hosts(ohs)
                        and span <= slot[1] < span + workers_mod.PORT_SPAN):
                    fail(("homeservers", key, "workers", "port_base"),
                         f"its database would be published on {slot[0]} at port {slot[1]}, among the ports of "
                         f"{other}'s processes there ({span}-{span + workers_mod.PORT_SPAN - 1}): choose another "
                         "port_base (the database takes port_base)")


def _check_worker_hosts(inv: Inventory, fail) -> None:
    """workers.hosts: known hosts with private addresses, kinds that have workers,
    no chains (a host running another host's workers has none of its own
    elsewhere), and port ranges that do not overlap on any host."""
    from . import workers as workers_mod
    spans: dict[str, list[tuple[int, str]]] = {}
    for key, hs in inv.homeservers.items():
        loc = ("homeservers", key, "workers", "hosts")
        want = workers_mod.counts(hs.workers)
        for kind, host in hs.workers.hosts.items():
            if host not in inv.hosts:
                fail(loc + (kind,), f"{host!r} is not a host in this inventory (known hosts: {', '.join(inv.hosts)})")
            if not want.get(kind):
                fail(loc + (kind,), f"this homeserver has no {kind} workers to place on {host}")
        away = workers_mod.worker_hosts(hs)
        if not away:
            continue
        for name in [hs.host] + away:
            if inv.hosts[name].private_address is None:
                fail(("hosts", name), f"runs processes of {key} that reach each other across hosts: it needs a "
                                      "private_address (its address on the private network they share)")
            spans.setdefault(name, []).append((hs.workers.port_base, key))
        families = {":" in inv.hosts[name].private_address for name in [hs.host] + away}
        if len(families) > 1:
            fail(loc, f"the private addresses of {', '.join([hs.host] + away)} are not all IPv4 or all IPv6")
    # a host's own stacks converge before the hosts that run its workers: no chains
    spanning = {hs.host: hs.server_name for hs in inv.homeservers.values() if workers_mod.worker_hosts(hs)}
    for key, hs in inv.homeservers.items():
        for host in workers_mod.worker_hosts(hs):
            if host in spanning:
                fail(("homeservers", key, "workers", "hosts"),
                     f"{host} is the host of {spanning[host]}, whose workers run on other hosts; a host runs "
                     "another homeserver's workers only when none of its own homeservers has workers elsewhere")
    for host, taken in spans.items():
        taken.sort()
        for (a, sa), (b, sb) in zip(taken, taken[1:]):
            if b < a + workers_mod.PORT_SPAN:
                fail(("homeservers", sb, "workers", "port_base"),
                     f"ports {b}-{b + workers_mod.PORT_SPAN - 1} overlap those of {sa} ({a}-"
                     f"{a + workers_mod.PORT_SPAN - 1}) on {host}: choose a port_base at least "
                     f"{workers_mod.PORT_SPAN} apart")


def rewrite(path: Path, change: Callable[[Any], None]) -> None:
    """Edit hosts.yaml as a document, keeping its comments and layout (ruamel.yaml),
    and write it atomically with its mode: what `inv migrate-host` and `inv
    uninstall` record in the operator's inventory."""
    import tempfile  # here, not at the top: the no-op path never writes

    from ruamel.yaml import YAML

    editor = YAML()
    editor.preserve_quotes = True
    doc = editor.load(path.read_text())
    change(doc)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            editor.dump(doc, fh)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
