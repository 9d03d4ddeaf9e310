"""The sandbox's Element Web release feed (no GitHub here).

`publish(version)` writes a small but real-shaped release into state/releases/:
`element-v<version>.tar.gz` (index.html, a config sample, a JS bundle), its
detached OpenPGP signature `.asc`, and adds it to `element-web/releases`, a JSON
list shaped like GitHub's releases API (newest first, with each asset's
`sha256:` digest). The container sfab-releases (nginx, at releases.test) serves
that folder over HTTPS with a certificate from the sandbox CA.

The signing key is the sandbox's own (state/gnupg); its public keyring is
state/element-signing-key.gpg, which hosts.yaml pins.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

STATE = Path(__file__).resolve().parent / "state"
ROOT = STATE / "releases"
FEED = ROOT / "element-web" / "releases"
GNUPG = STATE / "gnupg"
KEYRING = STATE / "element-signing-key.gpg"
BASE_URL = "https://releases.test"
DEFAULT_VERSIONS = ("1.11.0", "1.11.1")


def _gpg(*args: str, input: bytes | None = None) -> bytes:
    env = {**os.environ, "GNUPGHOME": str(GNUPG)}
    res = subprocess.run(["gpg", "--batch", "--quiet", "--pinentry-mode", "loopback", "--passphrase", "", *args],
                         input=input, capture_output=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"gpg {' '.join(args)} failed: {res.stderr.decode(errors='replace')}")
    return res.stdout


def ensure_key() -> None:
    """The sandbox release signing key (made once) and its binary public keyring."""
    if not (GNUPG / "pubring.kbx").exists():
        GNUPG.mkdir(parents=True, exist_ok=True)
        os.chmod(GNUPG, 0o700)
        _gpg("--quick-gen-key", "synapse-fabric sandbox releases <releases@releases.test>", "ed25519", "sign", "never")
    KEYRING.write_bytes(_gpg("--export"))


def release_tarball(version: str, mutate=None) -> bytes:
    """A fake Element Web release: the same layout as the real tarballs."""
    top = f"element-v{version}"
    files = {
        "index.html": f"<!doctype html><title>Element</title><p id=version>Element {version}</p>"
                      f"<script src=\"bundles/{version}/app.js\"></script>\n".encode(),
        "config.sample.json": b'{"default_server_config": {}}\n',
        f"bundles/{version}/app.js": (f"// Element {version}\n" + "x" * 40000 + "\n").encode(),
        "version": f"{version}\n".encode(),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for dirname in (top, f"{top}/bundles", f"{top}/bundles/{version}"):
            info = tarfile.TarInfo(dirname)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
        if mutate:
            mutate(tar, top)
    return buf.getvalue()


def _feed() -> list:
    return json.loads(FEED.read_text()) if FEED.exists() else []


def publish(version: str, tarball: bytes | None = None, digest: str | None = None,
            sign: bool = True, signature: bytes | None = None) -> None:
    """Add (or replace) a release at the head of the feed. `digest`/`signature`
    let tests publish a release whose checksum or signature is wrong."""
    ensure_key()
    data = tarball if tarball is not None else release_tarball(version)
    name = f"element-v{version}.tar.gz"
    (ROOT / "dl").mkdir(parents=True, exist_ok=True)
    (ROOT / "dl" / name).write_bytes(data)
    assets = [{"name": name, "browser_download_url": f"{BASE_URL}/dl/{name}", "size": len(data),
               "digest": digest or f"sha256:{hashlib.sha256(data).hexdigest()}"}]
    if sign:
        asc = signature if signature is not None else _gpg("--armor", "--detach-sign", input=data)
        (ROOT / "dl" / f"{name}.asc").write_bytes(asc)
        assets.append({"name": f"{name}.asc", "browser_download_url": f"{BASE_URL}/dl/{name}.asc",
                       "size": len(asc), "digest": f"sha256:{hashlib.sha256(asc).hexdigest()}"})
    feed = [r for r in _feed() if r["tag_name"] != f"v{version}"]
    feed.insert(0, {"tag_name": f"v{version}", "name": version, "draft": False, "prerelease": False,
                    "assets": assets})
    FEED.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=FEED.parent, delete=False) as fh:
        json.dump(feed, fh, indent=1)
    os.chmod(fh.name, 0o644)
    os.replace(fh.name, FEED)


def withdraw(version: str) -> None:
    feed = [r for r in _feed() if r["tag_name"] != f"v{version}"]
    FEED.write_text(json.dumps(feed, indent=1))


def ensure_defaults() -> None:
    """The releases the example inventory expects (its pinned 1.11.0, and one newer)."""
    have = {r["tag_name"] for r in _feed()}
    for version in DEFAULT_VERSIONS:
        if f"v{version}" not in have:
            publish(version)
    # the feed lists newest first
    feed = sorted(_feed(), key=lambda r: [int(x) for x in r["tag_name"][1:].split(".")], reverse=True)
    FEED.write_text(json.dumps(feed, indent=1))
