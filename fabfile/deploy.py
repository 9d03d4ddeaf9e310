"""`inv deploy` over hosts: render -> lock and facts -> plan -> steps -> report
(README, "How a deploy works"; one host's part is fabfile/converge.py).

Each host runs in its own thread with its own SSH connection and lock; a failing
host does not stop the others. A converged host costs ONE remote command: the
lock, whose channel also runs the facts script.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Optional

from .errors import InventoryError, LockHeld, SfabError
from .inventory import Inventory
from .remote import Connections, Remote
from .workers import hosts_of

if TYPE_CHECKING:
    from .converge import HostResult
    from .report import Reporter


def exit_code(results: list[HostResult]) -> int:
    """0 when every host converged; 75 when the only failures were held locks
    (try again later); else 1."""
    codes = {r.exit_code for r in results if r.failed}
    return 0 if not codes else 75 if codes == {75} else 1


def select_hosts(inv: Inventory, hosts: list[str] | None, homeservers: list[str] | None) -> list[str]:
    """Inventory host names to act on, from --host / --homeserver filters."""
    names = list(inv.hosts)
    if hosts:
        for h in hosts:
            if h not in inv.hosts:
                raise InventoryError(f"{inv.path}: no host {h!r} (known hosts: {', '.join(inv.hosts)})")
        names = [n for n in names if n in hosts]
    if homeservers:
        wanted = {h for s in homeservers for h in hosts_of(inv.homeserver(s))}
        names = [n for n in names if n in wanted]
    if not hosts:
        # A host with no homeserver (e.g. a migration target) is left alone
        # unless named (deploying it would only start an idle proxy), or unless it
        # runs some homeserver's workers or database.
        running = {h for hs in inv.homeservers.values() for h in hosts_of(hs)}
        names = [n for n in names if inv.homeservers_on(n) or n in running]
    return names


def waves(states: dict) -> list[list[str]]:
    """The hosts in the order their dependencies allow: a host that runs another
    host's database converges before that host, and a host that runs another
    host's workers after it (it copies what that host made). Hosts of one wave
    converge side by side."""
    deps = {n: ({g.hs.host for g in s.guests.values()} | {hs.postgres.host for hs in s.homeservers
                                                            if hs.postgres.host}) & set(states)
            for n, s in states.items()}
    out, done = [], set()
    while len(done) < len(states):
        wave = [n for n in states if n not in done and deps[n] <= done]
        if not wave:
            raise InventoryError("the hosts' databases and workers depend on each other in a circle: "
                                 + ", ".join(sorted(set(states) - done)))
        out.append(wave)
        done |= set(wave)
    return out


def deploy(
    inv: Inventory,
    host_names: list[str],
    dry_run: bool = False,
    install: bool = False,
    report: Optional[Reporter] = None,
    pull: bool = False,
) -> list[HostResult]:
    """Converge `host_names` in parallel. `install` (bootstrap) installs Docker first;
    `pull`: hosts that pull images ask their registry again for every tag."""
    # SSH first: the hosts do their part of the handshakes while this process loads
    # the code below and renders (a no-op's time is mostly this process's and SSH's)
    connections = Connections(inv, host_names)
    try:
        return _deploy(inv, host_names, connections, dry_run, install, report, pull)
    finally:
        connections.close()


def _deploy(inv, host_names, connections, dry_run, install, report, pull) -> list[HostResult]:
    from .converge import HostResult
    from .render import render_host
    from .report import Reporter

    report = report or Reporter()
    states = {name: render_host(inv, name) for name in host_names}  # render errors stop all
    local = local_images(inv, list(states.values()))
    results: dict[str, HostResult] = {}
    with ThreadPoolExecutor(max_workers=max(1, len(host_names))) as pool:
        for wave in waves(states):
            futures = {}
            for n in wave:
                needs = {g.hs.host: "it runs workers of homeservers on" for g in states[n].guests.values()}
                needs |= {hs.postgres.host: "its homeservers' databases run on" for hs in states[n].homeservers
                          if hs.postgres.host}
                failed = sorted(h for h in needs if h in results and results[h].failed)
                if failed:
                    results[n] = HostResult(n, error=f"{n}: not deployed: {needs[failed[0]]} "
                                                     f"{', '.join(failed)}, which failed", exit_code=1)
                else:
                    futures[n] = pool.submit(_converge_host, inv, states[n], local, dry_run, install, report, pull,
                                             connections)
            results |= {n: f.result() for n, f in futures.items()}
    ordered = [results[n] for n in host_names]
    report.summary(ordered, dry_run)
    return ordered


def local_images(inv: Inventory, states) -> dict[str, str]:
    """IDs of the images that hosts with the `push` source need, on this machine."""
    wanted = sorted({ref for s in states for ref in s.images if inv.hosts[s.host.name].images == "push"})
    pinned = [ref for ref in wanted if "@" in ref]
    if pinned:
        raise InventoryError(
            f"{inv.path}: {', '.join(pinned)}: a digest pin needs a registry; hosts with "
            "`images: push` receive images by ID over SSH (use a tag for them, or `images: pull`)")
    from .docker import local_image_ids

    local = local_image_ids(wanted) if wanted else {}
    missing = [ref for ref in wanted if ref not in local]
    if missing:
        raise InventoryError(f"image source 'push' needs these images on this machine first: {', '.join(missing)}")
    return local


def _converge_host(inv, state, local_images, dry_run, install, report, pull, connections) -> HostResult:
    from .converge import HostResult, converge
    from .facts import script as facts_script

    name = state.host.name
    result = HostResult(name)
    started = time.monotonic()
    remote: Optional[Remote] = None
    try:
        remote = connections.take(state.host)
        # the facts come with the lock, on its channel (bootstrap asks after installing Docker)
        facts_out = remote.lock(inv.ssh.lock_timeout, then="" if install else facts_script(state))
        converge(remote, state, local_images, report, result, dry_run=dry_run, install=install, pull=pull,
                 facts_out=facts_out or None)
    except SfabError as exc:
        result.error = str(exc)
        result.exit_code = exc.exit_code if isinstance(exc, LockHeld) else 1
    except Exception as exc:  # an unexpected failure must not hide the other hosts
        result.error = f"{name}: unexpected {type(exc).__name__}: {exc}"
        result.exit_code = 1
    finally:
        if remote is not None:
            result.commands = remote.commands
            remote.close()
        result.seconds = time.monotonic() - started
    return result
