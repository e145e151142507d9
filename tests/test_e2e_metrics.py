"""A running gateway's admin endpoint over HTTP: counters move as traffic flows; readiness follows the
host link."""

from __future__ import annotations

import re
from pathlib import Path

import anyio
import anyio.abc
import pytest

from gateway.lab import CARD_CUP, LOOPBACK, lab_config, open_lab
from gateway.security.algorithms import generate_key
from gateway.serve import run_gateway

pytestmark = pytest.mark.anyio


async def http_get(port: int, path: str) -> tuple[int, str]:
    async with await anyio.connect_tcp(LOOPBACK, port) as s:
        await s.send(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        with anyio.fail_after(5):
            try:
                while True:
                    data += await s.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in the Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def whole_milliseconds(seconds: float) -> bool:
    return abs(seconds * 1000 - round(seconds * 1000)) < 1e-6


async def test_counters_move_with_traffic_and_readiness_follows_the_host(tmp_path: Path) -> None:
    async with open_lab(tmp_path) as lab:
        port = lab.gateway.admin_port
        assert port is not None
        status, ready = await http_get(port, "/readyz")
        assert status == 200 and '"ready": true' in ready
        _, before = await http_get(port, "/metrics")
        t = lab.terminal()
        await t.connect()
        await t.sign_in()
        for _ in range(3):
            assert (await t.purchase(1_000, CARD_CUP)).approved
        assert (await t.purchase(1_000, CARD_CUP, pin="000000")).rc == "55"
        with anyio.fail_after(5):
            while True:
                _, after = await http_get(port, "/metrics")
                if sample(after, "gateway_messages_total", direction="terminal_out", mti="0210", rc="00") >= 3:
                    break
                await anyio.sleep(0.05)
        out_ok = "gateway_messages_total"
        assert sample(after, out_ok, direction="terminal_out", mti="0210", rc="00") - sample(
            before, out_ok, direction="terminal_out", mti="0210", rc="00") == 3
        assert sample(after, out_ok, direction="terminal_out", mti="0210", rc="55") == 1
        assert sample(after, out_ok, direction="host_out", mti="0200") >= 4
        e2e = "gateway_end_to_end_latency_seconds_count"
        assert sample(after, e2e, flow="purchase", outcome="approved") == 3
        assert sample(after, e2e, flow="purchase", outcome="declined") == 1  # the wrong PIN's 55
        assert sample(after, e2e, flow="sign_in", outcome="approved") == 1
        assert sample(after, "gateway_upstream_latency_seconds_count") >= 4
        # every stage of the money path measured, with a clock that resolves less than a millisecond
        for stage, at_least in (("decode", 5), ("security", 8), ("journal", 4), ("host", 4),
                                ("terminal_write", 5)):
            assert sample(after, "gateway_stage_seconds_count", stage=stage) >= at_least, stage
        decode_sum = sample(after, "gateway_stage_seconds_sum", stage="decode")
        assert 0 < decode_sum < 0.5 and not whole_milliseconds(decode_sum)
        # uvloop's loop clock would have made this a sum of whole milliseconds
        assert not whole_milliseconds(sample(after, "gateway_end_to_end_latency_seconds_sum", flow="purchase",
                                             outcome="approved"))
        assert sample(after, "gateway_stage_seconds_bucket", stage="decode", le="0.001") >= 1
        assert sample(after, "gateway_signed_in_terminals") == 1
        assert sample(after, "gateway_build_info") == 1
        assert sample(after, "gateway_saf_parked") == 0
        assert sample(after, "gateway_journal_ready") == 1
        assert sample(after, "gateway_journal_commit_batch_size_count") >= 1
        assert sample(after, "gateway_host_link_state") == 3
        assert sample(after, "gateway_terminal_connections") == 1
        assert "6222021234567890123" not in after  # no PAN in any label

        status, _ = await http_get(port, "/healthz")
        assert status == 200


async def test_readyz_names_the_host_link_while_the_host_is_down(tmp_path: Path) -> None:
    probe = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    dead_port = probe.extra(anyio.abc.SocketAttribute.local_port)
    await probe.aclose()  # nothing listens there any more
    config = lab_config(tmp_path, dead_port, {"10000001": generate_key(16)}, generate_key(16))
    async with anyio.create_task_group() as tg:
        gw = await tg.start(lambda task_status: run_gateway(config, task_status=task_status))
        status, ready = await http_get(gw.admin_port, "/readyz")
        assert status == 503 and "host_link" in ready and '"journal": true' in ready
        status, _ = await http_get(gw.admin_port, "/healthz")
        assert status == 200  # alive, just not ready
        tg.cancel_scope.cancel()
