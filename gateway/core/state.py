"""What the service keeps about terminals between their requests: sessions (who is signed in, with which
batch and keys) and the day's risk-limit usage, behind two small interfaces.

`LocalSessions` and `LocalLimits` keep it in this process (one instance, SQLite or memory journal: the
behaviour and speed of before, `get` is the dict lookup itself). Several instances on one PostgreSQL
database share it instead (`gateway.store.shared_state`): a terminal that signs in on one instance buys
on another, and no two instances both approve past a terminal's daily limit.

The hot path never waits: `Sessions.get` answers from memory. Only when that answer refuses a request
(not signed in, another batch, a MAC that does not verify) does the service ask `refresh`, which looks
at the shared copy (another instance may have signed the terminal in, or moved its batch on).
"""

from __future__ import annotations

from typing import Protocol

from gateway.config import LimitsConfig
from gateway.core.limits import RiskLimits
from gateway.core.sessions import SessionTable, TerminalSession


class Sessions(Protocol):
    def get(self, terminal_id: str) -> TerminalSession | None:
        """The session as this instance knows it (no I/O: called for every request)."""
        ...

    async def sign_in(self, terminal_id: str, merchant_id: str, batch: str, key_mode: str) -> TerminalSession:
        """Record a sign-in whose working keys the security module has just issued; when it returns,
        every instance can serve the terminal."""
        ...

    async def sign_off(self, terminal_id: str) -> None: ...

    async def close_batch(self, terminal_id: str) -> str | None:
        """After a settlement: the next batch (None when the terminal is not signed in)."""
        ...

    async def refresh(self, terminal_id: str) -> bool:
        """Take the shared copy of the terminal's session (and working keys) when it differs from this
        instance's; True when it did. Always False for a single instance: nothing else changes it."""
        ...

    def __len__(self) -> int: ...


class Limits(Protocol):
    async def reserve(self, terminal_id: str, amount: int, day: str) -> str | None:
        """Reserve `amount` of the terminal's day; a response code (61) when a limit refuses it."""
        ...

    def release(self, terminal_id: str, amount: int, day: str) -> None:
        """Give a reservation back (no money moved). Never waits."""
        ...

    def seed(self, day: str, totals: dict[str, int]) -> None: ...

    def used(self, terminal_id: str) -> int: ...


class LocalSessions:
    """Sessions of one instance, in memory (see `gateway.core.sessions`)."""

    def __init__(self) -> None:
        self.table = SessionTable()
        self.get = self.table.get  # the bound method itself: no extra call on the hot path

    async def sign_in(self, terminal_id: str, merchant_id: str, batch: str, key_mode: str) -> TerminalSession:
        return self.table.sign_in(terminal_id, merchant_id, batch, key_mode)

    async def sign_off(self, terminal_id: str) -> None:
        self.table.sign_off(terminal_id)

    async def close_batch(self, terminal_id: str) -> str | None:
        return self.table.close_batch(terminal_id)

    async def refresh(self, terminal_id: str) -> bool:
        return False

    def __len__(self) -> int:
        return len(self.table)


class LocalLimits:
    """The day's limits of one instance, in memory (see `gateway.core.limits`)."""

    def __init__(self, config: LimitsConfig) -> None:
        self.limits = RiskLimits(config)
        self.release = self.limits.release
        self.seed = self.limits.seed
        self.used = self.limits.used

    async def reserve(self, terminal_id: str, amount: int, day: str) -> str | None:
        return self.limits.reserve(terminal_id, amount, day)
