"""`inv check`: look at the homeservers from outside, as a client or a remote
homeserver would, and say what is wrong. One row per check: OK or FAIL and why.

Names are resolved by the inventory's `check.resolver` (a DNS server address) or
the system resolver; TLS is verified against the homeserver's federation
`trusted_ca` when set (that is what remote servers trust), else the system roots.
Certificate verification is never turned off.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable, Optional

import dns.exception
import dns.resolver

from .inventory import Homeserver, Inventory
from .render import public_names

CLOSED_PORTS = (5432, 8008, 8009)
MIN_DAYS = 14


@dataclass
class Row:
    homeserver: str
    check: str
    ok: bool
    detail: str


class Prober:
    def __init__(self, inv: Inventory, hs: Homeserver):
        self.inv, self.hs = inv, hs
        self.ctx = ssl.create_default_context(
            cafile=str(hs.federation.trusted_ca) if hs.federation.trusted_ca else None
        )
        self.resolver = dns.resolver.Resolver(configure=inv.check.resolver is None)
        if inv.check.resolver:
            self.resolver.nameservers = [inv.check.resolver]
        self.resolver.lifetime = 5

    def resolve(self, name: str) -> list[str]:
        try:
            return sorted(rr.address for rr in self.resolver.resolve(name, "A"))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []

    def tls(self, name: str, port: int = 443, via: Optional[str] = None) -> tuple[ssl.SSLSocket, dict]:
        """TLS to `name` (its certificate checked for it), at the address of `via`
        when given (an SRV target) and of `name` otherwise."""
        ips = self.resolve(via or name)
        if not ips:
            raise OSError(f"{via or name} does not resolve")
        raw = socket.create_connection((ips[0], port), timeout=10)
        sock = self.ctx.wrap_socket(raw, server_hostname=name)
        return sock, sock.getpeercert()

    def source_address(self, name: str) -> Optional[str]:
        """This machine's address on the route to `name` (what the host sees,
        unless a NAT lies between)."""
        ips = self.resolve(name)
        if not ips:
            return None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ips[0], 443))  # UDP: picks the route, sends nothing
            return s.getsockname()[0]

    def srv(self, name: str) -> list[tuple[str, int]]:
        """The targets of SRV `name` in the order to try them (priority, then weight)."""
        try:
            answers = self.resolver.resolve(name, "SRV")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        return [(str(r.target).rstrip("."), r.port) for r in sorted(answers, key=lambda r: (r.priority, -r.weight))]

    def server_of(self, server_name: str) -> tuple[str, int, Optional[str], str]:
        """Where a remote homeserver sends federation requests for `server_name`, as
        Synapse resolves it: `.well-known/matrix/server` first, then SRV
        `_matrix-fed._tcp` (then the legacy `_matrix._tcp`), else port 8448.
        Returns (TLS name and Host, port, address to connect to or None, how)."""
        try:
            status, _, body = self.get(server_name, "/.well-known/matrix/server")
        except OSError:
            status, body = 0, b""
        delegated = _json(body).get("m.server") if status == 200 else None
        if delegated:
            name, _, port = delegated.partition(":")
            if port:
                return name, int(port), None, f"well-known {delegated}"
            server_name = name  # a delegated name without a port is resolved again by SRV
        for record in ("_matrix-fed._tcp", "_matrix._tcp"):
            try:
                targets = self.srv(f"{record}.{server_name}")
            except dns.exception.DNSException:
                targets = []
            if targets:
                target, port = targets[0]
                return server_name, port, target, f"SRV {record}.{server_name} -> {target}:{port}"
        return server_name, 8448, None, f"{server_name}:8448 (no well-known, no SRV)"

    def get(self, name: str, path: str, port: int = 443, via: Optional[str] = None) -> tuple[int, dict, bytes]:
        sock, _ = self.tls(name, port, via)
        conn = http.client.HTTPConnection(name, port, timeout=10)
        conn.sock = sock
        try:
            conn.request("GET", path, headers={"Host": name if port == 443 else f"{name}:{port}"})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body)
        return value if isinstance(value, dict) else {}
    except ValueError:
        return {}


def check_homeserver(inv: Inventory, hs: Homeserver) -> list[Row]:
    p = Prober(inv, hs)
    host = inv.hosts[hs.host]
    rows: list[Row] = []

    def row(check: str, fn: Callable[[], Optional[str]]) -> None:
        try:
            problem = fn()
        except (OSError, ssl.SSLError, dns.exception.DNSException, http.client.HTTPException) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        rows.append(Row(hs.server_name, check, problem is None, problem or ""))

    names = public_names(hs)

    for name in names:
        def dns_check(name=name):
            # the server_name of a homeserver whose federation another host serves points there
            owner = hs.federation.via if hs.federation.via and name == hs.server_name else hs.host
            at = inv.hosts[owner].address
            ips = p.resolve(name)
            if not ips:
                return "does not resolve"
            if _is_ip(at) and ips != [at]:
                return f"resolves to {', '.join(ips)}, not only to {owner} ({at})"
            return None
        row(f"DNS {name}", dns_check)

    for name in names:
        def cert_check(name=name):
            _, cert = p.tls(name)
            end = datetime.datetime.strptime(cert["notAfter"], "%b %d %H:%M:%S %Y %Z")
            days = (end - datetime.datetime.utcnow()).days
            if days < MIN_DAYS:
                return f"expires in {days} days"
            return None
        row(f"certificate {name}", cert_check)

    want_server = (f"{hs.server_name}:443" if hs.federation.via
                   else f"{hs.hostname}:{8448 if hs.federation.port_8448 else 443}")

    srv = hs.federation.delegation == "srv"

    def well_known_server():
        status, _, body = p.get(hs.server_name, "/.well-known/matrix/server")
        got = _json(body).get("m.server")
        if status != 200 or got != want_server:
            return f"HTTP {status}, m.server={got!r}, expected {want_server!r}"

    def srv_delegation():
        status, _, _ = p.get(hs.server_name, "/.well-known/matrix/server")
        if status == 200:
            return "a .well-known/matrix/server answers: servers use it before SRV"
        targets = p.srv(f"_matrix-fed._tcp.{hs.server_name}")
        want = want_server.split(":")
        if not targets or [targets[0][0], str(targets[0][1])] != want:
            got = ", ".join(f"{t}:{port}" for t, port in targets) or "no record"
            return (f"_matrix-fed._tcp.{hs.server_name} SRV: {got}, expected {want_server} "
                    f"(`inv dns` prints the record)")
    if hs.federation.enabled and srv:
        row("delegation by SRV", srv_delegation)
    else:
        row("well-known server", well_known_server)

    def well_known_client():
        status, headers, body = p.get(hs.server_name, "/.well-known/matrix/client")
        base = _json(body).get("m.homeserver", {}).get("base_url")
        if status != 200 or base != f"https://{hs.hostname}":
            return f"HTTP {status}, base_url={base!r}, expected 'https://{hs.hostname}'"
        if headers.get("access-control-allow-origin") != "*":
            return "no 'Access-Control-Allow-Origin: *' header (web clients cannot read it)"
    row("well-known client (+CORS)", well_known_client)

    def client_api():
        status, _, body = p.get(hs.hostname, "/_matrix/client/versions")
        if status != 200 or not _json(body).get("versions"):
            return f"HTTP {status} from /_matrix/client/versions"
    row("client API", client_api)

    if hs.federation.enabled:
        def federation():
            # as a remote server resolves it: well-known, then SRV, then :8448
            name, port, via, target = p.server_of(hs.server_name)
            status, _, body = p.get(name, "/_matrix/federation/v1/version", port, via)
            if status != 200 or "server" not in _json(body):
                return f"HTTP {status} from {target}/_matrix/federation/v1/version"
            status, _, body = p.get(name, "/_matrix/key/v2/server", port, via)
            keys = _json(body)
            if status != 200 or keys.get("server_name") != hs.server_name or not keys.get("verify_keys"):
                return f"server keys at {target}: HTTP {status}, server_name={keys.get('server_name')!r}"
        row("federation (version, keys)", federation)

    def admin_allowlist():
        # nginx answers 403 to an address admin_api_allow does not list; Synapse
        # answers server_version (200) to one it lets through. Which one this
        # machine is depends on the address the host sees (NAT may change it).
        status, _, _ = p.get(hs.hostname, "/_synapse/admin/v1/server_version")
        me = p.source_address(hs.hostname)
        listed = [n for n in hs.admin_api_allow if me and ipaddress.ip_address(me) in ipaddress.ip_network(n)]
        if listed and status != 200:
            return f"this machine ({me}) is in admin_api_allow ({listed[0]}) but the admin API answered HTTP {status}"
        if not listed and status == 200:
            return (f"the admin API answers this machine ({me}), which admin_api_allow does not list"
                    + (f" ({', '.join(hs.admin_api_allow)})" if hs.admin_api_allow else " (it is empty)"))
        if not listed and status != 403:
            return f"expected nginx's 403 for an address outside admin_api_allow, got HTTP {status}"
    row("admin API only from admin_api_allow", admin_allowlist)

    def ports_closed():
        open_ports = []
        for port in CLOSED_PORTS:
            with socket.socket() as s:
                s.settimeout(3)
                if s.connect_ex((_ip_of(p, host.address), port)) == 0:
                    open_ports.append(str(port))
        if open_ports:
            return f"port(s) {', '.join(open_ports)} answer on {host.address}"
    row("PostgreSQL/Synapse ports closed", ports_closed)
    return rows


def backup_rows(inv: Inventory, servers: list[Homeserver]) -> list[Row]:
    """The age of each homeserver's newest snapshot (asked on its host, over SSH):
    a FAIL past backup.stale_after_hours when backups are scheduled."""
    from . import backup

    now = time.time()
    rows = []
    for sn, snap in backup.newest(inv, servers).items():
        problem, said = backup.age_problem(inv, snap, now)
        rows.append(Row(sn, "newest backup snapshot", problem is None, problem or said))
    return rows


def turn_rows(inv: Inventory, servers: list[Homeserver]) -> list[Row]:
    """For each homeserver whose host runs coturn: credentials from Synapse's
    /voip/turnServer (asked on the host as synapse-fabric's admin, over SSH), then a
    real relay allocated with them from this machine, over UDP (3478) and over TLS
    (5349, the certificate checked against the name)."""
    from . import admin, turn
    from .remote import session
    from .errors import SfabError

    rows = []
    for hs in servers:
        host = inv.hosts[hs.host]
        if not host.turn.enabled:
            continue
        creds, problems = None, []
        for _ in range(2):  # once more after a failure: a container restarting is not a broken TURN
            try:
                with session(inv, host) as remote:
                    creds = admin.call(remote, hs, "GET", "/_matrix/client/v3/voip/turnServer")
                break
            except SfabError as exc:
                problems.append(" | ".join(line.strip() for line in str(exc).splitlines() if line.strip())[-400:])
                time.sleep(2)
        if creds is None:
            rows.append(Row(hs.server_name, "TURN credentials from Synapse", False, " ; then: ".join(problems)))
            continue
        uris = creds.get("uris") or []
        rows.append(Row(hs.server_name, "TURN credentials from Synapse", bool(uris and creds.get("password")),
                        "" if uris else "Synapse hands out no TURN server (turn_uris)"))
        p = Prober(inv, hs)
        for uri, tls in (next((u for u in uris if u.startswith("turn:") and u.endswith("transport=udp")), None), False), \
                        (next((u for u in uris if u.startswith("turns:") and u.endswith("transport=tcp")), None), True):
            if uri is None:
                continue
            name, port = uri.split(":", 1)[1].split("?")[0].rsplit(":", 1)
            try:
                ips = p.resolve(name)
                if not ips:
                    raise OSError(f"{name} does not resolve")
                relayed = turn.allocate(ips[0], int(port), creds["username"], creds["password"],
                                        tls=(p.ctx, name) if tls else None)
                rows.append(Row(hs.server_name, f"TURN relay allocated ({uri})", True, f"relay {relayed[0]}:{relayed[1]}"))
            except Exception as exc:  # noqa: BLE001 - any failure is the row's answer
                rows.append(Row(hs.server_name, f"TURN relay allocated ({uri})", False,
                                f"{type(exc).__name__}: {exc}"))
    return rows


# For each kind of worker nginx routes to: a request anyone may send (no token:
# Synapse answers 401 where one is needed, and logs it all the same).
WORKER_PROBES = {
    "sync": "/_matrix/client/v3/sync",
    "client": "/_matrix/client/versions",
    "media": "/_matrix/client/v1/media/config",
    "stream_writer": "/_matrix/client/v3/pushrules/",
    "federation_reader": "/_matrix/federation/v1/version",
}


def worker_rows(inv: Inventory, servers: list[Homeserver]) -> list[Row]:
    """For each homeserver with workers: every worker's container is healthy (asked
    on its host), and a request for each routed kind, sent from here through nginx
    with a unique marker, is in the access log of a worker of that kind (the log
    line names the worker: its listener's tag). One SSH connection per host of a
    homeserver's workers (fabfile/scripts/worker-facts.sh)."""
    import secrets

    from . import workers as workers_mod
    from .errors import SfabError
    from .remote import session
    from .render import guest_project, synapse_project
    from .shell import program

    rows = []
    for hs in servers:
        ws = workers_mod.placed(hs)
        if not ws:
            continue
        p = Prober(inv, hs)
        sent = {}
        for kind, path in WORKER_PROBES.items():
            if kind == "federation_reader" and not hs.federation.enabled:
                continue
            if any(w.kind == kind for w in ws):
                marker = f"sfab-check-{secrets.token_hex(6)}"
                try:
                    status = p.get(hs.hostname, f"{path}?{marker}=1")[0]
                    sent[kind] = (marker, status)
                except OSError as exc:
                    rows.append(Row(hs.server_name, f"{kind} request reaches a {kind} worker", False, str(exc)))
        out = ""
        for host in dict.fromkeys(w.host for w in ws):
            here = [w for w in ws if w.host == host]
            script = program("worker-facts.sh",
                             project=synapse_project(hs) if host == hs.host else guest_project(hs),
                             workers=" ".join(w.name for w in here),
                             http=" ".join(w.name for w in here if w.serves_http))
            try:
                with session(inv, inv.hosts[host]) as remote:
                    out += remote.run(script, what=f"{hs.server_name}: workers on {host}").out
            except SfabError as exc:
                rows.append(Row(hs.server_name, f"workers on {host}", False, str(exc).splitlines()[0]))
        health, seen = {}, {}
        for line in out.splitlines():
            kind_, name, value = (line.split("\t") + ["", ""])[:3]
            if kind_ == "W":
                health[name] = value
            elif kind_ == "L":
                seen[value] = name
        for w in ws:
            state = health.get(w.name) or "absent"
            where = "" if w.host == hs.host else f" (on {w.host})"
            rows.append(Row(hs.server_name, f"worker {w.name} healthy", state == "healthy", state + where))
        for kind, (marker, status) in sent.items():
            who = seen.get(marker)
            good = who is not None and any(w.name == who and w.kind == kind for w in ws)
            rows.append(Row(hs.server_name, f"{kind} request reaches a {kind} worker", good,
                            f"served by {who} (HTTP {status})" if who else f"no {kind} worker logged it (HTTP {status})"))
    return rows


def _is_ip(value: str) -> bool:
    try:
        socket.inet_aton(value)
        return value.count(".") == 3
    except OSError:
        return False


def _ip_of(p: Prober, address: str) -> str:
    return address if _is_ip(address) else (p.resolve(address) or [address])[0]


def format_rows(rows: list[Row]) -> str:
    width = max((len(r.check) for r in rows), default=10)
    out = []
    for r in rows:
        mark = "OK  " if r.ok else "FAIL"
        out.append(f"{mark} {r.homeserver:<14} {r.check:<{width}}  {r.detail}".rstrip())
    failed = sum(not r.ok for r in rows)
    out.append(f"{len(rows)} checks, {failed} failed")
    return "\n".join(out)
