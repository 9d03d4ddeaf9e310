"""synapse-fabric's `fab` front: `fab -H HOST bootstrap`.

HOST is an inventory host's name or address; the inventory gives the SSH user,
port and key (fabric's own -H user@host:port parts are not used).
"""

from fabric import task
from invoke import Collection

from .cli import CONFIG_DEFAULTS, load_inventory, not_built


@task
def bootstrap(c):
    """Prepare a bare host (Docker, compose, trees) and deploy what hosts.yaml assigns it."""
    inv = load_inventory(c)
    from .cli import expected_failures

    with expected_failures():
        inv.host_by_name_or_address(c.host)
    not_built("bootstrap", 5)


ns = Collection(bootstrap)
ns.configure(CONFIG_DEFAULTS)
