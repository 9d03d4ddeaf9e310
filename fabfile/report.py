"""What the operator sees: one line per change, diffs with secrets masked, and a
summary line per host. Lines from parallel hosts never interleave mid-line."""

from __future__ import annotations

import difflib
import re
import sys
import threading
from typing import Optional

_SECRET = re.compile(
    r"(?i)^(\s*-?\s*[\w.\"'-]*(?:pass|secret|token|key|pepper|macaroon)[\w.\"'-]*\s*[:=]\s*)(\S.*)$"
)
_PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def mask(line: str) -> str:
    """Hide the value on any line that looks like it carries a secret."""
    if _PEM_KEY.search(line):
        return "-----BEGIN PRIVATE KEY----- ***"
    return _SECRET.sub(lambda m: f"{m.group(1)}***", line)


def masked_diff(path: str, old: Optional[bytes], new: bytes) -> str:
    if b"PRIVATE KEY" in new or (old and b"PRIVATE KEY" in old):
        return f"--- {path}\n+++ {path}\n(private key material: not shown)\n"
    try:
        a = (old or b"").decode().splitlines()
        b = new.decode().splitlines()
    except UnicodeDecodeError:
        return f"--- {path}\n+++ {path}\n(binary content differs)\n"
    lines = difflib.unified_diff(
        [mask(x) for x in a], [mask(x) for x in b],
        fromfile=f"{path} (on host)" if old is not None else "/dev/null",
        tofile=f"{path} (rendered)", lineterm="",
    )
    return "\n".join(lines) + "\n"


class Reporter:
    def __init__(self, out=None):
        self.out = out or sys.stdout
        self._lock = threading.Lock()

    def _write(self, text: str) -> None:
        with self._lock:
            self.out.write(text)
            self.out.flush()

    def line(self, host: str, msg: str) -> None:
        self._write("".join(f"{host}: {part}\n" for part in msg.splitlines() or [""]))

    def diff(self, host: str, text: str) -> None:
        self._write(text)

    def summary(self, results, dry_run: bool = False) -> None:
        out = []
        for r in results:
            if r.failed:
                out.append(f"{r.host}: FAILED after {r.seconds:.1f}s\n  " + r.error.replace("\n", "\n  "))
            else:
                verb = "would change" if dry_run else "changed"
                restarted = f", {'would restart' if dry_run else 'restarted'} {len(r.restarted)}"
                what = f" ({', '.join(r.restarted)})" if r.restarted else ""
                out.append(f"{r.host}: {r.changed} {verb}, {r.ok} ok{restarted}{what} in {r.seconds:.1f}s")
        failed = [r.host for r in results if r.failed]
        total = f"{len(results)} host(s), {len(failed)} failed" + (f": {', '.join(failed)}" if failed else "")
        if dry_run:
            total += " (dry run: nothing was written)"
        self._write("\n".join(out + [total]) + "\n")
