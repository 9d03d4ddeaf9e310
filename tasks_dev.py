"""The developers' collection: every task of tasks.py, plus the local sandbox.

    inv -c tasks_dev --list
    inv -c tasks_dev sandbox.up      # or: python -m tests.sandbox.sandbox up

The product (`inv` with tasks.py) never imports tests/; this file does.
"""

from invoke import Collection, task

import tasks


@task
def sandbox_up(c):
    """Build the images and start the local sandbox (stand-in hosts, DNS, ACME CA)."""
    from tests.sandbox import sandbox

    sandbox.up()


@task
def sandbox_down(c):
    """Remove everything the sandbox created (containers, networks, volumes)."""
    from tests.sandbox import sandbox

    sandbox.down()


@task
def sandbox_status(c):
    """Show the sandbox's containers, addresses and state."""
    from tests.sandbox import sandbox

    for row in sandbox.status():
        print(row)


sandbox = Collection("sandbox")
for name, fn in (("up", sandbox_up), ("down", sandbox_down), ("status", sandbox_status)):
    sandbox.add_task(fn, name)
ns = Collection(*tasks.ns.tasks.values(), sandbox)
ns.configure(tasks.CONFIG_DEFAULTS)
