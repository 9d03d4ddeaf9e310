"""Transport: the only module that talks SSH.

- `connect(inv, host)` opens a fabric Connection that checks host keys strictly
  (fabric's default would accept any unknown key).
- `Remote.run(script, stdin=...)` runs a shell script as root (through `sudo -n`
  for a non-root login). The script text is code we wrote (paths and validated
  names only); data, file contents and secrets travel on stdin, never in argv.
- `Remote.lock()` holds a host-wide lock for the whole run on its own channel;
  when the run ends or its connection dies, the lock goes with it.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import io
import os
import shlex
import socket
import tarfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import paramiko
from fabric import Config, Connection

from .errors import HostKeyError, LockHeld, RemoteError  # noqa: F401  (RemoteError: re-exported)
from .inventory import Host, Inventory
from .layout import LOCK_DIR

# No remote call waits forever (a NAT that drops the connection silently must end
# in an error, and during a migration in its rollback): a deadline for each command
# unless it gives its own, and for streams a limit on silence.
DEFAULT_TIMEOUT = 900.0
STREAM_IDLE_TIMEOUT = 300.0
KEEPALIVE_SECONDS = 15

# In a root-only directory: /run/lock is writable by every local user, any of whom
# could otherwise take (and hold) the deploy lock.
LOCK_FILE = f"{LOCK_DIR}/deploy.lock"
LOCK_OWNER = f"{LOCK_DIR}/deploy.owner"

# `docker exec`'s exit when the runtime could not start the process in the
# container (runc's "read init-p: connection reset by peer" under load): nothing ran.
EXEC_NOT_STARTED = 126


@dataclass
class Result:
    code: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


class _AcceptNewPolicy(paramiko.MissingHostKeyPolicy):
    """Record an unknown host's key (OpenSSH's accept-new); paramiko itself refuses
    a key that differs from a recorded one."""

    def __init__(self, path: Path):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="ascii") as fh:
            fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


def _runtime_errors(out: str) -> str:
    """Docker's own errors that reach stdout, not stderr: a `docker exec -i` whose
    process could not start (exit 126) gets the daemon's reason on its stream. Only
    those lines, never the rest of stdout, which may carry data."""
    return "\n".join(line.strip() for line in out.splitlines()
                     if "OCI runtime" in line or line.startswith("Error response from daemon"))[-2000:]


class Remote:
    """One SSH connection to one inventory host; commands run as root."""

    def __init__(self, inv: Inventory, host: Host, connection: Connection):
        self.inv = inv
        self.host = host
        self.conn = connection
        self.commands = 0  # remote commands run (the benchmark reports it)
        self._lock_channel = None

    @property
    def name(self) -> str:
        return self.host.name

    # -- running commands ----------------------------------------------------
    def _wrap(self, script: str) -> str:
        shell = f"sh -c {shlex.quote(script)}"
        return f"sudo -n {shell}" if self.host.use_sudo else shell

    def run(
        self,
        script: str,
        stdin: bytes | Iterable[bytes] | None = None,
        check: bool = True,
        what: str = "",
        timeout: Optional[float] = None,
        on_stdout: Optional[Callable[[str], None]] = None,
    ) -> Result:
        """Run `script` as root. `stdin` may be bytes or an iterable of chunks
        (streamed). Raises RemoteError when it exits non-zero and `check` is set,
        or when it has not finished after `timeout` seconds (DEFAULT_TIMEOUT)."""
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        if self._lock_channel is not None and (self._lock_channel.closed or not self.conn.is_connected):
            raise RemoteError(f"{self.name}: the SSH connection dropped; stopping (the host lock is gone)")
        self.conn.open()
        self.commands += 1
        chan = self.conn.transport.open_session()
        chan.exec_command(self._wrap(script))
        out, err = bytearray(), bytearray()
        pump = threading.Thread(target=self._drain, args=(chan, out, err, on_stdout), daemon=True)
        pump.start()
        send_error = None
        try:
            if stdin is not None:
                chunks = [stdin] if isinstance(stdin, (bytes, bytearray)) else stdin
                try:
                    for chunk in chunks:
                        chan.sendall(chunk)
                except (socket.error, paramiko.SSHException) as exc:
                    send_error = exc  # the command died early: its stderr says why
            if send_error is None:
                chan.shutdown_write()
            pump.join(timeout)
            if pump.is_alive():
                raise RemoteError(f"{self.name}: {what or 'command'}: timed out after {int(timeout)}s")
            if not chan.status_event.wait(30):
                raise RemoteError(f"{self.name}: {what or 'command'}: connection lost (no exit status)")
            code = chan.recv_exit_status()
        except (socket.error, paramiko.SSHException) as exc:
            raise RemoteError(f"{self.name}: {what or 'command'}: connection lost ({exc})") from None
        finally:
            chan.close()
        result = Result(code, bytes(out), bytes(err))
        if check and code != 0:
            raise RemoteError(self._failure(what or script.splitlines()[0], result), result.code)
        return result

    def read(self, script: str, stdin: bytes = b"", what: str = "", timeout: Optional[float] = None) -> Result:
        """Run a command that changes nothing. When Docker could not start one of
        its processes (exit 126, a runtime hiccup under load), it is asked once more."""
        try:
            return self.run(script, stdin=stdin, what=what, timeout=timeout)
        except RemoteError as exc:
            if exc.code != EXEC_NOT_STARTED:
                raise
        time.sleep(2)
        return self.run(script, stdin=stdin, what=what, timeout=timeout)

    def stream(self, script: str, what: str, idle_timeout: float = STREAM_IDLE_TIMEOUT) -> Iterator[bytes]:
        """Run `script` as root and yield its stdout as it comes (to feed another
        host's command without a copy on this machine). Raises RemoteError at the
        end if it failed, or when nothing arrived for `idle_timeout` seconds."""
        self.conn.open()
        self.commands += 1
        chan = self.conn.transport.open_session()
        chan.exec_command(self._wrap(script))
        chan.shutdown_write()
        err = bytearray()
        last = time.monotonic()
        try:
            while True:
                if chan.recv_ready():
                    last = time.monotonic()
                    yield chan.recv(1 << 20)
                elif chan.recv_stderr_ready():
                    err.extend(chan.recv_stderr(65536))
                elif chan.eof_received or chan.closed:
                    break
                elif time.monotonic() - last > idle_timeout:
                    raise RemoteError(f"{self.name}: {what}: no data for {int(idle_timeout)}s; giving up")
                elif not self.conn.is_connected:
                    raise RemoteError(f"{self.name}: {what}: connection lost")
                else:
                    time.sleep(0.002)
            while chan.recv_stderr_ready():
                err.extend(chan.recv_stderr(65536))
            code = chan.recv_exit_status()
        finally:
            chan.close()
        if code != 0:
            raise RemoteError(self._failure(what, Result(code, b"", bytes(err))), code)

    @staticmethod
    def _drain(chan, out: bytearray, err: bytearray, on_stdout):
        pending = b""
        while True:
            got = False
            if chan.recv_ready():
                data = chan.recv(65536)
                out.extend(data)
                got = True
                if on_stdout:
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        on_stdout(line.decode(errors="replace"))
            if chan.recv_stderr_ready():
                err.extend(chan.recv_stderr(65536))
                got = True
            if not got:
                # Stop at end of output, not at the exit status: sshd may send the
                # status while output is still in flight.
                if (chan.eof_received or chan.closed) and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                time.sleep(0.005)

    def _failure(self, what: str, result: Result) -> str:
        tail = "\n".join(result.err.strip().splitlines()[-15:]) or _runtime_errors(result.out) or "(no error output)"
        hint = ""
        if "sudo" in result.err and "password" in result.err:
            hint = f"\n  hint: user {self.host.user!r} needs passwordless sudo on {self.name}"
        return f"{self.name}: {what} failed (exit {result.code}):\n  " + tail.replace("\n", "\n  ") + hint

    # -- files ---------------------------------------------------------------
    def read_files(self, paths: list[str]) -> dict[str, bytes]:
        """Fetch several files in one round trip (as a tar stream)."""
        if not paths:
            return {}
        listing = "\n".join(p.lstrip("/") for p in paths) + "\n"
        res = self.run(
            "cd / && tar -c -f - --ignore-failed-read -T - 2>/dev/null || true",
            stdin=listing.encode(),
            what="read files",
        )
        found: dict[str, bytes] = {}
        with tarfile.open(fileobj=io.BytesIO(res.stdout), mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    found["/" + member.name] = tar.extractfile(member).read()
        return found

    # -- the run lock --------------------------------------------------------
    def lock(self, wait: float = 60.0, then: str = "") -> str:
        """Take the host's run lock, waiting at most `wait` seconds. `then`: a script
        run right after, on the same channel (a deploy's facts: a no-op deploy is
        then ONE remote command); its output is returned."""
        self.conn.open()
        self.commands += 1
        me = f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        end = f"sfab-end-{os.urandom(8).hex()}".encode()
        after = f"( {then}\n) </dev/null 2>/dev/null; echo; echo {end.decode()}; " if then else ""
        # builtins where they do (read, printf): each process is a fork on every host.
        # The shell holds the lock (fd 9) until its stdin ends: our close, or a lost connection.
        script = (
            f"{{ [ -d {LOCK_DIR} ] || mkdir -p -m 0700 {LOCK_DIR}; }} && exec 9>{LOCK_FILE} && "
            f"if flock -w {int(wait)} 9; then IFS= read -r me; printf '%s\\n' \"$me\" > {LOCK_OWNER}.new "
            f"&& mv {LOCK_OWNER}.new {LOCK_OWNER} && echo locked && {after}while read -r _; do :; done; "
            f"else echo busy; cat {LOCK_OWNER} 2>/dev/null; exit 75; fi"
        )
        chan = self.conn.transport.open_session()
        chan.exec_command(self._wrap(script))
        # Stdin stays open while we hold the lock: the remote side reads one line
        # (who we are, for whoever waits next) and then blocks until we close.
        chan.sendall(me.encode() + b"\n")
        deadline = time.monotonic() + wait + 15
        reply = _read_until(chan, b"", b"\n", deadline)
        if reply.startswith(b"locked"):
            self._lock_channel = chan
            if not then:
                return ""
            stop = b"\n" + end + b"\n"
            out = _read_until(chan, reply.split(b"\n", 1)[1], stop, time.monotonic() + DEFAULT_TIMEOUT)
            if stop not in out:
                raise RemoteError(f"{self.name}: the lock's channel ended before its script did")
            return out[: out.index(stop)].decode(errors="replace")
        # busy: the holder's line follows, then the command exits
        reply = _read_until(chan, reply, None, deadline)
        rest = reply.decode(errors="replace").split("\n", 1)
        holder = rest[1].strip() if len(rest) > 1 and rest[1].strip() else "unknown"
        chan.close()
        raise LockHeld(
            f"{self.name}: another run holds the lock after waiting {int(wait)}s (held by {holder}); "
            "try again when it has finished"
        )

    def close(self) -> None:
        if self._lock_channel is not None:
            with contextlib.suppress(Exception):
                self._lock_channel.shutdown_write()
                self._lock_channel.close()
            self._lock_channel = None
        with contextlib.suppress(Exception):
            self.conn.close()


def _read_until(chan, buf: bytes, stop: bytes | None, deadline: float) -> bytes:
    """Read `chan`'s stdout onto `buf` until `stop` is in it (None: until EOF), EOF
    or `deadline`. Blocking reads, no polling: twenty hosts' threads cost nothing
    while they wait."""
    while (stop is None or stop not in buf) and (left := deadline - time.monotonic()) > 0:
        chan.settimeout(left)
        try:
            data = chan.recv(65536)
        except socket.timeout:
            break
        if not data:
            break
        buf += data
    chan.settimeout(None)
    return buf


_known_cache: dict[tuple[str, int, int], paramiko.HostKeys] = {}
_known_lock = threading.Lock()


def _known_hosts(path: Path) -> paramiko.HostKeys:
    """The known_hosts file, parsed once per run (and again when it changes)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return paramiko.HostKeys()
    with _known_lock:
        cache_key = (str(path), st.st_mtime_ns, st.st_size)
        if cache_key not in _known_cache:
            _known_cache[cache_key] = paramiko.HostKeys(str(path))
        return _known_cache[cache_key]


def _private_key(path: str) -> Optional[paramiko.PKey]:
    """The key in `path`, read once per run however many hosts use it (and again
    when the file changes); None when paramiko must try it itself (a passphrase,
    a missing file: its own errors)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _key_file(path, st.st_mtime_ns, st.st_size)


@functools.cache
def _key_file(path: str, mtime_ns: int, size: int) -> Optional[paramiko.PKey]:
    try:
        return paramiko.PKey.from_path(path)
    except (paramiko.SSHException, OSError, ValueError):
        return None


def connect(inv: Inventory, host: Host) -> Remote:
    """A Remote for `host` with strict host-key checking (see inventory `ssh`)."""
    kwargs = {"allow_agent": True, "look_for_keys": host.key is None}
    if host.key is not None:
        key = _private_key(str(host.key))
        if key is not None:
            kwargs["pkey"] = key
        else:
            kwargs["key_filename"] = [str(host.key)]
    conn = Connection(
        host=host.address,
        user=host.user,
        port=host.port,
        # fabric's own Config (an invoke one is cloned into one), one per connection:
        # a Config shared by connections opening side by side loses keys. ~/.ssh/config
        # is not read: the inventory says how to reach each host.
        config=Config(overrides={"load_ssh_configs": False}),
        connect_timeout=inv.ssh.connect_timeout,
        connect_kwargs=kwargs,
    )
    known = inv.ssh.known_hosts or Path("~/.ssh/known_hosts").expanduser()
    client = conn.client
    keys = client.get_host_keys()
    keys.clear()
    # only this host's recorded keys (the file is read once per run, not per host)
    name = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
    for keytype, key in (_known_hosts(known).lookup(name) or {}).items():
        keys.add(name, keytype, key)
    if inv.ssh.accept_new_hosts:
        client.set_missing_host_key_policy(_AcceptNewPolicy(known))
    else:
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return Remote(inv, host, conn)


@contextlib.contextmanager
def session(inv: Inventory, host: Host) -> Iterator[Remote]:
    """An open Remote without the run lock (for reads, and for programs that take
    their own lock on the host), closed after."""
    remote = open_remote(inv, host)
    try:
        yield remote
    finally:
        remote.close()


@contextlib.contextmanager
def locked(inv: Inventory, host: Host) -> Iterator[Remote]:
    """An open Remote holding the host's run lock, closed (and unlocked) after."""
    with session(inv, host) as remote:
        remote.lock(inv.ssh.lock_timeout)
        yield remote


def open_remote(inv: Inventory, host: Host) -> Remote:
    """connect() and open, with one clear message for each way SSH fails."""
    remote = connect(inv, host)
    where = f"{host.name} ({host.user}@{host.address}:{host.port})"
    known = inv.ssh.known_hosts or "~/.ssh/known_hosts"
    try:
        remote.conn.open()
        # keepalives make a silently dropped connection (NAT, firewall) fail, not hang
        remote.conn.transport.set_keepalive(KEEPALIVE_SECONDS)
    except paramiko.BadHostKeyException:
        raise HostKeyError(
            f"{where}: the host key CHANGED since it was recorded in {known}. "
            "This may be an attack, or the host was reinstalled: check with its provider, "
            "then remove the old line from known_hosts."
        ) from None
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise HostKeyError(
                f"{where}: host key unknown (not in {known}). Verify it and add it "
                "(ssh-keyscan), or set ssh.accept_new_hosts: true in the inventory."
            ) from None
        raise RemoteError(f"{where}: SSH failed: {exc}") from None
    except (socket.timeout, TimeoutError):
        raise RemoteError(f"{where}: unreachable (connection timed out)") from None
    except OSError as exc:
        raise RemoteError(f"{where}: unreachable ({exc.strerror or exc})") from None
    return remote


class Connections:
    """SSH connections opened ahead, one thread each, as soon as a run knows its
    hosts: the handshakes (the hosts' work, not this machine's) go on while the run
    loads the rest of its code and renders. `take` hands one over, raising what
    opening it raised; `close` closes those no one took. The threads are daemons: a
    run that fails before it needs them (a render error) exits at once, without
    waiting for a slow host's connect timeout."""

    def __init__(self, inv: Inventory, names: Iterable[str]):
        self._inv = inv
        self._opening: dict[str, Future] = {}
        try:
            for name in names:
                opening = self._opening[name] = Future()
                threading.Thread(target=self._open, args=(opening, inv.hosts[name]), name=f"ssh-open-{name}",
                                 daemon=True).start()
        except BaseException:
            self._opening.pop(name, None)  # (its thread never started)
            self.close()
            raise

    def _open(self, opening: Future, host: Host) -> None:
        try:
            opening.set_result(open_remote(self._inv, host))
        except BaseException as exc:  # handed to whoever takes it
            opening.set_exception(exc)

    def take(self, host: Host) -> Remote:
        opening = self._opening.pop(host.name, None)
        return opening.result() if opening is not None else open_remote(self._inv, host)

    def close(self) -> None:
        for opening in self._opening.values():
            opening.add_done_callback(lambda f: f.exception() is None and f.result().close())
        self._opening.clear()
