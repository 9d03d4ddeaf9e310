"""Backups' pure parts: the age rule `inv check` applies, and the listing."""

import datetime
import textwrap

from fabfile.backup import Snapshot, age_problem, format_snapshots
from fabfile.inventory import parse

NOW = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.timezone.utc).timestamp()


def inv(backup: str = ""):
    return parse(textwrap.dedent("""
        hosts: {web: {address: 203.0.113.10}}
        homeservers: {one.example: {host: web}}
        """) + backup)


def snap(hours_ago: float) -> Snapshot:
    t = datetime.datetime.fromtimestamp(NOW - hours_ago * 3600, datetime.timezone.utc)
    # as restic writes it: nanoseconds and a zone
    return Snapshot("one.example", "0123456789abcdef", t.strftime("%Y-%m-%dT%H:%M:%S.123456789Z"))


def test_a_stale_snapshot_fails_only_when_backups_are_scheduled():
    scheduled = inv('backup: {schedule: "03:30", stale_after_hours: 26}\n')
    problem, _ = age_problem(scheduled, snap(30), NOW)
    assert problem and "older than backup.stale_after_hours (26)" in problem and "01234567" in problem
    assert age_problem(scheduled, snap(2), NOW) == (None, "newest 01234567, 2.0 h old")
    problem, said = age_problem(inv(), snap(300), NOW)
    assert problem is None and "300.0 h old (no schedule)" in said


def test_no_snapshot_and_unreadable_repositories():
    assert "no snapshot yet" in age_problem(inv('backup: {schedule: "03:30"}\n'), None, NOW)[0]
    assert age_problem(inv(), None, NOW)[0] is None
    assert age_problem(inv(), "connection refused", NOW)[0] == "cannot read the backups: connection refused"


def test_listing():
    assert format_snapshots([]) == "no snapshots"
    text = format_snapshots([Snapshot("one.example", "0123456789abcdef", "2026-11-30T12:00:00.5Z", 3 * 1024 * 1024),
                             Snapshot("one.example", "fedcba9876543210", "2026-11-30T13:00:00Z")])
    lines = text.splitlines()
    assert lines[1].split() == ["one.example", "01234567", "2026-11-30", "12:00:00", "3.0", "MiB"]
    assert lines[2].endswith("-")
