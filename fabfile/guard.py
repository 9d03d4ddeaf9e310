"""What the host knows decides what a deploy may do (not only the operator's hosts.yaml).

A host records the homeservers it handed over (`inv migrate-host`) in
`<base>/.synapse-fabric/handed-over/<server_name>`, keeps the state of a migration
in progress in `synapse/<server_name>/.migration`, and holds a stack for every
homeserver it serves. A deploy from a stale hosts.yaml (a colleague's copy, an old
checkout, a run killed before the inventory was edited) must not start a second
copy of a homeserver, nor drop one the host still serves: it stops with a message
instead.
"""

from __future__ import annotations

from .facts import Facts
from .render import DesiredState
from .schema import InventoryError


class StaleInventory(InventoryError):
    """hosts.yaml disagrees with what a host says it holds."""


def check(state: DesiredState, facts: Facts, inventory_path, migrating: str = "") -> None:
    """Raise StaleInventory when converging `state` would start a homeserver the host
    handed over or is handing over, or abandon one it still serves. `migrating`: the
    homeserver a migration is moving (its own converges pass)."""
    host = state.host.name
    problems = []
    wanted = {hs.server_name for hs in state.homeservers}
    for sn in sorted(wanted - {migrating}):
        gone = facts.handed_over.get(sn)
        if gone:
            problems.append(
                f"{sn} was moved from {host} to {gone.get('to', '?')} ({gone.get('address', '?')}) on "
                f"{gone.get('at', '?')} by `inv migrate-host`, but {inventory_path} still places it on {host}: "
                f"starting it here would run a second copy with the same signing key. Use the inventory "
                f"the migration wrote (homeservers.{sn}.host: {gone.get('to', '?')})")
        moving = facts.migrating.get(sn)
        if moving:
            problems.append(
                f"a migration of {sn} from {host} to {moving.get('to', '?')} is in progress (done: "
                f"{moving.get('phase', '?')}): finish it with `inv migrate-host --homeserver {sn} --to "
                f"{moving.get('to', '?')}` or undo it with `--abort` before deploying {host}")
    forwarded = {hs.server_name for hs in state.forwarded}
    for sn in sorted(facts.hosted - wanted - forwarded - {migrating}):
        if sn in facts.handed_over:
            continue  # the stopped old copy of a finished hand-over, kept until --finish
        problems.append(
            f"{host} runs {sn} (its stack is in {state.layout.synapse(sn)}), but {inventory_path} does not "
            f"place it on {host}: a deploy would leave it running unserved. If it moved, use the inventory "
            f"that says so; `inv migrate-host` moves a homeserver")
    if problems:
        raise StaleInventory(f"{host}: refusing to deploy: " + "\n  ".join(problems))
