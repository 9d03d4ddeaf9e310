"""The host firewall (hosts.yaml `firewall`, fabfile/firewall.py), probed from
outside: this machine connects to every TCP port of the host, before and after.

Before: a port Docker publishes and a port a host process listens on answer.
After: only SSH, 80, 443 and coturn's 3478 and 5349 do (no homeserver here serves
8448), Docker's published port included, SSH still works, and a second deploy changes nothing. A firewall
that would close sshd's port is refused before anything changes. Off again: our
chains, rules, program and boot unit are gone.
"""
from __future__ import annotations

import pytest

from tests.e2e.helpers import on_host, run, variant
from tests.sandbox import sandbox as sb
from tests.sandbox.portscan import open_tcp_ports

pytestmark = pytest.mark.e2e

ALLOWED = [22, 80, 443]
VPS1 = [22, 80, 443, 3478, 5349]  # vps1 runs coturn too (TURN, and TURN over TLS)
PUBLISHED, HOST_PORT = 18080, 18081
LISTENERS = f"""
docker rm -f sfab-probe-published sfab-probe-host >/dev/null 2>&1 || true
docker run -d --name sfab-probe-published -p {PUBLISHED}:8000 nginx:1.30 sh -c \
  'printf "server {{ listen 8000; return 204; }}\\n" > /etc/nginx/conf.d/default.conf && exec nginx -g "daemon off;"' >/dev/null
docker run -d --name sfab-probe-host --network host nginx:1.30 sh -c \
  'printf "server {{ listen {HOST_PORT}; return 204; }}\\n" > /etc/nginx/conf.d/default.conf && exec nginx -g "daemon off;"' >/dev/null
for i in $(seq 50); do
  curl -fs -o /dev/null http://127.0.0.1:{PUBLISHED}/ && curl -fs -o /dev/null http://127.0.0.1:{HOST_PORT}/ && exit 0
  sleep 0.2
done
echo "the probe listeners did not start" >&2; exit 1
"""
HOOKS = ("iptables -S INPUT | grep -c SFAB-INPUT; iptables -S DOCKER-USER | grep -c SFAB-FORWARD; "
         "ls /etc/synapse-fabric/firewall 2>/dev/null | wc -l; "
         "if [ -e /etc/systemd/system/synapse-fabric-firewall.service ]; then "
         "systemctl is-enabled synapse-fabric-firewall.service; else echo none; fi")


def _without_firewall(doc):
    doc["hosts"]["vps1"].pop("firewall", None)


def test_firewall_closes_every_port_but_ssh_and_https_docker_included(deployed):
    address = sb.HOSTS["vps1"].ip
    off = variant("firewall-off", _without_firewall)
    try:
        res = run(["inv", "deploy", "--host", "vps1"], inventory=off)
        assert res.returncode == 0, res.stdout + res.stderr
        assert on_host("vps1", HOOKS).split() == ["0", "0", "0", "none"], "the firewall was not removed"
        on_host("vps1", LISTENERS)

        before = open_tcp_ports(address)
        print(f"vps1 without the firewall: {before}")
        assert set(VPS1 + [PUBLISHED, HOST_PORT]) <= set(before)

        res = run(["inv", "deploy", "--host", "vps1"])
        assert res.returncode == 0, res.stdout + res.stderr
        assert "firewall: loading the rules" in res.stdout
        after = open_tcp_ports(address)
        print(f"vps1 with the firewall: {after}")
        assert after == VPS1
        # what is closed to the outside still serves the host itself
        on_host("vps1", f"curl -fs -o /dev/null http://127.0.0.1:{PUBLISHED}/ && "
                        f"curl -fs -o /dev/null http://127.0.0.1:{HOST_PORT}/")
        assert on_host("vps1", HOOKS).split() == ["1", "1", "3", "enabled"]

        res = run(["inv", "deploy", "--host", "vps1"])
        assert res.returncode == 0 and "vps1: 0 changed" in res.stdout and "restarted 0" in res.stdout, res.stdout
    finally:
        on_host("vps1", "docker rm -f sfab-probe-published sfab-probe-host >/dev/null 2>&1 || true")
        off.unlink(missing_ok=True)


def test_a_firewall_closing_sshd_is_refused(deployed):
    def other_ssh_port(doc):
        doc["hosts"]["vps1"]["firewall"]["ssh_ports"] = [2222]
    bad = variant("firewall-ssh", other_ssh_port)
    try:
        res = run(["inv", "deploy", "--host", "vps1"], inventory=bad)
        assert res.returncode == 1, res.stdout + res.stderr  # found on the host: that host fails
        out = res.stdout + res.stderr
        assert "would close the SSH port(s) 22" in out and "firewall.ssh_ports" in out, out
        assert "0 changed" not in out and open_tcp_ports(sb.HOSTS["vps1"].ip, range(1, 1024)) == ALLOWED  # below 1024
    finally:
        bad.unlink(missing_ok=True)


def test_host_without_systemd_has_the_firewall_too(deployed):
    res = run(["inv", "deploy", "--host", "vps2"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert open_tcp_ports(sb.HOSTS["vps2"].ip) == ALLOWED
    assert on_host("vps2", "cat /etc/cron.d/synapse-fabric-firewall").count("@reboot root") == 1
