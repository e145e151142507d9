"""The worker group's merged scrape (gateway.workers): real expositions of two `Metrics` registries,
parsed and merged as the supervisor does, and rendered by prometheus-client's own encoder."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.config import load_config
from gateway.metrics import Metrics
from gateway.workers import merge_scrapes, parse_scrape, refuse_workers, worker_instance_id


def exposition(approved: int, in_flight: int) -> str:
    metrics = Metrics(process_metrics=False)
    for _ in range(approved):
        metrics.message("terminal_out", "0210", "00").inc()
        metrics.end_to_end("purchase", "00").observe(0.004)
    metrics.in_flight.set(in_flight)
    return generate_latest(metrics.registry).decode()


def render(families: list) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    class Fixed(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            return families

    registry = CollectorRegistry()
    registry.register(Fixed())
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


APPROVED = ("gateway_messages_total", (("direction", "terminal_out"), ("mti", "0210"), ("rc", "00")))
LATENCY_COUNT = ("gateway_end_to_end_latency_seconds_count", (("flow", "purchase"), ("outcome", "approved")))


def test_counters_and_histograms_are_summed_and_gauges_labelled_per_worker() -> None:
    a, b = parse_scrape(exposition(3, 1)), parse_scrape(exposition(5, 2))
    merged = render(merge_scrapes({}, [a, b], [(0, a), (1, b)]))
    assert merged[APPROVED] == 8
    assert merged[LATENCY_COUNT] == 8
    le = [v for (name, labels), v in merged.items() if name == "gateway_end_to_end_latency_seconds_bucket"
          and dict(labels)["le"] == "0.005"]
    assert le == [8]
    assert merged[("gateway_in_flight_transactions", (("worker", "0"),))] == 1
    assert merged[("gateway_in_flight_transactions", (("worker", "1"),))] == 2
    assert ("gateway_in_flight_transactions", ()) not in merged
    assert not any(name.endswith("_created") for name, _ in merged)


def test_a_dead_workers_counts_are_carried_and_its_gauges_dropped() -> None:
    a, b = parse_scrape(exposition(3, 1)), parse_scrape(exposition(5, 2))
    retired = dict(b.additive)  # worker 1 died after this scrape; its replacement counted 1 so far
    fresh = parse_scrape(exposition(1, 0))
    merged = render(merge_scrapes(retired, [a, fresh], [(0, a), (1, fresh)]))
    assert merged[APPROVED] == 3 + 5 + 1  # never below the sum before the restart
    assert merged[("gateway_in_flight_transactions", (("worker", "1"),))] == 0
    # a worker whose scrape failed: its last counts still count, its gauges are left out
    merged = render(merge_scrapes(retired, [a, fresh], [(0, a)]))
    assert merged[APPROVED] == 9
    assert ("gateway_in_flight_transactions", (("worker", "1"),)) not in merged


def test_sqlite_refuses_several_workers_and_names_the_setting() -> None:
    sqlite = load_config(None, environ={})
    assert refuse_workers(sqlite, 1) is None
    refusal = refuse_workers(sqlite, 2)
    assert refusal is not None and '[store] url = "postgresql://..."' in refusal
    assert refuse_workers(load_config(None, environ={"GATEWAY_STORE__URL": "postgresql://h/db"}), 4) is None
    assert "expected 1..64" in (refuse_workers(sqlite, 0) or "")


def test_worker_instance_ids_are_per_slot_and_fit() -> None:
    assert worker_instance_id("gw-a", 3) == "gw-a-w3"
    assert len(worker_instance_id("x" * 64, 12)) == 64
