"""TURN for calls (hosts.yaml `hosts.vps1.turn`, fabfile/turn.py): coturn on vps1
for one.test and three.test, the shared secret made on the host and read by both
coturn and Synapse.

A user logs in, asks Synapse for TURN credentials (/voip/turnServer) as a client
does before a call, and allocates a real relay on coturn with them from this machine
(outside the host, through its firewall): over UDP on 3478 and over TLS on 5349 (the
ACME certificate of turn.one.test, its own name, checked). Wrong credentials are
refused. `inv check` proves the same.
"""
from __future__ import annotations

import asyncio
import json
import ssl
import time

import pytest

from fabfile.turn import allocate
from tests.e2e.helpers import REPO, ROOTS, https_get, on_host, run
from tests.e2e.test_users import cli
from tests.sandbox.client import SandboxClient
from tests.sandbox import sandbox as sb

pytestmark = pytest.mark.e2e

RELAY = range(49152, 49252)  # hosts.yaml's default relay_ports


def _credentials(cafile, server="one.test", host="matrix.one.test"):
    user, password = f"caller-{time.time_ns() % 10**6}", "calls need a relay"
    assert cli(["inv", "register-user", "--homeserver", server, "--user", user], password).returncode == 0
    async def go():
        async with SandboxClient(f"https://{host}", cafile) as c:
            return await c.login(user, password)
    token = asyncio.run(go()).access_token
    status, _, body = https_get(host, "/_matrix/client/v3/voip/turnServer",
                                {"Authorization": f"Bearer {token}"})
    assert status == 200, body
    return json.loads(body)


@pytest.mark.parametrize("server, host", [("one.test", "matrix.one.test"), ("three.test", "matrix.three.test")])
def test_synapse_credentials_allocate_a_relay_on_coturn(deployed, cafile, server, host):
    creds = _credentials(cafile, server, host)
    assert creds["uris"] == ["turns:turn.one.test:5349?transport=udp", "turns:turn.one.test:5349?transport=tcp",
                             "turn:turn.one.test:3478?transport=udp", "turn:turn.one.test:3478?transport=tcp"]
    assert 3000 <= creds["ttl"] <= 3600 and creds["username"].endswith(f":@{creds['username'].split('@')[1]}")
    vps1 = sb.HOSTS["vps1"].ip
    relayed = allocate(vps1, 3478, creds["username"], creds["password"])
    assert relayed[0] == vps1 and relayed[1] in RELAY, relayed
    ctx = ssl.create_default_context(cafile=str(ROOTS))
    relayed = allocate(vps1, 5349, creds["username"], creds["password"], tls=(ctx, "turn.one.test"))
    assert relayed[0] == vps1 and relayed[1] in RELAY, relayed


def test_wrong_credentials_are_refused(deployed, cafile):
    creds = _credentials(cafile)
    with pytest.raises(Exception) as err:
        allocate(sb.HOSTS["vps1"].ip, 3478, creds["username"], creds["password"] + "x", timeout=5)
    assert "401" in str(err.value) or "Unauthorized" in str(err.value), repr(err.value)


def test_check_allocates_a_relay_and_the_secret_stays_on_the_host(deployed):
    res = run(["inv", "check", "--homeserver", "one.test"], timeout=300)
    assert res.returncode == 0, res.stdout
    rows = [line for line in res.stdout.splitlines() if "TURN relay allocated" in line]
    assert len(rows) == 2 and all(r.startswith("OK") for r in rows), res.stdout
    # one secret on the host, 0440 root:991, the one both read; not in the inventory
    stat = on_host("vps1", "stat -c '%a %u:%g %s' /opt/matrix/reverse_proxy/coturn/shared-secret").split()
    assert stat[:2] == ["440", "0:991"] and int(stat[2]) >= 32
    secret = on_host("vps1", "cat /opt/matrix/reverse_proxy/coturn/shared-secret").strip()
    assert secret not in (REPO / "hosts.yaml").read_text()
    assert secret not in on_host("vps1", "cat /opt/matrix/reverse_proxy/coturn/turnserver.conf "
                                         "/opt/matrix/synapse/one.test/conf.d/*")
