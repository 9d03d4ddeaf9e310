"""Benchmark: the downtime of `inv adopt`, as a client sees it. Two homeservers made
by hand on vps3 as tests/e2e/test_w_adopt.py makes them, each given 20 MB of media
and 200 messages: adopt1.test (docker-compose, PostgreSQL 15) adopted where it runs,
adopt2.test (`docker run`, SQLite) adopted onto vps1. A prober asks the old address
(plain HTTP on the published port, as the hand-made one is reached) and the new
name (HTTPS through synapse-fabric's proxy) every 100 ms; the downtime is the gap
between the old one's last answer and the new one's first. Writes
bench/results/adopt.json. Not a test: nothing asserts a time.

    .venv/bin/python -m bench.adopt     # sandbox up, vps1 deployed
"""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

from bench import write_figures
from bench.backup import fill, inv

REPO = Path(__file__).resolve().parents[1]


class Switch:
    """Every 100 ms: does the old address answer, does the new name answer."""

    def __init__(self, old_url: str, name: str):
        from tests.sandbox.probe import Prober

        self.old_url = old_url
        self.new = Prober(REPO / "tests/sandbox/state/acme-roots.pem", name=name)
        self.old_ok: list[float] = []
        self.new_ok: list[float] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _old_once(self) -> bool:
        try:
            with urllib.request.urlopen(self.old_url, timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _loop(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            if self._old_once():
                self.old_ok.append(t)
            if self.new._once():
                self.new_ok.append(t)
            self._stop.wait(max(0.0, 0.1 - (time.monotonic() - t)))

    def __enter__(self) -> "Switch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join(10)

    @property
    def downtime(self) -> float | None:
        if not self.old_ok:
            return None
        last_old = self.old_ok[-1]
        first_new = next((t for t in self.new_ok if t > last_old), None)
        return None if first_new is None else round(first_new - last_old, 1)


def adopt(argv: list[str], inventory: Path, old_url: str, name: str) -> dict:
    with Switch(old_url, name) as switch:
        time.sleep(1)
        secs, out = inv(argv, inventory)
        time.sleep(3)
    said = re.search(r"it was stopped for ([\d.]+)s", out)
    first = re.search(r"synapse_port_db, first pass \(while it runs\): ([\d.]+)s", out)
    final = re.search(r"synapse_port_db, final pass: ([\d.]+)s", out)
    waited = re.search(r"background updates done in ([\d.]+)s", out)
    return {"task_seconds": round(secs, 1),
            "downtime_task_says_seconds": float(said.group(1)) if said else None,
            "downtime_client_sees_seconds": switch.downtime,
            **({"synapse_port_db_first_pass_seconds (running)": float(first.group(1)),
                "synapse_port_db_final_pass_seconds (stopped)": float(final.group(1))} if first and final else {}),
            **({"waited_for_background_updates_seconds": float(waited.group(1))} if waited else {})}


def main() -> int:
    import yaml

    from tests.e2e import test_w_adopt as scene
    from tests.e2e.helpers import on_host, run
    from tests.sandbox import sandbox as sb

    inventory = REPO / ".bench-adopt.yaml"
    doc = yaml.safe_load((REPO / "hosts.yaml").read_text())
    inventory.write_text(yaml.safe_dump(doc, sort_keys=False))
    vps3 = sb.HOSTS["vps3"].ip
    figures: dict = {"data": "20 MB of media, 200 messages each"}
    cases = [("adopt1.test", "/srv/bench-adopt1", scene._handmade_compose, 8008, "vps3",
              "docker-compose + PostgreSQL 15, adopted where it runs (vps3)"),
             ("adopt2.test", "/srv/bench-adopt2", scene._handmade_sqlite, 8009, "vps1",
              "docker run + SQLite, adopted onto vps1 (synapse_port_db)")]
    try:
        if run(["fab", "-H", "vps3", "bootstrap"]).returncode != 0:
            raise SystemExit("bootstrap of vps3 failed")
        scene._images_on_vps3()
        for sn, root, make, port, target, what in cases:
            make(sn, root)
            scene._wait_http(f"http://{vps3}:{port}/health")
            container = (f"handmade-{sn.split('.')[0]}" if port == 8009 else on_host(
                "vps3", f"docker ps --format '{{{{.Names}}}}' --filter label=com.docker.compose.project="
                        f"{Path(root).name} --filter label=com.docker.compose.service=synapse").strip())
            scene._register(container, "bench", "bench pw")
            asyncio.run(fill(20, 200, sn, url=f"http://{vps3}:{port}"))
            for name in (sn, f"matrix.{sn}"):
                sb.set_dns(name, sb.HOSTS[target].ip)
            on_host(target, f"rm -f /opt/matrix/.synapse-fabric/uninstalled/{sn}")
            figures[sn] = {"what": what, **adopt(
                ["adopt", "--homeserver", sn, "--from", "vps3", "--to", target], inventory,
                f"http://{vps3}:{port}/_matrix/client/versions", f"matrix.{sn}")}
            figures[sn]["finish_seconds"] = round(inv(["adopt", "--homeserver", sn, "--from", "vps3", "--finish"],
                                                      inventory)[0], 1)
    finally:
        for sn, root, _make, port, _target, _what in cases:
            scene._cleanup(inventory, sn, f"docker rm -f handmade-{sn.split('.')[0]} >/dev/null 2>&1; "
                                          f"cd {root} 2>/dev/null && (docker compose down -v || docker-compose down -v) "
                                          f">/dev/null 2>&1; rm -rf {root}")
        run(["inv", "uninstall", "--host", "vps3"], inventory)  # it leaves that inventory (a copy)
        inventory.unlink(missing_ok=True)
    return write_figures("adopt", figures)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
