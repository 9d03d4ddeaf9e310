"""PostgreSQL versions: a database stays on the major version it was created with.

Changing a homeserver's PostgreSQL major version rewrites its data (dump and
restore, or pg_upgrade): an explicit operation, never the side effect of a default
image moving on. So when the image a homeserver would get names another major than
its data directory holds (`postgres/PG_VERSION`, a fact), it keeps the image its
database container already runs.
"""

from __future__ import annotations

from .facts import Facts
from .render import DesiredState, synapse_project
from .errors import InventoryError
from .schema import postgres_major


def keep_majors(state: DesiredState, facts: Facts) -> tuple[dict[str, str], list[str]]:
    """({server_name: image to keep}, notes for the operator) for the homeservers
    whose database needs another major than the image they would get. Raises
    InventoryError when no image of the right major is known."""
    keep: dict[str, str] = {}
    notes: list[str] = []
    # its own database, and those this host runs for other hosts' homeservers
    databases = [(hs, facts.pg_major.get(hs.server_name), state.postgres_image(hs),
                  facts.container_image(synapse_project(hs), "postgres")) for hs in state.homeservers]
    databases += [(db.hs, facts.database_major.get(sn), db.image, facts.container_image(db.project, "postgres"))
                  for sn, db in state.databases.items()]
    for hs, have, wanted, running in databases:
        sn = hs.server_name
        if have is None or postgres_major(wanted) == have:
            continue
        key = f"homeservers.{sn}.postgres.image"
        if hs.postgres.image:
            raise InventoryError(
                f"{key} is {wanted} (PostgreSQL {postgres_major(wanted)}) but {sn}'s database is "
                f"PostgreSQL {have}: an image cannot change the major version of existing data; "
                f"name a PostgreSQL {have} image there, or upgrade the database first")
        if running and _major_or_none(running) == have:
            keep[sn] = running
            notes.append(f"{sn}: its database is PostgreSQL {have}: keeping {running} "
                         f"(the inventory's {wanted} is another major version; upgrading is a separate step)")
            continue
        raise InventoryError(
            f"{sn}'s database is PostgreSQL {have} but the inventory gives it {wanted} "
            f"(PostgreSQL {postgres_major(wanted)}) and no PostgreSQL {have} container is left to "
            f"keep: set {key} to a PostgreSQL {have} image (e.g. postgres:{have}-trixie)")
    return keep, notes


def _major_or_none(ref: str) -> int | None:
    try:
        return postgres_major(ref)
    except ValueError:
        return None
