"""Benchmark: one homeserver under a client load, without workers and with the
`balanced` preset. Writes bench/results/workers.json and prints it. Not a test.

    .venv/bin/python -m bench.workers      # the sandbox up, vps1 deployed

For each shape, load.test is deployed on vps1 (Debian 13) and CLIENTS users are
registered; they join one room and each keeps a /sync long poll open, while
SENDERS of them send a message every INTERVAL seconds, for SECONDS seconds. All
traffic stays in the sandbox (this machine's 2 cores run the clients, nginx,
PostgreSQL, Redis and every Synapse process at once). Figures per shape:
requests completed per second (sends and syncs), send latency (PUT .../send, the
client's view) and delivery latency (a message's send to its arrival in another
user's /sync) at p50/p99, failed requests, and the memory of the homeserver's
containers (`docker stats` at the end). Then the ratios balanced/none.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time
from pathlib import Path

from bench import drop_homeserver, place_homeserver, write_figures

SN = "load.test"
CLIENTS = int(os.environ.get("SFAB_BENCH_CLIENTS", "30"))
SENDERS = int(os.environ.get("SFAB_BENCH_SENDERS", "10"))
INTERVAL = float(os.environ.get("SFAB_BENCH_INTERVAL", "0.5"))
SECONDS = float(os.environ.get("SFAB_BENCH_SECONDS", "30"))
FAST = {"per_second": 1000, "burst_count": 10000}


def inventory(preset: str) -> Path:
    from tests.e2e.helpers import variant

    def change(doc):
        doc["homeservers"][SN] = {
            "host": "vps1", "registration": "open", "workers": {"preset": preset},
            "federation": {"enabled": False},
            # the load comes from one address, faster than people: Synapse's limits lifted
            "synapse_settings": {"rc_registration": FAST, "rc_joins": {"local": FAST, "remote": FAST},
                                 "rc_joins_per_room": FAST,
                                 "rc_message": FAST, "rc_login": {"address": FAST, "account": FAST,
                                                                  "failed_attempts": FAST}},
        }
    return variant(f"bench-workers-{preset}", change)


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000, 1)


async def load() -> dict:
    from nio import JoinResponse, RegisterResponse, RoomCreateResponse, SyncResponse

    from tests.e2e.helpers import ROOTS
    from tests.sandbox.client import SandboxClient

    run = os.urandom(3).hex()
    clients = [SandboxClient(f"https://matrix.{SN}", ROOTS) for _ in range(CLIENTS)]
    for c in clients:
        await c.__aenter__()
    try:
        for i, c in enumerate(clients):
            got = await c.client.register(f"load{i}-{run}", "load pw")
            assert isinstance(got, RegisterResponse), got
        room = await clients[0].client.room_create(name="load", preset=None, is_direct=False,
                                                   initial_state=[{"type": "m.room.join_rules", "state_key": "",
                                                                   "content": {"join_rule": "public"}}])
        assert isinstance(room, RoomCreateResponse), room
        for c in clients[1:]:
            joined = await c.client.join(room.room_id)
            assert isinstance(joined, JoinResponse), joined
        for c in clients:
            assert isinstance(await c.client.sync(timeout=0), SyncResponse)

        sends, deliveries, syncs, failed = [], [], [0], [0]
        errors: dict[str, int] = {}

        def fail(what: str, got) -> None:
            failed[0] += 1
            key = f"{what}: {type(got).__name__} {getattr(got, 'status_code', '')} {getattr(got, 'message', '')}"[:160]
            errors[key] = errors.get(key, 0) + 1
        sent_at: dict[str, float] = {}
        end = time.monotonic() + SECONDS

        async def syncer(c, observe: bool):
            while time.monotonic() < end:
                got = await c.client.sync(timeout=5000)
                if not isinstance(got, SyncResponse):
                    fail("sync", got)
                    continue
                syncs[0] += 1
                if observe and room.room_id in got.rooms.join:
                    now = time.monotonic()
                    for ev in got.rooms.join[room.room_id].timeline.events:
                        body = getattr(ev, "body", "")
                        if body in sent_at:
                            deliveries.append(now - sent_at.pop(body))

        async def sender(c, n: int):
            k = 0
            while time.monotonic() < end - 2:  # the last messages still have time to arrive
                body = f"{n}-{k}-{run}"
                t0 = time.monotonic()
                sent_at[body] = t0
                got = await c.client.room_send(room.room_id, "m.room.message", {"msgtype": "m.text", "body": body})
                if hasattr(got, "event_id"):
                    sends.append(time.monotonic() - t0)
                else:
                    sent_at.pop(body, None)
                    fail("send", got)
                k += 1
                await asyncio.sleep(max(0.0, INTERVAL - (time.monotonic() - t0)))

        t0 = time.monotonic()
        await asyncio.gather(*(syncer(c, i == 0) for i, c in enumerate(clients)),
                             *(sender(c, i) for i, c in enumerate(clients[1:SENDERS + 1])))
        took = time.monotonic() - t0
        return {"seconds": round(took, 1), "requests_per_s": round((len(sends) + syncs[0]) / took, 1),
                "sends": len(sends), "syncs": syncs[0], "failed": failed[0],
                "send_ms_p50": pct(sends, 50), "send_ms_p99": pct(sends, 99),
                "delivery_ms_p50": pct(deliveries, 50), "delivery_ms_p99": pct(deliveries, 99),
                "delivered": len(deliveries), "undelivered": len(sent_at), "errors": errors}
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)


def memory_mib() -> dict:
    from tests.e2e.helpers import on_host

    out = on_host("vps1", "docker stats --no-stream --format '{{.Name}} {{.MemUsage}}' | grep synapse-load-test")
    units = {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024, "B": 1 / 1048576}
    per = {}
    for line in out.splitlines():
        name, usage = line.split(" ", 1)
        value = usage.split("/")[0].strip()
        num = value.rstrip("KMGiB")
        per[name.removeprefix("synapse-load-test-").removesuffix("-1")] = round(float(num) * units[value[len(num):]], 1)
    return {"total": round(sum(per.values()), 1), "per_container": per}


def main() -> int:
    from tests.e2e.helpers import run

    figures: dict = {"clients": CLIENTS, "senders": SENDERS, "send_interval_s": INTERVAL, "machine": "2 cores"}
    place_homeserver(SN, "vps1")
    for preset in os.environ.get("SFAB_BENCH_PRESETS", "none balanced").split():
        inv = inventory(preset)
        try:
            res = run(["inv", "deploy", "--host", "vps1"], inv)
            if res.returncode != 0:
                raise SystemExit(res.stdout[-3000:] + res.stderr[-2000:])
            time.sleep(5)  # let the processes settle after their start
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            figures[preset] = asyncio.run(load())
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            # the clients are Python on the same 2 cores: their own CPU, for reading the figures
            figures[preset]["load_generator_cpu_s"] = round(cpu1.ru_utime + cpu1.ru_stime
                                                            - cpu0.ru_utime - cpu0.ru_stime, 1)
            figures[preset]["memory_mib"] = memory_mib()
        finally:
            drop_homeserver(SN, inv)
            place_homeserver(SN, "vps1")
    if "balanced" not in figures or "none" not in figures:
        return write_figures("workers-partial", figures)
    a, b = figures["balanced"], figures["none"]
    figures["ratios_balanced_over_none"] = {
        "requests_per_s": round(a["requests_per_s"] / b["requests_per_s"], 2),
        "send_ms_p99": round(a["send_ms_p99"] / b["send_ms_p99"], 2) if a["send_ms_p99"] and b["send_ms_p99"] else None,
        "delivery_ms_p99": (round(a["delivery_ms_p99"] / b["delivery_ms_p99"], 2)
                            if a["delivery_ms_p99"] and b["delivery_ms_p99"] else None),
        "memory": round(a["memory_mib"]["total"] / b["memory_mib"]["total"], 2),
    }
    return write_figures("workers", figures)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
