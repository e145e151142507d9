"""`gateway load` for repeated runs and CI: pass/fail limits, a terminal state that makes reruns new
batches, and simulator balances that do not run dry."""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from gateway.iso.message import Message
from gateway.lab import LAB_ACCOUNTS, LOOPBACK, MERCHANT_ID, lab_config
from gateway.load import cli
from gateway.load.driver import LoadError
from gateway.load.thresholds import Thresholds, parse_ms, parse_rate
from gateway.security.algorithms import generate_key
from gateway.serve import run_gateway
from gateway.sim.cup_driver import DEFAULT_PAN, DEMO_TMK
from gateway.sim.host import HostSimConfig, HostSimulator
from gateway.sim.host_rules import HostRules, HostRulesConfig
from gateway.sim.terminal_state import BATCH_MAX, TerminalStateError, TerminalStateFile, default_state_path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gateway")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


# --- limits ---------------------------------------------------------------------------------------------


class FakeReport:
    def __init__(self, requests: int, errors: dict[str, int], p99: float | None) -> None:
        self.requests = requests
        self.errors = errors
        self.latency_ms = {"p99": p99}

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        return self.error_count / self.requests

    def errors_by_code(self) -> list[tuple[str, int]]:
        return sorted(self.errors.items(), key=lambda kv: -kv[1])


def test_limits_name_what_was_exceeded():
    report = FakeReport(1000, {"94": 30, "timeout": 5}, p99=84.25)
    assert Thresholds().failures(report) == []  # type: ignore[arg-type]
    assert Thresholds(max_error_rate=0.05, max_p99_ms=100).failures(report) == []  # type: ignore[arg-type]
    failures = Thresholds(max_error_rate=0.01, max_p99_ms=50).failures(report)  # type: ignore[arg-type]
    assert failures == [
        "error rate 3.50% (35 of 1000: 94=30, timeout=5) exceeds --max-error-rate 1.00%",
        "p99 84.250 ms exceeds --max-p99 50 ms",
    ]
    assert Thresholds(max_p99_ms=10).failures(FakeReport(5, {"96": 5}, None))[0].startswith(  # type: ignore[arg-type]
        "p99 unknown")


def test_limit_values_parse_as_fractions_or_percentages():
    assert parse_rate("0.01") == 0.01 and parse_rate("1%") == pytest.approx(0.01) and parse_rate("0") == 0
    for bad in ("x", "2", "-1%", "nan"):
        with pytest.raises(LoadError):
            parse_rate(bad)
    assert parse_ms("50") == 50.0
    for bad in ("0", "-3", "fast"):
        with pytest.raises(LoadError):
            parse_ms(bad)


# --- the terminal state file -----------------------------------------------------------------------------


def test_state_file_opens_a_new_batch_every_run(tmp_path: Path):
    state = TerminalStateFile(tmp_path / "deep" / "terminals.json")
    first = state.next_batch("127.0.0.1:5000 LT000001")
    assert 1 <= first <= BATCH_MAX  # random the first time
    assert state.next_batch("127.0.0.1:5000 LT000001") == first % BATCH_MAX + 1
    assert state.last_batch("127.0.0.1:5000 LT000001") == first % BATCH_MAX + 1
    assert state.last_batch("127.0.0.1:5000 LT010001") is None  # another worker's terminals: own line
    data = json.loads((tmp_path / "deep" / "terminals.json").read_text())
    assert data["version"] == 1 and set(data["batches"]) == {"127.0.0.1:5000 LT000001"}


def test_state_file_wraps_and_survives_concurrent_runs(tmp_path: Path):
    path = tmp_path / "terminals.json"
    path.write_text(json.dumps({"version": 1, "batches": {"k": {"batch": BATCH_MAX - 10}}}))
    state = TerminalStateFile(path)
    got: list[int] = []

    def runs() -> None:
        for _ in range(25):
            got.append(TerminalStateFile(path).next_batch("k"))  # its own lock file descriptor each time

    threads = [threading.Thread(target=runs) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    # 100 runs, 100 different batches, in sequence across the wrap from 999999 to 1
    assert len(set(got)) == 100
    assert sorted(got) == sorted([*range(BATCH_MAX - 9, BATCH_MAX + 1), *range(1, 91)])
    assert state.last_batch("k") == 90


def test_a_damaged_state_file_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "terminals.json"
    path.write_text("{not json")
    with pytest.raises(TerminalStateError, match="not JSON"):
        TerminalStateFile(path).next_batch("k")
    path.write_text("[]")
    with pytest.raises(TerminalStateError, match="batches"):
        TerminalStateFile(path).next_batch("k")


def test_default_state_path_follows_xdg(tmp_path: Path):
    assert default_state_path({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "gateway" / "terminals.json"
    assert default_state_path({}).parts[-4:] == (".local", "state", "gateway", "terminals.json")


# --- simulator balances -----------------------------------------------------------------------------------


def test_default_simulator_balances_outlast_a_long_load_run():
    """The load tool's default card and amount (1.00) against the simulator's default accounts: the
    10,001st purchase is still approved (the old 10,000.00 balance declined it with 51)."""
    rules = HostRules()
    for n in range(1, 10_002):
        msg = Message("0200", {"3": "000000", "4": "000000000100", "11": f"{n % 1_000_000:06d}",
                               "7": "1123101500", "32": "1234", "2": DEFAULT_PAN, "41": "LT000001"})
        decision = rules.financial(msg)
    assert decision.rc == "00"
    assert rules.balance(DEFAULT_PAN) > 10**10
    assert rules.balance("4111111111111111") > 10**10  # the Visa range too
    assert rules.balance(DEFAULT_PAN) < 10**12  # still fits field 54's 12 digits


# --- reruns against a real gateway ------------------------------------------------------------------------


@asynccontextmanager
async def gateway_for_load(tmp_path: Path) -> AsyncIterator[int]:
    """Host simulator and gateway in this process, with the cup driver's terminals LT000001..4
    registered under the demo TMK; yields the terminal port."""
    zmk = generate_key(16)
    host = HostSimulator(HostSimConfig(zmk=zmk, rules=HostRulesConfig(accounts=LAB_ACCOUNTS)))
    tmks = {f"LT{n:06d}": bytes.fromhex(DEMO_TMK) for n in range(1, 5)}
    async with anyio.create_task_group() as tg:
        host_port = await tg.start(host.serve, LOOPBACK, 0)
        config = lab_config(tmp_path, host_port, tmks, zmk, admin=False)
        gateway = await tg.start(lambda task_status: run_gateway(config, task_status=task_status))
        with anyio.fail_after(10):
            await gateway.link.wait_signed_on()
        yield gateway.terminal_port
        tg.cancel_scope.cancel()


def load_args(port: int, tmp_path: Path, *extra: str) -> argparse.Namespace:
    return parse(["load", "--target", f"127.0.0.1:{port}", "--driver", "cup", "--concurrency", "2",
                  "--count", "12", "-o", f"tmk={DEMO_TMK}", "-o", f"merchant_id={MERCHANT_ID}",
                  "--json", str(tmp_path / "report.json"), *extra])


async def run_cli(args: argparse.Namespace) -> tuple[int, dict]:
    """The CLI runs its own event loop: in a thread of its own. Returns its exit code and JSON report."""
    code = await anyio.to_thread.run_sync(args.func, args)
    return code, json.loads(Path(args.json).read_text())


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="asyncio")])
async def test_reruns_against_one_gateway_are_not_duplicates(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    state = tmp_path / "terminals.json"
    async with gateway_for_load(tmp_path) as port:
        for run in range(2):
            code, report = await run_cli(load_args(port, tmp_path, "--state", str(state), "--max-error-rate", "0"))
            assert (code, report["ok"], report["errors"]) == (0, 12, {}), (run, report["errors"])
            batches = json.loads(state.read_text())["batches"]
            assert list(batches) == [f"127.0.0.1:{port} LT000001"]
        second = TerminalStateFile(state).last_batch(f"127.0.0.1:{port} LT000001")
        assert second is not None
        capsys.readouterr()

        # the same batch again (what every rerun was before): the gateway refuses every request as a
        # duplicate, and --max-error-rate turns that into a failed run with a line saying why
        code, report = await run_cli(load_args(port, tmp_path, "-o", f"batch={second}", "--max-error-rate", "1%"))
        out = capsys.readouterr().out
        assert code == cli.EXIT_NOTHING_OK and report["errors"] == {"94": 12}, out
        assert "errors by code: 94=12 (100.00%)" in out and "FAILED: no request succeeded" in out, out

        # a run that succeeds but is slower than its p99 limit fails too, naming the limit
        code, report = await run_cli(load_args(port, tmp_path, "--state", str(state), "--max-p99", "0.001",
                                               "--max-error-rate", "0"))
        out = capsys.readouterr().out
        assert code == cli.EXIT_LIMIT_EXCEEDED and report["ok"] == 12, out
        assert f"FAILED: p99 {report['latency_ms']['p99']:.3f} ms exceeds --max-p99 0.001 ms" in out, out
        assert "exceeds --max-error-rate" not in out, out  # only the limit that was exceeded
        assert TerminalStateFile(state).last_batch(f"127.0.0.1:{port} LT000001") == second % 999_999 + 1


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="asyncio")])
async def test_without_a_state_file_each_run_draws_a_random_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    async with gateway_for_load(tmp_path) as port:
        for _ in range(2):
            code, report = await run_cli(load_args(port, tmp_path, "--state", "none"))
            assert (code, report["errors"]) == (0, {})
    assert not (tmp_path / "gateway").exists()
    assert "error rate" not in capsys.readouterr().out
