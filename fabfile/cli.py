"""What the two fronts (tasks.py for `inv`, fabfile/__init__.py for `fab`) share:
finding the inventory from invoke/fabric config and turning expected failures into
one clear message and a non-zero exit, without a traceback."""

from __future__ import annotations

import contextlib
from pathlib import Path

from invoke.exceptions import Exit

from .inventory import Inventory, InventoryError, load
from .remote import RemoteError

DEFAULT_INVENTORY = "hosts.yaml"
CONFIG_DEFAULTS = {"inventory": DEFAULT_INVENTORY}


class TaskError(Exception):
    """An expected failure of a task: its message is all the operator needs."""


def inventory_path(c) -> Path:
    """The inventory file: config value `inventory` (invoke.yaml, INVOKE_INVENTORY,
    fabric.yaml, FABRIC_INVENTORY), default hosts.yaml."""
    return Path(c.config.get("inventory") or DEFAULT_INVENTORY)


def load_inventory(c) -> Inventory:
    with expected_failures():
        return load(inventory_path(c))


@contextlib.contextmanager
def expected_failures():
    """Turn expected failures (bad inventory or arguments, a failed remote step)
    into invoke's Exit: one message on stderr, exit 2, no traceback."""
    try:
        yield
    except (InventoryError, TaskError, RemoteError) as exc:
        raise Exit(f"error: {exc}", code=2) from None
