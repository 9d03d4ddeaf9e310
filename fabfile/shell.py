"""The shell programs synapse-fabric runs on hosts, kept as files under
fabfile/scripts/ (shellcheck reads them; tests/unit/test_shell.py runs it).

A program's inputs are shell variables set before its text, each value quoted
here: `program("wait-healthy.sh", timeout=180, projects="a b")`. Secrets never
travel this way (argv is visible on the host): they go on stdin."""

from __future__ import annotations

import shlex
from functools import cache
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent / "scripts"


@cache
def _text(name: str) -> str:
    try:
        return (SCRIPTS / name).read_text()
    except FileNotFoundError:  # a packaging bug, not an operator error
        raise RuntimeError(f"missing host program: fabfile/scripts/{name}") from None


def program(*names: str, **inputs: object) -> str:
    """The text of fabfile/scripts/`names` (one program, in that order) with its
    inputs set in front."""
    head = "".join(f"{key}={shlex.quote(str(value))}\n" for key, value in inputs.items())
    return head + "".join(_text(name) for name in names)


def script(name: str) -> bytes:
    """fabfile/scripts/`name` as it is: a program installed on hosts unchanged
    (element-update, whose settings are a data file beside it)."""
    return _text(name).encode()
