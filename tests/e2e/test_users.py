"""`inv register-user` and `inv reset-password` on the sandbox, proven by logging in
with a Matrix client (matrix-nio) over verified TLS through the proxy."""

from __future__ import annotations

import asyncio
import secrets
import os
import re
import subprocess
import time

import pytest
from nio import LoginError, LoginResponse

from tests.e2e.helpers import ArgvSampler, ctr, BIN, INVENTORY, REPO, on_host, run, starts, variant
from tests.sandbox.client import SandboxClient

pytestmark = pytest.mark.e2e

HS = "one.test"
# fresh names each session, so a kept sandbox can run the tests again
RUN = secrets.token_hex(3)
ALICE = f"alice-{RUN}"
ADMIN = f"admin-{RUN}"
URL = "https://matrix.one.test"


def cli(argv: list[str], password: str | None = None, inventory=INVENTORY) -> subprocess.CompletedProcess:
    """Run a task with the password on its stdin (--password-file -)."""
    env = {**os.environ, "INVOKE_INVENTORY": str(inventory)}
    if password is not None:
        argv = [*argv, "--password-file", "-"]
    res = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=REPO, env=env, capture_output=True,
                         input=None if password is None else password.encode(), timeout=300)
    res.stdout, res.stderr = res.stdout.decode(), res.stderr.decode()
    print(res.stdout, res.stderr)
    return res


def login(cafile, user: str, password: str):
    async def go():
        async with SandboxClient(URL, cafile) as c:
            return await c.login(user, password)
    return asyncio.run(go())


def status_of(cafile, path: str, token: str) -> int:
    """HTTP status of an authenticated GET through the public hostname."""
    async def go():
        async with SandboxClient(URL, cafile) as c:
            status, _ = await c.get(path, token)
            return status
    return asyncio.run(go())


def whoami(cafile, token: str) -> int:
    return status_of(cafile, "/_matrix/client/v3/account/whoami", token)


def admin_status(cafile, token: str) -> int:
    return status_of(cafile, "/_synapse/admin/v2/users?limit=1", token)


def test_register_then_log_in(cafile):
    res = cli(["inv", "register-user", "--homeserver", HS, "--user", ALICE], "correct horse")
    assert res.returncode == 0, res.stderr
    assert isinstance(login(cafile, ALICE, "correct horse"), LoginResponse)
    assert isinstance(login(cafile, ALICE, "wrong horse"), LoginError)


def test_second_register_is_a_noop(cafile):
    res = cli(["inv", "register-user", "--homeserver", HS, "--user", f"@{ALICE}:one.test"])
    assert res.returncode == 0 and "already exists; nothing changed" in res.stdout
    assert isinstance(login(cafile, ALICE, "correct horse"), LoginResponse)
    # asking for a NEW password through register-user is refused, nothing changes
    res = cli(["inv", "register-user", "--homeserver", HS, "--user", ALICE], "other")
    assert res.returncode == 2 and "reset-password" in res.stderr
    assert isinstance(login(cafile, ALICE, "correct horse"), LoginResponse)


def test_admin_flag_and_admin_api_allowlist(cafile):
    assert cli(["inv", "register-user", "--homeserver", HS, "--user", ADMIN, "--admin"], "adm1n").returncode == 0
    admin = login(cafile, ADMIN, "adm1n")
    alice = login(cafile, ALICE, "correct horse")
    # default allowlist: nobody from outside reaches the admin API
    assert admin_status(cafile, admin.access_token) == 403
    # allow the sandbox network (where this client is), then: admin yes, alice no
    def allow(doc):
        doc["homeservers"][HS]["admin_api_allow"] = ["172.29.231.0/24"]
    inv = variant("admin-allow", allow)
    try:
        assert run(["inv", "deploy", "--host", "vps1"], inv).returncode == 0
        assert admin_status(cafile, admin.access_token) == 200
        assert admin_status(cafile, alice.access_token) == 403
        # inv check tests a non-empty allowlist too: this machine is in it, Synapse answers
        res = run(["inv", "check", "--homeserver", HS], inv)
        assert res.returncode == 0 and "0 failed" in res.stdout and "admin API only from admin_api_allow" in res.stdout
        # an inventory whose allowlist leaves this machine out, while the host lets it in: FAIL
        def other(doc):
            doc["homeservers"][HS]["admin_api_allow"] = ["198.51.100.0/24"]
        res = run(["inv", "check", "--homeserver", HS], variant("admin-other", other))
        failed = [line for line in res.stdout.splitlines() if line.startswith("FAIL")]
        assert res.returncode == 1 and len(failed) == 1, res.stdout
        assert "admin API answers this machine" in failed[0] and "198.51.100.0/24" in failed[0]
    finally:
        assert run(["inv", "deploy", "--host", "vps1"]).returncode == 0
    assert admin_status(cafile, admin.access_token) == 403


def test_reset_password_new_works_old_fails(cafile):
    res = cli(["inv", "reset-password", "--homeserver", HS, "--user", ALICE], "battery staple")
    assert res.returncode == 0, res.stderr
    assert "previous hash is kept" in res.stdout
    assert isinstance(login(cafile, ALICE, "battery staple"), LoginResponse)
    assert isinstance(login(cafile, ALICE, "correct horse"), LoginError)
    backups = on_host("vps1", f"stat -c '%a %U' /opt/matrix/synapse/one.test/secrets/password-backups/{ALICE}.*")
    assert backups and all(line == "600 root" for line in backups.splitlines())


def test_reset_with_logout_ends_sessions_through_synapse(cafile):
    """--logout ends every session by Synapse's own code, without a restart: the old
    tokens die at once, the pusher of a session is gone, and a server that shares a
    room with the user learns that its devices are gone (device-list updates)."""
    bob = f"bob-{RUN}"
    assert cli(["inv", "register-user", "--homeserver", "two.test", "--user", bob], "bob pw").returncode == 0
    roots = REPO / "tests/sandbox/state/acme-roots.pem"

    async def before():
        async with SandboxClient(URL, cafile) as a, SandboxClient("https://matrix.two.test", roots) as b:
            first = await a.login(ALICE, "battery staple")
            second = await a.login(ALICE, "battery staple")
            assert isinstance(first, LoginResponse) and isinstance(second, LoginResponse)
            status, _ = await a.post("/_matrix/client/v3/pushers/set", {
                "kind": "http", "app_id": "org.example.test", "app_display_name": "t", "device_display_name": "d",
                "pushkey": f"push-{RUN}", "lang": "en", "data": {"url": "https://push.example/_matrix/push/v1/notify"},
            }, first.access_token)
            assert status == 200
            dev = first.device_id
            status, _ = await a.post("/_matrix/client/v3/keys/upload", {"device_keys": {
                "user_id": f"@{ALICE}:one.test", "device_id": dev,
                "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                "keys": {f"curve25519:{dev}": "c" * 43, f"ed25519:{dev}": "e" * 43}, "signatures": {}}},
                first.access_token)
            assert status == 200
            # bob on two.test shares a room with alice, so two.test tracks her devices
            assert isinstance(await b.login(bob, "bob pw"), LoginResponse)
            status, room = await a.post("/_matrix/client/v3/createRoom", {"invite": [f"@{bob}:two.test"]},
                                        first.access_token)
            assert status == 200
            for _ in range(60):
                status, _ = await b.post(f"/_matrix/client/v3/join/{room['room_id']}", {})
                if status == 200:
                    break
                await asyncio.sleep(1)
            assert status == 200
            return first, b.client.access_token, dev

    async def remote_devices(bob_token) -> set:
        async with SandboxClient("https://matrix.two.test", roots) as b:
            status, body = await b.post("/_matrix/client/v3/keys/query",
                                        {"device_keys": {f"@{ALICE}:one.test": []}}, bob_token)
            assert status == 200, body
            return set(body.get("device_keys", {}).get(f"@{ALICE}:one.test", {}))

    first, bob_token, dev = asyncio.run(before())
    assert dev in asyncio.run(remote_devices(bob_token))
    started = starts("vps1")
    res = cli(["inv", "reset-password", "--homeserver", HS, "--user", ALICE, "--logout"], "fresh start")
    assert res.returncode == 0, res.stderr
    assert "all its sessions ended" in res.stdout
    assert starts("vps1") == started  # nothing restarted
    assert whoami(cafile, first.access_token) == 401
    fresh = login(cafile, ALICE, "fresh start")
    assert isinstance(fresh, LoginResponse)
    status, body = asyncio.run(_get(cafile, "/_matrix/client/v3/pushers", fresh.access_token))
    assert status == 200 and body["pushers"] == [], body
    # two.test hears that the device is gone
    deadline = time.monotonic() + 60
    while dev in asyncio.run(remote_devices(bob_token)):
        assert time.monotonic() < deadline, "two.test still lists the logged-out device"
        time.sleep(1)
    # the token minted for the logout is gone too
    left = on_host("vps1", f"docker exec {ctr('synapse-one-test', 'postgres')} psql -At -U synapse -d synapse "
                           "-c \"SELECT count(*) FROM access_tokens WHERE token LIKE 'sfab_%'\"")
    assert left.strip() == "0"


async def _get(cafile, path, token):
    async with SandboxClient(URL, cafile) as c:
        return await c.get(path, token)


HOSTILE = [
    "it's \"quoted\"",
    "$(touch /tmp/pwned)",
    "`id`",
    "back\\slash\\\\",
    "semi;colon; rm -rf /",
    "100% %s %n %x",
    "'); DROP TABLE users;--",
    "Pässwörd Ünïcödé ключ 密码",
    "emoji 🔐🦄",
    "  spaces at both ends  ",
    "x" * 512,
    "-starts like an option",
    "--password",
]


@pytest.mark.parametrize("password", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_passwords_round_trip(cafile, password):
    res = cli(["inv", "reset-password", "--homeserver", HS, "--user", ALICE], password)
    assert res.returncode == 0, res.stderr
    assert isinstance(login(cafile, ALICE, password), LoginResponse), "the exact password must work"
    if password != password.strip():
        assert isinstance(login(cafile, ALICE, password.strip()), LoginError), "spaces are part of it"
    assert on_host("vps1", "test -e /tmp/pwned && echo yes || echo no").strip() == "no"


@pytest.mark.parametrize("name", ["al'ice", "bob;id", "two words", "Alice", "a$(id)", ""])
def test_hostile_user_names_refused_before_ssh(name):
    # an inventory whose host is unreachable proves nothing was attempted on a host
    def unreachable(doc):
        doc["hosts"]["vps1"]["address"] = "172.29.231.99"
    inv = variant("no-ssh", unreachable)
    res = cli(["inv", "reset-password", "--homeserver", HS, "--user", name], "pw", inventory=inv)
    assert res.returncode == 2
    assert "may contain only" in res.stderr or "not on homeserver" in res.stderr
    assert "unreachable" not in res.stderr


def test_unknown_user_changes_nothing(cafile):
    count = f"docker exec {ctr('synapse-one-test', 'postgres')} psql -U synapse -d synapse -tAc " \
            "\"SELECT md5(string_agg(name || coalesce(password_hash,''), ',' ORDER BY name)) FROM users\""
    before = on_host("vps1", count)
    res = cli(["inv", "reset-password", "--homeserver", HS, "--user", "nobody"], "whatever")
    assert res.returncode == 2
    assert "no user @nobody:one.test" in res.stderr and "nothing was changed" in res.stderr
    assert on_host("vps1", count) == before


def test_passwords_hashes_and_tokens_never_visible(cafile):
    """Every process's argv, on this machine and on the host, is sampled while
    register-user, reset-password and reset-password --logout run: no password,
    hash or minted token may appear; nor in the tool's output or the containers' logs."""
    user = f"argv-{RUN}"
    passwords = ["Sampler-Secret-7f3a9c", "Sampler-Secret-2b8d1e", "Sampler-Secret-5c0f4a"]
    with ArgvSampler() as sampler:
        results = [
            cli(["inv", "register-user", "--homeserver", HS, "--user", user], passwords[0]),
            cli(["inv", "reset-password", "--homeserver", HS, "--user", user], passwords[1]),
            cli(["inv", "reset-password", "--homeserver", HS, "--user", user, "--logout"], passwords[2]),
        ]
    assert [r.returncode for r in results] == [0, 0, 0]
    # the sampler overlapped the work on the host (Synapse's tools ran in the container)
    assert sampler.containing("register_new_matrix_user") and sampler.containing("hash_password")
    assert sampler.containing("logout/all") and sampler.passes > 50
    new_hash = on_host("vps1", f"docker exec {ctr('synapse-one-test', 'postgres')} psql -U synapse -d synapse -tAc "
                               "\"SELECT password_hash FROM users WHERE name = '@" + user + ":one.test'\"").strip()
    assert new_hash.startswith("$2")
    logs = on_host("vps1", f"docker logs {ctr('synapse-one-test', 'synapse')} 2>&1; "
                           f"docker logs {ctr('synapse-one-test', 'postgres')} 2>&1")
    output = "".join(r.stdout + r.stderr for r in results)
    for secret in (*passwords, new_hash):
        assert not sampler.containing(secret)
        assert secret not in output
        assert secret not in logs
    minted = r"sfab_[0-9a-f]{48}"
    assert not sampler.matching(minted) and not re.search(minted, output + logs)
    assert isinstance(login(cafile, user, passwords[2]), LoginResponse)


def test_slash_in_a_user_name_never_becomes_a_path(cafile):
    user = f"x/../../y-{RUN}"
    assert cli(["inv", "register-user", "--homeserver", HS, "--user", user], "first one").returncode == 0
    res = cli(["inv", "reset-password", "--homeserver", HS, "--user", user], "second one")
    assert res.returncode == 0, res.stderr
    backup = res.stdout.split(" in ", 1)[1].split(" (0600)")[0].strip()
    assert backup.startswith("/opt/matrix/synapse/one.test/secrets/password-backups/x%2F..%2F..%2Fy-")
    assert on_host("vps1", f"stat -c '%a %U' '{backup}'").strip() == "600 root"
    assert isinstance(login(cafile, user, "second one"), LoginResponse)
