"""Reading a password on the operator's machine: a hidden prompt (asked twice), a
file, or standard input ('-'). The password is kept exactly: spaces at either end
are part of it; only ONE trailing newline of a file or stream is dropped."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

from .errors import TaskError


def _decode(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TaskError(f"the password in {where} is not valid UTF-8") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise TaskError(f"the password in {where} is empty")
    if "\x00" in text:
        raise TaskError(f"the password in {where} contains a NUL character")
    return text


def read_password(source: str | None, for_whom: str) -> str:
    if source == "-":
        return _decode(sys.stdin.buffer.read(), "standard input")
    if source:
        path = Path(source)
        try:
            return _decode(path.read_bytes(), str(path))
        except OSError as exc:
            raise TaskError(f"cannot read the password file {path}: {exc.strerror or exc}") from None
    if not sys.stdin.isatty():
        raise TaskError("no terminal to ask for the password: use --password-file FILE (or '-' for stdin)")
    first = getpass.getpass(f"New password for {for_whom}: ")
    second = getpass.getpass("Again: ")
    if first != second:
        raise TaskError("the two passwords differ; nothing was changed")
    if not first:
        raise TaskError("empty password; nothing was changed")
    return first
