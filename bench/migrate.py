"""Benchmark: downtime of `inv migrate-host` on the sandbox. Moves one.test from
vps1 to vps3 and back (each followed by --finish), with a prober requesting
https://matrix.one.test/_matrix/client/versions every 100 ms through the old
address, and writes bench/results/migrate.json. Not a test: nothing asserts a time.

    .venv/bin/python -m bench.migrate     # sandbox up, vps1 deployed, vps3 holding nothing
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench import write_figures


REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROOTS = REPO / "tests/sandbox/state/acme-roots.pem"


def inv(argv, inventory):
    t0 = time.monotonic()
    res = subprocess.run([str(BIN / "inv"), *argv], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "INVOKE_INVENTORY": str(inventory)})
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{res.stdout}\n{res.stderr}")
    return time.monotonic() - t0, res.stdout


def main() -> int:
    from tests.sandbox import sandbox as sb
    from tests.sandbox.probe import Prober

    inventory = REPO / ".bench-migrate.yaml"
    inventory.write_text((REPO / "hosts.yaml").read_text())
    size = subprocess.run(["docker", "exec", "sfab-vps1", "du", "-sh", "/opt/matrix/synapse/one.test"],
                          capture_output=True, text=True).stdout.split("\t")[0]
    figures = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "homeserver": "one.test", "size_on_disk": size}
    try:
        for there, back in (("vps3", "vps1"), ("vps1", "vps3")):
            with Prober(ROOTS) as prober:
                time.sleep(1)
                secs, out = inv(["migrate-host", "--homeserver", "one.test", "--to", there], inventory)
                time.sleep(2)
            stopped = next((l for l in out.splitlines() if "was stopped for" in l), "")
            figures[f"to_{there}"] = {
                "migrate_seconds": round(secs, 1),
                "downtime_seconds_first_to_last_failed_probe": round(prober.downtime, 1),
                "probes_ok": prober.ok, "probes_failed": prober.failed,
                "tool_says": stopped.strip(),
            }
            for name in ("one.test", "matrix.one.test", "element.one.test"):
                sb.set_dns(name, sb.host_addr(there))
            secs, _ = inv(["migrate-host", "--homeserver", "one.test", "--finish", "--yes"], inventory)
            figures[f"to_{there}"]["finish_seconds"] = round(secs, 1)
    finally:
        inventory.unlink(missing_ok=True)
    return write_figures("migrate", figures)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
