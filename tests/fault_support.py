"""Support for tests that drive a real `gateway serve` child process through faults that do not kill it:
a journal whose writes fail (RLIMIT_FSIZE set on the child from outside with prlimit(2), then lifted),
and signals (SIGTERM, twice). The child's output goes to a pipe, not a file, so that a file size limit
of 0 stops the journal without silencing the gateway's log, and the test can count what it logged.

Nothing here decides whether the gateway is right; it drives it and hands the facts to the test.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc

from gateway.config import load_config
from gateway.workers import fetch

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class ChildSetup:
    terminal_port: int
    admin_port: int
    host_port: int
    zmk: bytes
    tmks: Mapping[str, bytes]
    merchant_id: str
    journal: Path
    host_timeout: float
    write_timeout: float = 2.0


def write_child_config(path: Path, setup: ChildSetup) -> Path:
    """The TOML file of the child: lab keys, fixed ports, the admin endpoint on (for /readyz), a SAF that
    retries quickly and does not give up within a test."""
    terminals = "".join(
        f'\n[[terminals]]\nterminal_id = "{tid}"\nmerchant_id = "{setup.merchant_id}"\ntmk = "{key.hex().upper()}"\n'
        for tid, key in setup.tmks.items()
    )
    path.write_text(
        f"""\
[terminal_side]
listen = "{LOOPBACK}:{setup.terminal_port}"
idle_timeout = 60.0
write_timeout = {setup.write_timeout}

[host]
address = "{LOOPBACK}:{setup.host_port}"
timeout = {setup.host_timeout}
echo_interval = 30.0
reconnect_min = 0.05
reconnect_max = 0.5

[security]
zmk = "{setup.zmk.hex().upper()}"

[store]
path = "{setup.journal}"
synchronous = "FULL"
pan_hash_key_hex = "{'42' * 32}"

[reversal]
max_attempts = 50
backoff = [0.1, 0.2, 0.5]
poll_interval = 0.1
original_wait = {setup.host_timeout + 2.0}

[limits]
per_transaction = 1000000
per_day = 500000000

[admin]
listen = "{LOOPBACK}:{setup.admin_port}"
{terminals}""",
        encoding="utf-8",
    )
    load_config(path, environ={})  # fail here, with the key named, not in the child
    return path


def _child_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


class PipedGateway:
    """`python -m gateway.cli serve --config FILE` with its output on a pipe, read into `output` by a task
    of the caller's task group (`start`). Signals and limits go only to the pid this object started."""

    def __init__(self, config: Path, backend: str) -> None:
        self.command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--backend", backend]
        self.process: anyio.abc.Process | None = None
        self.output = bytearray()

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        self.process = await anyio.open_process(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=_child_environment(), cwd=REPO,
        )
        tg.start_soon(self._read_output, self.process)

    async def _read_output(self, process: anyio.abc.Process) -> None:
        assert process.stdout is not None
        async for chunk in process.stdout:
            self.output += chunk

    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def limit_file_size(self, limit: int) -> None:
        """prlimit(2) RLIMIT_FSIZE on the child: with 0 every write to a regular file fails (EFBIG;
        Python ignores SIGXFSZ), which is the journal's WAL and database, while its pipe still works."""
        _, hard = resource.prlimit(self.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (limit, hard))

    def lift_file_size_limit(self) -> None:
        _, hard = resource.prlimit(self.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (hard, hard))

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None and self.process.returncode is None, "not running"
        os.kill(self.process.pid, signum)

    async def wait(self, timeout: float) -> int:
        assert self.process is not None
        with anyio.fail_after(timeout):
            return await self.process.wait()

    async def stop_quietly(self) -> None:
        """Test clean-up: whatever happened, leave no child behind."""
        process, self.process = self.process, None
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                os.kill(process.pid, signal.SIGKILL)
            await process.wait()
            await process.aclose()

    def tail(self, chars: int = 4000) -> str:
        return self.text[-chars:]


async def http_get(port: int, path: str) -> tuple[int, str]:
    """A GET on the child's admin endpoint: (status, body). The supervisor's own client (an OSError when
    the answer is not HTTP)."""
    status, body = await fetch(port, path, timeout=5)
    return status, body.decode()


async def wait_until_up(gateway: PipedGateway, admin_port: int, timeout: float = 15.0) -> None:
    """Until the child's /readyz says ready (host link signed on, journal writable)."""
    with anyio.fail_after(timeout):
        while True:
            assert gateway.running(), f"gateway died at start:\n{gateway.tail()}"
            try:
                status, _ = await http_get(admin_port, "/readyz")
                if status == 200:
                    return
            except OSError:
                pass
            await anyio.sleep(0.05)
