"""Last e2e test: `sandbox down` removes everything the sandbox created (containers,
network, volumes) and nothing else (an unrelated container, network and volume
made here survive it)."""

from __future__ import annotations

import os
import secrets
import subprocess

import pytest

from tests.sandbox import images, sandbox as sb

pytestmark = pytest.mark.e2e


def docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True)


def test_down_removes_what_it_made_and_nothing_else(sandbox):
    if os.environ.get("SFAB_KEEP_SANDBOX") and os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("SFAB_KEEP_SANDBOX is set: the sandbox stays up")
    name = f"unrelated-{secrets.token_hex(3)}"
    assert docker("volume", "create", name).returncode == 0
    assert docker("network", "create", name).returncode == 0
    assert docker("create", "--name", name, images.tag_of("base"), "true").returncode == 0
    try:
        assert sb.leftovers(), "the sandbox should be up before this test"
        sb.down(log=print)
        assert sb.leftovers() == []
        for kind in ("volume", "network", "container"):
            assert docker(kind, "inspect", name).returncode == 0, f"down removed an unrelated {kind}"
    finally:
        docker("rm", "-f", name)
        docker("network", "rm", name)
        docker("volume", "rm", name)
