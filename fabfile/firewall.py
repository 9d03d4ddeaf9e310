"""The host firewall: what a host lets in from outside (hosts.yaml `firewall`).

Pure: the open ports follow from the inventory (SSH, 80 and 443, 8448 when a
homeserver on the host serves it, TURN when the host runs coturn, the operator's
extra ports and networks) and render as iptables-restore input for IPv4 and IPv6.
fabfile/scripts/firewall.sh loads them on the host and hooks them into INPUT and
DOCKER-USER, so Docker's published ports obey them too (ufw alone does not stop
Docker). A deploy refuses a firewall that would close a port sshd listens on.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .errors import InventoryError
from .inventory import Inventory
from .layout import FIREWALL_DIR

WEB = (80, 443)
TURN = (3478, 5349)  # coturn: TURN/STUN, and TURN over TLS (fabfile/turn.py)


@dataclass(frozen=True)
class Openings:
    tcp: tuple[int, ...]
    udp: tuple[int, ...]
    relay: tuple[int, int] | None  # coturn's UDP relay range
    allow_from: tuple[str, ...]
    # (source address, port): what one homeserver's processes on other hosts reach
    # here (workers.hosts), open to those hosts' private addresses only
    peers: tuple[tuple[str, int], ...] = ()


def openings(inv: Inventory, host_name: str) -> Openings:
    """What the firewall of `host_name` lets in."""
    host = inv.hosts[host_name]
    fw = host.firewall
    served = inv.homeservers_on(host_name) + inv.forwarded_from(host_name)
    tcp = set(fw.ssh_ports or [host.port]) | set(fw.open_tcp)
    if fw.public_web:
        tcp |= set(WEB)
        if any(hs.federation.enabled and hs.federation.port_8448 for hs in served):
            tcp.add(8448)
    udp = set(fw.open_udp)
    relay = None
    if host.turn.enabled:
        tcp |= set(TURN)
        udp |= set(TURN)
        relay = host.turn.relay_range
    from . import workers  # (workers.py imports nothing of this module)
    peers = set()
    for hs in inv.homeservers.values():
        ports = [port for port, _ in workers.published(hs, host_name).values()]
        sources = [inv.hosts[h].private_address for h in workers.peers(hs, host_name)]
        peers |= {(src, port) for src in sources if src for port in ports}
    return Openings(tuple(sorted(tcp)), tuple(sorted(udp)), relay, tuple(fw.allow_from), tuple(sorted(peers)))


def rules_path(family: int) -> str:
    return f"{FIREWALL_DIR}/rules.v{family}"


PROGRAM = f"{FIREWALL_DIR}/firewall.sh"


def rules(render, host, opened: Openings, family: int) -> bytes:
    """iptables-restore input of one address family (`render`: a template renderer)."""
    nets = [n for n in opened.allow_from if ipaddress.ip_network(n).version == family]
    peers = [(src, port) for src, port in opened.peers if ipaddress.ip_address(src).version == family]
    return render("firewall/rules.j2", host=host, family=family, tcp=opened.tcp, udp=opened.udp,
                  relay=opened.relay, allow_from=nets, peers=peers)


def check_ssh(inv: Inventory, host_name: str, sshd_ports: list[int]) -> None:
    """Refuse a firewall that would lock out SSH: every port sshd listens on must be open."""
    host = inv.hosts[host_name]
    if not host.firewall.enabled or not sshd_ports:
        return
    opened = openings(inv, host_name)
    closed = sorted(set(sshd_ports) - set(opened.tcp))
    if closed:
        raise InventoryError(
            f"{inv.path}: hosts.{host_name}.firewall would close the SSH port(s) "
            f"{', '.join(map(str, closed))} that sshd on {host_name} listens on (open: "
            f"{', '.join(map(str, opened.tcp))}); add them to hosts.{host_name}.firewall.ssh_ports")
