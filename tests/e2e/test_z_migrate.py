"""`inv migrate-host`: one.test moves from vps1 to vps3 while two.test keeps talking
to it. Runs last (it leaves one.test on vps3). Uses a copy of hosts.yaml, which the
migration edits as it would the operator's file."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import threading
import time

import pytest
from nio import LoginResponse, RoomCreateResponse, SyncResponse

from tests.e2e.helpers import ArgvSampler, ctr, BIN, INVENTORY, REPO, on_host, run
from tests.sandbox import sandbox as sb
from tests.sandbox.client import SandboxClient, resolve
from tests.sandbox.probe import Prober

pytestmark = pytest.mark.e2e

RUN = secrets.token_hex(3)
ROOTS = REPO / "tests/sandbox/state/acme-roots.pem"
ALICE, BOB = f"alice-mig-{RUN}", f"bob-mig-{RUN}"
ONE_NAMES = ["one.test", "matrix.one.test", "element.one.test"]


def inv_cli(argv, inventory, **kw):
    env = {**os.environ, "INVOKE_INVENTORY": str(inventory)}
    return subprocess.run([str(BIN / "inv"), *argv], cwd=REPO, env=env, capture_output=True, text=True, **kw)


def register(inventory, hs, user, password):
    res = subprocess.run([str(BIN / "inv"), "register-user", "--homeserver", hs, "--user", user,
                          "--password-file", "-"], cwd=REPO, input=password, capture_output=True, text=True,
                         env={**os.environ, "INVOKE_INVENTORY": str(inventory)}, timeout=120)
    assert res.returncode == 0, res.stderr


async def history(url, user, password, room, want: set[str], timeout=120) -> set[str]:
    """Log in and sync until every body in `want` is in the room's timeline."""
    async with SandboxClient(url, ROOTS) as c:
        assert isinstance(await c.login(user, password), LoginResponse)
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        since = None
        first = True
        while time.monotonic() < deadline:
            resp = await c.client.sync(timeout=2000, since=since, full_state=first)
            first = False
            assert isinstance(resp, SyncResponse), resp
            since = resp.next_batch
            r = resp.rooms.join.get(room)
            if r:
                seen.update(getattr(e, "body", None) for e in r.timeline.events)
                if r.timeline.limited and not want <= seen:
                    msgs = await c.client.room_messages(room, start=r.timeline.prev_batch, limit=200)
                    seen.update(getattr(e, "body", None) for e in getattr(msgs, "chunk", []))
            if want <= seen:
                return seen
        return seen


def delivered_to_alice(room, body) -> bool:
    """Bob (two.test) sends `body`; it must reach alice (one.test). If two.test is
    backing off from one.test (it failed to reach it while it was down), a message
    from one.test makes it retry at once, as Synapse does on any incoming request."""
    asyncio.run(send("https://matrix.two.test", BOB, "bob pw", room, [body]))
    for attempt in range(2):
        if body in asyncio.run(history("https://matrix.one.test", ALICE, "alice old pw", room, {body}, timeout=60)):
            return True
        asyncio.run(send("https://matrix.one.test", ALICE, "alice old pw", room, [f"wake-{attempt}-{RUN}"]))
    return False


async def send(url, user, password, room, bodies):
    async with SandboxClient(url, ROOTS) as c:
        assert isinstance(await c.login(user, password), LoginResponse)
        for body in bodies:
            sent = await c.client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": body})
            assert getattr(sent, "event_id", None), f"{user} could not send {body!r}: {sent}"


FINGERPRINT = r"""
cd /opt/matrix/synapse/one.test
sha256sum data/one.test.signing.key | cut -d' ' -f1
find data/media_store -type f 2>/dev/null | sort | xargs -r sha256sum | sha256sum | cut -d' ' -f1
pg=$(docker ps -q --filter label=com.docker.compose.project=synapse-one-test --filter label=com.docker.compose.service=postgres)
docker exec $pg psql -U synapse -d synapse -tAc \
  "SELECT md5(string_agg(name || ':' || coalesce(password_hash,'') || ':' || admin, ',' ORDER BY name)) FROM users"
docker exec $pg psql -U synapse -d synapse -tAc "SELECT count(*) FROM events"
"""


@pytest.fixture(scope="module")
def world(deployed, sandbox):
    inventory = REPO / ".e2e-migrate.yaml"  # a byte copy: the comments must survive the edit
    inventory.write_text(INVENTORY.read_text())
    register(inventory, "one.test", ALICE, "alice old pw")
    register(inventory, "two.test", BOB, "bob pw")

    async def setup():
        async with SandboxClient("https://matrix.one.test", ROOTS) as a, \
                SandboxClient("https://matrix.two.test", ROOTS) as b:
            await a.login(ALICE, "alice old pw")
            await b.login(BOB, "bob pw")
            created = await a.client.room_create(name=f"mig {RUN}", invite=[f"@{BOB}:two.test"])
            assert isinstance(created, RoomCreateResponse)
            room = created.room_id
            for _ in range(60):
                s = await b.client.sync(timeout=1000)
                if room in s.rooms.invite:
                    break
            await b.client.join(room)
            upload, _ = await a.client.upload(lambda *_: b"media bytes " + RUN.encode(),
                                              content_type="application/octet-stream",
                                              filename="m.bin", filesize=len(b"media bytes ") + len(RUN))
            for i in range(3):
                await a.client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": f"a-before-{i}"})
                await b.client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": f"b-before-{i}"})
            return room
    room = asyncio.run(setup())
    want = {f"a-before-{i}" for i in range(3)} | {f"b-before-{i}" for i in range(3)}
    assert want <= asyncio.run(history("https://matrix.one.test", ALICE, "alice old pw", room, want))
    return {"inventory": inventory, "room": room, "before": on_host("vps1", FINGERPRINT).split()}


def _kill_at(proc: subprocess.Popen, marker: str) -> str:
    out = []
    for line in proc.stdout:
        out.append(line)
        if marker in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(60)
    return "".join(out)


def test_interrupted_migration_is_rolled_back_by_abort(world):
    env = {**os.environ, "INVOKE_INVENTORY": str(world["inventory"])}
    proc = subprocess.Popen([str(BIN / "inv"), "migrate-host", "--homeserver", "one.test", "--to", "vps3"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _kill_at(proc, "stopped on vps1")
    assert "stopped on vps1" in out, out
    res = inv_cli(["migrate-host", "--homeserver", "one.test", "--abort"], world["inventory"], timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "aborted" in res.stdout
    assert on_host("vps3", "test -e /opt/matrix/synapse/one.test && echo left || echo clean").strip() == "clean"
    on_host("vps1", "for i in $(seq 90); do docker ps --filter label=com.docker.compose.project=synapse-one-test --filter label=com.docker.compose.service=synapse "
                    "--format '{{.Status}}' | grep -q '(healthy)' && exit 0; sleep 1; done; exit 1")
    assert on_host("vps1", FINGERPRINT).split()[:3] == world["before"][:3]
    want = {"a-before-0", "b-before-2"}
    assert want <= asyncio.run(history("https://matrix.one.test", ALICE, "alice old pw", world["room"], want))
    assert "host: vps1" in world["inventory"].read_text()


def test_migration_keeps_serving_through_the_old_host(world, sandbox):
    inventory, room = world["inventory"], world["room"]
    sent_during: list[str] = []
    stop = threading.Event()

    def bob_keeps_talking():
        async def go():
            async with SandboxClient("https://matrix.two.test", ROOTS) as b:
                await b.login(BOB, "bob pw")
                i = 0
                while not stop.is_set() and i < 600:
                    body = f"b-during-{i}"
                    r = await b.client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": body})
                    if getattr(r, "event_id", None):
                        sent_during.append(body)
                    i += 1
                    await asyncio.sleep(1)
        asyncio.run(go())

    talker = threading.Thread(target=bob_keeps_talking, daemon=True)
    talker.start()
    with Prober(ROOTS) as prober, ArgvSampler() as argv:
        time.sleep(2)
        # killed once in the middle (after the database moved), then completed by re-running
        env = {**os.environ, "INVOKE_INVENTORY": str(inventory)}
        proc = subprocess.Popen([str(BIN / "inv"), "migrate-host", "--homeserver", "one.test", "--to", "vps3"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = _kill_at(proc, "database streamed")
        assert "database streamed" in out, out
        res = inv_cli(["migrate-host", "--homeserver", "one.test", "--to", "vps3"], inventory, timeout=900)
        print(res.stdout, res.stderr)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "resuming the migration" in res.stdout and "done: one.test runs on vps3" in res.stdout
        time.sleep(3)
    stop.set()
    talker.join(30)
    print(f"prober: {prober.ok} ok, {prober.failed} failed, downtime {prober.downtime:.1f}s")
    text = inventory.read_text()
    assert "host: vps3" in text and "migrated_from: vps1" in text
    assert "# Copy this file for real hosts" in text  # comments survive the edit

    # DNS still points at vps1: it forwards; the old password works; full history
    assert resolve("matrix.one.test") == sandbox.hosts["vps1"].ip
    assert "one.test-forward.conf" in on_host("vps1", "ls /opt/matrix/reverse_proxy/nginx/conf.d")
    asyncio.run(send("https://matrix.one.test", ALICE, "alice old pw", room, [f"a-after-{RUN}"]))
    # EVERY message bob sent while one.test moved arrived, and the outage a client saw
    # is bounded (generous: it catches a broken forwarder, not a slow machine; the
    # benchmark prints the real figure)
    assert sent_during, "bob sent nothing during the migration"
    want = {"a-before-0", "b-before-2", f"a-after-{RUN}"} | set(sent_during)
    seen = asyncio.run(history("https://matrix.one.test", ALICE, "alice old pw", room, want))
    assert want <= seen, want - seen
    assert prober.downtime < 60, f"clients saw {prober.downtime:.1f}s of outage"
    # two.test federates through the forwarding
    assert delivered_to_alice(room, f"b-via-forward-{RUN}")

    # no secret of one.test (its database password, Synapse's generated secrets, its
    # signing key) was in any process's argv, here or on either host, while it moved
    assert argv.containing("pg_dump") and argv.passes > 100  # the sampler saw the hosts' side
    base = "/opt/matrix/synapse/one.test"
    values = on_host("vps3", f"cat {base}/secrets/postgres_password; echo; "
                             f"sed -n 's/^\\(registration_shared_secret\\|macaroon_secret_key\\|form_secret\\): *//p' "
                             f"{base}/data/homeserver.yaml; awk '{{print $3}}' {base}/data/one.test.signing.key")
    values = [v.strip().strip('"') for v in values.splitlines() if v.strip()]
    assert len(values) == 5 and all(len(v) >= 16 for v in values), values
    assert [line for v in values for line in argv.containing(v)] == []

    # the same keys, media and users as before
    after = on_host("vps3", FINGERPRINT).split()
    assert after[:3] == world["before"][:3]
    assert int(after[3]) >= int(world["before"][3])


def test_after_dns_change_federation_goes_direct(world, sandbox):
    vps3 = sandbox.hosts["vps3"].ip
    for name in ONE_NAMES:
        sb.set_dns(name, vps3)
    room = world["room"]
    # one.test speaks first: an incoming transaction makes two.test retry one.test at
    # once, in case a request of its own failed while the DNS record was replaced
    # (Synapse backs off from a destination that failed, for minutes)
    asyncio.run(send("https://matrix.one.test", ALICE, "alice old pw", room, [f"a-direct-{RUN}"]))
    assert f"a-direct-{RUN}" in asyncio.run(
        history("https://matrix.two.test", BOB, "bob pw", room, {f"a-direct-{RUN}"}))
    assert delivered_to_alice(room, f"b-direct-{RUN}")
    log = on_host("vps3", f"docker logs {ctr('synapse-fabric-proxy', 'nginx')} 2>/dev/null | grep '_matrix/federation' | tail -n 50")
    assert sandbox.hosts["vps2"].ip in log, "two.test never reached vps3 directly"


def test_finish_removes_the_old_copy_and_keeps_the_others(world):
    res = inv_cli(["migrate-host", "--homeserver", "one.test", "--finish", "--yes"], world["inventory"], timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    listing = on_host("vps1", "ls /opt/matrix/synapse /opt/matrix/reverse_proxy/nginx/conf.d /opt/matrix/backups")
    assert "one.test" not in listing.split("/opt/matrix/backups")[0]
    assert "one.test-" in listing.split("/opt/matrix/backups")[1]  # the archive
    assert "migrated_from" not in world["inventory"].read_text()
    assert "three.test" in listing
    res = run(["inv", "check", "--homeserver", "three.test"])
    assert res.returncode == 0, res.stdout
    res = run(["inv", "check", "--homeserver", "one.test"], world["inventory"])
    assert res.returncode == 0, res.stdout
