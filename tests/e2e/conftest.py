"""End-to-end fixtures: ONE sandbox (tests/sandbox/compose.yml, project `sfab`) shared
by every e2e test of the session.

How the pieces fit (the same steps as `python -m tests.sandbox.sandbox up`, split
where pytest-docker takes over):

1. `sandbox_prepared` checks that a Docker engine answers, builds or reuses the
   `host` and `infra` images and writes the state files compose mounts
   (`sandbox.prepare`), and exports the image tags that compose.yml reads.
2. pytest-docker's `docker_services` runs `docker-compose -p sfab -f ... up -d`
   (our `docker_setup` depends on `sandbox_prepared`, so images and state exist
   first), after a `down --volumes` of whatever sandbox was running (the suite
   always starts from bare hosts; SFAB_REUSE_SANDBOX=1 keeps it), and at session
   end `down --volumes` (skipped with SFAB_KEEP_SANDBOX=1, which leaves the
   sandbox running for a look).
3. `sandbox` waits until it is usable (`sandbox.wait_ready`: SSH on every VPS,
   DNS records in challtestsrv, pebble's roots in state/acme-roots.pem) and hands
   tests a `SandboxInfo`.

No engine: the e2e tests are skipped, except with CI=true where they fail (so a CI
machine that lost its engine cannot go green). A failed image build always fails.
"""
from __future__ import annotations

import os

import pytest

from tests.sandbox import sandbox as sb


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _keep() -> bool:
    return os.environ.get("SFAB_KEEP_SANDBOX", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def sandbox_prepared() -> dict[str, str]:
    if not sb.engine_answers():
        msg = "no Docker engine answers (`docker version`); the e2e sandbox needs one"
        if _ci():
            pytest.fail(f"{msg} (CI=true: failing instead of skipping)", pytrace=False)
        pytest.skip(msg)
    try:
        return sb.prepare(log=print)
    except sb.SandboxError as exc:
        pytest.fail(f"sandbox images/state: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    return "docker-compose"


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(sb.COMPOSE_FILE)


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return sb.PROJECT


def _reuse() -> bool:
    return os.environ.get("SFAB_REUSE_SANDBOX", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def docker_setup(sandbox_prepared):
    # A fresh sandbox, whatever an earlier run or the quick start left (the suite
    # starts from bare hosts); SFAB_REUSE_SANDBOX=1 keeps a running one instead.
    # compose v1 has no `up --wait`; readiness is checked by the `sandbox` fixture.
    fresh = [] if _reuse() else ["down --volumes --remove-orphans --timeout 5"]
    return fresh + ["up -d --remove-orphans"]


@pytest.fixture(scope="session")
def docker_cleanup():
    if _keep():
        return []
    return ["down --volumes --remove-orphans --timeout 5"]


@pytest.fixture(scope="session")
def sandbox(docker_services, sandbox_prepared) -> sb.SandboxInfo:
    try:
        info = sb.wait_ready(log=print)
    except sb.SandboxError as exc:
        pytest.fail(f"sandbox not ready: {exc}", pytrace=False)
    info.images = dict(sandbox_prepared)
    return info


@pytest.fixture(scope="session")
def deployed(sandbox):
    """Both homeserver hosts bootstrapped from bare, in parallel, by `fab`
    (a no-op on a sandbox kept from an earlier run)."""
    import subprocess

    from tests.e2e.helpers import BIN, INVENTORY, REPO, ArgvSampler

    env = {**os.environ, "FABRIC_INVENTORY": str(INVENTORY)}
    # every process's argv, here and on the hosts, while the first deploy makes secrets
    with ArgvSampler() as sampler:
        procs = {
            name: subprocess.Popen([str(BIN / "fab"), "-H", name, "bootstrap"], cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name in ("vps1", "vps2")
        }
        outputs = {}
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=1200)
            print(out[-3000:])
            outputs[name] = (proc.returncode, out)
    _BOOTSTRAP_ARGV.append(sampler)
    yield outputs
    for p in REPO.glob(".e2e-*.yaml"):
        p.unlink()


_BOOTSTRAP_ARGV: list = []


@pytest.fixture(scope="session")
def bootstrap_argv(deployed):
    """The ArgvSampler that watched the bootstrap of vps1 and vps2."""
    return _BOOTSTRAP_ARGV[0]


@pytest.fixture(scope="session")
def cafile(deployed, sandbox, tmp_path_factory):
    """What a Matrix client trusts: the sandbox CA's roots plus the certificates
    vps1 serves (their own temporary ones until ACME replaced them)."""
    from tests.e2e.helpers import REPO, on_host

    pem = on_host("vps1", "cat /opt/matrix/reverse_proxy/certs/*/fullchain.pem")
    roots = (REPO / "tests/sandbox/state/acme-roots.pem").read_text()
    path = tmp_path_factory.mktemp("ca") / "trust.pem"
    path.write_text(pem + "\n" + roots)
    return path
