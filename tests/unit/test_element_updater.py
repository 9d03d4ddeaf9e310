"""The host-side Element Web updater (templates/reverse_proxy/bin/element-update.j2).

The template is rendered as the deploy renders it, then run under dash against a
feed and tarballs served from 127.0.0.1 by a ThreadingHTTPServer in this process.
Needs dash, curl, jq, gpg, gpgv, flock, openssl (no Docker, loopback only).
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
    """Serves `routes` (path -> bytes) on 127.0.0.1, over HTTP or HTTPS."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.routes: dict[str, bytes] = {}
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
                body = feed.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client was killed
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
        self.requests.clear()
        self.gates.clear()
        self.reached.clear()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def http_feed():
    feed = Feed()
    yield feed
    feed.close()


@pytest.fixture()
def feed(http_feed):
    http_feed.reset()
    yield http_feed
    for gate in http_feed.gates.values():
        gate.set()


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
    def __init__(self, root: Path, feed_url: str, version="latest", keep=3):
        self.root = root
        self.proxy = root / "opt" / "matrix" / "reverse_proxy"
        self.site = self.proxy / "element" / HOST
        self.site.mkdir(parents=True)
        (self.site / "config.json").write_text('{"brand": "Element"}\n')
        self.lock = root / "lock" / "synapse-fabric-element.lock"
        self.script = self.proxy / "bin" / "element-update"
        self.render(feed_url, version, keep)

    def render(self, feed_url, version="latest", keep=3):
        sites = [SimpleNamespace(hostname=HOST, version=version, keep=keep, feed=feed_url)]
        self.script.parent.mkdir(parents=True, exist_ok=True)
        self.script.write_bytes(_template(TEMPLATE, proxy_dir=str(self.proxy), sites=sites,
                                          lock_file=str(self.lock)))
        self.script.chmod(0o755)

    def run(self, *args, timeout=60):
        return subprocess.run(["dash", str(self.script), *args], capture_output=True, text=True,
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
    return Updater(tmp_path, feed.url(FEED_PATH))


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


def test_no_sites_is_fine(tmp_path):
    script = tmp_path / "element-update"
    script.write_bytes(_template(TEMPLATE, proxy_dir=str(tmp_path), sites=[], lock_file=str(tmp_path / "l")))
    res = subprocess.run(["dash", str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "no Element site" in res.stdout


# -- installing and updating -------------------------------------------------------------


def test_installs_the_pinned_version(tmp_path, feed):
    up = Updater(tmp_path, feed.url(FEED_PATH), version="1.11.84")
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
        feed.routes[f"/download/v1.11.85/element-v1.11.85.tar.gz.asc"] = keys.sign(b"other bytes", keys.good)
    publish(feed, rel, release(feed, "1.11.84"))
    assert_untouched(updater, updater.run(), reason)
    assert sorted(p.name for p in updater.site.iterdir()) == [
        "config.json", "current", "history", "releases", "signing-key.gpg"]


def test_a_good_signature_installs(updater, feed, keys):
    (updater.site / "signing-key.gpg").write_bytes(keys.keyring)
    publish(feed, release(feed, "1.11.85", sign="good", keys=keys))
    res = updater.ok()
    assert "signature of element-v1.11.85.tar.gz is good" in res.stdout
    assert updater.current() == "releases/1.11.85" and updater.leftovers() == []


def test_feed_ca_is_trusted_for_the_feed_and_downloads(tmp_path):
    ca = tmp_path / "pki"
    ca.mkdir()
    openssl = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
               "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
               "-keyout", str(ca / "key.pem"), "-out", str(ca / "cert.pem")]
    subprocess.run(openssl, check=True, capture_output=True, timeout=60)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(ca / "cert.pem", ca / "key.pem")
    feed = Feed(tls)
    try:
        up = Updater(tmp_path / "host", feed.url(FEED_PATH))
        publish(feed, release(feed, "1.11.85"))
        res = up.run()  # the system CAs do not know this one
        assert res.returncode == 1 and "cannot read the release feed" in res.stderr
        assert up.current() is None and up.leftovers() == []
        shutil.copy(ca / "cert.pem", up.site / "feed-ca.pem")
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
    up = Updater(tmp_path, feed.url(FEED_PATH), keep=keep)
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
