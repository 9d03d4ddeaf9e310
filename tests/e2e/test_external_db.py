"""An external PostgreSQL (postgres.external, issue #18): external.test on vps2 keeps its
database on the sandbox's own PostgreSQL server (sfab-extdb, db.test), reached over
TLS verify-full against the sandbox CA. The password is put on the host by `inv
database-password` (tried first: a wrong one and a wrong CA change nothing); deploy,
users, `inv upgrade`'s way back (a Synapse that moves the schema and dies: the dump
goes back into the emptied database), `inv migrate-host` to vps1 (the database stays;
the new host reaches it before the old Synapse stops) and a snapshot (pg_dump over
TLS, by `inv uninstall`'s last backup) work with it; what lands in the database is read on the
server itself."""

from __future__ import annotations

import asyncio
import secrets
import subprocess

import pytest

from tests.e2e.helpers import REPO, https_get, on_host, run, variant
from tests.e2e.test_uninstall import _say_something
from tests.e2e.test_users import cli
from tests.sandbox import images, sandbox as sb

pytestmark = pytest.mark.e2e

SN = "external.test"  # a name of its own: test_restore has six.test, and this one leaves records
HOST = "vps2"  # images: push (the broken Synapse is not in the registry)
RUN = secrets.token_hex(3)
SANDBOX_CA = "tests/sandbox/state/pebble-ca.pem"   # signed db.test's certificate
OTHER_CA = "tests/sandbox/state/acme-roots.pem"    # pebble's issuing roots: not db.test's
TEST_CA = "tests/sandbox/state/acme-roots.pem"


def _add(doc, ca: str) -> None:
    doc["homeservers"][SN] = {
        "host": HOST,
        "postgres": {"external": {"host": sb.EXTDB_NAME, "port": 5432, "ca": ca}},
        "federation": {"trusted_ca": TEST_CA, "allow_ip_ranges": ["172.29.231.0/24"], "trusted_key_servers": []},
        "synapse_settings": doc["homeservers"]["one.test"]["synapse_settings"],
    }


def _sql(query: str) -> str:
    """A query on the external server itself (not through anything synapse-fabric made)."""
    res = subprocess.run(["docker", "exec", "sfab-extdb", "psql", "-X", "-At", "-U", "synapse", "-d", "synapse",
                          "-c", query], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def a_user_writes(sn: str, user: str, inventory, sql) -> None:
    """register-user, reset-password, log in and send; the user and the message are
    read with `sql` on the database server itself."""
    assert cli(["inv", "register-user", "--homeserver", sn, "--user", user], "first pw", inventory).returncode == 0
    assert cli(["inv", "reset-password", "--homeserver", sn, "--user", user], "second pw", inventory).returncode == 0
    asyncio.run(_say_something(sn, user, "second pw"))
    assert sql(f"SELECT count(*) FROM users WHERE name = '@{user}:{sn}'") == "1"
    assert int(sql("SELECT count(*) FROM events WHERE type = 'm.room.message'")) >= 1


def an_upgrade_that_dies_goes_back(sn: str, user: str, broken, where: str, sql) -> None:
    """`inv upgrade` to the broken Synapse (it moves the schema, then dies) is rolled
    back: the dump goes back into the database (on `where`), the schema version is
    the one before, and `user` logs in and sends again."""
    schema = sql("SELECT version FROM schema_version")
    messages = int(sql("SELECT count(*) FROM events WHERE type = 'm.room.message'"))
    res = run(["inv", "upgrade", "--homeserver", sn], broken)
    assert res.returncode == 1 and "failed and was rolled back" in res.stderr, res.stdout + res.stderr
    assert f"database restored on {where}" in res.stdout
    assert sql("SELECT version FROM schema_version") == schema
    asyncio.run(_say_something(sn, user, "second pw"))
    assert int(sql("SELECT count(*) FROM events WHERE type = 'm.room.message'")) > messages


def test_a_homeserver_on_an_external_postgresql(deployed):
    for _ in range(60):  # the server initialises once, at the sandbox's start
        if subprocess.run(["docker", "exec", "sfab-extdb", "pg_isready", "-U", "synapse"],
                          capture_output=True).returncode == 0:
            break
        subprocess.run(["sleep", "1"])
    for host in ("vps1", HOST):  # an earlier run's records (uninstalled, handed over) on a kept sandbox
        on_host(host, f"rm -f /opt/matrix/.synapse-fabric/uninstalled/{SN} /opt/matrix/.synapse-fabric/handed-over/{SN}")
    password = (REPO / "tests/sandbox/state/extdb-password").read_text().strip()
    secrets_dir = f"/opt/matrix/synapse/{SN}/secrets"
    for name in (SN, f"matrix.{SN}"):
        sb.set_dns(name, sb.HOSTS[HOST].ip)
    inv = variant("external-db", lambda doc: _add(doc, SANDBOX_CA))
    wrong_ca = variant("external-db-wrong-ca", lambda doc: _add(doc, OTHER_CA))

    def broken_synapse(doc):
        _add(doc, SANDBOX_CA)
        doc["images"] = {**(doc.get("images") or {}), "synapse": images.tag_of("synapse-broken")}
    broken = variant("external-db-broken", broken_synapse)
    try:
        # no password on the host yet: the deploy stops at it, naming the command
        res = run(["inv", "deploy", "--host", HOST], inv)
        assert res.returncode == 1 and f"nothing was changed: run inv database-password --homeserver {SN}" \
            in res.stdout + res.stderr
        assert on_host(HOST, f"ls /opt/matrix/synapse/{SN} 2>/dev/null; true").strip() == ""
        assert https_get("matrix.two.test", "/_matrix/client/versions")[0] == 200

        # refused passwords change nothing: a wrong one, and the right one with a CA that did not sign db.test
        res = cli(["inv", "database-password", "--homeserver", SN], "not-the-password", inv)
        assert res.returncode == 1 and "did not take the password" in res.stderr + res.stdout
        res = cli(["inv", "database-password", "--homeserver", SN], password, wrong_ca)
        assert res.returncode == 1 and "certificate verify failed" in res.stderr + res.stdout
        assert on_host(HOST, f"ls {secrets_dir}/pgpass 2>/dev/null; true").strip() == ""

        res = cli(["inv", "database-password", "--homeserver", SN], password, inv)
        assert res.returncode == 0 and "the password works" in res.stdout
        assert on_host(HOST, f"stat -c '%a %u' {secrets_dir}/pgpass").strip() == "400 991"

        res = run(["inv", "deploy", "--host", HOST], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert https_get(f"matrix.{SN}", "/_matrix/client/versions")[0] == 200
        # no database of its own on the host
        assert SN.replace('.', '-') not in on_host(HOST, "docker ps --format '{{.Names}}' | grep postgres; true")
        assert on_host(HOST, f"ls -d /opt/matrix/synapse/{SN}/postgres 2>/dev/null; true").strip() == ""

        user = f"sam-{RUN}"
        a_user_writes(SN, user, inv, _sql)
        # Synapse's connections to the external server are TLS
        assert _sql("SELECT DISTINCT ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) "
                    "WHERE usename = 'synapse' AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
                    "AND client_addr IS NOT NULL") == "t"

        res = run(["inv", "deploy", "--host", HOST], inv)
        assert res.returncode == 0 and f"{HOST}: 0 changed" in res.stdout and "restarted 0" in res.stdout, res.stdout

        # inv upgrade to a Synapse that moves the schema, then dies: the dump goes back
        # into the emptied external database, and the previous Synapse runs on it again
        an_upgrade_that_dies_goes_back(SN, user, broken, sb.EXTDB_NAME, _sql)

        # moved to vps1: the database stays where it is, the new host reaches it first
        res = run(["inv", "migrate-host", "--homeserver", SN, "--to", "vps1"], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"vps1 reaches {SN}'s database on {sb.EXTDB_NAME}" in res.stdout and "streamed" not in res.stdout
        for name in (SN, f"matrix.{SN}"):
            sb.set_dns(name, sb.HOSTS["vps1"].ip)
        asyncio.run(_say_something(SN, user, "second pw"))
        res = run(["inv", "migrate-host", "--homeserver", SN, "--finish", "--yes"], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert on_host(HOST, f"ls -d /opt/matrix/synapse/{SN} 2>/dev/null; true").strip() == ""
        now = "vps1"

        # operations on the database itself are refused, saying why
        res = run(["inv", "upgrade-postgres", "--homeserver", SN, "--to", "17"], inv)
        assert res.returncode != 0 and "not available with an external database" in res.stdout + res.stderr

        # uninstall takes a last snapshot: the dump comes over TLS from the external server
        res = run(["inv", "uninstall", "--homeserver", SN], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"Its database on {sb.EXTDB_NAME} was not touched" in res.stdout
        files = on_host(now, f"RESTIC_REPOSITORY=/var/backups/synapse-fabric/restic/{now} "
                                "RESTIC_PASSWORD_FILE=/etc/synapse-fabric/backup/restic-password "
                                f"restic ls latest --tag synapse-fabric:{SN}")
        assert f"/opt/matrix/.synapse-fabric/backup/{SN}/database.pgdump" in files
        # the external database is the operator's: still there
        assert _sql(f"SELECT count(*) FROM users WHERE name = '@{user}:{SN}'") == "1"
    finally:
        for name in (SN, f"matrix.{SN}"):
            sb.set_dns(name, None)
        wrong_ca.unlink(missing_ok=True)
        broken.unlink(missing_ok=True)
