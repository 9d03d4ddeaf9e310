"""The stand-in images keep the contracts of the real images that synapse-fabric
relies on (tests/sandbox/README.md lists each point and its upstream source).

These run the stand-ins on this machine's engine, without the sandbox hosts.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from fabfile.schema import DEFAULT_IMAGES, postgres_major
from tests.sandbox import images


def _docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:4])}... failed: {res.stderr[-2000:]}")
    return res


def _config(ref: str) -> dict:
    return json.loads(_docker("image", "inspect", ref).stdout)[0]["Config"]


@pytest.fixture(scope="module")
def tags(sandbox_prepared) -> dict[str, str]:
    return {name: images.tag_of(name) for name in ("synapse", "postgres", "postgres15", "nginx", "certbot", "admin-ui",
                                                  "coturn", "valkey")}


def test_stand_ins_carry_the_default_references(tags):
    # what the product deploys by default is what the sandbox tests
    assert {tags["synapse"], tags["postgres"], tags["nginx"], tags["certbot"], tags["admin-ui"], tags["coturn"],
            tags["valkey"]} \
        == set(DEFAULT_IMAGES.values())


# -- matrixdotorg/synapse (element-hq/synapse docker/Dockerfile, docker/start.py)

def test_synapse_image_metadata(tags):
    cfg = _config(tags["synapse"])
    assert cfg["Entrypoint"] == ["/start.py"]
    assert not cfg.get("Volumes")  # upstream removed VOLUME /data in 1.54
    assert set(cfg["ExposedPorts"]) == {"8008/tcp", "8448/tcp", "19090/tcp"}
    assert "http://localhost:8008/health" in " ".join(cfg["Healthcheck"]["Test"])
    assert cfg.get("User", "") == ""  # starts as root, drops to 991 itself


def test_synapse_generate_ownership_is_upstreams(tags, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _docker("run", "--rm", "-e", "SYNAPSE_SERVER_NAME=contract.test", "-e", "SYNAPSE_REPORT_STATS=no",
            "-v", f"{data}:/data", tags["synapse"], "generate")
    owner = lambda p: (os.stat(p).st_uid, os.stat(p).st_gid)  # noqa: E731
    assert owner(data) == (991, 991)  # the data directory itself, not recursively
    assert owner(data / "homeserver.yaml") == (991, 991)
    key = data / "contract.test.signing.key"
    assert owner(key) == (991, 991) and oct(os.stat(key).st_mode & 0o777) == "0o640"
    # start.py writes the log config as root before it chowns: it stays root's
    assert owner(data / "contract.test.log.config") == (0, 0)
    # an existing config is kept: generate again changes nothing
    before = (data / "homeserver.yaml").read_bytes()
    _docker("run", "--rm", "-e", "SYNAPSE_SERVER_NAME=contract.test", "-e", "SYNAPSE_REPORT_STATS=no",
            "-v", f"{data}:/data", tags["synapse"], "generate")
    assert (data / "homeserver.yaml").read_bytes() == before


def test_synapse_tools_on_path(tags):
    out = _docker("run", "--rm", "--entrypoint", "sh", tags["synapse"], "-c",
                  "for t in register_new_matrix_user hash_password curl gosu; do command -v $t; done; "
                  "/usr/local/bin/python -c 'import synapse; print(synapse.__version__)'").stdout.split()
    assert len(out) == 5 and out[-1] == tags["synapse"].rsplit(":v", 1)[1]


# -- postgres (docker-library/postgres 17/trixie/Dockerfile, docker-entrypoint.sh)

@pytest.mark.parametrize("name", ["postgres", "postgres15"])
def test_postgres_image_metadata(tags, name):
    cfg = _config(tags[name])
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["PGDATA"] == "/var/lib/postgresql/data"
    assert int(env["PG_MAJOR"]) == postgres_major(tags[name])
    assert cfg["Entrypoint"] == ["docker-entrypoint.sh"] and cfg["Cmd"] == ["postgres"]
    assert cfg["StopSignal"] == "SIGINT"
    assert "5432/tcp" in cfg["ExposedPorts"]


def test_postgres_initialises_from_password_file(tags, tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o644)
    name = "sfab-contract-postgres"
    _docker("rm", "-f", name, check=False)
    _docker("run", "-d", "--name", name, "-e", "POSTGRES_USER=synapse", "-e", "POSTGRES_DB=synapse",
            "-e", "POSTGRES_PASSWORD_FILE=/run/secrets/pw", "-e", "POSTGRES_INITDB_ARGS=-E UTF8 --lc-collate=C --lc-ctype=C",
            "-v", f"{secret}:/run/secrets/pw:ro", tags["postgres"])
    script = ("set -e; id -u postgres; psql -U synapse -d synapse -tAc "
              "\"select datcollate, pg_encoding_to_char(encoding) from pg_database where datname='synapse'\"; "
              "tail -n 1 \"$PGDATA/pg_hba.conf\"")
    try:
        # pg_isready also answers the entrypoint's temporary init server: wait for the real one
        for _ in range(120):
            if "ready for start up" in _docker("logs", name, check=False).stdout:
                res = _docker("exec", name, "sh", "-c", script, check=False)
                if res.returncode == 0:
                    break
            subprocess.run(["sleep", "0.5"])
        out = res.stdout.split("\n")
        assert out[0] == "999"
        assert out[1] == "C|UTF8"
        assert out[2].split() == ["host", "all", "all", "all", "scram-sha-256"]
    finally:
        _docker("rm", "-f", name, check=False)


# -- nginx (nginx/docker-nginx stable/debian/Dockerfile, pkg-oss nginx.conf)

def test_nginx_image_contract(tags):
    cfg = _config(tags["nginx"])
    assert cfg["StopSignal"] == "SIGQUIT"
    assert cfg["Cmd"] == ["nginx", "-g", "daemon off;"]
    script = ("id -u nginx; grep -E '^ *(user|pid|include /etc/nginx/conf.d)' /etc/nginx/nginx.conf; "
              "printf 'server { listen 8443 ssl; http2 on; server_name x; ssl_reject_handshake on; }\\n' "
              "> /etc/nginx/conf.d/h2.conf; nginx -t 2>&1")
    out = _docker("run", "--rm", "--entrypoint", "sh", tags["nginx"], "-c", script).stdout
    lines = out.splitlines()
    assert lines[0] == "101"
    assert "user nginx;" in out and "pid /run/nginx.pid;" in out and "include /etc/nginx/conf.d/*.conf;" in out
    assert "test is successful" in out and "warn" not in out  # `http2 on;` is known, nothing deprecated


# -- certbot/certbot (certbot/certbot tools/docker/Dockerfile)

def test_certbot_image_contract(tags):
    cfg = _config(tags["certbot"])
    assert cfg["Entrypoint"] == ["certbot"]
    assert cfg["WorkingDir"] == "/opt/certbot"
    assert set(cfg["Volumes"]) == {"/etc/letsencrypt", "/var/lib/letsencrypt"}
    version = _docker("run", "--rm", tags["certbot"], "--version").stdout.strip()
    assert version == "certbot " + tags["certbot"].rsplit(":v", 1)[1]
    helptext = _docker("run", "--rm", tags["certbot"], "--help", "webroot").stdout
    assert "--webroot-path" in helptext


# -- ghcr.io/etkecc/ketesa (etkecc/ketesa docker/Dockerfile: static-web-server)

def test_admin_ui_image_contract(tags):
    cfg = _config(tags["admin-ui"])
    assert "8080/tcp" in cfg["ExposedPorts"] and cfg.get("Healthcheck")
    # a single-page app on 8080: /health answers, any path is the app, config.json is there
    script = ("nginx; for p in /health /users/x /config.json; do exec 3<>/dev/tcp/127.0.0.1/8080; "
              "printf 'GET %s HTTP/1.0\\r\\n\\r\\n' \"$p\" >&3; head -1 <&3; done")
    out = _docker("run", "--rm", "--entrypoint", "bash", tags["admin-ui"], "-c", script).stdout
    assert [line.strip() for line in out.splitlines() if line.startswith("HTTP/")] == ["HTTP/1.1 200 OK"] * 3, out


def test_coturn_image_contract(tags):
    cfg = _config(tags["coturn"])
    assert cfg["User"] == "nobody:nogroup" and cfg["Entrypoint"] == ["docker-entrypoint.sh"]
    assert {"3478/tcp", "3478/udp", "5349/tcp", "5349/udp"} <= set(cfg["ExposedPorts"])
    # what the compose file relies on: a POSIX shell and turnserver; the test client beside it
    out = _docker("run", "--rm", "--entrypoint", "/bin/sh", tags["coturn"], "-c",
                  "command -v turnserver; command -v turnutils_uclient").stdout
    assert "/turnserver" in out and "/turnutils_uclient" in out, out
    # options given to the entrypoint go to turnserver
    out = _docker("run", "--rm", tags["coturn"], "--version", check=False)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
