"""Delegation by SRV: what renders and what `inv dns` prints (pure)."""

import textwrap

from fabfile.dns import records
from fabfile.inventory import parse
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
    assert "/_matrix/federation|/_matrix/key" in one and "/_matrix/federation" not in two


def test_inv_dns_prints_every_name_and_the_srv_records():
    lines = records(parse(textwrap.dedent(INV)))
    assert "_matrix-fed._tcp.one.example. 3600 IN SRV 10 5 443 matrix.one.example." in lines
    assert "_matrix-fed._tcp.six.example. 3600 IN SRV 10 5 8448 matrix.six.example." in lines
    assert "matrix.six.example. 3600 IN AAAA 2001:db8::6" in lines
    assert not any(line.startswith("_matrix-fed._tcp.two.example") for line in lines)
