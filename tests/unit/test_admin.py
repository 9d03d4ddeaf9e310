"""The pure parts of the admin tasks: durations, dates, room names, refusals before SSH."""

from __future__ import annotations

import time

import pytest

from fabfile.admin import ADMIN, ROOM_RE, _before_ms, _seconds, call, format_users
from fabfile.errors import RemoteError, TaskError
from fabfile.inventory import parse
from fabfile.remote import Remote, Result
from fabfile.users import parse_user, user_exists


def test_durations():
    assert [_seconds(t) for t in ("90s", "30m", "12h", "7d")] == [90, 1800, 43200, 604800]
    for bad in ("", "5", "d", "0d", "-1d", "1w", "1.5h", "7 d"):
        with pytest.raises(TaskError, match="invalid duration"):
            _seconds(bad)


def test_before_is_a_duration_ago_or_a_date():
    assert abs(_before_ms("1d") - (time.time() - 86400) * 1000) < 5000
    assert _before_ms("2026-11-01") == 1793491200000  # UTC unless it says otherwise
    assert _before_ms("2026-11-01T01:00+01:00") == 1793491200000
    with pytest.raises(TaskError, match="invalid --before"):
        _before_ms("yesterday")


def test_room_names():
    for ok in ("!abc:one.test", "#lobby:one.test", "!x:[::1]:8448", "!YelWxtSWtS6UmtTTdD3Tq3E2QIimVhvb8DCMQ3VCn4M"):
        assert ROOM_RE.match(ok), ok
    for bad in ("abc:one.test", "!a b:one.test", "!a/../b:one.test", "#lobby", "#x:one.test/../admin", "!a?b"):
        assert not ROOM_RE.match(bad), bad


def test_users_are_listed_with_their_state_and_ours_is_marked():
    out = format_users([{"name": "@b:s", "admin": 0, "deactivated": 1}, {"name": f"@{ADMIN}:s", "admin": 1},
                        {"name": "@a:s", "admin": 1}], "s")
    width = len(f"@{ADMIN}:s")
    assert out.splitlines() == [
        f"{'@a:s':<{width}}  admin",
        f"{'@b:s':<{width}}         deactivated",
        f"@{ADMIN}:s  admin               (synapse-fabric's own)",
        "3 user(s) on s",
    ]


class _Flaky(Remote):
    """A host whose first command fails as `docker exec` does when the runtime cannot
    start the process in the container: exit 126, the daemon's reason on stdout. Only
    the channel is stood in for; `Remote.run` and `Remote.read` are the real ones."""

    def __init__(self, inv):
        super().__init__(inv, inv.hosts["web"], connection=None)
        self.calls = 0

    def run(self, script, stdin=None, check=True, what="", timeout=None):
        self.calls += 1
        if self.calls == 1:
            failed = Result(126, b"OCI runtime exec failed: exec failed: unable to start container process\r\n", b"")
            raise RemoteError(self._failure(what, failed), failed.code)
        return Result(0, b'200\n{"users": []}', b"")


def test_a_read_is_asked_again_after_docker_could_not_start_it_and_a_change_is_not(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    inv = parse("hosts: {web: {address: 203.0.113.10}}\nhomeservers: {one.example: {host: web}}\n")
    hs = inv.homeservers["one.example"]
    remote = _Flaky(inv)
    assert call(remote, hs, "GET", "/_synapse/admin/v2/users") == {"users": []} and remote.calls == 2
    remote = _Flaky(inv)
    assert user_exists(remote, hs, parse_user("alice", hs)) is False and remote.calls == 2
    remote = _Flaky(inv)
    with pytest.raises(RemoteError, match="OCI runtime exec failed") as exc:
        call(remote, hs, "POST", "/_synapse/admin/v1/deactivate/@a:one.example", {})
    assert exc.value.code == 126 and remote.calls == 1
