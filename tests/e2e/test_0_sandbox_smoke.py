"""The sandbox itself works: strict SSH as each host's user, sandbox DNS, the ACME CA
over verified TLS, and the VPSs are bare (no docker yet): Debian 13 with systemd
as PID 1 (vps1, vps3), Debian 12 without (vps2)."""
from __future__ import annotations

import json
import ipaddress

import paramiko
import pytest

from tests.sandbox import sandbox as sb

CA_ON_HOST = "/tmp/sfab-pebble-ca.pem"


def _getent(conn, name: str) -> list[str]:
    res = conn.run(f"getent hosts {name}", hide=True, warn=True)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("name", sorted(sb.HOSTS))
def test_vps_is_a_bare_reachable_host(sandbox, name):
    host = sandbox.hosts[name]
    with sb.connection(name) as conn:
        assert conn.run("id -un", hide=True).stdout.strip() == host.user
        if host.user != "root":
            conn.run("sudo -n true", hide=True)

        # a freshly rented VPS: no container engine yet
        res = conn.run("command -v docker dockerd", hide=True, warn=True)
        assert res.stdout.strip() == "", f"{name} already has docker: {res.stdout}"
        release = conn.run(". /etc/os-release && echo $VERSION_ID", hide=True).stdout.strip()
        assert release == str(host.debian)
        pid1 = conn.run("cat /proc/1/comm", hide=True).stdout.strip()
        if host.systemd:
            # booted like a cloud VPS: systemd running, sshd one of its services, no cron
            sudo = "sudo -n " if host.user != "root" else ""
            state = conn.run(f"{sudo}systemctl is-system-running --wait; systemctl is-active ssh.service",
                             hide=True, warn=True).stdout.split()
            assert pid1 == "systemd" and state == ["running", "active"], state
            assert conn.run("command -v cron crontab", hide=True, warn=True).stdout.strip() == ""
        else:
            assert pid1 != "systemd"

        # sandbox names through the infra resolver; everything else upstream
        assert _getent(conn, "matrix.one.test") == [sandbox.hosts["vps1"].ip]
        mirror = _getent(conn, "deb.debian.org")
        assert mirror, f"{name} cannot resolve deb.debian.org"
        assert not ipaddress.ip_address(mirror[0]).is_loopback
        # unknown sandbox names get no answer (not challtestsrv's 127.0.0.1 default)
        assert _getent(conn, "no-such-name.test") == []

        # the ACME directory over TLS verified against the sandbox CA
        conn.put(str(sandbox.pebble_ca), CA_ON_HOST)
        res = conn.run(f"curl -fsS --max-time 10 --cacert {CA_ON_HOST} {sandbox.acme_directory}",
                       hide=True)
        assert "newAccount" in json.loads(res.stdout)


def test_unknown_host_key_is_rejected(sandbox, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    host = sandbox.hosts["vps1"]
    client = paramiko.SSHClient()
    client.load_host_keys(str(empty))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        client.connect(host.ip, username=host.user, key_filename=str(sandbox.key),
                       look_for_keys=False, allow_agent=False, timeout=10)
    client.close()


def test_set_dns_moves_a_name(sandbox):
    name, vps3 = "smoke.three.test", sandbox.hosts["vps3"].ip
    with sb.connection("vps1") as conn:
        try:
            sb.set_dns(name, vps3)
            assert _getent(conn, name) == [vps3]
        finally:
            sb.set_dns(name, None)
        assert _getent(conn, name) == []


def test_acme_roots_saved(sandbox):
    pem = sandbox.acme_roots.read_text()
    assert pem.startswith("-----BEGIN CERTIFICATE-----")
    assert sb.acme_roots_pem() == pem  # same pebble run, same root
