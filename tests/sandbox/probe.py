"""A prober: one request every 100 ms through a public name, counting failures
(for the migration test and the downtime benchmark)."""

from __future__ import annotations

import socket
import ssl
import threading
import time

from tests.sandbox.client import resolve


class Prober:
    """GET `path` on https://`name` every 100 ms (bounded in time), resolving through
    the sandbox DNS at every request and verifying TLS; records when requests fail."""

    def __init__(self, cafile, name="matrix.one.test", path="/_matrix/client/versions", limit_s=900):
        self.name, self.path, self.limit_s = name, path, limit_s
        self.ok = self.failed = 0
        self.failures: list[float] = []
        self._stop = threading.Event()
        self.ctx = ssl.create_default_context(cafile=str(cafile))
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _once(self) -> bool:
        try:
            ip = resolve(self.name)
            with socket.create_connection((ip, 443), timeout=2) as raw:
                with self.ctx.wrap_socket(raw, server_hostname=self.name) as tls:
                    tls.settimeout(2)
                    tls.sendall(f"GET {self.path} HTTP/1.1\r\nHost: {self.name}\r\n"
                                "Connection: close\r\n\r\n".encode())
                    head = tls.recv(64)
                    return head.startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def _loop(self):
        end = time.monotonic() + self.limit_s
        while not self._stop.is_set() and time.monotonic() < end:
            t = time.monotonic()
            if self._once():
                self.ok += 1
            else:
                self.failed += 1
                self.failures.append(t)
            self._stop.wait(max(0.0, 0.1 - (time.monotonic() - t)))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join(10)

    @property
    def downtime(self) -> float:
        return (self.failures[-1] - self.failures[0] + 0.1) if self.failures else 0.0
