"""TLS on the terminal port and on the host link, with client certificates (mTLS), over real loopback
sockets with certificates the test makes: the right ones get through end to end; a certificate from
another CA, a missing client certificate and plain TCP on a TLS port are refused, each with a log line
and a `gateway_tls_failures_total` count. Plain TCP stays the default."""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from ports import free_port
from tls_support import Authority, Pem

from gateway.config import (
    ConfigError,
    Endpoint,
    HostConfig,
    TerminalSideConfig,
    TlsClientConfig,
    TlsServerConfig,
    parse_config,
)
from gateway.lab import CARD_CUP, LOOPBACK, Lab, open_lab
from gateway.metrics import Metrics
from gateway.net import terminal_server
from gateway.net.host_link import HostLink
from gateway.net.tls import client_context, server_context
from gateway.security.module import SoftwareSecurityModule
from gateway.sim.host import HostSimulator
from gateway.sim.terminal import TerminalConnectionError, TerminalError

pytestmark = pytest.mark.anyio


class Pki:
    def __init__(self, directory: Path) -> None:
        self.ca = Authority(directory, "acquirer")
        self.rogue = Authority(directory, "rogue")  # a CA nobody configured
        self.gateway = self.ca.issue("gateway", server=True)
        self.host = self.ca.issue("host", server=True)
        self.terminal = self.ca.issue("10000001", server=False)
        self.gateway_client = self.ca.issue("gateway-client", server=False)
        self.rogue_terminal = self.rogue.issue("10000001", server=False)
        self.rogue_host = self.rogue.issue("host", server=True)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def tls_failures(metrics: Metrics, side: str, kind: str) -> float:
    return metrics.registry.get_sample_value("gateway_tls_failures_total", {"side": side, "kind": kind}) or 0.0


def terminal_tls(pki: Pki, client: Pem | None, ca: Path | None = None) -> dict[str, object]:
    cfg = TlsClientConfig(ca=ca or pki.ca.ca, cert=client.cert if client else None, key=client.key if client else None)
    return {"ssl_context": client_context(cfg)}


# --- the terminal port ---------------------------------------------------------------------------------


def tls_terminal_side(pki: Pki, client_certs: str = "required", frame_timeout: float = 5.0) -> TerminalSideConfig:
    return TerminalSideConfig(listen=Endpoint(LOOPBACK, 0), idle_timeout=60.0, write_timeout=2.0,
                              frame_timeout=frame_timeout,
                              tls=TlsServerConfig(cert=pki.gateway.cert, key=pki.gateway.key, ca=pki.ca.ca,
                                                  client_certs=client_certs))


async def test_a_terminal_with_a_certificate_of_the_acquirer_ca_buys_over_mtls(tmp_path: Path, pki: Pki) -> None:
    async with open_lab(tmp_path, terminal_side=tls_terminal_side(pki)) as lab:
        t = lab.terminal(**terminal_tls(pki, pki.terminal))
        await t.connect()
        await t.sign_in()
        assert (await t.purchase(1_000, CARD_CUP)).approved
        assert lab.gateway.metrics.registry.get_sample_value("gateway_tls_failures_total") is None


async def refused(lab: Lab, **options: object) -> None:
    t = lab.terminal(**options)
    with pytest.raises(TerminalError):  # refused at the connect, or at the first exchange (TLS 1.3)
        await t.connect()
        await t.sign_in()
    await t.aclose()


async def test_wrong_ca_missing_client_certificate_and_plain_tcp_are_refused(
        tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.terminal")
    async with open_lab(tmp_path, terminal_side=tls_terminal_side(pki)) as lab:
        metrics = lab.gateway.metrics
        await refused(lab, **terminal_tls(pki, pki.rogue_terminal))  # a client certificate of another CA
        await refused(lab, **terminal_tls(pki, None))  # no client certificate
        await refused(lab)  # plain TCP on the TLS port
        await refused(lab, **terminal_tls(pki, pki.terminal, ca=pki.rogue.ca))  # the terminal distrusts us
        with anyio.fail_after(5):
            while sum(1 for r in caplog.records if "refusing terminal" in r.getMessage()) < 4:
                await anyio.sleep(0.05)
        assert tls_failures(metrics, "terminal", "bad_certificate") == 1
        assert tls_failures(metrics, "terminal", "no_certificate") == 1
        assert tls_failures(metrics, "terminal", "protocol") == 1  # plain TCP: a CUP frame is no ClientHello
        assert tls_failures(metrics, "terminal", "closed") == 1  # the terminal hung up: it distrusts our certificate
        lines = [r.getMessage() for r in caplog.records if "refusing terminal" in r.getMessage()]
        assert any("certificate verify failed" in line for line in lines), lines
        # and the port still serves a terminal that gets it right
        good = lab.terminal(**terminal_tls(pki, pki.terminal))
        await good.connect()
        await good.sign_in()
        assert (await good.purchase(1_000, CARD_CUP)).approved


async def test_optional_client_certificates(tmp_path: Path, pki: Pki) -> None:
    async with open_lab(tmp_path, terminal_side=tls_terminal_side(pki, "optional")) as lab:
        for entry, client in zip(lab.config.terminals, (None, pki.terminal), strict=False):  # without one, or
            t = lab.terminal(entry.terminal_id, **terminal_tls(pki, client))  # with a good one: both get in
            await t.connect()
            await t.sign_in()
            assert (await t.purchase(1_000, CARD_CUP)).approved
            await t.aclose()
        await refused(lab, **terminal_tls(pki, pki.rogue_terminal))  # a presented certificate is still checked


async def test_a_tls_handshake_that_never_completes_is_cut_at_the_frame_timeout(tmp_path: Path, pki: Pki) -> None:
    async with open_lab(tmp_path, terminal_side=tls_terminal_side(pki, frame_timeout=1.5)) as lab:
        async with await anyio.connect_tcp(LOOPBACK, lab.gateway.terminal_port) as s:
            started = anyio.current_time()
            with anyio.fail_after(10), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await s.receive()  # we never send a ClientHello
            assert 1.0 < anyio.current_time() - started < 5.0
        assert tls_failures(lab.gateway.metrics, "terminal", "timeout") == 1


async def test_a_connection_shed_in_the_instant_its_handshake_completes_is_closed(
        tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """At max_connections a connection still in its TLS handshake may be shed; when that happens just as
    the handshake completes (its cancellation not delivered yet) it must still be closed, not served with
    its slot counted as being freed (it was served, and the count of slots being freed stayed one too
    high for as long as it lived: one connection over max_connections each time)."""
    async with open_lab(tmp_path, terminal_side=tls_terminal_side(pki)) as lab:
        server = lab.gateway.server
        assert server is not None
        real_handshake = terminal_server.handshake

        async def handshake_then_shed(*args: Any, **kwargs: Any) -> Any:
            tls = await real_handshake(*args, **kwargs)
            assert server._make_room("a newcomer")  # the cap is reached in this very instant
            return tls

        monkeypatch.setattr(terminal_server, "handshake", handshake_then_shed)
        await refused(lab, **terminal_tls(pki, pki.terminal))
        with anyio.fail_after(5):
            while server.active:
                await anyio.sleep(0.01)
        assert server._shedding == 0
        monkeypatch.setattr(terminal_server, "handshake", real_handshake)
        good = lab.terminal(**terminal_tls(pki, pki.terminal))
        await good.connect()
        await good.sign_in()
        assert (await good.purchase(1_000, CARD_CUP)).approved


# --- the host link --------------------------------------------------------------------------------------


def host_ssl(pki: Pki, server: Pem, client_certs: str = "required") -> object:
    return server_context(TlsServerConfig(cert=server.cert, key=server.key, ca=pki.ca.ca, client_certs=client_certs),
                          "test")


async def test_the_host_link_speaks_mtls_to_the_host(tmp_path: Path, pki: Pki) -> None:
    tls = TlsClientConfig(ca=pki.ca.ca, cert=pki.gateway_client.cert, key=pki.gateway_client.key)
    async with open_lab(tmp_path, host_options={"tls": tls}, host_ssl_context=host_ssl(pki, pki.host)) as lab:  # type: ignore[arg-type]
        assert lab.gateway.link.ready
        t = lab.terminal()
        await t.connect()
        await t.sign_in()
        assert (await t.purchase(1_000, CARD_CUP)).approved
        assert lab.host.stats.key_exchanges >= 2 and lab.host.stats.tls_failures == 0


@asynccontextmanager
async def link_to(host: HostSimulator, ssl_context: object, tls: TlsClientConfig) -> AsyncIterator[HostLink]:
    async with anyio.create_task_group() as tg:
        port = await tg.start(functools.partial(host.serve, LOOPBACK, 0, ssl_context=ssl_context))  # type: ignore[arg-type]
        config = HostConfig(address=Endpoint(LOOPBACK, port), key_exchange=False, timeout=1.0, reconnect_min=0.1,
                            reconnect_max=0.5, tls=tls)
        link = HostLink(config, SoftwareSecurityModule(), Metrics(process_metrics=False))
        await tg.start(link.run)
        yield link
        tg.cancel_scope.cancel()


async def test_a_host_certificate_of_another_ca_is_refused(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.host")
    host = HostSimulator()
    async with link_to(host, host_ssl(pki, pki.rogue_host, "none"), TlsClientConfig(ca=pki.ca.ca)) as link:
        await anyio.sleep(1.5)
        assert not link.ready and host.stats.sign_ons == 0
        assert tls_failures(link.metrics, "host", "bad_certificate") >= 2  # every attempt, with back-off
    lines = [r.getMessage() for r in caplog.records if "retry in" in r.getMessage()]
    assert lines and all("certificate verify failed" in line for line in lines), lines


async def test_a_host_tls_handshake_that_never_completes_is_counted(pki: Pki,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A host that accepts the connection but never answers the ClientHello: each attempt ends at
    connect_timeout with a line saying so and a count, like every other TLS refusal (it was logged as
    the host being unreachable, and not counted)."""
    caplog.set_level(logging.WARNING, logger="gateway.host")

    async def silent(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, silent)
        config = HostConfig(address=Endpoint(LOOPBACK, listener.extra(anyio.abc.SocketAttribute.local_port)),
                            key_exchange=False, connect_timeout=0.3, reconnect_min=0.1, reconnect_max=0.2,
                            tls=TlsClientConfig(ca=pki.ca.ca))
        link = HostLink(config, SoftwareSecurityModule(), Metrics(process_metrics=False))
        await tg.start(link.run)
        with anyio.fail_after(10):
            while link.reconnects < 2:
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert tls_failures(link.metrics, "host", "timeout") >= 2
    lines = [r.getMessage() for r in caplog.records if "retry in" in r.getMessage()]
    assert lines and all("TLS handshake" in line for line in lines), lines


async def test_a_host_that_requires_a_client_certificate_refuses_a_link_without_one(
        pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.host")
    host = HostSimulator()
    async with link_to(host, host_ssl(pki, pki.host), TlsClientConfig(ca=pki.ca.ca)) as link:
        await anyio.sleep(1.5)
        assert not link.ready and host.stats.sign_ons == 0 and host.stats.tls_failures >= 1
        counted = sum(tls_failures(link.metrics, "host", kind) for kind in ("no_certificate", "bad_certificate",
                                                                            "closed", "other"))
        assert counted >= 1
    lines = [r.getMessage() for r in caplog.records if "retry in" in r.getMessage()]
    assert lines and all("TLS" in line for line in lines), lines


# --- configuration ----------------------------------------------------------------------------------------


def test_tls_tables_in_the_toml(tmp_path: Path) -> None:
    doc = {
        "terminal_side": {"tls": {"cert": "g.pem", "key": "g.key", "ca": "ca.pem", "client_certs": "required",
                                  "min_version": "1.3"}},
        "host": {"tls": {"ca": "ca.pem", "cert": "c.pem", "key": "c.key", "server_name": "host.example"}},
    }
    config = parse_config(doc)
    assert config.terminal_side.tls == TlsServerConfig(Path("g.pem"), Path("g.key"), Path("ca.pem"), "required", "1.3")
    assert config.host.tls == TlsClientConfig(Path("ca.pem"), Path("c.pem"), Path("c.key"), "host.example", "1.2")
    assert parse_config({}).terminal_side.tls is None and parse_config({}).host.tls is None  # plain TCP default
    bad = [
        ({"terminal_side": {"tls": {"cert": "g.pem", "key": "g.key", "client_certs": "required"}}},
         "terminal_side.tls: ca is required to check client certificates"),
        ({"terminal_side": {"tls": {"key": "g.key"}}}, "terminal_side.tls.cert: Field required"),
        ({"terminal_side": {"tls": {"cert": "g", "key": "k", "min_version": "1.1"}}},
         "terminal_side.tls.min_version: Input should be '1.2' or '1.3'"),
        ({"terminal_side": {"tls": {"cert": "g", "key": "k", "client_certs": "maybe"}}},
         "terminal_side.tls.client_certs: Input should be 'none', 'optional' or 'required'"),
        ({"host": {"tls": {"cert": "c.pem"}}}, "host.tls: a client certificate needs both cert and key"),
        ({"host": {"tls": {"verify": False}}}, "host.tls.verify: unknown key"),
        ({"host": {"tls": "yes"}}, "host.tls: Input should be a dictionary"),
    ]
    for doc_, message in bad:
        with pytest.raises(ConfigError) as info:
            parse_config(doc_)
        assert str(info.value).startswith(message), str(info.value)
    # unset reads back as unset (`gateway config show` writes "")
    assert parse_config({"terminal_side": {"tls": ""}, "host": {"tls": ""}}).host.tls is None


def test_unreadable_tls_files_stop_the_start_with_the_key(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"terminal_side\.tls: no such file"):
        server_context(TlsServerConfig(cert=tmp_path / "missing.pem", key=pki.gateway.key))
    with pytest.raises(ConfigError, match=r"terminal_side\.tls\.cert/key: cannot load"):
        server_context(TlsServerConfig(cert=pki.gateway.cert, key=pki.host.key))  # key of another certificate
    with pytest.raises(ConfigError, match=r"host\.tls\.ca: no such file"):
        client_context(TlsClientConfig(ca=tmp_path / "nope.pem"))


async def test_plain_tcp_terminals_are_untouched(tmp_path: Path) -> None:
    async with open_lab(tmp_path) as lab:
        with pytest.raises(TerminalConnectionError):  # a TLS terminal cannot talk to the plain port
            t = lab.terminal(ssl_context=client_context(TlsClientConfig()))
            await t.connect()
            await t.sign_in()
        plain = lab.terminal()
        await plain.connect()
        await plain.sign_in()
        assert (await plain.purchase(1_000, CARD_CUP)).approved


# --- the same from the command line: `gateway serve`, `sim-host` and `sim-terminal` as real processes ------


def test_tls_both_ways_from_the_toml_with_the_command_line_simulators(tmp_path: Path, pki: Pki) -> None:
    zmk = tmk = "0123456789ABCDEFFEDCBA9876543210"
    terminal_port, host_port = free_port(), free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[terminal_side]
listen = "127.0.0.1:{terminal_port}"
[terminal_side.tls]
cert = "{pki.gateway.cert}"
key = "{pki.gateway.key}"
ca = "{pki.ca.ca}"
client_certs = "required"
min_version = "1.3"
[host]
address = "127.0.0.1:{host_port}"
[host.tls]
ca = "{pki.ca.ca}"
cert = "{pki.gateway_client.cert}"
key = "{pki.gateway_client.key}"
[security]
zmk = "{zmk}"
[store]
path = "{tmp_path / 'journal.db'}"
pan_hash_key_hex = "{'11' * 32}"
[admin]
listen = ""
[[terminals]]
terminal_id = "10000001"
merchant_id = "123456789012345"
tmk = "{tmk}"
""")
    host = spawn("sim-host", "--listen", f"127.0.0.1:{host_port}", "--zmk", zmk, "--tls-cert", str(pki.host.cert),
                 "--tls-key", str(pki.host.key), "--tls-ca", str(pki.ca.ca), "--tls-client-certs", "required",
                 cwd=tmp_path)
    gateway = None
    try:
        wait_for_port(host_port)
        gateway = spawn("serve", "--config", str(config), cwd=tmp_path)
        wait_for_port(terminal_port)
        terminal = ["sim-terminal", "--target", f"127.0.0.1:{terminal_port}", "--terminal-id", "10000001",
                    "--tmk", tmk, "--tls-ca", str(pki.ca.ca), "--count", "1"]
        deadline = time.monotonic() + 20
        while True:  # the gateway's host link may still be signing on: it answers 91 until then
            done = run_cli(*terminal, "--tls-cert", str(pki.terminal.cert), "--tls-key", str(pki.terminal.key),
                           cwd=tmp_path)
            if done.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert done.returncode == 0 and " rc 00 " in done.stdout, done.stdout + done.stderr
        without_certificate = run_cli(*terminal, cwd=tmp_path)
        assert without_certificate.returncode != 0
    finally:
        for proc in (gateway, host):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
        logs = [stop(proc) for proc in (gateway, host) if proc is not None]
    gateway_log = logs[0]
    assert "TLS established (TLSv1.3, client certificate CN=10000001)" in gateway_log
    assert "refusing terminal" in gateway_log and "no_certificate" in gateway_log
    assert "host link signed on" in gateway_log


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}


def spawn(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, env=_env(), text=True,
                          capture_output=True, timeout=60, check=False)


def stop(proc: subprocess.Popen[str]) -> str:
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def wait_for_port(port: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} after {seconds}s")
