"""`inv adopt` (issue #17): two homeservers set up by hand the way the guides do it,
each with users, a room with history and an upload, are brought under management
and keep their identity.

- nine.test: docker-compose with matrixdotorg/synapse and postgres (seeds 000/003:
  ports published, a shared network, `generate` run by hand, the database made with
  the C.UTF-8 locale and Synapse told `allow_unsafe_locale`), adopted where it runs
  (vps3), with an entry the operator wrote in hosts.yaml;
- ten.test: `docker run` with SQLite (Synapse's docker README), adopted onto another
  host (vps3 -> vps1), hosts.yaml's entry made by the adoption from its settings.

Afterwards: the old password logs in, the old messages and the upload are there,
the signing key is the one the old server published, federation with two.test
works, `inv deploy` changes nothing; --finish removes the old containers (files
stay), --abort brings the old deployment back.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import urllib.request

import pytest
import yaml
from nio import LoginResponse, RoomCreateResponse

from fabfile.docker import COMPOSE_FN, push_images
from fabfile.inventory import load
from fabfile.remote import open_remote
from fabfile.schema import DEFAULT_IMAGES
from tests.e2e.helpers import INVENTORY, ROOTS, on_host, run, variant
from tests.e2e.test_federation import converse
from tests.e2e.test_uninstall import TEST_CA
from tests.sandbox import sandbox as sb
from tests.sandbox.client import SandboxClient

pytestmark = pytest.mark.e2e

RUN = secrets.token_hex(3)
SYNAPSE = DEFAULT_IMAGES["synapse"]
OLD_PG = "postgres:15-bookworm"
VPS3 = sb.HOSTS["vps3"].ip
MEDIA = secrets.token_bytes(5000)
RATE_LIMITS = {"rc_login": {"address": {"per_second": 100, "burst_count": 1000},
                            "account": {"per_second": 100, "burst_count": 1000},
                            "failed_attempts": {"per_second": 100, "burst_count": 1000}},
               "rc_message": {"per_second": 100, "burst_count": 1000}}

HANDMADE_COMPOSE = f"""\
version: "3"
services:
  synapse:
    image: {SYNAPSE}
    restart: unless-stopped
    volumes: ["./files:/data"]
    ports: ["8008:8008"]
    depends_on: [db]
    networks: [matrix]
  db:
    image: {OLD_PG}
    restart: unless-stopped
    environment:
      POSTGRES_USER: synapse_user
      POSTGRES_PASSWORD: handmade-db-password
      POSTGRES_DB: synapse
      POSTGRES_INITDB_ARGS: "-E UTF8 --locale=C.UTF-8"
    volumes: ["./schemas:/var/lib/postgresql/data"]
    ports: ["5432:5432"]
    networks: [matrix]
networks:
  matrix: {{}}
"""


def _edit_config(path: str, changes: dict, host: str = "vps3") -> None:
    """What an operator does with an editor: settings added to homeserver.yaml."""
    text = on_host(host, f"cat {path}")
    config = yaml.safe_load(text)
    config.update(changes)
    remote = open_remote(load(INVENTORY), load(INVENTORY).hosts[host])
    try:
        remote.run(f"cat > {path}", stdin=yaml.safe_dump(config).encode(), what="edit homeserver.yaml")
    finally:
        remote.close()


def _images_on_vps3() -> None:
    inv = load(INVENTORY)
    remote = open_remote(inv, inv.hosts["vps3"])
    try:
        have = remote.run(f"docker image inspect {SYNAPSE} {OLD_PG} >/dev/null 2>&1 && echo yes || true",
                          what="images").out.strip()
        if not have:
            push_images(remote, [SYNAPSE, OLD_PG], print)
    finally:
        remote.close()


def _federation(extra: dict | None = None) -> dict:
    """The sandbox's federation settings (its private CA and network) as Synapse's."""
    return {"ip_range_whitelist": ["172.29.231.0/24"], "trusted_key_servers": [], **(extra or {})}


def _handmade_compose(sn: str, root: str) -> None:
    """Seed 000/003: compose file, `generate` by hand, the database section edited in,
    the stack up, an admin registered with register_new_matrix_user."""
    on_host("vps3", COMPOSE_FN + f"if [ -d {root} ]; then (cd {root} && compose down -v) >/dev/null 2>&1; fi\n"
                    f"rm -rf {root} && mkdir -p {root}/files && cat > {root}/docker-compose.yml <<'EOF'\n"
                    f"{HANDMADE_COMPOSE}EOF\n"
                    f"cd {root} && compose run --rm -e SYNAPSE_SERVER_NAME={sn} "
                    "-e SYNAPSE_REPORT_STATS=no synapse generate >/dev/null 2>&1")
    _edit_config(f"{root}/files/homeserver.yaml", {
        "database": {"name": "psycopg2", "allow_unsafe_locale": True, "args": {
            "user": "synapse_user", "password": "handmade-db-password", "database": "synapse", "host": "db",
            "cp_min": 5, "cp_max": 10}},
        "max_upload_size": "100M", **_federation(), **RATE_LIMITS})
    on_host("vps3", COMPOSE_FN + f"cd {root} && compose up -d db >/dev/null 2>&1 && sleep 5 && "
                    "compose up -d >/dev/null 2>&1")


def _handmade_sqlite(sn: str, root: str) -> None:
    """Synapse's docker README: `generate` into a directory, then `docker run` it on SQLite."""
    roots = ROOTS.read_text()
    on_host("vps3", f"rm -rf {root} && mkdir -p {root} && docker rm -f handmade-{sn.split('.')[0]} >/dev/null 2>&1; "
                    f"docker run --rm -v {root}:/data -e SYNAPSE_SERVER_NAME={sn} -e SYNAPSE_REPORT_STATS=no "
                    f"{SYNAPSE} generate >/dev/null 2>&1 && cat > {root}/sandbox-roots.pem <<'EOF'\n{roots}EOF\n")
    _edit_config(f"{root}/homeserver.yaml", {
        **_federation({"federation_custom_ca_list": ["/data/sandbox-roots.pem"]}), **RATE_LIMITS,
        "max_upload_size": "20M"})
    on_host("vps3", f"docker run -d --name handmade-{sn.split('.')[0]} --restart always -v {root}:/data "
                    f"-p 8009:8008 {SYNAPSE} >/dev/null")


def _wait_http(url: str, tries: int = 90) -> None:
    for _ in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        asyncio.run(asyncio.sleep(1))
    raise AssertionError(f"{url} never answered")


def _register(container: str, user: str, password: str, admin: bool = False) -> None:
    """As the guides do it: register_new_matrix_user in the container."""
    on_host("vps3", f"docker exec {container} register_new_matrix_user -c /data/homeserver.yaml -u {user} "
                    f"-p '{password}' {'-a' if admin else '--no-admin'} http://localhost:8008 >/dev/null")


def _old_scene(url: str, sn: str, alice: str, bob: str) -> tuple[str, str, dict]:
    """On the hand-made server: a room with history and an upload; its published key."""
    async def go():
        async with SandboxClient(url, ROOTS) as a, SandboxClient(url, ROOTS) as b:
            assert isinstance(await a.login(alice, "alice old pw"), LoginResponse)
            assert isinstance(await b.login(bob, "bob old pw"), LoginResponse)
            room = await a.client.room_create(name="before adoption", invite=[f"@{bob}:{sn}"])
            assert isinstance(room, RoomCreateResponse), room
            await b.client.join(room.room_id)
            up, _ = await a.client.upload(io.BytesIO(MEDIA), content_type="application/octet-stream",
                                          filesize=len(MEDIA))
            for who, body in ((a, "first words"), (b, "an answer"), (a, "last words before")):
                await who.client.room_send(room.room_id, "m.room.message", {"msgtype": "m.text", "body": body})
            return room.room_id, up.content_uri
    room, mxc = asyncio.run(go())
    with urllib.request.urlopen(f"{url}/_matrix/key/v2/server", timeout=10) as resp:
        keys = json.loads(resp.read())["verify_keys"]
    return room, mxc, keys


def _after(sn: str, alice: str, room: str, mxc: str, keys: dict) -> None:
    """Through synapse-fabric's proxy now: the old password, history, upload, key."""
    async def go():
        async with SandboxClient(f"https://matrix.{sn}", ROOTS) as a:
            assert isinstance(await a.login(alice, "alice old pw"), LoginResponse)
            status, page = await a.get(f"/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=50")
            assert status == 200, page
            bodies = [e["content"].get("body") for e in page["chunk"] if e["type"] == "m.room.message"]
            assert bodies == ["first words", "an answer", "last words before"], bodies
            server, media_id = mxc.removeprefix("mxc://").split("/")
            async with a.client.client_session.get(
                    f"https://matrix.{sn}/_matrix/client/v1/media/download/{server}/{media_id}",
                    headers={"Authorization": f"Bearer {a.client.access_token}"}, ssl=a.ctx) as resp:
                assert resp.status == 200 and await resp.read() == MEDIA
            async with a.client.client_session.get(f"https://matrix.{sn}/_matrix/key/v2/server",
                                                   ssl=a.ctx) as resp:
                assert (await resp.json())["verify_keys"] == keys
    asyncio.run(go())


def _containers(names: str) -> dict[str, str]:
    out = on_host("vps3", f"for c in {names}; do s=$(docker inspect -f "
                          "'{{.State.Status}}/{{.HostConfig.RestartPolicy.Name}}' $c 2>/dev/null) || s=gone; "
                          "printf '%s %s\\n' $c $s; done")
    return dict(line.split(" ", 1) for line in out.strip().splitlines())


@pytest.fixture(scope="module", autouse=True)
def _vps3_as_found():
    """vps3 as the tests before left it (no stacks): the migration tests use it next."""
    yield
    scratch = variant("adopt-vps3", lambda doc: None)  # an uninstalled host leaves the inventory it is given
    run(["inv", "uninstall", "--host", "vps3"], scratch)
    scratch.unlink(missing_ok=True)


def _cleanup(inv, sn: str, script: str) -> None:
    import os
    import subprocess

    from tests.e2e.helpers import BIN, REPO
    subprocess.run([str(BIN / "inv"), "uninstall", "--homeserver", sn, "--no-backup"], cwd=REPO,
                   env={**os.environ, "INVOKE_INVENTORY": str(inv)}, input=f"{sn}\n", text=True,
                   capture_output=True, timeout=600)
    on_host("vps3", script + "; true")
    for name in (sn, f"matrix.{sn}"):
        sb.set_dns(name, None)


def test_adopt_a_compose_deployment_in_place_abort_and_again(deployed):
    sn, root = "nine.test", "/srv/matrix-nine"
    alice, bob = f"alice-{RUN}", f"bob-{RUN}"

    def entry(doc):
        doc["homeservers"][sn] = {
            "host": "vps3", "max_upload_size": "100M",
            "federation": {"trusted_ca": TEST_CA, "allow_ip_ranges": ["172.29.231.0/24"], "trusted_key_servers": []},
            "synapse_settings": doc["homeservers"]["one.test"]["synapse_settings"]}
    inv = variant("adopt-compose", entry)
    for name in (sn, f"matrix.{sn}"):
        sb.set_dns(name, VPS3)
    try:
        # Docker on vps3, before the operator writes nine.test into hosts.yaml: a deploy
        # with the entry and without the adoption would make a new nine.test
        assert run(["fab", "-H", "vps3", "bootstrap"]).returncode == 0
        _images_on_vps3()
        _handmade_compose(sn, root)
        _wait_http(f"http://{VPS3}:8008/health")
        names = on_host("vps3", "docker ps --format '{{.Names}}' --filter label=com.docker.compose.project=matrix-nine")
        syn, db = (sorted(n for n in names.split() if "synapse" in n)[0], sorted(n for n in names.split() if "db" in n)[0])
        _register(syn, alice, "alice old pw", admin=True)
        _register(syn, bob, "bob old pw")
        room, mxc, keys = _old_scene(f"http://{VPS3}:8008", sn, alice, bob)

        # a dry run finds it all and changes nothing
        res = run(["inv", "adopt", "--homeserver", sn, "--from", "vps3", "--dry-run"], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        out = res.stdout
        assert f"container {syn}" in out and "compose project matrix-nine" in out
        assert f"PostgreSQL in {db}: synapse (user synapse_user), UTF8, collation C.UTF-8/C.UTF-8" in out
        assert "Synapse requires C" in out and "allow_unsafe_locale is dropped" in out
        assert "macaroon_secret_key" in out.split("kept in homeserver.yaml")[1].split("\n")[0]
        assert "dry run: nothing was changed" in out
        assert _containers(f"{syn} {db}") == {syn: "running/unless-stopped", db: "running/unless-stopped"}
        assert on_host("vps3", f"ls /opt/matrix/synapse/{sn} 2>/dev/null || true").strip() == ""

        res = run(["inv", "adopt", "--homeserver", sn, "--from", "vps3"], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "downtime starts" in res.stdout and "it was stopped for" in res.stdout
        assert _containers(f"{syn} {db}") == {syn: "exited/no", db: "exited/no"}
        _after(sn, alice, room, mxc, keys)
        collation = on_host("vps3", "docker exec $(docker ps -q --filter label=com.docker.compose.project="
                                    "synapse-nine-test --filter label=com.docker.compose.service=postgres) psql -At "
                                    "-U synapse -d synapse -c \"SELECT datcollate, datctype FROM pg_database WHERE "
                                    "datname = 'synapse'\"").strip()
        assert collation == "C|C"
        config = on_host("vps3", f"cat /opt/matrix/synapse/{sn}/data/homeserver.yaml")
        assert "handmade-db-password" not in config and "Adopted by synapse-fabric" in config

        # --abort: the old one serves again as before, the new copy is kept aside, and
        # hosts.yaml's entry (the operator's) stays but a deploy would not make a new one
        res = run(["inv", "adopt", "--homeserver", sn, "--from", "vps3", "--abort"], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert _containers(f"{syn} {db}") == {syn: "running/unless-stopped", db: "running/unless-stopped"}
        _wait_http(f"http://{VPS3}:8008/health")
        assert on_host("vps3", f"ls /opt/matrix/.synapse-fabric/adopt-aborted/ | grep -c {sn}").strip() == "1"
        assert on_host("vps3", f"test -e /opt/matrix/synapse/{sn} && echo there || true").strip() == ""
        res = run(["inv", "deploy", "--host", "vps3"], inv)
        assert res.returncode == 1 and "a deploy would start a new, empty" in res.stdout + res.stderr

        res = run(["inv", "adopt", "--homeserver", sn, "--from", "vps3"], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        _after(sn, alice, room, mxc, keys)
        converse(sn, "two.test", "adopted", inv)
        res = run(["inv", "deploy", "--host", "vps3"], inv)
        assert res.returncode == 0 and "vps3: 0 changed" in res.stdout, res.stdout + res.stderr

        res = run(["inv", "adopt", "--homeserver", sn, "--from", "vps3", "--finish"], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert _containers(f"{syn} {db}") == {syn: "gone", db: "gone"}
        assert on_host("vps3", f"test -s {root}/files/homeserver.yaml && echo kept").strip() == "kept"
        _after(sn, alice, room, mxc, keys)
    finally:
        _cleanup(inv, sn, COMPOSE_FN + f"cd {root} 2>/dev/null && compose down -v >/dev/null 2>&1; rm -rf {root} "
                          "/opt/matrix/.synapse-fabric/adopt-aborted")


def test_adopt_a_sqlite_deployment_onto_another_host(deployed):
    sn, root, ctr = "ten.test", "/srv/ten-data", "handmade-ten"
    alice, bob = f"alice-{RUN}", f"bob-{RUN}"
    inv = variant("adopt-sqlite", lambda doc: None)
    try:
        assert run(["fab", "-H", "vps3", "bootstrap"], inv).returncode == 0
        _images_on_vps3()
        _handmade_sqlite(sn, root)
        _wait_http(f"http://{VPS3}:8009/health")
        _register(ctr, alice, "alice old pw", admin=True)
        _register(ctr, bob, "bob old pw")
        room, mxc, keys = _old_scene(f"http://{VPS3}:8009", sn, alice, bob)
        for name in (sn, f"matrix.{sn}"):  # the names move first: the new host's certificate
            sb.set_dns(name, sb.HOSTS["vps1"].ip)

        res = run(["inv", "adopt", "--homeserver", sn, "--from", "vps3", "--to", "vps1"], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "synapse_port_db, first pass (while it runs)" in res.stdout and "synapse_port_db, final pass" in res.stdout
        entry = yaml.safe_load(inv.read_text())["homeservers"][sn]
        assert entry["host"] == "vps1" and entry["max_upload_size"] == "20M"
        assert entry["federation"] == {"allow_ip_ranges": ["172.29.231.0/24"], "trusted_key_servers": []}
        assert _containers(ctr) == {ctr: "exited/no"}
        _after(sn, alice, room, mxc, keys)
        converse(sn, "two.test", "adopted-sqlite", inv)
        res = run(["inv", "deploy", "--host", "vps1"], inv)
        assert res.returncode == 0 and "vps1: 0 changed" in res.stdout, res.stdout + res.stderr
        res = run(["inv", "adopt", "--homeserver", sn, "--from", "vps3", "--finish"], inv)
        assert res.returncode == 0 and _containers(ctr) == {ctr: "gone"}, res.stdout + res.stderr
    finally:
        _cleanup(inv, sn, f"docker rm -f {ctr} >/dev/null 2>&1; rm -rf {root}")
