"""synapse-fabric's `fab` front: `fab -H HOST bootstrap`.

HOST is an inventory host's name or address; the inventory gives the SSH user,
port and key (fabric's own -H user@host:port parts are not used).
"""

# invoke's own @task: fabric's executor gives it a Connection per -H host all the
# same, and `inv` (which imports this package for fabfile.cli) does not pay for
# importing fabric and paramiko before it needs SSH
from invoke import Collection, task

from .cli import CONFIG_DEFAULTS, expected_failures, load_inventory


@task
def bootstrap(c):
    """Prepare a bare host (Docker, compose, trees) and deploy what hosts.yaml assigns it."""
    from invoke.exceptions import Exit

    from . import deploy

    inv = load_inventory(c)
    with expected_failures():
        host = inv.host_by_name_or_address(c.host)
        results = deploy.deploy(inv, [host.name], install=True)
    if deploy.exit_code(results):
        raise Exit(code=deploy.exit_code(results))


ns = Collection(bootstrap)
ns.configure(CONFIG_DEFAULTS)
