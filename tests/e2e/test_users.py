"""`inv register-user` and `inv reset-password` on the sandbox, proven by logging in
with a Matrix client (matrix-nio) over verified TLS through the proxy."""

from __future__ import annotations

import asyncio
import secrets
import os
import subprocess
import threading
import time

import pytest
from nio import LoginError, LoginResponse

from tests.e2e.helpers import ctr, BIN, INVENTORY, REPO, on_host, run, variant
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


def test_reset_with_logout_kills_old_sessions(cafile):
    before = login(cafile, ALICE, "battery staple")
    assert whoami(cafile, before.access_token) == 200
    res = cli(["inv", "reset-password", "--homeserver", HS, "--user", ALICE, "--logout"], "fresh start")
    assert res.returncode == 0, res.stderr
    on_host("vps1", "for i in $(seq 60); do docker ps --filter label=com.docker.compose.project=synapse-one-test --filter label=com.docker.compose.service=synapse --format '{{.Status}}' "
                    "| grep -q '(healthy)' && exit 0; sleep 1; done; exit 1")
    assert whoami(cafile, before.access_token) == 401
    assert isinstance(login(cafile, ALICE, "fresh start"), LoginResponse)


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


def test_password_and_hash_never_visible(cafile):
    """A sampler on the host reads every process's argv while reset-password
    runs; neither the password nor its hash may appear, nor in the tool's output
    or the containers' logs."""
    password = "Sampler-Secret-7f3a9c"
    # one `cat` per pass over every /proc/PID/cmdline, bounded in passes
    sampler = (
        ": > /tmp/argv-samples; n=0; "
        "while [ ! -e /tmp/stop-sampler ] && [ $n -lt 20000 ]; do "
        "cat /proc/[0-9]*/cmdline >> /tmp/argv-samples 2>/dev/null; echo >> /tmp/argv-samples; "
        "n=$((n+1)); done; echo $n"
    )
    on_host("vps1", "rm -f /tmp/stop-sampler /tmp/argv-samples")
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("lines", on_host("vps1", sampler)))
    thread.start()
    time.sleep(1)
    res = cli(["inv", "reset-password", "--homeserver", HS, "--user", ALICE], password)
    on_host("vps1", "touch /tmp/stop-sampler")
    thread.join(60)
    assert res.returncode == 0
    assert int(result["lines"]) > 50, "the sampler saw too little"
    new_hash = on_host("vps1", f"docker exec {ctr('synapse-one-test', 'postgres')} psql -U synapse -d synapse -tAc "
                               "\"SELECT password_hash FROM users WHERE name = '@" + ALICE + ":one.test'\"").strip()
    assert new_hash.startswith("$2")
    samples = on_host("vps1", "cat /tmp/argv-samples; rm -f /tmp/argv-samples /tmp/stop-sampler")
    assert "hash_password" in samples, "the sampler did not overlap the reset"
    logs = on_host("vps1", f"docker logs {ctr('synapse-one-test', 'synapse')} 2>&1; docker logs {ctr('synapse-one-test', 'postgres')} 2>&1")
    for secret in (password, new_hash):
        assert secret not in samples
        assert secret not in res.stdout + res.stderr
        assert secret not in logs
    assert isinstance(login(cafile, ALICE, password), LoginResponse)


def test_slash_in_a_user_name_never_becomes_a_path(cafile):
    user = f"x/../../y-{RUN}"
    assert cli(["inv", "register-user", "--homeserver", HS, "--user", user], "first one").returncode == 0
    res = cli(["inv", "reset-password", "--homeserver", HS, "--user", user], "second one")
    assert res.returncode == 0, res.stderr
    backup = res.stdout.split(" in ", 1)[1].split(" (0600)")[0].strip()
    assert backup.startswith("/opt/matrix/synapse/one.test/secrets/password-backups/x%2F..%2F..%2Fy-")
    assert on_host("vps1", f"stat -c '%a %U' '{backup}'").strip() == "600 root"
    assert isinstance(login(cafile, user, "second one"), LoginResponse)
