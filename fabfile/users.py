"""Matrix users on a running homeserver: register, reset a password.

Names are validated here, before any SSH. Passwords go from the operator to the
homeserver's container on stdin only: never in argv (on either machine), in
output, or in a file. Inside the container Synapse's own code does the work:
`register_new_matrix_user` (shared-secret registration, secret read from
homeserver.yaml on the host) and `hash_password` (the homeserver's pepper and
bcrypt rounds). Both tools strip spaces from a password read from a file or a
pipe, so they are called in-process with the exact password instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import database
from .errors import TaskError
from .inventory import Homeserver, Inventory
from .passwords import read_password
from .remote import Remote, RemoteError, locked
from .layout import Layout
from .render import synapse_project
from .shell import program

LOCALPART_RE = re.compile(r"^[a-z0-9._=/+-]+$")
ALLOWED = "lower-case letters a-z, digits 0-9 and . _ = - / +"


@dataclass(frozen=True)
class UserId:
    localpart: str
    server_name: str

    def __str__(self) -> str:
        return f"@{self.localpart}:{self.server_name}"


def parse_user(name: str, hs: Homeserver) -> UserId:
    """`alice` or `@alice:server` -> UserId on `hs`; refuse anything else."""
    localpart = name
    if name.startswith("@"):
        localpart, sep, server = name[1:].partition(":")
        if not sep or server != hs.server_name:
            raise TaskError(
                f"user {name!r} is not on homeserver {hs.server_name} "
                f"(expected @NAME:{hs.server_name} or just NAME)"
            )
    if not localpart or not LOCALPART_RE.match(localpart):
        raise TaskError(f"invalid user name {localpart!r}: a Matrix user name may contain only {ALLOWED}")
    if len(f"@{localpart}:{hs.server_name}") > 255:
        raise TaskError("user ID too long: at most 255 characters with the server name")
    return UserId(localpart, hs.server_name)


def _users(inv: Inventory, hs: Homeserver, uid: UserId, action: str, **inputs) -> str:
    """fabfile/scripts/users.sh for one action on `uid` of `hs`."""
    return program("database.sh", "homeserver.sh", "users.sh", action=action, project=synapse_project(hs), server_name=hs.server_name,
                   uid=uid, **database.inputs(inv, hs), **inputs)


def user_exists(remote: Remote, hs: Homeserver, uid: UserId) -> bool:
    return remote.read(_users(remote.inv, hs, uid, "exists"), what=f"look up {uid}").out.strip() == "1"


_REGISTER_PY = """\
import sys
password = sys.stdin.buffer.read().decode("utf-8")
# --password=VALUE: a password starting with '-' must not look like an option
sys.argv = ["register_new_matrix_user", "-c", "/data/homeserver.yaml", "-u", {localpart!r},
            "--password=" + password, {admin!r}, "http://localhost:8008"]
from synapse._scripts.register_new_matrix_user import main
main()
"""


def register_program(localpart: str, admin: bool) -> str:
    """Python for the Synapse container: Synapse's shared-secret registration of
    `localpart`, the password on stdin (also fabfile/admin.py's own admin)."""
    return _REGISTER_PY.format(localpart=localpart, admin="--admin" if admin else "--no-admin")


def register(remote: Remote, hs: Homeserver, uid: UserId, password: str, admin: bool) -> None:
    """Shared-secret registration, in the homeserver's own container."""
    code = register_program(uid.localpart, admin)
    remote.run(_users(remote.inv, hs, uid, "register", python=code), stdin=password.encode("utf-8"), what=f"register {uid}")


_HASH_PY = """\
import sys
password = sys.stdin.buffer.read().decode("utf-8")
sys.argv = ["hash_password", "-c", "/data/homeserver.yaml", "--password=" + password]
from synapse._scripts.hash_password import main
main()
"""

NOT_FOUND = 5


def backup_name(uid: UserId) -> str:
    """A file name for a user's old hash: a localpart may contain '/' (and '..'),
    which must not become a path: '/' and a leading '.' are %-encoded."""
    name = uid.localpart.replace("%", "%25").replace("/", "%2F")
    return "%2E" + name[1:] if name.startswith(".") else name


# Ends every session of a user through Synapse's own code (POST /logout/all with a
# token minted for it): access and refresh tokens, devices, their pushers, and the
# device-list updates other servers need, and Synapse's caches with them.
_LOGOUT_ALL_PY = """\
import sys, urllib.request
token = sys.stdin.read().strip()
req = urllib.request.Request("http://localhost:8008/_matrix/client/v3/logout/all", data=b"{}", method="POST",
                             headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
try:
    urllib.request.urlopen(req, timeout=120).read()
except Exception as exc:
    sys.exit(f"Synapse did not end the sessions: {exc}")
"""


def reset_password(
    remote: Remote, lay: Layout, hs: Homeserver, uid: UserId, password: str, logout: bool
) -> str:
    """Hash with Synapse's hash_password in the container, then one transaction in
    PostgreSQL that changes exactly one row. The old hash goes to a 0600 file on
    the host first. With `logout`, Synapse itself then ends every session.
    Returns the backup file's path."""
    script = _users(remote.inv, hs, uid, "reset", python=_HASH_PY, backups=lay.secret(hs.server_name, "password-backups"),
                    backup_name=backup_name(uid), logout="yes" if logout else "no", logout_python=_LOGOUT_ALL_PY)
    try:
        return remote.run(script, stdin=password.encode("utf-8"), what=f"reset the password of {uid}").out.strip()
    except RemoteError as exc:
        if exc.code == NOT_FOUND:  # the operator named a user that does not exist
            raise TaskError(f"no user {uid} on {hs.server_name}; nothing was changed") from None
        raise


def register_user(inv: Inventory, homeserver: str, user: str, admin: bool, password_file: str | None) -> str:
    """`inv register-user`: returns what to tell the operator."""
    hs = inv.homeserver(homeserver)
    uid = parse_user(user, hs)
    with locked(inv, inv.hosts[hs.host]) as remote:
        if user_exists(remote, hs, uid):
            if password_file:
                raise TaskError(f"{uid} already exists; to change its password use inv reset-password")
            return f"{uid} already exists; nothing changed"
        register(remote, hs, uid, read_password(password_file, str(uid)), admin)
    return f"registered {uid}" + (" (server admin)" if admin else "")


def reset_user_password(inv: Inventory, homeserver: str, user: str, password_file: str | None,
                        logout: bool) -> str:
    """`inv reset-password`: returns what to tell the operator."""
    hs = inv.homeserver(homeserver)
    uid = parse_user(user, hs)
    host = inv.hosts[hs.host]
    password = read_password(password_file, str(uid))
    with locked(inv, host) as remote:
        backup = reset_password(remote, Layout(host.base_dir), hs, uid, password, logout)
    return (f"password of {uid} reset" + ("; all its sessions ended" if logout else "")
            + f"\nthe previous hash is kept on {host.name} in {backup} (0600)")
