"""The Synapse image a homeserver runs changes only through `inv upgrade`.

Synapse migrates its database forward when a new version starts, and an older
version cannot run on the migrated schema: swapping the image without a dump
taken first leaves no way back. So a deploy keeps the image a homeserver's Synapse
runs (a fact) when the inventory names another, and says so; `inv upgrade`
(fabfile/upgrade.py) moves it, after a dump, with a rollback. A homeserver with no
Synapse container yet gets the inventory's image.
"""

from __future__ import annotations

from .facts import Facts
from .render import DesiredState, synapse_project


def keep_synapse(state: DesiredState, facts: Facts,
                 pins: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """({server_name: Synapse image}, notes for the operator): the running image of
    each homeserver whose inventory image differs, and `pins` (what an upgrade or
    its rollback sets) as they are."""
    keep = dict(pins or {})
    notes = []
    for hs in state.homeservers:
        sn = hs.server_name
        if sn in keep:
            continue
        running = facts.container_image(synapse_project(hs), "synapse")
        wanted = state.synapse_image(hs)
        if running and running != wanted:
            keep[sn] = running
            notes.append(f"{sn}: keeps running {running}; the inventory asks for {wanted}: "
                         f"`inv upgrade --homeserver {sn}` moves it (a database dump first, a rollback if it fails)")
    return keep, notes
