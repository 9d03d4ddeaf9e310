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
from .render import PROXY_PROJECT, DesiredState
from .errors import StaleInventory  # noqa: F401  (raised here; imported from here by callers)


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
        removed = facts.uninstalled.get(sn)
        if removed and removed.get("reason") == "adoption-aborted":
            problems.append(
                f"the adoption of {sn} onto {host} was undone on {removed.get('at', '?')} (`inv adopt --abort`: "
                f"its old deployment serves again), but {inventory_path} still places it on {host}: a deploy "
                f"would start a new, empty {sn} with a new signing key. Adopt it again (`inv adopt`) or remove "
                f"homeservers.{sn} from {inventory_path}")
        elif removed:
            problems.append(
                f"{sn} was uninstalled from {host} on {removed.get('at', '?')} by `inv uninstall` ("
                + (f"its last snapshot: {removed['snapshot']} in {removed.get('repository', '?')}"
                   if removed.get("snapshot") else "without a backup")
                + f"), but {inventory_path} still places it on {host}: a deploy would start a new, empty "
                f"{sn} with a new signing key. Use the inventory the uninstall wrote; to start afresh "
                f"on purpose, delete {state.layout.uninstalled(sn)} on {host} first")
        moving = facts.migrating.get(sn)
        if moving and moving.get("adopt"):
            problems.append(
                f"an adoption of {sn} from {moving['adopt']} is in progress (done: {moving.get('phase', '?')}): "
                f"run `inv adopt --homeserver {sn} --from {moving['adopt']}` again (it rolls the interrupted one "
                f"back and starts over) or `--abort` before deploying {host}")
        elif moving:
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
    problems += _base_dir_moved(state, facts)
    if problems:
        raise StaleInventory(f"{host}: refusing to deploy: " + "\n  ".join(problems))


def _base_dir_moved(state: DesiredState, facts: Facts) -> list[str]:
    """A base_dir other than the one the host's homeservers live in would fork them
    (new secrets, a new signing key, an empty database under the same compose
    project): refused until the operator moves the directory."""
    base = state.host.base_dir
    inside = lambda path: path == base or path.startswith(base.rstrip("/") + "/")  # noqa: E731
    how = (f"to move it: stop its stacks, move the directory to {base}, then deploy; or set "
           f"hosts.{state.host.name}.base_dir back")
    problems = []
    if facts.base_record and not inside(facts.base_record[0]) and facts.base_record[1]:
        old, names = facts.base_record
        problems.append(f"{state.host.name} was deployed with base_dir {old}, which still holds "
                        f"{', '.join(names)}; the inventory says {base}: {how}")
    dirs = sorted({c.workdir for c in facts.containers
                   if c.workdir and not inside(c.workdir)
                   and (c.project == PROXY_PROJECT or c.project.startswith("synapse-"))})
    if dirs and not problems:
        problems.append(f"{state.host.name} runs stacks from {', '.join(dirs)}, outside base_dir {base}: {how}")
    return problems
