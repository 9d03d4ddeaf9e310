"""Reboots: `docker restart` of a stand-in VPS stands in for one.

On the Debian 13 host (systemd) everything comes back by itself: Docker is an
enabled unit, the stacks restart (restart: unless-stopped), the timers stay
scheduled, and `inv check` passes without any deploy. On the Debian 12 host
without systemd, nothing starts Docker: `inv deploy` starts it and returns only
once the stacks are healthy again.
"""
from __future__ import annotations

import subprocess
import time

import pytest
from nio import LoginResponse

from tests.e2e.helpers import on_host, run
from tests.e2e.test_users import cli, login
from tests.sandbox import sandbox as sb
from tests.sandbox.portscan import open_tcp_ports

pytestmark = pytest.mark.e2e


def _reboot(host: str) -> float:
    """Restart the host's container and wait for its SSH; returns the monotonic start."""
    started = time.monotonic()
    subprocess.run(["docker", "restart", "--time", "20", sb.HOSTS[host].container], check=True,
                   capture_output=True, timeout=120)
    sb.wait_ssh(timeout=120)
    return started


def _checks_pass(*homeservers: str) -> bool:
    return all(run(["inv", "check", "--homeserver", hs], timeout=120).returncode == 0 for hs in homeservers)


def test_systemd_host_comes_back_by_itself(deployed, cafile):
    user, password = f"reboot-{time.time_ns() % 10**6}", "before the reboot"
    assert cli(["inv", "register-user", "--homeserver", "one.test", "--user", user], password).returncode == 0

    started = _reboot("vps1")
    deadline = started + 300
    while not _checks_pass("one.test", "three.test"):
        assert time.monotonic() < deadline, "vps1 not healthy 300 s after its reboot (no deploy was run)"
        time.sleep(2)
    print(f"vps1 (Debian 13, systemd): reboot to `inv check` passing: {time.monotonic() - started:.1f}s")

    state = on_host("vps1", "cat /proc/1/comm; systemctl is-enabled docker.service; systemctl is-active docker.service; "
                            "systemctl list-timers --all --no-legend synapse-fabric-*").split("\n")
    assert state[:3] == ["systemd", "enabled", "active"]
    timers = "\n".join(state[3:])
    for unit in ("synapse-fabric-certificates.timer", "synapse-fabric-element.timer"):
        assert unit in timers, timers
        assert on_host("vps1", f"systemctl is-active {unit}").strip() == "active"
    # the firewall came back before Docker published anything (its boot unit)
    assert open_tcp_ports(sb.HOSTS["vps1"].ip) == [22, 80, 443, 3478, 5349]  # 3478, 5349: coturn
    # what was written before the reboot is still there
    assert isinstance(login(cafile, user, password), LoginResponse)
    # and a deploy finds nothing to do
    res = run(["inv", "deploy", "--host", "vps1"])
    assert res.returncode == 0 and "vps1: 0 changed" in res.stdout and "restarted 0" in res.stdout


def test_host_without_systemd_deploy_starts_docker_and_waits_for_health(deployed):
    _reboot("vps2")
    assert on_host("vps2", "pidof dockerd >/dev/null && echo running || echo stopped").strip() == "stopped"
    # cron's @reboot put the firewall back, before anything started Docker
    assert on_host("vps2", "iptables -S INPUT; iptables -S DOCKER-USER").count("SFAB-") == 2
    res = run(["inv", "deploy", "--host", "vps2"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Docker engine (start)" in res.stdout and "healthy after" in res.stdout
    # "deployed" means serving: checked at once, with no grace period
    assert _checks_pass("two.test")
