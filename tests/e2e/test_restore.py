"""Backups and restore (issue #14, item 3): six.test (vps1) is backed up into the
sandbox's backup store (restic's REST server) while its user is sending messages,
destroyed, restored on vps1, then lost with vps1's copy and restored onto vps3 (a
bare host when the suite runs from scratch). Each time: the same signing key,
users log in with their passwords, the room's history is there (with no gap in what
was sent during the snapshot), media downloads, and two.test federates with it."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import secrets
import subprocess
import threading
import time

import pytest
from nio import LoginResponse, RoomCreateResponse, RoomSendResponse

from tests.e2e.helpers import BIN, REPO, ROOTS, https_get, on_host, run, variant
from tests.e2e.test_uninstall import _add, _names
from tests.e2e.test_users import cli
from tests.sandbox import sandbox as sb
from tests.sandbox.client import SandboxClient

pytestmark = pytest.mark.e2e

RUN = secrets.token_hex(3)
SN = "six.test"
SIX, TWO = f"https://matrix.{SN}", "https://matrix.two.test"
ALICE, BOB = f"alice-{RUN}", f"bob-r-{RUN}"
KEY = f"/opt/matrix/synapse/{SN}/data/{SN}.signing.key"
MEDIA = secrets.token_bytes(4096)


def _messages(client: SandboxClient, room: str):
    async def go():
        status, page = await client.get(f"/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1000")
        assert status == 200, page
        return [e["content"].get("body") for e in reversed(page["chunk"]) if e["type"] == "m.room.message"]
    return go()


async def _wait_for(client: SandboxClient, room: str, body: str, limit: float = 90, poke=None) -> None:
    """Until `body` is in the room as `client` reads it; `poke()`, if given, every 10 s."""
    deadline = time.monotonic() + limit
    next_poke = time.monotonic() + 10
    while time.monotonic() < deadline:
        if body in await _messages(client, room):
            return
        if poke is not None and time.monotonic() >= next_poke:
            await poke()
            next_poke = time.monotonic() + 10
        await asyncio.sleep(1)
    raise AssertionError(f"{body!r} never reached {client.client.homeserver}")


async def _scene() -> tuple[str, str]:
    """alice (six.test) opens a room with bob (two.test) and an attachment."""
    async with SandboxClient(SIX, ROOTS) as a, SandboxClient(TWO, ROOTS) as b:
        assert isinstance(await a.login(ALICE, "alice pw"), LoginResponse)
        assert isinstance(await b.login(BOB, "bob pw"), LoginResponse)
        room = await a.client.room_create(name=f"restore {RUN}", invite=[f"@{BOB}:two.test"])
        assert isinstance(room, RoomCreateResponse), room
        for _ in range(30):
            if (await b.client.join(room.room_id)).__class__.__name__ == "JoinResponse":
                break
            await asyncio.sleep(1)
        up, _ = await a.client.upload(io.BytesIO(MEDIA), content_type="application/octet-stream",
                                      filesize=len(MEDIA))
        for body in ("hello 1", "hello 2"):
            await a.client.room_send(room.room_id, "m.room.message", {"msgtype": "m.text", "body": body})
        await a.client.room_send(room.room_id, "m.room.message",
                                 {"msgtype": "m.file", "body": "blob", "url": up.content_uri})
        await b.client.room_send(room.room_id, "m.room.message", {"msgtype": "m.text", "body": "from bob"})
        await _wait_for(a, room.room_id, "from bob")
        return room.room_id, up.content_uri


class Sender:
    """alice sends "during N", N = 0, 1, ... while a snapshot is taken."""

    def __init__(self, room: str):
        self.room, self.sent, self._stop = room, 0, threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._loop()), daemon=True)

    async def _loop(self):
        async with SandboxClient(SIX, ROOTS) as a:
            assert isinstance(await a.login(ALICE, "alice pw"), LoginResponse)
            while not self._stop.is_set():
                res = await a.client.room_send(self.room, "m.room.message",
                                               {"msgtype": "m.text", "body": f"during {self.sent}"})
                assert isinstance(res, RoomSendResponse), res  # a refused one would leave a gap
                self.sent += 1
                await asyncio.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(60)


def _prove(room: str, mxc: str, sent_during: int) -> None:
    """What a user sees after a restore: login, history (a prefix of what was sent
    during the snapshot, no gap), the attachment, federation both ways."""
    async def go():
        async with SandboxClient(SIX, ROOTS) as a, SandboxClient(TWO, ROOTS) as b:
            assert isinstance(await a.login(ALICE, "alice pw"), LoginResponse)
            history = await _messages(a, room)
            # bob's message may sit beside alice's attachment in the room's graph
            assert history[:2] == ["hello 1", "hello 2"] and set(history[2:4]) == {"blob", "from bob"}, history[:6]
            during = [int(m.split()[1]) for m in history if m and m.startswith("during ")]
            assert during == list(range(len(during))) and len(during) <= sent_during, during
            server, media_id = mxc.removeprefix("mxc://").split("/")
            async with a.client.client_session.get(
                    f"{SIX}/_matrix/client/v1/media/download/{server}/{media_id}",
                    headers={"Authorization": f"Bearer {a.client.access_token}"}, ssl=a.ctx) as resp:
                assert resp.status == 200 and await resp.read() == MEDIA
            assert isinstance(await b.login(BOB, "bob pw"), LoginResponse)
            # the restored server speaks first: a request from it tells two.test it is back
            # (two.test may have given up on it while it was gone, as any server would)
            mark = secrets.token_hex(3)
            await a.client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": f"alice {mark}"})
            await _wait_for(b, room, f"alice {mark}")
            # two.test may still hold a connection to the old address and give up on the
            # first try (as it would with a lost host); any request from the restored
            # server (here: alice typing) makes it try again at once, on a new connection
            await b.client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": f"bob {mark}"})
            await _wait_for(a, room, f"bob {mark}", limit=120,
                            poke=lambda: a.client.room_typing(room, True, timeout=5000))
    asyncio.run(go())


def _serves(name: str) -> bool:
    try:
        return https_get(name, "/_matrix/client/versions")[0] == 200
    except OSError:  # nginx still looking for the gone upstream, or nothing there
        return False


def _destroy(host: str) -> None:
    on_host(host, f"cd /opt/matrix/synapse/{SN} && (docker compose down || docker-compose down) >/dev/null 2>&1; "
                  f"rm -rf /opt/matrix/synapse/{SN}")


def test_backup_destroy_restore_here_then_onto_a_bare_host(deployed):
    def change(doc):
        _add(doc, SN, "vps1")
        doc["backup"] = {"repository": f"rest:http://store.test:8000/e2e-{RUN}"}
    inv = variant("restore", change)
    _names(SN, "vps1")
    for host in ("vps1", "vps3"):  # an earlier run's copy
        on_host(host, f"rm -f /opt/matrix/.synapse-fabric/uninstalled/{SN}; "
                      f"[ -d /opt/matrix/synapse/{SN} ] && {{ cd /opt/matrix/synapse/{SN} && "
                      f"(docker compose down || docker-compose down); rm -rf /opt/matrix/synapse/{SN}; }} ; true")
    try:
        assert run(["inv", "deploy", "--host", "vps1"], inv).returncode == 0
        assert cli(["inv", "register-user", "--homeserver", SN, "--user", ALICE], "alice pw", inv).returncode == 0
        assert cli(["inv", "register-user", "--homeserver", "two.test", "--user", BOB], "bob pw", inv).returncode == 0
        room, mxc = asyncio.run(_scene())
        key = hashlib.sha256(on_host("vps1", f"cat {KEY}").encode()).hexdigest()

        with Sender(room) as sender:
            time.sleep(1)
            res = run(["inv", "backup", "--homeserver", SN], inv)
            time.sleep(1)
        assert res.returncode == 0 and re.search(rf"{SN}: snapshot [0-9a-f]{{8}}", res.stdout), res.stderr
        assert sender.sent > 5
        listed = run(["inv", "backups", "--homeserver", SN], inv)
        assert listed.returncode == 0 and listed.stdout.count(SN) == 1

        # the homeserver's directory and database are gone; restore on the same host
        _destroy("vps1")
        assert not _serves(f"matrix.{SN}")
        res = run(["inv", "restore", "--homeserver", SN], inv)
        assert res.returncode == 0 and f"done: {SN} runs on vps1" in res.stdout, res.stdout + res.stderr
        assert hashlib.sha256(on_host("vps1", f"cat {KEY}").encode()).hexdigest() == key
        _prove(room, mxc, sender.sent)

        # vps1's copy is lost (and vps1 no longer serves its names: hosts.yaml without
        # it); restore onto vps3 (bare in a fresh sandbox), where DNS now points
        _destroy("vps1")
        assert run(["inv", "deploy", "--host", "vps1"]).returncode == 0
        _names(SN, "vps3")
        res = run(["inv", "restore", "--homeserver", SN, "--to", "vps3"], inv)
        assert res.returncode == 0 and f"done: {SN} runs on vps3" in res.stdout, res.stdout + res.stderr
        assert f"{SN}:\n    host: vps3" in inv.read_text()
        assert hashlib.sha256(on_host("vps3", f"cat {KEY}").encode()).hexdigest() == key
        _prove(room, mxc, sender.sent)
        # a second restore onto vps3 while it runs there needs a yes
        res = run(["inv", "restore", "--homeserver", SN], inv)
        assert res.returncode == 2 and "is running on vps3" in res.stderr
    finally:
        # six.test off vps3 (typed confirmation, no backup), and off vps1's proxy
        subprocess.run([str(BIN / "inv"), "uninstall", "--homeserver", SN, "--no-backup"], cwd=REPO,
                       env={**os.environ, "INVOKE_INVENTORY": str(inv)}, input=f"{SN}\n", text=True,
                       capture_output=True, timeout=600)
        assert run(["inv", "deploy", "--host", "vps1"]).returncode == 0
        for name in (SN, f"matrix.{SN}"):
            sb.set_dns(name, None)


def test_daily_backups_from_the_timer_and_cron_keep_what_the_retention_says(deployed):
    """backup.schedule: vps1 (systemd) runs its backup service from a timer, vps2 (no
    systemd) from cron; each run snapshots every homeserver of its host, then the
    retention (here: one a day) forgets the older. `inv check` fails while a
    scheduled homeserver has no snapshot, and reports the age once it has one."""
    def change(doc):
        doc["backup"] = {"repository": f"rest:http://store.test:8000/daily-{RUN}", "schedule": "04:17",
                         "keep": {"daily": 1, "weekly": 0, "monthly": 0}}
    inv = variant("daily", change)
    try:
        assert run(["inv", "deploy", "--host", "vps1", "--host", "vps2"], inv).returncode == 0
        res = run(["inv", "check", "--homeserver", "two.test"], inv)
        assert res.returncode == 1 and "newest backup snapshot" in res.stdout and "no snapshot yet" in res.stdout
        state = on_host("vps1", "systemctl show -p UnitFileState -p ActiveState synapse-fabric-backup.timer; "
                                "systemctl show -p TimersCalendar synapse-fabric-backup.timer")
        assert "UnitFileState=enabled" in state and "ActiveState=active" in state and "04:17:00" in state
        cron = on_host("vps2", "cat /etc/cron.d/synapse-fabric-backup")
        assert "\n17 4 * * * root /opt/matrix/reverse_proxy/bin/backup " in cron
        for _ in range(2):  # what the timer and cron start, twice the same day
            on_host("vps1", "systemctl start --wait synapse-fabric-backup.service")
            on_host("vps2", "/opt/matrix/reverse_proxy/bin/backup")
        listed = run(["inv", "backups"], inv)
        assert listed.returncode == 0, listed.stderr
        counts = {sn: sum(line.startswith(sn + " ") for line in listed.stdout.splitlines())
                  for sn in ("one.test", "three.test", "two.test")}
        assert counts == {"one.test": 1, "three.test": 1, "two.test": 1}, listed.stdout
        res = run(["inv", "check"], inv)
        rows = [line for line in res.stdout.splitlines() if "newest backup snapshot" in line]
        assert len(rows) == 3 and all(line.startswith("OK") and " h old" in line for line in rows), res.stdout
    finally:
        assert run(["inv", "deploy", "--host", "vps1", "--host", "vps2"]).returncode == 0
    # turned off: no timer, no cron line, no program
    assert on_host("vps1", "ls /etc/systemd/system/ /opt/matrix/reverse_proxy/bin/").count("backup") == 0
    assert on_host("vps2", "ls /etc/cron.d/ /opt/matrix/reverse_proxy/bin/").count("backup") == 0
