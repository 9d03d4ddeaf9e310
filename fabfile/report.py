"""What the operator sees: one line per change, diffs with secrets masked, and a
summary line per host. Lines from parallel hosts never interleave mid-line.

What a diff may show is decided by the file's producer (render.py sets
`RemoteFile.secret`), not guessed from its text: the operator's `synapse_settings`
are masked value by value unless a setting is known to hold no secret."""

from __future__ import annotations

import difflib
import re
import sys
import threading
from typing import Optional

import yaml

from .render import HIDDEN, SETTINGS, SHOW

_SECRET = re.compile(
    r"(?i)^(\s*-?\s*[\w.\"'-]*(?:pass|secret|token|key|pepper|macaroon|dsn|credential|webhook)"
    r"[\w.\"'-]*\s*[:=]\s*)(\S.*)$"
)
_PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")

# Top-level Synapse settings known to hold no secret: their values are shown in a
# diff of `synapse_settings`; every other value there is masked (an operator may put
# an SMTP password, a Sentry DSN or a webhook URL under any key).
PLAIN_SETTINGS = frozenset({
    "admin_contact", "allow_public_rooms_over_federation", "allow_public_rooms_without_auth",
    "auto_join_rooms", "autocreate_auto_join_rooms", "default_room_version", "dynamic_thumbnails",
    "enable_media_repo", "enable_metrics", "enable_registration", "enable_search",
    "federation_domain_whitelist", "forgotten_room_retention_period", "include_profile_data_on_invite",
    "limit_profile_requests_to_users_who_share_rooms", "limit_remote_rooms", "max_image_pixels",
    "max_upload_size", "media_retention", "presence", "rc_admin_redaction", "rc_federation",
    "rc_invites", "rc_joins", "rc_login", "rc_message", "rc_registration", "redaction_retention_period",
    "require_auth_for_profile_requests", "retention", "url_preview_enabled", "user_directory",
    "user_ips_max_age",
})


def mask(line: str) -> str:
    """Hide the value on any line that looks like it carries a secret (a safety net
    for files that are not supposed to hold any)."""
    if _PEM_KEY.search(line):
        return "-----BEGIN PRIVATE KEY----- ***"
    return _SECRET.sub(lambda m: f"{m.group(1)}***", line)


_MISSING = object()


def _mask_values(value, other=_MISSING):
    """`value` with every scalar replaced by '***', or '*** (changed)' where it
    differs from the same place in `other`."""
    if isinstance(value, dict):
        sub = other if isinstance(other, dict) else {}
        return {k: _mask_values(v, sub.get(k, _MISSING)) for k, v in value.items()}
    if isinstance(value, list):
        sub = other if isinstance(other, list) else []
        return [_mask_values(v, sub[i] if i < len(sub) else _MISSING) for i, v in enumerate(value)]
    return "***" if other is _MISSING or other == value else "*** (changed)"


def _masked_settings(text: str, other: Optional[str]) -> Optional[list[str]]:
    """A YAML mapping of Synapse settings with the values masked, as lines; None
    when it is not such a mapping."""
    try:
        data = yaml.safe_load(text) or {}
        ref = yaml.safe_load(other) if other is not None else None
    except yaml.YAMLError:
        return None
    if not isinstance(data, dict):
        return None
    ref = ref if isinstance(ref, dict) else {}
    shown = {k: v if k in PLAIN_SETTINGS else _mask_values(v, ref.get(k, _MISSING if other is None else None))
             for k, v in data.items()}
    return yaml.safe_dump(shown, sort_keys=True, default_flow_style=False).splitlines()


def masked_diff(path: str, old: Optional[bytes], new: bytes, secret: str = SHOW) -> str:
    """A unified diff of a managed file, masked as the file's `secret` policy says."""
    head = f"--- {path}\n+++ {path}\n"
    if secret == HIDDEN or b"PRIVATE KEY" in new or (old and b"PRIVATE KEY" in old):
        return head + "(secret content: not shown)\n"
    try:
        a_text = (old or b"").decode()
        b_text = new.decode()
    except UnicodeDecodeError:
        return head + "(binary content differs)\n"
    if secret == SETTINGS:
        a = _masked_settings(a_text, None) if old is not None else []
        b = _masked_settings(b_text, a_text if old is not None else None)
        if a is None or b is None:
            return head + "(settings that are not a YAML mapping: not shown)\n"
        if a == b:  # only a comment or the order changed
            return head + "(values masked: only comments or layout differ)\n"
    else:
        a = [mask(x) for x in a_text.splitlines()]
        b = [mask(x) for x in b_text.splitlines()]
    lines = difflib.unified_diff(
        a, b,
        fromfile=f"{path} (on host)" if old is not None else "/dev/null",
        tofile=f"{path} (rendered)", lineterm="",
    )
    return "\n".join(lines) + "\n"


class Reporter:
    def __init__(self, out=None):
        self.out = out or sys.stdout
        self._lock = threading.Lock()

    def _write(self, text: str) -> None:
        with self._lock:
            self.out.write(text)
            self.out.flush()

    def line(self, host: str, msg: str) -> None:
        self._write("".join(f"{host}: {part}\n" for part in msg.splitlines() or [""]))

    def diff(self, host: str, text: str) -> None:
        self._write(text)

    def summary(self, results, dry_run: bool = False) -> None:
        out = []
        for r in results:
            if r.failed:
                out.append(f"{r.host}: FAILED after {r.seconds:.1f}s\n  " + r.error.replace("\n", "\n  "))
            else:
                verb = "would change" if dry_run else "changed"
                restarted = f", {'would restart' if dry_run else 'restarted'} {len(r.restarted)}"
                what = f" ({', '.join(r.restarted)})" if r.restarted else ""
                out.append(f"{r.host}: {r.changed} {verb}, {r.ok} ok{restarted}{what} in {r.seconds:.1f}s")
        failed = [r.host for r in results if r.failed]
        total = f"{len(results)} host(s), {len(failed)} failed" + (f": {', '.join(failed)}" if failed else "")
        if dry_run:
            total += " (dry run: nothing was written)"
        self._write("\n".join(out + [total]) + "\n")


class LineWriter:
    """A file-like object for Reporter that hands each non-empty line to `log` (a
    task's own log: a migration's, an uninstall's)."""

    def __init__(self, log):
        self.log = log

    def write(self, text):
        for line in text.splitlines():
            if line.strip():
                self.log(line)

    def flush(self):
        pass
