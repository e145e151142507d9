"""The tap: what the terminal server, the host link and the service call to record their traffic.

They hold `tap: Tap | None` and call it only when it is set, so recording off costs one `None` check
per frame. A tap must never block or raise into the money path: `Recorder` only appends bytes to a
bounded buffer (and drops, counting, when that is full).

`conn` is any object that stands for one TCP connection (the terminal server's `TerminalConnection`,
the host link's connection): the tap names connections "T1", "T2", ... and "H1", ... by first sight.
"""

from __future__ import annotations

from typing import Protocol

from gateway.iso.framing import CupEnvelope
from gateway.trace.format import Direction, EventKind, Leg


class Tap(Protocol):
    def opened(self, leg: Leg, conn: object, peer: str) -> None:
        """A connection was accepted or made (`peer`: its HOST:PORT)."""

    def closed(self, leg: Leg, conn: object, detail: str = "") -> None:
        """A connection ended; `detail` says why when known."""

    def frame(self, leg: Leg, direction: Direction, conn: object, body: bytes,
              envelope: CupEnvelope | None = None, cause: int | None = None) -> int | None:
        """A whole message body (no length prefix) went in or out; `envelope` is the CUP TPDU + header.
        Returns the frame's number in the recording (None: not recorded), which a later `frame()` of
        a message this one made the SUT send passes as its `cause` (the trace's causal link: the
        upstream request of a terminal request, the reversal of a request that timed out)."""

    def event(self, leg: Leg, conn: object, kind: EventKind, detail: str = "") -> None:
        """Anything else the trace must show: a host timeout, an undecodable frame, an undelivered answer."""
