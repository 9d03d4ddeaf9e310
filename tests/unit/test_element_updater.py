"""The host-side Element Web updater (templates/reverse_proxy/bin/element-update.j2).

The template is rendered as the deploy renders it, then run under dash against a
feed and tarballs served over HTTPS from 127.0.0.1 by a ThreadingHTTPServer in this
process (its self-signed certificate is the site's feed-ca.pem; a plain-HTTP feed
serves the refusal tests). Needs dash, curl, jq, gpg, gpgv, flock, openssl (no
Docker, loopback only).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import tarfile
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from fabfile.render import _template

TEMPLATE = "reverse_proxy/bin/element-update.j2"
HOST = "chat.test"
FEED_PATH = "/repos/element-hq/element-web/releases"
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ chat\.test: ", re.M)

for tool in ("dash", "curl", "jq", "gpg", "gpgv", "flock", "openssl"):
    if shutil.which(tool) is None:  # a missing tool is a broken machine, not a skip
        raise RuntimeError(f"{tool} is missing: scripts/setup installs it")


# -- a local release feed ---------------------------------------------------------


class Feed:
    """Serves `routes` (path -> bytes) on 127.0.0.1, over HTTP or HTTPS (then
    `ca` is the certificate that verifies it); `redirects` (path -> URL) answer 302."""

    def __init__(self, tls: ssl.SSLContext | None = None, ca: Path | None = None):
        self.routes: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.ca = ca
        self.requests: list[str] = []
        self.gates: dict[str, threading.Event] = {}  # path -> wait for it before answering
        self.reached: dict[str, threading.Event] = {}  # path -> set when it is asked for
        feed = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                feed.requests.append(self.path)
                if self.path in feed.reached:
                    feed.reached[self.path].set()
                if self.path in feed.gates:
                    feed.gates[self.path].wait(30)
                if self.path in feed.redirects:
                    self.send_response(302)
                    self.send_header("Location", feed.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = feed.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):  # the client was killed
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}{path}"

    def reset(self):
        self.routes.clear()
        self.redirects.clear()
        self.requests.clear()
        self.gates.clear()
        self.reached.clear()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA): cert.pem, key.pem."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
               "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
               "-keyout", str(key), "-out", str(cert)]
    subprocess.run(openssl, check=True, capture_output=True, timeout=60)
    return cert, key


def https_feed(directory: Path) -> Feed:
    cert, key = make_cert(directory)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    return Feed(tls, ca=cert)


@pytest.fixture(scope="module")
def shared_https_feed(tmp_path_factory):
    feed = https_feed(tmp_path_factory.mktemp("pki"))
    yield feed
    feed.close()


@pytest.fixture(scope="module")
def shared_http_feed():
    feed = Feed()
    yield feed
    feed.close()


def _fresh(feed):
    feed.reset()
    yield feed
    for gate in feed.gates.values():
        gate.set()


@pytest.fixture()
def feed(shared_https_feed):
    """The release feed (HTTPS; Updater trusts it through feed-ca.pem)."""
    yield from _fresh(shared_https_feed)


@pytest.fixture()
def http_feed(shared_http_feed):
    """A plain-HTTP server: what the updater must never fetch from."""
    yield from _fresh(shared_http_feed)


# -- throwaway OpenPGP keys ------------------------------------------------------------


class Keys:
    def __init__(self):
        # short path: gpg-agent's socket must fit in sun_path
        self.home = Path(tempfile.mkdtemp(prefix="eu-gpg-"))
        self.home.chmod(0o700)
        self.env = {**os.environ, "GNUPGHOME": str(self.home)}
        self.good = self._generate("Element Test Release <release@example.invalid>")
        self.other = self._generate("Someone Else <other@example.invalid>")
        # what the deploy would render as signing-key.gpg: a binary keyring of the good key
        self.keyring = self._gpg("--export", self.good).stdout
        assert self.keyring and not self.keyring.startswith(b"-----BEGIN")

    def _gpg(self, *args, data=None):
        return subprocess.run(["gpg", "--batch", "--quiet", "--pinentry-mode", "loopback",
                               "--passphrase", "", *args],
                              env=self.env, input=data, capture_output=True, check=True, timeout=60)

    def _generate(self, uid):
        self._gpg("--quick-gen-key", uid, "ed25519", "sign", "never")
        out = self._gpg("--with-colons", "--list-keys", uid).stdout.decode()
        return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))

    def sign(self, data: bytes, key: str) -> bytes:
        return self._gpg("--local-user", key, "--armor", "--detach-sign", "--output", "-", data=data).stdout

    def close(self):
        subprocess.run(["gpgconf", "--kill", "all"], env=self.env, capture_output=True, timeout=30)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(scope="module")
def keys():
    k = Keys()
    yield k
    k.close()


# -- fake Element releases ----------------------------------------------------------------


def _add(tar, name, data=b"", **attrs):
    info = tarfile.TarInfo(name)
    info.mtime = 1700000000
    for key, value in attrs.items():
        setattr(info, key, value)
    if info.type == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def tarball(version: str, extra=(), index=True) -> bytes:
    """A tiny element-v<version>.tar.gz; `extra` adds (name, data, attrs) members."""
    top = f"element-v{version}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, top, type=tarfile.DIRTYPE, mode=0o755)
        if index:
            _add(tar, f"{top}/index.html", f"<html>Element {version}</html>\n".encode(), mode=0o644)
        _add(tar, f"{top}/bundles", type=tarfile.DIRTYPE, mode=0o755)
        _add(tar, f"{top}/bundles/app.js", f"console.log('{version}')\n".encode(), mode=0o644)
        for name, data, attrs in extra:
            _add(tar, name, data, **attrs)
    return buf.getvalue()


def release(feed: Feed, version: str, body: bytes | None = None, *, checksum="digest", sign=None,
            keys: Keys | None = None, draft=False, prerelease=False, served: bytes | None = None):
    """Publish a release on `feed`; returns its JSON object (for the feed list).

    checksum: "digest" (GitHub's asset digest), "file" (a .sha256 asset), "none",
    "wrong" (a digest of other bytes). sign: None, "good", "other" (another key's).
    served: bytes the download returns instead of `body` (the feed still lists body's digest).
    """
    body = tarball(version) if body is None else body
    name = f"element-v{version}.tar.gz"
    path = f"/download/v{version}/{name}"
    feed.routes[path] = body if served is None else served
    sha = hashlib.sha256(body).hexdigest()
    asset = {"name": name, "browser_download_url": feed.url(path), "size": len(body), "state": "uploaded"}
    assets = [asset]
    if checksum == "digest":
        asset["digest"] = f"sha256:{sha}"
    elif checksum == "wrong":
        asset["digest"] = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    elif checksum == "file":
        feed.routes[path + ".sha256"] = f"{sha.upper()}  {name}\n".encode()
        assets.append({"name": name + ".sha256", "browser_download_url": feed.url(path + ".sha256")})
    if sign:
        signature = keys.sign(body, keys.good if sign == "good" else keys.other)
        feed.routes[path + ".asc"] = signature
        assets.append({"name": name + ".asc", "browser_download_url": feed.url(path + ".asc"), "digest": None})
    return {"tag_name": f"v{version}", "name": version, "draft": draft, "prerelease": prerelease,
            "assets": assets}


def publish(feed: Feed, *releases):
    """The feed list, newest first (as GitHub's API orders it)."""
    feed.routes[FEED_PATH] = json.dumps(list(releases)).encode()


# -- the rendered updater ------------------------------------------------------------------


class Updater:
    """A rendered updater for one site; `ca` becomes the site's feed-ca.pem,
    `prefix` is a command the script runs under (e.g. setpriv), `template_vars`
    go to the template as they are (e.g. unpacked_max_bytes)."""

    def __init__(self, root: Path, feed_url: str, version="latest", keep=3, ca: Path | None = None,
                 prefix=(), **template_vars):
        self.root = root
        self.proxy = root / "opt" / "matrix" / "reverse_proxy"
        self.site = self.proxy / "element" / HOST
        self.site.mkdir(parents=True)
        (self.site / "config.json").write_text('{"brand": "Element"}\n')
        if ca is not None:
            shutil.copy(ca, self.site / "feed-ca.pem")
        self.lock = root / "lock" / "synapse-fabric-element.lock"
        self.script = self.proxy / "bin" / "element-update"
        self.prefix = list(prefix)
        self.template_vars = template_vars
        self.render(feed_url, version, keep)

    def render(self, feed_url, version="latest", keep=3):
        sites = [SimpleNamespace(hostname=HOST, version=version, keep=keep, feed=feed_url)]
        self.script.parent.mkdir(parents=True, exist_ok=True)
        self.script.write_bytes(_template(TEMPLATE, proxy_dir=str(self.proxy), sites=sites,
                                          lock_file=str(self.lock), **self.template_vars))
        self.script.chmod(0o755)

    def run(self, *args, timeout=60):
        return subprocess.run([*self.prefix, "dash", str(self.script), *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "LC_ALL": "C"})

    def ok(self, *args):
        res = self.run(*args)
        assert res.returncode == 0, res.stdout + res.stderr
        return res

    def current(self) -> str | None:
        link = self.site / "current"
        return os.readlink(link) if link.is_symlink() else None

    def served(self) -> str:
        return (self.site / "current" / "index.html").read_text()

    def releases(self) -> list[str]:
        return sorted(p.name for p in (self.site / "releases").iterdir())

    def history(self) -> list[str]:
        path = self.site / "history"
        return path.read_text().split() if path.exists() else []

    def leftovers(self) -> list[str]:
        found = [p.name for p in self.site.glob(".tmp-*")] + [p.name for p in self.site.glob("current.new")]
        if (self.site / "releases").exists():
            found += [p.name for p in (self.site / "releases").glob(".*")]
        return found

    def snapshot(self) -> dict:
        """Every path under the site: link target, or size and mtime."""
        state = {}
        for path in sorted(self.site.rglob("*")):
            st = path.lstat()
            state[str(path.relative_to(self.site))] = (
                os.readlink(path) if path.is_symlink() else (st.st_mode, st.st_size, st.st_mtime_ns))
        return state


@pytest.fixture()
def updater(tmp_path, feed):
    return Updater(tmp_path, feed.url(FEED_PATH), ca=feed.ca)


def install(updater, feed, version, *args):
    """Serve a good `version` as the only release and install it."""
    publish(feed, release(feed, version))
    updater.ok("--version", version, *args)
    assert updater.current() == f"releases/{version}"


# -- rendering -------------------------------------------------------------------------------


def test_renders_for_dash_with_quoted_values(tmp_path):
    sites = [SimpleNamespace(hostname="chat.one.test", version="1.11.85", keep=3,
                             feed="https://example.test/it's $(reboot) `x`"),
             SimpleNamespace(hostname="chat.two.test", version="latest", keep=1,
                             feed="https://api.github.com/repos/element-hq/element-web/releases")]
    text = _template(TEMPLATE, proxy_dir="/opt/matrix/reverse_proxy", sites=sites).decode()
    assert text.startswith("#!/bin/sh\n# Managed by synapse-fabric")
    assert "LOCK_FILE='/run/synapse-fabric/element.lock'" in text
    assert "UNPACKED_MAX_BYTES='1000000000'" in text
    assert "PROXY_DIR='/opt/matrix/reverse_proxy'" in text
    assert "cfg_feed='https://example.test/it'\\''s $(reboot) `x`'" in text
    script = tmp_path / "element-update"
    script.write_text(text)
    assert subprocess.run(["dash", "-n", str(script)], capture_output=True).returncode == 0
    # an unknown site and contradicting flags are usage errors; --help works
    res = subprocess.run(["dash", str(script), "--site", "nope.test"], capture_output=True, text=True)
    assert res.returncode == 64 and "no Element site 'nope.test'" in res.stderr
    res = subprocess.run(["dash", str(script), "--check", "--rollback"], capture_output=True, text=True)
    assert res.returncode == 64
    res = subprocess.run(["dash", str(script), "--version", "1.2; rm -rf /"], capture_output=True, text=True)
    assert res.returncode == 64 and "is not a version" in res.stderr
    assert subprocess.run(["dash", str(script), "--help"], capture_output=True).returncode == 0


def unit_settings(text: str) -> dict[str, list[str]]:
    """key -> its values, in order, of a rendered systemd unit."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_service_runs_without_capabilities_in_a_sandbox():
    text = _template("systemd/synapse-fabric-element.service.j2", proxy_dir="/opt/matrix/reverse_proxy").decode()
    unit = unit_settings(text)
    assert unit["ExecStart"] == ["/opt/matrix/reverse_proxy/bin/element-update --unattended"]
    # root, but no capability can bypass file permissions, chown, mount...
    assert "User" not in unit and unit["CapabilityBoundingSet"] == [""] and unit["AmbientCapabilities"] == [""]
    for key, value in {
        "NoNewPrivileges": "yes",
        # writes the Element sites and the lock directory only
        "ProtectSystem": "strict",
        "ReadWritePaths": "/opt/matrix/reverse_proxy/element",
        "RuntimeDirectory": "synapse-fabric",
        "RuntimeDirectoryMode": "0700",
        "RuntimeDirectoryPreserve": "yes",  # deploy's lock lives there too
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "PrivateIPC": "yes",
        # the network over IPv4/IPv6 only: no AF_UNIX, so no Docker, D-Bus or systemd socket
        "RestrictAddressFamilies": "AF_INET AF_INET6",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "SystemCallFilter": "@system-service",
    }.items():
        assert unit.get(key) == [value], (key, unit.get(key))
    hidden = {path.removeprefix("-") for path in unit["InaccessiblePaths"][0].split()}
    assert {"/run/docker.sock", "/var/run/docker.sock", "/run/containerd"} <= hidden
    # a base_dir under /home stays reachable (ProtectHome=yes would hide it)
    home = _template("systemd/synapse-fabric-element.service.j2", proxy_dir="/home/matrix/reverse_proxy").decode()
    assert unit_settings(home)["ProtectHome"] == ["read-only"]
    assert unit_settings(home)["ReadWritePaths"] == ["/home/matrix/reverse_proxy/element"]


def test_no_sites_is_fine(tmp_path):
    script = tmp_path / "element-update"
    script.write_bytes(_template(TEMPLATE, proxy_dir=str(tmp_path), sites=[], lock_file=str(tmp_path / "l")))
    res = subprocess.run(["dash", str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "no Element site" in res.stdout


# -- installing and updating -------------------------------------------------------------


def test_installs_the_pinned_version(tmp_path, feed):
    up = Updater(tmp_path, feed.url(FEED_PATH), version="1.11.84", ca=feed.ca)
    publish(feed, release(feed, "1.11.85"), release(feed, "1.11.84"))
    res = up.ok()
    assert up.current() == "releases/1.11.84"  # relative: resolves in the nginx container too
    assert up.served() == "<html>Element 1.11.84</html>\n"
    assert (up.site / "current" / "bundles" / "app.js").is_file()
    assert up.history() == ["1.11.84"]
    assert up.releases() == ["1.11.84"]
    assert (up.site / "config.json").read_text() == '{"brand": "Element"}\n'  # never touched
    assert up.leftovers() == []
    assert STAMP.search(res.stdout) and "now serving 1.11.84" in res.stdout
    assert "sha256 of element-v1.11.84.tar.gz matches" in res.stdout
    # files readable by nginx's unprivileged workers
    mode = (up.site / "releases" / "1.11.84" / "index.html").stat().st_mode
    assert mode & 0o004
    # pinned and installed: nothing to do, not even a look at the feed
    feed.requests.clear()
    before = up.snapshot()
    res = up.ok()
    assert "already at 1.11.84" in res.stdout
    assert feed.requests == [] and up.snapshot() == before


def test_latest_moves_to_the_newest_and_a_second_run_is_a_no_op(updater, feed):
    publish(feed, release(feed, "1.11.84"))
    updater.ok()
    assert updater.current() == "releases/1.11.84"
    # drafts and prereleases are skipped; the feed's first published release wins
    publish(feed, release(feed, "1.12.0", draft=True), release(feed, "1.11.86-rc.1", prerelease=True),
            release(feed, "1.11.85"), release(feed, "1.11.84"))
    res = updater.ok()
    assert "updating from 1.11.84 to 1.11.85" in res.stdout
    assert updater.current() == "releases/1.11.85"
    assert updater.served() == "<html>Element 1.11.85</html>\n"
    assert updater.history() == ["1.11.84", "1.11.85"]
    assert updater.releases() == ["1.11.84", "1.11.85"]
    feed.requests.clear()
    before = updater.snapshot()
    res = updater.ok()
    assert "already at 1.11.85, nothing to do" in res.stdout
    assert feed.requests == [FEED_PATH]  # the feed only, no download
    assert updater.snapshot() == before


def test_latest_never_moves_back(updater, feed):
    install(updater, feed, "1.11.85")
    publish(feed, release(feed, "1.11.84"))  # a rolled-back feed, or a downgrade attack
    before = updater.snapshot()
    feed.requests.clear()
    for args in ((), ("--unattended",), ("--version", "latest")):
        res = updater.ok(*args)
        assert "the feed's newest release 1.11.84 is not newer than 1.11.85: skipped" in res.stdout
    assert updater.snapshot() == before
    assert not any(p.endswith(".tar.gz") for p in feed.requests)
    res = updater.ok("--check")
    assert "newest 1.11.84, wanted latest: would skip 1.11.84: not newer than 1.11.85" in res.stdout
    # the operator may go back on purpose
    updater.ok("--version", "1.11.84")
    assert updater.current() == "releases/1.11.84"
    assert updater.history() == ["1.11.85", "1.11.84"]


@pytest.mark.parametrize("installed, newest, moves", [
    ("1.11.9", "1.11.10", True),
    ("1.11.10", "1.11.9", False),  # numbers, not text
    ("1.11.99", "1.12", True),
    ("1.12", "1.11.99", False),
    ("1.12", "1.12.0", False),  # the same version
    ("1.11.10-rc.2", "1.11.10", True),  # a release comes after its rc
    ("1.11.10", "1.11.10-rc.2", False),
    ("1.11.10-rc.9", "1.11.10-rc.10", True),
    ("1.11.10-rc.10", "1.11.10-rc.9", False),
    ("1.11.10-rc.1", "1.11.9", False),
])
def test_latest_compares_versions(updater, feed, installed, newest, moves):
    install(updater, feed, installed)
    publish(feed, release(feed, newest))  # an rc not marked prerelease counts as published
    updater.ok("--unattended")
    assert updater.current() == f"releases/{newest if moves else installed}"


def test_pinned_version_beyond_the_feed_page_is_asked_by_tag(updater, feed):
    old = release(feed, "1.10.0")
    publish(feed, release(feed, "1.11.85"))
    feed.routes[FEED_PATH + "/tags/v1.10.0"] = json.dumps(old).encode()
    updater.ok("--version", "v1.10.0")
    assert updater.current() == "releases/1.10.0"
    res = updater.run("--version", "1.9.0")
    assert res.returncode == 1 and "release v1.9.0 not found" in res.stderr
    assert updater.current() == "releases/1.10.0" and updater.leftovers() == []


def test_links_inside_the_release_are_fine(updater, feed):
    top = "element-v1.11.85"
    links = [(f"{top}/bundles/latest.js", b"", _sym("app.js")),
             (f"{top}/vendor", b"", {"type": tarfile.DIRTYPE, "mode": 0o755}),
             (f"{top}/vendor/app.js", b"", _sym("../bundles/./app.js")),
             (f"{top}/home", b"", _sym("index.html")),
             (f"{top}/bundles/copy.js", b"", _hard(f"{top}/bundles/app.js"))]
    publish(feed, release(feed, "1.11.85", tarball("1.11.85", links)))
    updater.ok()
    rel = updater.site / "releases" / "1.11.85"
    assert (rel / "vendor" / "app.js").read_text() == "console.log('1.11.85')\n"
    assert os.readlink(rel / "vendor" / "app.js") == "../bundles/./app.js"
    assert (rel / "bundles" / "copy.js").stat().st_ino == (rel / "bundles" / "app.js").stat().st_ino


def test_a_sha256_asset_stands_in_for_the_digest(updater, feed):
    publish(feed, release(feed, "1.11.85", checksum="file"))
    res = updater.ok()
    assert updater.current() == "releases/1.11.85"
    assert "matches element-v1.11.85.tar.gz.sha256" in res.stdout


def test_check_prints_versions_and_changes_nothing(updater, feed):
    install(updater, feed, "1.11.84")
    publish(feed, release(feed, "1.11.85"), release(feed, "1.11.84"))
    before = updater.snapshot()
    feed.requests.clear()
    res = updater.ok("--check")
    assert "installed 1.11.84, newest 1.11.85, wanted latest: would install 1.11.85" in res.stdout
    assert feed.requests == [FEED_PATH] and updater.snapshot() == before
    # --check does not wait for the lock: it only reads
    with held_lock(updater):
        assert updater.run("--check").returncode == 0


# -- refusals: each leaves the served version and no temporary files ---------------------------


def _sym(target):
    return {"type": tarfile.SYMTYPE, "linkname": target}


def _hard(target):
    return {"type": tarfile.LNKTYPE, "linkname": target}


TOP = "element-v1.11.85"
BAD_ARCHIVES = {
    "dotdot": ([(f"{TOP}/../escape", b"x", {})], "has a .. component"),
    "dotdot-top": ([("../escape", b"x", {})], "has a .. component"),
    "absolute": ([("/tmp/eu-absolute-escape", b"x", {})], "has an absolute name"),
    "outside-top": ([("other/file", b"x", {})], "is outside element-v1.11.85/"),
    "dot-prefix": ([(f"./{TOP}/x", b"x", {})], "empty or . component"),
    "symlink-up": ([(f"{TOP}/bundles/up", b"", _sym("../../../../etc"))], "points outside the release"),
    "symlink-absolute": ([(f"{TOP}/passwd", b"", _sym("/etc/passwd"))], "has an absolute target"),
    "symlink-via-symlink": ([(f"{TOP}/here", b"", _sym(".")), (f"{TOP}/up", b"", _sym("here/.."))],
                            "goes up through symlink"),
    "write-through-symlink": ([(f"{TOP}/here", b"", _sym(".")), (f"{TOP}/here/x", b"x", {})],
                              "member below a symlink"),
    "hardlink-absolute": ([(f"{TOP}/shadow", b"", _hard("/etc/shadow"))], "has an absolute name"),
    "hardlink-up": ([(f"{TOP}/shadow", b"", _hard(f"{TOP}/../../shadow"))], "has a .. component"),
    "fifo": ([(f"{TOP}/fifo", b"", {"type": tarfile.FIFOTYPE})], "special member (type p)"),
    "device": ([(f"{TOP}/null", b"", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3})],
               "special member (type c)"),
    "top-is-symlink": ([], None),  # built below
}


def _bad_tarball(case):
    if case == "top-is-symlink":
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            _add(tar, TOP, type=tarfile.SYMTYPE, linkname="/")
        return buf.getvalue(), "is not a directory"
    extra, reason = BAD_ARCHIVES[case]
    return tarball("1.11.85", extra), reason


FAILURES = {
    "bad-checksum": (dict(checksum="wrong"), "checksum mismatch"),
    "corrupted-download": (dict(served=b"\x1f\x8b truncated"), "checksum mismatch"),
    "corrupted-tarball": (dict(body=b"\x1f\x8b\x08\x00 this is not gzip at all"), "is not a readable .tar.gz"),
    "missing-checksum": (dict(checksum="none"), "has no checksum"),
    "no-index": (dict(body=tarball("1.11.85", index=False)), "has no index.html"),
}


def assert_untouched(updater, res, reason, before_history=("1.11.84",)):
    assert res.returncode != 0, res.stdout
    assert reason in res.stderr, res.stderr
    assert updater.current() == "releases/1.11.84"
    assert updater.served() == "<html>Element 1.11.84</html>\n"
    assert updater.history() == list(before_history)
    assert updater.releases() == ["1.11.84"]
    assert updater.leftovers() == []


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_broken_downloads_are_refused(updater, feed, case):
    install(updater, feed, "1.11.84")
    options, reason = FAILURES[case]
    publish(feed, release(feed, "1.11.85", **options), release(feed, "1.11.84"))
    assert_untouched(updater, updater.run(), reason)


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_unsafe_archives_are_refused_before_extraction(updater, feed, case):
    install(updater, feed, "1.11.84")
    body, reason = _bad_tarball(case)
    publish(feed, release(feed, "1.11.85", body), release(feed, "1.11.84"))
    res = updater.run()
    assert_untouched(updater, res, reason)
    assert "refusing element-v1.11.85.tar.gz" in res.stderr
    # nothing landed outside either
    assert not (updater.site / "escape").exists() and not (updater.proxy / "element" / "escape").exists()
    assert not Path("/tmp/eu-absolute-escape").exists()


@pytest.mark.parametrize("sign, reason", [
    (None, "has no signature element-v1.11.85.tar.gz.asc"),
    ("other", "bad or unknown signature"),
    ("tampered", "bad or unknown signature"),
])
def test_a_signing_key_requires_a_good_signature(updater, feed, keys, sign, reason):
    install(updater, feed, "1.11.84")
    (updater.site / "signing-key.gpg").write_bytes(keys.keyring)
    body = tarball("1.11.85")
    rel = release(feed, "1.11.85", body, sign="good" if sign == "tampered" else sign, keys=keys)
    if sign == "tampered":  # a good signature, but of other bytes
        feed.routes["/download/v1.11.85/element-v1.11.85.tar.gz.asc"] = keys.sign(b"other bytes", keys.good)
    publish(feed, rel, release(feed, "1.11.84"))
    assert_untouched(updater, updater.run(), reason)
    assert sorted(p.name for p in updater.site.iterdir()) == [
        "config.json", "current", "feed-ca.pem", "history", "releases", "signing-key.gpg"]


def test_a_good_signature_installs(updater, feed, keys):
    (updater.site / "signing-key.gpg").write_bytes(keys.keyring)
    publish(feed, release(feed, "1.11.85", sign="good", keys=keys))
    res = updater.ok()
    assert "signature of element-v1.11.85.tar.gz is good" in res.stdout
    assert updater.current() == "releases/1.11.85" and updater.leftovers() == []


@pytest.mark.parametrize("case, reason", [
    ("http-feed", "feed 'http://127.0.0.1:"),
    ("http-asset", "asset element-v1.11.85.tar.gz: its download URL is not an https:// URL"),
    ("feed-redirected-to-http", "cannot read the release feed"),
    ("asset-redirected-to-http", "download of element-v1.11.85.tar.gz failed"),
])
def test_only_https_is_used(updater, feed, http_feed, case, reason):
    install(updater, feed, "1.11.84")
    body = tarball("1.11.85")
    tar = "/download/v1.11.85/element-v1.11.85.tar.gz"
    http_feed.routes[tar] = body
    releases = [release(feed, "1.11.85", body), release(feed, "1.11.84")]
    if case == "http-feed":
        publish(http_feed, release(http_feed, "1.11.85", body), release(http_feed, "1.11.84"))
        updater.render(http_feed.url(FEED_PATH))
    elif case == "http-asset":
        releases[0]["assets"][0]["browser_download_url"] = http_feed.url(tar)
        publish(feed, *releases)
    elif case == "feed-redirected-to-http":
        feed.redirects[FEED_PATH] = http_feed.url(FEED_PATH)
        publish(http_feed, *releases)
    else:
        feed.redirects[tar] = http_feed.url(tar)
        publish(feed, *releases)
    res = updater.run()
    assert_untouched(updater, res, reason)
    if case == "http-feed":
        assert "is not an https:// URL; refusing it" in res.stderr
    if case.endswith("redirected-to-http"):
        assert "refused a redirect of https://127.0.0.1:" in res.stderr and "to a URL that is not https" in res.stderr
    assert http_feed.requests == []  # not even asked


def test_an_archive_that_unpacks_too_big_is_refused_before_extraction(tmp_path, feed):
    up = Updater(tmp_path, feed.url(FEED_PATH), ca=feed.ca, unpacked_max_bytes=100_000)
    install(up, feed, "1.11.84")  # a few kB unpacked: fine
    bomb = tarball("1.11.85", [("element-v1.11.85/zeros.js", bytes(300_000), {})])
    assert len(bomb) < 5_000  # small to download, big once unpacked
    publish(feed, release(feed, "1.11.85", bomb), release(feed, "1.11.84"))
    res = up.run()
    assert_untouched(up, res, "refusing element-v1.11.85.tar.gz: it unpacks to more than 100000 bytes")


def test_feed_ca_is_trusted_for_the_feed_and_downloads(tmp_path):
    feed = https_feed(tmp_path / "pki")
    try:
        up = Updater(tmp_path / "host", feed.url(FEED_PATH))
        publish(feed, release(feed, "1.11.85"))
        res = up.run()  # the system CAs do not know this one
        assert res.returncode == 1 and "cannot read the release feed" in res.stderr
        assert up.current() is None and up.leftovers() == []
        shutil.copy(feed.ca, up.site / "feed-ca.pem")
        up.ok()
        assert up.current() == "releases/1.11.85"
    finally:
        feed.close()


# -- rollback and retention ------------------------------------------------------------------


def test_rollback_returns_to_the_previous_version_and_holds_the_bad_one(updater, feed):
    res = updater.run("--rollback")
    assert res.returncode == 1 and "nothing is installed" in res.stderr
    install(updater, feed, "1.11.84")
    res = updater.run("--rollback")
    assert res.returncode == 1 and "no previous version" in res.stderr
    assert updater.current() == "releases/1.11.84"

    publish(feed, release(feed, "1.11.85"), release(feed, "1.11.84"))
    updater.ok()
    assert updater.current() == "releases/1.11.85"
    res = updater.ok("--rollback")
    assert "rolled back from 1.11.85 to 1.11.84" in res.stdout
    assert updater.current() == "releases/1.11.84"
    assert updater.served() == "<html>Element 1.11.84</html>\n"
    assert updater.history() == ["1.11.84"]
    assert updater.leftovers() == []
    # cron (latest) does not reinstall what was rolled back from...
    before = updater.snapshot()
    res = updater.ok()
    assert "1.11.85 was rolled back; staying on 1.11.84" in res.stdout
    assert updater.snapshot() == before
    # ...an explicit --version does (from disk), and lifts the hold
    feed.requests.clear()
    res = updater.ok("--version", "1.11.85")
    assert "releases/1.11.85 is already unpacked" in res.stdout
    assert not any(p.endswith(".tar.gz") for p in feed.requests)
    assert updater.current() == "releases/1.11.85"
    assert not (updater.site / "hold").exists()
    assert updater.history() == ["1.11.84", "1.11.85"]


def test_rollback_skips_versions_no_longer_on_disk(updater, feed):
    for version in ("1.11.83", "1.11.84", "1.11.85"):
        install(updater, feed, version)
    shutil.rmtree(updater.site / "releases" / "1.11.84")
    updater.ok("--rollback")
    assert updater.current() == "releases/1.11.83"
    assert updater.history() == ["1.11.83"]


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_only_the_last_n_versions_stay(tmp_path, feed, keep):
    up = Updater(tmp_path, feed.url(FEED_PATH), keep=keep, ca=feed.ca)
    versions = ["1.11.81", "1.11.82", "1.11.83", "1.11.84"]
    for version in versions:
        install(up, feed, version)
    assert up.releases() == versions[-keep:]
    assert up.history() == versions
    if keep >= 2:
        up.ok("--rollback")  # the previous one is always still there
        assert up.current() == "releases/1.11.83"
    else:
        assert up.run("--rollback").returncode == 1


def hashed_release(version: str, bundle: str) -> bytes:
    """A release laid out as Element's: its scripts under bundles/<build hash>/."""
    top = f"element-v{version}"
    return tarball(version, [(f"{top}/bundles/{bundle}", b"", {"type": tarfile.DIRTYPE, "mode": 0o755}),
                             (f"{top}/bundles/{bundle}/app.js", f"// app {version}\n".encode(), {}),
                             (f"{top}/bundles/{bundle}/chunk-7.js", f"// lazy {version}\n".encode(), {})])


def test_the_previous_release_bundles_stay_served_after_a_swap(tmp_path, feed):
    up = Updater(tmp_path, feed.url(FEED_PATH), keep=2, ca=feed.ca)
    hashes = {"1.11.84": "aaa111", "1.11.85": "bbb222", "1.11.86": "ccc333"}
    rels = {v: release(feed, v, hashed_release(v, h)) for v, h in hashes.items()}
    current = up.site / "current" / "bundles"

    def bundle_files(version, where):
        return {p.name: p.read_bytes() for p in (where / hashes[version]).iterdir()}

    publish(feed, rels["1.11.84"])
    up.ok()
    old = bundle_files("1.11.84", current)  # what a page loaded now will ask for
    assert set(old) == {"app.js", "chunk-7.js"}

    publish(feed, rels["1.11.85"], rels["1.11.84"])
    up.ok()
    assert up.served() == "<html>Element 1.11.85</html>\n"
    # the page loaded from 1.11.84 before the swap still gets its scripts, byte for byte,
    # hard-linked (not copied) from releases/1.11.84
    assert bundle_files("1.11.84", current) == old
    for name in old:
        assert ((current / "aaa111" / name).stat().st_ino
                == (up.site / "releases" / "1.11.84" / "bundles" / "aaa111" / name).stat().st_ino)
    # 1.11.85's own files are there, and 1.11.84's bundle directory is all that was added
    assert bundle_files("1.11.85", current) == {"app.js": b"// app 1.11.85\n", "chunk-7.js": b"// lazy 1.11.85\n"}
    assert (current / "app.js").read_text() == "console.log('1.11.85')\n"
    assert sorted(p.name for p in current.iterdir()) == ["aaa111", "app.js", "bbb222"]
    assert sorted(p.name for p in (up.site / "releases" / "1.11.84" / "bundles").iterdir()) == ["aaa111", "app.js"]

    # the next swap carries 1.11.85's bundles only: not 1.11.84's, which 1.11.85 carried
    publish(feed, rels["1.11.86"], rels["1.11.85"], rels["1.11.84"])
    up.ok()
    assert up.releases() == ["1.11.85", "1.11.86"]
    assert sorted(p.name for p in current.iterdir()) == ["app.js", "bbb222", "ccc333"]
    assert bundle_files("1.11.85", current) == {"app.js": b"// app 1.11.85\n", "chunk-7.js": b"// lazy 1.11.85\n"}

    # a rollback carries too: pages loaded from 1.11.86 keep working on 1.11.85
    newest = bundle_files("1.11.86", current)
    up.ok("--rollback")
    assert up.served() == "<html>Element 1.11.85</html>\n"
    assert bundle_files("1.11.86", current) == newest


def test_a_current_that_is_not_our_symlink_is_left_alone(updater, feed):
    (updater.site / "current").mkdir()
    (updater.site / "current" / "index.html").write_text("hand-made")
    publish(feed, release(feed, "1.11.85"))
    for args in ((), ("--rollback",)):
        res = updater.run(*args)
        assert res.returncode == 1 and "exists but is not a symlink" in res.stderr
    assert (updater.site / "current" / "index.html").read_text() == "hand-made"
    assert updater.leftovers() == [] and not any(p.endswith(".tar.gz") for p in feed.requests)


def test_leftovers_of_a_killed_run_are_removed(updater, feed):
    install(updater, feed, "1.11.84")
    (updater.site / ".tmp-Ab12Cd").mkdir()
    (updater.site / "releases" / ".1.11.85.partial").mkdir()
    (updater.site / "current.new").symlink_to("releases/1.11.85")
    publish(feed, release(feed, "1.11.85"))
    res = updater.ok()
    assert res.stdout.count("removing leftover") == 3
    assert updater.current() == "releases/1.11.85" and updater.leftovers() == []


# -- one run at a time --------------------------------------------------------------------------


class held_lock:
    """Hold the updater's lock as another element-update would (flock(2))."""

    def __init__(self, updater):
        self.path = updater.lock

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def __exit__(self, *exc):
        os.close(self.fd)


def test_a_held_lock_stops_a_second_run_untouched(updater, feed):
    install(updater, feed, "1.11.84")
    publish(feed, release(feed, "1.11.85"))
    before = updater.snapshot()
    feed.requests.clear()
    with held_lock(updater):
        for args in ((), ("--rollback",), ("--version", "1.11.85")):
            res = updater.run(*args)
            assert res.returncode == 75, res.stdout + res.stderr
            assert "another element-update is running" in res.stdout
    assert feed.requests == [] and updater.snapshot() == before
    updater.ok()  # free again
    assert updater.current() == "releases/1.11.85"


def test_two_runs_at_once_only_one_swaps(updater, feed):
    install(updater, feed, "1.11.84")
    publish(feed, release(feed, "1.11.85"))
    path = "/download/v1.11.85/element-v1.11.85.tar.gz"
    feed.gates[path], feed.reached[path] = threading.Event(), threading.Event()
    first = subprocess.Popen(["dash", str(updater.script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert feed.reached[path].wait(30), "the first run never asked for the tarball"
        second = updater.run()  # while the first holds the lock, mid-download
        assert second.returncode == 75 and "another element-update is running" in second.stdout
        assert updater.current() == "releases/1.11.84"
    finally:
        feed.gates[path].set()
        out, errors = first.communicate(timeout=60)
    assert first.returncode == 0, out + errors
    assert updater.current() == "releases/1.11.85"
    assert updater.history() == ["1.11.84", "1.11.85"] and updater.leftovers() == []


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupted_run_cleans_up_and_keeps_serving(updater, feed, signal_name):
    install(updater, feed, "1.11.84")
    publish(feed, release(feed, "1.11.85"))
    path = "/download/v1.11.85/element-v1.11.85.tar.gz"
    feed.gates[path], feed.reached[path] = threading.Event(), threading.Event()
    run = subprocess.Popen(["dash", str(updater.script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        assert feed.reached[path].wait(30), "the run never asked for the tarball"
        assert len(updater.leftovers()) == 1  # its .tmp-XXXXXX
        os.killpg(run.pid, getattr(signal, signal_name))  # Ctrl-C, or a stop, hits the whole group
        run.communicate(timeout=30)
    finally:
        feed.gates[path].set()
    assert run.returncode != 0
    with held_lock(updater):  # whatever the script started is gone: the lock is free
        assert updater.leftovers() == []
        assert updater.current() == "releases/1.11.84" and updater.releases() == ["1.11.84"]


# -- as the systemd unit runs it -----------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to drop every capability")
def test_runs_as_root_without_any_capability(tmp_path, feed):
    """CapabilityBoundingSet= (empty) and NoNewPrivileges=yes, as in the service
    unit: every step works on root's own files without a capability."""
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"]
    caps = subprocess.run([*drop, "grep", "^Cap[EPB]", "/proc/self/status"], capture_output=True, text=True,
                          check=True).stdout.split()
    assert caps[1::2] == ["0000000000000000"] * 3, caps  # CapPrm, CapEff, CapBnd
    up = Updater(tmp_path, feed.url(FEED_PATH), keep=2, ca=feed.ca, prefix=drop)
    hashes = {"1.11.84": "aaa111", "1.11.85": "bbb222", "1.11.86": "ccc333"}
    for version in hashes:  # unpack, carry bundles, swap, prune
        publish(feed, release(feed, version, hashed_release(version, hashes[version])))
        up.ok()
    assert up.releases() == ["1.11.85", "1.11.86"]
    assert up.ok("--rollback") and up.current() == "releases/1.11.85"
    assert (up.site / "current" / "bundles" / "ccc333" / "app.js").is_file()
    assert up.leftovers() == []
