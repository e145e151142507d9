"""Runs one load in one process: sessions, schedule, recording, progress.

Every session is a worker that takes "tickets" from the schedule (`gateway.load.schedule`), performs
one request per ticket and records it:

- open loop: a ticket carries its intended start time, fixed when the run starts. A ticket that is
  already due when a session frees up to take it (every session was busy: the server is slow or
  stalled) is measured from its intended start, so the time it spent waiting for a session is part of
  its latency: the queueing a real client population would have seen is not hidden (coordinated
  omission corrected). A ticket taken early is slept for and measured from its actual send: event-loop
  timers are coarse (uvloop's are 1 ms) and their jitter is the load tool's, not the server's.
  `send_lag_ms` in the report says how late requests went out against their intended times; a large
  lag with little server latency means the load tool itself (CPU, sessions) was the bottleneck.
- closed loop: a ticket is "now"; each of the N sessions has exactly one request in flight.

Requests that start during the warm-up are done but never recorded. A transport error or a timeout
counts as an error by kind ("timeout", "exc:ConnectionResetError", "connect:OSError") and the session is
replaced with a fresh one. Request timeouts are kept by one watcher task for all sessions, which
cancels a request's scope once its deadline has passed: a `fail_after` per request would arm and
disarm an event-loop timer per request, a large share of the load tool's own cost per request.

Timestamps come from `time.perf_counter()` (ns resolution, and the same CLOCK_MONOTONIC in every process
on Linux), not the event loop's clock, which is in whole milliseconds on uvloop.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TextIO

import anyio

from gateway.load.config import KindPicker, LoadConfig
from gateway.load.driver import Driver, LoadError, Session
from gateway.load.hdr import SecondStats, percentile_ms, run_histogram, to_us
from gateway.load.report import LoadReport, Partial, merge, partial_from
from gateway.load.schedule import ClosedLoopSchedule, OpenLoopSchedule, Schedule

#: sessions connected at once during setup
CONNECT_PARALLELISM = 32
#: pause after a failed reconnect, so a dead target is not hammered in a tight loop
RECONNECT_PAUSE = 0.1


@dataclass(slots=True)
class Tick:
    """One progress report: the measured second that just ended (None during the warm-up)."""

    second: int | None
    stats: SecondStats | None
    in_flight: int
    warmup_completions: int


ProgressSink = Callable[[Tick], None]


class ProgressPrinter:
    """Writes one line per second: rate, errors, p50/p99 of that second."""

    def __init__(self, stream: TextIO | None = None, prefix: str = "") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.prefix = prefix

    def __call__(self, tick: Tick) -> None:
        self.stream.write(self.prefix + format_tick(tick) + "\n")
        self.stream.flush()


def format_tick(tick: Tick) -> str:
    if tick.second is None:
        return f"[warm-up] {tick.warmup_completions} requests done, in flight {tick.in_flight}"
    stats = tick.stats or SecondStats()
    p50 = percentile_ms(stats.hist, 50)
    p99 = percentile_ms(stats.hist, 99)
    lat = "-" if p50 is None or p99 is None else f"p50 {p50:.3f} ms  p99 {p99:.3f} ms"
    return (f"[{tick.second + 1:4d}s] rate {stats.count:6d}/s  errors {stats.errors:5d}  {lat}  "
            f"in flight {tick.in_flight}")


async def _close_quietly(session: Session) -> None:
    with anyio.move_on_after(2, shield=True), contextlib.suppress(Exception):
        await session.aclose()


class LoadRunner:
    def __init__(self, driver: Driver, config: LoadConfig, *, progress: ProgressSink | None = None,
                 before_start: Callable[[], Awaitable[None]] | None = None) -> None:
        """`before_start` is awaited after every session is connected and prepared, right before the
        clock starts (worker processes use it as a start barrier)."""
        self.driver = driver
        self.config = config
        self.progress = progress
        self.before_start = before_start
        self.picker = KindPicker(config.mix, config.seed)
        self.ok_codes = config.ok_codes
        # recording (measured requests only)
        self.hist = run_histogram()
        self.seconds: dict[int, SecondStats] = {}
        self.errors: Counter[str] = Counter()
        self.requests = 0
        self.ok = 0
        self.last_end = 0.0
        self.warmup_completions = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lag_sum = 0.0
        self.lag_max = 0.0
        self.lag_n = 0
        self.measure_from = 0.0
        self._progress_second = 0  # next measured second to report
        #: slot → (perf_counter deadline, cancel scope) of the request that session has in flight
        self._deadlines: dict[int, tuple[float, anyio.CancelScope]] = {}
        self._tail_second = math.ceil(config.duration) if config.duration is not None else -1

    # --- sessions --------------------------------------------------------------------------------------

    async def _open_session(self) -> Session:
        with anyio.fail_after(self.config.request_timeout):
            session = await self.driver.connect()
            prepare = getattr(session, "prepare", None)
            if prepare is not None:
                try:
                    await prepare()
                except BaseException:
                    await _close_quietly(session)
                    raise
        return session

    async def _connect_all(self, n: int) -> list[Session]:
        sessions: list[Session] = []
        failures: list[BaseException] = []
        limiter = anyio.CapacityLimiter(CONNECT_PARALLELISM)

        async def one() -> None:
            async with limiter:
                try:
                    sessions.append(await self._open_session())
                except Exception as exc:
                    failures.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
        if failures:
            for session in sessions:
                await _close_quietly(session)
            first = failures[0]
            raise LoadError(f"{len(failures)} of {n} sessions could not connect or prepare: "
                            f"{type(first).__name__}: {first}")
        return sessions

    # --- the run ---------------------------------------------------------------------------------------

    async def run(self) -> Partial:
        cfg = self.config
        n = cfg.session_count
        sessions: list[Session | None] = list(await self._connect_all(n))
        if self.before_start is not None:
            await self.before_start()
        t0 = time.perf_counter()
        self.measure_from = t0 + cfg.warmup
        self.last_end = self.measure_from
        schedule: Schedule
        if cfg.open_loop:
            assert cfg.rate is not None
            schedule = OpenLoopSchedule(t0 + cfg.phase, cfg.rate, self.measure_from, cfg.duration, cfg.count)
        else:
            schedule = ClosedLoopSchedule(self.measure_from, cfg.duration, cfg.count)
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._enforce_timeouts)
                if self.progress is not None:
                    outer.start_soon(self._report_progress, t0)
                async with anyio.create_task_group() as tg:
                    for i, session in enumerate(sessions):
                        tg.start_soon(self._worker, i, session, schedule, sessions)
                outer.cancel_scope.cancel()
            self._flush_progress()
        finally:
            for session in sessions:
                if session is not None:
                    await _close_quietly(session)
            driver_close = getattr(self.driver, "aclose", None)
            if driver_close is not None:
                with anyio.move_on_after(5, shield=True):
                    await driver_close()
        return partial_from(self.requests, self.ok, self.errors, self.last_end - self.measure_from, self.hist,
                            self.seconds, self.max_in_flight, n, self.lag_sum, self.lag_max, self.lag_n)

    async def _worker(self, slot: int, session: Session | None, schedule: Schedule,
                      sessions: list[Session | None]) -> None:
        open_loop = self.config.open_loop
        timeout = self.config.request_timeout
        deadlines = self._deadlines
        now = time.perf_counter
        while True:
            picked_up = now()
            ticket = schedule.next_ticket(picked_up)
            if ticket is None:
                return
            intended, measured = ticket
            # see the module docstring: overdue tickets count from their intended start
            overdue = intended <= picked_up
            if open_loop and not overdue:
                await anyio.sleep(intended - picked_up)
            if session is None:
                session = await self._reconnect(measured)
                if session is None:
                    continue
                sessions[slot] = session
            kind = self.picker.pick()
            self.in_flight += 1
            if self.in_flight > self.max_in_flight:
                self.max_in_flight = self.in_flight
            sent = now()
            code: str | None = None
            failure: str | None = None
            scope = anyio.CancelScope()
            deadlines[slot] = (sent + timeout, scope)  # see _enforce_timeouts
            try:
                with scope:
                    code = await session.request(kind)
                if scope.cancelled_caught:
                    failure = "timeout"
            except TimeoutError:  # a session's own timeout counts the same
                failure = "timeout"
            except Exception as exc:  # any transport failure: count it by kind, replace the session
                failure = f"exc:{type(exc).__name__}"
            finally:
                del deadlines[slot]
                self.in_flight -= 1
            end = now()
            if failure is not None:
                sessions[slot] = None
                await _close_quietly(session)
                session = None
            if not measured:
                self.warmup_completions += 1
                continue
            if open_loop:
                lag = sent - intended
                self.lag_sum += lag
                self.lag_n += 1
                if lag > self.lag_max:
                    self.lag_max = lag
                self._record(end, end - (intended if overdue else sent), code, failure)
            else:
                self._record(end, end - sent, code, failure)

    async def _enforce_timeouts(self) -> None:
        """Cancel every request that is still in flight at its deadline (sent + request_timeout).

        Sleeps until the earliest deadline of the requests in flight; with none in flight, for one
        timeout, which no request started meanwhile can be due before. So it wakes about once per
        timeout while requests complete in time, and cancels a hanging one when it is due."""
        timeout = self.config.request_timeout
        deadlines = self._deadlines
        while True:
            # a request already cancelled stays listed until its worker runs again: not due twice
            earliest = min((deadline for deadline, scope in deadlines.values() if not scope.cancel_called),
                           default=None)
            if earliest is None:
                await anyio.sleep(timeout)
                continue
            delay = earliest - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
                continue  # requests have come and gone meanwhile: look again
            now = time.perf_counter()
            for deadline, scope in deadlines.values():
                if deadline <= now:
                    scope.cancel()

    async def _reconnect(self, measured: bool) -> Session | None:
        try:
            return await self._open_session()
        except Exception as exc:
            if measured:
                self._record(time.perf_counter(), None, None, f"connect:{type(exc).__name__}")
            await anyio.sleep(RECONNECT_PAUSE)
            return None

    def _record(self, end: float, latency: float | None, code: str | None, failure: str | None) -> None:
        self.requests += 1
        if end > self.last_end:
            self.last_end = end
        second = int(end - self.measure_from)
        if second == self._tail_second:
            second -= 1  # a request of the last second that completed just after it: no 1-request bar
        stats = self.seconds.get(second)
        if stats is None:
            stats = self.seconds[second] = SecondStats()
        stats.count += 1
        if failure is None and code in self.ok_codes:
            self.ok += 1
        else:
            stats.errors += 1
            key = failure if failure is not None else str(code)
            self.errors[key] += 1
            stats.codes[key] += 1
        if latency is not None and failure is None:
            us = to_us(latency)
            self.hist.record_value(us)
            stats.hist.record_value(us)

    async def _report_progress(self, t0: float) -> None:
        """A line per warm-up second, then one per measured second (aligned on the measurement start)."""
        assert self.progress is not None
        now = time.perf_counter
        tick = t0 + 1
        while tick < self.measure_from:
            await anyio.sleep(max(0.0, tick - now()))
            self.progress(Tick(None, None, self.in_flight, self.warmup_completions))
            tick += 1
        while True:
            second = self._progress_second
            await anyio.sleep(max(0.0, self.measure_from + second + 1 - now()))
            self._progress_second = second + 1
            self.progress(Tick(second, self.seconds.get(second), self.in_flight, self.warmup_completions))

    def _flush_progress(self) -> None:
        """Report the seconds the run ended in before their tick came round."""
        if self.progress is None or not self.seconds:
            return
        for second in range(self._progress_second, max(self.seconds) + 1):
            self.progress(Tick(second, self.seconds.get(second), 0, self.warmup_completions))
        self._progress_second = max(self.seconds) + 1


async def run_load(
    driver: Driver, config: LoadConfig, *, progress: bool | ProgressSink = False
) -> LoadReport:
    """Run one load in this process and report it. `progress=True` prints a line per second on stderr."""
    sink: ProgressSink | None = ProgressPrinter() if progress is True else (progress or None)
    partial = await LoadRunner(driver, config, progress=sink).run()
    return merge([partial], config, processes=1)
