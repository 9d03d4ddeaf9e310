"""Convergence as a property: after ANY sequence of inventory edits, each followed by
a deploy (some of them killed at a random moment), the final deploy leaves every
host holding exactly what `render` says for the final inventory, and one more
deploy is a no-op.

Used by tests/e2e/test_x_convergence.py (a few seeds, in CI) and by
bench/converge.py (many seeds; its figures go to bench/results/converge.json).
The check is independent of the deploy's own facts and planner: it reads the
hosts with plain stat, sha256sum, ls, docker inspect and systemctl.
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fabfile.inventory import load
from fabfile.render import PROXY_PROJECT, render_host, synapse_project
from tests.e2e.helpers import BIN, INVENTORY, REPO, on_host

HOSTS = ("vps1", "vps2")
SETTINGS = [None, {"rc_joins": {"local": {"per_second": 50, "burst_count": 500}}},
            {"rc_joins": {"local": {"per_second": 60, "burst_count": 600}}}, {"enable_search": False}]


# -- edits: each takes (doc, rng) and returns a line saying what it did ------------


def _hs(doc, rng):
    name = rng.choice(sorted(doc["homeservers"]))
    return name, doc["homeservers"][name]


def edit_settings(doc, rng):
    name, hs = _hs(doc, rng)
    extra = rng.choice(SETTINGS)
    settings = dict(hs.get("synapse_settings") or {})
    for key in ("rc_joins", "enable_search"):
        settings.pop(key, None)
    settings.update(extra or {})
    hs["synapse_settings"] = settings
    return f"{name}: synapse_settings {extra}"


def edit_upload(doc, rng):
    name, hs = _hs(doc, rng)
    hs["max_upload_size"] = rng.choice(["50M", "75M", "100M"])
    return f"{name}: max_upload_size {hs['max_upload_size']}"


def edit_allowlist(doc, rng):
    name, hs = _hs(doc, rng)
    hs["admin_api_allow"] = rng.choice([[], ["172.29.231.0/24"], ["198.51.100.0/24", "203.0.113.0/24"]])
    return f"{name}: admin_api_allow {hs['admin_api_allow']}"


def edit_federation(doc, rng):
    name, hs = _hs(doc, rng)
    fed = hs.setdefault("federation", {})
    what = rng.choice(["enabled", "port_8448"])
    fed[what] = not fed.get(what, what == "enabled")
    return f"{name}: federation.{what} {fed[what]}"


def edit_registration(doc, rng):
    name, hs = _hs(doc, rng)
    hs["registration"] = rng.choice(["disabled", "token", "open"])
    return f"{name}: registration {hs['registration']}"


def edit_element(doc, rng):
    element = doc["homeservers"]["one.test"]["element"]
    if rng.random() < 0.3:
        element["enabled"] = not element.get("enabled", False)
        return f"one.test: element.enabled {element['enabled']}"
    element["version"] = rng.choice(["1.11.0", "1.11.1"])
    return f"one.test: element.version {element['version']}"


EDITS = [edit_settings, edit_upload, edit_allowlist, edit_federation, edit_registration, edit_element]


# -- running ------------------------------------------------------------------------


def deploy(inventory: Path, kill_after: float | None = None) -> subprocess.CompletedProcess | str:
    """`inv deploy` of the sandbox hosts; with `kill_after`, SIGKILL it then (its SSH
    connections die with it) and return "killed", or its result if it ended first."""
    env = {**os.environ, "INVOKE_INVENTORY": str(inventory)}
    argv = [str(BIN / "inv"), "deploy", "--host", "vps1", "--host", "vps2"]
    if kill_after is None:
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(kill_after)
        return subprocess.CompletedProcess(argv, proc.returncode, "", "")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        return "killed"


@dataclass
class Outcome:
    seed: int
    steps: list[str] = field(default_factory=list)
    divergences: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.divergences


def run_sequence(seed: int, steps: int = 6, cut_chance: float = 0.5, workdir: Path = REPO) -> Outcome:
    """One seeded sequence: `steps` edits, each deployed (some deploys killed), a final
    deploy, the check, one more deploy that must change nothing; then the
    repository's inventory is deployed and checked again (the suite goes on from it)."""
    rng = random.Random(seed)
    out = Outcome(seed)
    started = time.monotonic()
    doc = copy.deepcopy(yaml.safe_load(INVENTORY.read_text()))
    doc = yaml.safe_load(yaml.safe_dump(doc))  # no shared (aliased) mappings: each edit stays local
    path = workdir / f".e2e-converge-{seed}.yaml"
    try:
        for i in range(steps):
            what = rng.choice(EDITS)(doc, rng)
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            if rng.random() < cut_chance:
                delay = round(rng.uniform(0.2, 3.0), 1)  # a no-op deploy takes ~0.5 s, one that restarts 2-10 s
                res = deploy(path, kill_after=delay)
                out.steps.append(f"{i}: {what}; deploy killed after {delay}s"
                                 + ("" if res == "killed" else " (it had finished)"))
            else:
                res = deploy(path)
                out.steps.append(f"{i}: {what}; deploy exit {res.returncode}")
                if res.returncode != 0:
                    out.divergences.append(f"step {i}: deploy failed:\n{res.stdout[-2000:]}{res.stderr[-1000:]}")
                    return out
        for inventory, label in ((path, "final inventory"), (INVENTORY, "repository inventory")):
            res = deploy(inventory)
            if res.returncode != 0:
                out.divergences.append(f"{label}: deploy failed:\n{res.stdout[-2000:]}{res.stderr[-1000:]}")
                return out
            out.divergences += [f"{label}: {d}" for d in divergences(inventory)]
            again = deploy(inventory)
            for host in HOSTS:
                if again.returncode != 0 or f"{host}: 0 changed" not in again.stdout \
                        or "restarted 0" not in again.stdout.split(f"{host}: 0 changed", 1)[-1].split("\n")[0]:
                    out.divergences.append(f"{label}: the deploy after converging was not a no-op on {host}:\n"
                                           f"{again.stdout[-2000:]}")
    finally:
        path.unlink(missing_ok=True)
        out.seconds = time.monotonic() - started
    return out


# -- the check ------------------------------------------------------------------------

# Directories whose every file is ours: anything there that render does not say is a leftover.
def _owned_dirs(base: str) -> list[str]:
    return [f"{base}/reverse_proxy/nginx/conf.d", f"{base}/reverse_proxy/bin"]


def divergences(inventory: Path) -> list[str]:
    """What differs between the hosts and render(inventory), one line each."""
    inv = load(inventory)
    found = []
    for host in HOSTS:
        state = render_host(inv, host)
        systemd = on_host(host, "cat /proc/1/comm").strip() == "systemd"
        kind = "systemd" if systemd else "no-systemd"
        files = [f for f in state.files if f.when in ("", kind)]
        base = state.layout.base
        owned = _owned_dirs(base) + [f"{state.layout.synapse(hs.server_name)}/conf.d" for hs in state.homeservers]
        paths = " ".join(shlex.quote(f.path) for f in files)
        script = (
            f"for p in {paths}; do if [ -f \"$p\" ]; then printf 'F %s %s %s\\n' \"$p\" "
            "\"$(stat -c '%a %u:%g' \"$p\")\" \"$(sha256sum < \"$p\" | cut -d' ' -f1)\"; fi; done\n"
            + "".join(f"ls -1A {shlex.quote(d)} 2>/dev/null | sed 's|^|L {d}/|'\n" for d in owned)
            + "ls -1d /etc/systemd/system/synapse-fabric-* /etc/cron.d/synapse-fabric-* 2>/dev/null | sed 's/^/L /'\n"
            + "docker ps -a --filter label=com.docker.compose.project --format "
              "'C {{.Label \"com.docker.compose.project\"}} {{.Label \"com.docker.compose.service\"}} "
              "{{.State}} {{.Image}}'\n"
            + "".join(f"printf 'T {t} %s %s\\n' \"$(systemctl is-enabled {t} 2>/dev/null)\" "
                      f"\"$(systemctl is-active {t} 2>/dev/null)\"\n"
                      for t in ([f.path.rsplit('/', 1)[1] for f in files if f.path.endswith('.timer')] if systemd else []))
            + "{ iptables -S INPUT; iptables -S DOCKER-USER; } 2>/dev/null | grep -c -- '-j SFAB-' | sed 's/^/W /'\n"
            + "".join(f"printf 'E {hs.element.hostname} %s\\n' \"$(readlink {base}/reverse_proxy/element/"
                      f"{hs.element.hostname}/current)\"\n" for hs in state.homeservers if hs.element.enabled)
        )
        seen_files, listed, containers, timers, element, hooks = {}, set(), {}, {}, {}, 0
        for line in on_host(host, script).splitlines():
            kind_, _, rest = line.partition(" ")
            if kind_ == "F":
                p, mode, owner, digest = rest.split(" ")
                seen_files[p] = (int(mode, 8), owner, digest)
            elif kind_ == "L":
                listed.add(rest)
            elif kind_ == "C":
                project, service, status, image = rest.split(" ")
                containers[(project, service)] = (status, image)
            elif kind_ == "T":
                unit, enabled, active = (rest.split(" ") + ["", ""])[:3]
                timers[unit] = (enabled, active)
            elif kind_ == "W":
                hooks = int(rest.split()[-1])
            elif kind_ == "E":
                name, _, target = rest.partition(" ")
                element[name] = target
        for f in files:
            got = seen_files.get(f.path)
            want = (f.mode, f.owner, hashlib.sha256(f.content).hexdigest())
            if got is None:
                found.append(f"{host}: {f.path} is missing")
            elif got != want:
                what = "content" if got[2] != want[2] else f"mode/owner {got[0]:o} {got[1]} (want {want[0]:o} {want[1]})"
                found.append(f"{host}: {f.path}: {what} differs from the rendered file")
        desired = {f.path for f in files}
        for p in sorted(listed - desired):
            found.append(f"{host}: {p} is left over (render does not name it)")
        wanted = {(PROXY_PROJECT, "nginx"): state.image_refs["nginx"]}
        if state.turn:
            wanted[(PROXY_PROJECT, "coturn")] = state.image_refs["coturn"]
        for hs in state.homeservers:
            wanted[(synapse_project(hs), "synapse")] = state.image_refs["synapse"]
            wanted[(synapse_project(hs), "postgres")] = state.postgres_image(hs)
        for key, image in wanted.items():
            status, got = containers.get(key, ("absent", ""))
            if status != "running" or got != image:
                found.append(f"{host}: {key[0]}/{key[1]} is {status} with {got or 'no image'} (want running {image})")
        for key, (status, _) in containers.items():
            if key not in wanted and status == "running":
                found.append(f"{host}: {key[0]}/{key[1]} runs but render does not name it")
        want_hooks = 2 if state.host.firewall.enabled else 0  # INPUT -> SFAB-INPUT, DOCKER-USER -> SFAB-FORWARD
        if hooks != want_hooks:
            found.append(f"{host}: {hooks} firewall hook(s) in INPUT/DOCKER-USER (want {want_hooks})")
        for unit, state_ in timers.items():
            if state_ != ("enabled", "active"):
                found.append(f"{host}: timer {unit} is {state_[0] or 'absent'}/{state_[1] or 'inactive'}")
        for hs in state.homeservers:
            if hs.element.enabled and hs.element.version != "latest":
                if element.get(hs.element.hostname) != f"releases/{hs.element.version}":
                    found.append(f"{host}: Element {hs.element.hostname} serves "
                                 f"{element.get(hs.element.hostname) or 'nothing'} (want {hs.element.version})")
    return found
