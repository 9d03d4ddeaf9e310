"""`inv upgrade` (issue #14, item 1): seven.test (vps2) starts on the previous Synapse
release (1.162.0); a deploy that sees the inventory ask for 1.163.2 keeps it running
and says so; `inv upgrade` moves it with a dump first, keeping users, rooms and
history; a "new" Synapse that breaks half-way through its migrations is rolled back
by itself: the previous image on the database as it was."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess

import pytest
from nio import LoginResponse, RoomCreateResponse

from fabfile.schema import DEFAULT_IMAGES
from tests.e2e.helpers import BIN, REPO, ROOTS, ctr, https_get, on_host, run, variant
from tests.e2e.test_uninstall import _add, _names
from tests.e2e.test_users import cli
from tests.sandbox import images, sandbox as sb
from tests.sandbox.client import SandboxClient

pytestmark = pytest.mark.e2e

RUN = secrets.token_hex(3)
SN = "seven.test"
PREV, NEW = "matrixdotorg/synapse:v1.162.0", DEFAULT_IMAGES["synapse"]
USER = f"uma-{RUN}"


def _inventory(name: str, synapse: str):
    def change(doc):
        _add(doc, SN, "vps2")
        doc["images"] = {"synapse": synapse}
    return variant(name, change)


def _running() -> str:
    return on_host("vps2", f"docker inspect -f '{{{{.Config.Image}}}}' {ctr('synapse-seven-test', 'synapse')}").strip()


def _version() -> str:
    status, _, body = https_get(f"matrix.{SN}", "/_matrix/federation/v1/version")
    assert status == 200, body
    return json.loads(body)["server"]["version"]


def _history(room: str | None = None) -> tuple[str, list[str]]:
    async def go():
        async with SandboxClient(f"https://matrix.{SN}", ROOTS) as c:
            assert isinstance(await c.login(USER, "uma pw"), LoginResponse)
            rid = room
            if rid is None:
                created = await c.client.room_create(name="before the upgrade")
                assert isinstance(created, RoomCreateResponse), created
                rid = created.room_id
                for i in range(3):
                    await c.client.room_send(rid, "m.room.message", {"msgtype": "m.text", "body": f"kept {i}"})
            status, page = await c.get(f"/_matrix/client/v3/rooms/{rid}/messages?dir=f&limit=100")
            assert status == 200, page
            return rid, [e["content"]["body"] for e in page["chunk"] if e["type"] == "m.room.message"]
    return asyncio.run(go())


def test_upgrade_keeps_everything_and_a_broken_new_synapse_is_rolled_back(deployed):
    on_host("vps2", f"rm -f /opt/matrix/.synapse-fabric/uninstalled/{SN}")  # an earlier run's
    _names(SN, "vps2")
    old_inv = _inventory("upgrade-old", PREV)
    new_inv = _inventory("upgrade-new", NEW)
    broken_inv = _inventory("upgrade-broken", images.tag_of("synapse-broken"))
    try:
        res = run(["inv", "deploy", "--host", "vps2"], old_inv)
        assert res.returncode == 0, res.stderr
        # two.test already runs the newer image: the deploy keeps it, and says why
        assert f"two.test: keeps running {NEW}" in res.stdout and "inv upgrade" in res.stdout
        assert _version() == "1.162.0" and _running() == PREV
        assert cli(["inv", "register-user", "--homeserver", SN, "--user", USER], "uma pw", old_inv).returncode == 0
        room, before = _history()
        assert before == ["kept 0", "kept 1", "kept 2"]

        # a plain deploy never swaps Synapse's image
        res = run(["inv", "deploy", "--host", "vps2"], new_inv)
        assert res.returncode == 0 and f"{SN}: keeps running {PREV}" in res.stdout, res.stdout
        assert _running() == PREV
        res = run(["inv", "upgrade", "--check"], new_inv)
        assert res.returncode == 0, res.stderr
        assert f"{SN} (vps2): runs {PREV}, the inventory asks for {NEW}" in res.stdout
        assert f"two.test (vps2): runs {NEW}: up to date" in res.stdout
        assert _running() == PREV

        res = run(["inv", "upgrade", "--homeserver", SN], new_inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"{SN}: runs {NEW} (downtime" in res.stdout
        assert _version() == "1.163.2" and _running() == NEW
        assert _history(room)[1] == before
        res = run(["inv", "upgrade", "--homeserver", SN], new_inv)  # again: nothing to do
        assert res.returncode == 0 and "nothing to upgrade" in res.stdout

        # a new Synapse that moves the schema, then dies: rolled back by itself
        res = run(["inv", "upgrade", "--homeserver", SN], broken_inv)
        assert res.returncode == 1, res.stdout + res.stderr
        assert "failed and was rolled back" in res.stderr and f"{NEW} runs again" in res.stderr
        assert _running() == NEW and _version() == "1.163.2"
        assert _history(room)[1] == before
        schema = on_host("vps2", f"docker exec {ctr('synapse-seven-test', 'postgres')} psql -At -U synapse -d synapse "
                                 "-c 'SELECT version FROM schema_version'").strip()
        assert schema != "9999"
        logs = on_host("vps2", f"cat /opt/matrix/.synapse-fabric/upgrade/{SN}/*/failed-synapse.log")
        assert "failing on purpose" in logs
    finally:
        subprocess.run([str(BIN / "inv"), "uninstall", "--homeserver", SN, "--no-backup"], cwd=REPO,
                       env={**os.environ, "INVOKE_INVENTORY": str(new_inv)}, input=f"{SN}\n", text=True,
                       capture_output=True, timeout=600)
        for name in (SN, f"matrix.{SN}"):
            sb.set_dns(name, None)
