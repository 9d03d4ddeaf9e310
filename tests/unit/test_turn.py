"""TURN: what a host running coturn renders (pure: fabfile/turn.py, render.py)."""

import textwrap

import pytest
import yaml

from fabfile.inventory import InventoryError, parse
from fabfile.render import render_host

INV = """
hosts:
  web:
    address: 203.0.113.10
    turn: {enabled: true, hostname: matrix.one.example, relay_ports: 50000-50010}
homeservers:
  one.example: {host: web}
  two.example: {host: web}
"""


def state(text=INV):
    return render_host(parse(textwrap.dedent(text)), "web", read=lambda p: b"")


def test_coturn_and_every_synapse_share_one_secret_file_and_no_secret_is_rendered():
    s = state()
    proxy = yaml.safe_load(s.file("/opt/matrix/reverse_proxy/docker-compose.yml").content)
    coturn = proxy["services"]["coturn"]
    assert coturn["network_mode"] == "host" and coturn["cap_drop"] == ["ALL"]
    assert "./coturn/shared-secret:/run/secrets/turn_shared_secret:ro" in coturn["volumes"]
    assert "./certs/one.example:/certs:ro" in coturn["volumes"]
    for sn in ("one.example", "two.example"):
        conf = yaml.safe_load(s.file(f"/opt/matrix/synapse/{sn}/conf.d/50-synapse-fabric.yaml").content)
        assert conf["turn_shared_secret_path"] == "/run/secrets/turn_shared_secret"
        assert "turn_shared_secret" not in conf
        assert conf["turn_uris"][0] == "turns:matrix.one.example:5349?transport=udp"
        synapse = yaml.safe_load(s.file(f"/opt/matrix/synapse/{sn}/docker-compose.yml").content)["services"]["synapse"]
        assert "/opt/matrix/reverse_proxy/coturn/shared-secret:/run/secrets/turn_shared_secret:ro" in synapse["volumes"]
    conf = s.file("/opt/matrix/reverse_proxy/coturn/turnserver.conf").content.decode()
    assert "min-port=50000" in conf and "max-port=50010" in conf and "use-auth-secret" in conf
    assert "static-auth-secret" not in conf
    assert "denied-peer-ip=10.0.0.0-10.255.255.255" in conf
    assert "coturn/coturn:4.7.0" in s.images


def test_turn_needs_a_hostname_and_uses_a_homeservers_certificate_or_its_own():
    with pytest.raises(InventoryError, match="turn.hostname is required"):
        parse(textwrap.dedent(INV).replace("hostname: matrix.one.example, ", ""))
    # a name of its own: a certificate of its own, asked for over HTTP on that name
    own = state(INV.replace("hostname: matrix.one.example", "hostname: turn.example"))
    assert own.certificates["turn.example"] == ("turn.example",)
    assert own.turn.cert_name == "turn.example"
    assert "server_name turn.example;" in own.file("/opt/matrix/reverse_proxy/nginx/conf.d/turn-turn.example.conf").content.decode()
    compose = yaml.safe_load(own.file("/opt/matrix/reverse_proxy/docker-compose.yml").content)
    assert "./certs/turn.example:/certs:ro" in compose["services"]["coturn"]["volumes"]


def test_a_turn_name_of_a_homeserver_elsewhere_is_refused_and_inv_dns_prints_its_own():
    from fabfile.dns import records
    text = textwrap.dedent(INV) + "  three.example: {host: other}\n"
    text = text.replace("hosts:\n", "hosts:\n  other: {address: 203.0.113.30}\n")
    with pytest.raises(InventoryError, match="is a name of homeserver 'three.example'"):
        parse(text.replace("hostname: matrix.one.example", "hostname: matrix.three.example"))
    own = parse(text.replace("hostname: matrix.one.example", "hostname: turn.example"))
    assert "turn.example. 3600 IN A 203.0.113.10" in records(own)
