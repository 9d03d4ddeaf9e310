"""Element Web on the sandbox: served by the proxy, updated from the sandbox's
release feed (tests/sandbox/releases.py) by `inv element-update` and by its timer."""

from __future__ import annotations

import io
import json
import re
import tarfile
import time

import pytest

from tests.e2e.helpers import ROOTS, https_get, on_host, run, variant
from tests.sandbox import releases
from tests.sandbox.probe import Prober

pytestmark = pytest.mark.e2e

SITE = "element.one.test"
SITE_DIR = f"/opt/matrix/reverse_proxy/element/{SITE}"


def get(path: str) -> tuple[int, dict, bytes]:
    return https_get(SITE, path)


def served_version() -> str:
    status, _, body = get("/")
    assert status == 200
    return re.search(rb"Element ([0-9.]+)", body).group(1).decode()


def update(*flags: str):
    return run(["inv", "element-update", *flags])


def test_fresh_deploy_serves_the_pinned_version_and_its_config(deployed):
    assert served_version() == "1.11.0"
    status, headers, body = get("/config.json")
    assert status == 200
    cfg = json.loads(body)
    assert cfg["default_server_config"]["m.homeserver"] == {"base_url": "https://matrix.one.test",
                                                            "server_name": "one.test"}
    _, headers, _ = get("/")
    assert headers.get("x-frame-options") == "SAMEORIGIN"
    assert headers.get("x-content-type-options") == "nosniff"
    assert "frame-ancestors 'self'" in headers.get("content-security-policy", "")
    # vps1 runs systemd: the hourly update is a timer, not a cron file
    assert "element-update --unattended" in on_host("vps1", "systemctl cat synapse-fabric-element.service")
    assert on_host("vps1", "systemctl is-active synapse-fabric-element.timer; ls /etc/cron.d 2>/dev/null | wc -l"
                   ).split() == ["active", "0"]


class PageProber(Prober):
    """Loads the page, then the script it references, as a browser would."""

    def __init__(self):
        super().__init__(ROOTS, name=SITE, limit_s=300)
        self.errors: list[str] = []

    def _once(self) -> bool:
        try:
            status, _, body = get("/")
            script = re.search(rb'src="([^"]+)"', body).group(1).decode()
            s2, _, js = get("/" + script)
            if status == 200 and s2 == 200 and js.startswith(b"// Element"):
                return True
            self.errors.append(f"{status} {s2} {script}")
        except Exception as exc:  # any failure counts
            self.errors.append(repr(exc))
        return False


def test_update_moves_to_the_newest_with_no_failed_request(deployed):
    releases.publish("1.12.0")
    with PageProber() as prober:
        time.sleep(1)
        res = update()
        time.sleep(1)
    assert res.returncode == 0, res.stdout + res.stderr
    assert served_version() == "1.12.0"
    print(f"prober: {prober.ok} page loads ok, {prober.failed} failed")
    assert prober.ok > 5 and prober.failed == 0, prober.errors[:5]


def _evil_tarball(version: str) -> bytes:
    def escape(tar, top):
        data = b"pwned"
        info = tarfile.TarInfo(f"{top}/../../escape.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return releases.release_tarball(version, mutate=escape)


@pytest.mark.parametrize("case", ["corrupted", "bad-checksum", "bad-signature", "escape"])
def test_bad_releases_leave_the_old_version_serving(deployed, case):
    version = "1.13.0"
    good = releases.release_tarball(version)
    if case == "corrupted":
        junk = b"\x1f\x8b" + bytes(range(256)) * 8
        releases.publish(version, tarball=junk)
    elif case == "bad-checksum":
        releases.publish(version, digest="sha256:" + "0" * 64)
    elif case == "bad-signature":
        releases.publish(version, tarball=good, signature=releases._gpg("--armor", "--detach-sign", input=b"other"))
    else:
        releases.publish(version, tarball=_evil_tarball(version))
    try:
        before = served_version()
        res = update()
        assert res.returncode != 0
        reason = {"corrupted": "tar", "bad-checksum": "checksum", "bad-signature": "signature",
                  "escape": ".."}[case]
        assert reason in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
        assert served_version() == before
        assert on_host("vps1", "find / -xdev -name escape.txt 2>/dev/null | head -1").strip() == ""
        assert on_host("vps1", f"ls -a {SITE_DIR} | grep -c '^.tmp-' || true").strip() == "0"
    finally:
        releases.withdraw(version)


def test_rollback_and_only_n_versions_kept(deployed):
    for v in ("1.12.1", "1.12.2"):
        releases.publish(v)
        assert update().returncode == 0
    assert served_version() == "1.12.2"
    res = update("--rollback")
    assert res.returncode == 0, res.stdout + res.stderr
    assert served_version() == "1.12.1"
    kept = on_host("vps1", f"ls {SITE_DIR}/releases").split()
    assert len(kept) <= 3, kept  # element.keep defaults to 3


def test_timer_runs_unattended_and_two_at_once_swap_once(deployed):
    # an auto-updating site (version: latest) for this test
    def latest(doc):
        doc["homeservers"]["one.test"]["element"]["version"] = "latest"
    inv = variant("element-latest", latest)
    try:
        assert run(["inv", "deploy", "--host", "vps1"], inv).returncode == 0
        releases.publish("1.14.0")
        command = on_host("vps1", "sed -n 's/^ExecStart=//p' /etc/systemd/system/synapse-fabric-element.service").strip()
        assert command.endswith("element-update --unattended")
        # the timer's service (as systemd starts it: no terminal, its own environment)
        # and a second run at the same moment
        both = on_host("vps1", "since=$(date '+%Y-%m-%d %H:%M:%S'); "
                               "systemctl start synapse-fabric-element.service & "
                               f"env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin sh -c '{command}' > /tmp/el2 2>&1 & "
                               "wait; journalctl -u synapse-fabric-element.service --since \"$since\" -o cat; "
                               "echo ====; cat /tmp/el2")
        print(both)
        assert both.count("now serving 1.14.0") == 1  # one swap, whichever ran first
        assert "another element-update is running" in both or both.count("already at 1.14.0") == 1
        assert served_version() == "1.14.0"
    finally:
        assert run(["inv", "deploy", "--host", "vps1"]).returncode == 0
    # the pin is back: deploy installed 1.11.0 again
    assert served_version() == "1.11.0"


def test_element_turned_off_stops_its_timer_and_updater(deployed):
    def off(doc):
        doc["homeservers"]["one.test"]["element"]["enabled"] = False
    gone = ("/etc/systemd/system/synapse-fabric-element.timer /etc/systemd/system/synapse-fabric-element.service "
            "/opt/matrix/reverse_proxy/bin/element-update")
    try:
        res = run(["inv", "deploy", "--host", "vps1"], variant("element-off", off))
        assert res.returncode == 0, res.stdout + res.stderr
        assert on_host("vps1", f"ls {gone} 2>/dev/null | wc -l").strip() == "0"
        assert on_host("vps1", "systemctl is-active synapse-fabric-element.timer || true").strip() != "active"
        # the renewal timer of the other feature still runs
        assert on_host("vps1", "systemctl is-active synapse-fabric-certificates.timer").strip() == "active"
    finally:
        assert run(["inv", "deploy", "--host", "vps1"]).returncode == 0
    assert on_host("vps1", "systemctl is-active synapse-fabric-element.timer").strip() == "active"
    assert served_version() == "1.11.0"
