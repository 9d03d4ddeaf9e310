"""Every failure the library expects, each with the exit code the command line gives it.

The library raises these; only the fronts (fabfile/cli.py, used by tasks.py and
fabfile/__init__.py) turn them into a message and an exit status, so no library
module knows about the command line.

    2   the operator's input: hosts.yaml, arguments, a name (nothing was touched)
    1   a host or a step failed
    75  another run holds a host's lock (EX_TEMPFAIL: try again later)
"""

from __future__ import annotations


class SfabError(Exception):
    """An expected failure: its message is all the operator needs."""

    exit_code = 1


class InventoryError(SfabError):
    """A hosts.yaml problem an operator can fix; the message says where and what."""

    exit_code = 2


class StaleInventory(InventoryError):
    """hosts.yaml disagrees with what a host says it holds."""


class TaskError(SfabError):
    """A task's arguments do not fit (an unknown user, a bad name, a missing --yes)."""

    exit_code = 2


class RolledBack(SfabError):
    """An operation failed and was undone: the host runs as it did before (exit 1)."""


class RemoteError(SfabError):
    """A remote step failed; the message names the host, the step and stderr's tail.
    `code` is the remote command's exit status when it ran to the end."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class HostKeyError(RemoteError):
    """A host's SSH key is unknown or changed."""


class LockHeld(RemoteError):
    """Another run holds the host's lock."""

    exit_code = 75
