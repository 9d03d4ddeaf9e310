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
import shlex
from dataclasses import dataclass

from .docker import container
from .errors import TaskError
from .inventory import Homeserver, Inventory
from .passwords import read_password
from .remote import Remote, RemoteError, locked
from .layout import Layout
from .render import synapse_project

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


def _containers(hs: Homeserver) -> str:
    project = synapse_project(hs)
    return (
        f"syn={container(project, 'synapse')}\n"
        f"pg={container(project, 'postgres')}\n"
        f'if [ -z "$syn" ] || [ -z "$pg" ]; then echo "{hs.server_name} is not running on this host '
        '(run inv deploy)" >&2; exit 4; fi\n'
    )


def _psql(hs: Homeserver) -> str:
    user, db = shlex.quote(hs.postgres.user), shlex.quote(hs.postgres.database)
    return f'docker exec -i "$pg" psql -X -q -At -v ON_ERROR_STOP=1 -U {user} -d {db} -f -'


def user_exists(remote: Remote, hs: Homeserver, uid: UserId) -> bool:
    script = _containers(hs) + (
        # the user ID reaches SQL as a psql variable, quoted by psql itself
        f"printf '%s\\n' \"\\\\set uid '{uid}'\" \"SELECT count(*) FROM users WHERE name = :'uid';\" | {_psql(hs)}\n"
    )
    out = remote.run(script, what=f"look up {uid}").out.strip()
    return out == "1"


_REGISTER_PY = """\
import sys
password = sys.stdin.buffer.read().decode("utf-8")
# --password=VALUE: a password starting with '-' must not look like an option
sys.argv = ["register_new_matrix_user", "-c", "/data/homeserver.yaml", "-u", {localpart!r},
            "--password=" + password, {admin!r}, "http://localhost:8008"]
from synapse._scripts.register_new_matrix_user import main
main()
"""


def register(remote: Remote, hs: Homeserver, uid: UserId, password: str, admin: bool) -> None:
    """Shared-secret registration, in the homeserver's own container."""
    code = _REGISTER_PY.format(localpart=uid.localpart, admin="--admin" if admin else "--no-admin")
    script = _containers(hs) + f'docker exec -i "$syn" python -c {shlex.quote(code)} >/dev/null\n'
    remote.run(script, stdin=password.encode("utf-8"), what=f"register {uid}")


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

# A token for the user, valid for 5 minutes. Synapse numbers access tokens in its
# own memory from the largest id it saw at start, so this row takes an id far above
# it (1e9 more) that Synapse will not reach while the row lives.
_MINT_SQL = (
    "INSERT INTO access_tokens (id, user_id, token, valid_until_ms)\n"
    "SELECT COALESCE(max(id), 0) + 1000000000, :'uid', :'tok',\n"
    "       (extract(epoch FROM now()) * 1000)::bigint + 300000 FROM access_tokens;\n"
)


def logout_script(hs: Homeserver, uid: UserId) -> str:
    """Shell (after _containers) that ends every session of `uid`; the token it
    mints lives in a shell variable and on stdin only, and is gone afterwards
    (logout/all deletes it; on failure it is deleted here)."""
    return f"""
tok=sfab_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \\n')
ended="the password of {uid} was changed, but its sessions were not ended; run again with --logout"
if ! {{ printf '%s\\n' "\\\\set uid '{uid}'" "\\\\set tok '$tok'"; cat <<'SQL'
{_MINT_SQL}SQL
}} | {_psql(hs)}; then echo "$ended" >&2; exit 1; fi
if ! printf '%s' "$tok" | docker exec -i "$syn" python -c {shlex.quote(_LOGOUT_ALL_PY)}; then
  printf '%s\\n' "\\\\set tok '$tok'" "DELETE FROM access_tokens WHERE token = :'tok';" | {_psql(hs)}
  echo "$ended" >&2
  exit 1
fi
"""


def reset_password(
    remote: Remote, lay: Layout, hs: Homeserver, uid: UserId, password: str, logout: bool
) -> str:
    """Hash with Synapse's hash_password in the container, then one transaction in
    PostgreSQL that changes exactly one row. The old hash goes to a 0600 file on
    the host first. With `logout`, Synapse itself then ends every session.
    Returns the backup file's path."""
    backups = shlex.quote(lay.secret(hs.server_name, "password-backups"))
    # Values travel inside psql's stdin as psql variables (\set) and are used as
    # :'name', which psql quotes as SQL literals: never spliced into SQL text.
    sql = (
        "\\set uid '" + str(uid) + "'\n"
        "BEGIN;\n"
        "WITH changed AS (UPDATE users SET password_hash = :'hash' WHERE name = :'uid' RETURNING 1)\n"
        "SELECT CASE WHEN count(*) = 1 THEN 'true' ELSE 'false' END AS one_row FROM changed \\gset\n"
        "\\if :one_row\nCOMMIT;\n\\echo sfab-updated\n"
        "\\else\nROLLBACK;\n\\echo sfab-not-updated\n\\endif\n"
    )
    script = "set -e\n" + _containers(hs) + f"""
umask 077
mkdir -p {backups}
old=$(printf '%s\\n' "\\\\set uid '{uid}'" "SELECT password_hash FROM users WHERE name = :'uid';" | {_psql(hs)})
if [ -z "$old" ]; then echo "no user {uid} on {hs.server_name}; nothing was changed" >&2; exit {NOT_FOUND}; fi
# hash_password may print a notice first (e.g. about bcrypt's 72-byte limit): the hash is the last line
hash=$(docker exec -i "$syn" python -c {shlex.quote(_HASH_PY)} | tail -n 1)
case "$hash" in '$2'*) ;; *) echo "hash_password did not return a bcrypt hash" >&2; exit 1;; esac
backup={backups}/{shlex.quote(backup_name(uid))}.$(date -u +%Y%m%dT%H%M%SZ)
# the old hash is kept before anything changes; no backup, no change
if ! {{ printf '%s\\n' "$old" > "$backup.tmp" && mv -f "$backup.tmp" "$backup"; }}; then
  echo "could not keep the old hash in $backup; nothing was changed" >&2; exit 1
fi
res=$({{ printf '\\\\set hash %s\\n' "'$hash'"; cat <<'SQL'
{sql}SQL
}} | {_psql(hs)})
if [ "$res" != sfab-updated ]; then echo "the update did not change exactly one row; rolled back" >&2; exit 1; fi
"""
    if logout:
        script += logout_script(hs, uid)
    script += 'echo "$backup"\n'
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
