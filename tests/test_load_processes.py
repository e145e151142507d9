"""Several load processes against a real echo server, and the `gateway load` command."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from anyio.from_thread import start_blocking_portal

from gateway.load import cli
from gateway.load import driver as driver_module
from gateway.load.config import LoadConfig
from gateway.load.driver import LoadError, register_driver
from gateway.load.echo import echo_driver_factory, serve_echo
from gateway.load.processes import run_load_processes, split_config


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    """An echo server on its own event loop thread for the whole module."""
    with start_blocking_portal("asyncio", {"use_uvloop": True}) as portal:
        task, port = portal.start_task(serve_echo, "127.0.0.1", 0)
        yield port
        task.cancel()


def test_two_processes_split_the_schedule_and_merge_their_results(echo_port: int):
    config = LoadConfig(rate=1000, count=300, sessions=8, warmup=0.1)
    report = run_load_processes("echo", {"target": f"127.0.0.1:{echo_port}"}, config, 2)
    assert report.processes == 2
    assert report.requests == report.ok == 300  # 150 + 150
    assert report.histogram.get_total_count() == 300
    assert sum(s.count for s in report.series) == 300
    assert report.sessions == 8
    assert report.target_rate == 1000
    # the two interleaved schedules together keep the total rate
    assert 0.25 <= report.elapsed_s <= 0.6


def test_two_processes_closed_loop(echo_port: int):
    config = LoadConfig(concurrency=4, count=200)
    report = run_load_processes(echo_driver_factory, {"target": f"127.0.0.1:{echo_port}"}, config, 2)
    assert report.requests == report.ok == 200
    assert report.mode == "closed" and report.concurrency == 4


def test_a_failing_worker_is_reported_not_hung():
    with pytest.raises(LoadError, match="could not connect"):
        # port 1 on loopback: nothing listens, every worker fails to connect its sessions
        run_load_processes("echo", {"target": "127.0.0.1:1"}, LoadConfig(concurrency=2, count=10), 2)


def test_split_config_shares():
    shares = split_config(LoadConfig(rate=900, count=10, sessions=5, seed=1), 3)
    assert [s.rate for s in shares] == [300, 300, 300]
    assert [s.count for s in shares] == [4, 3, 3]
    assert [s.sessions for s in shares] == [2, 2, 1]
    assert [s.seed for s in shares] == [1, 2, 3]
    assert [round(s.phase * 900) for s in shares] == [0, 1, 2]  # interleaved by 1/total rate
    closed = split_config(LoadConfig(concurrency=5, duration=1), 2)
    assert [s.concurrency for s in closed] == [3, 2]
    with pytest.raises(LoadError, match="concurrency"):
        split_config(LoadConfig(concurrency=1, duration=1), 2)


def test_drivers_must_be_importable_by_workers():
    def local_factory(options):  # not importable from another process
        raise AssertionError("never called")

    with pytest.raises(LoadError, match="module-level"):
        run_load_processes(local_factory, {}, LoadConfig(concurrency=2, count=2), 2)
    with pytest.raises(LoadError, match="unknown driver"):
        run_load_processes("no-such-driver", {}, LoadConfig(concurrency=2, count=2), 2)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gateway")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_runs_and_writes_json_and_plot(echo_port: int, tmp_path: Path, capsys):
    json_path, png_path = tmp_path / "r.json", tmp_path / "r.png"
    args = parse(["load", "--target", f"127.0.0.1:{echo_port}", "--driver", "echo", "--rate", "500",
                  "--duration", "0.4", "--warmup", "0.1", "--sessions", "4", "--mix", "purchase=8,refund=2",
                  "--seed", "3", "-o", "size=100", "--json", str(json_path), "--plot", str(png_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "open loop, target 500/s: 200 requests" in out
    data = json.loads(json_path.read_text())
    assert data["requests"] == data["ok"] == 200
    assert data["mix"] == {"purchase": 8.0, "refund": 2.0}
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_bad_options_as_errors(capsys: pytest.CaptureFixture[str]):
    args = parse(["load", "--target", "127.0.0.1:1", "--concurrency", "1", "--count", "1", "--mix", "a=x"])
    assert args.func(args) == 1
    assert "mix weight" in capsys.readouterr().err
    args = parse(["load", "--target", "127.0.0.1:1", "--concurrency", "1", "--count", "1", "-o", "size"])
    assert args.func(args) == 1
    assert "KEY=VALUE" in capsys.readouterr().err


def test_registered_driver_names_reach_the_cli(echo_port: int, capsys, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(driver_module, "_REGISTRY", dict(driver_module._REGISTRY))  # undone after the test
    register_driver("echo-alias", "gateway.load.echo:echo_driver_factory")
    assert "echo-alias" in driver_module.driver_names()
    args = parse(["load", "--target", f"127.0.0.1:{echo_port}", "--driver", "echo-alias",
                  "--concurrency", "2", "--count", "20"])
    assert args.func(args) == 0
    assert "closed loop, concurrency 2: 20 requests" in capsys.readouterr().out


class TaggingSession:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    async def request(self, kind: str) -> str:
        await anyio.sleep(0)
        return self.tag

    async def aclose(self) -> None:
        pass


class TaggingDriver:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    async def connect(self) -> TaggingSession:
        return TaggingSession(self.tag)


def tagging_factory(options) -> TaggingDriver:
    """Answers with the worker's identity, so the test can see which process did what."""
    return TaggingDriver(f"w{options['worker_index']}/{options['worker_count']}")


def test_each_worker_process_gets_its_own_identity():
    config = LoadConfig(concurrency=2, count=20, ok_codes=frozenset({"w0/2"}))
    report = run_load_processes(tagging_factory, {}, config, 2)
    assert report.requests == 20
    assert report.ok == 10
    assert report.errors == {"w1/2": 10}
