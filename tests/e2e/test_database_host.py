"""A homeserver's database on another inventory host (postgres.host, issue #18):
dbhost.test runs on vps2, its PostgreSQL on vps3 (in /opt/matrix/synapse-db/<sn>),
published on vps3's private address only, with vps3's firewall letting in the
homeserver's host only. `fab -H vps3 bootstrap` installs Docker there and starts the
database (vps3 makes its password); `inv deploy --homeserver` converges vps3 first,
then vps2 (it reads the password on vps3 once, for its passfile). Users, `inv
migrate-host` to vps1 (the database stays; vps3 lets both ends in until `--finish`),
`inv backup` and `inv restore` (the snapshot's database back on vps3, what it held
dumped aside first; `inv upgrade`'s way back runs the same program, which
test_external_db covers with a Synapse that dies) and `inv uninstall` (a last
snapshot, then the database removed from vps3) work with it; what lands in the
database is read on vps3 itself."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess

import pytest

from tests.e2e.helpers import BIN, REPO, https_get, on_host, run, variant
from tests.e2e.test_uninstall import _say_something
from tests.e2e.test_external_db import a_user_writes
from tests.e2e.test_w_workers import _probe
from tests.sandbox import sandbox as sb
from tests.sandbox.portscan import open_tcp_ports

pytestmark = pytest.mark.e2e

SN = "dbhost.test"
HOST, DB_HOST = "vps2", "vps3"
PORT = 7100  # workers.port_base: where the database is published on vps3's private address
PRIVATE = {"vps1": "10.231.0.11", "vps2": "10.231.0.12", "vps3": "10.231.0.13"}
CONTAINER = "postgres-dbhost-test-postgres-1"
RUN = secrets.token_hex(3)
TEST_CA = "tests/sandbox/state/acme-roots.pem"


def _add(doc) -> None:
    doc["homeservers"][SN] = {
        "host": HOST,
        "postgres": {"host": DB_HOST},
        "federation": {"trusted_ca": TEST_CA, "allow_ip_ranges": ["172.29.231.0/24"], "trusted_key_servers": []},
        "synapse_settings": doc["homeservers"]["one.test"]["synapse_settings"],
    }
    doc["hosts"][DB_HOST]["firewall"] = {"enabled": True}


def _sql(query: str) -> str:
    """A query on vps3's PostgreSQL itself (not through anything synapse-fabric runs for it)."""
    return on_host(DB_HOST, f"docker exec {CONTAINER} psql -X -At -U synapse -d synapse -c \"{query}\"").strip()


def _names(host: str) -> None:
    for name in (SN, f"matrix.{SN}"):
        sb.set_dns(name, sb.HOSTS[host].ip)


def _uninstall(inventory) -> None:
    """dbhost.test off whichever host holds it, without a snapshot (nothing if none does)."""
    for host in (HOST, "vps1"):
        if on_host(host, f"ls /opt/matrix/synapse/{SN}/docker-compose.yml 2>/dev/null; true").strip():
            moved = variant("database-host-leftover", lambda doc: (_add(doc), doc["homeservers"][SN].update(host=host)))
            subprocess.run([str(BIN / "inv"), "uninstall", "--homeserver", SN, "--no-backup"], cwd=REPO,
                           env={**os.environ, "INVOKE_INVENTORY": str(moved)}, input=f"{SN}\n",
                           text=True, capture_output=True, timeout=600)
            moved.unlink(missing_ok=True)


def test_a_homeserver_with_its_database_on_another_host(deployed):
    _names(HOST)
    inv = variant("database-host", _add)
    _uninstall(inv)  # an earlier run's leftovers on a kept sandbox (its database's password is not this run's)
    for host in ("vps1", HOST):  # and its records (uninstalled, handed over)
        on_host(host, f"rm -f /opt/matrix/.synapse-fabric/uninstalled/{SN} /opt/matrix/.synapse-fabric/handed-over/{SN}")
    try:
        # vps3 is bare (the migration target): bootstrap installs Docker, then deploys its part
        res = run(["fab", "-H", DB_HOST, "bootstrap"], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"{SN}: starting its database here" in res.stdout
        res = run(["inv", "deploy", "--homeserver", SN], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"{DB_HOST}: 0 changed" in res.stdout, res.stdout
        assert https_get(f"matrix.{SN}", "/_matrix/client/versions")[0] == 200
        # the database runs on vps3, not on vps2; vps2 keeps only its passfile
        assert on_host(DB_HOST, f"docker ps --filter name={CONTAINER} --format '{{{{.Status}}}}'").startswith("Up")
        assert on_host(DB_HOST, f"stat -c '%a %u' /opt/matrix/synapse-db/{SN}/secrets/postgres_password").strip() \
            == "400 999"
        assert "dbhost-test-postgres" not in on_host(HOST, "docker ps -a --format '{{.Names}}'")
        assert on_host(HOST, f"ls -d /opt/matrix/synapse/{SN}/postgres 2>/dev/null; true").strip() == ""
        assert on_host(HOST, f"stat -c '%a %u' /opt/matrix/synapse/{SN}/secrets/pgpass").strip() == "400 991"

        user = f"dana-{RUN}"
        a_user_writes(SN, user, inv, _sql)
        # Synapse's connections come from vps2, over the private network
        assert _sql("SELECT DISTINCT host(client_addr) FROM pg_stat_activity WHERE usename = 'synapse' "
                    "AND client_addr IS NOT NULL AND pid <> pg_backend_pid()") == PRIVATE[HOST]

        # from outside (this machine) the port does not answer on vps3's public address;
        # on the private network vps2 reaches it, vps1 (not one of dbhost.test's hosts) does not
        assert open_tcp_ports(sb.HOSTS[DB_HOST].ip, [PORT, 5432]) == []
        assert _probe(HOST, PRIVATE[DB_HOST], [PORT]) == {PORT: True}
        assert _probe("vps1", PRIVATE[DB_HOST], [PORT]) == {PORT: False}

        res = run(["inv", "deploy", "--homeserver", SN], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        for host in (HOST, DB_HOST):
            assert f"{host}: 0 changed" in res.stdout and "restarted 0" in res.stdout, res.stdout


        # moved to vps1: the database stays on vps3, which lets both hosts in until --finish
        res = run(["inv", "migrate-host", "--homeserver", SN, "--to", "vps1"], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"{DB_HOST} lets {HOST} and vps1 reach {SN}'s database" in res.stdout
        assert f"vps1 reaches {SN}'s database on host {DB_HOST} (private network)" in res.stdout
        assert "streamed" not in res.stdout
        _names("vps1")
        asyncio.run(_say_something(SN, user, "second pw"))
        assert _probe(HOST, PRIVATE[DB_HOST], [PORT]) == {PORT: True}
        res = run(["inv", "migrate-host", "--homeserver", SN, "--finish", "--yes"], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert _probe("vps1", PRIVATE[DB_HOST], [PORT]) == {PORT: True}
        assert _probe(HOST, PRIVATE[DB_HOST], [PORT]) == {PORT: False}
        asyncio.run(_say_something(SN, user, "second pw"))

        # a snapshot, then a message after it: inv restore brings back the snapshot's
        # database on vps3 (what it held is dumped aside first), and it serves
        res = run(["inv", "backup", "--homeserver", SN], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        snapshot = int(_sql("SELECT count(*) FROM events WHERE type = 'm.room.message'"))
        asyncio.run(_say_something(SN, user, "second pw"))
        assert int(_sql("SELECT count(*) FROM events WHERE type = 'm.room.message'")) == snapshot + 1
        res = run(["inv", "restore", "--homeserver", SN, "--yes"], inv)
        assert res.returncode == 0 and f"done: {SN} runs on vps1" in res.stdout, res.stdout + res.stderr
        assert "what its database held is kept aside in" in res.stdout
        assert int(_sql("SELECT count(*) FROM events WHERE type = 'm.room.message'")) == snapshot
        assert on_host("vps1", f"ls /opt/matrix/.synapse-fabric/before-restore/{SN}-*/database.pgdump").strip()
        asyncio.run(_say_something(SN, user, "second pw"))

        res = run(["inv", "upgrade-postgres", "--homeserver", SN, "--to", "17"], inv)
        assert res.returncode != 0 and "not available yet with its database on another host" in res.stdout + res.stderr
        res = run(["inv", "logs", "--homeserver", SN, "--service", "postgres", "--tail", "5"], inv)
        assert res.returncode == 0 and "database system is ready" in res.stdout, res.stdout + res.stderr

        # uninstall: a last snapshot (pg_dump from vps1 over the private network), then the
        # database is removed from vps3, whose firewall closes the port again
        res = run(["inv", "uninstall", "--homeserver", SN], inv)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"{SN}: its database on {DB_HOST} is removed" in res.stdout
        files = on_host("vps1", "RESTIC_REPOSITORY=/var/backups/synapse-fabric/restic/vps1 "
                                "RESTIC_PASSWORD_FILE=/etc/synapse-fabric/backup/restic-password "
                                f"restic ls latest --tag synapse-fabric:{SN}")
        assert f"/opt/matrix/.synapse-fabric/backup/{SN}/database.pgdump" in files
        assert on_host(DB_HOST, "ls -A /opt/matrix/synapse-db 2>/dev/null; true").strip() == ""
        assert CONTAINER not in on_host(DB_HOST, "docker ps -a --format '{{.Names}}'")
    finally:
        _uninstall(inv)
        for name in (SN, f"matrix.{SN}"):
            sb.set_dns(name, None)
        # vps3 as the later tests find it (nothing of synapse-fabric's)
        scratch = variant("database-host-vps3", lambda doc: None)
        run(["inv", "uninstall", "--host", DB_HOST], scratch)
        scratch.unlink(missing_ok=True)
        inv.unlink(missing_ok=True)
