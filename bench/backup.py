"""Benchmark: backups and a restore on the sandbox. A homeserver of its own
(bench.test on vps1, its repository on the sandbox's backup store) gets 20 MB of
media and 200 messages; then: the first snapshot (time, bytes added, the
repository's size), a second with nothing changed and a third after 1 MB more
(the incremental cost), and a restore on the same host after its directory and
database are destroyed (time until it serves again). Writes bench/results/backup.json.
Not a test: nothing asserts a time.

    .venv/bin/python -m bench.backup     # sandbox up, vps1 deployed
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

from bench import drop_homeserver, place_homeserver, write_figures

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SN = "bench.test"


def inv(argv, inventory, stdin=None):
    t0 = time.monotonic()
    res = subprocess.run([str(BIN / "inv"), *argv], cwd=REPO, capture_output=True, text=True, input=stdin,
                         env={**os.environ, "INVOKE_INVENTORY": str(inventory)})
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{res.stdout}\n{res.stderr}")
    return time.monotonic() - t0, res.stdout


def snapshot(inventory) -> dict:
    secs, out = inv(["backup", "--homeserver", SN], inventory)
    m = re.search(r"\(([\d.]+ \w+) of files, ([\d.]+ \w+) new\) in ([\d.]+)s", out)
    return {"inv_backup_seconds": round(secs, 1), "files": m.group(1), "added": m.group(2),
            "on_host_seconds": float(m.group(3))}


async def fill(megabytes: int, messages: int, sn: str = SN, url: str = "") -> None:
    """User `bench` (password "bench pw") of `sn` posts files and messages in a new room
    (through `url`, default https://matrix.<sn>)."""
    from nio import LoginResponse
    from tests.sandbox.client import SandboxClient

    async with SandboxClient(url or f"https://matrix.{sn}", REPO / "tests/sandbox/state/acme-roots.pem") as c:
        assert isinstance(await c.login("bench", "bench pw"), LoginResponse)
        room = (await c.client.room_create(name="bench")).room_id
        for _ in range(megabytes):
            data = secrets.token_bytes(1024 * 1024)
            up, _ = await c.client.upload(io.BytesIO(data), content_type="application/octet-stream",
                                          filesize=len(data))
            await c.client.room_send(room, "m.room.message", {"msgtype": "m.file", "body": "f", "url": up.content_uri})
        for i in range(messages):
            await c.client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": f"message {i}"})


def repo_size(host: str) -> str:
    from tests.e2e.helpers import on_host

    return on_host(host, f"RESTIC_REPOSITORY=rest:http://store.test:8000/{RUN}/{host} "
                         "RESTIC_PASSWORD_FILE=/etc/synapse-fabric/backup/restic-password "
                         "restic stats --mode raw-data | awk -F': *' '/Total Size/ {print $2}'").strip()


RUN = f"bench-{time.strftime('%Y%m%d%H%M%S')}"


def main() -> int:
    import yaml

    from tests.e2e.helpers import on_host

    doc = yaml.safe_load((REPO / "hosts.yaml").read_text())
    doc["homeservers"][SN] = {**{k: doc["homeservers"]["one.test"][k] for k in ("federation", "synapse_settings")},
                              "host": "vps1"}
    doc["backup"] = {"repository": f"rest:http://store.test:8000/{RUN}"}
    inventory = REPO / ".bench-backup.yaml"
    inventory.write_text(yaml.safe_dump(doc, sort_keys=False))
    place_homeserver(SN, "vps1")
    figures: dict = {"homeserver": SN, "host": "vps1 (Debian 13)", "repository": "restic REST server (store.test)"}
    try:
        inv(["deploy", "--host", "vps1"], inventory)
        inv(["register-user", "--homeserver", SN, "--user", "bench", "--password-file", "-"], inventory, "bench pw")
        asyncio.run(fill(20, 200))
        figures["size_on_disk"] = on_host("vps1", f"du -sh /opt/matrix/synapse/{SN}/data /opt/matrix/synapse/{SN}/postgres"
                                                  " | awk '{print $2\": \"$1}'").strip().replace("\n", ", ")
        figures["first_snapshot"] = snapshot(inventory)
        figures["repository_after_first"] = repo_size("vps1")
        figures["second_snapshot_nothing_changed"] = snapshot(inventory)
        asyncio.run(fill(1, 0))
        figures["third_snapshot_after_1_MB_more"] = snapshot(inventory)
        figures["repository_after_third"] = repo_size("vps1")
        on_host("vps1", f"cd /opt/matrix/synapse/{SN} && docker compose down >/dev/null 2>&1; rm -rf /opt/matrix/synapse/{SN}")
        secs, out = inv(["restore", "--homeserver", SN], inventory)
        figures["restore_same_host_seconds"] = round(secs, 1)
        figures["restore_says"] = [line for line in out.splitlines() if "restored" in line]
    finally:
        drop_homeserver(SN, inventory)
        inv(["deploy", "--host", "vps1"], REPO / "hosts.yaml")
        inventory.unlink(missing_ok=True)
    return write_figures("backup", figures)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
