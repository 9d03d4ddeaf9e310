"""Benchmark: the downtime of the two upgrades, as a client sees it. A homeserver
of its own (upgrade.test on vps2) made on Synapse 1.162.0 and PostgreSQL 15 gets
20 MB of media and 200 messages; then `inv upgrade` (Synapse 1.163.2) and `inv
upgrade-postgres --to 17` run while a prober requests its client API every 100 ms.
Writes bench/results/upgrades.json. Not a test: nothing asserts a time.

    .venv/bin/python -m bench.upgrades     # sandbox up, vps2 deployed
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

from bench import drop_homeserver, place_homeserver, write_figures
from bench.backup import fill, inv

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SN = "upgrade.test"
ROOTS = REPO / "tests/sandbox/state/acme-roots.pem"


def write_inventory(path: Path, synapse: str) -> None:
    import yaml

    doc = yaml.safe_load((REPO / "hosts.yaml").read_text())
    doc["homeservers"][SN] = {**{k: doc["homeservers"]["one.test"][k] for k in ("federation", "synapse_settings")},
                              "host": "vps2", "postgres": {"image": "postgres:15-bookworm"}}
    doc["images"] = {"synapse": synapse}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def timed(argv, inventory) -> dict:
    from tests.sandbox.probe import Prober

    with Prober(ROOTS, name=f"matrix.{SN}") as prober:
        time.sleep(1)
        secs, out = inv(argv, inventory)
        time.sleep(2)
    said = re.search(r"downtime ([\d.]+)s", out)
    return {"task_seconds": round(secs, 1), "downtime_task_says_seconds": float(said.group(1)) if said else None,
            "downtime_client_sees_seconds": round(prober.downtime, 1),
            "probes_ok": prober.ok, "probes_failed": prober.failed}


def main() -> int:
    from tests.e2e.helpers import on_host

    inventory = REPO / ".bench-upgrades.yaml"
    write_inventory(inventory, "matrixdotorg/synapse:v1.162.0")
    place_homeserver(SN, "vps2")
    figures: dict = {"homeserver": SN, "host": "vps2 (Debian 12, images pushed)", "data": "20 MB of media, 200 messages"}
    try:
        inv(["deploy", "--host", "vps2"], inventory)
        inv(["register-user", "--homeserver", SN, "--user", "bench", "--password-file", "-"], inventory, "bench pw")
        asyncio.run(fill(20, 200, SN))
        write_inventory(inventory, "matrixdotorg/synapse:v1.163.2")
        figures["synapse_1.162.0_to_1.163.2"] = timed(["upgrade", "--homeserver", SN], inventory)
        figures["postgres_15_to_17"] = timed(["upgrade-postgres", "--homeserver", SN, "--to", "17"], inventory)
        figures["postgres_15_to_17"]["size"] = on_host(
            "vps2", f"du -sh /opt/matrix/synapse/{SN}/postgres-15.old | cut -f1").strip()
    finally:
        drop_homeserver(SN, inventory)
        inventory.unlink(missing_ok=True)
    return write_figures("upgrades", figures)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
