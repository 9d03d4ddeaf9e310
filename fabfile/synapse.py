"""Synapse on a host: per-homeserver secrets, `generate`, data ownership (users: users.py)."""

from __future__ import annotations

import shlex

from .layout import POSTGRES_UID, SYNAPSE_UID, Layout
from .inventory import Homeserver
from .shell import program


def secrets_script(lay: Layout, hs: Homeserver, workers: bool = False) -> str:
    """Shell that creates the database password ONCE, on the host, from its own
    /dev/urandom, plus the libpq passfile Synapse reads (and with `workers` the
    replication secret and Redis's password). Never printed, never in argv; an
    existing secret is never replaced (fabfile/scripts/synapse-secrets.sh)."""
    return program("synapse-secrets.sh", dir=lay.secrets(hs.server_name), pgdata=lay.postgres(hs.server_name),
                   server_name=hs.server_name, db=hs.postgres.database, user=hs.postgres.user,
                   postgres_uid=POSTGRES_UID, synapse_uid=SYNAPSE_UID, workers=int(workers),
                   external=int(hs.postgres.elsewhere)) + "\n"


def database_secret_script(lay: Layout, hs: Homeserver) -> str:
    """Shell that makes, ONCE, the password of the database this host runs for
    another host's homeserver (fabfile/scripts/database-host-secret.sh)."""
    return program("database-host-secret.sh", dir=lay.database_secret(hs.server_name).rsplit("/", 1)[0],
                   pgdata=lay.database_data(hs.server_name),
                   server_name=hs.server_name, postgres_uid=POSTGRES_UID) + "\n"


def chown_data_script(lay: Layout, hs: Homeserver) -> str:
    data = shlex.quote(lay.data(hs.server_name))
    uid, gid = SYNAPSE_UID.split(":")
    # Only what is wrong is touched: a big media store is not rewritten.
    return f"find {data} \\( ! -uid {uid} -o ! -gid {gid} \\) -exec chown -h {SYNAPSE_UID} {{}} +\n"


def generate_script(lay: Layout, hs: Homeserver, compose: str) -> str:
    """Run Synapse's own `generate` unless its output is already there, then give
    the data to 991:991 (fabfile/scripts/synapse-generate.sh)."""
    return (program("synapse-generate.sh", root=lay.synapse(hs.server_name), server_name=hs.server_name,
                    compose=compose) + chown_data_script(lay, hs))
