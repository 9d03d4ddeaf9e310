"""Workers of a homeserver on hosts other than its own (homeservers.<sn>.workers.hosts).

Such a host runs them in `synapse-workers/<sn>` with copies of what every Synapse
process of the homeserver reads: the files Synapse's `generate` wrote (signing
key, generated secrets) and the secrets made on its own host (database password,
replication secret, Redis's password). The copies are read on its host over SSH
(fabfile/scripts/guest-copies.sh), kept in memory, and written like any other
file (atomically, 0400/0600, never shown in a diff); render.py lays them out.
"""

from __future__ import annotations

import base64

from . import workers as workers_mod
from .errors import RemoteError
from .inventory import Homeserver, Inventory
from .layout import Layout
from .remote import session
from .render import synapse_project
from .shell import program


def read_copies(inv: Inventory, hs: Homeserver) -> dict:
    """What hosts running `hs`'s workers copy, read on its own host:
    {"files": {name: bytes}, "image": the Synapse image its main runs}."""
    host = inv.hosts[hs.host]
    lay = Layout(host.base_dir)
    turn = lay.turn_secret if host.turn.enabled else ""
    with session(inv, host) as remote:
        out = remote.run(program("guest-copies.sh", data=lay.data(hs.server_name), secrets=lay.secrets(hs.server_name),
                                 server_name=hs.server_name, turn_secret=turn, project=synapse_project(hs)),
                         what=f"{hs.server_name}: read what its workers elsewhere need").out
    copies: dict = {"files": {}, "image": ""}
    for line in out.splitlines():
        kind, _, rest = line.partition("\t")
        if kind == "F":
            name, _, data = rest.partition("\t")
            copies["files"][name] = base64.b64decode(data)
        elif kind == "I":
            copies["image"] = rest.strip()
    return copies


def hosted_here(inv: Inventory, host_name: str) -> list[Homeserver]:
    """The homeservers of other hosts whose workers `host_name` runs."""
    return [hs for hs in inv.homeservers.values() if host_name in workers_mod.worker_hosts(hs)]


def copies_for(inv: Inventory, host_name: str) -> dict[str, dict]:
    """render_host's `guest_copies` for `host_name`; a clear error when a homeserver's
    own host cannot give them."""
    out = {}
    for hs in hosted_here(inv, host_name):
        try:
            out[hs.server_name] = read_copies(inv, hs)
        except RemoteError as exc:
            raise RemoteError(f"{host_name}: runs workers of {hs.server_name}, whose files on {hs.host} "
                              f"could not be read: {exc}") from None
    return out
