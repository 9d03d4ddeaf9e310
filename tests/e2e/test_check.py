"""`inv check` passes on the healthy sandbox and names the cause when something
is broken; `inv deploy` repairs both breakages."""

from __future__ import annotations

import pytest

from fabfile.inventory import load
from fabfile.proxy import placeholder_cert
from fabfile.remote import open_remote
from tests.e2e.helpers import INVENTORY, on_host, run

pytestmark = pytest.mark.e2e

PROXY = "/opt/matrix/reverse_proxy"


def test_check_passes_on_the_healthy_sandbox(deployed):
    res = run(["inv", "check"])
    assert res.returncode == 0, res.stdout
    assert "0 failed" in res.stdout and "FAIL" not in res.stdout
    for check in ("DNS matrix.two.test", "certificate element.one.test", "well-known client (+CORS)",
                  "federation (version, keys)", "admin API only from admin_api_allow", "PostgreSQL/Synapse ports closed"):
        assert check in res.stdout


def test_check_names_a_missing_well_known_file(deployed):
    on_host("vps1", f"rm {PROXY}/well-known/three.test/matrix/client")
    res = run(["inv", "check", "--homeserver", "three.test"])
    assert res.returncode == 1
    failed = [l for l in res.stdout.splitlines() if l.startswith("FAIL")]
    assert len(failed) == 1 and "well-known client" in failed[0] and "HTTP 404" in failed[0]
    assert run(["inv", "deploy", "--host", "vps1"]).returncode == 0
    assert run(["inv", "check", "--homeserver", "three.test"]).returncode == 0


def test_check_names_a_self_signed_certificate(deployed):
    chain, key = placeholder_cert(["three.test", "matrix.three.test"])
    inv = load(INVENTORY)
    remote = open_remote(inv, inv.hosts["vps1"])
    try:
        remote.run(f"cat > {PROXY}/certs/three.test/fullchain.pem", stdin=chain)
        remote.run(f"cat > {PROXY}/certs/three.test/privkey.pem", stdin=key)
        remote.run("docker exec $(docker ps -q --filter label=com.docker.compose.service=nginx) nginx -s reload; sleep 1")
    finally:
        remote.close()
    res = run(["inv", "check", "--homeserver", "three.test"])
    assert res.returncode == 1
    failed = [l for l in res.stdout.splitlines() if l.startswith("FAIL")]
    assert any("certificate matrix.three.test" in l and "CERTIFICATE_VERIFY_FAILED" in l for l in failed), failed
    # deploy puts certbot's certificate back without asking the CA again
    res = run(["inv", "deploy", "--host", "vps1"])
    assert res.returncode == 0 and "serving certbot's certificate again" in res.stdout and "ACME CA" not in res.stdout
    assert run(["inv", "check", "--homeserver", "three.test"]).returncode == 0
