"""The pure parts of upgrades: which PostgreSQL image a major move takes, and what
`inv upgrade --check` says."""

import textwrap

from fabfile.inventory import parse
from fabfile.pg_upgrade import target_image
from fabfile.upgrade import Step


def test_a_major_move_takes_the_inventorys_default_when_it_is_that_major():
    inv = parse("hosts: {web: {address: 203.0.113.10}}\n")
    assert target_image(inv, 17) == "postgres:17-trixie"
    pinned = parse(textwrap.dedent("""
        images: {postgres: "registry.example.org/postgres:17.6-trixie"}
        hosts: {web: {address: 203.0.113.10}}
        """))
    assert target_image(pinned, 17) == "registry.example.org/postgres:17.6-trixie"  # a mirror, a pin: kept
    assert target_image(pinned, 16) == "postgres:16-trixie"


def test_upgrade_check_lines():
    due = Step("one.example", "web", "matrixdotorg/synapse:v1.162.0", "matrixdotorg/synapse:v1.163.2")
    assert due.due and "would bring matrixdotorg/synapse:v1.163.2 onto the host" in due.line()
    assert "start matrixdotorg/synapse:v1.162.0 again" in due.line()
    same = Step("one.example", "web", "matrixdotorg/synapse:v1.163.2", "matrixdotorg/synapse:v1.163.2")
    assert not same.due and same.line().endswith("up to date")
    new = Step("one.example", "web", None, "matrixdotorg/synapse:v1.163.2")
    assert not new.due and "not running" in new.line()
