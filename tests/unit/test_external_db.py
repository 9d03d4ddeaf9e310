"""An external PostgreSQL (homeservers.<sn>.postgres.external): what the inventory
takes and refuses, what the host runs (no database of its own), how Synapse reaches
the server (TLS verify-full), and the host-side programs' inputs."""

import textwrap

import pytest
import yaml

from fabfile import database
from fabfile.errors import TaskError
from fabfile.facts import synapse_secrets
from fabfile.inventory import InventoryError, parse
from fabfile.render import DB_CA_MOUNT, render_host

CA = b"-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n"
INV = """
hosts:
  web: {address: 203.0.113.10}
homeservers:
  ext.example:
    host: web
    postgres: {external: {host: db.example.net, port: 6432, ca: certs/db-ca.pem}}
  own.example: {host: web}
"""
ROOT = "/opt/matrix/synapse/ext.example"


def inv(text: str = INV, **kw):
    return parse(textwrap.dedent(text), **kw)


def state():
    return render_host(inv(), "web", read=lambda p: CA)


def test_the_ca_path_is_the_inventory_s_and_the_host_a_checked_name(tmp_path):
    path = tmp_path / "hosts.yaml"
    path.write_text(textwrap.dedent(INV))
    from fabfile.inventory import load
    ext = load(path).homeservers["ext.example"].postgres.external
    assert ext.ca == tmp_path / "certs" / "db-ca.pem" and (ext.host, ext.port) == ("db.example.net", 6432)
    with pytest.raises(InventoryError, match=r"postgres\.external\.host"):
        inv(INV.replace("db.example.net", "db_example;rm"))
    with pytest.raises(InventoryError, match=r"postgres\.external\.ca"):
        inv(INV.replace(", ca: certs/db-ca.pem", ""))


def test_workers_elsewhere_with_an_external_database_are_refused_by_name():
    text = INV.replace("  web: {address: 203.0.113.10}",
                       "  web: {address: 203.0.113.10, private_address: 10.0.0.10}\n"
                       "  helper: {address: 203.0.113.11, private_address: 10.0.0.11}").replace(
        "    postgres: {external:", "    workers: {preset: balanced, hosts: {client: helper}}\n    postgres: {external:")
    with pytest.raises(InventoryError, match=r"ext\.example\.postgres\.external: an external database with workers"):
        inv(text)


def test_the_stack_has_no_database_and_synapse_checks_the_server_s_name():
    st = state()
    files = {f.path: f for f in st.files}
    compose = yaml.safe_load(files[f"{ROOT}/docker-compose.yml"].content)
    assert set(compose["services"]) == {"synapse"}
    assert "depends_on" not in compose["services"]["synapse"]
    assert f"./db-ca.pem:{DB_CA_MOUNT}:ro" in compose["services"]["synapse"]["volumes"]
    assert files[f"{ROOT}/db-ca.pem"].content == CA and files[f"{ROOT}/db-ca.pem"].trigger == "synapse:ext.example:restart"
    args = yaml.safe_load(files[f"{ROOT}/conf.d/50-synapse-fabric.yaml"].content)["database"]["args"]
    assert (args["host"], args["port"], args["sslmode"], args["sslrootcert"]) == \
        ("db.example.net", 6432, "verify-full", DB_CA_MOUNT)
    assert "password" not in args and args["passfile"] == "/run/secrets/pgpass"
    assert f"{ROOT}/postgres" not in {d.path for d in st.dirs}
    ext, own = sorted(st.homeservers, key=lambda hs: hs.server_name)
    assert st.synapse_services(ext) == ["synapse"] and "postgres" in st.synapse_services(own)
    # only the passfile is its secret: no password is made on the host
    assert synapse_secrets(st, ext) == ("pgpass",) and "postgres_password" in synapse_secrets(st, own)
    # the PostgreSQL image is its client tools only: a new one recreates nothing
    assert "synapse:ext.example:stack" not in st.image_triggers(st.postgres_image(ext))
    assert "synapse:own.example:stack" in st.image_triggers(st.postgres_image(own))


def test_a_worker_on_the_host_reads_the_ca_too():
    text = INV.replace("    postgres: {external:", "    workers: {preset: balanced}\n    postgres: {external:")
    st = render_host(inv(text), "web", read=lambda p: CA)
    compose = yaml.safe_load(next(f for f in st.files if f.path == f"{ROOT}/docker-compose.yml").content)
    assert set(compose["services"]) >= {"synapse", "redis"} and "postgres" not in compose["services"]
    for name, svc in compose["services"].items():
        if name != "redis":
            assert f"./db-ca.pem:{DB_CA_MOUNT}:ro" in svc["volumes"], name
    assert set(compose["services"]["synapse"]["depends_on"]) == {"redis"}


def test_passfile_line_escapes_what_libpq_reads_as_separators():
    hs = inv().homeservers["ext.example"]
    assert database.passfile_line(hs, "a:b\\c d") == b"*:*:synapse:synapse:a\\:b\\\\c d\n"


def test_host_programs_get_every_input_either_way():
    i = inv()
    ext, own = database.inputs(i, i.homeservers["ext.example"]), database.inputs(i, i.homeservers["own.example"])
    assert set(ext) == set(own)
    assert ext["external"] == "1" and ext["db_ca"] == f"{ROOT}/db-ca.pem" and ext["pgpass"] == f"{ROOT}/secrets/pgpass"
    assert own["external"] == "" and own["pg_user"] == "synapse"


def test_operations_on_the_database_itself_are_refused_with_why():
    i = inv()
    with pytest.raises(TaskError, match=r"ext\.example: inv upgrade-postgres is not available with an external"):
        database.refuse_external(i.homeservers["ext.example"], "inv upgrade-postgres", "its server's")
    database.refuse_external(i.homeservers["own.example"], "inv upgrade-postgres", "")
    with pytest.raises(TaskError, match="for postgres.external"):
        database.set_password(i, "own.example", None)


def test_a_deploy_without_the_password_on_the_host_stops_before_any_change():
    from fabfile.facts import Facts, Stat
    st = state()
    with pytest.raises(TaskError, match=r"ext\.example is not on the host yet; nothing was changed: run "
                                        r"inv database-password --homeserver ext\.example"):
        database.check_before_deploy(st, Facts())
    database.check_before_deploy(st, Facts(stats={f"{ROOT}/secrets/pgpass": Stat("regular file", 0o400, "991:991")}))


def test_a_deploy_never_switches_a_homeserver_between_its_own_database_and_an_external_one():
    from fabfile.facts import Facts, Stat
    f = Stat("regular file", 0o400, "991:991")
    # its own data is here, and hosts.yaml now names an external server: the data would stay behind
    with pytest.raises(TaskError, match=r"ext\.example: its database is here \(PostgreSQL 17"):
        database.check_before_deploy(state(), Facts(pg_major={"ext.example": 17},
                                                    stats={f"{ROOT}/secrets/pgpass": f}))
    # it used an external server, and hosts.yaml no longer names one: an empty database would start
    own = render_host(inv(INV.replace("    postgres: {external: {host: db.example.net, port: 6432, ca: certs/db-ca.pem}}\n",
                                      "")), "web", read=lambda p: CA)
    with pytest.raises(TaskError, match=r"ext\.example: its database was elsewhere"):
        database.check_before_deploy(own, Facts(stats={f"{ROOT}/secrets/pgpass": f}))
    database.check_before_deploy(own, Facts(stats={f"{ROOT}/secrets/pgpass": f, f"{ROOT}/secrets/postgres_password": f},
                                            pg_major={"ext.example": 17}))
