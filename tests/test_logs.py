"""Logging: levels and formats (gateway/logs.py), the transaction context, the masked message trace, and
a real `gateway serve` child process whose every log line is parsed as JSON and scanned for the lab's
secrets (PANs, tracks, PIN blocks clear and encrypted, TMKs, the ZMK, working and zone keys)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from crash_support import (
    LOOPBACK,
    GatewayProcess,
    GatewaySetup,
    free_port,
    write_gateway_config,
)

from gateway import logs
from gateway.cli import build_parser
from gateway.iso.message import Message, mask_pan
from gateway.lab import CARD_CUP, CARD_LOW, CARD_VISA, LAB_ACCOUNTS, LAB_CARDS, MERCHANT_ID, terminal_ids
from gateway.security.algorithms import generate_key
from gateway.security.pin import encrypt_pin_block, make_pin_block
from gateway.sim.host import HostSimConfig, HostSimulator
from gateway.sim.host_rules import HostRulesConfig
from gateway.sim.terminal import TerminalSimulator, TxnResult

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_logging():
    """configure() changes the root logger: put it back after the test."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("gateway").level,
             logging.getLogger(logs.WIRE_LOGGER).level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("gateway").setLevel(saved[2])
    logging.getLogger(logs.WIRE_LOGGER).setLevel(saved[3])


# --- levels, formats, context ---------------------------------------------------------------------------


@pytest.mark.parametrize(("verbosity", "command", "level", "others"), [
    (0, "load", logging.WARNING, logging.WARNING),
    (1, "load", logging.INFO, logging.WARNING),
    (2, "load", logging.DEBUG, logging.DEBUG),
    (0, "serve", logging.INFO, logging.WARNING),  # a server says what it does without being asked
    (1, "serve", logging.DEBUG, logging.WARNING),
    (2, "serve", logging.DEBUG, logging.DEBUG),
    (5, "serve", logging.DEBUG, logging.DEBUG),
])
def test_verbosity_levels(verbosity, command, level, others):
    assert logs.levels_for(verbosity, command) == (level, others)


def test_v_and_log_format_are_accepted_before_and_after_the_sub_command():
    parser = build_parser()
    after = parser.parse_args(["serve", "--config", "x.toml", "-vv", "--log-format", "json"])
    assert (after.verbose, after.log_format) == (2, "json")
    before = parser.parse_args(["-v", "--log-format", "json", "serve"])
    assert (before.verbose, before.log_format) == (1, "json")  # not undone by the sub-command's defaults
    neither = parser.parse_args(["serve"])
    assert (neither.verbose, neither.log_format) == (0, None)


def test_environment_sets_level_and_format_and_flags_win(restore_logging):
    stream = io.StringIO()
    logs.configure(0, None, command="serve", stream=stream,
                   environ={"GATEWAY_LOG_LEVEL": "warning", "GATEWAY_LOG_FORMAT": "json"})
    logging.getLogger("gateway.flow").info("not shown at warning")
    logging.getLogger("gateway.flow").warning("shown")
    [line] = stream.getvalue().splitlines()
    assert json.loads(line)["message"] == "shown"
    stream = io.StringIO()
    logs.configure(1, "text", command="load", stream=stream, environ={"GATEWAY_LOG_LEVEL": "error",
                                                                       "GATEWAY_LOG_FORMAT": "json"})
    logging.getLogger("gateway.load").info("flag wins")
    assert "INFO gateway.load: flag wins" in stream.getvalue()
    with pytest.raises(logs.LogConfigError, match="GATEWAY_LOG_LEVEL"):
        logs.configure(0, None, environ={"GATEWAY_LOG_LEVEL": "loud"})
    with pytest.raises(logs.LogConfigError):
        logs.configure(0, None, environ={"GATEWAY_LOG_FORMAT": "xml"})


def test_configure_leaves_the_gateway_loggers_alone(restore_logging):
    """Only the root level and our handler change: a test or an embedding program that set a gateway
    logger's level keeps it."""
    flow = logging.getLogger("gateway.flow")
    flow.setLevel(logging.ERROR)
    try:
        stream = io.StringIO()
        logs.configure(2, "text", stream=stream)
        assert logging.getLogger("gateway").level == logging.NOTSET and flow.level == logging.ERROR
        flow.warning("held back by its own level")
        logging.getLogger("gateway.saf").debug("shown at -vv")
        assert "held back" not in stream.getvalue() and "shown at -vv" in stream.getvalue()
    finally:
        flow.setLevel(logging.NOTSET)


def test_configure_twice_keeps_one_handler(restore_logging):
    first, second = io.StringIO(), io.StringIO()
    logs.configure(1, "text", stream=first)
    logs.configure(1, "text", stream=second)
    logging.getLogger("gateway.x").warning("once")
    assert first.getvalue() == "" and second.getvalue().count("once") == 1


def test_json_lines_carry_the_transaction_context(restore_logging):
    stream = io.StringIO()
    logs.configure(1, "json", stream=stream)
    log = logging.getLogger("gateway.flow")
    log.warning("outside any request")
    ctx, token = logs.begin_transaction(Message("0200", {"41": "10000001", "11": "000123", "2": CARD_CUP.pan}))
    logs.note(flow="purchase")
    log.info("screened")
    logs.note(txn_id=42, rc="00", delivered=True)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("with a traceback")
    logs.end_transaction(token)
    log.info("after the request")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["outside any request", "screened", "with a traceback",
                                                    "after the request"]
    for line in lines:
        assert set(line) >= {"time", "level", "logger", "message"}
        assert line["time"].endswith("+00:00") and "T" in line["time"]
        assert line["logger"] == "gateway.flow"
    assert "terminal" not in lines[0] and "terminal" not in lines[3]
    assert (lines[1]["terminal"], lines[1]["stan"], lines[1]["mti"], lines[1]["flow"]) == (
        "10000001", "000123", "0200", "purchase")
    assert "txn_id" not in lines[1] and "rc" not in lines[1]
    assert lines[2]["txn_id"] == 42 and lines[2]["rc"] == "00" and lines[2]["level"] == "ERROR"
    assert "RuntimeError: boom" in lines[2]["exception"]
    assert ctx.delivered is True
    assert CARD_CUP.pan not in stream.getvalue()  # the context takes identifiers, never field 2


def test_text_lines_append_the_context(restore_logging):
    stream = io.StringIO()
    logs.configure(1, "text", stream=stream)
    _, token = logs.begin_transaction(Message("0200", {"41": "10000001", "11": "000007"}))
    logging.getLogger("gateway.flow").warning("host link down: terminal gets 91")
    logs.end_transaction(token)
    line = stream.getvalue().strip()
    assert line.endswith("WARNING gateway.flow: host link down: terminal gets 91 "
                         "[terminal=10000001 stan=000007 mti=0200]")


def test_a_worker_of_a_group_tags_every_line(restore_logging):
    stream = io.StringIO()
    logs.configure(0, "text", command="serve", stream=stream, environ={logs.WORKER_SLOT_ENV: "1/2"})
    logging.getLogger("gateway.flow").info("terminal signed in")
    logging.getLogger("asyncio").warning("slow callback")  # other libraries' lines too
    logs.configure(0, "json", command="serve", stream=stream, environ={logs.WORKER_SLOT_ENV: "1/2"})
    logging.getLogger("gateway.flow").info("terminal signed in")
    text1, text2, line = stream.getvalue().splitlines()
    assert text1.endswith("INFO worker 1 gateway.flow: terminal signed in")
    assert text2.endswith("WARNING worker 1 asyncio: slow callback")
    assert json.loads(line)["worker"] == "1"
    # a lone gateway (no slot, or a malformed one that `gateway.workers` refuses) has no tag
    for environ in ({}, {logs.WORKER_SLOT_ENV: "x/2"}):
        stream = io.StringIO()
        logs.configure(0, "text", command="serve", stream=stream, environ=environ)
        logging.getLogger("gateway.flow").info("up")
        assert stream.getvalue().strip().endswith("INFO gateway.flow: up")


def test_the_trace_masks_every_secret_field(restore_logging):
    stream = io.StringIO()
    logs.configure(2, "json", stream=stream)
    track = f"{CARD_CUP.pan}D30121010000000000"
    secrets = {"2": CARD_CUP.pan, "35": track, "52": "1A2B3C4D5E6F7081", "55": "9F2608AABBCCDDEEFF0011",
               "62": "0123456789ABCDEF0123456789ABCDEF", "48": f"{CARD_VISA.pan}000000001000", "96": "FEDCBA98"}
    logs.trace("terminal_in", Message("0200", {**secrets, "11": "000001", "41": "10000001", "4": "000000001000"}))
    logs.trace("terminal_in", Message("0200", {"11": "000002"}))
    text = stream.getvalue()
    first, second = (json.loads(line) for line in text.splitlines())
    assert first["logger"] == logs.WIRE_LOGGER and first["level"] == "DEBUG"
    assert first["direction"] == "terminal_in" and first["fields"]["t"] == "0200"
    assert first["fields"]["2"] == mask_pan(CARD_CUP.pan) and first["fields"]["11"] == "000001"
    for key in ("35", "52", "55", "62", "48", "96"):
        assert first["fields"][key] == f"<redacted {len(secrets[key])}>"
        assert secrets[key] not in text
    assert CARD_CUP.pan not in text and CARD_VISA.pan not in text
    assert mask_pan(CARD_CUP.pan) in first["message"]
    assert second["fields"] == {"t": "0200", "11": "000002"}


def test_the_trace_masks_the_pan_in_the_host_dialects_other_account_fields(restore_logging):
    # ISO 8583:1987 carries a card number in 34 (PAN, extended) and often in 102/103 (account
    # identification): a host answer echoing one was traced in clear
    stream = io.StringIO()
    logs.configure(2, "json", stream=stream)
    logs.trace("host_in", Message("0210", {"11": "000001", "34": CARD_CUP.pan, "102": CARD_VISA.pan,
                                           "103": CARD_CUP.pan, "39": "00"}))
    text = stream.getvalue()
    fields = json.loads(text)["fields"]
    assert fields["34"] == fields["103"] == mask_pan(CARD_CUP.pan) and fields["102"] == mask_pan(CARD_VISA.pan)
    assert CARD_CUP.pan not in text and CARD_VISA.pan not in text


def test_the_trace_is_on_at_debug_only(restore_logging):
    stream = io.StringIO()
    logs.configure(0, "text", command="serve", stream=stream)  # serve: INFO
    logs.trace("host_out", Message("0200", {"11": "000001"}))
    logging.getLogger("gateway.flow").info("info line")
    assert "host_out" not in stream.getvalue() and "info line" in stream.getvalue()
    stream = io.StringIO()
    logs.configure(1, "text", command="serve", stream=stream)  # serve -v: DEBUG, the trace with it
    logs.trace("host_out", Message("0200", {"11": "000001"}))
    logging.getLogger("asyncio").debug("a library's debug line")
    assert "DEBUG gateway.wire: host_out 0200 11=000001" in stream.getvalue()
    assert "library" not in stream.getvalue()  # other libraries stay at WARNING until -vv


def test_the_cli_reports_a_bad_environment_level():
    env = {"GATEWAY_LOG_LEVEL": "shouty", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "gateway.cli", "load", "--target", "127.0.0.1:9", "--rate", "1", "--count", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode == 2 and "GATEWAY_LOG_LEVEL" in result.stderr


# --- a real gateway process -----------------------------------------------------------------------------


async def run_lab_traffic(setup: GatewaySetup, host: HostSimulator) -> tuple[list[TxnResult], list[bytes]]:
    """Sign two terminals in and run approvals, declines, a refund and a balance inquiry against the
    child gateway. Returns the results and every clear working key the terminals installed."""
    results: list[TxnResult] = []
    keys: list[bytes] = []
    with anyio.fail_after(60):
        while not (host.has_zone_key("ZPK") and host.has_zone_key("ZAK")):
            await anyio.sleep(0.05)  # the gateway is up and has signed on to the host
        for tid in setup.tmks:
            async with TerminalSimulator(LOOPBACK, setup.terminal_port, tid, MERCHANT_ID, setup.tmks[tid],
                                         cards=LAB_CARDS, timeout=10) as term:
                await term.sign_in()
                keys += list(term._keys.values())  # the simulator is the terminal: it holds its keys
                sale = await term.purchase(1_000, CARD_CUP)
                results.append(sale)
                results.append(await term.purchase(2_000, CARD_CUP, entry="manual"))
                results.append(await term.purchase(9_000, CARD_LOW))  # 51: the poor card
                results.append(await term.purchase(1_000, CARD_CUP, pin="000000"))  # 55
                results.append(await term.refund(500, CARD_VISA, original=sale))
                results.append(await term.balance(CARD_VISA))
    return results, keys


def secrets_of_the_run(setup: GatewaySetup, host: HostSimulator, results: list[TxnResult],
                       working_keys: list[bytes]) -> dict[str, str]:
    """Everything that must never appear in a log line, as the text a leak would show."""
    found: dict[str, str] = {}
    for card in LAB_CARDS:
        found[f"PAN {mask_pan(card.pan)}"] = card.pan
        found[f"track of {mask_pan(card.pan)}"] = card.track2[len(card.pan):]  # what follows the PAN
        if card.pin:
            found[f"clear PIN block of {mask_pan(card.pan)}"] = make_pin_block(card.pin, card.pan).hex()
            found[f"host PIN block of {mask_pan(card.pan)}"] = encrypt_pin_block(
                host._zone_keys["ZPK"], card.pin, card.pan).hex()
    for result in results:
        for key in ("35", "52", "55"):
            value = result.request.fields.get(key)
            if value:
                found[f"field {key} sent by terminal stan {result.stan}"] = value
    for tid, tmk in setup.tmks.items():
        found[f"TMK of {tid}"] = tmk.hex()
    found["ZMK"] = setup.zmk.hex()
    for n, key in enumerate(working_keys):
        found[f"working key {n}"] = key.hex()
    for usage, key in host._zone_keys.items():
        found[f"zone key {usage}"] = key.material.hex()
    return found


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="asyncio")])
@pytest.mark.anyio
async def test_a_real_gateway_logs_json_lines_with_context_and_no_secrets(tmp_path: Path):
    host = HostSimulator(HostSimConfig(zmk=generate_key(16), rules=HostRulesConfig(accounts=LAB_ACCOUNTS)))
    tmks = {tid: generate_key(16) for tid in terminal_ids(2)}
    async with anyio.create_task_group() as tg:
        host_port = await tg.start(host.serve, LOOPBACK, 0)
        setup = GatewaySetup(free_port(), host_port, host.config.zmk, tmks, MERCHANT_ID, tmp_path / "journal.db",
                             os.urandom(32), 5.0)
        config = write_gateway_config(tmp_path / "gateway.toml", setup)
        gateway = GatewayProcess(config, tmp_path, "asyncio")
        gateway.command += ["-v", "--log-format", "json"]
        try:
            await gateway.start()
            results, working_keys = await run_lab_traffic(setup, host)
            assert await gateway.terminate() == 0
        finally:
            await gateway.stop_quietly()
            tg.cancel_scope.cancel()
    assert [r.rc for r in results[:6]] == ["00", "00", "51", "55", "00", "00"], results
    assert len(working_keys) >= 4  # MAK, PIK (and TDK) of both terminals: the scan looks for them

    text = gateway.logs[-1].read_text(encoding="utf-8")
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert len(lines) > 50
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
    by_logger = {line["logger"] for line in lines}
    assert {"gateway", "gateway.flow", "gateway.wire"} <= by_logger
    # the trace: every direction, masked fields as objects, response codes where answers carry them
    wire = [line for line in lines if line["logger"] == "gateway.wire"]
    assert {line["direction"] for line in wire} == {"terminal_in", "terminal_out", "host_out", "host_in"}
    answers = [line for line in wire if line["direction"] == "terminal_out" and line["fields"]["t"] == "0210"]
    assert {line["fields"].get("39") for line in answers} >= {"00", "51", "55"}
    # lines logged while a request was processed carry its identifiers
    signed_in = [line for line in lines if "signed in" in line["message"]]
    assert len(signed_in) == 2 and {line["terminal"] for line in signed_in} == set(tmks)
    assert all(line["mti"] == "0800" and line["flow"] == "sign_in" for line in signed_in)
    traced_out = [line for line in answers if "txn_id" in line]
    assert traced_out and all(line["rc"] == line["fields"]["39"] for line in traced_out if "rc" in line)
    host_out = [line for line in wire if line["direction"] == "host_out" and line["fields"]["t"] == "0200"]
    assert host_out and all(line["terminal"] in tmks and line["txn_id"] >= 1 and line["mti"] in ("0200", "0220")
                            for line in host_out)

    leaks = {what: value for what, value in secrets_of_the_run(setup, host, results, working_keys).items()
             if value.lower() in text.lower()}
    assert not leaks, f"secrets in the gateway's log: {sorted(leaks)}"
    assert mask_pan(CARD_CUP.pan) in text  # the trace shows the masked PAN: the scan did look at traffic


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="asyncio")])
@pytest.mark.anyio
async def test_serve_logs_info_text_by_default_and_debug_with_v(tmp_path: Path):
    """`gateway serve` without -v logs INFO lines (no debug, no trace); with -v DEBUG and the trace."""
    tmks = {tid: generate_key(16) for tid in terminal_ids(1)}
    texts = []
    for extra in ([], ["-v"]):
        # a host of its own per gateway: a fresh journal restarts the host STANs
        host = HostSimulator(HostSimConfig(zmk=generate_key(16), rules=HostRulesConfig(accounts=LAB_ACCOUNTS)))
        async with anyio.create_task_group() as tg:
            host_port = await tg.start(host.serve, LOOPBACK, 0)
            setup = GatewaySetup(free_port(), host_port, host.config.zmk, tmks, MERCHANT_ID,
                                 tmp_path / f"journal{len(texts)}.db", os.urandom(32), 5.0)
            config = write_gateway_config(tmp_path / f"gateway{len(texts)}.toml", setup)
            gateway = GatewayProcess(config, tmp_path, "asyncio")
            gateway.command += extra
            try:
                await gateway.start()
                with anyio.fail_after(60):
                    while True:
                        log_text = gateway.logs[-1].read_text(encoding="utf-8") if gateway.logs[-1].exists() else ""
                        if "gateway up" in log_text and host.has_zone_key("ZAK"):
                            break
                        await anyio.sleep(0.05)
                async with TerminalSimulator(LOOPBACK, setup.terminal_port, "10000001", MERCHANT_ID,
                                             tmks["10000001"], cards=LAB_CARDS) as term:
                    await term.sign_in()
                    assert (await term.purchase(1_000, CARD_CUP)).approved
                assert await gateway.terminate() == 0
            finally:
                await gateway.stop_quietly()
            texts.append(gateway.logs[-1].read_text(encoding="utf-8"))
            tg.cancel_scope.cancel()
    quiet, verbose = texts
    assert " INFO gateway: gateway up" in quiet and " DEBUG " not in quiet
    assert "terminal 10000001 signed in" in quiet
    assert " DEBUG gateway.wire: terminal_in 0200 " in verbose and " DEBUG gateway.wire: host_in 0210 " in verbose
    for text in texts:
        assert CARD_CUP.pan not in text
        assert all(not line.startswith("{") for line in text.splitlines())  # text, not JSON
