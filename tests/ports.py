"""Loopback ports for tests that must name a port before the process that listens on it starts (a
gateway restarted on the same port, a config file written first).

Binding port 0 and closing it hands out a port from the kernel's ephemeral range (32768-60999 here),
the same range every outgoing connection's local port and every other `bind(0)` draws from, so under
xdist another worker could be given the same port before ours was bound ("Address already in use",
seen in CI). These ports come from below that range instead, a block of its own per xdist worker,
starting at a random place in the block (two pytest runs at once rarely meet) and each one checked
free by binding it before it is handed out.
"""

from __future__ import annotations

import os
import random
import socket
from typing import Final

LOOPBACK: Final = "127.0.0.1"
FIRST: Final = 20_000  #: below the ephemeral range (net.ipv4.ip_local_port_range starts at 32768)
BLOCK: Final = 3_000  #: ports per xdist worker; worker gwN uses block N modulo BLOCKS
BLOCKS: Final = 4


def _block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) % BLOCKS if worker.isdigit() else 0
    start = FIRST + index * BLOCK
    return range(start, start + BLOCK)


class _Ports:
    def __init__(self) -> None:
        self.block = _block()
        self.next = random.randrange(len(self.block))

    def take(self) -> int:
        for _ in range(len(self.block)):  # bounded: one pass over the block
            port = self.block[self.next % len(self.block)]
            self.next += 1
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((LOOPBACK, port))
                except OSError:
                    continue  # in use, or in TIME_WAIT after an earlier test
                return port
        raise RuntimeError(f"no free loopback port in {self.block.start}-{self.block.stop - 1}")


_ports = _Ports()


def free_port() -> int:
    """A loopback port nobody listens on now, not one the kernel will hand to a `bind(0)` or a connect."""
    return _ports.take()
