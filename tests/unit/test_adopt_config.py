"""What `inv adopt` makes of a hand-made homeserver (fabfile/adopt_config.py): which
container it is, where its files are, which settings stay, go or move to hosts.yaml."""

from __future__ import annotations

import pytest
import yaml

from fabfile import adopt_config as ac

GENERATED = """\
# Configuration file for Synapse.
server_name: "old.example"
pid_file: /data/homeserver.pid
listeners:
  - port: 8008
    tls: false
    type: http
    x_forwarded: true
    resources:
      - names: [client, federation]
database:
  name: psycopg2
  allow_unsafe_locale: true
  args:
    user: synapse_user
    password: the-old-db-password   # the hand-made stack's
    database: synapse
    host: db
log_config: "/data/old.example.log.config"
media_store_path: /data/media_store
registration_shared_secret: "shared"
report_stats: false
macaroon_secret_key: "macaroon"
form_secret: "form"
# kept with the key before it
signing_key_path: "/data/old.example.signing.key"
trusted_key_servers:
  - server_name: "matrix.org"
# the operator's own additions
max_upload_size: 100M
enable_registration: true
registration_requires_token: true
app_service_config_files: [/data/bridges/telegram.yaml]
password_config:
  pepper: "pepper"
"""


def _inspect(name, image, mounts, project="", cmd=None, env=None, nets=None, service="", restart="unless-stopped"):
    labels = {"com.docker.compose.project": project, "com.docker.compose.service": service,
              "com.docker.compose.project.working_dir": f"/srv/{project}" if project else "",
              "com.docker.compose.project.config_files": f"/srv/{project}/docker-compose.yml" if project else ""}
    return {"Name": f"/{name}", "Config": {"Image": image, "Labels": labels if project else {}, "Cmd": cmd or [],
                                            "Env": env or [], "WorkingDir": "/"},
            "HostConfig": {"RestartPolicy": {"Name": restart}},
            "Mounts": [{"Source": s, "Destination": d} for s, d in mounts],
            "NetworkSettings": {"Networks": {n: {"Aliases": a} for n, a in (nets or {}).items()}}}


CONTAINERS = [
    _inspect("matrix_synapse_1", "matrixdotorg/synapse:v1.98.0", [("/srv/matrix/files", "/data")], "matrix",
             nets={"matrix_default": ["synapse"]}, service="synapse"),
    _inspect("matrix_db_1", "postgres:15", [("/srv/matrix/schemas", "/var/lib/postgresql/data")], "matrix",
             nets={"matrix_default": ["db"]}, service="db"),
    _inspect("synapse-one-test-synapse-1", "matrixdotorg/synapse:v1.163.2", [("/opt/matrix/synapse/one.test/data",
             "/data")], "synapse-one-test"),
    _inspect("other", "ghcr.io/element-hq/synapse:latest", [("/home/u/syn", "/config")],
             cmd=["run", "--config-path", "/config/hs.yaml"], restart="always"),
    _inspect("element", "vectorim/element-web", [("/srv/element", "/app")]),
]


def test_hand_made_synapse_containers_are_found_and_managed_ones_are_not():
    found = ac.synapse_containers(CONTAINERS, {"synapse-one-test"})
    assert [c.container for c in found] == ["matrix_synapse_1", "other"]
    compose = ac.synapse_containers(CONTAINERS, {"synapse-one-test"}, compose_file="/srv/matrix/docker-compose.yml")
    assert [c.container for c in compose] == ["matrix_synapse_1"]
    data = ac.synapse_containers(CONTAINERS, set(), data="/home/u/syn/")
    assert [c.container for c in data] == ["other"]
    other = data[0]
    assert other.config_in_container == "/config/hs.yaml" and other.restart == "always"
    assert other.host_path("/config/media") == "/home/u/syn/media"
    assert other.host_path("/elsewhere/key") is None
    assert other.data_mount.source == "/home/u/syn"


def test_the_database_container_is_the_one_answering_to_the_configured_host():
    syn = ac.synapse_containers(CONTAINERS, set(), compose_file="/srv/matrix/docker-compose.yml")[0]
    assert ac.database_container(CONTAINERS, syn, "db") == "matrix_db_1"
    assert ac.database_container(CONTAINERS, syn, "localhost") is None


def test_settings_are_kept_replaced_or_carried_into_hosts_yaml():
    config = yaml.safe_load(GENERATED)
    s = ac.classify(config, "old.example")
    assert {"macaroon_secret_key", "form_secret", "registration_shared_secret", "app_service_config_files",
            "password_config", "server_name"} <= set(s.kept)
    assert {"listeners", "database", "log_config", "media_store_path", "signing_key_path", "pid_file",
            "report_stats"} == set(s.replaced)
    assert s.carried == {"max_upload_size": "100M", "registration": "token",
                         "federation": {"trusted_key_servers": [{"server_name": "matrix.org"}]}}
    assert any("allow_unsafe_locale" in n for n in s.notes)
    entry = ac.inventory_entry("vps1", s)
    assert entry["host"] == "vps1" and entry["registration"] == "token"


def test_what_the_schema_cannot_say_goes_to_synapse_settings():
    config = {"server_name": "a.example", "enable_registration": True, "max_upload_size": 1234567,
              "federation_domain_whitelist": [], "public_baseurl": "https://chat.a.example/"}
    s = ac.classify(config, "a.example")
    assert s.carried["synapse_settings"] == {"enable_registration": True, "max_upload_size": 1234567}
    assert s.carried["federation"] == {"enabled": False}
    assert s.carried["public_hostname"] == "chat.a.example"
    assert ac.classify({"server_name": "a.example", "max_upload_size": 52428800}, "a.example").carried == {
        "max_upload_size": "50M"}


def test_conditional_settings_stay_unless_this_deployment_manages_them():
    config = {"server_name": "a.example", "federation_custom_ca_list": ["/data/ca.pem"], "turn_uris": ["turn:x"],
              "turn_shared_secret": "s"}
    assert set(ac.classify(config, "a.example").kept) == set(config)
    s = ac.classify(config, "a.example", ac.also_replaced(trusted_ca=True, turn=True))
    assert s.kept == ["server_name"]


def test_another_server_name_is_refused():
    with pytest.raises(ac.AdoptError, match="not 'b.example'"):
        ac.classify({"server_name": "a.example"}, "b.example")


def test_the_adopted_config_keeps_comments_and_moves_paths_under_data():
    config = yaml.safe_load(GENERATED)
    s = ac.classify(config, "old.example")
    text, notes = ac.adopted_config(GENERATED.replace("/data", "/config"), "old.example", s, "/config", "# head\n")
    assert text.startswith("# head\n# Configuration file for Synapse.") and "# kept with the key before it" in text
    new = yaml.safe_load(text)
    assert "database" not in new and "listeners" not in new and "max_upload_size" not in new
    assert "the-old-db-password" not in text
    assert new["app_service_config_files"] == ["/data/bridges/telegram.yaml"]
    assert new["signing_key_path"] == "/data/old.example.signing.key"
    assert new["media_store_path"] == "/data/media_store" and new["log_config"] == "/data/old.example.log.config"
    assert new["macaroon_secret_key"] == "macaroon" and new["password_config"] == {"pepper": "pepper"}
    assert notes == []
    text, notes = ac.adopted_config("server_name: a.example\n", "a.example", ac.classify(
        {"server_name": "a.example"}, "a.example"), "/data", "")
    assert yaml.safe_load(text)["registration_shared_secret"] and "registration_shared_secret added" in notes[0]
