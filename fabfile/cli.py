"""What the two fronts (tasks.py for `inv`, fabfile/__init__.py for `fab`) share:
finding the inventory from invoke/fabric config and turning the library's expected
failures (fabfile/errors.py) into one clear message and their exit code, without a
traceback. No library module imports this one."""

from __future__ import annotations

import atexit
import contextlib
import gc
import sys
from pathlib import Path

from invoke.exceptions import Exit

from .errors import SfabError, TaskError  # noqa: F401  (TaskError: for the fronts)
from .inventory import Inventory, load

# A run ends when its work does: without this, the interpreter's last garbage
# collection walks every object of the ~400 modules a task imports (~40 ms of a
# 0.4 s no-op deploy) to free memory the OS takes back anyway. Exit handlers
# (temporary files' cleanup among them) still run first.
atexit.register(gc.freeze)

DEFAULT_INVENTORY = "hosts.yaml"
CONFIG_DEFAULTS = {"inventory": DEFAULT_INVENTORY}


def inventory_path(c) -> Path:
    """The inventory file: config value `inventory` (invoke.yaml, INVOKE_INVENTORY,
    fabric.yaml, FABRIC_INVENTORY), default hosts.yaml."""
    return Path(c.config.get("inventory") or DEFAULT_INVENTORY)


def load_inventory(c) -> Inventory:
    with expected_failures():
        return load(inventory_path(c))


@contextlib.contextmanager
def expected_failures():
    """Turn expected failures into invoke's Exit: one message on stderr, no
    traceback, the exit code of their kind (2 input, 1 a failed step, 75 a held lock)."""
    try:
        yield
    except SfabError as exc:
        raise Exit(f"error: {exc}", code=exc.exit_code) from None


def ask(question: str) -> bool:
    """A yes/no question on the terminal; without one, refuse (the task's --yes
    answers it instead)."""
    if not sys.stdin.isatty():
        raise TaskError(f"{question} Re-run with --yes to confirm (no terminal to ask on).")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def typed(question: str, answer: str) -> bool:
    """A confirmation that must be typed (on the terminal or stdin): `answer` exactly."""
    print(f"{question}\nType {answer!r} to confirm: ", end="", flush=True)
    line = sys.stdin.readline()
    if not line and not sys.stdin.isatty():
        raise TaskError(f"{question} No answer on stdin: type {answer!r} there to confirm.")
    return line.strip() == answer
