"""Benchmark: reboot to healthy. `docker restart` of a stand-in VPS stands in for a
reboot; the figure is the time from the restart to `inv check` passing for every
homeserver on the host (polled every second). On vps1 (Debian 13, systemd)
nothing else is run; on vps2 (Debian 12, no systemd) `inv deploy --host vps2`
starts Docker and waits for health, as the README tells operators to do.
Writes bench/results/reboot.json and prints the figures; asserts nothing.

    .venv/bin/python -m bench.reboot        # needs the sandbox up and deployed
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench import write_figures

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _inv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "inv"), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "INVOKE_INVENTORY": str(REPO / "hosts.yaml")})


def _checks_pass(homeservers: list[str]) -> bool:
    return all(_inv("check", "--homeserver", hs).returncode == 0 for hs in homeservers)


def reboot_to_healthy(host: str, homeservers: list[str], deploy: bool, limit: float = 300) -> dict:
    from tests.sandbox import sandbox as sb

    assert _checks_pass(homeservers), f"{host} is not healthy before the reboot"
    t0 = time.monotonic()
    subprocess.run(["docker", "restart", "--time", "20", sb.HOSTS[host].container], check=True,
                   capture_output=True)
    t_restarted = time.monotonic()
    sb.wait_ssh(timeout=120)
    t_ssh = time.monotonic()
    figures = {"restart_command_seconds": round(t_restarted - t0, 1), "ssh_seconds": round(t_ssh - t0, 1)}
    if deploy:
        res = _inv("deploy", "--host", host)
        figures["deploy_seconds"] = round(time.monotonic() - t_ssh, 1)
        figures["deploy_summary"] = [l for l in res.stdout.splitlines() if l.startswith(f"{host}: ") and "changed" in l]
    while not _checks_pass(homeservers):
        if time.monotonic() - t0 > limit:
            figures["healthy"] = False
            return figures
        time.sleep(1)
    figures["healthy"] = True
    figures["reboot_to_check_passing_seconds"] = round(time.monotonic() - t0, 1)
    return figures


def main() -> int:
    figures = {
        "vps1 (Debian 13, systemd; nothing run after the reboot)":
            reboot_to_healthy("vps1", ["one.test", "three.test"], deploy=False),
        "vps2 (Debian 12, no systemd; `inv deploy --host vps2` after the reboot)":
            reboot_to_healthy("vps2", ["two.test"], deploy=True),
    }
    return write_figures("reboot", figures)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
