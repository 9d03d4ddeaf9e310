"""Synapse on a host: per-homeserver secrets, `generate`, data ownership (users: users.py)."""

from __future__ import annotations

import shlex

from .layout import POSTGRES_UID, SYNAPSE_UID, Layout
from .inventory import Homeserver


def secrets_script(lay: Layout, hs: Homeserver) -> str:
    """Shell that creates the database password ONCE, on the host, from its own
    /dev/urandom, plus the libpq passfile Synapse reads. Never printed, never in
    argv; an existing secret is never replaced."""
    d = shlex.quote(lay.secrets(hs.server_name))
    db, user = hs.postgres.database, hs.postgres.user
    pgdata = shlex.quote(lay.postgres(hs.server_name))
    return f"""
umask 077
mkdir -p {d}
if [ ! -s {d}/postgres_password ] && [ -s {pgdata}/PG_VERSION ]; then
  echo "{hs.server_name}: the database exists but secrets/postgres_password is missing; restore it from a backup (a new password would lock Synapse out)" >&2
  exit 1
fi
if [ ! -s {d}/postgres_password ]; then
  head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40 > {d}/postgres_password.tmp
  mv -f {d}/postgres_password.tmp {d}/postgres_password
fi
if [ ! -s {d}/pgpass ]; then
  {{ printf 'postgres:5432:{db}:{user}:'; cat {d}/postgres_password; printf '\\n'; }} > {d}/pgpass.tmp
  mv -f {d}/pgpass.tmp {d}/pgpass
fi
chown {POSTGRES_UID} {d}/postgres_password && chmod 0400 {d}/postgres_password
chown {SYNAPSE_UID} {d}/pgpass && chmod 0400 {d}/pgpass
"""


def chown_data_script(lay: Layout, hs: Homeserver) -> str:
    data = shlex.quote(lay.data(hs.server_name))
    uid, gid = SYNAPSE_UID.split(":")
    # Only what is wrong is touched: a big media store is not rewritten.
    return f"find {data} \\( ! -uid {uid} -o ! -gid {gid} \\) -exec chown -h {SYNAPSE_UID} {{}} +\n"


def generate_script(lay: Layout, hs: Homeserver, compose: str) -> str:
    """Run Synapse's own `generate` (config, signing key, secrets) unless its output
    is already there: an existing config or key is never overwritten. The image's
    start.py writes the log config as root and chowns only the data directory
    itself, so the data is then given to 991:991 here (or the next run would)."""
    root = shlex.quote(lay.synapse(hs.server_name))
    sn = hs.server_name
    return f"""
cd {root}
if [ -s data/homeserver.yaml ] && [ -s data/{sn}.signing.key ]; then exit 0; fi
{compose} run --rm --no-deps -T synapse generate </dev/null
test -s data/homeserver.yaml && test -s data/{sn}.signing.key
""" + chown_data_script(lay, hs)
