"""Terminal sessions: who is signed in, with which batch.

Sessions live in memory on purpose: after a gateway restart every terminal is asked to sign in again
(77 + the header's re-sign-in flag), which is the CUP-standard way to resynchronise keys and batch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TerminalSession:
    terminal_id: str
    merchant_id: str
    batch: str  #: 6 digits, as in field 60.2
    key_mode: str


class SessionTable:
    def __init__(self) -> None:
        self._sessions: dict[str, TerminalSession] = {}

    def sign_in(self, terminal_id: str, merchant_id: str, batch: str, key_mode: str) -> TerminalSession:
        session = TerminalSession(terminal_id, merchant_id, batch, key_mode)
        self._sessions[terminal_id] = session
        return session

    def sign_off(self, terminal_id: str) -> None:
        self._sessions.pop(terminal_id, None)

    def get(self, terminal_id: str) -> TerminalSession | None:
        return self._sessions.get(terminal_id)

    def close_batch(self, terminal_id: str) -> str | None:
        """After a settlement the terminal moves to the next batch (LY `AfterSettleTran`)."""
        session = self._sessions.get(terminal_id)
        if session is None:
            return None
        session.batch = next_batch(session.batch)
        return session.batch

    def __len__(self) -> int:
        return len(self._sessions)


def next_batch(batch: str) -> str:
    n = int(batch) + 1
    return f"{1 if n > 999999 else n:06d}"
