"""A database keeps the PostgreSQL major version it was created with: three.test
was made with postgres:15-bookworm (hosts.yaml pins it), the default is now 17."""
from __future__ import annotations

import pytest

from tests.e2e.helpers import ctr, on_host, run, variant

pytestmark = pytest.mark.e2e

COMPOSE = "/opt/matrix/synapse/three.test/docker-compose.yml"
VERSION = f"docker exec {ctr('synapse-three-test', 'postgres')} psql -U synapse -d synapse -tAc 'SHOW server_version'"


def test_a_moved_default_does_not_change_a_databases_major(deployed):
    assert on_host("vps1", VERSION).startswith("15.")

    def unpin(doc):
        del doc["homeservers"]["three.test"]["postgres"]

    res = run(["inv", "deploy", "--host", "vps1"], variant("pg-unpinned", unpin))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "three.test: its database is PostgreSQL 15: keeping postgres:15-bookworm" in res.stdout
    assert "vps1: 0 changed" in res.stdout and "restarted 0" in res.stdout
    assert "image: \"postgres:15-bookworm\"" in on_host("vps1", f"cat {COMPOSE}")
    assert on_host("vps1", VERSION).startswith("15.")


def test_an_image_of_another_major_is_refused(deployed):
    def other_major(doc):
        doc["homeservers"]["three.test"]["postgres"] = {"image": "postgres:17-trixie"}

    before = on_host("vps1", f"sha256sum {COMPOSE}")
    res = run(["inv", "deploy", "--host", "vps1"], variant("pg-17", other_major))
    assert res.returncode == 1
    assert "homeservers.three.test.postgres.image is postgres:17-trixie" in res.stdout + res.stderr
    assert "database is PostgreSQL 15" in res.stdout + res.stderr
    assert on_host("vps1", f"sha256sum {COMPOSE}") == before
    assert on_host("vps1", VERSION).startswith("15.")
