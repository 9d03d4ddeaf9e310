"""Workers on other hosts (homeservers.<sn>.workers.hosts): what each host runs and
publishes, what it copies, who its firewall lets in, and what the inventory refuses."""

import textwrap

import pytest
import yaml

from fabfile.facts import Facts
from fabfile.inventory import InventoryError, parse
from fabfile.plan import make
from fabfile.render import render_host
from fabfile.workers import processes, published, refuse_remote

INV = """
hosts:
  web: {address: 203.0.113.10, private_address: 10.0.0.10, firewall: {enabled: true}}
  helper: {address: 203.0.113.11, private_address: 10.0.0.11, firewall: {enabled: true}}
  other: {address: 203.0.113.12, private_address: 10.0.0.12}
homeservers:
  w.example:
    host: web
    workers: %s
"""
PLACED = "{preset: balanced, hosts: {federation_sender: helper, client: helper, event_persister: helper}}"
MAIN = "/opt/matrix/synapse/w.example"
GUEST = "/opt/matrix/synapse-workers/w.example"
COPIES = {"w.example": {"image": "matrixdotorg/synapse:v1.0.0", "files": {
    "homeserver.yaml": b"server_name: w.example\n", "w.example.signing.key": b"ed25519 a key\n",
    "postgres_password": b"pa:ss\\word\n", "replication_secret": b"r\n", "redis_password": b"p\n"}}}


def inv(workers: str = PLACED):
    return parse(textwrap.dedent(INV % workers))


def files(st):
    return {f.path: f for f in st.files}


def test_the_homeservers_host_publishes_what_the_others_reach_on_its_private_address_only():
    st = render_host(inv(), "web")
    stack = yaml.safe_load(files(st)[f"{MAIN}/docker-compose.yml"].content)["services"]
    assert stack["postgres"]["ports"] == ["10.0.0.10:7100:5432"]
    assert stack["redis"]["ports"] == ["10.0.0.10:7101:6379"]
    assert stack["synapse"]["ports"] == ["10.0.0.10:7102:9093"]
    assert "ports" in stack["media-1"] and "ports" not in stack["sync-1"]  # media replicates; sync does not
    assert {"client-1", "federation-sender-1", "event-persister-1"}.isdisjoint(stack)
    shared = yaml.safe_load(files(st)[f"{MAIN}/conf.d/60-workers.yaml"].content)
    assert shared["instance_map"]["main"] == {"host": "synapse", "port": 9093}
    assert shared["instance_map"]["event-persister-1"] == {"host": "10.0.0.11", "port": 7239}
    assert shared["redis"]["host"] == "redis"
    nginx = files(st)["/opt/matrix/reverse_proxy/nginx/conf.d/matrix.w.example.conf"].content.decode()
    assert "* 10.0.0.11:7142;" in nginx  # the client worker on helper
    assert processes(inv().homeservers["w.example"]).split() == ["synapse", "sync-1", "federation-reader-1",
                                                                  "media-1", "pusher-1", "background-1"]


def test_the_other_host_runs_only_its_workers_and_reaches_main_at_the_private_address():
    st = render_host(inv(), "helper", guest_copies=COPIES)
    f = files(st)
    stack = yaml.safe_load(f[f"{GUEST}/docker-compose.yml"].content)
    assert set(stack["services"]) == {"client-1", "federation-sender-1", "event-persister-1"}
    assert stack["services"]["client-1"]["ports"] == ["10.0.0.11:7142:8008"]
    assert stack["services"]["event-persister-1"]["ports"] == ["10.0.0.11:7239:9093"]
    assert "ports" not in stack["services"]["federation-sender-1"]
    assert stack["services"]["client-1"]["image"] == "matrixdotorg/synapse:v1.0.0"  # what main runs
    shared = yaml.safe_load(f[f"{GUEST}/conf.d/60-workers.yaml"].content)
    assert shared["instance_map"]["main"] == {"host": "10.0.0.10", "port": 7102}
    assert shared["instance_map"]["event-persister-1"] == {"host": "event-persister-1", "port": 9093}
    assert shared["redis"]["host"] == "10.0.0.10" and shared["redis"]["port"] == 7101
    db = yaml.safe_load(f[f"{GUEST}/conf.d/50-synapse-fabric.yaml"].content)["database"]["args"]
    assert (db["host"], db["port"]) == ("10.0.0.10", 7100)
    pgpass = f[f"{GUEST}/secrets/pgpass"]
    assert pgpass.content == b"10.0.0.10:7100:synapse:synapse:pa\\:ss\\\\word\n"
    for name in ("secrets/pgpass", "secrets/replication_secret", "data/w.example.signing.key", "data/homeserver.yaml"):
        copy = f[f"{GUEST}/{name}"]
        assert copy.secret == "hidden" and copy.owner == "991:991" and copy.mode in (0o400, 0o600)
    assert "matrixdotorg/synapse:v1.0.0" in st.images and not st.homeservers


def test_without_copies_the_paths_are_rendered_for_the_facts():
    f = files(render_host(inv(), "helper"))
    assert f[f"{GUEST}/secrets/pgpass"].content == b"" and f"{GUEST}/data/homeserver.yaml" in f


def test_the_firewalls_let_in_the_homeservers_other_hosts_only():
    web = files(render_host(inv(), "web"))["/etc/synapse-fabric/firewall/rules.v4"].content.decode()
    helper = files(render_host(inv(), "helper"))["/etc/synapse-fabric/firewall/rules.v4"].content.decode()
    assert "-A SFAB-FORWARD -s 10.0.0.11 -p tcp -m conntrack --ctorigdstport 7100 -j RETURN" in web
    assert "-A SFAB-FORWARD -s 10.0.0.10 -p tcp -m conntrack --ctorigdstport 7142 -j RETURN" in helper
    assert "10.0.0.12" not in web + helper
    assert published(inv("{preset: balanced}").homeservers["w.example"], "web") == {}


def test_a_host_without_those_workers_any_more_removes_their_stack():
    st = render_host(inv("{preset: balanced}"), "helper")
    plan = make(st, Facts(docker=True, engine="27", compose="v2", guests={"w.example"}), {}, push=False)
    assert plan.guest_remove == ["w.example"]
    assert any("stop and remove the workers of w.example" in a.what for a in plan.actions)


def test_operations_of_one_host_are_refused_while_workers_run_elsewhere():
    with pytest.raises(InventoryError, match="workers.hosts to {}"):
        refuse_remote(inv().homeservers["w.example"], "inv migrate-host")


@pytest.mark.parametrize("workers, hosts, words", [
    ("{sync: 1, hosts: {sync: nowhere}}", "", "'nowhere' is not a host"),
    ("{sync: 1, hosts: {media: helper}}", "", "media workers stay"),
    ("{sync: 1, hosts: {client: helper}}", "", "no client workers"),
    ("{sync: 1, hosts: {sync: third}}", "  third: {address: 203.0.113.13}\n", "needs a private_address"),
])
def test_bad_placements_are_named(workers, hosts, words):
    text = textwrap.dedent(INV % workers).replace("homeservers:", hosts + "homeservers:")
    with pytest.raises(InventoryError, match=words):
        parse(text)


def test_chains_and_overlapping_ports_are_refused():
    two = textwrap.dedent(INV % "{sync: 1, hosts: {sync: helper}}") + (
        "  v.example:\n    host: helper\n    workers: {sync: 1, hosts: {sync: other}}\n")
    with pytest.raises(InventoryError, match="helper is the host of v.example"):
        parse(two)
    overlap = textwrap.dedent(INV % "{sync: 1, hosts: {sync: helper}}") + (
        "  v.example:\n    host: other\n    workers: {sync: 1, hosts: {sync: helper}, port_base: 7200}\n")
    with pytest.raises(InventoryError, match="overlap"):
        parse(overlap)


def test_a_deploy_of_a_homeserver_includes_the_hosts_of_its_workers():
    from fabfile.deploy import select_hosts
    assert select_hosts(inv(), None, ["w.example"]) == ["web", "helper"]
    assert select_hosts(inv(), None, None) == ["web", "helper"]  # helper has no homeserver of its own
    assert select_hosts(inv("{preset: balanced}"), None, None) == ["web"]


def test_with_every_worker_elsewhere_main_still_has_redis_and_the_secrets():
    st = render_host(inv("{federation_sender: 1, sync: 1, hosts: {federation_sender: helper, sync: helper}}"), "web")
    stack = yaml.safe_load(files(st)[f"{MAIN}/docker-compose.yml"].content)["services"]
    assert "redis" in stack and "redis" in stack["synapse"]["depends_on"]
    assert "./secrets/replication_secret:/run/secrets/replication_secret:ro" in stack["synapse"]["volumes"]
    assert st.synapse_services(st.homeservers[0]) == ["synapse", "postgres", "redis"]


def test_containers_of_the_same_host_cannot_use_the_published_ports():
    web = files(render_host(inv(), "web"))["/etc/synapse-fabric/firewall/rules.v4"].content.decode()
    reject = "-A SFAB-FORWARD -i br-+ -p tcp -m conntrack --ctorigdst 10.0.0.10 --ctorigdstport 7100 -j REJECT"
    assert reject in web and web.index(reject) < web.index("-A SFAB-FORWARD -i br-+ -j RETURN")


@pytest.mark.parametrize("address", ["0.0.0.0", "169.254.1.1", "fe80::1", "::"])
def test_a_private_address_that_is_no_host_address_is_refused(address):
    with pytest.raises(InventoryError, match="private_address"):
        parse(textwrap.dedent(INV % "{}").replace("10.0.0.12", f'"{address}"'))


def test_workers_about_to_start_are_first_stopped_where_they_ran_before_a_move():
    from fabfile.facts import Container
    st = render_host(inv("{sync: 1, event_persister: 1, hosts: {sync: helper}}"), "web")
    facts = Facts(docker=True, engine="27", compose="v2",
                  containers=[Container("synapse-w-example", "synapse", "running", "Up", "a")])
    plan = make(st, facts, {}, push=False)
    assert plan.starting_workers == {"w.example": ["event-persister-1"]}  # it may have run on helper
    stop = [a for a in plan.actions if a.what.startswith("stop event-persister-1")]
    up = [a for a in plan.actions if a.what.startswith("start the stack of w.example")]
    assert stop and up and plan.actions.index(stop[0]) < plan.actions.index(up[0])
    guest = make(render_host(inv("{sync: 1, hosts: {sync: helper}}"), "helper"), Facts(docker=True, engine="27",
                                                                                       compose="v2"), {}, push=False)
    assert guest.starting_workers == {"w.example": ["sync-1"]}
