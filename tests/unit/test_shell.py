"""Every shell program the project ships passes shellcheck: the host programs
(fabfile/scripts/), the rendered host-side tools (renew-certificates,
element-update), the repository's scripts and the sandbox images' entry points."""

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
        if first.startswith(b"#!") and (b"sh" in first.split(b"/")[-1] or b"bash" in first):
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


@pytest.mark.parametrize("program", ["renew-certificates", "element-update"])
def test_rendered_host_tools_pass_shellcheck(tmp_path, program):
    state = render_host(INV, "web")
    path = tmp_path / program
    path.write_bytes(state.file(f"/opt/matrix/reverse_proxy/bin/{program}").content)
    res = subprocess.run([SHELLCHECK, "-s", "sh", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
