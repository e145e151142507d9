"""A real Prometheus server scrapes the admin endpoint (loopback only) and sees our counters.

Needs the `prometheus` binary (Debian: `apt-get install --no-install-recommends prometheus`); skipped
when it is absent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import anyio
import anyio.from_thread
import pytest
from ports import free_port

from gateway.metrics import Metrics
from gateway.net.admin import serve_admin

PROMETHEUS = shutil.which("prometheus")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)"),
]


def query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=2) as resp:
        payload = json.load(resp)
    assert payload["status"] == "success", payload
    return payload["data"]["result"]


def wait_for_value(port: int, promql: str, expected: float, deadline: float) -> float | None:
    last = None
    while time.monotonic() < deadline:
        try:
            result = query(port, promql)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            result = []  # Prometheus still starting
        if result:
            last = float(result[0]["value"][1])
            if last == expected:
                return last
        time.sleep(0.25)
    return last


def test_prometheus_scrapes_our_counters(tmp_path: Path):
    metrics = Metrics()
    metrics.reversals_parked.inc(3)
    metrics.message("terminal_in", "0200", "").inc(5)
    metrics.stages.decode.observe(0.00004)  # a lock-free histogram child (gateway.fastmetrics)
    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        admin_task, admin_port = portal.start_task(serve_admin, "127.0.0.1", 0, metrics, {})
        prom_port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: gateway\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{admin_port}']\n"
        )
        log = (tmp_path / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            assert wait_for_value(prom_port, 'up{job="gateway"}', 1.0, deadline) == 1.0
            assert wait_for_value(prom_port, "gateway_reversals_parked_total", 3.0, deadline) == 3.0
            # a counter that moves after the first scrape is seen moving
            metrics.reversals_parked.inc()
            assert wait_for_value(prom_port, "gateway_reversals_parked_total", 4.0, deadline) == 4.0
            series = 'gateway_messages_total{direction="terminal_in",mti="0200",rc="none"}'
            assert wait_for_value(prom_port, series, 5.0, deadline) == 5.0
            bucket = 'gateway_stage_seconds_bucket{stage="decode",le="5e-05"}'
            assert wait_for_value(prom_port, bucket, 1.0, deadline) == 1.0
            assert wait_for_value(prom_port, "gateway_build_info", 1.0, deadline) == 1.0
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            log.close()
            admin_task.cancel()

