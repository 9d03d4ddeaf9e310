"""Delegation by SRV: what renders and what `inv dns` prints (pure)."""

import textwrap

import pytest

from fabfile.dns import records
from fabfile.inventory import InventoryError, parse
from fabfile.render import render_host

INV = """
hosts:
  web: {address: 203.0.113.10}
  six: {address: "2001:db8::6"}
homeservers:
  one.example: {host: web, federation: {delegation: srv}}
  two.example: {host: web}
  six.example: {host: six, federation: {delegation: srv, port_8448: true}}
"""


def test_srv_delegation_serves_no_well_known_and_federation_on_the_server_name():
    state = render_host(parse(textwrap.dedent(INV)), "web", read=lambda p: b"")
    paths = {f.path for f in state.files}
    wk = "/opt/matrix/reverse_proxy/well-known"
    assert f"{wk}/one.example/matrix/server" not in paths and f"{wk}/one.example/matrix/client" in paths
    assert f"{wk}/two.example/matrix/server" in paths
    one = state.file("/opt/matrix/reverse_proxy/nginx/conf.d/one.example.conf").content.decode()
    two = state.file("/opt/matrix/reverse_proxy/nginx/conf.d/two.example.conf").content.decode()
    assert "return 404;" in one.split("location = /.well-known/matrix/server")[1].split("}")[0]
    assert "/_matrix/federation|/_matrix/key" in one and "/_matrix/federation|/_matrix/key" in two


def test_inv_dns_prints_every_name_and_the_srv_records():
    lines = records(parse(textwrap.dedent(INV)))
    assert "_matrix-fed._tcp.one.example. 3600 IN SRV 10 5 443 matrix.one.example." in lines
    assert "_matrix-fed._tcp.six.example. 3600 IN SRV 10 5 8448 matrix.six.example." in lines
    assert "matrix.six.example. 3600 IN AAAA 2001:db8::6" in lines
    assert not any(line.startswith("_matrix-fed._tcp.two.example") for line in lines)


VIA = """
hosts:
  edge: {address: 203.0.113.10}
  inside: {address: 10.0.0.5, firewall: {enabled: true, public_web: false, allow_from: [10.0.0.0/24]}}
homeservers:
  seven.example:
    host: inside
    federation: {via: edge}
"""


def test_federation_via_a_proxy_host():
    inv = parse(textwrap.dedent(VIA))
    edge, inside = render_host(inv, "edge", read=lambda p: b""), render_host(inv, "inside", read=lambda p: b"")
    vhost = edge.file("/opt/matrix/reverse_proxy/nginx/conf.d/seven.example-via.conf").content.decode()
    assert "proxy_pass https://10.0.0.5;" in vhost and "proxy_ssl_name matrix.seven.example;" in vhost
    assert "location ~ ^(/_matrix/federation|/_matrix/key)" in vhost and "/_matrix/client" not in vhost
    assert edge.certificates == {"seven.example": ("seven.example",)}
    assert edge.file("/opt/matrix/reverse_proxy/well-known/seven.example/matrix/server").content == \
        b'{"m.server": "seven.example:443"}\n'
    # the private host serves its clients' name only, with a certificate for it alone
    assert inside.certificates == {"seven.example": ("matrix.seven.example",)}
    assert not [f for f in inside.files if "well-known" in f.path or f.path.endswith("conf.d/seven.example.conf")]
    rules = inside.file("/etc/synapse-fabric/firewall/rules.v4").content.decode()
    assert "--dport 443" not in rules and "-A SFAB-INPUT -s 10.0.0.0/24 -j RETURN" in rules
    assert "seven.example. 3600 IN A 203.0.113.10" in records(inv)
    assert "matrix.seven.example. 3600 IN A 10.0.0.5" in records(inv)


@pytest.mark.parametrize("change, msg", [
    ("via: inside", "must be another host"),
    ("via: nowhere", "must be another host"),
    ("via: edge, delegation: srv", "not SRV"),
])
def test_bad_via_is_named(change, msg):
    with pytest.raises(InventoryError, match=msg):
        parse(textwrap.dedent(VIA).replace("via: edge", change))
