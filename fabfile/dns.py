"""The DNS records the inventory needs, as zone-file lines (`inv dns`): an A (or
AAAA, or CNAME for a host known by name) record for every public name of each
homeserver, pointing at its host, and for a homeserver delegated by SRV its
`_matrix-fed._tcp` record; a TURN name of its own, pointing at its host. Pure: it reads hosts.yaml, asks no DNS server."""

from __future__ import annotations

import ipaddress

from .inventory import Inventory
from .render import public_names

TTL = 3600


def records(inv: Inventory) -> list[str]:
    lines = []
    for sn, hs in sorted(inv.homeservers.items()):
        lines.append(f"; {sn} (on {hs.host}" + (f", federation through {hs.federation.via})"
                                                 if hs.federation.via else ")"))
        for name in public_names(hs):
            # the server_name of a homeserver whose federation another host serves points there
            host = hs.federation.via if hs.federation.via and name == sn else hs.host
            lines.append(f"{name}. {TTL} IN {_record(inv.hosts[host].address)}")
        if hs.federation.enabled and hs.federation.delegation == "srv":
            port = 8448 if hs.federation.port_8448 else 443
            lines.append(f"_matrix-fed._tcp.{sn}. {TTL} IN SRV 10 5 {port} {hs.hostname}.")
    for name, host in sorted(inv.hosts.items()):
        if host.turn.enabled and not any(host.turn.hostname in public_names(hs) for hs in inv.homeservers_on(name)):
            lines.append(f"; TURN of {name}")
            lines.append(f"{host.turn.hostname}. {TTL} IN {_record(host.address)}")
    return lines


def _record(address: str) -> str:
    try:
        return f"{'AAAA' if ipaddress.ip_address(address).version == 6 else 'A'} {address}"
    except ValueError:
        return f"CNAME {address}."
