"""Benchmark: what a no-op `inv deploy` costs, and how that grows with hosts and
homeservers. Writes bench/results/fanout.json and prints it. Not a test.

    .venv/bin/python -m bench.fanout        # the sandbox up, vps1 deployed

Three ratios, each the median of 20 paired runs (A then B, alternately), whole
processes as an operator starts them:
  1. `inv deploy --host vps1` (a real Debian 13 host, 2 homeservers) / `ssh vps1 true`
  2. a no-op deploy of 20 hosts / of 1 host
  3. a no-op deploy of 1 host holding 10 homeservers / holding 1

For 2 and 3 the hosts are light stand-ins started here on the sandbox network
(sfab-bench-NN: Debian, sshd, nothing else). They hold exactly what render says
for a bench inventory (written here from render's own output). A converged
host's facts ask Docker's API once (curl, read with jq); on the stand-ins, curl
and jq are stand-in commands that answer as a converged host's engine would
(its version, containers and images); like a converged host, they have the
compose v2 plugin where the Docker CLI looks for it, and a docker command.
So the figures measure the deploy's own work (render, SSH, lock, facts, plan) at
that size; no container runs there, and nothing but a no-op is measured on them.

The stand-ins share this machine's two cores with the deploy they answer, which
real hosts do not. A stock sshd spends about 50 ms of CPU on each new connection
(it executes itself again, then runs the PAM session stack), and twenty of them
are a second of the CPU the deploy also needs. So ratio 2 is measured against an
sshd on port 2222 that skips both (`sshd -r -o UsePAM=no`, about 28 ms), and
once more, for comparison, against the stock sshd on port 22
(`noop_20_hosts_vs_1_host_stock_sshd`). Both runs of each pair use the same sshd.
"""

from __future__ import annotations

import io
import os
import resource
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

from bench import write_figures

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PAIRS = int(os.environ.get("SFAB_BENCH_PAIRS", "20"))  # one pair moves by +-10% on shared cores
PREFIX = "sfab-bench-"
LIGHT_SSHD_PORT = 2222  # the stand-ins' second sshd: no re-exec, no PAM (see above)
COMPOSE_PLUGIN = "/usr/libexec/docker/cli-plugins/docker-compose"  # where Debian's docker-compose puts it

DOCKER_STUB = r"""#!/bin/sh
# synapse-fabric benchmark: the Docker CLI's place on a light host. The facts only
# look for it (they ask the engine through curl and jq); anything run through it fails.
echo "benchmark stand-in for docker: not answered: $*" >&2
exit 1
"""
# A converged host's facts ask the engine's API once (curl) and read the answer
# with jq; the stand-ins take that same path. Their curl answers every URL with an
# empty list (and the engine's version in a header), and their jq prints what jq
# makes of a converged host's answer.
# Shell builtins only: the stand-ins' own cost is not the deploy's.
CURL_STUB = r"""#!/bin/sh
# synapse-fabric benchmark: stands in for curl on a light host (the Docker API):
# the engine's headers where -D asks for them, and an empty list
while [ $# -gt 0 ]; do
  case $1 in -D) printf 'HTTP/1.1 200 OK\r\nServer: Docker/26.1.5 (linux)\r\n\r\n' > "$2"; shift ;; esac
  shift
done
echo '[]'
"""
JQ_STUB = r"""#!/bin/sh
# synapse-fabric benchmark: stands in for jq on a light host: the records a
# converged host's Docker API answer gives
show() { while IFS= read -r line; do printf '%s\n' "$line"; done < "$1"; }
show /etc/sfab-bench/ps
show /etc/sfab-bench/images
"""


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def _timed(argv, env, cpu: list | None = None) -> float:
    """Wall seconds of one run; its CPU seconds (user + system) appended to `cpu`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    res = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    took = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{res.stdout[-3000:]}")
    if cpu is not None:
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return took


def paired(a, b, env_a, env_b) -> dict:
    """Median of A, of B, and of A/B pair by pair (after one warm-up of each)."""
    _timed(a, env_a), _timed(b, env_b)
    ta, tb, ca, cb = [], [], [], []
    for _ in range(PAIRS):
        ta.append(_timed(a, env_a, ca))
        tb.append(_timed(b, env_b, cb))
    return {"a_median_s": round(statistics.median(ta), 3), "b_median_s": round(statistics.median(tb), 3),
            "ratio_median": round(statistics.median(x / y for x, y in zip(ta, tb)), 2), "pairs": PAIRS,
            # this machine's side: the deploy process (or ssh) itself
            "a_cpu_median_s": round(statistics.median(ca), 3), "b_cpu_median_s": round(statistics.median(cb), 3)}


def hosts_cpu_seconds(containers: list[str]) -> float:
    """CPU the light hosts' containers have used so far (their cgroups, v1 or v2)."""
    total = 0.0
    for c in containers:
        cid = _run(["docker", "inspect", "-f", "{{.Id}}", c]).stdout.strip()
        v1 = Path(f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage")
        v2 = Path(f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat")
        if v1.exists():
            total += int(v1.read_text()) / 1e9
        elif v2.exists():
            total += int(dict(line.split() for line in v2.read_text().splitlines())["usage_usec"]) / 1e6
    return total


def light_inventory(hosts: dict[str, str], per_host: dict[str, int], key: Path, known_hosts: Path,
                    port: int = 22) -> dict:
    doc = {"ssh": {"known_hosts": str(known_hosts)}, "acme": {"enabled": False},
           "hosts": {}, "homeservers": {}}
    for name, ip in hosts.items():
        doc["hosts"][name] = {"address": ip, "port": port, "user": "root", "key": str(key), "images": "pull"}
        for i in range(per_host.get(name, 1)):
            doc["homeservers"][f"hs{i}.{name}.bench"] = {"host": name}
    return doc


def converged_tree(state) -> tuple[bytes, str, str]:
    """A tar of everything render says the host holds (and the files generate,
    the secrets step and a certificate would have made), plus what the stand-in
    docker prints for its containers and images."""
    from fabfile.facts import cert_paths, generated_paths, secret_paths
    from fabfile.render import PROXY_PROJECT, synapse_project

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(path, data=b"", mode=0o644, owner="0:0", kind=tarfile.REGTYPE):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.type, info.mode, info.size = kind, mode, len(data)
            info.uid, info.gid = (int(x) for x in owner.split(":"))
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        for d in state.dirs:
            add(d.path, mode=d.mode, owner=d.owner, kind=tarfile.DIRTYPE)
        for f in state.files:
            if f.when in ("", "no-systemd"):
                add(f.path, f.content, f.mode, f.owner)
        for path in secret_paths(state) + generated_paths(state) + cert_paths(state):
            add(path, b"bench\n", 0o400, "991:991" if "/data/" in path else "0:0")
    ps = [f"C\t{PROXY_PROJECT}\tnginx\trunning\tUp (healthy)\tb0\t{state.image_refs['nginx']}\t{state.layout.proxy}"]
    for hs in state.homeservers:
        for svc in ("synapse", "postgres"):
            image = state.image_refs["synapse"] if svc == "synapse" else state.postgres_image(hs)
            ps.append(f"C\t{synapse_project(hs)}\t{svc}\trunning\tUp (healthy)\tb1\t{image}\t"
                      f"{state.layout.synapse(hs.server_name)}")
    images = [f"I\t{ref}\tsha256:{i:064x}" for i, ref in enumerate(state.images)]
    return buf.getvalue(), "\n".join(ps) + "\n", "\n".join(images) + "\n"


def main() -> int:
    from fabfile.inventory import load, parse
    from fabfile.render import render_host
    from tests.sandbox import sandbox as sb

    tags = sb.image_tags(build=False)
    info = sb.info()
    figures: dict = {"machine": f"{os.cpu_count()} cores"}
    env = {**os.environ, "INVOKE_INVENTORY": str(REPO / "hosts.yaml")}

    # 1. a real host: no-op deploy of vps1 / ssh vps1 true
    inv = load(REPO / "hosts.yaml")
    vps1 = inv.hosts["vps1"]
    ssh = ["ssh", "-i", str(info.key), "-o", f"UserKnownHostsFile={info.known_hosts}", "-o", "BatchMode=yes",
           f"root@{vps1.address}", "true"]
    deploy_vps1 = [str(BIN / "inv"), "deploy", "--host", "vps1"]
    _timed(deploy_vps1, env)  # converged first
    figures["noop_one_host_vs_ssh_true"] = paired(deploy_vps1, ssh, env, env)

    # 2 and 3: light hosts
    work = Path(tempfile.mkdtemp(prefix="sfab-bench-"))
    names = {f"light{i:02d}": f"172.29.231.{100 + i}" for i in range(21)}  # light20 holds 10 homeservers
    known = work / "known_hosts"
    try:
        lines = []
        for name, ip in names.items():
            keydir = work / name
            keydir.mkdir()
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keydir / "ssh_host_ed25519_key")],
                 check=True)
            kind, b64 = (keydir / "ssh_host_ed25519_key.pub").read_text().split(" ")[:2]
            lines += [f"{ip} {kind} {b64}\n", f"[{ip}]:{LIGHT_SSHD_PORT} {kind} {b64}\n"]
            with socket.socket(socket.AF_UNIX) as sock:  # where the facts look for the engine
                sock.bind(str(keydir / "docker.sock"))
            _run(["docker", "rm", "-f", PREFIX + name])
            _run(["docker", "run", "-d", "--name", PREFIX + name, "--hostname", name, "--network", sb.NETWORK,
                  "--ip", ip, "-v", f"{keydir}/ssh_host_ed25519_key:/etc/sfab-seed/ssh_host_ed25519_key:ro",
                  "-v", f"{keydir}/ssh_host_ed25519_key.pub:/etc/sfab-seed/ssh_host_ed25519_key.pub:ro",
                  "-v", f"{info.key}.pub:/etc/sfab-seed/authorized_keys:ro",
                  "-v", f"{keydir}/docker.sock:/var/run/docker.sock", tags["host"]], check=True)
        known.write_text("".join(lines))
        per_host = {"light20": 10}
        doc = light_inventory(names, per_host, info.key, known)
        bench_inv = parse(yaml.safe_dump(doc), REPO / ".bench-hosts.yaml")
        for name in names:
            tree, ps, images = converged_tree(render_host(bench_inv, name))
            c = PREFIX + name
            subprocess.run(["docker", "exec", "-i", c, "tar", "-x", "-p", "--same-owner", "--numeric-owner",
                            "-C", "/"], input=tree, check=True)
            for program, text in (("docker", DOCKER_STUB), ("curl", CURL_STUB), ("jq", JQ_STUB)):
                subprocess.run(["docker", "exec", "-i", c, "sh", "-c", f"cat > /usr/local/bin/{program} && "
                                f"chmod 755 /usr/local/bin/{program}"], input=text.encode(), check=True)
            subprocess.run(["docker", "exec", c, "sh", "-c", f"mkdir -p /etc/sfab-bench {COMPOSE_PLUGIN.rsplit('/', 1)[0]}"
                            f" && ln -sf /usr/local/bin/docker {COMPOSE_PLUGIN}"], check=True)
            for fname, text in (("ps", ps), ("images", images)):
                subprocess.run(["docker", "exec", "-i", c, "sh", "-c", f"cat > /etc/sfab-bench/{fname}"],
                               input=text.encode(), check=True)
        deadline = time.monotonic() + 30
        for name, ip in names.items():  # sshd up everywhere, then the light one beside it
            for port in (22, LIGHT_SSHD_PORT):
                while _run(["ssh", "-i", str(info.key), "-o", f"UserKnownHostsFile={known}", "-o", "BatchMode=yes",
                            "-o", "ConnectTimeout=2", "-p", str(port), f"root@{ip}", "true"]).returncode != 0:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{ip}:{port}: no SSH")
                    time.sleep(0.5)
                if port == 22:
                    _run(["docker", "exec", PREFIX + name, "/usr/sbin/sshd", "-r", "-p", str(LIGHT_SSHD_PORT),
                          "-o", "UsePAM=no"], check=True)

        def inventory(hosts: list[str], per: dict[str, int], label: str, port: int = LIGHT_SSHD_PORT) -> dict:
            path = work / f"{label}.yaml"
            path.write_text(yaml.safe_dump(light_inventory({h: names[h] for h in hosts}, per, info.key, known,
                                                           port)))
            return {**os.environ, "INVOKE_INVENTORY": str(path)}

        deploy_all = [str(BIN / "inv"), "deploy"]
        twenty = inventory([f"light{i:02d}" for i in range(20)], {}, "twenty")
        one = inventory(["light00"], {}, "one")
        ten_hs = inventory(["light20"], per_host, "ten-homeservers")
        twenty_stock = inventory([f"light{i:02d}" for i in range(20)], {}, "twenty-stock-sshd", 22)
        one_stock = inventory(["light00"], {}, "one-stock-sshd", 22)
        for e in (twenty, one, ten_hs, twenty_stock, one_stock):  # each a no-op already: the hosts are converged
            out = subprocess.run(deploy_all, cwd=REPO, env=e, capture_output=True, text=True)
            if out.returncode != 0 or " 0 changed" not in out.stdout or "changed," in out.stdout.replace(" 0 changed,", ""):
                raise SystemExit(f"a light host is not converged:\n{out.stdout[-3000:]}{out.stderr[-2000:]}")
        light = [PREFIX + n for n in names]
        before = hosts_cpu_seconds(light)
        figures["noop_20_hosts_vs_1_host"] = paired(deploy_all, deploy_all, twenty, one)
        # the light hosts share this machine's cores with the deploy: what their side
        # (sshd, the facts script) used per run of the pair, for reading the ratio
        figures["noop_20_hosts_vs_1_host"]["hosts_cpu_s_per_pair"] = round(
            (hosts_cpu_seconds(light) - before) / (PAIRS + 1), 3)
        figures["noop_10_homeservers_vs_1_on_one_host"] = paired(deploy_all, deploy_all, ten_hs, one)
        before = hosts_cpu_seconds(light)
        figures["noop_20_hosts_vs_1_host_stock_sshd"] = paired(deploy_all, deploy_all, twenty_stock, one_stock)
        figures["noop_20_hosts_vs_1_host_stock_sshd"]["hosts_cpu_s_per_pair"] = round(
            (hosts_cpu_seconds(light) - before) / (PAIRS + 1), 3)
    finally:
        if os.environ.get("SFAB_BENCH_KEEP"):  # for a look (profiling): `docker rm -f` them after
            print(f"kept: {PREFIX}* and the inventories in {work}")
        else:
            for name in names:
                _run(["docker", "rm", "-f", PREFIX + name])
    figures["goals"] = {"noop_one_host_vs_ssh_true": "<= 2.5", "noop_20_hosts_vs_1_host": "<= 2",
                        "noop_10_homeservers_vs_1_on_one_host": "<= 1.2"}
    return write_figures("fanout", figures)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
