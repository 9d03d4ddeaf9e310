"""`inv migrate-host` cut at every phase boundary (the task killed, its SSH
connections gone), then resumed or aborted: after every sequence exactly one copy
of the homeserver serves, every message sent before the cut is readable, and the
signing key is the original. A rollback that cannot reach the new host leaves the
old copy stopped (never two copies) and is finished by the next run. Then the
stale inventory: a deploy that would start the handed-over copy again is refused.

three.test (vps1) moves to vps3 and, at the end, back, so the later tests find it
where hosts.yaml says. Uses its own copy of hosts.yaml, which the migration edits.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import subprocess

import pytest
from nio import RoomCreateResponse

from tests.e2e.helpers import BIN, INVENTORY, REPO, on_host, run
from tests.e2e.test_z_migrate import ROOTS, _kill_at, history, inv_cli, register, send
from tests.sandbox import sandbox as sb
from tests.sandbox.client import SandboxClient

pytestmark = pytest.mark.e2e

HS = "three.test"
URL = "https://matrix.three.test"
NAMES = ["three.test", "matrix.three.test"]
RUN = secrets.token_hex(3)
USER, PASSWORD = f"carol-{RUN}", "carol pw"
BEFORE_SWITCH = ["copied", "stopped", "restored", "started"]

FINGERPRINT = r"""
cd /opt/matrix/synapse/three.test
sha256sum data/three.test.signing.key | cut -d' ' -f1
pg=$(docker ps -q --filter label=com.docker.compose.project=synapse-three-test --filter label=com.docker.compose.service=postgres)
docker exec $pg psql -U synapse -d synapse -tAc "SELECT md5(string_agg(name || coalesce(password_hash,''), ',' ORDER BY name)) FROM users"
"""
RUNNING = ("docker ps -q --filter label=com.docker.compose.project=synapse-three-test "
           "--filter label=com.docker.compose.service=synapse --filter status=running | wc -l")


def running_copies() -> dict[str, int]:
    out = {}
    for host in ("vps1", "vps3"):
        res = on_host(host, f"command -v docker >/dev/null && {RUNNING} || echo 0")
        out[host] = int(res.strip() or 0)
    return out


def migrate_until(inventory, marker: str, *extra: str) -> str:
    """Run the migration and kill it (SIGKILL: its SSH connections die with it)
    right after it logs `marker`."""
    proc = subprocess.Popen([str(BIN / "inv"), "migrate-host", "--homeserver", HS, *extra],
                            cwd=REPO, env={**os.environ, "INVOKE_INVENTORY": str(inventory)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text = _kill_at(proc, marker)
    assert marker in text, text
    return text


def wait_healthy(host: str) -> None:
    on_host(host, "for i in $(seq 120); do docker ps --filter label=com.docker.compose.project=synapse-three-test "
                  "--filter label=com.docker.compose.service=synapse --format '{{.Status}}' | grep -q '(healthy)' "
                  "&& exit 0; sleep 1; done; exit 1")


@pytest.fixture(scope="module")
def three(deployed, sandbox):
    inventory = REPO / ".e2e-migrate-faults.yaml"
    inventory.write_text(INVENTORY.read_text())
    register(inventory, HS, USER, PASSWORD)

    async def setup():
        async with SandboxClient(URL, ROOTS) as c:
            await c.login(USER, PASSWORD)
            created = await c.client.room_create(name=f"faults {RUN}")
            assert isinstance(created, RoomCreateResponse)
            return created.room_id
    room = asyncio.run(setup())
    sent: list[str] = []

    def say(tag: str) -> None:
        body = f"{tag}-{RUN}"
        asyncio.run(send(URL, USER, PASSWORD, room, [body]))
        sent.append(body)

    say("first")
    return {"inventory": inventory, "room": room, "key": on_host("vps1", FINGERPRINT).split(), "say": say,
            "sent": sent}


def assert_one_copy_with_everything(three, host: str) -> None:
    wait_healthy(host)
    copies = running_copies()
    assert copies[host] == 1 and sum(copies.values()) == 1, copies
    assert on_host(host, FINGERPRINT).split() == three["key"]  # signing key and users
    want = set(three["sent"])
    assert want <= asyncio.run(history(URL, USER, PASSWORD, three["room"], want))


@pytest.mark.parametrize("boundary", BEFORE_SWITCH)
def test_cut_then_abort_leaves_the_old_copy_serving(three, boundary):
    three["say"](f"before-cut-{boundary}")
    migrate_until(three["inventory"], f"step '{boundary}' done", "--to", "vps3")
    assert sum(running_copies().values()) <= 1  # at most one copy at the cut
    res = inv_cli(["migrate-host", "--homeserver", HS, "--abort"], three["inventory"], timeout=600)
    assert res.returncode == 0 and "aborted" in res.stdout, res.stdout + res.stderr
    assert on_host("vps3", "test -e /opt/matrix/synapse/three.test && echo left || echo clean").strip() == "clean"
    assert_one_copy_with_everything(three, "vps1")
    assert "host: vps1" in three["inventory"].read_text()


def test_rollback_that_cannot_reach_the_new_host_keeps_the_old_stopped(three):
    three["say"]("before-unreachable")
    migrate_until(three["inventory"], "step 'started' done", "--to", "vps3")  # the new copy runs
    subprocess.run(["docker", "pause", sb.HOSTS["vps3"].container], check=True)
    try:
        res = inv_cli(["migrate-host", "--homeserver", HS, "--abort"], three["inventory"], timeout=600)
        assert res.returncode != 0
        assert "stays STOPPED" in res.stdout + res.stderr, res.stdout + res.stderr
        assert int(on_host("vps1", RUNNING).strip()) == 0  # never two copies
        # whatever the next run asks, it finishes the rollback first
    finally:
        subprocess.run(["docker", "unpause", sb.HOSTS["vps3"].container], check=True)
    res = inv_cli(["migrate-host", "--homeserver", HS, "--to", "vps3"], three["inventory"], timeout=600)
    assert res.returncode != 0 and "rollback" in res.stdout and "aborted" in res.stdout, res.stdout + res.stderr
    assert_one_copy_with_everything(three, "vps1")


def test_cut_at_every_boundary_then_resume_completes(three):
    inventory = three["inventory"]
    three["say"]("before-the-resumed-migration")  # (nobody serves between the cuts)
    for marker in ["step 'copied' done", "step 'stopped' done", "step 'restored' done", "step 'started' done",
                   "step 'switching' recorded"]:
        migrate_until(inventory, marker, "--to", "vps3")  # the first starts it, the others resume it
        assert sum(running_copies().values()) <= 1
    # past the point of no return: no abort
    res = inv_cli(["migrate-host", "--homeserver", HS, "--abort"], inventory, timeout=300)
    assert res.returncode != 0 and "too late to abort" in res.stdout + res.stderr
    res = inv_cli(["migrate-host", "--homeserver", HS, "--to", "vps3"], inventory, timeout=900)
    assert res.returncode == 0 and "resuming" in res.stdout, res.stdout + res.stderr
    assert "host: vps3" in inventory.read_text()
    three["say"]("through-the-forwarding")  # DNS still says vps1: it forwards
    assert_one_copy_with_everything(three, "vps3")


def test_stale_inventory_cannot_start_the_handed_over_copy(three):
    # the repository's hosts.yaml still places three.test on vps1
    res = run(["inv", "deploy", "--host", "vps1"])
    assert res.returncode == 1
    assert "three.test was moved from vps1 to vps3" in res.stdout + res.stderr
    res = run(["inv", "deploy", "--host", "vps3"])
    assert res.returncode == 1 and "vps3 runs three.test" in res.stdout + res.stderr
    assert running_copies() == {"vps1": 0, "vps3": 1}


def test_finish_then_move_back_where_hosts_yaml_says(three):
    inventory = three["inventory"]
    for name in NAMES:
        sb.set_dns(name, sb.host_addr("vps3"))
    try:
        res = inv_cli(["migrate-host", "--homeserver", HS, "--finish", "--yes", "--no-backup"], inventory, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        # after --finish too, the stale inventory is refused on the old host
        res = run(["inv", "deploy", "--host", "vps1"])
        assert res.returncode == 1 and "three.test was moved from vps1 to vps3" in res.stdout + res.stderr
        res = inv_cli(["migrate-host", "--homeserver", HS, "--to", "vps1"], inventory, timeout=900)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        for name in NAMES:
            sb.set_dns(name, sb.host_addr("vps1"))
    res = inv_cli(["migrate-host", "--homeserver", HS, "--finish", "--yes", "--no-backup"], inventory, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert_one_copy_with_everything(three, "vps1")
    # the repository's inventory is right again: a deploy changes nothing
    res = run(["inv", "deploy", "--host", "vps1"])
    assert res.returncode == 0 and "vps1: 0 changed" in res.stdout, res.stdout + res.stderr
