"""Rendering: what each host must hold, for the two shapes of deployment."""

import json
import textwrap

import pytest
import yaml

from fabfile.inventory import InventoryError, parse
from fabfile.render import render_host

ONE_HOST_TWO_SERVERS = """
hosts:
  web: {address: 203.0.113.10}
homeservers:
  one.example:
    host: web
    public_hostname: matrix.one.example
    admin_api_allow: [198.51.100.0/24]
    element: {enabled: true, hostname: chat.one.example, version: "1.11.0"}
  two.example:
    host: web
    federation: {port_8448: true}
    max_upload_size: 100M
"""

TWO_HOSTS_ONE_EACH = """
hosts:
  a: {address: 203.0.113.10}
  b: {address: 203.0.113.20, user: deploy}
homeservers:
  one.example: {host: a}
  two.example: {host: b, registration: token}
"""

NO_READ = lambda path: pytest.fail(f"unexpected local read of {path}")  # noqa: E731


def render(text, host):
    return render_host(parse(textwrap.dedent(text)), host, read=NO_READ)


def files(state):
    return {f.path: f for f in state.files}


def compose(state, path):
    return yaml.safe_load(files(state)[path].content)


def test_one_host_two_homeservers_paths():
    state = render(ONE_HOST_TWO_SERVERS, "web")
    paths = set(files(state))
    base = "/opt/matrix"
    for sn in ("one.example", "two.example"):
        assert f"{base}/synapse/{sn}/docker-compose.yml" in paths
        assert f"{base}/synapse/{sn}/conf.d/50-synapse-fabric.yaml" in paths
        assert f"{base}/reverse_proxy/well-known/{sn}/matrix/server" in paths
        assert f"{base}/reverse_proxy/well-known/{sn}/matrix/client" in paths
        assert f"{base}/reverse_proxy/nginx/conf.d/{sn}.conf" in paths
    assert f"{base}/reverse_proxy/nginx/conf.d/matrix.one.example.conf" in paths
    assert f"{base}/reverse_proxy/nginx/conf.d/matrix.two.example.conf" in paths
    assert f"{base}/reverse_proxy/nginx/conf.d/chat.one.example.conf" in paths
    assert f"{base}/reverse_proxy/element/chat.one.example/config.json" in paths
    assert f"{base}/reverse_proxy/docker-compose.yml" in paths
    dirs = {d.path: d for d in state.dirs}
    assert dirs[f"{base}/synapse/one.example/data"].owner == "991:991"
    assert dirs[f"{base}/synapse/one.example/secrets"].mode == 0o700


def test_two_hosts_one_homeserver_each():
    a = render(TWO_HOSTS_ONE_EACH, "a")
    b = render(TWO_HOSTS_ONE_EACH, "b")
    assert any("synapse/one.example/" in p for p in files(a))
    assert not any("two.example" in p for p in files(a))
    assert any("synapse/two.example/" in p for p in files(b))
    assert not any("one.example" in p for p in files(b))
    conf = yaml.safe_load(files(b)["/opt/matrix/synapse/two.example/conf.d/50-synapse-fabric.yaml"].content)
    assert conf["enable_registration"] is True and conf["registration_requires_token"] is True


@pytest.mark.parametrize("text,host", [(ONE_HOST_TWO_SERVERS, "web"), (TWO_HOSTS_ONE_EACH, "a"), (TWO_HOSTS_ONE_EACH, "b")])
def test_no_database_or_synapse_port_is_published(text, host):
    state = render(text, host)
    for path, f in files(state).items():
        if path.endswith("docker-compose.yml"):
            doc = yaml.safe_load(f.content)
            for name, svc in doc["services"].items():
                if name == "nginx":
                    assert set(svc["ports"]) <= {"80:80", "443:443", "8448:8448"}
                else:
                    assert "ports" not in svc, f"{path}: {name} publishes {svc.get('ports')}"
                    assert "network_mode" not in svc
    # Synapse listens only inside its container network.
    for path, f in files(state).items():
        if path.endswith("50-synapse-fabric.yaml"):
            conf = yaml.safe_load(f.content)
            assert [l["port"] for l in conf["listeners"]] == [8008]


def test_postgres_is_internal_and_initialised_with_c_collation():
    state = render(ONE_HOST_TWO_SERVERS, "web")
    doc = compose(state, "/opt/matrix/synapse/one.example/docker-compose.yml")
    pg = doc["services"]["postgres"]
    assert pg["environment"]["POSTGRES_INITDB_ARGS"] == "-E UTF8 --lc-collate=C --lc-ctype=C"
    assert list(pg["networks"]) == ["db"]
    assert doc["networks"]["db"]["internal"] is True
    assert "POSTGRES_PASSWORD" not in pg["environment"]  # only the _FILE form
    syn = doc["services"]["synapse"]
    assert "--config-path=/conf.d/" in syn["command"]
    assert syn["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_each_domain_client_well_known_names_its_own_homeserver():
    for text, host in [(ONE_HOST_TWO_SERVERS, "web"), (TWO_HOSTS_ONE_EACH, "a"), (TWO_HOSTS_ONE_EACH, "b")]:
        state = render(text, host)
        for hs in state.homeservers:
            wk = f"/opt/matrix/reverse_proxy/well-known/{hs.server_name}/matrix"
            client = json.loads(files(state)[f"{wk}/client"].content)
            server = json.loads(files(state)[f"{wk}/server"].content)
            assert client == {"m.homeserver": {"base_url": f"https://{hs.hostname}"}}
            port = 8448 if hs.federation.port_8448 else 443
            assert server == {"m.server": f"{hs.hostname}:{port}"}


def test_vhosts_route_to_their_own_synapse_and_guard_admin_api():
    state = render(ONE_HOST_TWO_SERVERS, "web")
    one = files(state)["/opt/matrix/reverse_proxy/nginx/conf.d/matrix.one.example.conf"].content.decode()
    two = files(state)["/opt/matrix/reverse_proxy/nginx/conf.d/matrix.two.example.conf"].content.decode()
    assert "http://synapse-one-example:8008" in one and "synapse-two-example" not in one
    assert "http://synapse-two-example:8008" in two
    admin_one = one.split("location /_synapse/admin")[1].split("}")[0]
    assert "allow 198.51.100.0/24;" in admin_one and "deny all;" in admin_one
    admin_two = two.split("location /_synapse/admin")[1].split("}")[0]
    assert "allow" not in admin_two and "deny all;" in admin_two  # default: nobody
    assert "client_max_body_size 50M;" in one
    assert "client_max_body_size 100M;" in two
    assert "listen 8448 ssl" in two and "listen 8448" not in one
    proxy = compose(state, "/opt/matrix/reverse_proxy/docker-compose.yml")
    assert "8448:8448" in proxy["services"]["nginx"]["ports"]


def test_element_config_points_at_its_homeserver():
    state = render(ONE_HOST_TWO_SERVERS, "web")
    cfg = json.loads(files(state)["/opt/matrix/reverse_proxy/element/chat.one.example/config.json"].content)
    hs = cfg["default_server_config"]["m.homeserver"]
    assert hs == {"base_url": "https://matrix.one.example", "server_name": "one.example"}


def test_rendering_is_deterministic():
    a = render(ONE_HOST_TWO_SERVERS, "web")
    b = render(ONE_HOST_TWO_SERVERS, "web")
    assert a.files == b.files and a.dirs == b.dirs


def test_no_secret_is_rendered():
    state = render(ONE_HOST_TWO_SERVERS, "web")
    for f in state.files:
        text = f.content.decode()
        if f.path.endswith((".yml", ".yaml")):
            doc = yaml.safe_load(text)
            flat = json.dumps(doc)
            assert '"password"' not in flat and '"POSTGRES_PASSWORD"' not in flat
        assert "registration_shared_secret" not in text
        assert "macaroon_secret_key" not in text


def test_private_federation_is_off_unless_asked():
    state = render(TWO_HOSTS_ONE_EACH, "a")
    conf = yaml.safe_load(files(state)["/opt/matrix/synapse/one.example/conf.d/50-synapse-fabric.yaml"].content)
    assert "ip_range_whitelist" not in conf
    assert "federation_custom_ca_list" not in conf


def test_trusted_ca_is_shipped_and_missing_file_is_named(tmp_path):
    ca = tmp_path / "roots.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    text = f"""
hosts: {{a: {{address: 203.0.113.10}}}}
homeservers:
  one.example:
    host: a
    federation: {{trusted_ca: {ca}, allow_ip_ranges: [10.1.0.0/16]}}
"""
    state = render_host(parse(text), "a")
    f = files(state)
    assert f["/opt/matrix/synapse/one.example/ca/federation-roots.pem"].content == ca.read_bytes()
    conf = yaml.safe_load(f["/opt/matrix/synapse/one.example/conf.d/50-synapse-fabric.yaml"].content)
    assert conf["federation_custom_ca_list"] == ["/ca/federation-roots.pem"]
    assert conf["ip_range_whitelist"] == ["10.1.0.0/16"]
    ca.unlink()
    with pytest.raises(InventoryError, match="homeservers.one.example.federation.trusted_ca: cannot read"):
        render_host(parse(text), "a")


def test_changes_trigger_only_their_own_service():
    state = render(ONE_HOST_TWO_SERVERS, "web")
    f = files(state)
    assert f["/opt/matrix/synapse/one.example/conf.d/50-synapse-fabric.yaml"].trigger == "synapse:one.example:restart"
    assert f["/opt/matrix/synapse/two.example/docker-compose.yml"].trigger == "synapse:two.example:stack"
    assert f["/opt/matrix/reverse_proxy/nginx/conf.d/matrix.one.example.conf"].trigger == "proxy:reload"
    assert f["/opt/matrix/reverse_proxy/well-known/one.example/matrix/client"].trigger == ""


def test_forwarding_to_an_ipv6_host_brackets_the_address():
    import textwrap as tw

    from fabfile.inventory import parse as p
    from fabfile.render import render_host as r

    inv = p(tw.dedent("""
        hosts:
          old: {address: 203.0.113.10}
          new: {address: "2001:db8::1"}
        homeservers:
          one.example: {host: new, migrated_from: old}
    """))
    conf = r(inv, "old").file("/opt/matrix/reverse_proxy/nginx/conf.d/one.example-forward.conf").content.decode()
    assert "proxy_pass https://[2001:db8::1]$request_uri;" in conf
    assert "proxy_pass http://[2001:db8::1];" in conf


def test_admin_ui_is_served_only_to_the_allowlist_and_talks_to_its_homeserver_only():
    text = ONE_HOST_TWO_SERVERS.replace(
        "    admin_api_allow: [198.51.100.0/24]\n",
        "    admin_api_allow: [198.51.100.0/24, 2001:db8::/32]\n"
        "    admin_ui: {enabled: true, hostname: admin.one.example}\n")
    state = render(text, "web")
    f = files(state)
    base = "/opt/matrix/reverse_proxy"
    vhost = f[f"{base}/nginx/conf.d/admin.one.example.conf"].content.decode()
    server = vhost[vhost.index("listen 443"):]
    assert "allow 198.51.100.0/24;" in server and "allow 2001:db8::/32;" in server
    assert server.index("deny all;") > server.index("allow 2001:db8::/32;")
    assert "proxy_pass $admin_ui;" in server and "http://admin-ui-one-example:8080" in server
    config = json.loads(f[f"{base}/admin-ui/admin.one.example.json"].content)
    assert config == {"restrictBaseUrl": "https://matrix.one.example"}
    stack = compose(state, f"{base}/docker-compose.yml")
    ui = stack["services"]["admin-ui-one-example"]
    assert ui["image"] == "ghcr.io/etkecc/ketesa:v1.0.0" and "ports" not in ui
    assert ui["networks"] == ["synapse-fabric"]  # not a homeserver's network: it never reaches Synapse directly
    assert "./admin-ui:/srv/admin-ui:ro" in stack["services"]["nginx"]["volumes"]
    assert "admin.one.example" in f[f"{base}/certs/one.example/names"].content.decode().split()
    assert "ghcr.io/etkecc/ketesa:v1.0.0" in state.images
    assert state.image_triggers("ghcr.io/etkecc/ketesa:v1.0.0") == {"proxy:stack"}
    # without it: no image, no service, no vhost
    plain = render(ONE_HOST_TWO_SERVERS, "web")
    assert "admin_ui" not in plain.image_refs and not any("ketesa" in i for i in plain.images)
    assert not any("admin-ui" in s for s in compose(plain, f"{base}/docker-compose.yml")["services"])


def test_scheduled_backups_only_when_asked_with_the_retention_and_the_time():
    assert not any("backup" in p for p in files(render(ONE_HOST_TWO_SERVERS, "web")))
    state = render(ONE_HOST_TWO_SERVERS + 'backup: {schedule: "04:05", keep: {daily: 3, weekly: 0}}\n', "web")
    f = files(state)
    program = f["/opt/matrix/reverse_proxy/bin/backup"]
    assert program.mode == 0o700
    text = program.content.decode()
    for sn in ("one.example", "two.example"):
        assert f"server_name={sn}\n" in text and f"tag=synapse-fabric:{sn}\n" in text
    assert "keep_daily=3\n" in text and "keep_weekly=0\n" in text and "keep_monthly=12\n" in text
    assert "OnCalendar=*-*-* 04:05:00" in f["/etc/systemd/system/synapse-fabric-backup.timer"].content.decode()
    assert "\n5 4 * * * root /opt/matrix/reverse_proxy/bin/backup" in f["/etc/cron.d/synapse-fabric-backup"].content.decode()
    with pytest.raises(InventoryError, match="in quotes"):
        parse(textwrap.dedent(ONE_HOST_TWO_SERVERS) + "backup: {schedule: 3:30}\n")
    with pytest.raises(InventoryError, match="keep at least one"):
        parse(textwrap.dedent(ONE_HOST_TWO_SERVERS) + "backup: {keep: {daily: 0, weekly: 0, monthly: 0}}\n")
