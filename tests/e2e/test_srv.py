"""Delegation by DNS SRV (homeservers.X.federation.delegation: srv).

three.test turns to SRV: its `.well-known/matrix/server` answers 404, the sandbox
DNS has `_matrix-fed._tcp.three.test -> matrix.three.test:443` (what `inv dns`
prints), and its own vhost serves federation (remote servers ask for three.test).
two.test's Synapse, restarted so it forgets what it resolved before, federates
with three.test: with no well-known and nothing on 8448 (the fallback), only the
SRV record can have led it there. `inv check` verifies it the same way. Then
three.test goes back to well-known.
"""
from __future__ import annotations

import re

import pytest

from tests.e2e.helpers import ctr, https_get, on_host, run, variant
from tests.e2e.test_federation import converse
from tests.sandbox import sandbox as sb
from tests.sandbox.portscan import open_tcp_ports

pytestmark = pytest.mark.e2e

WAIT_HEALTHY = """
docker restart {c} >/dev/null
for i in $(seq 120); do
  [ "$(docker inspect -f '{{{{.State.Health.Status}}}}' {c})" = healthy ] && exit 0
  sleep 1
done
exit 1
"""


def _srv(doc):
    doc["homeservers"]["three.test"]["federation"]["delegation"] = "srv"


def test_federation_through_an_srv_record_without_well_known(deployed):
    srv = variant("srv", _srv)
    try:
        res = run(["inv", "dns"], inventory=srv)
        assert "_matrix-fed._tcp.three.test. 3600 IN SRV 10 5 443 matrix.three.test." in res.stdout
        res = run(["inv", "deploy", "--host", "vps1"], inventory=srv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert https_get("three.test", "/.well-known/matrix/server")[0] == 404
        assert open_tcp_ports(sb.HOSTS["vps1"].ip, [8448]) == []
        # two.test forgets how it reached three.test before
        on_host("vps2", WAIT_HEALTHY.format(c=ctr("synapse-two-test", "synapse")))
        converse("two.test", "three.test", "srv")
        res = run(["inv", "check", "--homeserver", "three.test"], inventory=srv)
        assert res.returncode == 0, res.stdout
        assert re.search(r"^OK\s+three\.test\s+delegation by SRV", res.stdout, re.M), res.stdout
        assert "well-known server" not in res.stdout
    finally:
        srv.unlink(missing_ok=True)
        res = run(["inv", "deploy", "--host", "vps1"])
        assert res.returncode == 0, res.stdout + res.stderr
    assert https_get("three.test", "/.well-known/matrix/server")[0] == 200
