"""Synapse workers (issue #18): five.test on vps1 with the `balanced` preset (sync,
client, federation reader and sender, event persister, media, pusher, background),
Redis (Valkey) between them, nginx routing each path to its kind.

What a user sees: log in, sync, create a room, send, upload and download media,
read the history, and federate with two.test (vps2). What the processes say: each
request was served by the worker its kind names (the access log lines carry the
listener's tag, the worker's name), the main process served no /sync, the event
persister wrote the events, and the federation sender sent them. A no-op deploy
changes nothing; a sync worker that is down is covered by the main process (and
`inv check` says so) until a deploy starts it again. Then the set changes: a second
sync worker is started alone (nothing else restarts), removed again; a second
event persister and a stream writer restart every Synapse process (not PostgreSQL,
not Redis), and the stream writer serves typing and read receipts; `inv check`
finds every worker healthy and each routed kind served by its workers.

Then the client worker and the federation sender move to vps3 (workers.hosts): they
run there with copies of five.test's keys and secrets, reach main, PostgreSQL and
Redis on vps1 over the sandbox's private network, serve and send what their kinds
name; none of the ports between them answers from outside or from vps2 (on the
private network, not one of five.test's hosts); a no-op deploy of both hosts changes
nothing; inv check asks vps3 for its workers; moved back, vps3 keeps nothing.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import secrets
import subprocess
from pathlib import Path

import pytest
from nio import (LoginResponse, RoomCreateResponse, RoomSendResponse, RoomTypingResponse, SyncResponse,
                 UpdateReceiptMarkerResponse)

from tests.e2e.helpers import BIN, REPO, ROOTS, on_host, run, variant
from tests.e2e.test_federation import converse, register
from tests.e2e.test_uninstall import _add, _names
from tests.sandbox import sandbox as sb
from tests.sandbox.client import SandboxClient
from tests.sandbox.portscan import open_tcp_ports

pytestmark = pytest.mark.e2e

SN = "five.test"
PROJECT = "synapse-five-test"
RUN = secrets.token_hex(3)
MEDIA = secrets.token_bytes(20000)


def _inventory(vps3_firewall: bool = False, **workers) -> Path:
    """hosts.yaml with five.test on vps1 with these workers (always the same file)."""
    def change(doc):
        _add(doc, SN, "vps1")
        doc["homeservers"][SN]["workers"] = workers
        if vps3_firewall:
            doc["hosts"]["vps3"]["firewall"] = {"enabled": True}
    return variant("workers", change)


AWAY = "synapse-five-test-workers"  # the compose project of five.test's workers on vps3
PRIVATE = {"vps1": "10.231.0.11", "vps3": "10.231.0.13"}


def _probe(from_host: str, address: str, ports) -> dict[int, bool]:
    """Which TCP ports of `address` accept a connection from `from_host`."""
    script = "".join(f"if timeout 3 bash -c '</dev/tcp/{address}/{p}' 2>/dev/null; then echo {p} open; "
                     f"else echo {p} closed; fi\n" for p in ports)
    out = on_host(from_host, script)
    return {int(p): state == "open" for p, state in (line.split() for line in out.splitlines() if line.strip())}


def _away_started() -> set[str]:
    out = on_host("vps3", f"docker ps --filter label=com.docker.compose.project={AWAY} "
                          "--format '{{.Label \"com.docker.compose.service\"}}'")
    return set(out.split())


def _logs(service: str, since: str = "") -> str:
    """A service's container output (Synapse logs to it), from `since` on."""
    flag = f" --since {since}" if since else ""
    return on_host("vps1", f"docker logs{flag} {PROJECT}-{service}-1 2>&1 || true")


def _started() -> dict[str, str]:
    out = on_host("vps1", "docker ps --filter label=com.docker.compose.project=" + PROJECT +
                  " --format '{{.Label \"com.docker.compose.service\"}} {{.ID}}' | while read -r s id; do "
                  "printf '%s %s\\n' \"$s\" \"$(docker inspect -f '{{.State.StartedAt}}' \"$id\")\"; done")
    return dict(line.split(" ", 1) for line in out.splitlines() if line.strip())


def _now() -> str:
    return on_host("vps1", "date -u +%Y-%m-%dT%H:%M:%S").strip()


def _deploy(inv) -> str:
    res = run(["inv", "deploy", "--host", "vps1"], inv)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


async def _use(user: str, password: str) -> str:
    """Log in, create a room, send, upload and download, read the history back;
    returns the room."""
    async with SandboxClient(f"https://matrix.{SN}", ROOTS) as a:
        assert isinstance(await a.login(user, password), LoginResponse)
        assert isinstance(await a.client.sync(timeout=0), SyncResponse)
        created = await a.client.room_create(name=f"workers {RUN}")
        assert isinstance(created, RoomCreateResponse), created
        room = created.room_id
        for i in range(3):
            sent = await a.client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": f"m{i} {RUN}"})
            assert isinstance(sent, RoomSendResponse), sent
        up, _ = await a.client.upload(io.BytesIO(MEDIA), content_type="application/octet-stream",
                                      filesize=len(MEDIA))
        server, media_id = up.content_uri.removeprefix("mxc://").split("/")
        async with a.client.client_session.get(
                f"https://matrix.{SN}/_matrix/client/v1/media/download/{server}/{media_id}",
                headers={"Authorization": f"Bearer {a.client.access_token}"}, ssl=a.ctx) as resp:
            assert resp.status == 200 and await resp.read() == MEDIA
        status, page = await a.get(f"/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=50")
        assert status == 200, page
        bodies = [e["content"]["body"] for e in page["chunk"] if e["type"] == "m.room.message"]
        assert bodies == [f"m{i} {RUN}" for i in range(3)]
        return room


async def _sync_once(user: str, password: str) -> None:
    async with SandboxClient(f"https://matrix.{SN}", ROOTS) as a:
        assert isinstance(await a.login(user, password), LoginResponse)
        assert isinstance(await a.client.sync(timeout=0), SyncResponse)


async def _typing_and_receipt(user: str, password: str, room: str) -> None:
    """Typing in `room`, and a read receipt for a new message there."""
    async with SandboxClient(f"https://matrix.{SN}", ROOTS) as a:
        assert isinstance(await a.login(user, password), LoginResponse)
        assert isinstance(await a.client.room_typing(room, True, 10000), RoomTypingResponse)
        sent = await a.client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": f"read me {RUN}"})
        assert isinstance(sent, RoomSendResponse), sent
        receipt = await a.client.update_receipt_marker(room, sent.event_id)
        assert isinstance(receipt, UpdateReceiptMarkerResponse), receipt


def _served_by(log: str, path_re: str) -> bool:
    """An access-log line of this tagged listener for a request matching path_re."""
    return any(re.search(path_re, line) for line in log.splitlines() if "synapse.access.http." in line)


def test_a_homeserver_with_workers_serves_and_federates_through_them(deployed):
    on_host("vps1", f"rm -f /opt/matrix/.synapse-fabric/uninstalled/{SN}")  # an earlier run's record
    _names(SN, "vps1")
    inv = _inventory(preset="balanced")
    moved = False
    try:
        _deploy(inv)
        assert set(_started()) == {"synapse", "postgres", "redis", "sync-1", "client-1", "federation-reader-1",
                                   "federation-sender-1", "event-persister-1", "media-1", "pusher-1", "background-1"}
        started = _now()
        user = f"wanda-{RUN}"
        register(SN, user, "w pw", inv)
        room = asyncio.run(_use(user, "w pw"))
        converse(SN, "two.test", "workers", inv)

        sync, client, media = _logs("sync-1", started), _logs("client-1", started), _logs("media-1", started)
        assert _served_by(sync, r"synapse\.access\.http\.sync-1 .*GET /_matrix/client/v3/sync"), sync[-3000:]
        assert _served_by(client, r"synapse\.access\.http\.client-1 .*POST /_matrix/client/v3/login"), client[-3000:]
        assert _served_by(client, r"client-1 .*PUT /_matrix/client/v3/rooms/.*/send/"), client[-3000:]
        assert _served_by(media, r"media-1 .*POST /_matrix/media/v3/upload"), media[-3000:]
        assert _served_by(media, r"media-1 .*GET /_matrix/client/v1/media/download/"), media[-3000:]
        persister = _logs("event-persister-1", started)
        assert _served_by(persister, r"event-persister-1 .*POST /_synapse/replication/send_events"), persister[-3000:]
        reader = _logs("federation-reader-1", started)
        assert _served_by(reader, r"federation-reader-1 .*PUT /_matrix/federation/v1/send/"), reader[-3000:]
        sender = _logs("federation-sender-1", started)
        assert "two.test" in sender, sender[-3000:]
        # the main process served none of it
        main = _logs("synapse", started)
        assert not _served_by(main, r"/_matrix/client/v3/sync|/send/|/media/"), main[-3000:]

        # nothing changed: nothing changes
        res = run(["inv", "deploy", "--host", "vps1"], inv)
        assert res.returncode == 0 and "vps1: 0 changed" in res.stdout and "restarted 0" in res.stdout, res.stdout

        # a sync worker that is down: its users' syncs go to the main process, and check says so
        on_host("vps1", f"docker stop {PROJECT}-sync-1-1 >/dev/null")
        since = _now()
        asyncio.run(_sync_once(user, "w pw"))
        assert _served_by(_logs("synapse", since), r"GET /_matrix/client/v3/sync")
        res = run(["inv", "check", "--homeserver", SN], inv)
        assert res.returncode == 1, res.stdout
        assert re.search(rf"^FAIL +{SN} +worker sync-1 healthy +(exited|unhealthy)", res.stdout, re.M), res.stdout
        assert re.search(rf"^FAIL +{SN} +sync request reaches a sync worker +no sync worker", res.stdout, re.M)
        out = _deploy(inv)  # the deploy sees it stopped and starts it
        assert f"{SN} (up)" in out and "sync-1" in _started()

        # a second sync worker: it alone starts, nginx reloads, nothing restarts
        before = _started()
        out = _deploy(_inventory(preset="balanced", sync=2))
        after = _started()
        assert "sync-2" in after and {s: after[s] for s in before} == before, (before, after)
        assert "nginx (reload)" in out and f"{SN} (restart)" not in out, out
        assert "synapse-five-test-sync-2" in on_host(
            "vps1", f"cat /opt/matrix/reverse_proxy/nginx/conf.d/matrix.{SN}.conf")
        # and gone again: it alone stops
        _deploy(_inventory(preset="balanced"))
        again = _started()
        assert "sync-2" not in again and again == before, (before, again)

        # a second event persister and a stream writer: every process loads the new
        # stream writers, so all restart
        before = _started()
        out = _deploy(_inventory(preset="balanced", event_persister=2, stream_writer=1))
        after = _started()
        assert f"{SN} (restart)" in out, out
        assert {"event-persister-2", "stream-writer-1"} <= set(after) and all(
            after[s] != before[s] for s in before if s not in ("postgres", "redis")), (before, after)
        assert after["postgres"] == before["postgres"] and after["redis"] == before["redis"]
        asyncio.run(_sync_once(user, "w pw"))
        started = _now()
        asyncio.run(_typing_and_receipt(user, "w pw", room))
        writer = _logs("stream-writer-1", started)
        assert _served_by(writer, r"stream-writer-1 .*PUT /_matrix/client/v3/rooms/.*/typing/"), writer[-3000:]
        assert _served_by(writer, r"stream-writer-1 .*POST /_matrix/client/v3/rooms/.*/receipt/"), writer[-3000:]
        _deploy(_inventory(preset="balanced"))  # (the same file: rewritten)
        assert {"event-persister-2", "stream-writer-1"}.isdisjoint(_started())

        # inv check: every worker healthy, each routed kind answered by a worker of that kind
        res = run(["inv", "check", "--homeserver", SN], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        for line in ("worker event-persister-1 healthy", "sync request reaches a sync worker",
                     "media request reaches a media worker", "federation_reader request reaches"):
            assert re.search(rf"^OK +{SN} +{line}", res.stdout, re.M), res.stdout
        assert "served by sync-1" in res.stdout

        # -- some workers on another host (vps3), over the private network --------------
        away = _inventory(vps3_firewall=True, preset="balanced", hosts={"client": "vps3", "federation_sender": "vps3"})
        both = ["inv", "deploy", "--host", "vps1", "--host", "vps3"]
        moved = True
        # vps1 first (it publishes what vps3's workers reach), then vps3 from bare:
        # bootstrap installs Docker where missing, then deploys its part
        res = run(["inv", "deploy", "--host", "vps1"], away)
        assert res.returncode == 0, res.stdout + res.stderr
        res = run(["fab", "-H", "vps3", "bootstrap"], away)
        assert res.returncode == 0, res.stdout + res.stderr
        assert _away_started() == {"client-1", "federation-sender-1"}, res.stdout
        assert {"client-1", "federation-sender-1"}.isdisjoint(_started())
        started = _now()
        asyncio.run(_use(user, "w pw"))
        converse(SN, "two.test", "workers-away", away)
        client = on_host("vps3", f"docker logs --since {started} {AWAY}-client-1-1 2>&1")
        assert _served_by(client, r"client-1 .*POST /_matrix/client/v3/login"), client[-3000:]
        assert _served_by(client, r"client-1 .*PUT /_matrix/client/v3/rooms/.*/send/"), client[-3000:]
        sender = on_host("vps3", f"docker logs --since {started} {AWAY}-federation-sender-1-1 2>&1")
        assert "two.test" in sender, sender[-3000:]
        # PostgreSQL, Redis and main's replication listener (7100-7102), and the client
        # worker's HTTP listener on vps3 (7142): from outside (this machine, not on the
        # private network) no port of the range answers on either public address; on
        # the private network the homeserver's own hosts reach them, vps2 does not
        for address in ("172.29.231.11", "172.29.231.13"):
            assert open_tcp_ports(address, range(7100, 7400)) == [], address
        assert _probe("vps3", PRIVATE["vps1"], [7100, 7101, 7102]) == {7100: True, 7101: True, 7102: True}
        assert _probe("vps2", PRIVATE["vps1"], [7100, 7101, 7102]) == {7100: False, 7101: False, 7102: False}
        assert _probe("vps1", PRIVATE["vps3"], [7142]) == {7142: True}
        assert _probe("vps2", PRIVATE["vps3"], [7142]) == {7142: False}
        res = run(both, away)
        assert res.returncode == 0, res.stdout + res.stderr
        for host in ("vps1", "vps3"):
            assert re.search(rf"^{host}: 0 changed, \d+ ok, restarted 0 ", res.stdout, re.M), res.stdout
        res = run(["inv", "check", "--homeserver", SN], away)
        assert res.returncode == 0, res.stdout + res.stderr
        assert re.search(rf"^OK +{SN} +worker client-1 healthy +healthy \(on vps3\)", res.stdout, re.M), res.stdout
        assert re.search(rf"^OK +{SN} +client request reaches a client worker", res.stdout, re.M), res.stdout
        # and back: vps3 keeps nothing of five.test (its copies of keys and secrets go too)
        res = run(both, _inventory(vps3_firewall=True, preset="balanced"))
        assert res.returncode == 0, res.stdout + res.stderr
        assert _away_started() == set() and {"client-1", "federation-sender-1"} <= set(_started())
        assert on_host("vps3", "ls -A /opt/matrix/synapse-workers").strip() == ""

    finally:
        # workers back on vps1 (uninstall refuses while some run elsewhere), vps3 as found
        inv = _inventory(preset="balanced")
        if moved:
            run(["inv", "deploy", "--host", "vps1", "--host", "vps3"], inv)
            scratch = variant("workers-vps3", lambda doc: None)
            run(["inv", "uninstall", "--host", "vps3"], scratch)
            scratch.unlink(missing_ok=True)
        subprocess.run([str(BIN / "inv"), "uninstall", "--homeserver", SN, "--no-backup"], cwd=REPO,
                       env={**os.environ, "INVOKE_INVENTORY": str(inv)}, input=f"{SN}\n",
                       text=True, capture_output=True, timeout=600)
        for name in (SN, f"matrix.{SN}"):
            sb.set_dns(name, None)
