"""Administration from the command line (issue #15, item 1): inv users,
make-admin, deactivate-user, registration-token. Through Synapse's admin API
from inside the host, as synapse-fabric's own admin with a token minted for each
call; proven by what a Matrix client sees."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time

import pytest
from nio import LoginError, LoginResponse, RegisterResponse

from tests.e2e.helpers import ROOTS, ctr, https_get, on_host, run, variant
from tests.e2e.test_users import URL, cli, login
from tests.sandbox.client import SandboxClient

pytestmark = pytest.mark.e2e

RUN = secrets.token_hex(3)
HS = "one.test"


def sql(query: str, project: str = "synapse-one-test") -> str:
    return on_host("vps1", f"docker exec {ctr(project, 'postgres')} psql -At -U synapse -d synapse -c \"{query}\"").strip()


def test_users_lists_admin_and_deactivated_state_and_admin_rights_come_and_go(cafile):
    dora = f"dora-{RUN}"
    assert cli(["inv", "register-user", "--homeserver", HS, "--user", dora], "dora pw").returncode == 0
    res = run(["inv", "users", "--homeserver", HS])
    assert res.returncode == 0, res.stderr
    line = next(line for line in res.stdout.splitlines() if line.startswith(f"@{dora}:one.test"))
    assert "admin" not in line and "deactivated" not in line
    assert "@synapse-fabric-admin:one.test  admin" in res.stdout and "(synapse-fabric's own)" in res.stdout

    assert run(["inv", "make-admin", "--homeserver", HS, "--user", dora]).returncode == 0
    line = next(line for line in run(["inv", "users", "--homeserver", HS]).stdout.splitlines()
                if line.startswith(f"@{dora}:"))
    assert " admin" in line
    assert sql(f"SELECT admin FROM users WHERE name = '@{dora}:one.test'") == "1"
    assert run(["inv", "make-admin", "--homeserver", HS, "--user", dora, "--revoke"]).returncode == 0
    assert sql(f"SELECT admin FROM users WHERE name = '@{dora}:one.test'") == "0"
    # no token of synapse-fabric's admin is left behind by any of these calls
    assert sql("SELECT count(*) FROM access_tokens WHERE user_id = '@synapse-fabric-admin:one.test'") == "0"


def test_a_deactivated_user_cannot_log_in(cafile):
    erin = f"erin-{RUN}"
    assert cli(["inv", "register-user", "--homeserver", HS, "--user", erin], "erin pw").returncode == 0
    before = login(cafile, erin, "erin pw")
    assert isinstance(before, LoginResponse)
    res = run(["inv", "deactivate-user", "--homeserver", HS, "--user", erin])
    assert res.returncode == 0 and "deactivated" in res.stdout, res.stderr
    assert isinstance(login(cafile, erin, "erin pw"), LoginError)
    line = next(line for line in run(["inv", "users", "--homeserver", HS]).stdout.splitlines()
                if line.startswith(f"@{erin}:"))
    assert "deactivated" in line
    # an unknown user, and synapse-fabric's own admin, are refused with a message
    res = run(["inv", "deactivate-user", "--homeserver", HS, "--user", f"nobody-{RUN}"])
    assert res.returncode == 2 and "404" in res.stderr
    res = run(["inv", "deactivate-user", "--homeserver", HS, "--user", "synapse-fabric-admin"])
    assert res.returncode == 2 and "synapse-fabric's own admin" in res.stderr


def test_a_registration_token_registers_a_user_and_is_used_up(cafile):
    """three.test asks for tokens; a token with one use registers one user, then no more."""
    def token_registration(doc):
        doc["homeservers"]["three.test"]["registration"] = "token"

    inv = variant("token-registration", token_registration)
    token = f"tok-{RUN}"
    roots = "tests/sandbox/state/acme-roots.pem"
    try:
        assert run(["inv", "deploy", "--host", "vps1"], inv).returncode == 0
        res = run(["inv", "registration-token", "create", "--homeserver", "three.test", "--token", token,
                   "--uses", "1", "--expires-in", "1d"], inv)
        assert res.returncode == 0 and token in res.stdout and "used 0/1" in res.stdout, res.stdout + res.stderr

        async def register(user: str):
            async with SandboxClient("https://matrix.three.test", roots) as c:
                return await c.client.register_with_token(user, "pw of " + user, token)

        assert isinstance(asyncio.run(register(f"frank-{RUN}")), RegisterResponse)
        assert not isinstance(asyncio.run(register(f"gina-{RUN}")), RegisterResponse)  # used up
        listed = run(["inv", "registration-token", "list", "--homeserver", "three.test"], inv).stdout
        assert f"{token}  used 1/1" in listed
        assert run(["inv", "registration-token", "revoke", "--homeserver", "three.test", "--token", token],
                   inv).returncode == 0
        assert token not in run(["inv", "registration-token", "list", "--homeserver", "three.test"], inv).stdout
        assert sql("SELECT count(*) FROM access_tokens WHERE user_id = '@synapse-fabric-admin:three.test'",
                   "synapse-three-test") == "0"
    finally:
        assert run(["inv", "deploy", "--host", "vps1"]).returncode == 0


def test_purged_remote_media_is_gone(cafile):
    """bob (two.test) uploads a file; alice reads it through one.test, which caches
    it; purge-remote-media deletes one.test's copy (its record and its file)."""
    import io

    alice, bob = f"hal-{RUN}", f"ivy-{RUN}"
    assert cli(["inv", "register-user", "--homeserver", HS, "--user", alice], "hal pw").returncode == 0
    assert cli(["inv", "register-user", "--homeserver", "two.test", "--user", bob], "ivy pw").returncode == 0
    roots = "tests/sandbox/state/acme-roots.pem"
    data = secrets.token_bytes(2048)

    async def share() -> str:
        async with SandboxClient("https://matrix.two.test", roots) as b, SandboxClient(URL, cafile) as a:
            assert isinstance(await b.login(bob, "ivy pw"), LoginResponse)
            up, _ = await b.client.upload(io.BytesIO(data), content_type="application/octet-stream",
                                          filesize=len(data))
            media_id = up.content_uri.rsplit("/", 1)[1]
            assert isinstance(await a.login(alice, "hal pw"), LoginResponse)
            async with a.client.client_session.get(
                    f"{URL}/_matrix/client/v1/media/download/two.test/{media_id}",
                    headers={"Authorization": f"Bearer {a.client.access_token}"}, ssl=a.ctx) as resp:
                assert resp.status == 200 and await resp.read() == data
            return media_id

    media_id = asyncio.run(share())
    cached = f"SELECT count(*) FROM remote_media_cache WHERE media_origin = 'two.test' AND media_id = '{media_id}'"
    files = "find /opt/matrix/synapse/one.test/data/media_store/remote_content/two.test -type f | wc -l"
    assert sql(cached) == "1"
    before = int(on_host("vps1", files).strip())
    time.sleep(2)
    res = run(["inv", "purge-remote-media", "--homeserver", HS, "--older-than", "1s"])
    assert res.returncode == 0 and "cached remote media file(s) deleted" in res.stdout, res.stderr
    assert sql(cached) == "0"
    assert int(on_host("vps1", files).strip()) < before


def test_purged_history_is_gone_for_readers(cafile):
    jo = f"jo-{RUN}"
    assert cli(["inv", "register-user", "--homeserver", HS, "--user", jo], "jo pw").returncode == 0

    async def scene(purge=None):
        async with SandboxClient(URL, cafile) as c:
            assert isinstance(await c.login(jo, "jo pw"), LoginResponse)
            if purge is None:
                status, room = await c.post("/_matrix/client/v3/createRoom", {"name": f"purge {RUN}"})
                assert status == 200
                for i in range(3):
                    await c.client.room_send(room["room_id"], "m.room.message", {"msgtype": "m.text", "body": f"old {i}"})
                time.sleep(3)
                await c.client.room_send(room["room_id"], "m.room.message", {"msgtype": "m.text", "body": "new"})
                return room["room_id"]
            status, page = await c.get(f"/_matrix/client/v3/rooms/{purge}/messages?dir=b&limit=100")
            assert status == 200
            return [e["content"].get("body") for e in page["chunk"] if e["type"] == "m.room.message"]

    room = asyncio.run(scene())
    assert asyncio.run(scene(room)) == ["new", "old 2", "old 1", "old 0"]
    res = run(["inv", "purge-history", "--homeserver", HS, "--room", room, "--before", "2s", "--local"])
    assert res.returncode == 0 and "purged" in res.stdout, res.stdout + res.stderr
    assert asyncio.run(scene(room)) == ["new"]


def test_logs_without_container_names_and_they_rotate():
    res = run(["inv", "logs", "--homeserver", HS, "--since", "30m", "--tail", "20"])
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    assert res.returncode == 0 and 0 < len(lines) <= 20, res.stdout + res.stderr
    assert all(line[:4].isdigit() for line in lines)  # --timestamps: each line starts with its time
    res = run(["inv", "logs", "--homeserver", HS, "--service", "nginx", "--since", "30m"])
    assert res.returncode == 0 and res.stdout.strip()
    res = run(["inv", "logs", "--homeserver", HS, "--service", "redis"])
    assert res.returncode == 2 and "unknown service 'redis'" in res.stderr
    # every container of the stacks keeps at most 5 x 10 MB of logs
    configs = on_host("vps1", "docker ps -q --filter label=com.docker.compose.project | xargs docker inspect "
                              "-f '{{.HostConfig.LogConfig.Type}} {{index .HostConfig.LogConfig.Config \"max-size\"}} "
                              "{{index .HostConfig.LogConfig.Config \"max-file\"}}'").split("\n")
    configs = [c for c in configs if c.strip()]
    assert len(configs) >= 5 and set(configs) == {"json-file 10m 5"}, configs


# -- the admin web UI (item 2): a stand-in for Ketesa, see tests/sandbox/README.md

UI = "admin.two.test"


def test_admin_ui_answers_only_the_allowlist_and_talks_to_its_homeserver_only(deployed):
    """two.test's admin UI on its own name, served to this machine's address alone:
    its page and config (restrictBaseUrl: two.test's Synapse) come through nginx,
    the admin API calls its page makes work from here with CORS, and another host
    (vps1) gets nginx's 403 for both the UI and the admin API."""
    me = source_address("172.29.231.12")
    admin = f"uiadmin-{RUN}"

    def turn_on(doc):
        doc["homeservers"]["two.test"]["admin_api_allow"] = [f"{me}/32"]
        doc["homeservers"]["two.test"]["admin_ui"] = {"enabled": True, "hostname": UI}
    inv = variant("admin-ui", turn_on)
    try:
        res = run(["inv", "deploy", "--host", "vps2"], inv)
        assert res.returncode == 0, res.stderr
        status, headers, body = https_get(UI, "/")
        assert status == 200 and b'name="synapse-fabric-stand-in" content="admin-ui"' in body
        assert headers.get("x-frame-options") == "DENY"
        assert https_get(UI, "/users/some-deep-link")[0] == 200  # the single-page app's routes
        status, _, body = https_get(UI, "/config.json")
        assert status == 200 and json.loads(body) == {"restrictBaseUrl": "https://matrix.two.test"}

        # what the page does in a browser on admin.two.test: log in at restrictBaseUrl,
        # then list users through the admin API (cross-origin)
        assert cli(["inv", "register-user", "--homeserver", "two.test", "--user", admin, "--admin"],
                   "ui pw").returncode == 0
        token = asyncio.run(_login_two(admin, "ui pw"))
        status, headers, body = https_get("matrix.two.test", "/_synapse/admin/v2/users?from=0&limit=100",
                                          {"Authorization": f"Bearer {token}", "Origin": f"https://{UI}"})
        assert status == 200 and f"@{admin}:two.test" in [u["name"] for u in json.loads(body)["users"]]
        assert headers.get("access-control-allow-origin") in ("*", f"https://{UI}")

        # from another address (vps1's), nginx refuses the UI and the admin API alike
        for url in (f"https://{UI}/", "https://matrix.two.test/_synapse/admin/v1/server_version"):
            assert _status_from_vps1(url) == "403", url
        # the UI's logs without knowing its container's name
        res = run(["inv", "logs", "--homeserver", "two.test", "--service", "admin-ui", "--since", "10m"], inv)
        assert res.returncode == 0 and "GET /users/some-deep-link" in res.stdout, res.stderr
        # a second deploy changes nothing
        res = run(["inv", "deploy", "--host", "vps2"], inv)
        assert res.returncode == 0 and "vps2: 0 changed" in res.stdout and "restarted 0" in res.stdout, res.stdout
    finally:
        assert run(["inv", "deploy", "--host", "vps2"]).returncode == 0
    # turned off: its container, vhost and config are gone, the homeserver serves on
    assert on_host("vps2", "sudo docker ps -a --format '{{.Names}}' | grep -c admin-ui || true").strip() == "0"
    assert UI not in on_host("vps2", "ls /opt/matrix/reverse_proxy/nginx/conf.d/ /opt/matrix/reverse_proxy/admin-ui/")
    assert https_get("matrix.two.test", "/_matrix/client/versions")[0] == 200


def source_address(peer: str) -> str:
    """This machine's address on the route to `peer` (what the host's nginx sees)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, 443))  # UDP: picks the route, sends nothing
        return s.getsockname()[0]


async def _login_two(user: str, password: str) -> str:
    async with SandboxClient("https://matrix.two.test", ROOTS) as client:
        res = await client.login(user, password)
        assert isinstance(res, LoginResponse), res
        return res.access_token


def _status_from_vps1(url: str) -> str:
    roots = ROOTS.read_text()
    return on_host("vps1", f"""f=$(mktemp); cat > "$f" <<'PEM'
{roots}
PEM
curl -s -o /dev/null -w '%{{http_code}}' --cacert "$f" {url}; rm -f "$f" """).strip()
