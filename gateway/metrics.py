"""Prometheus metrics for the gateway, on a registry of its own.

Cost is the design constraint (see shared/reference/limits.md): a pre-bound prometheus-client child
costs ~0.6 µs per `inc()`, going through `.labels(...)` every time ~2 µs. So:

- unlabelled metrics are plain attributes (`metrics.in_flight.inc()`);
- labelled metrics are reached through small methods (`metrics.message(direction, mti, rc)`) that return
  a child bound once and cached in a dict keyed by the raw arguments: per message a dict lookup + inc;
- the calls every transaction makes (message counters, latency and stage histograms) use the lock-free
  children of `gateway.fastmetrics` (~0.13 µs per observe instead of 0.6–1 µs), everything rarer uses
  prometheus-client's own types;
- durations come from `time.perf_counter()` (`clock`), never the event loop's clock: uvloop's counts
  whole milliseconds (bench/clock_resolution.py), which left sums in whole ms and sub-ms buckets empty;
- state that a scrape can read (signed-in terminals, SAF age) is a function gauge: free per transaction.

Label values are bounded: never a PAN, STAN or terminal id; MTIs and response codes come from closed
sets, anything else is counted as "other" (and is not cached under its raw value, so garbage from the
wire cannot grow the cache). `NullMetrics` has the same API with no-op children, for running with
metrics off (and for measuring what metrics cost).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from gateway import __version__
from gateway.fastmetrics import FastCounter, FastGauge, FastHistogram
from gateway.store.records import APPROVAL_RCS

#: the clock of every duration measured on the money path (monotonic, sub-µs resolution)
clock: Final = time.perf_counter

PREFIX: Final = "gateway"

#: where a message was seen: from/to a terminal, to/from the upstream host
DIRECTIONS: Final = frozenset({"terminal_in", "terminal_out", "host_in", "host_out"})

#: MTIs of both dialects (CUP POS and ISO 8583:1987); anything else is labelled "other"
KNOWN_MTIS: Final = frozenset(
    {
        "0100", "0110", "0120", "0121", "0130",
        "0200", "0210", "0220", "0221", "0230",
        "0320", "0330",
        "0400", "0401", "0410", "0420", "0421", "0430",
        "0500", "0510", "0520", "0521", "0530",
        "0620", "0630",
        "0800", "0810", "0820", "0830",
    }
)  # fmt: skip

#: response codes (field 39) of the CUP table and ISO 8583:1987; "none" when a message carries none
KNOWN_RESPONSE_CODES: Final = frozenset(
    [f"{n:02d}" for n in range(100)] + ["A0", "A1", "A2", "A3", "A4", "A5", "A6", "A7", "C1"]
)

#: decode error kinds (`IsoError.kind` plus the shell's own); anything else is "other"
DECODE_ERROR_KINDS: Final = frozenset(
    {"framing", "codec", "subfield", "validation", "unknown_mti", "oversize"}
)

#: `SecurityError.kind` values; anything else is "other"
SECURITY_FAILURE_KINDS: Final = frozenset(
    {
        "security", "mac", "pin_format", "key_not_found", "key_usage", "key_format", "kcv_mismatch",
        "key_block", "track_data", "data_length", "key_store", "key_store_integrity", "lmk",
    }
)  # fmt: skip

#: TLS failures: where (`side`) and what (`kind`, gateway.net.tls.FAILURE_KINDS); anything else is "other"
TLS_SIDES: Final = frozenset({"terminal", "host"})
TLS_FAILURE_KINDS: Final = frozenset({"bad_certificate", "no_certificate", "protocol", "timeout", "closed", "other"})

OTHER: Final = "other"
NO_RESPONSE_CODE: Final = "none"

#: transaction and host round trips: 0.5 ms (loopback floor) up to 30 s (longest sensible host timeout)
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0,
)  # fmt: skip
#: a group commit is one fsync: tens of µs on a good SSD, up to seconds on a sick disk
COMMIT_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
#: transactions per group commit
BATCH_SIZE_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

#: one stage of the money path: decoding a frame is tens of µs, a journal write or host round trip ms
STAGE_BUCKETS: Final = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

#: the stages of `gateway_stage_seconds` (attributes of `Stages`)
STAGES: Final = ("decode", "security", "journal", "host", "terminal_write")

#: flows of both dialects (specs/flows.toml) as end-to-end labels; anything else is "other"
KNOWN_FLOWS: Final = frozenset(
    {
        "purchase", "void", "refund", "balance_inquiry", "reversal", "void_reversal", "sign_in", "sign_off",
        "echo", "settlement", "batch_upload", "batch_upload_end",
    }
)  # fmt: skip
#: a request whose flow was never identified (unsupported MTI or processing code)
UNKNOWN_FLOW: Final = "unknown"

#: outcome classes of an answer, by its field 39 (see `outcome_class`)
OUTCOME_APPROVED, OUTCOME_DECLINED, OUTCOME_REJECTED, OUTCOME_TIMEOUT, OUTCOME_FAILED = (
    "approved", "declined", "rejected", "timeout", "failed")
#: no answer was written: none decided (undecodable, bug) or the write failed (then an approval is reversed)
OUTCOME_UNDELIVERED: Final = "undelivered"
#: protocol, identity and security refusals: the request was not fit to decide on (whoever answered it)
REJECTED_CODES: Final = frozenset({"03", "30", "40", "77", "94", "97", "99", "A0", "A1", "A2", "A3", "A4",
                                   "A5", "A6", "A7"})
#: the system could not decide: host unreachable, system error
FAILED_CODES: Final = frozenset({"91", "96"})
TIMEOUT_CODE: Final = "98"


def outcome_class(rc: str | None) -> str:
    """approved (00), timeout (98), failed (91, 96), rejected (format, identity, MAC, duplicate: 03 30 40
    77 94 97 99 A0-A7), declined (every other code: the issuer's or the risk limits' business refusals),
    undelivered (no answer went out)."""
    if rc is None:
        return OUTCOME_UNDELIVERED
    if rc in APPROVAL_RCS:
        return OUTCOME_APPROVED
    if rc == TIMEOUT_CODE:
        return OUTCOME_TIMEOUT
    if rc in FAILED_CODES:
        return OUTCOME_FAILED
    if rc in REJECTED_CODES:
        return OUTCOME_REJECTED
    return OUTCOME_DECLINED


#: host link state values for `host_link_state`
LINK_DOWN, LINK_CONNECTING, LINK_UP, LINK_SIGNED_ON = 0, 1, 2, 3


class CounterLike(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class GaugeLike(Protocol):
    def inc(self, amount: float = 1) -> None: ...
    def dec(self, amount: float = 1) -> None: ...
    def set(self, value: float) -> None: ...
    def set_function(self, f: Callable[[], float]) -> None: ...


class HistogramLike(Protocol):
    def observe(self, amount: float) -> None: ...


# (attribute, type, metric name without prefix, help, buckets). One table drives both `Metrics` and
# `NullMetrics`, so the two cannot drift apart.
_UNLABELLED: Final[tuple[tuple[str, type, str, str, tuple[float, ...] | None], ...]] = (
    ("in_flight", FastGauge, "in_flight_transactions", "Terminal requests being processed now", None),
    ("terminal_connections", Gauge, "terminal_connections", "Open terminal connections", None),
    ("connections_accepted", Counter, "terminal_connections_accepted", "Terminal connections accepted", None),
    ("connections_refused", Counter, "terminal_connections_refused",
     "Terminal connections refused (connection limit reached)", None),
    ("host_link_state", Gauge, "host_link_state",
     "Upstream host link state: 0 down, 1 connecting, 2 up, 3 signed on", None),
    ("host_reconnects", Counter, "host_reconnects", "Upstream host link (re)connection attempts", None),
    ("timeouts", Counter, "transaction_timeouts",
     "Terminal transactions answered 98 because the host did not answer in time", None),
    ("host_timeouts", Counter, "host_timeouts",
     "Host requests of any kind (financial, sign-on, echo, reversal) that got no answer in time", None),
    ("late_answers", Counter, "late_host_answers", "Host answers that arrived after their request timed out",
     None),
    ("reversals_queued", Counter, "reversals_queued", "Reversals put in the store-and-forward queue", None),
    ("reversals_sent", Counter, "reversals_sent", "Reversal attempts sent to the host (0400 and 0401)", None),
    ("reversals_acknowledged", Counter, "reversals_acknowledged", "Reversals the host acknowledged", None),
    ("reversals_parked", Counter, "reversals_parked",
     "Reversals given up on and parked for an operator", None),
    ("saf_depth", Gauge, "saf_depth", "Reversals waiting in the store-and-forward queue", None),
    ("mac_failures", Counter, "mac_failures", "Messages whose MAC did not verify (terminal or host)", None),
    ("pin_failures", Counter, "pin_failures", "PIN blocks that could not be translated", None),
    ("trace_dropped", Counter, "trace_records_dropped",
     "Trace records dropped because the trace recorder fell behind or its writer died", None),
    ("upstream", FastHistogram, "upstream_latency_seconds",
     "A financial request's wait for the host: handed to the host link to answer in (link queue included)",
     LATENCY_BUCKETS),
    ("journal_commit", FastHistogram, "journal_commit_seconds", "Journal group commit duration",
     COMMIT_BUCKETS),
    ("journal_batch_size", FastHistogram, "journal_commit_batch_size", "Journal writes per group commit",
     BATCH_SIZE_BUCKETS),
    # --- availability under abuse (slow clients, answer storms, TLS) ---
    ("connections_shed", Counter, "terminal_connections_shed",
     "Terminal connections closed at max_connections to make room for a new one (idle or trickling longest)",
     None),
    ("frame_timeouts", Counter, "terminal_frame_timeouts",
     "Terminal connections closed because a frame did not arrive whole within frame_timeout", None),
    ("late_answers_dropped", Counter, "late_host_answers_dropped",
     "Late or unmatched host answers dropped unjournalled because the backlog to the journal was full", None),
    ("admin_connections_shed", Counter, "admin_connections_shed",
     "Admin connections closed at the connection cap to make room (slow to send their request, or lingering)",
     None),
    ("saf_parked", Gauge, "saf_parked", "Reversals parked for an operator (retry or drop them)", None),
    ("saf_oldest_age", Gauge, "saf_oldest_pending_age_seconds",
     "Age of the oldest reversal still waiting to be acknowledged (0: none waiting)", None),
    ("signed_in_terminals", Gauge, "signed_in_terminals", "Terminals signed in now (sessions in memory)", None),
    ("journal_ready", Gauge, "journal_ready",
     "1 while the journal takes writes (its commit thread runs and the last write succeeded), else 0", None),
    # journal faults (gateway/journal_retry.py) and refusals on record
    ("journal_retry_backlog", Gauge, "journal_retry_backlog",
     "Journal writes kept in memory because the journal failed, waiting for a retry", None),
    ("journal_retry_dropped", Counter, "journal_retry_dropped",
     "Late host answers dropped because the journal retry queue was full", None),
    ("refusals_unrecorded", Counter, "refusals_unrecorded",
     "Refusals the gateway decided that could not be journalled", None),
)  # fmt: skip


def _normalise(value: str, known: frozenset[str]) -> str:
    return value if value in known else OTHER


class Stages:
    """The money path's stage histograms, children bound once: `metrics.stages.journal.observe(s)`.

    decode: a terminal frame to a `Message`; security: one security-module call (MAC verify, PIN/track
    translation, answer MAC); journal: the durable write before a request goes upstream; host: a request
    handed to the host socket until its answer is read; terminal_write: one write of answers to a terminal."""

    __slots__ = STAGES

    decode: HistogramLike
    security: HistogramLike
    journal: HistogramLike
    host: HistogramLike
    terminal_write: HistogramLike

    def __init__(self, child: Callable[[str], HistogramLike]) -> None:
        for stage in STAGES:
            setattr(self, stage, child(stage))


class SafWatch:
    """What the SAF watcher last read from the journal (`gateway.net.saf_watch`): the parked count and
    when the oldest pending reversal was queued. The age is computed at scrape time, so it keeps
    growing between two reads of the journal."""

    __slots__ = ("_oldest", "_parked")

    def __init__(self, parked: GaugeLike, oldest_age: GaugeLike) -> None:
        self._parked = parked
        self._oldest: float | None = None
        oldest_age.set_function(self.oldest_age)

    def update(self, *, parked: int, oldest_pending_queued_at: float | None) -> None:
        self._parked.set(parked)
        self._oldest = oldest_pending_queued_at

    def oldest_age(self) -> float:
        oldest = self._oldest
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)


class JournalObserver:
    """What the journal reports after each group commit and SAF change (the store calls these)."""

    __slots__ = ("_batch", "_commit", "_depth")

    def __init__(self, commit_seconds: HistogramLike, batch_size: HistogramLike, depth: GaugeLike) -> None:
        self._commit = commit_seconds
        self._batch = batch_size
        self._depth = depth

    def commit(self, batch_size: int, seconds: float) -> None:
        self._commit.observe(seconds)
        self._batch.observe(batch_size)

    def saf_depth(self, n: int) -> None:
        self._depth.set(n)


class Metrics:
    """Every gateway metric, registered on `self.registry` (serve it with `gateway.net.admin`)."""

    enabled: bool = True

    in_flight: GaugeLike
    terminal_connections: GaugeLike
    connections_accepted: CounterLike
    connections_refused: CounterLike
    host_link_state: GaugeLike
    host_reconnects: CounterLike
    timeouts: CounterLike
    host_timeouts: CounterLike
    late_answers: CounterLike
    reversals_queued: CounterLike
    reversals_sent: CounterLike
    reversals_acknowledged: CounterLike
    reversals_parked: CounterLike
    saf_depth: GaugeLike
    mac_failures: CounterLike
    pin_failures: CounterLike
    trace_dropped: CounterLike
    upstream: HistogramLike
    journal_commit: HistogramLike
    journal_batch_size: HistogramLike
    connections_shed: CounterLike
    frame_timeouts: CounterLike
    late_answers_dropped: CounterLike
    admin_connections_shed: CounterLike
    saf_parked: GaugeLike
    saf_oldest_age: GaugeLike
    signed_in_terminals: GaugeLike
    journal_ready: GaugeLike
    journal_retry_backlog: GaugeLike
    journal_retry_dropped: CounterLike
    refusals_unrecorded: CounterLike
    journal: JournalObserver
    stages: Stages
    saf: SafWatch

    def __init__(self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True) -> None:
        """`process_metrics` adds the standard process_*/python_* collectors (read only at scrape time)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        for attr, kind, name, doc, buckets in _UNLABELLED:
            full = f"{PREFIX}_{name}"
            if buckets is not None:
                metric: object = FastHistogram(full, doc, buckets, registry=r).labels()
            elif kind is FastGauge:
                metric = FastGauge(full, doc, registry=r).labels()
            else:
                metric = kind(full, doc, registry=r)
            setattr(self, attr, metric)
        self._messages = FastCounter(
            f"{PREFIX}_messages", "ISO 8583 messages by direction, MTI and response code",
            ["direction", "mti", "rc"], registry=r,
        )
        self._end_to_end = FastHistogram(
            f"{PREFIX}_end_to_end_latency_seconds",
            "Terminal request in to answer out, by flow and outcome class (approved, declined, rejected, "
            "timeout, failed, undelivered)", LATENCY_BUCKETS, labelnames=["flow", "outcome"], registry=r,
        )
        stage_family = FastHistogram(
            f"{PREFIX}_stage_seconds", "Duration of one stage of the money path", STAGE_BUCKETS,
            labelnames=["stage"], registry=r,
        )
        self.stages = Stages(stage_family.labels)
        self._end_to_end_children: dict[tuple[str, str | None], HistogramLike] = {}
        self.saf = SafWatch(self.saf_parked, self.saf_oldest_age)
        build = Gauge(f"{PREFIX}_build_info", "Version of the running gateway (always 1)",
                      ["version", "python", "codec"], registry=r)
        build.labels(__version__, platform.python_version(), _codec_name()).set(1)
        self._decode_errors = Counter(
            f"{PREFIX}_decode_errors", "Frames or messages that could not be decoded or failed validation",
            ["kind"], registry=r,
        )
        self._security_failures = Counter(
            f"{PREFIX}_security_failures", "Security module refusals by kind", ["kind"], registry=r,
        )
        self._tls_failures = Counter(
            f"{PREFIX}_tls_failures", "TLS handshakes or sessions that failed, by side and kind", ["side", "kind"],
            registry=r,
        )
        self._message_children: dict[tuple[str, str, str], CounterLike] = {}
        self._decode_children: dict[str, CounterLike] = {}
        self._security_children: dict[str, CounterLike] = {}
        self.journal = JournalObserver(self.journal_commit, self.journal_batch_size, self.saf_depth)
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

    # --- labelled metrics: bound once, then a dict lookup --------------------------------------------

    def end_to_end(self, flow: str | None, rc: str | None) -> HistogramLike:
        """Histogram child for one (flow, answer code): `flow` None for an unidentified request, `rc`
        None when no answer went out. Labelled by flow and outcome class, never by the raw code."""
        key = (flow or UNKNOWN_FLOW, rc)
        child = self._end_to_end_children.get(key)
        if child is None:
            label_flow = UNKNOWN_FLOW if flow is None else _normalise(flow, KNOWN_FLOWS)
            child = self._end_to_end.labels(label_flow, outcome_class(rc))
            if label_flow == key[0] and (rc is None or rc in KNOWN_RESPONSE_CODES):
                self._end_to_end_children[key] = child  # bounded: cache under the raw key
        return child

    def message(self, direction: str, mti: str, rc: str) -> CounterLike:
        """Counter child for one (direction, MTI, response code); `rc=""` for a message without field 39."""
        child = self._message_children.get((direction, mti, rc))
        if child is None:
            child = self._bind_message(direction, mti, rc)
        return child

    def _bind_message(self, direction: str, mti: str, rc: str) -> CounterLike:
        if direction not in DIRECTIONS:
            # a programming error, not bad input: fail loudly in tests
            raise ValueError(f"unknown message direction {direction!r}; expected one of {sorted(DIRECTIONS)}")
        label_mti = _normalise(mti, KNOWN_MTIS)
        label_rc = NO_RESPONSE_CODE if rc == "" else _normalise(rc, KNOWN_RESPONSE_CODES)
        bounded = (direction, label_mti, label_rc)
        child = self._message_children.get(bounded)
        if child is None:
            child = self._messages.labels(direction, label_mti, label_rc)
            self._message_children[bounded] = child
        if label_mti == mti and (label_rc == rc or rc == ""):
            self._message_children[(direction, mti, rc)] = child  # raw key is bounded too: cache it
        return child

    def decode_error(self, kind: str) -> CounterLike:
        """Counter child for one decode error kind (`IsoError.kind`, "unknown_mti", "oversize")."""
        child = self._decode_children.get(kind)
        if child is None:
            child = self._bind(self._decode_errors, self._decode_children, kind, DECODE_ERROR_KINDS)
        return child

    def security_failure(self, kind: str) -> CounterLike:
        """Counter child for one security refusal kind (`SecurityError.kind`)."""
        child = self._security_children.get(kind)
        if child is None:
            child = self._bind(self._security_failures, self._security_children, kind, SECURITY_FAILURE_KINDS)
        return child

    def tls_failure(self, side: str, kind: str) -> CounterLike:
        """Counter child for one TLS failure: `side` "terminal" or "host", `kind` a TLS_FAILURE_KINDS value.
        Rare (a failed handshake), so it is not cached."""
        return self._tls_failures.labels(_normalise(side, TLS_SIDES), _normalise(kind, TLS_FAILURE_KINDS))

    @staticmethod
    def _bind(
        metric: Counter, cache: dict[str, CounterLike], kind: str, known: frozenset[str]
    ) -> CounterLike:
        label = _normalise(kind, known)
        child = cache.get(label)
        if child is None:
            child = metric.labels(label)
            cache[label] = child
        if label == kind:
            cache[kind] = child
        return child


class _NoOp:
    """Stands in for every counter, gauge and histogram child when metrics are off."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def set_function(self, f: Callable[[], float]) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


NOOP: Final = _NoOp()


class NullMetrics(Metrics):
    """Same API as `Metrics`, nothing recorded: every metric is the shared no-op child.

    Its registry is empty, so an admin endpoint still serves /metrics (with nothing in it)."""

    enabled = False

    def __init__(self, registry: CollectorRegistry | None = None, *, process_metrics: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        for attr, *_ in _UNLABELLED:
            setattr(self, attr, NOOP)
        self._message_children = {}
        self._decode_children = {}
        self._security_children = {}
        self._end_to_end_children = {}
        self.journal = JournalObserver(NOOP, NOOP, NOOP)
        self.stages = Stages(lambda _stage: NOOP)
        self.saf = SafWatch(NOOP, NOOP)

    def message(self, direction: str, mti: str, rc: str) -> CounterLike:
        return NOOP

    def end_to_end(self, flow: str | None, rc: str | None) -> HistogramLike:
        return NOOP

    def decode_error(self, kind: str) -> CounterLike:
        return NOOP

    def security_failure(self, kind: str) -> CounterLike:
        return NOOP

    def tls_failure(self, side: str, kind: str) -> CounterLike:
        return NOOP


def _codec_name() -> str:
    from gateway.iso.codec import codec_implementation  # late: metrics must not pull in the codec first

    return codec_implementation()


def metrics_for(enabled: bool) -> Metrics:
    """`Metrics()` when enabled, else `NullMetrics()` (config `admin.metrics`)."""
    return Metrics() if enabled else NullMetrics()


def metric_names(metrics: Metrics) -> Iterable[str]:
    """Names of the metric families registered (for tests and docs)."""
    return [m.name for m in metrics.registry.collect()]

