"""TLS from the sandbox ACME CA, `.well-known` delegation and federation between two
hosts, as users see them (matrix-nio, TLS verified against the sandbox CA only)."""

from __future__ import annotations

import asyncio
import os
import secrets
import ssl
import socket
import subprocess
import time

import pytest
from nio import JoinResponse, LoginResponse, RoomCreateResponse, RoomSendResponse, SyncResponse

from tests.e2e.helpers import BIN, INVENTORY, REPO, on_host, run
from tests.sandbox.client import SandboxClient

pytestmark = pytest.mark.e2e

RUN = secrets.token_hex(3)
ROOTS = REPO / "tests/sandbox/state/acme-roots.pem"
NAMES = {
    "vps1": ["one.test", "matrix.one.test", "element.one.test", "three.test", "matrix.three.test"],
    "vps2": ["two.test", "matrix.two.test"],
}


def register(hs: str, user: str, password: str, inventory=INVENTORY) -> None:
    res = subprocess.run([str(BIN / "inv"), "register-user", "--homeserver", hs, "--user", user,
                          "--password-file", "-"], cwd=REPO, input=password.encode(), capture_output=True,
                         env={**os.environ, "INVOKE_INVENTORY": str(inventory)}, timeout=120)
    assert res.returncode == 0, res.stderr


def peer_cert(ip: str, name: str) -> dict:
    ctx = ssl.create_default_context(cafile=str(ROOTS))  # the sandbox CA only
    with socket.create_connection((ip, 443), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            return tls.getpeercert()


@pytest.mark.parametrize("host,name", [(h, n) for h, names in NAMES.items() for n in names])
def test_every_name_has_a_certificate_from_the_sandbox_ca(deployed, sandbox, host, name):
    cert = peer_cert(sandbox.hosts[host].ip, name)
    issuer = dict(x[0] for x in cert["issuer"])
    assert "Pebble" in issuer.get("commonName", ""), issuer
    assert ("DNS", name) in cert["subjectAltName"]


async def _sync_until(client, predicate, timeout=60):
    deadline = time.monotonic() + timeout
    since = None
    while time.monotonic() < deadline:
        resp = await client.sync(timeout=3000, since=since)
        assert isinstance(resp, SyncResponse), resp
        since = resp.next_batch
        if predicate(resp):
            return resp
    raise AssertionError("condition not reached over sync")


def _bodies(resp: SyncResponse, room_id: str) -> list[str]:
    room = resp.rooms.join.get(room_id)
    return [getattr(e, "body", None) for e in room.timeline.events] if room else []


def converse(hs_a: str, hs_b: str, tag: str, inventory=INVENTORY) -> None:
    """A user of hs_a invites a user of hs_b into a new room over federation; the
    invite arrives, the second joins, both send and each reads the other's message."""
    alice, bob = f"alice-{tag}-{RUN}", f"bob-{tag}-{RUN}"
    register(hs_a, alice, "alice pw", inventory)
    register(hs_b, bob, "bob pw", inventory)

    async def scenario():
        async with SandboxClient(f"https://matrix.{hs_a}", ROOTS) as a, \
                SandboxClient(f"https://matrix.{hs_b}", ROOTS) as b:
            assert isinstance(await a.login(alice, "alice pw"), LoginResponse)
            assert isinstance(await b.login(bob, "bob pw"), LoginResponse)
            bob_id = f"@{bob}:{hs_b}"
            created = await a.client.room_create(name=f"fed {RUN}", invite=[bob_id])
            assert isinstance(created, RoomCreateResponse), created
            room = created.room_id
            # bob sees the invite arrive over federation, then joins through hs_a
            await _sync_until(b.client, lambda r: room in r.rooms.invite)
            joined = await b.client.join(room)
            assert isinstance(joined, JoinResponse), joined
            sent_a = await a.client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": f"hello from alice {RUN}"})
            sent_b = await b.client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": f"hello from bob {RUN}"})
            assert isinstance(sent_a, RoomSendResponse) and isinstance(sent_b, RoomSendResponse)
            # each reads the other's message
            seen_a, seen_b = set(), set()
            await _sync_until(a.client, lambda r: seen_a.update(_bodies(r, room)) or f"hello from bob {RUN}" in seen_a)
            await _sync_until(b.client, lambda r: seen_b.update(_bodies(r, room)) or f"hello from alice {RUN}" in seen_b)

    asyncio.run(scenario())


def test_users_on_two_hosts_federate(deployed):
    converse("one.test", "two.test", "fed")


def test_redeploy_does_not_reissue_valid_certificates(deployed, sandbox):
    before = {n: peer_cert(sandbox.hosts[h].ip, n)["serialNumber"] for h, names in NAMES.items() for n in names}
    res = run(["inv", "deploy"])
    assert res.returncode == 0 and "ACME" not in res.stdout
    after = {n: peer_cert(sandbox.hosts[h].ip, n)["serialNumber"] for h, names in NAMES.items() for n in names}
    assert before == after


PROXY = "/opt/matrix/reverse_proxy"


def test_one_failed_renewal_does_not_stop_the_others_from_being_installed(deployed, sandbox):
    """three.test's renewal breaks (its renewal config is unreadable to certbot);
    one.test's certificate, which certbot holds but nginx does not serve yet, is
    still installed, and the run says something failed."""
    out = on_host("vps1", f"""
cd {PROXY}
conf=acme/letsencrypt/renewal/three.test.conf
cp -p $conf /root/three.test.conf.saved
echo 'this is not a renewal configuration [' > $conf
cp certs/three.test/fullchain.pem certs/one.test/fullchain.pem.other
mv -f certs/one.test/fullchain.pem.other certs/one.test/fullchain.pem   # nginx's copy differs from certbot's
rc=0; bin/renew-certificates > /root/renew.out 2>&1 || rc=$?
cp -p /root/three.test.conf.saved $conf
echo "rc=$rc"
cmp -s acme/letsencrypt/live/one.test/fullchain.pem certs/one.test/fullchain.pem && echo installed-again
cat /root/renew.out
""")
    assert "rc=1" in out, out
    assert "installed-again" in out, out
    assert "renewed certificates handed to nginx" in out, out
    # nginx serves certbot's certificate of one.test again
    cert = peer_cert(sandbox.hosts["vps1"].ip, "matrix.one.test")
    assert ("DNS", "matrix.one.test") in cert["subjectAltName"]


def test_a_deploy_installing_a_certificate_waits_for_a_renewal_run(deployed):
    """The deploy and the renewal share one lock: `--install` (what a deploy runs)
    waits while a renewal holds it, and writes only after."""
    out = on_host("vps1", f"""
cd {PROXY}
rm -f /root/held
( flock /run/synapse-fabric/certificates.lock sh -c 'sleep 2; touch /root/held' ) &
sleep 0.5
bin/renew-certificates --install one.test
[ -e /root/held ] && echo "installed after the holder let go"
wait
ls -a certs/one.test | grep -c '^\\.' || true
""")
    assert "installed after the holder let go" in out, out
    # only . and .. : no temporary file left beside the certificate
    assert out.strip().splitlines()[-1] == "2", out
