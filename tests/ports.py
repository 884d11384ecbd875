"""Free loopback ports for tests that start servers of their own."""

from __future__ import annotations

import contextlib
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(size: int, avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """A port whose next `size - 1` neighbours are free too: the provider sandbox serves SMTP, APNs
    and FCM (HTTP/2) on its port + 1, + 2 and + 3."""
    for _ in range(100):
        first = free_port()
        block = range(first, first + size)
        if avoid.intersection(block):
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in block:
                    s = held.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise RuntimeError(f"no block of {size} free ports found")
