"""The two fronts: every task is listed, and errors are one line with a non-zero exit."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*argv, env=None):
    import os

    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=60,
    )


PRODUCT = ("deploy", "register-user", "reset-password", "users", "make-admin", "deactivate-user", "registration-token",
           "purge-remote-media", "purge-history", "logs", "migrate-host", "element-update", "check")


def test_inv_list_shows_every_task_and_no_development_one():
    out = run("inv", "--list").stdout
    for name in PRODUCT:
        assert f"  {name} " in out, name
    assert "sandbox" not in out


def test_the_development_collection_adds_the_sandbox():
    out = run("inv", "-c", "tasks_dev", "--list").stdout
    for name in (*PRODUCT, "sandbox.up", "sandbox.down", "sandbox.status"):
        assert f"  {name} " in out, name


def test_the_product_never_imports_the_tests():
    code = ("import sys, tasks, fabfile, fabfile.deploy, fabfile.migrate, fabfile.users, fabfile.check; "
            "print(sorted(m for m in sys.modules if m == 'tests' or m.startswith('tests.')))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_fab_list_shows_bootstrap():
    assert "  bootstrap " in run("fab", "--list").stdout


def test_inventory_path_comes_from_invoke_config(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("hosts:\n  web:\n    adress: 1.2.3.4\n")
    res = run("inv", "check", env={"INVOKE_INVENTORY": str(bad)})
    assert res.returncode == 2
    assert f"{bad}:3: hosts.web.adress: unknown key; did you mean 'address'?" in res.stderr
    assert "Traceback" not in res.stderr


def test_fab_unknown_host_lists_known_ones():
    res = run("fab", "-H", "nowhere", "bootstrap")
    assert res.returncode == 2
    assert "no host named or addressed 'nowhere'" in res.stderr
    assert "vps1 (172.29.231.11)" in res.stderr
    assert "Traceback" not in res.stderr


def test_backup_names_of_user_ids_are_never_paths():
    from fabfile.users import UserId, backup_name

    assert backup_name(UserId("alice", "a.example")) == "alice"
    assert backup_name(UserId("x/../../y", "a.example")) == "x%2F..%2F..%2Fy"
    assert backup_name(UserId("..", "a.example")) == "%2E."
    assert "/" not in backup_name(UserId("/a%2F/", "a.example"))
