"""A homeserver's database on another inventory host (homeservers.<sn>.postgres.host):
what the inventory refuses, what each host runs and publishes, who the database
host's firewall lets in, the order hosts converge in, the passfile the homeserver's
host gets, and the plan on the database host."""

import textwrap

import pytest
import yaml

from fabfile import database, firewall
from fabfile.deploy import select_hosts, waves
from fabfile.errors import InventoryError as ErrorsInventoryError, TaskError
from fabfile.facts import Container, Facts, database_secret, synapse_secrets
from fabfile.inventory import InventoryError, parse
from fabfile.plan import make
from fabfile.render import database_project, render_host
from tests.unit.test_plan import LOCAL, converged
from tests.unit.test_worker_hosts import files

INV = """
hosts:
  web: {address: 203.0.113.10, private_address: 10.0.0.10, firewall: {enabled: true}}
  db: {address: 203.0.113.11, private_address: 10.0.0.11, firewall: {enabled: true}}
  other: {address: 203.0.113.12, private_address: 10.0.0.12}
homeservers:
  far.example:
    host: web
    postgres: {host: db}
  own.example: {host: web}
"""
MAIN = "/opt/matrix/synapse/far.example"
DB = "/opt/matrix/synapse-db/far.example"


def inv(text: str = INV):
    return parse(textwrap.dedent(text))


@pytest.mark.parametrize("change, words", [
    (("    postgres: {host: db}", "    postgres: {host: nowhere}"), "'nowhere' is not a host in this inventory"),
    (("    postgres: {host: db}", "    postgres: {host: web}"), "the homeserver's own host"),
    (("  db: {address: 203.0.113.11, private_address: 10.0.0.11, firewall: {enabled: true}}",
      "  db: {address: 203.0.113.11}"), "db needs a private_address"),
    (("    postgres: {host: db}", "    postgres: {host: db, external: {host: x.example, ca: ca.pem}}"),
     "either external or on an inventory host"),
    (("    postgres: {host: db}", "    postgres: {host: db}\n    workers: {preset: balanced, hosts: {sync: other}}"),
     "workers on other hosts is not supported yet"),
    (("  own.example: {host: web}", "  own.example: {host: db, postgres: {host: other}}"),
     "no chains"),
])
def test_bad_database_hosts_are_named(change, words):
    with pytest.raises(InventoryError, match=words):
        inv(INV.replace(*change))


def test_two_databases_on_one_host_need_their_own_ports():
    text = INV.replace("  own.example: {host: web}", "  own.example: {host: web, postgres: {host: db}}")
    with pytest.raises(InventoryError, match=r"own\.example\.workers\.port_base: its database would be published "
                                             r"on db at port 7100, like far\.example's"):
        inv(text)
    inv(text.replace("postgres: {host: db}}", "postgres: {host: db}, workers: {port_base: 7400}}"))


def test_the_homeserver_s_host_runs_no_database_and_reaches_the_other_host_s():
    st = render_host(inv(), "web")
    hs = st.homeservers[0]
    assert hs.server_name == "far.example"
    compose = yaml.safe_load(files(st)[f"{MAIN}/docker-compose.yml"].content)
    assert "postgres" not in compose["services"] and "depends_on" not in compose["services"]["synapse"]
    assert not any(d.path == f"{MAIN}/postgres" for d in st.dirs)
    conf = yaml.safe_load(files(st)[f"{MAIN}/conf.d/50-synapse-fabric.yaml"].content)
    args = conf["database"]["args"]
    assert (args["host"], args["port"]) == ("10.0.0.11", 7100) and "sslmode" not in args
    assert st.synapse_services(hs) == ["synapse"]
    assert synapse_secrets(st, hs) == ("pgpass",)
    # the other homeserver keeps its own database
    own = yaml.safe_load(files(st)["/opt/matrix/synapse/own.example/docker-compose.yml"].content)
    assert "postgres" in own["services"]
    assert not st.databases


def test_the_database_host_runs_it_published_on_its_private_address_only():
    st = render_host(inv(), "db")
    assert list(st.databases) == ["far.example"] and not st.homeservers
    compose = yaml.safe_load(files(st)[f"{DB}/docker-compose.yml"].content)
    pg = compose["services"]["postgres"]
    assert pg["ports"] == ["10.0.0.11:7100:5432"]
    assert files(st)[f"{DB}/.env"].content == b"COMPOSE_PROJECT_NAME=postgres-far-example\n"
    assert pg["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "./postgres:/var/lib/postgresql/data" in pg["volumes"]
    assert {d.path: (d.mode, d.owner) for d in st.dirs}[f"{DB}/postgres"] == (0o700, "999:999")
    assert st.image_triggers(st.databases["far.example"].image) == {"database:far.example:stack"}
    assert st.databases["far.example"].project == database_project(st.databases["far.example"].hs) \
        == "postgres-far-example"


def test_the_database_host_s_firewall_opens_the_port_to_the_homeserver_s_host_only():
    assert firewall.openings(inv(), "db").peers == (("10.0.0.10", 7100),)
    assert firewall.openings(inv(), "web").peers == ()
    assert firewall.openings(inv(), "other").peers == ()
    # while a move is unfinished, both ends of it
    moved = inv().with_homeserver(inv().homeserver("far.example"), host="other", migrated_from="web")
    assert firewall.openings(moved, "db").peers == (("10.0.0.10", 7100), ("10.0.0.12", 7100))


def test_the_database_host_converges_first_and_is_deployed_with_its_homeserver():
    i = inv()
    states = {n: render_host(i, n) for n in ("web", "db", "other")}
    assert waves(states) == [["db", "other"], ["web"]]
    assert sorted(select_hosts(i, None, ["far.example"])) == ["db", "web"]
    assert sorted(select_hosts(i, None, None)) == ["db", "web"]  # other holds nothing
    assert waves({"web": states["web"]}) == [["web"]]  # the database host not deployed in this run


def test_the_database_host_plan_makes_the_password_and_starts_the_database():
    st = render_host(inv(), "db")
    facts = Facts(docker=True, engine="27.5", compose="v2")
    plan = make(st, facts, LOCAL(st), push=True)
    assert plan.database_secrets == ["far.example"] and plan.database_up == ["far.example"]
    assert any(c.path == database_secret(st, "far.example") for c in plan.changes)
    done = converged(st)
    done.firewall = "up"
    done.containers.append(Container("postgres-far-example", "postgres", "running", "Up", "d",
                                      st.databases["far.example"].image))
    again = make(st, done, LOCAL(st), push=True)
    assert again.empty, [c.line() for c in again.changes]
    done.containers.pop()
    assert make(st, done, LOCAL(st), push=True).database_up == ["far.example"]


def test_the_passfile_is_read_on_the_database_host_once_and_rendered_hidden(monkeypatch):
    i = inv()
    st = render_host(i, "web")
    present = Facts(stats={f"{MAIN}/secrets/pgpass": object()})
    assert database.passfiles(i, st, present) == {}  # never read again once there
    line = database.passfile_line(i.homeserver("far.example"), "pa:ss")
    again = render_host(i, "web", db_passfiles={"far.example": line})
    f = files(again)[f"{MAIN}/secrets/pgpass"]
    assert (f.content, f.mode, f.owner, f.secret) == (b"*:*:synapse:synapse:pa\\:ss\n", 0o400, "991:991", "hidden")
    assert f.trigger == "synapse:far.example:stack"


def test_host_side_programs_reach_it_over_the_private_network_without_tls():
    i = inv()
    got = database.inputs(i, i.homeserver("far.example"))
    assert (got["external"], got["db_host"], got["db_port"], got["db_ca"]) == ("1", "10.0.0.11", 7100, "")
    assert got["pgpass"] == f"{MAIN}/secrets/pgpass"


def test_what_is_refused_names_the_host():
    hs = inv().homeserver("far.example")
    with pytest.raises(TaskError, match=r"far\.example: inv restore is not available yet with its database on "
                                        r"another host \(postgres\.host: db\)"):
        database.refuse_external(hs, "inv restore", "why")
    with pytest.raises((InventoryError, ErrorsInventoryError), match="circle"):
        a, b = render_host(inv(), "web"), render_host(inv(), "db")
        waves({"web": a, "db": b.__class__(**{**b.__dict__, "homeservers": a.homeservers})})


def test_a_new_major_in_the_inventory_keeps_the_database_host_s_running_image():
    from fabfile import postgres
    i = inv()
    st = render_host(i, "db")
    facts = Facts(database_major={"far.example": 16},
                  containers=[Container("postgres-far-example", "postgres", "running", "Up", "d", "postgres:16-trixie")])
    keep, notes = postgres.keep_majors(st, facts)
    assert keep == {"far.example": "postgres:16-trixie"} and "keeping postgres:16-trixie" in notes[0]
    assert render_host(i, "db", keep_postgres=keep).databases["far.example"].image == "postgres:16-trixie"
    # and the facts script asks for it
    from fabfile.facts import END, parse, script
    assert f"{DB}/postgres/PG_VERSION" in script(st)
    assert parse(f"Y\tfar.example\t16\n{END}\n", st).database_major == {"far.example": 16}


def test_databases_on_one_host_need_their_own_projects_and_free_ports():
    text = INV.replace("  far.example:", "  a.b-c.example:\n    host: other\n    postgres: {host: db}\n"
                       "    workers: {port_base: 7400}\n  a-b.c.example:")
    with pytest.raises(InventoryError, match=r"compose project on db would be postgres-a-b-c-example"):
        inv(text.replace("  far.example:", "").replace("a-b.c.example:\n    host: web", "a-b.c.example:\n    host: web"))
    with pytest.raises(InventoryError, match=r"at port 2222, which that host already uses"):
        inv(INV.replace("    postgres: {host: db}", "    postgres: {host: db}\n    workers: {port_base: 2222}")
            .replace("firewall: {enabled: true}}\n  other", "firewall: {enabled: true, ssh_ports: [2222]}}\n  other"))


def test_a_passfile_is_never_pointed_at_another_database():
    from fabfile.facts import Stat
    from fabfile.plan import sha256
    st = render_host(inv(), "web")
    f = Stat("regular file", 0o400, "991:991")
    marker = files(st)[f"{MAIN}/secrets/pgpass.for"]
    assert marker.content == b"db 10.0.0.11:7100\n"
    same = Facts(stats={f"{MAIN}/secrets/pgpass": f, marker.path: f}, hashes={marker.path: sha256(marker.content)})
    database.check_before_deploy(st, same)
    moved = render_host(inv(INV.replace("    postgres: {host: db}", "    postgres: {host: other}")), "web")
    with pytest.raises(TaskError, match=r"far\.example: its passfile is for another database host than other"):
        database.check_before_deploy(moved, same)
    # once the operator removed the passfile (the data moved), the deploy reads the new host's
    database.check_before_deploy(moved, Facts(stats={marker.path: f}, hashes={marker.path: sha256(marker.content)}))
    # a passfile of the database it had here is refused, naming what to remove
    with pytest.raises(TaskError, match=r"its secrets still hold the password of the database it had here"):
        database.check_before_deploy(st, Facts(stats={f"{MAIN}/secrets/pgpass": f,
                                                      f"{MAIN}/secrets/postgres_password": f}))


def test_a_database_stack_no_homeserver_names_is_reported_not_removed():
    from fabfile.facts import END, parse, script
    st = render_host(inv(), "db")
    assert "/opt/matrix/synapse-db/*/docker-compose.yml" in script(st)
    facts = parse(f"Z\tfar.example\nZ\tgone.example\n{END}\n", st)
    assert facts.databases == {"far.example", "gone.example"}
    plan = make(st, facts, LOCAL(st), push=True)
    assert not any("gone.example" in c.path for c in plan.changes)
