"""Metrics: pre-bound children, bounded labels, Prometheus naming, NullMetrics parity."""

from __future__ import annotations

import inspect

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import (
    KNOWN_MTIS,
    LATENCY_BUCKETS,
    Metrics,
    NullMetrics,
    metric_names,
    metrics_for,
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
        else:
            api[name] = {m for m in ("inc", "dec", "set", "observe", "commit", "saf_depth")
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
    text = generate_latest(m.registry).decode()
    assert "gateway_end_to_end_latency_seconds_bucket" in text
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
    m.end_to_end.observe(0.0004)
    m.upstream.observe(25.0)
    assert sample(m, "gateway_end_to_end_latency_seconds_bucket", le="0.0005") == 1
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
    null.end_to_end.observe(0.1)
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
