"""The host firewall's rules and its SSH guard (pure: fabfile/firewall.py)."""

import textwrap

import pytest

from fabfile import firewall
from fabfile.inventory import InventoryError, parse
from fabfile.render import render_host

INV = """
hosts:
  web:
    address: 203.0.113.10
    port: 2222
    firewall:
      enabled: true
      allow_from: [10.0.0.0/8, "fd00::/8"]
      open_udp: [51820]
    turn: {enabled: true, hostname: matrix.one.example, relay_ports: 50000-50010}
  bare: {address: 203.0.113.20}
homeservers:
  one.example: {host: web, federation: {port_8448: true}}
  two.example: {host: bare}
"""


def inv():
    return parse(textwrap.dedent(INV))


def rules(family):
    state = render_host(inv(), "web", read=lambda p: b"")
    return state.file(firewall.rules_path(family)).content.decode()


def test_openings_follow_the_inventory():
    o = firewall.openings(inv(), "web")
    assert o.tcp == (80, 443, 2222, 3478, 5349, 8448)
    assert o.udp == (3478, 5349, 51820) and o.relay == (50000, 50010)


def test_rules_per_family_and_docker_published_ports_by_their_original_port():
    v4, v6 = rules(4), rules(6)
    assert "-A SFAB-INPUT -s 10.0.0.0/8 -j RETURN" in v4 and "fd00::/8" not in v4
    assert "-A SFAB-INPUT -s fd00::/8 -j RETURN" in v6 and "10.0.0.0/8" not in v6
    assert "-p icmp" in v4 and "ipv6-icmp" in v6
    assert "-A SFAB-FORWARD -p tcp -m conntrack --ctorigdstport 443 -j RETURN" in v4
    assert "-A SFAB-INPUT -p udp --dport 50000:50010 -j RETURN" in v4
    # refusal comes last, after every opening
    lines = [line for line in v4.splitlines() if line.startswith("-A SFAB-INPUT")]
    assert lines[-2:] == ["-A SFAB-INPUT -p tcp -j REJECT --reject-with tcp-reset", "-A SFAB-INPUT -j REJECT"]
    assert v4.rstrip().endswith("COMMIT")


def test_a_host_without_firewall_gets_none():
    state = render_host(inv(), "bare", read=lambda p: b"")
    assert not [f for f in state.files if "firewall" in f.path]


def test_closing_sshd_is_refused_and_naming_it_passes():
    with pytest.raises(InventoryError, match=r"would close the SSH port\(s\) 22 .*firewall.ssh_ports"):
        firewall.check_ssh(inv(), "web", [22, 2222])
    firewall.check_ssh(inv(), "web", [2222])
    firewall.check_ssh(inv(), "bare", [22])  # no firewall: nothing to refuse


@pytest.mark.parametrize("bad, msg", [
    ({"ssh_ports": [0]}, "is not a port"),
    ({"allow_from": ["0.0.0.0/0"]}, "let everyone in"),
    ({"allow_from": ["10.0.0.1/8"]}, "host bits set"),
])
def test_bad_firewall_settings_are_named(bad, msg):
    text = textwrap.dedent(INV).replace("open_udp: [51820]", ", ".join(f"{k}: {v}" for k, v in bad.items())
                                        .replace("'", '"'))
    with pytest.raises(InventoryError, match=msg):
        parse(text)
