"""plan.make: the pure diff between the rendered state and a host's facts."""

import textwrap

import pytest

from fabfile import facts as facts_mod, steps
from fabfile.errors import RemoteError
from fabfile.facts import Container, Facts, Stat
from fabfile.inventory import parse
from fabfile.plan import applicable, make, sha256
from fabfile.render import PROXY_PROJECT, render_host, synapse_project
from fabfile.report import mask, masked_diff

INV_TEXT = textwrap.dedent("""
    hosts:
      web: {address: 203.0.113.10, images: push}
    homeservers:
      one.example: {host: web}
      two.example: {host: web}
""")
INV = parse(INV_TEXT)


def converged(state, systemd: bool = False) -> Facts:
    """Facts of a host that holds exactly the desired state and runs everything."""
    f = Facts(docker=True, engine="20.10", compose="v1", pid1="systemd" if systemd else "tini")
    for d in state.dirs:
        f.stats[d.path] = Stat("directory", d.mode, d.owner)
    for unit in facts_mod.timers(state):
        f.timers[unit] = ("enabled", "active")
    for file in applicable(state, f):
        f.stats[file.path] = Stat("regular file", file.mode, file.owner)
        f.hashes[file.path] = sha256(file.content)
        if "Managed by synapse-fabric" in file.content.decode(errors="replace")[:200]:
            f.managed.add(file.path)
    for path in facts_mod.secret_paths(state) + facts_mod.generated_paths(state) + facts_mod.cert_paths(state):
        f.stats[path] = Stat("regular file", 0o400, "0:0")
    f.containers.append(Container(PROXY_PROJECT, "nginx", "running", "Up", "a", state.image_refs["nginx"]))
    for hs in state.homeservers:
        f.containers.append(Container(synapse_project(hs), "synapse", "running", "Up", "b",
                                      state.image_refs["synapse"]))
        f.containers.append(Container(synapse_project(hs), "postgres", "running", "Up", "c",
                                      state.postgres_image(hs)))
    f.images = {ref: "sha256:1" for ref in state.images}
    return f


LOCAL = lambda state: {ref: "sha256:1" for ref in state.images}  # noqa: E731


def test_converged_host_gives_an_empty_plan():
    state = render_host(INV, "web")
    facts = converged(state)
    plan = make(state, facts, LOCAL(state), push=True)
    assert plan.empty and plan.changes == [] and plan.restarts == []
    assert plan.ok == len(state.dirs) + len(applicable(state, facts))


def test_synapse_setting_restarts_only_its_homeserver():
    state = render_host(INV, "web")
    facts = converged(state)
    facts.hashes["/opt/matrix/synapse/two.example/conf.d/50-synapse-fabric.yaml"] = "old"
    plan = make(state, facts, LOCAL(state), push=True)
    assert [c.path for c in plan.changes] == ["/opt/matrix/synapse/two.example/conf.d/50-synapse-fabric.yaml"]
    assert plan.synapse_restart == ["two.example"]
    assert plan.synapse_up == [] and not plan.proxy_up and not plan.nginx_reload


def test_each_step_says_what_and_why_and_they_run_in_order():
    state = render_host(INV, "web")
    facts = converged(state)
    facts.hashes["/opt/matrix/synapse/two.example/conf.d/50-synapse-fabric.yaml"] = "old"
    facts.hashes["/opt/matrix/reverse_proxy/nginx/conf.d/matrix.one.example.conf"] = "old"
    plan = make(state, facts, LOCAL(state), push=True)
    lines = [a.line() for a in plan.actions if a.only_if is None]
    assert lines == [
        "would write 2 file(s) and director(ies) (/opt/matrix/reverse_proxy/nginx/conf.d/matrix.one.example.conf, "
        "/opt/matrix/synapse/two.example/conf.d/50-synapse-fabric.yaml)",
        "would reload nginx (matrix.one.example.conf changed)",
        "would restart Synapse of two.example (50-synapse-fabric.yaml changed)",
    ]
    assert plan.restarts == ["two.example (restart)"]
    # health is waited for, and the journal cleared, only when something ran
    assert [a.what for a in plan.actions if a.only_if is not None] == [
        "wait until what was started is healthy", "clear the pending actions"]


def test_a_pull_that_brings_a_new_image_recreates_its_users_while_applying():
    state = render_host(PULL_INV, "web")
    facts = converged(state)
    facts.digests = {}
    plan = make(state, facts, {}, push=False)
    up = [a for a in plan.actions if a.what == "start the reverse-proxy stack (up)"]
    assert len(up) == 1 and up[0].line() == "would start the reverse-proxy stack (up) if the pull brings a new nginx image"
    assert plan.restarts == []  # decided while applying


def test_vhost_change_reloads_nginx_only():
    state = render_host(INV, "web")
    facts = converged(state)
    facts.hashes["/opt/matrix/reverse_proxy/nginx/conf.d/matrix.one.example.conf"] = "old"
    plan = make(state, facts, LOCAL(state), push=True)
    assert plan.nginx_reload and not plan.proxy_up
    assert plan.synapse_restart == [] and plan.synapse_up == []


def test_stale_managed_file_is_removed_and_restarts_its_owner():
    state = render_host(INV, "web")
    facts = converged(state)
    stale = "/opt/matrix/synapse/one.example/conf.d/90-operator.yaml"
    facts.managed.add(stale)
    plan = make(state, facts, LOCAL(state), push=True)
    assert plan.remove == [stale] and plan.synapse_restart == ["one.example"]


def test_bare_host_gets_everything_and_secrets_are_made_there():
    state = render_host(INV, "web")
    facts = Facts(docker=True, engine="20.10", compose="v1")
    plan = make(state, facts, LOCAL(state), push=True)
    assert sorted(plan.secrets) == sorted(plan.generate) == ["one.example", "two.example"]
    assert plan.proxy_up and sorted(plan.synapse_up) == ["one.example", "two.example"]
    assert sorted(plan.images) == sorted(state.images)
    assert not plan.nginx_reload  # nothing runs yet: `up` loads the config


def test_new_image_recreates_its_users():
    state = render_host(INV, "web")
    facts = converged(state)
    local = {**LOCAL(state), INV.image("synapse"): "sha256:2"}
    plan = make(state, facts, local, push=True)
    assert plan.images == [INV.image("synapse")]
    assert sorted(plan.synapse_up) == ["one.example", "two.example"] and not plan.proxy_up


def test_wrong_data_owner_is_fixed_without_rewrites():
    state = render_host(INV, "web")
    facts = converged(state)
    facts.wrong_owner["one.example"] = "/opt/matrix/synapse/one.example/data/media_store"
    plan = make(state, facts, LOCAL(state), push=True)
    assert plan.chown_data == ["one.example"] and plan.files == []


def test_facts_parser_reads_every_record():
    out = "\n".join([
        "S\t/opt/matrix\tdirectory\t755\t0:0", "H\tabc\t/opt/matrix/x", "B\tdocker", "K\tv2",
        "E\t24.0.7", "C\tp\tnginx\trunning\tUp 1 minute (healthy)\tid1", "I\tnginx:1.22\tsha256:9",
        "O\tone.example\t/opt/matrix/synapse/one.example/data/x", "1\tsystemd", "M\t/opt/matrix/a.conf",
        facts_mod.END,
    ])
    f = facts_mod.parse(out)
    assert f.stats["/opt/matrix"].mode == 0o755 and f.hashes["/opt/matrix/x"] == "abc"
    assert (f.docker, f.engine, f.compose, f.pid1) == (True, "24.0.7", "v2", "systemd")
    assert f.running("p", "nginx") and f.images["nginx:1.22"] == "sha256:9"
    assert f.wrong_owner == {"one.example": "/opt/matrix/synapse/one.example/data/x"}
    assert f.managed == {"/opt/matrix/a.conf"}
    with pytest.raises(RemoteError, match="did not finish"):
        facts_mod.parse(out.replace(facts_mod.END, ""))


def test_diffs_mask_secrets():
    for line in ["macaroon_secret_key: abc", "  smtp_pass: hunter2", "pepper: p", "registration_shared_secret: s"]:
        assert mask(line).endswith("***")
    assert mask("client_max_body_size 50M;") == "client_max_body_size 50M;"
    diff = masked_diff("/x.yaml", b"a: 1\n", b"a: 1\nform_secret: abc\n")
    assert "abc" not in diff and "+form_secret: ***" in diff
    assert "not shown" in masked_diff("/k.pem", None, b"-----BEGIN PRIVATE KEY-----\nxx\n")


def test_certificate_is_issued_once_and_again_only_when_names_change():
    state = render_host(INV, "web")
    facts = converged(state)
    assert make(state, facts, LOCAL(state), push=True).issue == []
    del facts.stats["/opt/matrix/reverse_proxy/acme/letsencrypt/live/one.example/fullchain.pem"]
    assert make(state, facts, LOCAL(state), push=True).issue == ["one.example"]
    facts = converged(state)
    facts.hashes["/opt/matrix/reverse_proxy/certs/two.example/names"] = "old names"
    plan = make(state, facts, LOCAL(state), push=True)
    assert plan.issue == ["two.example"] and plan.synapse_restart == [] and not plan.nginx_reload


def test_actions_left_by_an_interrupted_run_are_done_by_the_next():
    state = render_host(INV, "web")
    facts = converged(state)
    facts.pending = {"synapse:one.example:restart", "proxy:reload"}
    plan = make(state, facts, LOCAL(state), push=True)
    assert plan.changes == [] and not plan.empty
    assert plan.synapse_restart == ["one.example"] and plan.nginx_reload and plan.pending_done


# -- hosts as operators have them: systemd timers, pulled images, PostgreSQL majors

def test_systemd_host_gets_timers_and_no_cron_files():
    state = render_host(INV, "web")
    facts = converged(state, systemd=True)
    paths = {f.path for f in applicable(state, facts)}
    assert "/etc/systemd/system/synapse-fabric-certificates.timer" in paths
    assert not any(p.startswith("/etc/cron.d/") for p in paths)
    assert make(state, facts, LOCAL(state), push=True).empty
    # a timer that is not running (e.g. disabled by hand) is enabled again
    facts.timers["synapse-fabric-certificates.timer"] = ("disabled", "inactive")
    plan = make(state, facts, LOCAL(state), push=True)
    assert plan.timers == ["synapse-fabric-certificates.timer"] and plan.files == []
    # a host that moved to systemd drops its cron file
    facts = converged(state, systemd=True)
    facts.stats["/etc/cron.d/synapse-fabric-certificates"] = Stat("regular file", 0o644, "0:0")
    assert make(state, facts, LOCAL(state), push=True).remove == ["/etc/cron.d/synapse-fabric-certificates"]


def test_host_without_systemd_gets_cron_files():
    state = render_host(INV, "web")
    paths = {f.path for f in applicable(state, converged(state))}
    assert "/etc/cron.d/synapse-fabric-certificates" in paths
    assert not any(p.startswith("/etc/systemd/") for p in paths)


PULL_INV = parse(textwrap.dedent("""
    images:
      nginx: nginx:1.30@sha256:1111111111111111111111111111111111111111111111111111111111111111
    hosts:
      web: {address: 203.0.113.10}
    homeservers:
      one.example: {host: web}
"""))


def test_pull_host_pulls_only_what_it_lacks():
    state = render_host(PULL_INV, "web")
    facts = converged(state)
    pinned = PULL_INV.image("nginx")
    facts.digests = {"nginx@sha256:" + "1" * 64: "sha256:1"}
    plan = make(state, facts, {}, push=False)
    assert plan.pulls == [] and plan.empty
    # a digest pin is present only as that digest, whatever tags exist
    facts.digests = {}
    assert make(state, facts, {}, push=False).pulls == [pinned]
    # a tag a service is about to switch to is pulled again, even when present
    facts = converged(state)
    facts.digests = {"nginx@sha256:" + "1" * 64: "sha256:1"}
    pg = state.postgres_image(state.homeservers[0])
    facts.containers = [c if c.service != "synapse" else
                        type(c)(c.project, c.service, c.state, c.status, c.id, "matrixdotorg/synapse:v1.0.0")
                        for c in facts.containers]
    assert make(state, facts, {}, push=False).pulls == [PULL_INV.image("synapse")]
    # --pull asks again for every tag, never for a digest pin
    facts = converged(state)
    facts.digests = {"nginx@sha256:" + "1" * 64: "sha256:1"}
    refreshed = make(state, facts, {}, push=False, refresh_tags=True).pulls
    assert sorted(refreshed) == sorted([PULL_INV.image("certbot"), PULL_INV.image("synapse"), pg])


def test_postgres_keeps_the_major_of_its_data():
    from fabfile.postgres import keep_majors
    from fabfile.schema import InventoryError as Err

    state = render_host(INV, "web")
    facts = converged(state)
    assert keep_majors(state, facts) == ({}, [])
    facts.pg_major = {"one.example": 17, "two.example": 15}
    for c in facts.containers:
        if c.project == synapse_project(state.homeservers[1]) and c.service == "postgres":
            c.image = "postgres:15-bookworm"
    keep, notes = keep_majors(state, facts)
    assert keep == {"two.example": "postgres:15-bookworm"} and "PostgreSQL 15" in notes[0]
    kept = render_host(INV, "web", keep_postgres=keep)
    assert b'"postgres:15-bookworm"' in kept.file("/opt/matrix/synapse/two.example/docker-compose.yml").content
    assert b'"postgres:17-trixie"' in kept.file("/opt/matrix/synapse/one.example/docker-compose.yml").content
    # no container of the right major left: refuse, naming the key to set
    facts.containers = [c for c in facts.containers if c.service != "postgres"]
    with pytest.raises(Err, match="homeservers.two.example.postgres.image"):
        keep_majors(state, facts)


def test_guard_refuses_a_stale_inventory():
    from fabfile import guard

    state = render_host(INV, "web")
    facts = converged(state)
    facts.hosted = {"one.example", "two.example"}
    guard.check(state, facts, "hosts.yaml")  # what the host holds is what the inventory says
    # the host handed one.example over: starting it here again is refused
    facts.handed_over = {"one.example": {"to": "web2", "address": "203.0.113.20", "at": "2026-11-24"}}
    with pytest.raises(guard.StaleInventory, match="one.example was moved from web to web2"):
        guard.check(state, facts, "hosts.yaml")
    guard.check(state, facts, "hosts.yaml", migrating="one.example")  # the migration's own converges
    # a migration in progress from this host
    facts.handed_over = {}
    facts.migrating = {"two.example": {"to": "web2", "phase": "stopped"}}
    with pytest.raises(guard.StaleInventory, match="migration of two.example from web to web2 is in progress"):
        guard.check(state, facts, "hosts.yaml")
    # a homeserver the host runs that the inventory does not place there
    facts.migrating = {}
    facts.hosted = {"one.example", "two.example", "three.example"}
    with pytest.raises(guard.StaleInventory, match="web runs three.example"):
        guard.check(state, facts, "hosts.yaml")
    # ...unless it is the stopped old copy of a finished hand-over
    facts.handed_over = {"three.example": {"to": "web2"}}
    guard.check(state, facts, "hosts.yaml")


def test_guard_refuses_a_new_base_dir_while_the_old_one_holds_homeservers():
    from fabfile import guard

    state = render_host(INV, "web")
    facts = converged(state)
    facts.base_record = ("/opt/matrix", ["one.example", "two.example"])
    guard.check(state, facts, "hosts.yaml")
    moved = render_host(parse(INV_TEXT.replace("images: push", "images: push, base_dir: /srv/matrix")), "web")
    with pytest.raises(guard.StaleInventory, match="deployed with base_dir /opt/matrix, which still holds "
                                                   "one.example, two.example; the inventory says /srv/matrix"):
        guard.check(moved, facts, "hosts.yaml")
    # the operator moved the directory (the old one holds nothing), but a stack still runs from it
    facts.base_record = ("/opt/matrix", [])
    facts.containers = [Container("synapse-one-example", "synapse", "running", "Up", "b", "x",
                                  "/opt/matrix/synapse/one.example")]
    with pytest.raises(guard.StaleInventory, match="runs stacks from /opt/matrix/synapse/one.example"):
        guard.check(moved, facts, "hosts.yaml")
    facts.containers = [Container("synapse-one-example", "synapse", "running", "Up", "b", "x",
                                  "/srv/matrix/synapse/one.example")]
    guard.check(moved, facts, "hosts.yaml")
    # /opt/matrix-old is not inside /opt/matrix
    facts.base_record = ("/srv/matrix-old", ["one.example"])
    with pytest.raises(guard.StaleInventory, match="/srv/matrix-old"):
        guard.check(moved, facts, "hosts.yaml")


def test_a_feature_turned_off_stops_running():
    # the host ran Element (its timer, service and updater script); the inventory no longer asks
    state = render_host(INV, "web")
    facts = converged(state, systemd=True)
    gone = ["/etc/systemd/system/synapse-fabric-element.timer", "/etc/systemd/system/synapse-fabric-element.service",
            "/opt/matrix/reverse_proxy/bin/element-update"]
    for path in gone:
        facts.stats[path] = Stat("regular file", 0o644, "0:0")
    plan = make(state, facts, LOCAL(state), push=True)
    assert sorted(plan.remove) == sorted(gone)
    assert all(c.detail == "not needed on this host" for c in plan.changes)


def test_a_deploy_keeps_the_running_synapse_image_and_an_upgrade_pin_moves_it():
    from fabfile.versions import keep_synapse

    old = "matrixdotorg/synapse:v1.162.0"
    state = render_host(INV, "web")
    # the host as an earlier deploy left it: one.example on the previous release
    before = render_host(INV, "web", keep_synapse={"one.example": old})
    facts = converged(before)
    facts.containers = [c if not (c.project == "synapse-one-example" and c.service == "synapse")
                        else Container(c.project, "synapse", "running", "Up", "b", old) for c in facts.containers]
    keep, notes = keep_synapse(state, facts)
    assert keep == {"one.example": old} and len(notes) == 1 and "inv upgrade --homeserver one.example" in notes[0]
    kept = render_host(INV, "web", keep_synapse=keep)
    assert kept.synapse_image(kept.homeservers[1]) == state.image_refs["synapse"]  # two.example: the inventory's
    assert make(kept, facts, LOCAL(kept), push=True).empty  # nothing recreated: it keeps what runs
    # an upgrade pins the inventory's image: one.example is recreated, two.example is not
    keep, notes = keep_synapse(state, facts, {"one.example": state.image_refs["synapse"]})
    assert notes == []
    plan = make(render_host(INV, "web", keep_synapse=keep), facts, LOCAL(state), push=True)
    assert plan.synapse_up == ["one.example"]


def test_a_run_killed_after_its_write_leaves_every_implied_action_owed():
    # found by the 100-sequence convergence run: an Element version written, the run
    # killed before the install, and the next run saw nothing left to do
    inv = parse(textwrap.dedent("""
        hosts:
          web: {address: 203.0.113.10, images: push}
        homeservers:
          one.example: {host: web, element: {enabled: true, hostname: element.one.example, version: "1.11.1"}}
    """))
    state = render_host(inv, "web")
    facts = converged(state)
    site = "/opt/matrix/reverse_proxy/element/element.one.example"
    facts.element[site] = "releases/1.11.0"
    facts.hashes[f"{site}/wanted-version"] = "the old version's"
    plan = make(state, facts, LOCAL(state), push=True)
    assert plan.element_install == ["element.one.example"]
    write = next(a for a in plan.actions if a.what.startswith("write"))

    class Script:  # what the write step would send (nothing is sent)
        def run(self, script, **kw):
            self.text = script
    sent = Script()
    write.how(steps.Run(sent, log=lambda m: None, compose="docker compose"))
    journal = next(line for line in sent.text.splitlines() if "-pending" in line)
    assert "element:element.one.example" in journal, journal
    # the next run, after the kill: the file is new, the journal says what is owed
    facts = converged(state)
    facts.element[site] = "releases/1.11.0"
    facts.pending = {"element:element.one.example"}
    assert make(state, facts, LOCAL(state), push=True).element_install == ["element.one.example"]


def test_a_certbot_container_left_by_a_run_that_died_is_removed():
    # found by the 100-sequence convergence run: a deploy cut while certbot ran left
    # its `run --rm` container (the client that removes it died with the session)
    state = render_host(INV, "web")
    facts = converged(state)
    assert make(state, facts, LOCAL(state), push=True).empty
    facts.containers.append(Container(PROXY_PROJECT, "certbot", "exited", "Exited (0)", "d", "certbot/certbot"))
    plan = make(state, facts, LOCAL(state), push=True)
    assert plan.certbot_leftovers and any(a.what.startswith("remove certbot containers") for a in plan.actions)
    assert "--leftovers" in state.file("/opt/matrix/reverse_proxy/bin/renew-certificates").content.decode()
    # found in CI: the same container while cron's renewal holds the certificates lock
    # is that renewal at work; the deploy leaves it alone and says nothing changed
    facts.certificates_busy = True
    assert make(state, facts, LOCAL(state), push=True).empty
