"""Element Web: the work is done on each host by reverse_proxy/bin/element-update
(fabfile/scripts/element-update.sh, reading element/sites.json), for the timer or
cron and for this module alike:
feed, checksum, signature, archive vetting, atomic swap, keep N, rollback, lock."""

from __future__ import annotations

import shlex
from typing import Callable

from .errors import TaskError
from .inventory import Inventory
from .remote import session
from .layout import Layout


def update_script(lay: Layout, *flags: str) -> str:
    """Run the host's element-update (exit 75, another run holds its lock: wait)."""
    cmd = " ".join(shlex.quote(a) for a in [lay.bin("element-update"), *flags])
    return f"""
for i in 1 2 3 4 5 6; do
  {cmd} && exit 0
  rc=$?; [ $rc -eq 75 ] || exit $rc
  sleep 5
done
echo "another element-update kept its lock for 30s" >&2; exit 75
"""


def element_update(inv: Inventory, host: str | None, version: str | None, check: bool, rollback: bool,
                   out: Callable[[str], None]) -> None:
    """`inv element-update` on every host that serves Element (or on `host`)."""
    flags = ["--check"] if check else ["--rollback"] if rollback else ["--version", version or "latest"]
    names = [n for n in inv.hosts if any(hs.element.enabled for hs in inv.homeservers_on(n))]
    if host:
        if host not in names:
            raise TaskError(f"host {host!r} serves no Element site (hosts that do: {', '.join(names) or 'none'})")
        names = [host]
    for name in names:
        h = inv.hosts[name]
        with session(inv, h) as remote:
            remote.run(update_script(Layout(h.base_dir), *flags), what="element-update", timeout=900,
                       on_stdout=lambda line, name=name: out(f"{name}: {line}"))
