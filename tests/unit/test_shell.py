"""Every shell program the project ships passes shellcheck: the host programs
(fabfile/scripts/, element-update among them), the rendered host-side tool
(renew-certificates), the repository's scripts and the sandbox images' entry points."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from fabfile.inventory import parse
from fabfile.render import render_host

REPO = Path(__file__).resolve().parents[2]
SHELLCHECK = shutil.which("shellcheck")
if SHELLCHECK is None:  # a missing tool is a broken machine, not a skip
    raise RuntimeError("shellcheck is missing: scripts/setup installs it")


def shipped_shell_files() -> list[Path]:
    """Files of the repository that start with a sh/bash shebang (templates aside:
    their rendered output is checked below)."""
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    out = []
    for name in names:
        path = REPO / name
        if name.endswith(".j2") or not path.is_file():
            continue
        with path.open("rb") as f:
            first = f.readline()
        if (first.startswith(b"#!") and (b"sh" in first.split(b"/")[-1] or b"bash" in first)) \
                or (name.startswith("fabfile/scripts/") and name.endswith(".sh")):  # parts of other scripts too
            out.append(path)
    return out


def test_the_repository_ships_the_expected_shell_files():
    found = {str(p.relative_to(REPO)) for p in shipped_shell_files()}
    assert {"scripts/setup", ".ci/run", "fabfile/scripts/users.sh", "fabfile/scripts/wait-healthy.sh"} <= found


@pytest.mark.parametrize("path", shipped_shell_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_shell_file_passes_shellcheck(path):
    res = subprocess.run([SHELLCHECK, "-x", str(path)], cwd=path.parent, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


INV = parse(textwrap.dedent("""
    acme: {email: ops@example.org}
    hosts:
      web: {address: 203.0.113.10}
    homeservers:
      one.example:
        host: web
        element: {enabled: true, hostname: chat.one.example, version: "1.11.85"}
      two.example:
        host: web
        element: {enabled: true, hostname: chat.two.example}
"""))


def test_rendered_renew_certificates_passes_shellcheck(tmp_path):
    state = render_host(INV, "web")
    path = tmp_path / "renew-certificates"
    path.write_bytes(state.file("/opt/matrix/reverse_proxy/bin/renew-certificates").content)
    res = subprocess.run([SHELLCHECK, "-s", "sh", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_element_update_is_shipped_as_it_is_and_passes_shellcheck():
    """A static program (its settings are sites.json): what the deploy installs is the
    file itself, checked as POSIX sh whether or not git tracks it yet."""
    static = REPO / "fabfile" / "scripts" / "element-update.sh"
    state = render_host(INV, "web")
    assert state.file("/opt/matrix/reverse_proxy/bin/element-update").content == static.read_bytes()
    res = subprocess.run([SHELLCHECK, "-s", "sh", str(static)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_rendered_backup_program_passes_shellcheck(tmp_path):
    inv = INV.replace(backup=INV.backup.replace(schedule="03:30"))
    state = render_host(inv, "web")
    path = tmp_path / "backup"
    path.write_bytes(state.file("/opt/matrix/reverse_proxy/bin/backup").content)
    res = subprocess.run([SHELLCHECK, "-s", "sh", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_facts_script_passes_shellcheck_and_reads_a_host(tmp_path):
    """The facts script (fabfile/facts.py builds it per host) is POSIX sh, and run by
    dash on a small tree it reports what is there: files and their hashes (a section
    of sha256sum's output), managed files (grep's, and every file in a directory
    wholly ours, a dot file too, but none behind a link there: find's, by globs),
    compose stacks, data not owned by 991:991 (the same find), the recorded pg major."""
    import fcntl
    import hashlib
    import os

    from fabfile import facts as facts_mod
    from fabfile.layout import CERTIFICATES_LOCK, LOCK_DIR

    inv = parse(textwrap.dedent("""
        acme: {email: ops@example.org}
        hosts:
          web: {address: 203.0.113.10, firewall: {enabled: false}}
        homeservers:
          one.example: {host: web}
          two.example: {host: web}
    """))
    state = render_host(inv, "web")
    # the host's tree lives under tmp_path: its paths in the script, and back in the output
    root = str(tmp_path / "root")
    script = facts_mod.script(state).replace("/opt/matrix", root + "/opt/matrix").replace(
        "/etc/synapse-fabric", root + "/etc/synapse-fabric").replace("/run/synapse-fabric", root + "/run/synapse-fabric")
    at = lambda p: Path(root + p)  # noqa: E731
    path = tmp_path / "facts"
    path.write_text(script)
    res = subprocess.run([SHELLCHECK, "-s", "sh", "-e", "SC2016", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout

    lay = state.layout
    conf = next(f for f in state.files if f.path.startswith(lay.base + "/"))
    at(conf.path).parent.mkdir(parents=True, exist_ok=True)
    at(conf.path).write_bytes(conf.content)
    managed = f"{lay.synapse('one.example')}/conf.d/99-old.yaml"
    at(managed).parent.mkdir(parents=True, exist_ok=True)
    at(managed).write_text(f"# {facts_mod.MARKER}\n")
    owned = [f"{lay.well_known('one.example')}/matrix/{name}" for name in ("support", ".old")]
    for stray in owned:  # files in a directory wholly ours, a dot file too
        at(stray).parent.mkdir(parents=True, exist_ok=True)
        at(stray).write_text("{}")
    at(owned[0] + "-dir").mkdir()  # a directory there is not a file of ours
    elsewhere = tmp_path / "elsewhere"  # an owned directory that is a link: what it leads to is not ours
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("x")
    at(lay.well_known("two.example")).mkdir(parents=True)
    at(lay.well_known("two.example") + "/matrix").symlink_to(elsewhere)
    at(lay.synapse("two.example")).mkdir(parents=True, exist_ok=True)
    at(lay.synapse("two.example") + "/docker-compose.yml").write_text("services: {}\n")
    at(lay.data("two.example")).mkdir(parents=True)
    at(lay.data("two.example") + "/stray").write_text("x")
    at(lay.pg_version("one.example")).parent.mkdir(parents=True, exist_ok=True)
    at(lay.pg_version("one.example")).write_text("16\n")
    tools = tmp_path / "bin"  # the helpers the script may use, and no docker
    tools.mkdir()
    for tool in ("grep", "find", "sed", "stat", "sha256sum", "cat", "readlink", "tr", "flock", "true"):
        os.symlink(shutil.which(tool), tools / tool)

    at(LOCK_DIR).mkdir(parents=True)  # made by the run lock the facts are asked under

    def gather():
        run = subprocess.run([shutil.which("dash"), "-c", script], capture_output=True, text=True,
                             env={"PATH": str(tools)})
        assert run.returncode == 0, run.stderr
        return facts_mod.parse(run.stdout.replace(root, ""), state)

    facts = gather()
    assert facts.hashes[conf.path] == hashlib.sha256(conf.content).hexdigest()
    assert managed in facts.managed and facts.stats[conf.path].kind == "regular file"
    assert set(owned) <= facts.managed and owned[0] + "-dir" not in facts.managed
    assert not [p for p in facts.managed if "two.example/matrix" in p]
    assert facts.stats[lay.well_known("two.example") + "/matrix"].kind == "symbolic link"
    assert facts.hosted == {"two.example"} and facts.pg_major == {"one.example": 16}
    if os.getuid() != 991:
        assert facts.wrong_owner == {"two.example": lay.data("two.example")}
    assert not facts.docker and facts.pid1
    # a certificate run holds the lock (cron's renewal): its certbot container is live
    assert not facts.certificates_busy
    with open(at(CERTIFICATES_LOCK), "w") as lock:
        assert not gather().certificates_busy  # the file alone is no run
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert gather().certificates_busy


def test_docker_facts_ask_the_engine_once_and_take_its_version_from_a_header(tmp_path):
    """A converged host's Docker facts are one curl (containers and images, no
    /version: the engine would start runc and docker-init to answer it) and one jq;
    the engine's version is the Server header of those answers."""
    import json
    import socket

    from fabfile import facts as facts_mod
    from fabfile.shell import program

    if shutil.which("jq") is None or shutil.which("dash") is None:
        raise RuntimeError("jq and dash are needed: scripts/setup installs them")
    sock = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
    containers = [{"Names": ["/web-synapse-1"], "Id": "0123456789abcdef", "Image": "matrixdotorg/synapse:v1.140.0",
                   "State": "running", "Status": "Up 2 hours (healthy)",
                   "Labels": {"com.docker.compose.project": "one", "com.docker.compose.service": "synapse",
                              "com.docker.compose.project.working_dir": "/opt/matrix/synapse/one.example"}},
                  {"Names": ["/other"], "Id": "fedcba9876543210", "Image": "busybox", "State": "exited",
                   "Status": "Exited (0)", "Labels": {}}]
    images = [{"Id": "sha256:aa", "RepoTags": ["nginx:1.30"], "RepoDigests": ["nginx@sha256:bb"]},
              {"Id": "sha256:cc", "RepoTags": ["<none>:<none>"], "RepoDigests": None}]
    answers = {"http://docker/containers/json?all=1": containers, "http://docker/images/json": images}
    tools = tmp_path / "bin"
    tools.mkdir()
    (tmp_path / "answers").mkdir()
    for url, body in answers.items():
        (tmp_path / "answers" / url.split("/")[3]).write_text(json.dumps(body) + "\n")
    asked = tmp_path / "asked"
    (tools / "curl").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        while [ $# -gt 0 ]; do
          case $1 in
            -D) shift; printf 'HTTP/1.1 200 OK\\r\\nApi-Version: 1.45\\r\\nServer: Docker/26.1.5+dfsg1 (linux)\\r\\n\\r\\n' >> "$1" ;;
            http://*) echo "$1" >> {asked}; u=${{1#http://docker/}}; cat "{tmp_path}/answers/${{u%%/*}}" ;;
          esac
          shift
        done
        """))
    (tools / "docker").write_text("#!/bin/sh\nexit 1\n")  # installed; the facts never run it here
    for tool in ("curl", "docker"):
        (tools / tool).chmod(0o755)
    for tool in ("jq", "cat"):
        (tools / tool).symlink_to(shutil.which(tool))
    text = program("docker-facts.sh", headers=str(tmp_path / "headers")).replace("/var/run/docker.sock", str(sock))
    run = subprocess.run([shutil.which("dash"), "-c", text], capture_output=True, text=True,
                         env={"PATH": str(tools), "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    facts = facts_mod.parse(run.stdout + facts_mod.END + "\n")
    assert asked.read_text().split() == list(answers)  # one curl, and no /version
    assert facts.docker and facts.engine == "26.1.5+dfsg1"
    assert [(c.project, c.service, c.state, c.id, c.image) for c in facts.containers] == [
        ("one", "synapse", "running", "0123456789ab", "matrixdotorg/synapse:v1.140.0")]
    assert facts.images == {"nginx:1.30": "sha256:aa"} and facts.digests == {"nginx@sha256:bb": "sha256:aa"}


def test_restart_starts_stopped_services_and_makes_missing_ones(tmp_path):
    """The restart of a stack's services (fabfile/steps.py) under dash, with a
    stand-in docker that knows two containers, one of them stopped (`ps -a`
    finds it: a run cut short mid-restart leaves that), and no container for the
    third service: the two are restarted, the third is made by compose's `up`.
    A refused restart or an unanswered lookup ends it non-zero, `up` not run."""
    import os

    from fabfile.shell import program

    tools = tmp_path / "bin"
    tools.mkdir()
    calls = tmp_path / "calls"
    (tools / "docker").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "docker $*" >> {calls}
        case "$*" in
          "ps -aq "*"project=p "*"service=synapse "*"oneoff=False") echo aaa ;;
          "ps -aq "*"project=p "*"service=w1 "*"oneoff=False") echo bbb ;;
          "ps -aq "*"project=p "*"service=w3 "*"oneoff=False") echo ccc ;;
          "ps -aq "*"project=p "*"service=down "*) echo "engine down" >&2; exit 1 ;;
          "ps "*) ;;
          "restart "*"ccc"*) echo "cannot restart ccc" >&2; exit 1 ;;
          "restart "*) ;;
          "compose up -d --remove-orphans") echo "up in $(pwd)" >> {calls} ;;
          *) echo "unexpected: $*" >&2; exit 9 ;;
        esac
    """))
    (tools / "docker").chmod(0o755)
    stack = tmp_path / "stack"
    stack.mkdir()

    def restart(services, fails=False):
        calls.write_text("")
        res = subprocess.run(
            [shutil.which("dash"), "-c", program("restart-services.sh", project="p", services=services,
                                                   directory=str(stack), compose="docker compose")],
            capture_output=True, text=True, env={"PATH": f"{tools}:{os.environ['PATH']}"})
        assert (res.returncode != 0) == fails, res.stderr
        return res.stdout, [c for c in calls.read_text().splitlines() if not c.startswith("docker ps")]

    out, done = restart("synapse w1")
    assert (out, done) == ("", ["docker restart aaa bbb"])
    out, done = restart("synapse w1 w2")
    assert out == "no container for: w2 (made by up)\n"
    assert done == ["docker restart aaa bbb", "docker compose up -d --remove-orphans", f"up in {stack}"]
    # a failure is one: a restart the engine refuses, a lookup it cannot answer (not "no container")
    out, done = restart("synapse w3 w2", fails=True)
    assert done == ["docker restart aaa ccc"]
    out, done = restart("synapse down w2", fails=True)
    assert done == []
