"""TURN for calls: coturn on a host (hosts.yaml `hosts.NAME.turn`) for the
homeservers it runs.

One coturn per host, in the reverse-proxy stack on the host's network. One shared
secret per host, made on the host (never in the inventory, argv or logs): coturn's
`static-auth-secret` and every Synapse's `turn_shared_secret_path` read the same
file. Synapse hands clients time-limited credentials from it
(`/_matrix/client/v3/voip/turnServer`); TLS on 5349 uses the certificate of the
homeserver whose names include the TURN hostname. `inv check` asks Synapse for
credentials and allocates a relay with them (turn_rows).
"""

from __future__ import annotations

from dataclasses import dataclass

from .inventory import Homeserver, Inventory
from .layout import SYNAPSE_UID, Layout
from .shell import program

SERVICE = "coturn"  # its service in the reverse-proxy stack


@dataclass(frozen=True)
class Turn:
    hostname: str
    cert_name: str  # the homeserver whose certificate coturn serves
    relay: tuple[int, int]
    secret: str  # the shared secret's path on the host

    @property
    def uris(self) -> list[str]:
        h = self.hostname
        return [f"turns:{h}:5349?transport=udp", f"turns:{h}:5349?transport=tcp",
                f"turn:{h}:3478?transport=udp", f"turn:{h}:3478?transport=tcp"]


def settings(inv: Inventory, host_name: str, servers: list[Homeserver], cert_names) -> Turn | None:
    """The TURN server of `host_name`, or None when it runs none. Its TLS certificate
    is that of the homeserver on this host whose names include turn.hostname, or
    else one of its own (the name points at this host and stays when homeservers
    move away)."""
    host = inv.hosts[host_name]
    if not host.turn.enabled:
        return None
    name = host.turn.hostname
    owner = next((hs for hs in servers if name in cert_names(hs)), None)
    return Turn(name, owner.server_name if owner else name, host.turn.relay_range,
                Layout(host.base_dir).turn_secret)


def secret_script(lay: Layout) -> str:
    """Shell: the shared secret, made once on the host (fabfile/scripts/turn-secret.sh)."""
    return program("turn-secret.sh", file=lay.turn_secret, gid=SYNAPSE_UID.split(":")[1])


def allocate(address: str, port: int, username: str, password: str, tls=None, timeout: float = 10.0):
    """A real TURN allocation on coturn at address:port with Synapse's credentials:
    over UDP, or over TLS when `tls` is (ssl_context, server_hostname). Returns the
    relayed (address, port) coturn allocated, then releases it."""
    import asyncio

    from aioice.turn import TurnClientTcpProtocol, TurnClientUdpProtocol

    async def go():
        loop = asyncio.get_running_loop()
        args = dict(username=username, password=password, lifetime=60, channel_refresh_time=50)
        if tls:
            ctx, name = tls
            transport, protocol = await asyncio.wait_for(loop.create_connection(
                lambda: TurnClientTcpProtocol((address, port), **args), host=address, port=port,
                ssl=ctx, server_hostname=name), timeout)
        else:
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: TurnClientUdpProtocol((address, port), **args), remote_addr=(address, port))
        try:
            relayed = await asyncio.wait_for(protocol.connect(), timeout)
            await asyncio.wait_for(protocol.delete(), timeout)
            return relayed
        finally:
            transport.close()

    return asyncio.run(go())
