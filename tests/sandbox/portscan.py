"""Which TCP ports of a sandbox host answer from outside it (this machine is outside
every VPS): a non-blocking connect() to each of 1-65535, a batch at a time. A
firewall that refuses with a TCP reset (ours) or a port nobody listens on answers
at once; a dropped packet counts as closed after the timeout."""

from __future__ import annotations

import errno
import selectors
import socket
import time


def open_tcp_ports(address: str, ports=range(1, 65536), batch: int = 1000, timeout: float = 3.0) -> list[int]:
    """The ports of `address` that accept a TCP connection."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    ports = list(ports)
    found: list[int] = []
    for start in range(0, len(ports), batch):
        sel = selectors.DefaultSelector()
        pending = 0
        for port in ports[start:start + batch]:
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex((address, port))
            if err in (0, errno.EINPROGRESS):
                sel.register(s, selectors.EVENT_WRITE, port)
                pending += 1
            else:
                s.close()
        deadline = time.monotonic() + timeout
        while pending and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                s = key.fileobj
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    found.append(key.data)
                sel.unregister(s)
                s.close()
                pending -= 1
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()
    return sorted(found)
