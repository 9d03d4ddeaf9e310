"""Images as production gets them: vps1 (`images: pull`) pulls from its registry
(the sandbox's registry mirror, set on the host as a provider's would be), digest
pins included; vps2 (`images: push`) receives them over SSH."""
from __future__ import annotations

import secrets
import subprocess

import pytest

from tests.e2e.helpers import on_host, run, variant
from tests.sandbox import sandbox as sb

pytestmark = pytest.mark.e2e

PROXY_COMPOSE = "/opt/matrix/reverse_proxy/docker-compose.yml"


def _publish(tag: str, label: str) -> str:
    """Build a variant of the certbot stand-in labelled `label`, push it to the
    sandbox registry as certbot/certbot:<tag>; returns its digest."""
    base = sb.images_mod().tag_of("certbot")
    alias = f"{sb.REGISTRY_PUSH}/certbot/certbot:{tag}"
    subprocess.run(["docker", "build", "-q", "-t", alias, "-"], check=True, capture_output=True,
                   input=f"FROM {base}\nLABEL sfab.e2e={label}\n".encode(), timeout=120)
    try:
        subprocess.run(["docker", "push", alias], check=True, capture_output=True, timeout=120)
    finally:
        subprocess.run(["docker", "rmi", alias], capture_output=True)
    return sb._registry_manifest(f"certbot/certbot:{tag}")["digest"]


def _label_on_vps1(ref: str) -> str:
    return on_host("vps1", f"docker image inspect -f '{{{{index .Config.Labels \"sfab.e2e\"}}}}' {ref}").strip()


def _with_certbot(name: str, ref: str):
    def change(doc):
        doc.setdefault("images", {})["certbot"] = ref
    return variant(name, change)


def test_pull_host_has_registry_digests_push_host_has_none(deployed):
    digests = sb.registry_digests()
    nginx = sb.images_mod().tag_of("nginx")
    got = on_host("vps1", f"docker image inspect -f '{{{{json .RepoDigests}}}}' {nginx}")
    assert f"nginx@{digests[nginx]}" in got  # pulled through the mirror
    assert on_host("vps2", f"docker image inspect -f '{{{{json .RepoDigests}}}}' {nginx}").strip() == "[]"


def test_digest_pin_pulls_exactly_that_image(deployed):
    label = secrets.token_hex(4)
    digest = _publish("e2e-pin", label)
    pinned = f"certbot/certbot@{digest}"
    inv = _with_certbot("digest-pin", pinned)
    try:
        res = run(["inv", "deploy", "--host", "vps1"], inventory=inv)
        assert res.returncode == 0 and f"image {pinned} (pull)" in res.stdout
        assert _label_on_vps1(pinned) == label
        assert pinned in on_host("vps1", f"cat {PROXY_COMPOSE}")
        again = run(["inv", "deploy", "--host", "vps1"], inventory=inv)
        assert "vps1: 0 changed" in again.stdout and "restarted 0" in again.stdout
    finally:
        back = run(["inv", "deploy", "--host", "vps1"])
    assert back.returncode == 0 and "(pull)" not in back.stdout  # the tag it had is still there


def test_a_moved_tag_is_pulled_only_with_pull(deployed):
    tag = f"e2e-moving-{secrets.token_hex(3)}"
    ref = f"certbot/certbot:{tag}"
    first, second = secrets.token_hex(4), secrets.token_hex(4)
    _publish(tag, first)
    inv = _with_certbot("moving-tag", ref)
    try:
        assert run(["inv", "deploy", "--host", "vps1"], inventory=inv).returncode == 0
        assert _label_on_vps1(ref) == first
        _publish(tag, second)  # the tag now means another image upstream
        quiet = run(["inv", "deploy", "--host", "vps1"], inventory=inv)
        assert "vps1: 0 changed" in quiet.stdout and _label_on_vps1(ref) == first
        dry = run(["inv", "deploy", "--host", "vps1", "--pull", "--dry-run"], inventory=inv)
        assert f"would pull {ref}" in dry.stdout and _label_on_vps1(ref) == first
        res = run(["inv", "deploy", "--host", "vps1", "--pull"], inventory=inv)
        assert res.returncode == 0 and _label_on_vps1(ref) == second
    finally:
        run(["inv", "deploy", "--host", "vps1"])
