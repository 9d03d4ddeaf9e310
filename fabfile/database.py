"""A homeserver's database as the host-side programs reach it: its own PostgreSQL
container (found by compose's labels), or an external server the operator runs
(`homeservers.S.postgres.external`), reached by a throwaway container of the
PostgreSQL image with libpq's verify-full TLS. And `inv database-password`, which
puts that server's password on the homeserver's host."""

from __future__ import annotations

from .errors import TaskError
from .inventory import Homeserver, Inventory
from .layout import SYNAPSE_UID, Layout
from .passwords import read_password
from .plan import sha256
from .remote import locked, session
from .render import DB_CA_MOUNT, synapse_project
from .shell import program


def client_image(inv: Inventory, hs: Homeserver) -> str:
    """The image whose psql reaches an external database (postgres.image, else images.postgres)."""
    return hs.postgres.image or inv.image("postgres")


def inputs(inv: Inventory, hs: Homeserver) -> dict:
    """What fabfile/scripts/homeserver.sh needs to run psql on the homeserver's database."""
    common = {"pg_user": hs.postgres.user, "pg_db": hs.postgres.database}
    if not hs.postgres.elsewhere:  # every name set all the same (a rendered program is shellchecked)
        return {**common, "external": "", "db_host": "", "db_port": "", "db_ca": "", "db_ca_mount": "",
                "pgpass": "", "pg_image": ""}
    lay = Layout(inv.hosts[hs.host].base_dir)
    db_host, db_port = server(inv, hs)
    return {**common, "external": "1", "db_host": db_host, "db_port": db_port,
            "db_ca": lay.db_ca(hs.server_name) if hs.postgres.external else "", "db_ca_mount": DB_CA_MOUNT,
            "pgpass": f"{lay.secrets(hs.server_name)}/pgpass", "pg_image": client_image(inv, hs)}


def server(inv: Inventory, hs: Homeserver) -> tuple[str, int]:
    """Where the homeserver's host reaches a database elsewhere: the external
    server, or the database host's private address and published port."""
    if hs.postgres.external is not None:
        return hs.postgres.external.host, hs.postgres.external.port
    from . import workers  # (workers.py imports nothing of this module)
    return workers.endpoint(hs, "postgres", hs.host, {hs.postgres.host: inv.hosts[hs.postgres.host].private_address})


def passfile_line(hs: Homeserver, password: str) -> bytes:
    """libpq's passfile line for any host and port ('\\' and ':' escaped)."""
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    return f"*:*:{hs.postgres.database}:{hs.postgres.user}:{escaped}\n".encode()


def set_password(inv: Inventory, homeserver: str, password_file: str | None) -> str:
    """`inv database-password`: the external database's password, tried against the
    server first (TLS verify-full, the inventory's CA), then kept on the host
    (secrets/pgpass, 0400). A password the server refuses changes nothing."""
    hs = inv.homeserver(homeserver)
    ext = hs.postgres.external
    if ext is None:
        raise TaskError(f"{hs.server_name} runs its own PostgreSQL, whose password synapse-fabric made; "
                        "`inv database-password` is for postgres.external")
    try:
        ca = ext.ca.read_bytes()
    except OSError as exc:
        raise TaskError(f"homeservers.{hs.server_name}.postgres.external.ca: cannot read {ext.ca}: "
                        f"{exc.strerror or exc}") from None
    password = read_password(password_file, f"the database user {hs.postgres.user} of {hs.server_name}")
    if "\n" in password or "\r" in password:
        raise TaskError("the password contains a line break, which libpq's passfile cannot hold")
    host = inv.hosts[hs.host]
    lay = Layout(host.base_dir)
    with locked(inv, host) as remote:
        # stdin: the passfile line, then the CA (the password never reaches an argv)
        remote.run(program("database.sh", "database-password.sh", **inputs(inv, hs), project=synapse_project(hs),
                           secrets=lay.secrets(hs.server_name), server_name=hs.server_name, synapse_uid=SYNAPSE_UID),
                   stdin=passfile_line(hs, password) + ca, what=f"{hs.server_name}: set the database password",
                   timeout=600)
    return (f"{hs.server_name}: the password works ({ext.host}:{ext.port}, TLS verify-full) and is kept on "
            f"{host.name} in {lay.secrets(hs.server_name)}/pgpass (0400); Synapse's new connections use it")


def refuse_external(hs: Homeserver, what: str, why: str) -> None:
    """Operations that rebuild or move the database itself stay with the databases
    synapse-fabric runs; refused for an external one, saying why."""
    if hs.postgres.external is not None:
        raise TaskError(f"{hs.server_name}: {what} is not available with an external database "
                        f"(postgres.external: {hs.postgres.external.host}): {why}")
    if hs.postgres.host is not None:
        raise TaskError(f"{hs.server_name}: {what} is not available yet with its database on another host "
                        f"(postgres.host: {hs.postgres.host}): {why}")


def check_before_deploy(state, facts) -> None:
    """Before a deploy changes anything: every homeserver on an external database
    has its password on the host (`inv database-password` puts it there), and none
    switches between its own database and an external one (the data would stay
    behind: that move is a dump and a restore, not a deploy)."""
    problems, missing = [], []
    for hs in state.homeservers:
        sn, lay = hs.server_name, state.layout
        local_data = sn in facts.pg_major
        external_pass = lay.secret(sn, "pgpass") in facts.stats and lay.secret(sn, "postgres_password") not in facts.stats
        if hs.postgres.elsewhere and local_data:
            problems.append(f"{sn}: its database is here (PostgreSQL {facts.pg_major[sn]}, {lay.postgres(sn)}) but "
                            f"hosts.yaml puts it on {hs.postgres.where}: a deploy does not move a database; dump it "
                            f"(inv backup), restore it there, then remove {lay.postgres(sn)} and deploy")
        elif not hs.postgres.elsewhere and external_pass:
            problems.append(f"{sn}: its database was elsewhere (its secrets hold only that server's passfile) but "
                            "hosts.yaml no longer says where: a deploy would start an empty database here; put "
                            "postgres.external or postgres.host back, or restore its data here first (inv restore)")
        elif hs.postgres.elsewhere and lay.secret(sn, "postgres_password") in facts.stats:
            problems.append(f"{sn}: its secrets still hold the password of the database it had here, and its "
                            f"passfile is that database's; once its data is on {hs.postgres.where}, remove "
                            f"{lay.secret(sn, 'postgres_password')} and {lay.secret(sn, 'pgpass')}, then "
                            + ("run inv database-password and deploy" if hs.postgres.external else "deploy"))
        elif (hs.postgres.host and lay.passfile_for(sn) in facts.stats and lay.secret(sn, "pgpass") in facts.stats
              and facts.hashes.get(lay.passfile_for(sn)) != sha256(state.file(lay.passfile_for(sn)).content)):
            problems.append(f"{sn}: its passfile is for another database host than {hs.postgres.host} (see "
                            f"{lay.passfile_for(sn)}): a deploy does not move a database; once its data is on "
                            f"{hs.postgres.host}, remove {lay.secret(sn, 'pgpass')} (the deploy reads that host's "
                            "password again), or put postgres.host back")
        elif hs.postgres.external and lay.secret(sn, "pgpass") not in facts.stats:
            missing.append(sn)
    if problems:
        raise TaskError(f"{state.host.name}: refusing to deploy; nothing was changed:\n  " + "\n  ".join(problems))
    if missing:
        raise TaskError(f"{state.host.name}: the external database's password of {', '.join(missing)} is not on "
                        "the host yet; nothing was changed: run "
                        + "; ".join(f"inv database-password --homeserver {sn}" for sn in missing)
                        + ", then deploy again")


def passfiles(inv: Inventory, state, facts, dry_run: bool = False) -> dict[str, bytes]:
    """The passfiles this host lacks of its homeservers whose database another
    inventory host runs (postgres.host): the password is made there (that host
    converges first) and read there, once; a present passfile is never replaced.
    A dry run skips a password not made yet (the plan shows the passfile missing)."""
    out = {}
    for hs in state.homeservers:
        if hs.postgres.host is None or state.layout.secret(hs.server_name, "pgpass") in facts.stats:
            continue
        host = inv.hosts[hs.postgres.host]
        with session(inv, host) as remote:
            password = remote.run(program("database-host-password.sh",
                                          secret=Layout(host.base_dir).database_secret(hs.server_name)),
                                  what=f"{hs.server_name}: its database's password on {host.name}").out.strip()
        if not password and dry_run:
            continue
        if not password:
            raise TaskError(f"{hs.server_name}: its database on {host.name} has no password yet: deploy {host.name} "
                            f"first (inv deploy --host {host.name}), then this host")
        out[hs.server_name] = passfile_line(hs, password)
    return out
