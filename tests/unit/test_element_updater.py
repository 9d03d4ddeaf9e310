"""The host-side Element Web updater (fabfile/scripts/element-update.sh).

The static program is run as it ships, under dash, with a sites.json written as the
deploy writes it (fabfile.render.element_settings; ELEMENT_UPDATE_CONFIG points at
it), against a feed and tarballs served over HTTPS from 127.0.0.1 by a
ThreadingHTTPServer in this process (its self-signed certificate is the site's
feed-ca.pem; a plain-HTTP feed serves the refusal tests). Needs dash, curl, jq, gpg,
gpgv, flock, openssl (no Docker, loopback only).
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
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from fabfile.inventory import parse
from fabfile.render import _template, element_settings, render_host
from fabfile.shell import SCRIPTS

SCRIPT = SCRIPTS / "element-update.sh"
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


# -- the updater and its sites.json ------------------------------------------------------------


def run_script(*args, config: Path | None = None, script: Path = SCRIPT, prefix=(), timeout=30, cwd=None):
    """The updater under dash; `config` is its ELEMENT_UPDATE_CONFIG (none: its default)."""
    env = {k: v for k, v in os.environ.items() if k != "ELEMENT_UPDATE_CONFIG"}
    if config is not None:
        env["ELEMENT_UPDATE_CONFIG"] = str(config)
    return subprocess.run([*prefix, "dash", str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env={**env, "LC_ALL": "C"}, cwd=cwd)


class Updater:
    """The shipped updater for one site, with a sites.json beside the site as the
    deploy writes it; `ca` becomes the site's feed-ca.pem, `prefix` is a command the
    script runs under (e.g. setpriv), `limits` go to sites.json (e.g. unpacked_max_bytes)."""

    def __init__(self, root: Path, feed_url: str, version="latest", keep=3, ca: Path | None = None,
                 prefix=(), **limits):
        self.root = root
        self.proxy = root / "opt" / "matrix" / "reverse_proxy"
        self.site = self.proxy / "element" / HOST
        self.site.mkdir(parents=True)
        (self.site / "config.json").write_text('{"brand": "Element"}\n')
        if ca is not None:
            shutil.copy(ca, self.site / "feed-ca.pem")
        self.lock = root / "lock" / "synapse-fabric-element.lock"
        self.config = self.proxy / "element" / "sites.json"
        self.script = SCRIPT
        self.prefix = list(prefix)
        self.limits = limits
        self.configure(feed_url, version, keep)

    def configure(self, feed_url, version="latest", keep=3):
        sites = [SimpleNamespace(hostname=HOST, version=version, keep=keep, feed=feed_url)]
        self.config.write_bytes(element_settings(sites, lock_file=str(self.lock), **self.limits))

    def run(self, *args, timeout=60):
        return run_script(*args, config=self.config, prefix=self.prefix, timeout=timeout)

    def start(self, **options) -> subprocess.Popen:
        """A run in the background (no arguments), with SIGINT and SIGQUIT at their
        defaults as on a terminal or under systemd: a test suite started as an
        asynchronous command of a shell without job control inherits them ignored,
        and a shell cannot trap a signal ignored when it started."""
        def default_signals():
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        return subprocess.Popen(["dash", str(self.script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "LC_ALL": "C", "ELEMENT_UPDATE_CONFIG": str(self.config)},
                                preexec_fn=default_signals, **options)

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


# -- what the deploy ships -------------------------------------------------------------------

INV = textwrap.dedent("""
    hosts:
      web: {address: 203.0.113.10}
    homeservers:
      one.example:
        host: web
        element: {enabled: true, hostname: chat.one.example, version: "1.11.85", keep: 2}
      two.example:
        host: web
        element: {enabled: true, hostname: chat.two.example}
      three.example:
        host: web
""")


def test_the_deploy_ships_the_static_program_and_its_settings_as_data():
    state = render_host(parse(INV), "web")
    files = {f.path: f for f in state.files}
    program = files["/opt/matrix/reverse_proxy/bin/element-update"]
    assert program.content == SCRIPT.read_bytes() and program.mode == 0o755 and program.owner == "0:0"
    assert program.content.startswith(b"#!/bin/sh\n# Managed by synapse-fabric") and b"{{" not in program.content
    settings = files["/opt/matrix/reverse_proxy/element/sites.json"]
    assert settings.mode == 0o644 and settings.trigger == "" and settings.content.endswith(b"}\n")
    feed = "https://api.github.com/repos/element-hq/element-web/releases"
    assert json.loads(settings.content) == {
        "lock_file": "/run/synapse-fabric/element.lock",
        "unpacked_max_bytes": 1_000_000_000,
        "sites": [{"feed": feed, "hostname": "chat.one.example", "keep": 2, "version": "1.11.85"},
                  {"feed": feed, "hostname": "chat.two.example", "keep": 3, "version": "latest"}],
    }
    assert settings.content == (json.dumps(json.loads(settings.content), indent=2, sort_keys=True) + "\n").encode()
    # the periodic job runs the installed program, as before
    for path in ("/etc/systemd/system/synapse-fabric-element.service",
                 "/etc/systemd/system/synapse-fabric-element.timer", "/etc/cron.d/synapse-fabric-element"):
        assert path in files
    assert b"/opt/matrix/reverse_proxy/bin/element-update --unattended" in files[
        "/etc/systemd/system/synapse-fabric-element.service"].content
    # no Element site on a host: neither the program nor its settings
    off = render_host(parse(INV.replace("enabled: true", "enabled: false")), "web")
    assert not any("element-update" in f.path or f.path.endswith("sites.json") for f in off.files)


def settings(tmp_path: Path, sites=(), **top) -> Path:
    """A sites.json under tmp_path/element: `sites` are dicts, `top` replaces top-level values."""
    doc = {"lock_file": str(tmp_path / "lock" / "element.lock"), "unpacked_max_bytes": 1000, "sites": list(sites),
           **top}
    path = tmp_path / "element" / "sites.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def site(**values):
    return {"hostname": HOST, "version": "1.11.85", "keep": 3, "feed": "https://127.0.0.1:1/releases", **values}


def test_usage_errors_and_help(tmp_path):
    config = settings(tmp_path, [site(), site(hostname="chat.two.test")])
    res = run_script("--site", "nope.test", config=config)
    assert res.returncode == 64
    assert "no Element site 'nope.test' on this host (sites: chat.test chat.two.test)" in res.stderr
    for name in ("chat.*", "chat.test chat.two.test", "chat"):  # one name, not a pattern nor a list
        res = run_script("--site", name, config=config)
        assert res.returncode == 64 and f"no Element site '{name}'" in res.stderr
    assert run_script("--check", "--rollback", config=config).returncode == 64
    res = run_script("--version", "1.2; rm -rf /", config=config)
    assert res.returncode == 64 and "is not a version" in res.stderr
    assert run_script("--help").returncode == 0  # no sites.json needed
    assert not (tmp_path / "element" / HOST).exists() and not (tmp_path / "lock").exists()


def test_no_sites_is_fine(tmp_path):
    config = tmp_path / "sites.json"
    config.write_bytes(element_settings([], lock_file=str(tmp_path / "l")))
    res = run_script(config=config)
    assert res.returncode == 0 and "no Element site" in res.stdout


def test_finds_its_sites_json_beside_its_install(tmp_path):
    """<proxy_dir>/bin/element-update reads <proxy_dir>/element/sites.json, also when
    started through a symlink (and under sh, as systemd and cron start it)."""
    proxy = tmp_path / "opt" / "matrix" / "reverse_proxy"
    (proxy / "bin").mkdir(parents=True)
    program = proxy / "bin" / "element-update"
    shutil.copy(SCRIPT, program)
    program.chmod(0o755)
    (tmp_path / "usr").mkdir()
    (tmp_path / "usr" / "element-update").symlink_to(program)
    res = run_script(script=program)
    assert res.returncode == 78 and f"{proxy}/element/sites.json: missing" in res.stderr
    settings(proxy, [])
    for path in (program, tmp_path / "usr" / "element-update"):
        res = subprocess.run([str(path)], capture_output=True, text=True, timeout=30,
                             env={k: v for k, v in os.environ.items() if k != "ELEMENT_UPDATE_CONFIG"})
        assert res.returncode == 0 and "no Element site on this host" in res.stdout, res.stderr


MARK = "eu-pwned"
HOSTILE = {
    # each value is refused by the program's own checks, before any work
    "hostname": (dict(hostname=f"chat.test;touch {MARK}"), "hostname 'chat.test;touch eu-pwned' is not a DNS name"),
    "hostname-up": (dict(hostname="../../etc"), "hostname '../../etc' is not a DNS name"),
    "version": (dict(version=f"$(touch {MARK})"), "chat.test: version '$(touch eu-pwned)' is not like 1.11.85"),
    "keep": (dict(keep=f"3; touch {MARK}"), "chat.test: keep '3; touch eu-pwned' is not a whole number above 0"),
    "keep-zero": (dict(keep=0), "chat.test: keep '0' is not a whole number above 0"),
    "keep-null": (dict(keep=None), "chat.test: keep 'null' is not a whole number above 0"),
    "feed-http": (dict(feed="http://127.0.0.1:1/releases"),
                  "chat.test: feed 'http://127.0.0.1:1/releases' is not an https:// URL"),
    "feed-space": (dict(feed=f"https://x.test/ `touch {MARK}`"), "is not an https:// URL; refusing it"),
    "feed-missing": (dict(feed=None), "chat.test: feed 'null' is not an https:// URL"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_settings_are_checked_data_never_code(tmp_path, case):
    values, reason = HOSTILE[case]
    config = settings(tmp_path, [site(**values)])
    res = run_script(config=config, cwd=tmp_path)
    assert res.returncode == 78, res.stdout + res.stderr
    assert f"ERROR: {config}: " in res.stderr and reason in res.stderr, res.stderr
    assert res.stderr.count("ERROR") == 1 and res.stdout == ""
    assert not (tmp_path / MARK).exists() and sorted(p.name for p in (tmp_path / "element").iterdir()) == ["sites.json"]
    assert not (tmp_path / "lock").exists()


def test_a_feed_url_is_only_ever_an_argument(tmp_path):
    """A feed that passes the checks but holds shell syntax reaches curl as it is."""
    config = settings(tmp_path, [site(feed=f"https://127.0.0.1:1/$(touch%20{MARK})`touch%20{MARK}`;touch%20{MARK}")])
    res = run_script("--check", config=config, cwd=tmp_path)
    assert res.returncode == 1 and "cannot read the release feed https://127.0.0.1:1/$(touch" in res.stderr
    assert not (tmp_path / MARK).exists()


BROKEN = {
    "missing": (None, "missing (the deploy writes it: run inv deploy)"),
    "not-json": ("{sites: nope", "not a JSON object with a list of sites"),
    "a-list": ("[]", "not a JSON object with a list of sites"),
    "no-sites": ('{"lock_file": "/run/x.lock", "unpacked_max_bytes": 1}', "not a JSON object with a list of sites"),
    "site-not-object": ('{"lock_file": "/run/x.lock", "unpacked_max_bytes": 1, "sites": ["chat.test"]}',
                        "not a JSON object with a list of sites"),
    "twice": (dict(sites=[site(), site()]), "each hostname once"),
    "newline": (dict(sites=[site(version="1.11.85\n")]), "no control characters"),
    "newline-hostname": (dict(sites=[site(hostname="a.test\nb.test")]), "no control characters"),
    "lock-relative": (dict(lock_file="element.lock"), "lock_file 'element.lock' is not an absolute path"),
    "lock-missing": (dict(lock_file=None), "lock_file 'null' is not an absolute path"),
    "cap-float": (dict(unpacked_max_bytes=1.5), "unpacked_max_bytes '1.5' is not a whole number above 0"),
    "cap-string": (dict(unpacked_max_bytes="1e9"), "unpacked_max_bytes '1e9' is not a whole number above 0"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_or_missing_sites_json_is_one_clear_error(tmp_path, case):
    doc, reason = BROKEN[case]
    config = tmp_path / "element" / "sites.json"
    if isinstance(doc, dict):
        settings(tmp_path, **{"sites": [site()], **doc})
    elif isinstance(doc, str):
        config.parent.mkdir(parents=True)
        config.write_text(doc)
    for args in ((), ("--check",), ("--rollback",), ("--site", HOST)):
        res = run_script(*args, config=config)
        assert res.returncode == 78, res.stdout + res.stderr
        assert f"ERROR: {config}: " in res.stderr and reason in res.stderr, res.stderr
        assert res.stderr.count("ERROR") == 1 and res.stdout == ""
    assert not (tmp_path / "element" / HOST).exists() and not (tmp_path / "lock").exists()


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


def test_each_site_on_its_own(updater, feed):
    """Sites run one after the other: one that fails does not stop the next;
    --site runs only that one."""
    other = updater.proxy / "element" / "chat.two.test"
    other.mkdir()
    shutil.copy(feed.ca, other / "feed-ca.pem")
    sites = [SimpleNamespace(hostname="chat.two.test", version="latest", keep=3, feed=feed.url("/missing")),
             SimpleNamespace(hostname=HOST, version="latest", keep=3, feed=feed.url(FEED_PATH))]
    updater.config.write_bytes(element_settings(sites, lock_file=str(updater.lock)))
    publish(feed, release(feed, "1.11.84"))
    res = updater.run()
    assert res.returncode == 1 and "chat.two.test: ERROR: cannot read the release feed" in res.stderr
    assert updater.current() == "releases/1.11.84" and not (other / "current").exists()
    publish(feed, release(feed, "1.11.85"), release(feed, "1.11.84"))
    res = updater.ok("--site", HOST)
    assert "chat.two.test" not in res.stdout + res.stderr and updater.current() == "releases/1.11.85"
    assert updater.run("--site", "chat.two.test").returncode == 1 and updater.current() == "releases/1.11.85"


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
REFUSED = "refusing element-v1.11.85.tar.gz: "
TAR = REFUSED + "tar failed or warned (above): not a clean, readable .tar.gz"
LEAVES = REFUSED + "symlink leaving the release: "
# case -> (members added to a good release, what stderr must say: each string, or one of a tuple)
BAD_ARCHIVES = {
    # names: GNU tar skips a ".." member and fails, strips a leading "/" and warns
    "dotdot": ([(f"{TOP}/../escape", b"x", {})], ["Member name contains '..'", TAR]),
    "dotdot-top": ([("../escape", b"x", {})], ["Member name contains '..'", TAR]),
    "absolute": ([("/tmp/eu-absolute-escape", b"x", {})], ["Removing leading `/' from member names", TAR]),
    "outside-top": ([("other/file", b"x", {})], [REFUSED + "members outside element-v1.11.85/: other"]),
    # symlinks: resolved where they landed, they must stay inside the release
    "symlink-up": ([(f"{TOP}/bundles/up", b"", _sym("../../../../etc"))], [LEAVES + "bundles/up -> ../../../../etc"]),
    "symlink-absolute": ([(f"{TOP}/passwd", b"", _sym("/etc/passwd"))], [LEAVES + "passwd -> /etc/passwd"]),
    "symlink-via-symlink": ([(f"{TOP}/here", b"", _sym(".")), (f"{TOP}/up", b"", _sym("here/.."))],
                            [LEAVES + "up -> here/.."]),
    "symlink-chain": ([(f"{TOP}/a", b"", _sym("b")), (f"{TOP}/b", b"", _sym("c/..")), (f"{TOP}/c", b"", _sym("."))],
                      [LEAVES]),
    # tar creates such a link last: the member below it fails, nothing is written outside
    "write-through-escaping-symlink": ([], ["Cannot open: Not a directory", TAR]),  # built below
    # hard links: tar resolves their targets inside the extraction directory only
    "hardlink-absolute": ([(f"{TOP}/shadow", b"", _hard("/etc/shadow"))],
                          ["Removing leading `/' from hard link targets", "Cannot hard link to", TAR]),
    "hardlink-up": ([(f"{TOP}/shadow", b"", _hard(f"{TOP}/../../shadow"))], ["Cannot hard link to", TAR]),
    "hardlink-through-symlink": ([(f"{TOP}/etc", b"", _sym("/etc")),
                                  (f"{TOP}/passwd", b"", _hard(f"{TOP}/etc/passwd"))], ["Cannot hard link to", TAR]),
    "hardlink-to-escaping-symlink": ([(f"{TOP}/esc", b"", _sym("/etc/passwd")), (f"{TOP}/h", b"", _hard(f"{TOP}/esc"))],
                                     [LEAVES]),
    # nothing but files, directories and symlinks
    "fifo": ([(f"{TOP}/fifo", b"", {"type": tarfile.FIFOTYPE})],
             [REFUSED + "special file (device, fifo, socket): fifo"]),
    # made by root with CAP_MKNOD, else tar fails to make it
    "device": ([(f"{TOP}/null", b"", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3})],
               [(REFUSED + "special file (device, fifo, socket): null", "Cannot mknod")]),
    "top-is-symlink": ([], [REFUSED + "element-v1.11.85/ is missing or not a directory"]),  # built below
    "empty": ([], [REFUSED + "element-v1.11.85/ is missing or not a directory"]),  # built below
}


def _bad_tarball(case, outside: Path):
    if case in ("top-is-symlink", "empty"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            if case == "top-is-symlink":
                _add(tar, TOP, type=tarfile.SYMTYPE, linkname="/")
        return buf.getvalue(), BAD_ARCHIVES[case][1]
    if case == "write-through-escaping-symlink":
        return tarball("1.11.85", [(f"{TOP}/out", b"", _sym(str(outside))),
                                   (f"{TOP}/out/x", b"x", {})]), BAD_ARCHIVES[case][1]
    extra, reason = BAD_ARCHIVES[case]
    return tarball("1.11.85", extra), reason


FAILURES = {
    "bad-checksum": (dict(checksum="wrong"), "checksum mismatch"),
    "corrupted-download": (dict(served=b"\x1f\x8b truncated"), "checksum mismatch"),
    "corrupted-tarball": (dict(body=b"\x1f\x8b\x08\x00 this is not gzip at all"), ["gzip: stdin: ", TAR]),
    "missing-checksum": (dict(checksum="none"), "has no checksum"),
    "no-index": (dict(body=tarball("1.11.85", index=False)), "has no index.html"),
    "index-is-a-symlink": (dict(body=tarball("1.11.85", [(f"{TOP}/index.html", b"", _sym("bundles/app.js"))],
                                             index=False)), "has no index.html"),
}


def said(text: str, reason) -> bool:
    """`reason`: a string `text` holds, or a list of them (each a string, or a tuple: one of it)."""
    if isinstance(reason, str):
        return reason in text
    return all(any(r in text for r in (each if isinstance(each, tuple) else (each,))) for each in reason)


def assert_untouched(updater, res, reason, before_history=("1.11.84",)):
    assert res.returncode != 0, res.stdout
    assert said(res.stderr, reason), res.stderr
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
def test_unsafe_archives_are_refused_nothing_served_changes_nothing_left_behind(updater, feed, tmp_path, case):
    install(updater, feed, "1.11.84")
    outside = tmp_path / "outside"
    outside.mkdir()
    body, reason = _bad_tarball(case, outside)
    publish(feed, release(feed, "1.11.85", body), release(feed, "1.11.84"))
    res = updater.run()
    assert_untouched(updater, res, reason)
    assert REFUSED in res.stderr
    # the quarantine is gone with the rest of the run's temporary directory
    assert sorted(p.name for p in updater.site.iterdir()) == ["config.json", "current", "feed-ca.pem", "history",
                                                               "releases"]
    # nothing landed outside either
    assert list(outside.iterdir()) == []
    assert not (updater.site / "escape").exists() and not (updater.proxy / "element" / "escape").exists()
    assert not Path("/tmp/eu-absolute-escape").exists()


def test_oddities_that_stay_inside_the_release_are_unpacked_there(updater, feed):
    """What the listing check of earlier versions refused, but GNU tar keeps inside the
    quarantine: a ./ prefix (the same directory), and members written through a symlink
    tar made at once (relative, no ".."): such a link can only point further in."""
    extra = [(f"./{TOP}/dot.js", b"dot\n", {}),
             (f"{TOP}/here", b"", _sym(".")), (f"{TOP}/here/through.js", b"through\n", {}),
             (f"{TOP}/sub", b"", {"type": tarfile.DIRTYPE, "mode": 0o755}), (f"{TOP}/down", b"", _sym("sub")),
             (f"{TOP}/down/deep.js", b"deep\n", {})]
    publish(feed, release(feed, "1.11.85", tarball("1.11.85", extra)))
    updater.ok()
    rel = updater.site / "releases" / "1.11.85"
    assert (rel / "dot.js").read_bytes() == b"dot\n"
    assert os.readlink(rel / "here") == "." and (rel / "through.js").read_bytes() == b"through\n"
    assert os.readlink(rel / "down") == "sub" and (rel / "sub" / "deep.js").read_bytes() == b"deep\n"
    assert sorted(p.name for p in updater.site.iterdir()) == ["config.json", "current", "feed-ca.pem", "history",
                                                               "releases"]
    assert updater.releases() == ["1.11.85"]


def test_unpacked_files_are_ours_readable_and_never_setuid(updater, feed):
    extra = [(f"{TOP}/setuid", b"x", {"mode": 0o6755, "uid": 4242, "gid": 4242}),
             (f"{TOP}/private.js", b"x", {"mode": 0o600}),
             (f"{TOP}/locked", b"", {"type": tarfile.DIRTYPE, "mode": 0o500}),
             (f"{TOP}/locked/f.js", b"x", {"mode": 0o400}),
             # built by a clock ahead of ours: tar's warning about it refuses nothing
             (f"{TOP}/future.js", b"x", {"mtime": int(time.time()) + 30 * 86400})]
    publish(feed, release(feed, "1.11.85", tarball("1.11.85", extra)))
    updater.ok()
    rel = updater.site / "releases" / "1.11.85"
    modes = {name: oct((rel / name).lstat().st_mode & 0o7777) for name in ("setuid", "private.js", "locked",
                                                                            "locked/f.js", "future.js")}
    assert modes == {"setuid": "0o755", "private.js": "0o644", "locked": "0o755", "locked/f.js": "0o644",
                     "future.js": "0o644"}
    assert (rel / "setuid").stat().st_uid == os.getuid()


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
        updater.configure(http_feed.url(FEED_PATH))
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
    """The cap counts the real tar stream, before a byte is written."""
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
    first = updater.start()
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
    run = updater.start(start_new_session=True)
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


# CI runs as root with setpriv (util-linux): there it must run, never skip
@pytest.mark.skipif(os.environ.get("CI", "").lower() not in ("1", "true", "yes")
                    and (os.geteuid() != 0 or shutil.which("setpriv") is None),
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
    # a directory root may not write to (without CAP_DAC_OVERRIDE, only its modes let root
    # write there), in a release installed by `inv element-update` (root with every capability)
    locked = [("locked", b"", {"type": tarfile.DIRTYPE, "mode": 0o500}), ("locked/f.js", b"x", {"mode": 0o400})]
    for version in hashes:  # unpack, carry bundles, swap, prune
        body = hashed_release(version, hashes[version])
        if version == "1.11.84":
            body = tarball(version, [(f"element-v{version}/{name}", data, attrs) for name, data, attrs in locked])
        publish(feed, release(feed, version, body))
        up.prefix = [] if version == "1.11.84" else drop
        up.ok()
    assert up.releases() == ["1.11.85", "1.11.86"]
    assert up.ok("--rollback") and up.current() == "releases/1.11.85"
    assert (up.site / "current" / "bundles" / "ccc333" / "app.js").is_file()
    assert up.leftovers() == []
    # a refused archive leaves nothing behind either, locked directories and all
    bad = tarball("1.11.87", [(f"element-v1.11.87/{name}", data, attrs) for name, data, attrs in locked]
                  + [("element-v1.11.87/../escape", b"x", {})])
    publish(feed, release(feed, "1.11.87", bad))
    res = up.run("--version", "1.11.87")
    assert res.returncode == 1 and "Member name contains '..'" in res.stderr
    assert up.current() == "releases/1.11.85" and up.leftovers() == []
