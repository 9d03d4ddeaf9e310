"""The local sandbox: a DNS + ACME infra container and three stand-in VPSs.

    python -m tests.sandbox.sandbox up|down|status

`up` builds (or reuses) the `host` and `infra` images, writes the state files under
tests/sandbox/state/ (operator key, host keys, known_hosts, the CA behind pebble's
HTTPS, resolv.conf), starts compose project `sfab` from tests/sandbox/compose.yml,
waits until every VPS accepts the operator key over SSH, sets the sandbox DNS names in
challtestsrv and saves pebble's issuing root(s). Running it again is harmless.
`down` removes the project's containers, network and volumes; images (the build cache)
and the state files (so host keys stay stable) are kept.

The runner talks to the sandbox addresses directly (Docker routes 172.29.231.0/24 to
its bridge); sandbox names (*.test) resolve only inside the sandbox, through the infra
container's dnsmasq.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_CACHE = HERE.parent.parent / ".cache"
COMPOSE_FILE = HERE / "compose.yml"
PROJECT = "sfab"
NETWORK = "sfab-sandbox"
PRIVATE_NETWORK = "sfab-private"  # the VPSs' private network (10.231.0.0/24, hosts.yaml private_address)
SUBNET = "172.29.231.0/24"

INFRA_CONTAINER = "sfab-infra"
INFRA_IP = "172.29.231.2"
ACME_NAME = "acme.test"
ACME_DIRECTORY = f"https://{ACME_NAME}:14000/dir"
PEBBLE_MGMT_PORT = 15000
DNS_API_PORT = 8055
DNS_API = f"http://{INFRA_IP}:{DNS_API_PORT}"

IMAGE_ENV = {"host": "SFAB_HOST_IMAGE", "host13": "SFAB_HOST13_IMAGE", "infra": "SFAB_INFRA_IMAGE",
             "nginx": "SFAB_NGINX_IMAGE", "store": "SFAB_STORE_IMAGE", "postgres": "SFAB_POSTGRES_IMAGE"}

# The registry in sfab-infra: this machine pushes to it on 127.0.0.1, hosts with
# `images: pull` use it as their Docker registry mirror (a host-level setting,
# as a cloud provider's mirror would be).
REGISTRY_PUSH = "127.0.0.1:5000"
REGISTRY_MIRROR = f"{INFRA_IP}:5000"
# The stand-ins the registry serves, under their Docker Hub names.
REGISTRY_IMAGES = ("synapse", "postgres", "postgres15", "nginx", "certbot", "coturn", "valkey")

SSH_TIMEOUT = float(os.environ.get("SFAB_SANDBOX_SSH_TIMEOUT", "90"))
INFRA_TIMEOUT = float(os.environ.get("SFAB_SANDBOX_INFRA_TIMEOUT", "60"))


@dataclass(frozen=True)
class Host:
    name: str        # short name used by tests and the inventory: vps1
    container: str   # docker container name: sfab-vps1
    ip: str
    user: str        # the account the operator key logs into
    debian: int      # Debian release
    systemd: bool    # systemd is PID 1


HOSTS: dict[str, Host] = {h.name: h for h in [
    Host("vps1", "sfab-vps1", "172.29.231.11", "root", 13, True),
    Host("vps2", "sfab-vps2", "172.29.231.12", "deploy", 12, False),
    Host("vps3", "sfab-vps3", "172.29.231.13", "root", 13, True),
]}

# Set in challtestsrv at every `up` (tests may move names with set_dns()).
RELEASES_NAME = "releases.test"
RELEASES_IP = "172.29.231.3"
# restic's REST server: a backup repository off the hosts (rest:http://store.test:8000/<name>)
STORE_NAME = "store.test"
STORE_IP = "172.29.231.4"
# an external PostgreSQL (postgres.external): TLS with a certificate from the sandbox
# CA (state/pebble-ca.pem) for db.test; role and database synapse, the password in
# state/extdb-password
EXTDB_NAME = "db.test"
EXTDB_IP = "172.29.231.5"

DNS_RECORDS: dict[str, str] = {
    ACME_NAME: INFRA_IP,
    "one.test": HOSTS["vps1"].ip,
    "matrix.one.test": HOSTS["vps1"].ip,
    "element.one.test": HOSTS["vps1"].ip,
    "turn.one.test": HOSTS["vps1"].ip,  # vps1's coturn (hosts.yaml hosts.vps1.turn)
    "three.test": HOSTS["vps1"].ip,
    "matrix.three.test": HOSTS["vps1"].ip,
    "two.test": HOSTS["vps2"].ip,
    "matrix.two.test": HOSTS["vps2"].ip,
    "admin.two.test": HOSTS["vps2"].ip,  # two.test's admin UI, when a test turns it on
    RELEASES_NAME: RELEASES_IP,
    STORE_NAME: STORE_IP,
    EXTDB_NAME: EXTDB_IP,
}


class SandboxError(RuntimeError):
    """An expected failure with a message a person can act on."""


@dataclass
class SandboxInfo:
    state_dir: Path
    key: Path                 # operator private key (OpenSSH format, no passphrase)
    known_hosts: Path         # every VPS host key, by IP and by container name
    pebble_ca: Path           # CA of pebble's HTTPS certificate (for ACME clients)
    acme_roots: Path          # pebble's issuing root(s) for this pebble run
    hosts: dict[str, Host] = field(default_factory=lambda: dict(HOSTS))
    acme_directory: str = ACME_DIRECTORY
    dns_api: str = DNS_API
    dns_server: str = INFRA_IP
    images: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


# ---------------------------------------------------------------- paths and helpers

def state_dir() -> Path:
    """tests/sandbox/state/ (git-ignored); compose.yml mounts files from it."""
    return HERE / "state"


def _paths() -> dict[str, Path]:
    s = state_dir()
    return {
        "key": s / "id_ed25519",
        "pub": s / "id_ed25519.pub",
        "known_hosts": s / "known_hosts",
        "resolv": s / "resolv.conf",
        "ca": s / "pebble-ca.pem",
        "ca_key": s / "pebble-ca-key.pem",
        "cert": s / "pebble-cert.pem",
        "cert_key": s / "pebble-key.pem",
        "roots": s / "acme-roots.pem",
        "mirror": s / "registry-mirror.json",
        "digests": s / "registry-digests.json",
    }


def info() -> SandboxInfo:
    """Where everything is (does not start anything)."""
    p = _paths()
    return SandboxInfo(state_dir=state_dir(), key=p["key"], known_hosts=p["known_hosts"],
                       pebble_ca=p["ca"], acme_roots=p["roots"])


def host_addr(name: str) -> str:
    """IP of a sandbox host: 'vps1', 'sfab-vps1', 'infra' or 'sfab-infra'."""
    short = name.removeprefix("sfab-")
    if short == "infra":
        return INFRA_IP
    if short in HOSTS:
        return HOSTS[short].ip
    raise KeyError(f"unknown sandbox host {name!r}; known: infra, {', '.join(HOSTS)}")


def _run(argv: list[str], *, env=None, check=True, input=None) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, env=env, input=input, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    if check and res.returncode != 0:
        tail = "\n".join(res.stdout.splitlines()[-30:])
        raise SandboxError(f"`{' '.join(argv[:5])}...` failed ({res.returncode}):\n{tail}")
    return res


def _write_if_changed(path: Path, data: str | bytes, mode: int = 0o644) -> bool:
    """Write in place (same inode: files are bind-mounted) only when the content differs."""
    raw = data.encode() if isinstance(data, str) else data
    if path.is_file() and path.read_bytes() == raw:
        os.chmod(path, mode)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.chmod(path, mode)
    return True


def _compose_cmd() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]  # a v2 plugin, where there is one


def _compose(*args: str, tags: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update({IMAGE_ENV[n]: t for n, t in tags.items()})
    return _run([*_compose_cmd(), "-p", PROJECT, "-f", str(COMPOSE_FILE), *args], env=env)


def engine_answers() -> bool:
    try:
        res = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and bool(res.stdout.strip())


# ---------------------------------------------------------------- images

def image_tags(build: bool, log=print) -> dict[str, str]:
    """{'host': tag, 'infra': tag}; with build=True they, and the production
    stand-ins the hosts receive (synapse, postgres, nginx, certbot), are built
    unless cached."""
    from tests.sandbox import images
    if build:
        done = images.ensure(None, log=log)
        missing = [n for n in images.SPECS if n not in done]
        if missing:
            raise SandboxError(f"sandbox images unavailable: {', '.join(missing)} "
                               "(see the images: lines above)")
        return {n: done[n] for n in IMAGE_ENV}
    return {n: images.tag_of(n) for n in IMAGE_ENV}


def images_mod():
    from tests.sandbox import images
    return images


def export_image_env(tags: dict[str, str]) -> None:
    """Put the image tags where compose.yml reads them (for pytest-docker's compose)."""
    for name, tag in tags.items():
        os.environ[IMAGE_ENV[name]] = tag


# ---------------------------------------------------------------- state files

def _ed25519_pair(comment: str) -> tuple[bytes, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, f"{public} {comment}\n"


def _keypair(private: Path, comment: str, log) -> str:
    public = private.with_name(private.name + ".pub")
    if not (private.is_file() and public.is_file()):
        priv, pub = _ed25519_pair(comment)
        _write_if_changed(private, priv, 0o600)
        _write_if_changed(public, pub, 0o644)
        log(f"sandbox: new key {private.relative_to(state_dir())}")
    return public.read_text()


def _openssl(*args: str) -> None:
    _run(["openssl", *args])


def _make_pebble_certs(p: dict[str, Path], log) -> None:
    if all(p[k].is_file() for k in ("ca", "ca_key", "cert", "cert_key")):
        return
    log("sandbox: new CA for pebble's HTTPS (state/pebble-ca.pem)")
    with tempfile.TemporaryDirectory(prefix="sfab-ca-") as tmp:
        t = Path(tmp)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        _openssl("req", "-x509", *ec, "-keyout", str(t / "ca-key.pem"),
                 "-out", str(t / "ca.pem"), "-days", "3650", "-sha256",
                 "-subj", "/O=synapse-fabric sandbox/CN=synapse-fabric sandbox CA",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        _openssl("req", "-new", *ec, "-keyout", str(t / "key.pem"),
                 "-out", str(t / "csr.pem"), "-subj", f"/CN={ACME_NAME}")
        (t / "ext.cnf").write_text(
            f"subjectAltName=DNS:{ACME_NAME},DNS:localhost,IP:{INFRA_IP},IP:127.0.0.1\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n")
        _openssl("x509", "-req", "-in", str(t / "csr.pem"), "-CA", str(t / "ca.pem"),
                 "-CAkey", str(t / "ca-key.pem"), "-set_serial", "0x" + secrets.token_hex(16),
                 "-days", "825", "-sha256", "-extfile", str(t / "ext.cnf"),
                 "-out", str(t / "cert.pem"))
        _write_if_changed(p["ca_key"], (t / "ca-key.pem").read_bytes(), 0o600)
        _write_if_changed(p["cert_key"], (t / "key.pem").read_bytes(), 0o600)
        _write_if_changed(p["cert"], (t / "cert.pem").read_bytes(), 0o644)
        _write_if_changed(p["ca"], (t / "ca.pem").read_bytes(), 0o644)


def make_state(log=print) -> SandboxInfo:
    """Create the state files compose.yml mounts; existing keys and certs are kept."""
    p = _paths()
    state_dir().mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir(), 0o700)
    _keypair(p["key"], "synapse-fabric-sandbox-operator", log)
    lines = []
    for h in HOSTS.values():
        pub = _keypair(state_dir() / "hosts" / h.name / "ssh_host_ed25519_key",
                       f"root@{h.name}", log)
        keytype, b64 = pub.split()[:2]
        # port 22: OpenSSH writes the bare host, not [host]:22
        for alias in (h.ip, h.container):
            lines.append(f"{alias} {keytype} {b64}\n")
    _write_if_changed(p["known_hosts"], "".join(lines), 0o644)
    _write_if_changed(p["resolv"], f"nameserver {INFRA_IP}\n", 0o644)
    _write_if_changed(p["mirror"], json.dumps({"registry-mirrors": [f"http://{REGISTRY_MIRROR}"],
                                               "insecure-registries": [REGISTRY_MIRROR]}, indent=2) + "\n")
    (REPO_CACHE / "registry").mkdir(parents=True, exist_ok=True)
    _make_pebble_certs(p, log)
    _make_releases_site(p, log)
    _make_extdb(p, log)
    return info()


def _server_cert(p: dict[str, Path], name: str, tmp: Path) -> tuple[bytes, bytes]:
    """(certificate, key) for `name`, from the sandbox CA."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-new", *ec, "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "csr.pem"), "-subj", f"/CN={name}")
    (tmp / "ext.cnf").write_text(f"subjectAltName=DNS:{name}\nbasicConstraints=critical,CA:FALSE\n"
                                 "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(tmp / "csr.pem"), "-CA", str(p["ca"]), "-CAkey", str(p["ca_key"]),
             "-set_serial", "0x" + secrets.token_hex(16), "-days", "825", "-sha256",
             "-extfile", str(tmp / "ext.cnf"), "-out", str(tmp / "cert.pem"))
    return (tmp / "cert.pem").read_bytes(), (tmp / "key.pem").read_bytes()


def _make_extdb(p: dict[str, Path], log) -> None:
    """The external PostgreSQL's certificate (db.test), key and password."""
    s = state_dir()
    cert, key, password = s / "extdb-cert.pem", s / "extdb-key.pem", s / "extdb-password"
    if not (cert.is_file() and key.is_file()):
        with tempfile.TemporaryDirectory(prefix="sfab-db-") as tmp:
            chain, private = _server_cert(p, EXTDB_NAME, Path(tmp))
            _write_if_changed(key, private, 0o640)
            _write_if_changed(cert, chain, 0o644)
    # PostgreSQL (999 in its container) reads its key only when root owns it 0640 with its group
    os.chown(key, 0, 999)
    if not password.is_file():
        _write_if_changed(password, secrets.token_urlsafe(24), 0o644)  # read by the server's entry point


def _make_releases_site(p: dict[str, Path], log) -> None:
    """The release feed's nginx site, its certificate (from the sandbox CA) and
    the default Element releases."""
    from tests.sandbox import releases

    s = state_dir()
    cert, key = s / "releases-cert.pem", s / "releases-key.pem"
    if not (cert.is_file() and key.is_file()):
        with tempfile.TemporaryDirectory(prefix="sfab-rel-") as tmp:
            t = Path(tmp)
            ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
            _openssl("req", "-new", *ec, "-keyout", str(t / "key.pem"), "-out", str(t / "csr.pem"),
                     "-subj", f"/CN={RELEASES_NAME}")
            (t / "ext.cnf").write_text(
                f"subjectAltName=DNS:{RELEASES_NAME}\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
            _openssl("x509", "-req", "-in", str(t / "csr.pem"), "-CA", str(p["ca"]), "-CAkey", str(p["ca_key"]),
                     "-set_serial", "0x" + secrets.token_hex(16), "-days", "825", "-sha256",
                     "-extfile", str(t / "ext.cnf"), "-out", str(t / "cert.pem"))
            _write_if_changed(key, (t / "key.pem").read_bytes(), 0o644)  # read by nginx's workers in a test container
            _write_if_changed(cert, (t / "cert.pem").read_bytes(), 0o644)
    _write_if_changed(s / "releases-site.conf", f"""server {{
    listen 443 ssl;
    server_name {RELEASES_NAME};
    ssl_certificate /etc/nginx/releases-cert.pem;
    ssl_certificate_key /etc/nginx/releases-key.pem;
    root /srv/releases;
    location = /element-web/releases {{ default_type application/json; }}
}}
""", 0o644)
    releases.ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(releases.ROOT, 0o755)
    releases.ensure_defaults()
    for d, _, files in os.walk(releases.ROOT):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(Path(d) / f, 0o644)


# ---------------------------------------------------------------- talking to the sandbox

def _ssh_client(host: Host, known_hosts: Path, key: Path, timeout: float = 10):
    import paramiko
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(host.ip, port=22, username=host.user, key_filename=str(key),
                   look_for_keys=False, allow_agent=False, timeout=timeout,
                   banner_timeout=timeout, auth_timeout=timeout)
    return client


def connection(name: str, user: str | None = None, **kwargs):
    """A fabric Connection to a sandbox VPS with strict host key checking.

    Only state/known_hosts is trusted; an unknown or changed host key is rejected."""
    import fabric
    import paramiko
    host = HOSTS[name.removeprefix("sfab-")]
    p = _paths()
    # hermetic: no ~/.ssh/config; never read the test runner's stdin
    config = fabric.Config(overrides={"load_ssh_configs": False,
                                      "run": {"in_stream": False}})
    conn = fabric.Connection(host.ip, user=user or host.user, port=22, config=config,
                             connect_timeout=kwargs.pop("connect_timeout", 15),
                             connect_kwargs={"key_filename": str(p["key"]),
                                             "look_for_keys": False, "allow_agent": False},
                             **kwargs)
    conn.client.load_host_keys(str(p["known_hosts"]))
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return conn


def wait_ssh(timeout: float = SSH_TIMEOUT, log=print) -> None:
    """Wait until every VPS accepts the operator key (strict host keys)."""
    p = _paths()
    deadline = time.monotonic() + timeout
    for host in HOSTS.values():
        last = "no answer yet"
        while True:
            try:
                client = _ssh_client(host, p["known_hosts"], p["key"], timeout=5)
                try:
                    _, out, _ = client.exec_command("true", timeout=10)
                    if out.channel.recv_exit_status() == 0:
                        break
                    last = "`true` failed"
                finally:
                    client.close()
            except Exception as exc:  # refused, banner timeout, auth not ready, ...
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                logs = _run(["docker", "logs", "--tail", "20", host.container],
                            check=False).stdout
                raise SandboxError(
                    f"{host.container} ({host.user}@{host.ip}) does not answer SSH after "
                    f"{timeout:.0f}s: {last}\n--- docker logs {host.container} ---\n{logs}")
            time.sleep(0.5)


def _http(method: str, url_path: str, body: dict | None = None, timeout: float = 5) -> bytes:
    """Plain HTTP to challtestsrv's management API (no proxy: the sandbox is local)."""
    conn = http.client.HTTPConnection(INFRA_IP, DNS_API_PORT, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, url_path, body=data,
                     headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        payload = resp.read()
        if resp.status != 200:
            raise SandboxError(f"challtestsrv {url_path}: HTTP {resp.status} {payload[:200]!r}")
        return payload
    finally:
        conn.close()


def set_dns(name: str, ip: str | None) -> None:
    """Point sandbox DNS name `name` at `ip` (its only A record); ip=None removes it.
    (challtestsrv's add-a adds to what is there, so the old record goes first.)"""
    _http("POST", "/clear-a", {"host": name})
    if ip is not None:
        _http("POST", "/add-a", {"host": name, "addresses": [ip]})


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a fixed IP while SNI and the certificate check use the host name."""

    def __init__(self, host: str, ip: str, port: int, context: ssl.SSLContext, timeout: float):
        super().__init__(host, port, context=context, timeout=timeout)
        self._ip = ip

    def connect(self):
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def acme_roots_pem(timeout: float = 5) -> str:
    """Fetch pebble's current issuing root from https://acme.test:15000/roots/0,
    verified against state/pebble-ca.pem, and save it as state/acme-roots.pem."""
    p = _paths()
    ctx = ssl.create_default_context(cafile=str(p["ca"]))  # only the sandbox CA
    conn = _PinnedHTTPS(ACME_NAME, INFRA_IP, PEBBLE_MGMT_PORT, ctx, timeout)
    try:
        conn.request("GET", "/roots/0")
        resp = conn.getresponse()
        pem = resp.read().decode()
    finally:
        conn.close()
    if resp.status != 200 or "BEGIN CERTIFICATE" not in pem:
        raise SandboxError(f"pebble /roots/0: HTTP {resp.status}: {pem[:200]!r}")
    _write_if_changed(p["roots"], pem, 0o644)
    return pem


def _retry(what: str, fn, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (OSError, SandboxError, http.client.HTTPException) as exc:
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise SandboxError(f"{what}: TLS verification failed: {exc}") from exc
            if time.monotonic() > deadline:
                logs = _run(["docker", "logs", "--tail", "30", INFRA_CONTAINER],
                            check=False).stdout
                raise SandboxError(f"{what}: no answer from {INFRA_CONTAINER} after "
                                   f"{timeout:.0f}s: {exc}\n--- docker logs ---\n{logs}")
            time.sleep(0.3)


def registry_path(ref: str) -> str:
    """`postgres:17-trixie` -> `library/postgres:17-trixie` (Docker Hub's naming)."""
    return ref if "/" in ref.split(":")[0] else f"library/{ref}"


def _registry_manifest(path: str) -> dict | None:
    repo, tag = path.rsplit(":", 1)
    conn = http.client.HTTPConnection(*REGISTRY_PUSH.split(":"), timeout=10)
    try:
        conn.request("GET", f"/v2/{repo}/manifests/{tag}", headers={
            "Accept": "application/vnd.docker.distribution.manifest.v2+json"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return None
        return {"manifest": json.loads(body), "digest": resp.getheader("Docker-Content-Digest")}
    finally:
        conn.close()


def publish_images(tags: dict[str, str], log=print) -> dict[str, str]:
    """Push the stand-ins into the sandbox registry under their Docker Hub names
    (skipped when it already holds the same image); returns {reference: digest}
    (saved in state/registry-digests.json for tests that pin digests)."""
    t0 = time.monotonic()
    _retry("the sandbox registry (127.0.0.1:5000/v2/)",
           lambda: _registry_manifest("library/none:none") or True, INFRA_TIMEOUT)
    digests = {}
    for name in REGISTRY_IMAGES:
        ref = tags[name]
        path = registry_path(ref)
        image_id = _run(["docker", "image", "inspect", "--format", "{{.Id}}", ref]).stdout.strip()
        found = _registry_manifest(path)
        if not (found and found["manifest"].get("config", {}).get("digest") == image_id):
            alias = f"{REGISTRY_PUSH}/{path}"
            _run(["docker", "tag", ref, alias])
            try:
                _run(["docker", "push", alias])
            finally:
                _run(["docker", "rmi", alias], check=False)
            found = _registry_manifest(path)
            if not found:
                raise SandboxError(f"pushed {ref} but the registry does not serve {path}")
        digests[ref] = found["digest"]
    _write_if_changed(_paths()["digests"], json.dumps(digests, indent=2) + "\n")
    log(f"sandbox: registry serves {len(digests)} images in {time.monotonic() - t0:.1f}s")
    return digests


def registry_digests() -> dict[str, str]:
    """{reference: digest} of what the sandbox registry serves (after up)."""
    return json.loads(_paths()["digests"].read_text())


def wait_ready(log=print) -> SandboxInfo:
    """After `compose up`: SSH on every VPS, DNS records, pebble's roots."""
    t0 = time.monotonic()

    def set_all():
        for name, ip in DNS_RECORDS.items():
            set_dns(name, ip)
    _retry("setting DNS records in challtestsrv", set_all, INFRA_TIMEOUT)
    _retry("fetching pebble's root from :15000/roots/0", acme_roots_pem, INFRA_TIMEOUT)
    wait_ssh(log=log)
    tags = {n: images_mod().tag_of(n) for n in REGISTRY_IMAGES}
    publish_images(tags, log)
    log(f"sandbox: ssh, dns and acme ready in {time.monotonic() - t0:.1f}s")
    return info()


# ---------------------------------------------------------------- up / down / status

def _require_engine() -> None:
    if not engine_answers():
        raise SandboxError("no Docker engine answers (`docker version` failed); start one "
                           "(scripts/setup does) and retry")


def prepare(log=print) -> dict[str, str]:
    """Images built (or cached), state files written, image tags exported to os.environ."""
    _require_engine()
    tags = image_tags(build=True, log=log)
    make_state(log)
    export_image_env(tags)
    return tags


def up(log=print) -> SandboxInfo:
    t0 = time.monotonic()
    tags = prepare(log)
    t_images = time.monotonic() - t0
    res = _compose("up", "-d", "--remove-orphans", tags=tags)
    for line in res.stdout.splitlines():
        if line.strip():
            log(f"compose: {line}")
    result = wait_ready(log)
    result.images = tags
    result.seconds = time.monotonic() - t0
    log(f"sandbox: up in {result.seconds:.1f}s (images {t_images:.1f}s); "
        f"{', '.join(f'{h.user}@{h.ip} ({h.name})' for h in HOSTS.values())}; "
        f"dns {INFRA_IP}; acme {ACME_DIRECTORY}; state {state_dir()}")
    return result


def leftovers() -> list[str]:
    """Anything of project sfab still present (containers, network, volumes)."""
    found = []
    res = _run(["docker", "ps", "-a", "--format", "{{.Names}}",
                "--filter", f"label=com.docker.compose.project={PROJECT}"], check=False)
    found += [f"container {n}" for n in res.stdout.split()]
    for c in [INFRA_CONTAINER, *(h.container for h in HOSTS.values())]:
        if _run(["docker", "container", "inspect", c], check=False).returncode == 0:
            found.append(f"container {c}")
    for network in (NETWORK, PRIVATE_NETWORK):
        if _run(["docker", "network", "inspect", network], check=False).returncode == 0:
            found.append(f"network {network}")
    res = _run(["docker", "volume", "ls", "--format", "{{.Name}}",
                "--filter", f"label=com.docker.compose.project={PROJECT}"], check=False)
    found += [f"volume {n}" for n in res.stdout.split()]
    for h in HOSTS.values():
        vol = f"{h.container}-docker"
        if _run(["docker", "volume", "inspect", vol], check=False).returncode == 0:
            found.append(f"volume {vol}")
    return sorted(set(found))


def down(log=print) -> None:
    """Remove the project's containers, network and volumes; keep images and state."""
    t0 = time.monotonic()
    _require_engine()
    res = _compose("down", "--volumes", "--remove-orphans", "--timeout", "5",
                   tags=image_tags(build=False))
    for line in res.stdout.splitlines():
        if line.strip():
            log(f"compose: {line}")
    _paths()["roots"].unlink(missing_ok=True)  # valid only for the pebble that just stopped
    left = leftovers()
    if left:
        raise SandboxError(f"after down, still present: {', '.join(left)}")
    log(f"sandbox: down in {time.monotonic() - t0:.1f}s")


def status() -> list[tuple[str, str, str, str]]:
    """Rows of (container, address, state, role)."""
    rows = []
    entries = [(INFRA_CONTAINER, INFRA_IP, "dns :53, acme :14000, mgmt :15000, dns api :8055"),
               ("sfab-releases", RELEASES_IP, "Element release feed (releases.test :443)"),
               ("sfab-store", STORE_IP, "restic REST server (store.test :8000)")]
    entries += [(h.container, h.ip, f"Debian {h.debian}, {'systemd' if h.systemd else 'no systemd'}; "
                 f"ssh {h.user}@{h.ip}") for h in HOSTS.values()]
    for container, ip, role in entries:
        res = _run(["docker", "container", "inspect", "--format", "{{.State.Status}}",
                    container], check=False)
        state = res.stdout.strip() if res.returncode == 0 else "absent"
        rows.append((container, ip, state, role))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sandbox.sandbox",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up()
        elif args.command == "down":
            down()
        else:
            for row in status():
                print("  ".join(f"{c:<14}" for c in row[:3]) + row[3])
    except SandboxError as exc:
        print(f"sandbox {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
