"""Benchmark: bootstrap of a bare host, a no-op `inv deploy` of all hosts, and a bare
`ssh host true` for scale, on the sandbox. Writes bench/results/deploy.json and
prints the figures. Not a test: nothing here asserts a time.

    .venv/bin/python -m bench.deploy            # needs the sandbox up (inv -c tasks_dev sandbox.up)

The bootstrap figure needs a bare host: the sandbox's vps3 is recreated bare and
given a copy of the example inventory's vps1 homeservers (one.test, three.test).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import write_figures

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def timed(argv, env=None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return time.monotonic() - t0, res


def main() -> int:
    from fabfile.deploy import deploy, select_hosts
    from fabfile.inventory import load
    from fabfile.remote import open_remote
    from fabfile.report import Reporter
    from tests.sandbox import sandbox as sb

    inv_path = REPO / "hosts.yaml"
    inv = load(inv_path)
    figures: dict = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "hosts": list(inv.hosts)}

    # 1. a bare `ssh host true`, for scale (new connection each time, like a task run)
    samples = []
    for _ in range(5):
        t0 = time.monotonic()
        r = open_remote(inv, inv.hosts["vps1"])
        r.run("true")
        r.close()
        samples.append(time.monotonic() - t0)
    figures["ssh_true_seconds_median"] = round(statistics.median(samples), 3)

    # 2. bootstrap of a bare host: vps3 recreated bare, given one.test + three.test
    tags = sb.image_tags(build=False)
    sb._compose("rm", "-s", "-f", "vps3", tags=tags)
    subprocess.run(["docker", "volume", "rm", "-f", "sfab-vps3-docker"], capture_output=True)
    sb._compose("up", "-d", "vps3", tags=tags)
    sb.wait_ssh()
    doc = yaml.safe_load(inv_path.read_text())
    for sn in ("one.test", "three.test"):
        doc["homeservers"][sn]["host"] = "vps3"
    doc["homeservers"] = {k: v for k, v in doc["homeservers"].items() if v["host"] == "vps3"}
    bench_inv = REPO / ".bench-hosts.yaml"
    bench_inv.write_text(yaml.safe_dump(doc, sort_keys=False))
    # the ACME CA validates the names over HTTP: point them at vps3 meanwhile
    names = ["one.test", "matrix.one.test", "element.one.test", "three.test", "matrix.three.test"]
    for name in names:
        sb.set_dns(name, sb.host_addr("vps3"))
    try:
        secs, res = timed([str(BIN / "fab"), "-H", "vps3", "bootstrap"], {"FABRIC_INVENTORY": str(bench_inv)})
        figures["bootstrap_bare_host_seconds"] = round(secs, 1)
        figures["bootstrap_ok"] = res.returncode == 0
        summary = res.stdout[res.stdout.rfind("vps3: ", 0, res.stdout.rfind("host(s)")):].strip()
        figures["bootstrap_summary"] = summary.splitlines()[:20] + ([res.stderr[-500:]] if res.stderr else [])
    finally:
        bench_inv.unlink(missing_ok=True)
        for name in names:
            sb.set_dns(name, sb.host_addr("vps1"))

    # 3. no-op deploy of the example inventory's hosts: wall time and remote commands
    names = select_hosts(inv, None, None)
    deploy(inv, names, report=Reporter(open(os.devnull, "w")))  # converge first
    runs = []
    for _ in range(3):
        secs, res = timed([str(BIN / "inv"), "deploy"])
        runs.append(secs)
    figures["noop_deploy_seconds_median"] = round(statistics.median(runs), 2)
    figures["noop_deploy_output"] = res.stdout.strip().splitlines()
    results = deploy(inv, names, report=Reporter(open(os.devnull, "w")))
    figures["noop_remote_commands_per_host"] = {r.host: r.commands for r in results}
    figures["noop_changed_per_host"] = {r.host: r.changed for r in results}

    return write_figures("deploy", figures)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
