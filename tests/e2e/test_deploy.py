"""`fab -H HOST bootstrap` and `inv deploy` over real SSH into the sandbox.

The tests run in file order on one sandbox: bootstrap first, then re-runs and
changes against what it built. Every task is run as the operator runs it (the
`fab` / `inv` commands, as subprocesses) with the repo's hosts.yaml, or with a
modified copy of it next to it (so its relative paths still hold).
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time

import pytest

from tests.e2e.helpers import ctr, BIN, INVENTORY, REPO, SNAPSHOT, on_host, run, starts, variant

pytestmark = pytest.mark.e2e


def test_bootstrap_brings_bare_hosts_to_healthy_stacks(deployed):
    for name, (code, out) in deployed.items():
        assert code == 0, f"bootstrap of {name} failed:\n{out[-3000:]}"
    # vps1 holds two homeservers, vps2 (a sudo user) one
    fmt = ("{{index .Config.Labels \\\"com.docker.compose.project\\\"}}/"
           "{{index .Config.Labels \\\"com.docker.compose.service\\\"}} {{.State.Health.Status}}")
    wanted = {"vps1": ["synapse-one-test/synapse", "synapse-one-test/postgres", "synapse-three-test/synapse",
                       "synapse-three-test/postgres", "synapse-fabric-proxy/nginx"],
              "vps2": ["synapse-two-test/synapse", "synapse-two-test/postgres", "synapse-fabric-proxy/nginx"]}
    for host, services in wanted.items():
        # the deploy returned once each check passed; Docker records it at its next interval
        for _ in range(30):
            status = on_host(host, f"docker ps -q | xargs docker inspect -f \"{fmt}\" | sort")
            if all(f"{service} healthy" in status for service in services):
                break
            time.sleep(1)
        for service in services:
            assert f"{service} healthy" in status, f"{service} not healthy: {status}"


@pytest.mark.parametrize("host,server", [("vps1", "one-test"), ("vps1", "three-test"), ("vps2", "two-test")])
def test_databases_use_c_collation(deployed, host, server):
    out = on_host(host, f"docker exec {ctr('synapse-' + server, 'postgres')} psql -U synapse -d synapse -tAc "
                        "\"SELECT datcollate, datctype, pg_encoding_to_char(encoding) FROM pg_database "
                        "WHERE datname = current_database()\"")
    assert out.strip() == "C|C|UTF8"


def test_no_secret_in_any_argv_during_the_first_deploy(deployed, bootstrap_argv):
    """While the bootstrap made the database passwords and Synapse generated its
    secrets, no process here or on the hosts carried one in its argv."""
    made = [out for _, out in deployed.values()]
    assert all("new database password" in out for out in made), "the bootstrap made no secret in this session"
    assert bootstrap_argv.passes > 100, bootstrap_argv.passes
    # the sampler saw the hosts' side: the containers' commands ran under it
    assert bootstrap_argv.containing("synapse.app.homeserver") and bootstrap_argv.containing("postgres")
    secrets_of = {
        "vps1": ["one.test", "three.test"], "vps2": ["two.test"],
    }
    found = []
    for host, servers in secrets_of.items():
        for sn in servers:
            base = f"/opt/matrix/synapse/{sn}"
            values = on_host(host, f"cat {base}/secrets/postgres_password; echo; "
                                   f"sed -n 's/^\\(registration_shared_secret\\|macaroon_secret_key\\|form_secret\\): *//p' "
                                   f"{base}/data/homeserver.yaml; "
                                   f"awk '{{print $3}}' {base}/data/{sn}.signing.key")
            for value in (v.strip().strip('"') for v in values.splitlines() if v.strip()):
                assert len(value) >= 16, f"{sn}: a secret too short to look for: {value!r}"
                found += bootstrap_argv.containing(value)
    assert found == []


def test_data_owned_by_synapse_and_secrets_private(deployed):
    out = on_host("vps1", "stat -c '%U:%G %u:%g %a %n' /opt/matrix/synapse/one.test/data "
                          "/opt/matrix/synapse/one.test/data/one.test.signing.key "
                          "/opt/matrix/synapse/one.test/secrets /opt/matrix/synapse/one.test/secrets/*")
    lines = out.splitlines()
    assert all(" 991:991 " in l for l in lines[:2]), out
    assert lines[2].split()[2] == "700", out
    assert all(l.split()[2] == "400" for l in lines[3:]), out


def test_noop_deploy_changes_and_restarts_nothing(deployed):
    before = {h: on_host(h, SNAPSHOT) for h in ("vps1", "vps2")}
    res = run(["inv", "deploy"])
    assert res.returncode == 0
    for h in ("vps1", "vps2"):
        assert f"{h}: 0 changed" in res.stdout and "restarted 0" in res.stdout
        assert on_host(h, SNAPSHOT) == before[h], f"{h} changed during a no-op deploy"


def test_a_renewal_at_work_is_left_alone_by_a_deploy(deployed):
    """cron's or the timer's renewal (03:17, 15:17) holds the certificates lock while
    its certbot container runs: a deploy then sees a renewal at work, not a container
    a dead run left, and changes nothing (CI once saw "1 changed" at 15:17)."""
    lock = "/run/synapse-fabric/certificates.lock"
    start = ("cd /opt/matrix/reverse_proxy && docker compose run -d --entrypoint sleep certbot 600 >/dev/null && "
             f"(setsid flock -o {lock} sleep 613 </dev/null >/dev/null 2>&1 &) && "
             f"for i in $(seq 100); do flock -n -E 75 {lock} true; [ $? -eq 75 ] && echo held && break; "
             "sleep 0.1; done")
    stop = ("pkill -f 'sleep 61[3]'; "  # the lock's holder and its child (not this shell)
            "docker rm -f $(docker ps -aq --filter label=com.docker.compose.project=synapse-fabric-proxy "
            "--filter label=com.docker.compose.service=certbot) >/dev/null 2>&1; true")
    try:
        assert on_host("vps1", start).strip() == "held"
        res = run(["inv", "deploy", "--host", "vps1"])
        assert res.returncode == 0 and "vps1: 0 changed" in res.stdout and "certbot" not in res.stdout, res.stdout
    finally:
        on_host("vps1", stop)
    assert on_host("vps1", f"flock -n {lock} true && echo free").strip() == "free"


def test_changed_setting_restarts_only_that_homeserver(deployed):
    def change(doc):
        doc["homeservers"]["three.test"]["synapse_settings"] = {"presence": {"enabled": False}}

    inv = variant("setting", change)
    before = starts("vps1")
    res = run(["inv", "deploy"], inv)
    assert res.returncode == 0
    assert "three.test (restart)" in res.stdout
    after = starts("vps1")
    changed = {name for name in before if before[name] != after.get(name)}
    assert changed == {"synapse-three-test/synapse"}, changed
    # and back again: the extra file goes away, three.test restarts once more
    res = run(["inv", "deploy"])
    assert res.returncode == 0 and "three.test (restart)" in res.stdout


def test_dry_run_shows_diff_and_writes_nothing(deployed):
    def change(doc):
        doc["homeservers"]["one.test"]["max_upload_size"] = "75M"

    inv = variant("dryrun", change)
    before = on_host("vps1", SNAPSHOT)
    res = run(["inv", "deploy", "--dry-run", "--host", "vps1"], inv)
    assert res.returncode == 0
    assert "-    client_max_body_size 50M;" in res.stdout
    assert "+    client_max_body_size 75M;" in res.stdout
    assert "dry run: nothing was written" in res.stdout
    assert on_host("vps1", SNAPSHOT) == before


def test_rejected_vhost_keeps_the_old_config_serving(deployed):
    """nginx refuses the new config (here: a broken file an operator left in
    conf.d); the old vhost stays in place, nginx keeps serving, the error shows."""
    conf = "/opt/matrix/reverse_proxy/nginx/conf.d"
    on_host("vps1", f"printf 'server {{ listen 80; bogus_directive on; }}\\n' > {conf}/zz-local.conf")
    old = on_host("vps1", f"sha256sum {conf}/matrix.one.test.conf")

    def change(doc):
        doc["homeservers"]["one.test"]["max_upload_size"] = "80M"

    inv = variant("reject", change)
    try:
        res = run(["inv", "deploy", "--host", "vps1"], inv)
        assert res.returncode != 0
        assert "nginx rejected the new configuration" in res.stdout
        assert "bogus_directive" in res.stdout
        assert on_host("vps1", f"sha256sum {conf}/matrix.one.test.conf") == old
        code = on_host("vps1", "curl -s -o /dev/null -w '%{http_code}' -H 'Host: matrix.one.test' http://127.0.0.1/")
        assert code == "301"
    finally:
        on_host("vps1", f"rm -f {conf}/zz-local.conf")
    res = run(["inv", "deploy", "--host", "vps1"], inv)
    assert res.returncode == 0 and "nginx (reload)" in res.stdout
    assert run(["inv", "deploy", "--host", "vps1"]).returncode == 0


def _port_open(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(3)
        return s.connect_ex((ip, port)) == 0


def test_only_the_proxy_ports_answer_from_outside(deployed, sandbox):
    ip = sandbox.hosts["vps1"].ip
    assert _port_open(ip, 80) and _port_open(ip, 443)
    for port in (5432, 8008, 8009, 8448):
        assert not _port_open(ip, port), f"port {port} answers on {ip}"


def test_each_synapse_is_reachable_from_nginx_alone(deployed):
    """Synapse trusts X-Forwarded-For (x_forwarded: true), so nothing but nginx may
    reach it: not another homeserver's Synapse on the same host, not certbot."""
    one, three = ctr("synapse-one-test", "synapse"), ctr("synapse-three-test", "synapse")
    nginx = ctr("synapse-fabric-proxy", "nginx")
    probe = ("import sys, urllib.request\n"
             "try:\n urllib.request.urlopen(sys.argv[1], timeout=3); print('reached')\n"
             "except Exception as e: print('refused', type(e).__name__)\n")
    out = on_host("vps1", f"""
one_ips=$(docker inspect -f '{{{{range .NetworkSettings.Networks}}}}{{{{.IPAddress}}}} {{{{end}}}}' {one})
for target in synapse-one-test $one_ips; do
  printf '%s ' "$target"
  docker exec {three} python -c {shlex.quote(probe)} "http://$target:8008/health"
done
cd /opt/matrix/reverse_proxy
printf 'certbot '
docker compose run --rm -T --entrypoint python3 certbot -c {shlex.quote(probe)} http://synapse-one-test:8008/health
echo "nginx: $(docker exec {nginx} bash -c 'exec 3<>/dev/tcp/synapse-one-test/8008 && echo reached' 2>&1 || true)"
""")
    lines = out.strip().splitlines()
    assert len(lines) >= 4, out
    assert all("refused" in line for line in lines[:-1]), out
    assert lines[-1] == "nginx: reached", out


def test_unreachable_host_is_reported_and_others_finish(deployed):
    def change(doc):
        doc["hosts"]["gone"] = {"address": "172.29.231.99", "user": "root",
                                "key": "tests/sandbox/state/id_ed25519", "images": "push"}
        doc["homeservers"]["four.test"] = {"host": "gone"}
        doc["ssh"]["connect_timeout"] = 3

    inv = variant("unreachable", change)
    started = time.monotonic()
    res = run(["inv", "deploy"], inv)
    assert res.returncode == 1
    assert "gone: FAILED" in res.stdout and "unreachable" in res.stdout
    assert "vps1: 0 changed" in res.stdout and "vps2: 0 changed" in res.stdout
    assert "1 failed: gone" in res.stdout
    assert time.monotonic() - started < 60


def test_second_run_waits_for_the_lock_then_names_the_holder(deployed):
    from fabfile.inventory import load
    from fabfile.remote import open_remote

    def short_wait(doc):
        doc["ssh"]["lock_timeout"] = 2

    inv_path = variant("lock", short_wait)
    inv = load(inv_path)
    holder = open_remote(inv, inv.hosts["vps1"])
    holder.lock(5)
    try:
        started = time.monotonic()
        res = run(["inv", "deploy", "--host", "vps1"], inv_path)
        assert res.returncode == 75  # EX_TEMPFAIL: try again later
        assert "another run holds the lock after waiting 2s" in res.stdout
        assert "held by" in res.stdout and f"pid {os.getpid()}" in res.stdout
        assert time.monotonic() - started < 30
    finally:
        holder.close()
    assert run(["inv", "deploy", "--host", "vps1"], inv_path).returncode == 0


def test_killed_mid_deploy_then_rerun_finishes_the_job(deployed):
    """The run is killed (its SSH connection dies) right after it wrote a changed
    Synapse setting and before the restart: the re-run must still restart it."""
    def change(doc):
        # hosts.yaml shares one synapse_settings mapping (a YAML alias): change a copy
        settings = dict(doc["homeservers"]["three.test"]["synapse_settings"])
        settings["presence"] = {"enabled": False}
        doc["homeservers"]["three.test"]["synapse_settings"] = settings

    inv = variant("killed", change)
    before = starts("vps1")
    env = {**os.environ, "INVOKE_INVENTORY": str(inv)}
    proc = subprocess.Popen([str(BIN / "inv"), "deploy", "--host", "vps1"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # kill as soon as the files are written
        if "restarting Synapse" in line:
            proc.kill()
            break
    proc.wait(30)
    assert proc.returncode != 0, "the run finished before it could be killed"
    # what the killed run still owed is on the host
    owed = on_host("vps1", "cat /opt/matrix/.synapse-fabric-pending").split()
    assert "synapse:three.test:restart" in owed and "synapse:one.test:restart" not in owed, owed
    res = run(["inv", "deploy", "--host", "vps1"], inv)
    assert res.returncode == 0 and "three.test (restart)" in res.stdout, res.stdout
    assert "one.test (restart)" not in res.stdout
    assert on_host("vps1", "test -e /opt/matrix/.synapse-fabric-pending && echo owed || echo done").strip() == "done"
    after = starts("vps1")
    assert after["synapse-three-test/synapse"] != before["synapse-three-test/synapse"]
    assert after["synapse-one-test/synapse"] == before["synapse-one-test/synapse"]
    # serving when the deploy returns: its health check passes (Docker may not have run it yet)
    on_host("vps1", f"docker exec {ctr('synapse-three-test', 'synapse')} curl -fsS http://localhost:8008/health")
    res = run(["inv", "deploy", "--host", "vps1"], inv)
    assert "vps1: 0 changed" in res.stdout and "restarted 0" in res.stdout
    assert run(["inv", "deploy", "--host", "vps1"]).returncode == 0  # back to the example inventory


def test_rendered_files_pass_their_real_consumers(deployed):
    """Each rendered file, read by the program that consumes it on the host:
    compose (both flavours' `config`), `nginx -t`, and Synapse's own config parser
    over homeserver.yaml + conf.d/ (the same files the running server loads)."""
    nginx, one, three = ctr("synapse-fabric-proxy", "nginx"), ctr("synapse-one-test", "synapse"), \
        ctr("synapse-three-test", "synapse")
    out = on_host("vps1", rf"""
set -e
cd /opt/matrix/reverse_proxy && docker compose config -q && echo proxy-compose-ok
for d in /opt/matrix/synapse/*/; do (cd "$d" && docker compose config -q && echo "$(basename "$d")-compose-ok"); done
docker exec {nginx} nginx -t 2>&1
for c in {one} {three}; do
  # server_name comes from what `generate` wrote, public_baseurl from our conf.d/
  docker exec $c python -m synapse.config read server.server_name -c /data/homeserver.yaml -c /conf.d/
  docker exec $c python -m synapse.config read server.public_baseurl -c /data/homeserver.yaml -c /conf.d/
done
""")
    assert "warn" not in out  # nothing deprecated in what we render (e.g. `listen ... http2`)
    assert "proxy-compose-ok" in out and "one.test-compose-ok" in out and "three.test-compose-ok" in out
    assert "test is successful" in out
    assert out.count("Config parses OK!") == 4
    assert "server.server_name: one.test" in out and "server.server_name: three.test" in out
    assert "https://matrix.one.test/" in out and "https://matrix.three.test/" in out


def test_host_keys_are_checked(deployed, tmp_path):
    from fabfile.remote import HostKeyError

    key = tmp_path / "known_hosts"
    good = (REPO / "tests/sandbox/state/known_hosts").read_text()

    def with_known(content: str, accept_new: bool = False):
        key.write_text(content)
        return variant(f"hostkey-{accept_new}", lambda doc: doc["ssh"].update(
            {"known_hosts": str(key), "accept_new_hosts": accept_new}))

    # a changed key stops the run, naming the problem
    # vps1's address with another host's (real, well-formed) key
    other = next(l for l in good.splitlines() if l.startswith("172.29.231.12 "))
    forged = "172.29.231.11 " + other.split(" ", 1)[1]
    res = run(["inv", "deploy", "--host", "vps1"], with_known(forged + "\n"))
    assert res.returncode == 1 and "host key CHANGED" in res.stdout
    # an unknown host is refused unless the inventory allows accept-new
    res = run(["inv", "deploy", "--host", "vps1"], with_known(""))
    assert res.returncode == 1 and "host key unknown" in res.stdout
    res = run(["inv", "deploy", "--host", "vps1"], with_known("", accept_new=True))
    assert res.returncode == 0, res.stdout
    assert "172.29.231.11 ssh-ed25519 " in key.read_text()
    with pytest.raises(HostKeyError):
        from fabfile.inventory import load
        from fabfile.remote import open_remote
        key.write_text(forged + "\n")
        open_remote(load(with_known(forged + "\n", accept_new=True)), load(INVENTORY).hosts["vps1"])


def test_locks_live_in_a_root_only_directory(deployed):
    from tests.sandbox import sandbox as sb

    assert on_host("vps2", "stat -c '%U %a' /run/synapse-fabric").strip() == "root 700"
    # the unprivileged login cannot take (and so cannot hold) the deploy lock
    with sb.connection("vps2") as conn:
        res = conn.run("flock -n /run/synapse-fabric/deploy.lock true", hide=True, warn=True)
        assert res.exited != 0 and "Permission denied" in res.stderr


def test_a_new_base_dir_is_refused_while_the_old_one_holds_homeservers(deployed):
    """A changed base_dir would fork two.test (new secrets, new signing key, an empty
    database under the same compose project): refused, nothing written."""
    assert run(["inv", "deploy", "--host", "vps2"]).returncode == 0
    assert on_host("vps2", "cat /etc/synapse-fabric/base-dir").strip() == "/opt/matrix"

    def move(doc):
        doc["hosts"]["vps2"]["base_dir"] = "/srv/matrix"

    res = run(["inv", "deploy", "--host", "vps2"], variant("base-dir", move))
    assert res.returncode == 1, res.stdout  # a failed host
    assert "deployed with base_dir /opt/matrix, which still holds two.test" in res.stderr + res.stdout
    assert on_host("vps2", "[ -e /srv/matrix ] && echo exists || echo absent").strip() == "absent"
    assert "0 changed" in run(["inv", "deploy", "--host", "vps2"]).stdout


def test_an_operator_runs_the_tasks_against_their_own_inventory_repository(deployed, tmp_path):
    """hosts.yaml lives in the operator's own repository (here a temporary directory
    with its keys beside it); the tasks run from there with `inv -r <this checkout>`,
    and paths inside the inventory are relative to it."""
    own = tmp_path / "ops-repo"
    (own / "keys").mkdir(parents=True)
    state = REPO / "tests/sandbox/state"
    for name in ("id_ed25519", "known_hosts", "pebble-ca.pem", "acme-roots.pem", "element-signing-key.gpg"):
        (own / "keys" / name).write_bytes((state / name).read_bytes())
    (own / "keys/id_ed25519").chmod(0o600)
    (own / "hosts.yaml").write_text(INVENTORY.read_text().replace("tests/sandbox/state/", "keys/"))
    env = {k: v for k, v in os.environ.items() if k not in ("INVOKE_INVENTORY", "FABRIC_INVENTORY")}
    res = subprocess.run([str(BIN / "inv"), "-r", str(REPO), "deploy", "--host", "vps2"], cwd=own, env=env,
                         capture_output=True, text=True, timeout=300)
    print(res.stdout, res.stderr)
    assert res.returncode == 0 and "vps2: 0 changed" in res.stdout
