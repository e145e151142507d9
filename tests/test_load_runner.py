"""Load runner behaviour with in-process drivers: open-loop schedule and coordinated-omission
correction, closed loop in-flight count, warm-up exclusion, kind mix, errors, progress."""

from __future__ import annotations

import io

import anyio
import pytest

from gateway.load import runner as runner_module
from gateway.load.config import KindPicker, LoadConfig
from gateway.load.driver import LoadError
from gateway.load.runner import ProgressPrinter, Tick, run_load

pytestmark = pytest.mark.anyio


class ScriptedDriver:
    """Requests answer after `service` seconds with "00"; call number `stall_at` (1-based, across all
    sessions) takes `stall_for` seconds instead. Records what it saw."""

    def __init__(self, *, service: float = 0.0, stall_at: int | None = None, stall_for: float = 0.0,
                 codes: dict[int, str] | None = None, raise_every: int | None = None) -> None:
        self.service = service
        self.stall_at = stall_at
        self.stall_for = stall_for
        self.codes = codes or {}
        self.raise_every = raise_every
        self.calls = 0
        self.connects = 0
        self.closes = 0
        self.prepared = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.in_flight_at_start: list[int] = []
        self.kinds: list[str] = []

    async def connect(self) -> ScriptedSession:
        self.connects += 1
        return ScriptedSession(self)


class ScriptedSession:
    def __init__(self, driver: ScriptedDriver) -> None:
        self.d = driver

    async def prepare(self) -> None:
        self.d.prepared += 1

    async def request(self, kind: str) -> str:
        d = self.d
        d.calls += 1
        call = d.calls
        d.kinds.append(kind)
        d.in_flight += 1
        d.max_in_flight = max(d.max_in_flight, d.in_flight)
        d.in_flight_at_start.append(d.in_flight)
        try:
            if d.raise_every and call % d.raise_every == 0:
                raise ConnectionResetError("peer reset")
            await anyio.sleep(d.stall_for if call == d.stall_at else d.service)
            return d.codes.get(call, "00")
        finally:
            d.in_flight -= 1

    async def aclose(self) -> None:
        self.d.closes += 1


def count_at_or_above(hist, value_us: int) -> int:
    return sum(item.count_at_value_iterated_to for item in hist.get_recorded_iterator()
               if item.value_iterated_to >= value_us)


async def test_open_loop_keeps_the_schedule_and_counts_the_queueing_behind_a_stall():
    # One session, 500 requests/s for 1 s; request 100 (t ≈ 0.2 s) stalls the session for 200 ms.
    # The ~100 requests due during the stall must show their wait: latencies spread over 0..200 ms.
    # A tool that measured from the actual send would see one slow request and p99 ≈ 0.
    driver = ScriptedDriver(stall_at=100, stall_for=0.2)
    config = LoadConfig(rate=500, duration=1.0, sessions=1)
    with anyio.fail_after(10):
        report = await run_load(driver, config)
    assert report.requests == 500 and report.ok == 500
    assert driver.calls == 500
    # the schedule is kept: the backlog goes out at once after the stall, the run does not stretch
    assert report.elapsed_s < 1.18  # a schedule that slipped by the stall would end at ≥ 1.2 s
    lat = report.latency_ms
    assert lat["max"] >= 195
    assert lat["p99"] >= 180
    assert lat["p90"] >= 80
    # ≈ 75 requests were due in the first 150 ms of the stall, so waited ≥ 50 ms (more when a busy
    # machine adds stalls of its own: those are real queueing too)
    assert count_at_or_above(report.histogram, 50_000) >= 60
    # the requests not caught by the stall stay fast: far below the stall (a schedule padded by it would
    # put the median near 100 ms); not a few ms, which a machine busy with other work does not keep
    assert lat["p50"] < 40


class _LateTimers:
    """The runner's view of anyio with every timed sleep waking LATENESS late: a coarse timer whose
    lateness is known (uvloop's timers are 1 ms ticks, trio rounds up), instead of the machine's own."""

    LATENESS = 0.02

    def __getattr__(self, name: str) -> object:
        return getattr(anyio, name)

    @staticmethod
    async def sleep(delay: float) -> None:
        await anyio.sleep(delay + _LateTimers.LATENESS if delay > 0 else delay)


async def test_open_loop_is_not_padded_by_timer_lateness_when_sessions_are_free(monkeypatch):
    # The service is instant and every timer wakes 20 ms late: that lateness is the load tool's own and
    # must show as send lag, never in the latency of a request whose session was free. Padded, every
    # latency would be >= 20 ms. 40/s over 4 sessions gives each session 100 ms between tickets, so a
    # ticket is overdue (and rightly counts its wait) only after a stall of 80 ms or more; it used to be
    # measured with the machine's own timers (p90 < 0.3 ms), which a loaded machine missed (p90 0.4-10 ms
    # with six busy loops on the two cores), a stall being queueing, not padding.
    monkeypatch.setattr(runner_module, "anyio", _LateTimers())
    driver = ScriptedDriver(service=0.0)
    with anyio.fail_after(20):
        report = await run_load(driver, LoadConfig(rate=40, duration=1.0, sessions=4))
    assert report.requests == 40
    assert report.send_lag_ms["mean"] >= 0.8 * 1000 * _LateTimers.LATENESS  # the lateness is there, as lag
    assert report.latency_ms["p50"] < 1000 * _LateTimers.LATENESS / 2, report.latency_ms


async def test_open_loop_count_and_rate_set_the_number_of_requests():
    driver = ScriptedDriver()
    with anyio.fail_after(10):
        report = await run_load(driver, LoadConfig(rate=1000, count=300, sessions=8))
    assert report.requests == 300 == driver.calls
    assert 0.25 <= report.elapsed_s <= 0.5


async def test_closed_loop_keeps_n_requests_in_flight():
    driver = ScriptedDriver(service=0.005)
    with anyio.fail_after(10):
        report = await run_load(driver, LoadConfig(concurrency=6, duration=0.5))
    assert driver.connects == 6 and driver.prepared == 6
    assert driver.max_in_flight == 6
    assert report.max_in_flight == 6
    # each request starts while the five others are still out
    starts = driver.in_flight_at_start[6:]
    assert sum(starts) / len(starts) >= 5.5
    # enough rounds for that average to mean something (~400 on an idle machine, 60 seen on a busy one)
    assert report.requests >= 6 * 5
    assert report.latency_ms["p50"] >= 4.5


async def test_warm_up_requests_are_excluded_from_every_statistic():
    # open loop, one session: tickets 1..60 are the 0.3 s warm-up at 200/s; they answer "99" slowly
    codes = {i: "99" for i in range(1, 61)}
    driver = ScriptedDriver(codes=codes, stall_at=30, stall_for=0.1)
    with anyio.fail_after(10):
        report = await run_load(driver, LoadConfig(rate=200, duration=0.5, warmup=0.3, sessions=1))
    assert driver.calls == 160
    assert report.requests == 100 == report.ok
    assert report.errors == {}
    assert report.latency_ms["max"] < 50
    assert sum(s.count for s in report.series) == 100


async def test_closed_loop_warm_up_then_count():
    driver = ScriptedDriver(service=0.002)
    with anyio.fail_after(10):
        report = await run_load(driver, LoadConfig(concurrency=2, count=50, warmup=0.1))
    assert report.requests == 50
    assert driver.calls > 50  # the warm-up ran too


async def test_mix_proportions_are_honoured():
    driver = ScriptedDriver()
    mix = (("purchase", 8.0), ("refund", 1.0), ("balance", 1.0))
    config = LoadConfig(concurrency=4, count=4000, mix=mix, seed=7)
    with anyio.fail_after(20):
        await run_load(driver, config)
    kinds = driver.kinds
    assert len(kinds) == 4000
    assert abs(kinds.count("purchase") / 4000 - 0.8) < 0.03
    assert abs(kinds.count("refund") / 4000 - 0.1) < 0.02
    assert abs(kinds.count("balance") / 4000 - 0.1) < 0.02


def test_kind_picker_is_repeatable_with_a_seed():
    mix = (("a", 1.0), ("b", 2.0), ("c", 0.0))
    a, b, other = KindPicker(mix, 42), KindPicker(mix, 42), KindPicker(mix, 43)
    seq = [a.pick() for _ in range(200)]
    assert seq == [b.pick() for _ in range(200)]
    assert seq != [other.pick() for _ in range(200)]
    assert "c" not in seq and set(seq) == {"a", "b"}  # a zero weight is never drawn


async def test_result_codes_and_transport_errors_are_counted_by_kind():
    driver = ScriptedDriver(codes={3: "51", 4: "51", 5: "A0"}, raise_every=10)
    with anyio.fail_after(10):
        report = await run_load(driver, LoadConfig(concurrency=1, count=40))
    assert report.requests == 40
    assert report.errors == {"51": 2, "A0": 1, "exc:ConnectionResetError": 4}
    assert report.ok == 40 - 7
    # every broken session was closed, and replaced when more requests were due (not after the last)
    assert driver.connects == 1 + 3
    assert driver.closes == 4  # each exactly once


async def test_a_hanging_request_times_out_and_its_session_is_replaced():
    driver = ScriptedDriver(stall_at=2, stall_for=30)
    with anyio.fail_after(10):
        report = await run_load(driver, LoadConfig(concurrency=1, count=5, request_timeout=0.2))
    assert report.errors == {"timeout": 1}
    assert report.requests == 5
    assert driver.connects == 2


async def test_a_hanging_request_times_out_at_its_deadline_while_the_other_sessions_go_on():
    """One watcher keeps every session's deadline: the hanging request is cancelled about
    request_timeout after it was sent (not later, not earlier), the others complete meanwhile."""
    cancelled_after: list[float] = []

    class TimedSession(ScriptedSession):
        async def request(self, kind: str) -> str:
            start = anyio.current_time()
            try:
                return await super().request(kind)
            except anyio.get_cancelled_exc_class():
                cancelled_after.append(anyio.current_time() - start)
                raise

    class TimedDriver(ScriptedDriver):
        async def connect(self) -> ScriptedSession:
            self.connects += 1
            return TimedSession(self)

    driver = TimedDriver(service=0.002, stall_at=3, stall_for=30)
    with anyio.fail_after(10):
        report = await run_load(driver, LoadConfig(concurrency=4, count=300, request_timeout=0.3))
    assert report.errors == {"timeout": 1}
    assert report.requests == 300 and report.ok == 299
    assert len(cancelled_after) == 1 and 0.29 <= cancelled_after[0] < 1.0  # not the 30 s stall; slack for a loaded CI


async def test_requests_that_answer_in_time_are_never_cancelled():
    """Each request's deadline is its own: many requests in a row, each well within the timeout but
    together far longer than it, all succeed."""
    driver = ScriptedDriver(service=0.01)
    with anyio.fail_after(20):  # 100 requests in a row per session: ≥ 1 s, twice the timeout
        report = await run_load(driver, LoadConfig(concurrency=2, count=200, request_timeout=0.5))
    assert report.errors == {} and report.ok == 200
    assert report.elapsed_s > 0.5  # together longer than one request's timeout


async def test_an_unreachable_target_is_a_load_error():
    class Refusing:
        async def connect(self) -> ScriptedSession:
            raise ConnectionRefusedError("nobody home")

    with anyio.fail_after(10), pytest.raises(LoadError, match="could not connect"):
        await run_load(Refusing(), LoadConfig(concurrency=2, count=5))


async def test_progress_reports_every_measured_second():
    ticks: list[Tick] = []
    driver = ScriptedDriver(service=0.001)
    with anyio.fail_after(10):
        report = await run_load(driver, LoadConfig(rate=300, duration=1.2, warmup=1.1, sessions=4),
                                progress=ticks.append)
    measured = [t for t in ticks if t.second is not None]
    assert [t.second for t in measured] == [0, 1]
    assert sum(t.stats.count for t in measured if t.stats) == report.requests == 360
    assert any(t.second is None for t in ticks)  # a warm-up line
    out = io.StringIO()
    printer = ProgressPrinter(out)
    for t in ticks:
        printer(t)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[warm-up]")
    assert "rate" in lines[1] and "p99" in lines[1] and "errors" in lines[1]


def test_config_rejects_contradictions():
    with pytest.raises(LoadError, match="exactly one of rate"):
        LoadConfig(rate=10, concurrency=2, duration=1)
    with pytest.raises(LoadError, match="exactly one of duration"):
        LoadConfig(rate=10)
    with pytest.raises(LoadError, match="rate"):
        LoadConfig(rate=0, duration=1)
    with pytest.raises(LoadError, match="mix"):
        LoadConfig(rate=10, duration=1, mix=(("a", 0.0),))
