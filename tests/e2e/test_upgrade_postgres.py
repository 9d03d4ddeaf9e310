"""`inv upgrade-postgres` (issue #14, item 2): eight.test (vps1) was made on
PostgreSQL 15; a filesystem too small for a second copy is refused before anything
stops; then 15 -> 17 beside the old cluster keeps users, rooms, messages, media and
federation; --rollback returns to 15 (without what was written on 17); --finish
removes the old directory. Its directory is a tmpfs of a chosen size (the "disk")."""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import subprocess

import pytest
import yaml
from nio import LoginResponse, RoomCreateResponse

from tests.e2e.helpers import BIN, REPO, ROOTS, on_host, run, variant
from tests.e2e.test_restore import _wait_for
from tests.e2e.test_uninstall import _add, _names
from tests.e2e.test_users import cli
from tests.sandbox import sandbox as sb
from tests.sandbox.client import SandboxClient

pytestmark = pytest.mark.e2e

RUN = secrets.token_hex(3)
SN = "eight.test"
ROOT = f"/opt/matrix/synapse/{SN}"
ALICE, BOB = f"ada-{RUN}", f"ben-{RUN}"
MEDIA = secrets.token_bytes(3000)


def _inventory_image(inv):
    return (yaml.safe_load(inv.read_text())["homeservers"][SN].get("postgres") or {}).get("image")


def _pg_version() -> str:
    return on_host("vps1", f"cat {ROOT}/postgres/PG_VERSION").strip()


async def _scene() -> tuple[str, str]:
    async with SandboxClient(f"https://matrix.{SN}", ROOTS) as a, \
            SandboxClient("https://matrix.two.test", ROOTS) as b:
        assert isinstance(await a.login(ALICE, "ada pw"), LoginResponse)
        assert isinstance(await b.login(BOB, "ben pw"), LoginResponse)
        room = await a.client.room_create(name="on 15", invite=[f"@{BOB}:two.test"])
        assert isinstance(room, RoomCreateResponse), room
        for _ in range(30):
            if (await b.client.join(room.room_id)).__class__.__name__ == "JoinResponse":
                break
            await asyncio.sleep(1)
        up, _ = await a.client.upload(io.BytesIO(MEDIA), content_type="application/octet-stream", filesize=len(MEDIA))
        for body in ("one", "two"):
            await a.client.room_send(room.room_id, "m.room.message", {"msgtype": "m.text", "body": body})
        await _wait_for(b, room.room_id, "two")
        return room.room_id, up.content_uri


def _sees(room: str, mxc: str, say: str | None = None) -> list[str]:
    """alice logs in, reads the room and the attachment; with `say`, a message goes
    both ways with two.test."""
    async def go():
        async with SandboxClient(f"https://matrix.{SN}", ROOTS) as a, \
                SandboxClient("https://matrix.two.test", ROOTS) as b:
            assert isinstance(await a.login(ALICE, "ada pw"), LoginResponse)
            server, media_id = mxc.removeprefix("mxc://").split("/")
            async with a.client.client_session.get(
                    f"https://matrix.{SN}/_matrix/client/v1/media/download/{server}/{media_id}",
                    headers={"Authorization": f"Bearer {a.client.access_token}"}, ssl=a.ctx) as resp:
                assert resp.status == 200 and await resp.read() == MEDIA
            if say:
                assert isinstance(await b.login(BOB, "ben pw"), LoginResponse)
                await a.client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": f"ada {say}"})
                await _wait_for(b, room, f"ada {say}")
                await b.client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": f"ben {say}"})
                await _wait_for(a, room, f"ben {say}")
            status, page = await a.get(f"/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=100")
            assert status == 200
            return [e["content"].get("body") for e in page["chunk"] if e["type"] == "m.room.message"]
    return asyncio.run(go())


def test_postgres_15_to_17_beside_the_old_one_with_rollback_and_finish(deployed):
    def change(doc):
        _add(doc, SN, "vps1")
        doc["homeservers"][SN]["postgres"] = {"image": "postgres:15-bookworm"}
    inv = variant("pg-upgrade", change)
    _names(SN, "vps1")
    on_host("vps1", f"rm -f /opt/matrix/.synapse-fabric/uninstalled/{SN}; mkdir -p {ROOT}; "
                    f"mountpoint -q {ROOT} || mount -t tmpfs -o size=140m,mode=755 tmpfs {ROOT}")
    try:
        assert run(["inv", "deploy", "--host", "vps1"], inv).returncode == 0
        assert _pg_version() == "15"
        assert cli(["inv", "register-user", "--homeserver", SN, "--user", ALICE], "ada pw", inv).returncode == 0
        assert cli(["inv", "register-user", "--homeserver", "two.test", "--user", BOB], "ben pw", inv).returncode == 0
        room, mxc = asyncio.run(_scene())

        # a filesystem without room for a second copy: refused, nothing stopped
        res = run(["inv", "upgrade-postgres", "--homeserver", SN, "--to", "17"], inv)
        assert res.returncode == 2 and "not enough space" in res.stderr and "nothing was changed" in res.stderr
        assert _pg_version() == "15" and "one" in _sees(room, mxc)

        on_host("vps1", f"mount -o remount,size=600m {ROOT}")
        res = run(["inv", "upgrade-postgres", "--homeserver", SN, "--to", "17"], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "the same row counts in PostgreSQL 15 and 17" in res.stdout and "downtime" in res.stdout
        assert _pg_version() == "17" and on_host("vps1", f"cat {ROOT}/postgres-15.old/PG_VERSION").strip() == "15"
        assert _inventory_image(inv) is None  # the default (17) now
        collation = on_host("vps1", "docker exec $(docker ps -q --filter label=com.docker.compose.project="
                                    "synapse-eight-test --filter label=com.docker.compose.service=postgres) "
                                    "psql -At -U synapse -d synapse -c "
                                    "\"SELECT datcollate, datctype, pg_encoding_to_char(encoding) FROM pg_database "
                                    "WHERE datname = 'synapse'\"").strip()
        assert collation == "C|C|UTF8"
        seen = _sees(room, mxc, say="on 17")
        assert seen[:2] == ["one", "two"] and "ben on 17" in seen
        # a second deploy changes nothing
        res = run(["inv", "deploy", "--host", "vps1"], inv)
        assert res.returncode == 0 and "vps1: 0 changed" in res.stdout, res.stdout

        res = run(["inv", "upgrade-postgres", "--homeserver", SN, "--rollback"], inv)
        assert res.returncode == 0 and "back on PostgreSQL 15" in res.stdout, res.stdout + res.stderr
        assert _pg_version() == "15" and _inventory_image(inv) == "postgres:15-bookworm"
        seen = _sees(room, mxc)
        assert seen[:2] == ["one", "two"] and "ada on 17" not in seen

        assert run(["inv", "upgrade-postgres", "--homeserver", SN, "--to", "17"], inv).returncode == 0
        res = run(["inv", "upgrade-postgres", "--homeserver", SN, "--finish"], inv)
        assert res.returncode == 0 and "finished" in res.stdout
        assert on_host("vps1", f"ls {ROOT}").split().count("postgres-15.old") == 0 and _pg_version() == "17"
        assert "one" in _sees(room, mxc, say="finished")
    finally:
        on_host("vps1", f"cd {ROOT} 2>/dev/null && docker compose down >/dev/null 2>&1; cd /; "
                        f"docker rm -f synapse-fabric-pg17-eight-test >/dev/null 2>&1; umount {ROOT}; true")
        subprocess.run([str(BIN / "inv"), "uninstall", "--homeserver", SN, "--no-backup"], cwd=REPO,
                       env={**os.environ, "INVOKE_INVENTORY": str(inv)}, input=f"{SN}\n", text=True,
                       capture_output=True, timeout=600)
        for name in (SN, f"matrix.{SN}"):
            sb.set_dns(name, None)
