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
    inv = INV.model_copy(update={"backup": INV.backup.model_copy(update={"schedule": "03:30"})})
    state = render_host(inv, "web")
    path = tmp_path / "backup"
    path.write_bytes(state.file("/opt/matrix/reverse_proxy/bin/backup").content)
    res = subprocess.run([SHELLCHECK, "-s", "sh", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
