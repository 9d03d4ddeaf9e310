"""Federation through a proxy host (homeservers.X.federation.via).

seven.test runs on vps3, which has no public address here: its firewall lets in
web traffic only from the private link (vps1), this machine (its clients and the
operator) and the ACME CA. vps1, the public host, serves seven.test's name: its
.well-known and, over that private link, only /_matrix/federation and /_matrix/key;
its client API answers nothing there. two.test (vps2), which cannot reach vps3 at
all, federates with seven.test: invite, join, messages both ways.
"""
from __future__ import annotations

import json

import pytest

from tests.e2e.helpers import https_get, on_host, run, variant
from tests.e2e.test_federation import converse
from tests.e2e.test_uninstall import TEST_CA
from tests.sandbox import sandbox as sb

pytestmark = pytest.mark.e2e

SN = "seven.test"
THIS_MACHINE = "172.29.231.1/32"  # the sandbox network's gateway: the operator and seven.test's clients
ACME_CA = "172.29.231.2/32"       # pebble validates from sfab-infra


def _private(doc):
    doc["homeservers"][SN] = {
        "host": "vps3",
        "federation": {"trusted_ca": TEST_CA, "allow_ip_ranges": ["172.29.231.0/24"], "trusted_key_servers": [],
                       "via": "vps1"},
        "synapse_settings": doc["homeservers"]["one.test"]["synapse_settings"],
    }
    doc["hosts"]["vps3"]["firewall"] = {
        "enabled": True, "public_web": False,
        "allow_from": [THIS_MACHINE, ACME_CA, f"{sb.HOSTS['vps1'].ip}/32"]}


def test_a_homeserver_without_public_address_federates_through_a_proxy_host(deployed):
    inv = variant("federation-via", _private)
    sb.set_dns(SN, sb.HOSTS["vps1"].ip)           # the public name: the proxy host
    sb.set_dns(f"matrix.{SN}", sb.HOSTS["vps3"].ip)  # its clients' name: the private host
    try:
        dns = run(["inv", "dns"], inv).stdout
        assert f"{SN}. 3600 IN A {sb.HOSTS['vps1'].ip}" in dns and f"matrix.{SN}. 3600 IN A {sb.HOSTS['vps3'].ip}" in dns
        res = run(["fab", "-H", "vps3", "bootstrap"], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        res = run(["inv", "deploy", "--host", "vps1"], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "asking the ACME CA" in res.stdout  # seven.test's certificate, on vps1

        # two.test's host cannot reach seven.test's host at all
        reach = on_host("vps2", f"curl -sk -m 5 -o /dev/null https://{sb.HOSTS['vps3'].ip}/ && echo reached "
                                f"|| echo unreachable")
        assert reach.strip() == "unreachable"
        # the proxy host: the well-known and the federation API, no client API
        status, _, body = https_get(SN, "/.well-known/matrix/server")
        assert status == 200 and json.loads(body) == {"m.server": f"{SN}:443"}
        status, _, body = https_get(SN, "/_matrix/key/v2/server")
        assert status == 200 and json.loads(body)["server_name"] == SN
        assert https_get(SN, "/_matrix/client/versions")[0] == 404
        assert https_get(SN, "/_synapse/admin/v1/server_version")[0] == 404

        converse("two.test", SN, "via", inv)
        res = run(["inv", "check", "--homeserver", SN], inv, timeout=300)
        assert res.returncode == 0, res.stdout
    finally:
        # everything of seven.test goes: vps3 (its firewall too) and what vps1 held for it
        res = run(["inv", "uninstall", "--host", "vps3"], inv)
        inv.unlink(missing_ok=True)
        for name in (SN, f"matrix.{SN}"):
            sb.set_dns(name, None)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "vps1 no longer serves seven.test" in res.stdout
    assert on_host("vps3", "iptables -S | grep -c SFAB- || true").strip() == "0"
    left = on_host("vps1", f"cd /opt/matrix/reverse_proxy && ls -d nginx/conf.d/{SN}-via.conf well-known/{SN} "
                           f"certs/{SN} nginx/upstream-ca/{SN}.pem acme/letsencrypt/live/{SN} 2>/dev/null || true")
    assert left.strip() == "", left
    res = run(["inv", "deploy", "--host", "vps1"])
    assert res.returncode == 0 and "vps1: 0 changed" in res.stdout, res.stdout + res.stderr


def test_migrating_a_homeserver_served_through_a_proxy_is_refused(deployed):
    inv = variant("federation-via-migrate", _private)
    try:
        res = run(["inv", "migrate-host", "--homeserver", SN, "--to", "vps2"], inv)
        assert res.returncode == 2 and "federation is served by vps1" in res.stderr, res.stdout + res.stderr
    finally:
        inv.unlink(missing_ok=True)
