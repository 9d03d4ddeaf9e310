"""Administration through Synapse's admin API, from the homeserver's own host:
list users, deactivate one, make one a server admin, registration tokens, purge
cached remote media and room history.

Every call runs fabfile/scripts/admin-api.sh on the host: inside the Synapse
container, to localhost (the API stays closed to the outside), as synapse-fabric's
own admin user with a token minted for that one call and deleted by Synapse's
/logout right after. No operator password or token is involved, none is left.
"""

from __future__ import annotations

import datetime
import json
import re
import time
import urllib.parse
from dataclasses import dataclass

from . import database
from .errors import TaskError
from .inventory import Homeserver, Inventory
from .remote import Remote, locked
from .render import synapse_project
from .shell import program
from .users import UserId, parse_user, register_program

ADMIN = "synapse-fabric-admin"  # its localpart on every homeserver

_CALL_PY = r"""
import sys, urllib.request, urllib.error
token, method, path, body = (sys.stdin.buffer.read().split(b"\n", 3) + [b""])[:4]
token, method, path = token.decode(), method.decode(), path.decode()
body = body or (b"{}" if method in ("POST", "PUT") else None)
req = urllib.request.Request("http://localhost:8008" + path, data=body, method=method,
                             headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=300) as resp:
        status, data = resp.status, resp.read()
except urllib.error.HTTPError as exc:
    status, data = exc.code, exc.read()
sys.stdout.write(f"{status}\n")
sys.stdout.flush()
sys.stdout.buffer.write(data)
"""


def call(remote: Remote, hs: Homeserver, method: str, path: str, body: dict | None = None) -> dict:
    """One admin API call; its JSON answer. A non-2xx answer raises TaskError with
    Synapse's own error."""
    script = program("database.sh", "homeserver.sh", "admin-api.sh", project=synapse_project(hs), server_name=hs.server_name,
                     **database.inputs(remote.inv, hs), admin=ADMIN, method=method, path=path,
                     register_python=register_program(ADMIN, admin=True), call_python=_CALL_PY)
    stdin = json.dumps(body).encode() if body is not None else b""
    what = f"{method} {path.split('?')[0]}"
    # a read is asked again if Docker could not start it; a change never is
    out = (remote.read if method == "GET" else remote.run)(script, stdin=stdin, what=what).out
    status_line, _, text = out.partition("\n")
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        data = {"error": text.strip()[:300]}
    if not status_line.strip().isdigit() or not 200 <= int(status_line) < 300:
        raise TaskError(f"{hs.server_name}: Synapse answered {status_line.strip()} to {method} "
                        f"{path.split('?')[0]}: {data.get('errcode', '')} {data.get('error', '')}".rstrip())
    return data


def _quote(uid: UserId) -> str:
    return urllib.parse.quote(str(uid), safe="@:")


@dataclass
class Session:
    """Admin calls on one homeserver, under its host's lock."""

    inv: Inventory
    hs: Homeserver

    def __enter__(self) -> "Session":
        self._cm = locked(self.inv, self.inv.hosts[self.hs.host])
        self.remote = self._cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        return call(self.remote, self.hs, method, path, body)


def list_users(inv: Inventory, homeserver: str) -> list[dict]:
    """Every local user (guests aside), deactivated ones included."""
    hs = inv.homeserver(homeserver)
    users, start = [], "0"
    with Session(inv, hs) as s:
        while start is not None:
            page = s.call("GET", f"/_synapse/admin/v2/users?from={urllib.parse.quote(start)}&limit=500"
                                 "&guests=false&deactivated=true")
            users += page.get("users", [])
            start = page.get("next_token")
    return users


def format_users(users: list[dict], server_name: str) -> str:
    own = f"@{ADMIN}:{server_name}"
    rows = [(u["name"], "admin" if u.get("admin") else "", "deactivated" if u.get("deactivated") else "",
             "(synapse-fabric's own)" if u["name"] == own else "") for u in users]
    width = max((len(r[0]) for r in rows), default=4)
    lines = [f"{r[0]:<{width}}  {r[1]:<5}  {r[2]:<11}  {r[3]}".rstrip() for r in sorted(rows)]
    return "\n".join(lines + [f"{len(rows)} user(s) on {server_name}"])


def _user(inv: Inventory, homeserver: str, user: str) -> tuple[Homeserver, UserId]:
    hs = inv.homeserver(homeserver)
    uid = parse_user(user, hs)
    if uid.localpart == ADMIN:
        raise TaskError(f"{uid} is synapse-fabric's own admin; leave it be")
    return hs, uid


def deactivate_user(inv: Inventory, homeserver: str, user: str, erase: bool) -> str:
    """Deactivate (and with `erase`, erase) a user: Synapse's own code logs it out
    everywhere, removes it from its rooms and frees nothing else."""
    hs, uid = _user(inv, homeserver, user)
    with Session(inv, hs) as s:
        s.call("GET", f"/_synapse/admin/v2/users/{_quote(uid)}")  # 404: no such user
        s.call("POST", f"/_synapse/admin/v1/deactivate/{_quote(uid)}", {"erase": erase})
    return f"{uid} deactivated" + (" and erased" if erase else "")


def make_admin(inv: Inventory, homeserver: str, user: str, revoke: bool) -> str:
    hs, uid = _user(inv, homeserver, user)
    with Session(inv, hs) as s:
        s.call("GET", f"/_synapse/admin/v2/users/{_quote(uid)}")
        s.call("PUT", f"/_synapse/admin/v1/users/{_quote(uid)}/admin", {"admin": not revoke})
    return f"{uid} is {'no longer' if revoke else 'now'} a server admin"


def registration_tokens(inv: Inventory, homeserver: str, action: str, token: str | None,
                        uses: int | None, expires_in: str | None) -> str:
    """create | list | revoke registration tokens (registration: token)."""
    hs = inv.homeserver(homeserver)
    if action not in ("create", "list", "revoke"):
        raise TaskError(f"unknown action {action!r}: create, list or revoke")
    if action == "revoke" and not token:
        raise TaskError("revoke needs --token")
    body: dict = {}
    if action == "create":
        if token is not None:
            if not token or len(token) > 64 or not all(c.isalnum() or c in "._~-" for c in token):
                raise TaskError("a token is 1 to 64 of A-Z a-z 0-9 . _ ~ -")
            body["token"] = token
        if uses is not None:
            if uses < 1:
                raise TaskError("--uses must be at least 1")
            body["uses_allowed"] = uses
        if expires_in:
            body["expiry_time"] = int((time.time() + _seconds(expires_in)) * 1000)
    with Session(inv, hs) as s:
        if action == "create":
            made = s.call("POST", "/_synapse/admin/v1/registration_tokens/new", body)
            return _format_tokens([made], hs.server_name, created=True)
        if action == "revoke":
            s.call("DELETE", f"/_synapse/admin/v1/registration_tokens/{urllib.parse.quote(token, safe='')}")
            return f"registration token {token} revoked on {hs.server_name}"
        return _format_tokens(s.call("GET", "/_synapse/admin/v1/registration_tokens").get("registration_tokens", []),
                              hs.server_name)


def _seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit() or int(text[:-1]) < 1:
        raise TaskError(f"invalid duration {text!r}: a number and s, m, h or d (90s, 30m, 12h, 7d)")
    return int(text[:-1]) * units[text[-1]]


def _before_ms(text: str) -> int:
    """`30d` (that long ago) or an ISO date or time (`2026-11-01`, `2026-11-01T12:00`, UTC
    unless it says otherwise) -> milliseconds since the epoch."""
    if text[:1].isdigit() and text[-1:] in "smhd" and text[:-1].isdigit():
        return int((time.time() - _seconds(text)) * 1000)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise TaskError(f"invalid --before {text!r}: a duration (30d) or an ISO date (2026-11-01)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return int(when.timestamp() * 1000)


def purge_remote_media(inv: Inventory, homeserver: str, older_than: str) -> str:
    """Delete the copies of other servers' media this homeserver cached, when last
    used longer ago than `older_than` (they are fetched again when asked for)."""
    hs = inv.homeserver(homeserver)
    before = int((time.time() - _seconds(older_than)) * 1000)
    with Session(inv, hs) as s:
        done = s.call("POST", f"/_synapse/admin/v1/purge_media_cache?before_ts={before}")
    return f"{hs.server_name}: {done.get('deleted', 0)} cached remote media file(s) deleted"


# a room ID (`!opaque:server`, or from room version 12 on `!opaque` alone) or an alias
ROOM_RE = re.compile(r"^(![A-Za-z0-9._~+=-]+(:[A-Za-z0-9.:\[\]-]+)?|#[^\s/:]+:[A-Za-z0-9.:\[\]-]+)$")


def purge_history(inv: Inventory, homeserver: str, room: str, before: str, local: bool,
                  wait_seconds: float = 600) -> str:
    """Delete a room's history older than `before` from this homeserver's database
    (other servers keep theirs). Events from this server's own users go too only
    with `local`. The newest event of the room always stays."""
    hs = inv.homeserver(homeserver)
    if not ROOM_RE.match(room):
        raise TaskError(f"invalid room {room!r}: a room ID (!abc or !abc:server) or alias (#name:server)")
    body = {"purge_up_to_ts": _before_ms(before), "delete_local_events": local}
    with Session(inv, hs) as s:
        started = s.call("POST", f"/_synapse/admin/v1/purge_history/{urllib.parse.quote(room, safe='')}", body)
        purge, deadline = started["purge_id"], time.monotonic() + wait_seconds
        while True:
            status = s.call("GET", f"/_synapse/admin/v1/purge_history_status/{urllib.parse.quote(purge)}")
            if status.get("status") != "active":
                break
            if time.monotonic() > deadline:
                return f"{hs.server_name}: the purge of {room} goes on in Synapse (purge id {purge})"
            time.sleep(1)
    if status.get("status") != "complete":
        raise TaskError(f"{hs.server_name}: the purge of {room} {status.get('status')}: {status.get('error', '')}")
    return f"{hs.server_name}: history of {room} before {before} purged" + (" (local events too)" if local else "")


def _format_tokens(tokens: list[dict], server_name: str, created: bool = False) -> str:
    lines = []
    for t in tokens:
        uses = t.get("uses_allowed")
        exp = t.get("expiry_time")
        lines.append(f"{t['token']}  used {t.get('completed', 0)}/{uses if uses is not None else 'unlimited'}"
                     f"  pending {t.get('pending', 0)}  expires "
                     + (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(exp / 1000)) if exp else "never"))
    head = f"registration token created on {server_name}:" if created else f"{len(tokens)} token(s) on {server_name}"
    return "\n".join([head] + lines)

