"""Inventory loading: defaults, and one clear message per kind of bad input."""

import textwrap
from pathlib import Path

import pytest

from fabfile.inventory import InventoryError, load, parse

REPO = Path(__file__).resolve().parents[2]

SMALL = """
hosts:
  web:
    address: 203.0.113.10
homeservers:
  example.org:
    host: web
"""


def bad(text: str) -> str:
    with pytest.raises(InventoryError) as err:
        parse(textwrap.dedent(text), Path("inv/hosts.yaml"))
    return str(err.value)


def test_small_inventory_gets_safe_defaults():
    inv = parse(SMALL)
    host = inv.hosts["web"]
    assert (host.user, host.port, host.images, host.use_sudo) == ("root", 22, "pull", False)
    hs = inv.homeservers["example.org"]
    assert hs.hostname == "matrix.example.org"
    assert hs.registration == "disabled"
    assert hs.admin_api_allow == []
    assert hs.federation.allow_ip_ranges == []
    assert inv.acme.directory == "staging"
    assert "staging" in inv.acme.directory_url
    assert inv.ssh.accept_new_hosts is False
    assert inv.image("synapse").startswith("matrixdotorg/synapse:v")


def test_sudo_user_defaults_to_sudo():
    inv = parse("hosts: {h: {address: h.example.org, user: deploy}}")
    assert inv.hosts["h"].use_sudo is True


def test_repo_example_inventory_loads():
    inv = load(REPO / "hosts.yaml")
    assert set(inv.hosts) == {"vps1", "vps2", "vps3"}
    assert {hs.host for hs in inv.homeservers.values()} == {"vps1", "vps2"}
    assert inv.hosts["vps2"].use_sudo and not inv.hosts["vps1"].use_sudo
    # paths are relative to the inventory file
    assert inv.hosts["vps1"].key == REPO / "tests/sandbox/state/id_ed25519"


def test_unknown_key_names_file_line_path_and_suggests():
    msg = bad(
        """\
        hosts:
          web:
            adress: 203.0.113.10
        """
    )
    assert msg.startswith("inv/hosts.yaml:3: hosts.web.adress: unknown key")
    assert "did you mean 'address'?" in msg


def test_unknown_nested_key_suggests():
    msg = bad(
        """\
        hosts: {web: {address: 203.0.113.10}}
        homeservers:
          example.org:
            host: web
            federation:
              enabeld: false
        """
    )
    assert "inv/hosts.yaml:6: homeservers.example.org.federation.enabeld" in msg
    assert "did you mean 'enabled'?" in msg


def test_unknown_top_level_key():
    msg = bad("hosts: {}\nhomeserver: {}\n")
    assert "inv/hosts.yaml:2: homeserver: unknown key; did you mean 'homeservers'?" in msg


def test_invalid_domain():
    msg = bad(
        """\
        hosts: {web: {address: 203.0.113.10}}
        homeservers:
          not_a_domain:
            host: web
        """
    )
    assert "inv/hosts.yaml:3: homeservers.not_a_domain:" in msg
    assert "not a valid domain name" in msg


def test_invalid_public_hostname():
    msg = bad(
        """\
        hosts: {web: {address: 203.0.113.10}}
        homeservers:
          example.org:
            host: web
            public_hostname: "matrix..example.org"
        """
    )
    assert "inv/hosts.yaml:5: homeservers.example.org.public_hostname:" in msg


def test_homeserver_on_undefined_host():
    msg = bad(
        """\
        hosts: {web: {address: 203.0.113.10}}
        homeservers:
          example.org:
            host: db
        """
    )
    assert "inv/hosts.yaml:4: homeservers.example.org.host: 'db' is not a host" in msg
    assert "known hosts: web" in msg


def test_two_homeservers_claiming_one_hostname():
    msg = bad(
        """\
        hosts: {web: {address: 203.0.113.10}}
        homeservers:
          one.example:
            host: web
            public_hostname: matrix.example.org
          two.example:
            host: web
            public_hostname: matrix.example.org
        """
    )
    assert "inv/hosts.yaml:8: homeservers.two.example.public_hostname" in msg
    assert "already claimed by homeserver 'one.example'" in msg


def test_element_hostname_clash_with_other_server_name():
    msg = bad(
        """\
        hosts: {web: {address: 203.0.113.10}}
        homeservers:
          one.example:
            host: web
          two.example:
            host: web
            element: {enabled: true, hostname: one.example}
        """
    )
    assert "already claimed by homeserver 'one.example'" in msg


def test_yaml_syntax_error_has_its_line():
    msg = bad(
        """\
        hosts:
          web:
            address: [1.2.3.4
        homeservers: {}
        """
    )
    assert msg.startswith("inv/hosts.yaml:")
    assert "YAML syntax error" in msg
    line = int(msg.split(":")[1])
    assert line in (3, 4, 5)


def test_bad_values():
    assert "port" in bad("hosts: {web: {address: 1.2.3.4, port: 70000}}")
    assert "images" in bad("hosts: {web: {address: 1.2.3.4, images: carrier-pigeon}}")
    assert "'staging', 'production'" in bad("hosts: {}\nacme: {directory: http://insecure}")
    assert "admin_api_allow" in bad(
        "hosts: {web: {address: 1.2.3.4}}\nhomeservers: {a.org: {host: web, admin_api_allow: [nonsense]}}"
    )
    assert "element.hostname is required" in bad(
        "hosts: {web: {address: 1.2.3.4}}\nhomeservers: {a.org: {host: web, element: {enabled: true}}}"
    )
    assert "Unix user name" in bad("hosts: {web: {address: 1.2.3.4, user: 'ro ot'}}")


def test_not_a_mapping_and_missing_file(tmp_path):
    assert "must be a mapping" in bad("- just\n- a list\n")
    assert bad("hosts:\n  - web\n") == "inv/hosts.yaml:1: hosts: must be a mapping of names to hosts"
    with pytest.raises(InventoryError, match="inventory file not found"):
        load(tmp_path / "nope.yaml")


def test_lookup_errors_list_what_exists():
    inv = parse(SMALL)
    with pytest.raises(InventoryError, match=r"known hosts: web \(203.0.113.10\)"):
        inv.host_by_name_or_address("other")
    assert inv.host_by_name_or_address("203.0.113.10").name == "web"
    with pytest.raises(InventoryError, match="known: example.org"):
        inv.homeserver("nope.org")


def test_element_cannot_share_its_homeservers_name():
    msg = bad(
        """\
        hosts: {web: {address: 203.0.113.10}}
        homeservers:
          one.example:
            host: web
            element: {enabled: true, hostname: matrix.one.example}
        """
    )
    assert "homeservers.one.example.element.hostname" in msg and "needs its own" in msg


def test_image_references():
    ok = parse(textwrap.dedent("""
        images:
          nginx: nginx:1.30@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
          postgres: registry.example.org:5000/lib/postgres:16.4-bookworm
        hosts: {web: {address: 1.2.3.4}}
    """))
    assert ok.image("nginx").startswith("nginx:1.30@sha256:")
    assert "not an image reference" in bad("images: {nginx: 'nginx'}\nhosts: {web: {address: 1.2.3.4}}")
    assert "major version" in bad("images: {postgres: 'postgres:latest'}\nhosts: {web: {address: 1.2.3.4}}")
    msg = bad("images: {postgres: 'postgres:18-trixie'}\nhosts: {web: {address: 1.2.3.4}}")
    assert "PGDATA moved in 18" in msg and "17 or older" in msg
    msg = bad("hosts: {web: {address: 1.2.3.4}}\nhomeservers: {a.example: {host: web, postgres: {image: 'postgres:18'}}}")
    assert "homeservers.a.example.postgres.image" in msg


def test_hardening_of_values():
    host = "hosts: {web: {address: 1.2.3.4}}\n"
    # compose project names must not collide on one host
    msg = bad(host + "homeservers: {a-b.example.org: {host: web}, a.b-example.org: {host: web}}")
    assert "synapse-a-b-example-org" in msg
    # CIDRs are never widened; /0 never opens the admin API
    msg = bad(host + "homeservers: {a.example: {host: web, admin_api_allow: ['203.0.113.7/0']}}")
    assert "host bits set" in msg and "0.0.0.0/0" in msg
    assert "open the admin API to everyone" in bad(host + "homeservers: {a.example: {host: web, admin_api_allow: ['0.0.0.0/0']}}")
    assert "host bits set" in bad(host + "homeservers: {a.example: {host: web, federation: {allow_ip_ranges: ['10.1.2.3/8']}}}")
    # base_dir: no system directories, no empty path
    for value in ("//", "/tmp", "/tmp/matrix", "/etc", "/opt", "/", "/opt/./x"):
        assert "base_dir" in bad(f"hosts: {{web: {{address: 1.2.3.4, base_dir: '{value}'}}}}"), value
    ok = parse("hosts: {web: {address: 1.2.3.4, base_dir: '/srv//matrix/'}}")
    assert ok.hosts["web"].base_dir == "/srv/matrix"


def test_admin_ui_needs_its_own_name_and_an_allowlist():
    msg = bad(
        """\
        hosts: {web: {address: 203.0.113.10}}
        homeservers:
          one.example:
            host: web
            admin_ui: {enabled: true, hostname: admin.one.example}
        """
    )
    assert "homeservers.one.example" in msg and "admin_ui.enabled needs admin_api_allow" in msg
    msg = bad(
        """\
        hosts: {web: {address: 203.0.113.10}}
        homeservers:
          one.example:
            host: web
            admin_api_allow: [198.51.100.0/24]
            element: {enabled: true, hostname: chat.one.example}
            admin_ui: {enabled: true, hostname: chat.one.example}
        """
    )
    assert "homeservers.one.example.admin_ui.hostname" in msg and "already Element's" in msg
    msg = bad(
        """\
        hosts: {web: {address: 203.0.113.10}}
        homeservers:
          one.example:
            host: web
            admin_api_allow: [198.51.100.0/24]
            admin_ui: {enabled: true}
        """
    )
    assert "admin_ui.hostname is required" in msg


@pytest.mark.parametrize("repo,why", [
    ("rest:https://backup:s3cret@store.example:8000/", "must not carry a password"),
    ("s3:https://KEY:SECRET@s3.example/bucket", "must not carry a password"),
    ("/var", "system directory"),
    ("/srv/backups with space", "not a restic repository"),
])
def test_backup_repository_refuses_secrets_and_system_dirs(repo, why):
    msg = bad(f"""\
        hosts: {{web: {{address: 203.0.113.10}}}}
        backup: {{repository: "{repo}"}}
        """)
    assert "backup.repository" in msg and why in msg


def test_backup_defaults_and_remote_repositories():
    inv = parse(textwrap.dedent("""
        hosts: {web: {address: 203.0.113.10}}
        backup: {repository: "sftp:backup@store.example:/srv/restic/web", keep: {daily: 3}}
        """))
    assert inv.backup.repository.startswith("sftp:") and inv.backup.keep.daily == 3 and inv.backup.keep.monthly == 12
    assert parse("hosts: {web: {address: 203.0.113.10}}").backup.repository == "/var/backups/synapse-fabric/restic"


def test_type_errors_name_the_key_its_line_and_what_it_may_be():
    assert bad("hosts:\n  web:\n    address: 1.2.3.4\n    images: bogus\n") == (
        "inv/hosts.yaml:4: hosts.web.images: 'bogus' is not one of: pull, push")
    assert bad("hosts:\n  web:\n    address: 1.2.3.4\n    port: 70000\n") == (
        "inv/hosts.yaml:4: hosts.web.port: Expected int <= 65535")
    assert bad("hosts: {web: {address: 1.2.3.4}}\nacme: 5\n") == "inv/hosts.yaml:2: acme: Expected a mapping, got int"
    # an unknown key inside an optional model gets its hint too
    assert bad("hosts: {web: {address: 1.2.3.4}}\nhomeservers:\n  a.org:\n    host: web\n"
               "    postgres: {external: {host: db.a.org, ca: ca.pem, prt: 5}}\n") == (
        "inv/hosts.yaml:5: homeservers.a.org.postgres.external.prt: unknown key; did you mean 'port'? "
        "(known keys here: host, port, ca)")
