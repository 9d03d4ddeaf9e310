"""Synapse workers of one homeserver, as data (pure: no SSH, no templates).

`hosts.yaml` says what an operator reasons about: a preset and/or how many of each
kind (`homeservers.<sn>.workers`). This module turns that into the processes
Synapse's docs/workers.md describes, the settings every process shares (Redis,
instance_map, stream writers, ...), each worker's own file, and the request paths
nginx sends to each kind. render.py writes them; templates lay them out.

Routing (nginx, templates/reverse_proxy/nginx/conf.d/homeserver.conf.j2): a kind's
paths go to one of its workers chosen by a stable hash (a user's syncs and client
requests by the user in the access token; inbound federation by the origin
server), and to the main process whenever that worker cannot be reached (being
added, restarted or removed): nothing is lost while the set changes.
"""

from __future__ import annotations

from dataclasses import dataclass

# Every kind: the Synapse listener resources of its HTTP port, whether it is a
# member of instance_map (it takes replication requests), and what it stands for.
KINDS: dict[str, dict] = {
    "sync": {"resources": ["client"], "doc": "/sync and other long polls (users hashed over them)"},
    "client": {"resources": ["client"], "doc": "client reads, login, sending, keys (users hashed over them)"},
    "federation_reader": {"resources": ["federation"], "doc": "inbound federation (origins hashed over them)"},
    "federation_sender": {"resources": [], "doc": "outbound federation (main stops sending)"},
    "event_persister": {"resources": [], "replication": True, "doc": "writes events (stream_writers.events)"},
    "media": {"resources": ["media", "client", "federation"], "replication": True,
              "doc": "uploads, downloads, thumbnails (main stops serving media); all on one host"},
    "pusher": {"resources": [], "doc": "push notifications (pusher_instances)"},
    "background": {"resources": [], "doc": "background tasks (run_background_tasks_on); at most 1"},
    # (last: a kind's published ports follow from its place here)
    "stream_writer": {"resources": ["client"], "replication": True,
                      "doc": "writes typing, to-device, account data, receipts, presence, push rules"},
}
# the streams a stream_writer writes (Synapse allows one writer for typing, presence
# and push_rules: at most one stream_writer); device_lists stays with main
STREAMS = ("typing", "to_device", "account_data", "receipts", "presence", "push_rules")
MAX_PER_KIND = 16

PRESETS: dict[str, dict[str, int]] = {
    "none": {},
    # the first relief of a busy monolith: federation in and out in processes of their own
    "federation-helper": {"federation_reader": 1, "federation_sender": 1},
    # one of each kind
    "balanced": {"sync": 1, "client": 1, "federation_reader": 1, "federation_sender": 1,
                 "event_persister": 1, "media": 1, "pusher": 1, "background": 1},
}

REPLICATION_PORT = 9093
HTTP_PORT = 8008
REDIS_SERVICE = "redis"
MAIN_SERVICE = "synapse"
WORKER_CONF_DIR = "/workers"  # in the container; NOT under /conf.d (main loads every file there)
SECRETS = ("replication_secret", "redis_password")  # made on the host (fabfile/scripts/synapse-secrets.sh)

# Paths from Synapse's docs/workers.md, by kind. nginx takes the first matching
# regex location, in this order (media first: its federation path is under
# /_matrix/federation too).
ROUTES: dict[str, list[str]] = {
    "media": [
        r"^/_matrix/media/",
        r"^/_matrix/client/v1/media/",
        r"^/_matrix/federation/v1/media/",
    ],
    # docs/workers.md, "The `typing` stream" and the five after it
    "stream_writer": [
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/typing",
        r"^/_matrix/client/(r0|v3|unstable)/sendToDevice/",
        r"^/_matrix/client/(r0|v3|unstable)/.*/tags",
        r"^/_matrix/client/(r0|v3|unstable)/.*/account_data",
        r"^/_matrix/client/(r0|v3|unstable)/rooms/.*/receipt",
        r"^/_matrix/client/(r0|v3|unstable)/rooms/.*/read_markers",
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/presence/",
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/pushrules/",
    ],
    "sync": [
        r"^/_matrix/client/(r0|v3)/sync$",
        r"^/_matrix/client/(api/v1|r0|v3)/events$",
        r"^/_matrix/client/(api/v1|r0|v3)/initialSync$",
        r"^/_matrix/client/(api/v1|r0|v3)/rooms/[^/]+/initialSync$",
    ],
    "client": [
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/(createRoom|publicRooms|joined_rooms|search)$",
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/(joined_members|members|state)$",
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/context/.*$",
        r"^/_matrix/client/v1/rooms/.*/(hierarchy|threads|timestamp_to_event)$",
        r"^/_matrix/client/(v1|unstable)/rooms/.*/relations/",
        r"^/_matrix/client/(r0|v3|unstable)/account/(3pid|whoami|deactivate)$",
        r"^/_matrix/client/(r0|v3)/delete_devices$",
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/devices(/|$)",
        r"^/_matrix/client/versions$",
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/voip/turnServer$",
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/event/",
        r"^/_matrix/client/(r0|v3|unstable)/user/.*/filter(/|$)",
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/directory/room/.*$",
        r"^/_matrix/client/(r0|v3|unstable)/(capabilities|notifications)$",
        r"^/_matrix/client/(r0|v3|unstable)/keys/(query|changes|claim)$",
        r"^/_matrix/client/(r0|v3|unstable)/room_keys/",
        r"^/_matrix/client/(r0|v3|unstable)/keys/upload",
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/keys/(device_signing|signatures)/upload$",
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/login$",
        r"^/_matrix/client/(r0|v3|unstable)/(register|register/available|password_policy)$",
        r"^/_matrix/client/v1/register/m.login.registration_token/validity$",
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/(redact|send|state/)",
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/(join|invite|leave|ban|unban|kick)$",
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/(join|knock)/",
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/profile/",
        r"^/_matrix/client/(r0|v3|unstable)/user_directory/search$",
    ],
    "federation_reader": [
        r"^/_matrix/federation/v1/send/",
        r"^/_matrix/federation/(v1|v2)/",
        r"^/_matrix/key/v2/query",
    ],
}
# how nginx picks one worker of a kind: the user behind the access token, or the origin server
BALANCE = {"media": "user", "stream_writer": "user", "sync": "user", "client": "user", "federation_reader": "origin"}


@dataclass(frozen=True)
class Worker:
    name: str  # worker_name, compose service and instance_map key: sync-1, event-persister-1
    kind: str
    host: str = ""  # the inventory host it runs on ("" before placement: the homeserver's)

    @property
    def resources(self) -> list[str]:
        return KINDS[self.kind]["resources"]

    @property
    def serves_http(self) -> bool:
        return bool(self.resources)

    @property
    def replication(self) -> bool:
        return bool(KINDS[self.kind].get("replication"))

    @property
    def config_file(self) -> str:
        """Its own settings, beside conf.d (fabfile/layout.py Layout.worker_config)."""
        return f"{self.name}.yaml"


def counts(spec) -> dict[str, int]:
    """How many of each kind a homeserver's `workers` asks for: its preset, then
    the counts it names (which replace the preset's)."""
    out = dict(PRESETS[spec.preset])
    for kind in KINDS:
        n = getattr(spec, kind)
        if n is not None:
            out[kind] = n
    return {k: n for k, n in out.items() if n}


def expand(spec, home: str = "") -> list[Worker]:
    """The worker processes, in a stable order (kinds as in KINDS, then numbers),
    each on its host (`spec.hosts`, else `home`: the homeserver's)."""
    want = counts(spec)
    return [Worker(f"{kind.replace('_', '-')}-{i}", kind, spec.hosts.get(kind, home))
            for kind in KINDS for i in range(1, want.get(kind, 0) + 1)]


def placed(hs) -> list[Worker]:
    """A homeserver's workers, each with the host it runs on."""
    return expand(hs.workers, hs.host)


def local(hs) -> list[Worker]:
    """The workers on the homeserver's own host (in its stack)."""
    return [w for w in placed(hs) if w.host == hs.host]


def remote(hs) -> list[Worker]:
    """The workers on other hosts (each host's `synapse-workers/<sn>` stack)."""
    return [w for w in placed(hs) if w.host != hs.host]


def worker_hosts(hs) -> list[str]:
    """The other hosts that run some of its workers."""
    return list(dict.fromkeys(w.host for w in remote(hs)))


def processes(hs) -> str:
    """A homeserver's Synapse services on its own host, main first (names we make:
    safe in shell): what an operation that needs Synapse stopped (a dump, a
    migration) stops."""
    return " ".join(synapse_processes(hs))


def synapse_processes(hs) -> list[str]:
    """The services of its stack that run Synapse, main first."""
    return [MAIN_SERVICE] + [w.name for w in local(hs)]


def refuse_remote(hs, what: str) -> None:
    """Operations that stop or move a homeserver act on its own host: refused while
    some of its workers run elsewhere (they would keep writing meanwhile)."""
    if remote(hs):
        from .errors import InventoryError
        raise InventoryError(
            f"{hs.server_name}: {what} acts on {hs.host} only, and workers of it run on "
            f"{', '.join(worker_hosts(hs))}: set homeservers.{hs.server_name}.workers.hosts to {{}} "
            f"and deploy (they move back to {hs.host}), then {what}")


# -- ports of a homeserver whose processes span hosts --------------------------------
# Published on the hosts' private addresses only, open in their firewalls to the
# homeserver's other hosts only. From workers.port_base: PostgreSQL, Redis, main's
# replication listener, then two per worker (HTTP, replication) by kind and number,
# so a worker keeps its ports when others come and go.
PORT_SPAN = 300
_KIND_SLOTS = 32  # ports per kind: 16 workers x 2


def service_port(hs, service: str) -> int:
    """The published port of `service` (postgres, redis, synapse, or a worker's
    replication listener) or of `<worker>:http`."""
    base = hs.workers.port_base
    fixed = {"postgres": 0, "redis": 1, MAIN_SERVICE: 2}
    if service in fixed:
        return base + fixed[service]
    name, _, listener = service.partition(":")
    kind_dash, _, number = name.rpartition("-")
    kind = kind_dash.replace("-", "_")
    offset = 10 + list(KINDS).index(kind) * _KIND_SLOTS + (int(number) - 1) * 2
    return base + offset + (0 if listener == "http" else 1)


def published(hs, host_name: str) -> dict[str, tuple[int, int]]:
    """What processes of `hs` on its other hosts reach on `host_name`: service ->
    (published port, port in the container). Its database, on the host that runs
    it for it (postgres.host); else nothing unless some of its workers run
    elsewhere; then main's replication listener, PostgreSQL and Redis on its own host, and on any host the replication and HTTP listeners of the workers
    others reach there (nginx on its host reaches HTTP workers elsewhere)."""
    if hs.postgres.host:  # its database on another host (no workers elsewhere then)
        return {"postgres": (service_port(hs, "postgres"), 5432)} if host_name == hs.postgres.host else {}
    if not remote(hs):
        return {}
    here = [w for w in placed(hs) if w.host == host_name]
    wanted: dict[str, int] = {}
    if host_name == hs.host:
        wanted = {"postgres": 5432, REDIS_SERVICE: 6379, MAIN_SERVICE: REPLICATION_PORT}
    else:
        wanted = {f"{w.name}:http": HTTP_PORT for w in here if w.serves_http}
    wanted |= {w.name: REPLICATION_PORT for w in here if w.replication}
    return {svc: (service_port(hs, svc), inner) for svc, inner in wanted.items()}


def peers(hs, host_name: str) -> list[str]:
    """The other hosts of `hs`'s processes, which reach what `host_name` publishes."""
    every = hosts_of(hs)
    if hs.postgres.host and hs.migrated_from:  # its database admits both ends of a move until it is finished
        every.append(hs.migrated_from)
    return [h for h in dict.fromkeys(every) if h != host_name]


def hosts_of(hs) -> list[str]:
    """The hosts a homeserver's processes run on: its own, its workers' and its database's."""
    return list(dict.fromkeys([hs.host] + worker_hosts(hs) + ([hs.postgres.host] if hs.postgres.host else [])))


def endpoint(hs, service: str, viewer: str, private: dict[str, str]) -> tuple[str, int]:
    """Where a process on host `viewer` reaches `service` of `hs` (internal port, or
    with ':http' a worker's HTTP listener): by its compose name on the same host,
    else at its host's private address and published port."""
    name = service.partition(":")[0]
    where = (hs.postgres.host or hs.host) if name == "postgres" else hs.host if name in (MAIN_SERVICE, REDIS_SERVICE) else \
        next(w.host for w in placed(hs) if w.name == name)
    inner = {"postgres": 5432, REDIS_SERVICE: 6379}.get(name, HTTP_PORT if service.endswith(":http")
                                                         else REPLICATION_PORT)
    if where == viewer:
        return name, inner
    return private[where], service_port(hs, service)


def of_kind(workers: list[Worker], kind: str) -> list[Worker]:
    return [w for w in workers if w.kind == kind]


def shared_settings(workers: list[Worker], secrets_dir: str = "/run/secrets", where=None) -> dict:
    """What every process of the homeserver loads (conf.d/60-workers.yaml). Changing
    it restarts them all, as Synapse's docs say a new writer or sender needs.
    `where(service)`: (host, port) of main (`synapse`), Redis and a replication
    listener as the processes of one host reach them (default: the same stack)."""
    if not workers:
        return {}
    where = where or (lambda service: (service, 6379 if service == REDIS_SERVICE else REPLICATION_PORT))
    host, port = where(MAIN_SERVICE)
    instance_map = {"main": {"host": host, "port": port}}
    for w in workers:
        if w.replication:
            host, port = where(w.name)
            instance_map[w.name] = {"host": host, "port": port}
    redis_host, redis_port = where(REDIS_SERVICE)
    doc: dict = {
        "redis": {"enabled": True, "host": redis_host, "port": redis_port,
                  "password_path": f"{secrets_dir}/redis_password"},
        "worker_replication_secret_path": f"{secrets_dir}/replication_secret",
        "instance_map": instance_map,
    }
    writers: dict = {}
    if persisters := of_kind(workers, "event_persister"):
        writers["events"] = [w.name for w in persisters]
    if media := of_kind(workers, "media"):
        # main does not serve media any more: the quarantine admin API is the media
        # workers', and since Synapse 1.152 its writes need a stream writer
        writers["quarantined_media_changes"] = [media[0].name]
        doc["enable_media_repo"] = False
        doc["media_instance_running_background_jobs"] = media[0].name
    if stream := of_kind(workers, "stream_writer"):
        writers |= {name: [stream[0].name] for name in STREAMS}
    if writers:
        doc["stream_writers"] = writers
    if senders := of_kind(workers, "federation_sender"):
        doc["federation_sender_instances"] = [w.name for w in senders]
    if pushers := of_kind(workers, "pusher"):
        doc["pusher_instances"] = [w.name for w in pushers]
    if background := of_kind(workers, "background"):
        doc["run_background_tasks_on"] = background[0].name
    return doc


def main_replication_listener() -> dict:
    """The listener main adds beside its client one (the same `listeners` list)."""
    return {"port": REPLICATION_PORT, "type": "http", "bind_addresses": ["0.0.0.0"],
            "resources": [{"names": ["replication"]}]}


def worker_settings(w: Worker) -> dict:
    """The worker's own file (workers/<name>.yaml). Every worker has an HTTP
    listener on 8008, its container's health check (a health-only one when it
    serves no requests); access log lines carry its name (`tag`)."""
    listeners = [{"port": HTTP_PORT, "type": "http", "bind_addresses": ["0.0.0.0"], "x_forwarded": True,
                  "tag": w.name,
                  "resources": [{"names": w.resources or ["health"], "compress": False}]}]
    if w.replication:
        listeners.append({"port": REPLICATION_PORT, "type": "http", "bind_addresses": ["0.0.0.0"], "tag": w.name,
                          "resources": [{"names": ["replication"]}]})
    doc = {"worker_app": "synapse.app.generic_worker", "worker_name": w.name, "worker_listeners": listeners}
    if w.kind == "media":
        doc["enable_media_repo"] = True  # the shared file turns it off for everyone else
    return doc


def split(names: list[str]) -> list[tuple[str, str]]:
    """nginx split_clients buckets: (percentage, name), the last one `*`."""
    if not names:
        return []
    share = int(10000 / len(names)) / 100
    return [(f"{share:.2f}%", n) for n in names[:-1]] + [("*", names[-1])]
