"""`inv uninstall` (issue #15, item 4): one homeserver off its host after a last
snapshot while the host's others keep serving, and everything synapse-fabric put
on a host. Each on a homeserver of its own (four.test on vps1, five.test on vps3),
in a copy of hosts.yaml that the uninstall edits as it would the operator's."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import ssl
import subprocess

import pytest
from nio import LoginResponse, RoomCreateResponse, RoomSendResponse

from tests.e2e.helpers import BIN, REPO, ROOTS, ctr, https_get, on_host, run, variant
from tests.e2e.test_users import cli
from tests.sandbox import sandbox as sb
from tests.sandbox.client import SandboxClient

pytestmark = pytest.mark.e2e

RUN = secrets.token_hex(3)
TEST_CA = "tests/sandbox/state/acme-roots.pem"


def _add(doc, sn: str, host: str) -> None:
    doc["homeservers"][sn] = {
        "host": host,
        "federation": {"trusted_ca": TEST_CA, "allow_ip_ranges": ["172.29.231.0/24"], "trusted_key_servers": []},
        # the tests' rate limits (hosts.yaml's): they send faster than people do
        "synapse_settings": doc["homeservers"]["one.test"]["synapse_settings"],
    }


def _names(sn: str, host: str):
    for name in (sn, f"matrix.{sn}"):
        sb.set_dns(name, sb.HOSTS[host].ip)


def _started(host: str, project: str) -> str:
    return on_host(host, f"docker inspect -f '{{{{.State.StartedAt}}}}' {ctr(project, 'synapse')}").strip()


async def _say_something(sn: str, user: str, password: str) -> None:
    async with SandboxClient(f"https://matrix.{sn}", ROOTS) as client:
        assert isinstance(await client.login(user, password), LoginResponse)
        room = await client.client.room_create(name="before the end")
        assert isinstance(room, RoomCreateResponse), room
        sent = await client.client.room_send(room.room_id, "m.room.message", {"msgtype": "m.text", "body": "bye"})
        assert isinstance(sent, RoomSendResponse), sent


def _refused_tls(name: str) -> bool:
    try:
        https_get(name, "/_matrix/client/versions")
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    return False


def test_uninstall_one_homeserver_after_a_snapshot_while_the_others_serve(deployed):
    sn = "four.test"
    on_host("vps1", f"rm -f /opt/matrix/.synapse-fabric/uninstalled/{sn}")  # an earlier run's record
    _names(sn, "vps1")
    inv = variant("uninstall-four", lambda doc: _add(doc, sn, "vps1"))
    stale = inv.with_name(".e2e-uninstall-four-stale.yaml")
    try:
        assert run(["inv", "deploy", "--host", "vps1"], inv).returncode == 0
        user = f"ursula-{RUN}"
        assert cli(["inv", "register-user", "--homeserver", sn, "--user", user], "u pw", inv).returncode == 0
        asyncio.run(_say_something(sn, user, "u pw"))
        shutil.copy(inv, stale)
        others = {p: _started("vps1", p) for p in ("synapse-one-test", "synapse-three-test")}

        # --no-backup needs the name typed: anything else removes nothing
        res = subprocess.run([str(BIN / "inv"), "uninstall", "--homeserver", sn, "--no-backup"], cwd=REPO,
                             env={**os.environ, "INVOKE_INVENTORY": str(inv)}, input="four\n",
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "nothing was removed" in res.stderr, res.stdout + res.stderr
        assert https_get(f"matrix.{sn}", "/_matrix/client/versions")[0] == 200

        res = run(["inv", "uninstall", "--homeserver", sn], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "last snapshot" in res.stdout and f"done: {sn} is gone from vps1" in res.stdout

        # gone: its names get no answer, nothing of it is left on the host
        assert _refused_tls(f"matrix.{sn}")
        left = on_host("vps1", f"""cd /opt/matrix
ls -d synapse/{sn} reverse_proxy/certs/{sn} reverse_proxy/well-known/{sn} reverse_proxy/nginx/conf.d/*{sn}* \
  reverse_proxy/acme/letsencrypt/live/{sn} reverse_proxy/acme/letsencrypt/renewal/{sn}.conf 2>/dev/null
docker ps -a --format '{{{{.Names}}}}' | grep four-test
docker network ls --format '{{{{.Name}}}}' | grep four-test
grep -l '{sn}' reverse_proxy/bin/renew-certificates
true""")
        assert left.strip() == "", left
        # the others: still serving, their Synapse not restarted
        assert {p: _started("vps1", p) for p in others} == others
        for name in ("matrix.one.test", "matrix.three.test"):
            assert https_get(name, "/_matrix/client/versions")[0] == 200
        # hosts.yaml no longer names it; the last snapshot holds the dump and the signing key
        assert f"{sn}:" not in inv.read_text()
        last = re.search(r"last snapshot ([0-9a-f]{8})", res.stdout).group(1)
        listed = run(["inv", "backups", "--homeserver", sn], stale)
        assert listed.returncode == 0 and listed.stdout.splitlines()[-1].split()[:2] == [sn, last]
        files = on_host("vps1", "RESTIC_REPOSITORY=/var/backups/synapse-fabric/restic/vps1 "
                                "RESTIC_PASSWORD_FILE=/etc/synapse-fabric/backup/restic-password "
                                f"restic ls latest --tag synapse-fabric:{sn}")
        assert f"/opt/matrix/.synapse-fabric/backup/{sn}/database.pgdump" in files
        assert f"/opt/matrix/synapse/{sn}/data/{sn}.signing.key" in files

        # a stale hosts.yaml cannot start an empty four.test under its name
        res = run(["inv", "deploy", "--host", "vps1"], stale)
        assert res.returncode == 1 and f"{sn} was uninstalled from vps1" in res.stderr + res.stdout
        assert "four-test" not in on_host("vps1", "docker ps -a --format '{{.Names}}'")
        # a re-run (from the stale copy, as after an interrupted run) finishes and says so
        res = run(["inv", "uninstall", "--homeserver", sn], stale)
        assert res.returncode == 0 and "already gone" in res.stdout, res.stdout + res.stderr
    finally:
        for name in (sn, f"matrix.{sn}"):
            sb.set_dns(name, None)
        stale.unlink(missing_ok=True)


def test_uninstall_a_host_removes_everything_synapse_fabric_put_there(deployed):
    sn = "five.test"
    _names(sn, "vps3")
    inv = variant("uninstall-host", lambda doc: _add(doc, sn, "vps3"))
    try:
        res = run(["fab", "-H", "vps3", "bootstrap"], inv)
        assert res.returncode == 0, res.stderr
        assert https_get(f"matrix.{sn}", "/_matrix/client/versions")[0] == 200
        res = run(["inv", "uninstall", "--host", "vps3"], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "done: vps3 holds nothing of synapse-fabric's" in res.stdout
        assert _refused_tls(f"matrix.{sn}")
        left = on_host("vps3", """ls -d /opt/matrix /etc/synapse-fabric/base-dir /etc/systemd/system/synapse-fabric-* \
  /etc/cron.d/synapse-fabric-* 2>/dev/null
docker ps -a -q
docker network ls --format '{{.Name}}' | grep synapse-fabric
systemctl list-timers --all --no-legend | grep synapse-fabric
true""")
        assert left.strip() == "", left
        # Docker and the last snapshot stay
        assert on_host("vps3", "docker info -f '{{.ServerVersion}}'").strip()
        assert sn in on_host("vps3", "RESTIC_REPOSITORY=/var/backups/synapse-fabric/restic/vps3 "
                                     "RESTIC_PASSWORD_FILE=/etc/synapse-fabric/backup/restic-password "
                                     "restic snapshots --json")
        text = inv.read_text()
        assert "vps3:" not in text and f"{sn}:" not in text and "vps1:" in text
    finally:
        for name in (sn, f"matrix.{sn}"):
            sb.set_dns(name, None)
