"""Metrics: pre-bound children, bounded labels, Prometheus naming, NullMetrics parity, the lock-free
histograms against prometheus-client's own, stages, outcome classes, SAF watch, build info."""

from __future__ import annotations

import inspect
import platform
import time

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from gateway.fastmetrics import FastCounter, FastGauge, FastHistogram
from gateway.metrics import (
    KNOWN_MTIS,
    LATENCY_BUCKETS,
    STAGE_BUCKETS,
    STAGES,
    Metrics,
    NullMetrics,
    metric_names,
    metrics_for,
    outcome_class,
)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The value of one sample as a scraper would see it (parsed from the text exposition)."""
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def public_api(obj: object) -> dict[str, set[str]]:
    """Public attribute name → {'method(signature)'} or the metric methods the attribute's value has."""
    api: dict[str, set[str]] = {}
    for name in dir(obj):
        if name.startswith("_"):
            continue
        value = getattr(obj, name)
        if inspect.ismethod(value):
            api[name] = {"method" + str(inspect.signature(value))}
        elif name in ("registry", "enabled"):
            api[name] = {"data"}
        elif name == "stages":
            api[name] = {f"{stage}.observe" for stage in STAGES if callable(getattr(value, stage).observe)}
        else:
            api[name] = {m for m in ("inc", "dec", "set", "observe", "commit", "saf_depth", "update")
                         if callable(getattr(value, m, None))}
    return api


def test_message_children_are_bound_once_and_cached():
    m = Metrics(process_metrics=False)
    first = m.message("terminal_in", "0200", "")
    assert m.message("terminal_in", "0200", "") is first
    assert m.message("terminal_out", "0210", "00") is not first
    first.inc()
    first.inc()
    assert sample(m, "gateway_messages_total", direction="terminal_in", mti="0200", rc="none") == 2


def test_unknown_mti_and_rc_are_labelled_other_and_do_not_grow_the_cache():
    m = Metrics(process_metrics=False)
    for i in range(200):
        m.message("host_in", f"9{i:03d}", f"Z{i % 10}").inc()
    assert sample(m, "gateway_messages_total", direction="host_in", mti="other", rc="other") == 200
    # one bounded entry, not 200 raw keys from the wire
    assert len(m._message_children) == 1
    m.message("host_in", "0210", "XX").inc()
    assert sample(m, "gateway_messages_total", direction="host_in", mti="0210", rc="other") == 1


def test_message_labels_never_exceed_the_closed_sets():
    m = Metrics(process_metrics=False)
    for mti in [*KNOWN_MTIS, "6200123456789012", "ABCD", ""]:
        m.message("terminal_out", mti, "00").inc()
    text = generate_latest(m.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    mtis = {s.labels["mti"] for s in families["gateway_messages"].samples if "mti" in s.labels}
    assert mtis <= KNOWN_MTIS | {"other"}
    assert "6200123456789012" not in text


def test_unknown_direction_is_a_programming_error():
    m = Metrics(process_metrics=False)
    with pytest.raises(ValueError, match="direction"):
        m.message("sideways", "0200", "00")


def test_decode_and_security_kinds_are_bounded():
    m = Metrics(process_metrics=False)
    assert m.decode_error("codec") is m.decode_error("codec")
    m.decode_error("codec").inc()
    m.decode_error("iso").inc()  # the IsoError base kind is not in the closed set
    m.decode_error("something new").inc()
    m.security_failure("mac").inc()
    m.security_failure("made-up").inc()
    assert sample(m, "gateway_decode_errors_total", kind="codec") == 1
    assert sample(m, "gateway_decode_errors_total", kind="other") == 2
    assert sample(m, "gateway_security_failures_total", kind="mac") == 1
    assert sample(m, "gateway_security_failures_total", kind="other") == 1


def test_names_follow_prometheus_conventions():
    m = Metrics(process_metrics=False)
    names = set(metric_names(m))
    assert all(name.startswith("gateway_") for name in names)
    m.end_to_end("purchase", "00").observe(0.003)
    m.stages.decode.observe(0.00004)
    text = generate_latest(m.registry).decode()
    assert "gateway_end_to_end_latency_seconds_bucket" in text
    assert "gateway_stage_seconds_bucket" in text
    assert "gateway_reversals_parked_total" in text
    for family in text_string_to_metric_families(text):
        if family.type == "counter" and family.samples:
            assert any(s.name.endswith("_total") for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_size")), family.name


def test_latency_buckets_resolve_half_a_millisecond_to_thirty_seconds():
    assert LATENCY_BUCKETS[0] == 0.0005
    assert LATENCY_BUCKETS[-1] == 30.0
    m = Metrics(process_metrics=False)
    m.end_to_end("purchase", "00").observe(0.0004)
    m.upstream.observe(25.0)
    assert sample(m, "gateway_end_to_end_latency_seconds_bucket", flow="purchase", outcome="approved",
                  le="0.0005") == 1
    assert sample(m, "gateway_upstream_latency_seconds_bucket", le="20.0") == 0
    assert sample(m, "gateway_upstream_latency_seconds_bucket", le="30.0") == 1


def test_gauges_and_counters_move():
    m = Metrics(process_metrics=False)
    m.in_flight.inc()
    m.in_flight.inc()
    m.in_flight.dec()
    m.host_link_state.set(3)
    m.reversals_queued.inc()
    m.late_answers.inc()
    assert sample(m, "gateway_in_flight_transactions") == 1
    assert sample(m, "gateway_host_link_state") == 3
    assert sample(m, "gateway_reversals_queued_total") == 1
    assert sample(m, "gateway_late_host_answers_total") == 1


def test_journal_observer_feeds_commit_histograms_and_saf_depth():
    m = Metrics(process_metrics=False)
    m.journal.commit(batch_size=12, seconds=0.003)
    m.journal.commit(batch_size=1, seconds=0.0001)
    m.journal.saf_depth(7)
    assert sample(m, "gateway_journal_commit_seconds_count") == 2
    assert sample(m, "gateway_journal_commit_batch_size_sum") == 13
    assert sample(m, "gateway_journal_commit_batch_size_bucket", le="16.0") == 2
    assert sample(m, "gateway_saf_depth") == 7


def test_process_collectors_are_optional():
    with_process = set(metric_names(Metrics()))
    without = set(metric_names(Metrics(process_metrics=False)))
    assert "process_cpu_seconds" in with_process
    assert "process_cpu_seconds" not in without


def test_null_metrics_has_the_same_api_and_records_nothing():
    real, null = Metrics(process_metrics=False), NullMetrics()
    real_api, null_api = public_api(real), public_api(null)
    assert real_api.keys() == null_api.keys()
    for name, used in real_api.items():
        assert used and used <= null_api[name], name  # the no-op child offers every call the real one does
    assert isinstance(null, Metrics)
    assert not null.enabled and real.enabled
    # every call a transaction makes works and leaves nothing behind
    null.message("terminal_in", "0200", "").inc()
    null.message("nonsense", "x", "y").inc()
    null.decode_error("codec").inc()
    null.security_failure("mac").inc()
    null.in_flight.inc()
    null.in_flight.dec()
    null.end_to_end("purchase", "00").observe(0.1)
    null.stages.host.observe(0.1)
    null.saf.update(parked=3, oldest_pending_queued_at=time.time())
    null.signed_in_terminals.set_function(lambda: 5)
    null.host_link_state.set(2)
    null.journal.commit(3, 0.01)
    null.journal.saf_depth(4)
    assert generate_latest(null.registry) == b""


def test_metrics_for_picks_the_implementation():
    assert type(metrics_for(True)) is Metrics
    assert type(metrics_for(False)) is NullMetrics


def test_two_instances_do_not_collide():
    # each Metrics owns its registry: tests and several gateways in one process must not clash
    a, b = Metrics(process_metrics=False), Metrics(process_metrics=False)
    a.timeouts.inc()
    assert sample(a, "gateway_transaction_timeouts_total") == 1
    assert sample(b, "gateway_transaction_timeouts_total") == 0


# --- the lock-free histograms and counters ------------------------------------------------------------


def families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def test_fast_histogram_exposes_exactly_what_prometheus_client_does():
    """Differential: the same observations (on, between and beyond the bounds) through our child and
    through prometheus-client's Histogram give the same text exposition samples."""
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = FastHistogram("x_seconds", "doc", STAGE_BUCKETS, labelnames=["stage"], registry=ours_registry)
    theirs = Histogram("x_seconds", "doc", ["stage"], buckets=STAGE_BUCKETS, registry=theirs_registry)
    values = [0.0, 0.00001, 0.000011, 0.0004, 0.0005, 0.003, 1.0, 29.9, 30.0, 31.0, 1e6, *STAGE_BUCKETS]
    for i, v in enumerate(values):
        stage = "decode" if i % 2 else "host"
        ours.labels(stage).observe(v)
        theirs.labels(stage).observe(v)

    def without_created(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
        # prometheus-client adds a _created series (its own family in the text format): not ours to copy
        return {name: sorted((s for s in samples if not s[0].endswith("_created")), key=repr)
                for name, samples in families(text).items() if not name.endswith("_created")}

    assert without_created(generate_latest(ours_registry).decode()) == \
        without_created(generate_latest(theirs_registry).decode())


def test_fast_counter_exposes_a_total_in_both_formats():
    registry = CollectorRegistry()
    counter = FastCounter("y", "doc", ["direction"], registry=registry)
    child = counter.labels("in")
    assert counter.labels("in") is child
    child.inc()
    child.inc(2)
    assert families(generate_latest(registry).decode())["y"] == [("y_total", {"direction": "in"}, 3.0)]
    om = {f.name: f for f in parse_openmetrics(generate_openmetrics(registry).decode())}
    assert [(s.name, s.value) for s in om["y"].samples] == [("y_total", 3.0)]


def test_fast_gauge_moves_and_reads_a_function_at_scrape_time():
    registry = CollectorRegistry()
    gauge = FastGauge("q", "doc", registry=registry).labels()
    gauge.inc()
    gauge.inc(2)
    gauge.dec()
    assert families(generate_latest(registry).decode())["q"] == [("q", {}, 2.0)]
    gauge.set(7)
    assert families(generate_latest(registry).decode())["q"] == [("q", {}, 7.0)]
    level = [3]
    gauge.set_function(lambda: level[0])
    level[0] = 4
    assert families(generate_latest(registry).decode())["q"] == [("q", {}, 4.0)]


def test_fast_families_refuse_a_duplicate_name_and_wrong_labels():
    registry = CollectorRegistry()
    FastHistogram("z_seconds", "doc", (1.0, 2.0), registry=registry)
    with pytest.raises(ValueError):
        FastHistogram("z_seconds", "doc", (1.0,), registry=registry)
    with pytest.raises(ValueError):
        FastHistogram("w_seconds", "doc", (2.0, 1.0))
    with pytest.raises(ValueError):
        FastCounter("v", "doc", ["a"]).labels("one", "two")


# --- what the money path measures -----------------------------------------------------------------------


def test_stage_buckets_resolve_tens_of_microseconds():
    m = Metrics(process_metrics=False)
    m.stages.decode.observe(0.00003)  # a decode: 30 µs, invisible to a millisecond clock
    m.stages.journal.observe(0.004)
    assert sample(m, "gateway_stage_seconds_bucket", stage="decode", le="2.5e-05") == 0
    assert sample(m, "gateway_stage_seconds_bucket", stage="decode", le="5e-05") == 1
    assert sample(m, "gateway_stage_seconds_sum", stage="decode") == pytest.approx(0.00003)
    assert sample(m, "gateway_stage_seconds_count", stage="journal") == 1
    text = generate_latest(m.registry).decode()
    assert {s.labels["stage"] for f in text_string_to_metric_families(text) if f.name == "gateway_stage_seconds"
            for s in f.samples} == set(STAGES)


@pytest.mark.parametrize(("rc", "outcome"), [
    ("00", "approved"), ("51", "declined"), ("55", "declined"), ("61", "declined"), ("25", "declined"),
    ("77", "rejected"), ("A0", "rejected"), ("94", "rejected"), ("97", "rejected"), ("30", "rejected"),
    ("98", "timeout"), ("91", "failed"), ("96", "failed"), (None, "undelivered"),
])
def test_outcome_classes(rc, outcome):
    assert outcome_class(rc) == outcome


def test_end_to_end_is_labelled_by_flow_and_outcome_and_stays_bounded():
    m = Metrics(process_metrics=False)
    m.end_to_end("purchase", "00").observe(0.002)
    m.end_to_end("purchase", "51").observe(0.002)
    m.end_to_end("purchase", "55").observe(0.002)
    m.end_to_end(None, "40").observe(0.001)
    for i in range(100):
        m.end_to_end(f"flow{i}", f"Z{i}").observe(0.001)  # nonsense from a bug or the wire
    assert sample(m, "gateway_end_to_end_latency_seconds_count", flow="purchase", outcome="approved") == 1
    assert sample(m, "gateway_end_to_end_latency_seconds_count", flow="purchase", outcome="declined") == 2
    assert sample(m, "gateway_end_to_end_latency_seconds_count", flow="unknown", outcome="rejected") == 1
    assert sample(m, "gateway_end_to_end_latency_seconds_count", flow="other", outcome="declined") == 100
    assert len(m._end_to_end_children) == 4  # the 100 raw keys were not cached
    assert m.end_to_end("purchase", "00") is m.end_to_end("purchase", "00")


def test_saf_watch_age_grows_between_reads_and_parked_is_a_gauge():
    m = Metrics(process_metrics=False)
    assert sample(m, "gateway_saf_oldest_pending_age_seconds") == 0
    m.saf.update(parked=2, oldest_pending_queued_at=time.time() - 30)
    first = sample(m, "gateway_saf_oldest_pending_age_seconds")
    assert first is not None and 29 < first < 60
    time.sleep(0.05)
    assert sample(m, "gateway_saf_oldest_pending_age_seconds") > first
    assert sample(m, "gateway_saf_parked") == 2
    m.saf.update(parked=0, oldest_pending_queued_at=None)
    assert sample(m, "gateway_saf_oldest_pending_age_seconds") == 0


def test_signed_in_terminals_is_read_at_scrape_time():
    m = Metrics(process_metrics=False)
    sessions = {"10000001"}
    m.signed_in_terminals.set_function(lambda: len(sessions))
    assert sample(m, "gateway_signed_in_terminals") == 1
    sessions.add("10000002")
    assert sample(m, "gateway_signed_in_terminals") == 2


def test_build_info_names_version_python_and_codec():
    m = Metrics(process_metrics=False)
    text = generate_latest(m.registry).decode()
    [(_name, labels, value)] = families(text)["gateway_build_info"]
    assert value == 1
    assert labels["version"] == __version__
    assert labels["python"] == platform.python_version()
    assert labels["codec"]


def test_the_registry_renders_as_valid_openmetrics():
    m = Metrics()
    m.message("terminal_in", "0200", "").inc()
    m.end_to_end("purchase", "00").observe(0.002)
    m.stages.host.observe(0.0011)
    m.saf.update(parked=1, oldest_pending_queued_at=time.time() - 5)
    text = generate_openmetrics(m.registry).decode()
    assert text.endswith("# EOF\n")
    parsed = {f.name: f for f in parse_openmetrics(text)}  # raises on anything invalid
    assert parsed["gateway_messages"].type == "counter"
    assert parsed["gateway_stage_seconds"].type == "histogram"
    assert parsed["gateway_build_info"].samples[0].value == 1
