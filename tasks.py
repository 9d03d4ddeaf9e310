"""synapse-fabric: deploy and run Matrix Synapse homeservers over SSH.

The inventory is `hosts.yaml` unless config says otherwise (`inventory:` in
invoke.yaml, or INVOKE_INVENTORY=path). `inv --list` shows every task;
`inv --help TASK` explains its flags.
"""

from invoke import Collection, task

from invoke.exceptions import Exit

from fabfile.cli import CONFIG_DEFAULTS, TaskError, ask, expected_failures, load_inventory, typed


@task(
    help={
        "host": "only this inventory host (repeatable)",
        "homeserver": "only the host(s) running this homeserver (server_name; repeatable); each is converged whole",
        "dry_run": "print the plan as diffs (secrets masked); change nothing",
        "pull": "hosts with `images: pull` ask their registry again for every tag (digest pins never need it)",
    },
    iterable=["host", "homeserver"],
)
def deploy(c, host=None, homeserver=None, dry_run=False, pull=False):
    """Converge every host (in parallel) to what hosts.yaml describes."""
    from fabfile import deploy as converge

    inv = load_inventory(c)
    with expected_failures():
        names = converge.select_hosts(inv, host, homeserver)
        results = converge.deploy(inv, names, dry_run=dry_run, pull=pull)
    if converge.exit_code(results):
        raise Exit(code=converge.exit_code(results))


@task(
    help={
        "homeserver": "the homeserver (server_name) to register on",
        "user": "localpart (alice) or full ID (@alice:example.org)",
        "admin": "make the user a server admin",
        "password_file": "read the password from this file ('-' for stdin); default: prompt twice",
    }
)
def register_user(c, homeserver, user, admin=False, password_file=None):
    """Register a user on a running homeserver (a no-op if it exists)."""
    from fabfile import users

    inv = load_inventory(c)
    with expected_failures():
        print(users.register_user(inv, homeserver, user, admin, password_file))


@task(
    help={
        "homeserver": "the homeserver (server_name) the user is on",
        "user": "localpart (alice) or full ID (@alice:example.org)",
        "password_file": "read the password from this file ('-' for stdin); default: prompt twice",
        "logout": "also end all of the user's sessions",
    }
)
def reset_password(c, homeserver, user, password_file=None, logout=False):
    """Set a user's password hash in the homeserver's PostgreSQL."""
    from fabfile import users

    inv = load_inventory(c)
    with expected_failures():
        print(users.reset_user_password(inv, homeserver, user, password_file, logout))


@task(
    name="database-password",
    help={
        "homeserver": "the homeserver (server_name) whose postgres.external this is for",
        "password_file": "read the password from this file ('-' for stdin); default: prompt twice",
    }
)
def database_password(c, homeserver, password_file=None):
    """Put an external database's password on the homeserver's host (tried first, TLS verify-full)."""
    from fabfile import database

    inv = load_inventory(c)
    with expected_failures():
        print(database.set_password(inv, homeserver, password_file))


@task(
    help={
        "homeserver": "the homeserver (server_name) to move",
        "to": "the inventory host to move it to",
        "dry_run": "check and print the plan; change nothing",
        "finish": "after DNS points at the new host: remove the old host's forwarding and data",
        "abort": "roll back an interrupted migration",
        "yes": "do not ask before removing the old copy (with --finish)",
        "no_backup": "with --finish: do not keep an archive of the old copy",
    }
)
def migrate_host(c, homeserver, to=None, dry_run=False, finish=False, abort=False, yes=False, no_backup=False):
    """Move a homeserver to another host; the old host forwards until DNS follows."""
    from fabfile import migrate

    inv = load_inventory(c)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    with expected_failures():
        if finish:
            migrate.finish(inv, homeserver, yes, not no_backup, log, ask)
        else:
            migrate.migrate(inv, homeserver, to, dry_run, abort, log)


@task(
    name="adopt",
    help={
        "homeserver": "the homeserver's server_name",
        "from": "the inventory host its hand-made deployment runs on",
        "to": "the inventory host to bring it to (default: hosts.yaml's, else --from)",
        "compose": "its docker-compose.yml on that host (default: found by server_name)",
        "data": "the directory mounted as its /data (default: found by server_name)",
        "db": "its PostgreSQL container (default: the database host of its homeserver.yaml)",
        "dry_run": "print what was found and what would be done; change nothing",
        "finish": "remove the old, stopped containers (their files stay)",
        "abort": "bring the old deployment back; the new copy is moved aside",
    }
)
def adopt_homeserver(c, homeserver, from_=None, to=None, compose="", data="", db="", dry_run=False, finish=False,
                     abort=False):
    """Bring a homeserver set up by hand under management, keeping its identity."""
    from fabfile import adopt

    inv = load_inventory(c)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    with expected_failures():
        if not from_:
            raise TaskError("--from HOST is required (the inventory host the homeserver runs on now)")
        if finish:
            adopt.finish(inv, homeserver, from_, log)
        elif abort:
            adopt.abort(inv, homeserver, from_, log)
        else:
            adopt.adopt(inv, homeserver, from_, to, compose, data, db, dry_run, log)


@task(
    help={
        "host": "only this inventory host",
        "version": "install this version (default: the newest in the feed)",
        "check": "only report the installed and the newest version",
        "rollback": "go back to the previous version",
    }
)
def element_update(c, host=None, version=None, check=False, rollback=False):
    """Install the newest (or a given) Element Web release on the hosts."""
    from fabfile import element

    inv = load_inventory(c)
    with expected_failures():
        element.element_update(inv, host, version, check, rollback, lambda line: print(line, flush=True))


@task(help={"homeserver": "the homeserver (server_name); default: every one"})
def users(c, homeserver=None):
    """List a homeserver's users, with their admin and deactivated state."""
    from fabfile import admin

    inv = load_inventory(c)
    with expected_failures():
        for sn in [homeserver] if homeserver else list(inv.homeservers):
            print(admin.format_users(admin.list_users(inv, sn), inv.homeserver(sn).server_name))


@task(
    help={
        "homeserver": "the homeserver (server_name) the user is on",
        "user": "localpart (alice) or full ID (@alice:example.org)",
        "erase": "also erase what it sent (GDPR erasure): its messages show as redacted to new readers",
    }
)
def deactivate_user(c, homeserver, user, erase=False):
    """Deactivate a user: logged out everywhere, out of its rooms, cannot log in again."""
    from fabfile import admin

    inv = load_inventory(c)
    with expected_failures():
        print(admin.deactivate_user(inv, homeserver, user, erase))


@task(
    help={
        "homeserver": "the homeserver (server_name) the user is on",
        "user": "localpart (alice) or full ID (@alice:example.org)",
        "revoke": "take the server admin right away instead",
    }
)
def make_admin(c, homeserver, user, revoke=False):
    """Make a user a server admin (or, with --revoke, no longer one)."""
    from fabfile import admin

    inv = load_inventory(c)
    with expected_failures():
        print(admin.make_admin(inv, homeserver, user, revoke))


@task(
    help={
        "action": "create, list or revoke",
        "homeserver": "the homeserver (server_name)",
        "token": "create: the token itself (default: Synapse makes one); revoke: the token to revoke",
        "uses": "create: how many registrations it allows (default: unlimited)",
        "expires_in": "create: how long it is valid, e.g. 30m, 12h, 7d (default: forever)",
    },
    positional=["action"],
)
def registration_token(c, action, homeserver, token=None, uses=None, expires_in=None):
    """Registration tokens (homeservers with `registration: token`): create, list, revoke."""
    from fabfile import admin

    inv = load_inventory(c)
    with expected_failures():
        print(admin.registration_tokens(inv, homeserver, action, token, int(uses) if uses else None, expires_in))


@task(
    help={
        "homeserver": "the homeserver (server_name)",
        "older_than": "cached media last used longer ago than this: 90s, 30m, 12h, 30d",
    }
)
def purge_remote_media(c, homeserver, older_than):
    """Delete cached copies of other servers' media (fetched again when asked for)."""
    from fabfile import admin

    inv = load_inventory(c)
    with expected_failures():
        print(admin.purge_remote_media(inv, homeserver, older_than))


@task(
    help={
        "homeserver": "the homeserver (server_name) whose copy of the room is purged",
        "room": "room ID (!abc:server) or alias (#name:server)",
        "before": "events older than this: a duration (30d) or an ISO date (2026-11-01, UTC)",
        "local": "also delete the events this homeserver's own users sent",
    }
)
def purge_history(c, homeserver, room, before, local=False):
    """Delete a room's history older than --before from one homeserver's database."""
    from fabfile import admin

    inv = load_inventory(c)
    with expected_failures():
        print(admin.purge_history(inv, homeserver, room, before, local))


@task(
    help={
        "homeserver": "the homeserver (server_name)",
        "service": "synapse (default), postgres, nginx (its host's reverse proxy) or admin-ui",
        "since": "how far back: 90s, 10m, 2h, or a date (2026-11-30, 2026-11-30T12:00); default 1h",
        "tail": "at most this many lines (default 200)",
        "follow": "keep printing new lines until Ctrl-C",
    }
)
def logs(c, homeserver, service="synapse", since="1h", tail=200, follow=False):
    """Show a homeserver's logs (no container names needed)."""
    from fabfile import logs as logs_mod

    inv = load_inventory(c)
    with expected_failures():
        try:
            logs_mod.logs(inv, homeserver, service, since, int(tail), follow, lambda line: print(line, flush=True))
        except KeyboardInterrupt:
            pass


@task(
    help={
        "homeserver": "only this homeserver (server_name); default: every one that needs it, one at a time",
        "check": "only say, per homeserver, what runs, what the inventory asks for and what would happen",
    }
)
def upgrade(c, homeserver=None, check=False):
    """Move Synapse to the inventory's image: dump first, roll back if it fails."""
    from fabfile import upgrade as upgrade_mod

    inv = load_inventory(c)
    with expected_failures():
        upgrade_mod.upgrade(inv, homeserver, check, lambda line: print(line, flush=True))


@task(
    help={
        "homeserver": "the homeserver (server_name) whose database moves",
        "to": "the PostgreSQL major version to move to (e.g. 17)",
        "finish": "remove the old data directory kept by an earlier move",
        "rollback": "return to the old data directory kept by an earlier move",
    }
)
def upgrade_postgres(c, homeserver, to=None, finish=False, rollback=False):
    """Move a homeserver's database to a newer PostgreSQL major, beside the old one."""
    from fabfile import pg_upgrade

    inv = load_inventory(c)
    with expected_failures():
        if finish and rollback:
            raise TaskError("--finish or --rollback, not both")
        if to is not None and not str(to).isdigit():
            raise TaskError(f"--to {to!r} is not a PostgreSQL major version (e.g. 17)")
        pg_upgrade.upgrade_postgres(inv, homeserver, int(to) if to is not None else None, finish, rollback,
                                    lambda line: print(line, flush=True))


@task(help={"homeserver": "only this homeserver (server_name); default: every one"})
def backup(c, homeserver=None):
    """Take a restic snapshot of a homeserver (database dump, keys, config, media) now."""
    from fabfile import backup as backups_mod

    inv = load_inventory(c)
    with expected_failures():
        backups_mod.backup(inv, homeserver, lambda line: print(line, flush=True))


@task(help={"homeserver": "only this homeserver (server_name); default: every one"})
def backups(c, homeserver=None):
    """List the snapshots in the backup repository, with times and sizes."""
    from fabfile import backup as backups_mod

    inv = load_inventory(c)
    with expected_failures():
        print(backups_mod.format_snapshots(backups_mod.snapshots(inv, homeserver)))


@task(
    help={
        "homeserver": "the homeserver (server_name) to bring back",
        "snapshot": "this snapshot (an ID `inv backups` shows); default: the newest",
        "to": "onto this inventory host (bare or not) instead of the one it ran on",
        "yes": "do not ask before replacing a copy that is running",
    }
)
def restore(c, homeserver, snapshot=None, to=None, yes=False):
    """Bring a homeserver back from a snapshot, on its host or onto another one."""
    from fabfile import restore as restore_mod

    inv = load_inventory(c)
    with expected_failures():
        restore_mod.restore(inv, homeserver, snapshot, to, lambda line: print(line, flush=True),
                            (lambda question: True) if yes else ask)


@task(
    help={
        "homeserver": "the homeserver (server_name) to remove from its host",
        "host": "instead: remove everything synapse-fabric put on this inventory host",
        "no_backup": "skip the last snapshot; you type the name(s) to confirm",
    }
)
def uninstall(c, homeserver=None, host=None, no_backup=False):
    """Stop and remove a homeserver (or a whole host) after a last snapshot."""
    from fabfile import uninstall as uninstall_mod

    inv = load_inventory(c)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    with expected_failures():
        if bool(homeserver) == bool(host):
            raise TaskError("give --homeserver S (one homeserver) or --host H (everything on a host)")
        if homeserver:
            uninstall_mod.uninstall_homeserver(inv, homeserver, not no_backup, typed, log)
        else:
            uninstall_mod.uninstall_host(inv, host, not no_backup, typed, log)


@task
def dns(c):
    """Print the DNS records hosts.yaml needs (zone-file lines): every public name, and SRV delegations."""
    from fabfile.dns import records

    inv = load_inventory(c)
    print("\n".join(records(inv)))


@task(help={"homeserver": "only this homeserver (server_name)"})
def check(c, homeserver=None):
    """Self-check DNS, certificates, delegation, federation, exposure, TURN, workers and backups' age."""
    from fabfile.check import backup_rows, check_homeserver, format_rows, turn_rows, worker_rows

    inv = load_inventory(c)
    with expected_failures():
        servers = [inv.homeserver(homeserver)] if homeserver else list(inv.homeservers.values())
        rows = ([row for hs in servers for row in check_homeserver(inv, hs)] + turn_rows(inv, servers)
                + worker_rows(inv, servers) + backup_rows(inv, servers))
    print(format_rows(rows))
    if any(not r.ok for r in rows):
        raise Exit(code=1)


ns = Collection(deploy, register_user, reset_password, database_password, users, deactivate_user, make_admin, registration_token,
                purge_remote_media, purge_history, logs, upgrade, upgrade_postgres, backup, backups, restore, uninstall, migrate_host, adopt_homeserver, element_update, dns, check)
ns.configure(CONFIG_DEFAULTS)
