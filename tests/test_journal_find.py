"""`gateway journal find` / `journal refusals`: the operator's lookups against a real SQLite journal.

Seed problems 001 and 004: the paper receipt is gone, the customer wants a refund. The operator finds
the sale by RRN, STAN, amount, day or by the card (typed, compared by fingerprint, never printed), and
sees the receipt's data, what the code meant and the reversal history.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from datetime import datetime
from pathlib import Path

import anyio
import pytest
from test_store_support import OTHER_PAN, PAN_KEY, TEST_PAN, FakeClock, request

from gateway.iso.message import mask_pan
from gateway.store import RefusalRecord, SqliteStore, pan_fingerprint
from gateway.store.cli import register
from gateway.store.lookup import PanInputError, parse_time, read_pan

#: 2027-01-15 10:00 local time: the day of the sales below
DAY = datetime(2027, 1, 15, 10, 0).timestamp()


def failed(exc: BaseException) -> None:
    raise AssertionError(f"refusal not journalled: {exc!r}")


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """A gateway config (its journal, and the PAN key file next to it as `gateway serve` leaves it) with
    a completed sale, a timed-out one reversed after two tries plus a late approval, a sale of another
    card the day after, and a refusal of our card."""
    db = tmp_path / "journal.db"
    (tmp_path / "journal.db.pankey").write_text(PAN_KEY.hex())
    config = tmp_path / "gateway.toml"
    config.write_text(f'[store]\npath = "{db}"\n')
    clock = FakeClock(DAY)

    async def fill() -> None:
        async with SqliteStore.open(db, pan_key=PAN_KEY, clock=clock) as store:
            sale = await store.record_request(request("000101", amount=1500))
            await store.record_outcome(sale, "completed", rc="00", auth_code="123456", rrn="701500000101")
            clock.now += 60
            lost = await store.record_request(request("000102", amount=2500))
            queued = await store.record_timeout_and_queue_reversal(lost)
            clock.now += 1
            await store.mark_reversal_attempt(queued.saf_id, clock.now, clock.now + 1, "timeout")
            clock.now += 2
            await store.record_late_answer(lost, "00", auth_code="654321", rrn="701500000102", host_mti="0210",
                                           host_stan="000102", terminal_id="T0000001", amount=2500)
            await store.ack_reversal(queued.saf_id, "00", attempt_at=clock.now)
            clock.now += 60
            store.record_refusal_soon(RefusalRecord(
                terminal_id="T0000001", mti="0200", rc="61", reason="daily limit reached", stan="000103",
                kind="purchase", amount=900_000, pan_masked=mask_pan(TEST_PAN),
                pan_fingerprint=pan_fingerprint(PAN_KEY, TEST_PAN)), on_error=failed)
            clock.now += 86_400
            other = await store.record_request(request("000104", pan=OTHER_PAN, amount=1500))
            await store.record_outcome(other, "declined", rc="51")
            await store.late_answers()  # a read flushes the refusal's pending write

    anyio.run(fill)
    return config


def run(capsys: pytest.CaptureFixture[str], *argv: str, card: str | None = None) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="gateway")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    # the PAN arrives on stdin (not a terminal), as `echo PAN | gateway journal find --card` gives it
    saved, sys.stdin = sys.stdin, io.StringIO("" if card is None else card + "\n")
    try:
        code = args.func(args)
    finally:
        sys.stdin = saved
    out, err = capsys.readouterr()
    return code, out, err


def test_by_rrn_shows_the_receipt(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "journal", "find", "--config", str(lab), "--rrn", "701500000101")
    assert code == 0
    assert "txn 1  purchase  2027-01-15T10:00:00" in out
    assert "merchant M00000000000001  terminal T0000001  batch 000001  STAN 000101" in out
    assert f"card {mask_pan(TEST_PAN)} (CUP)  amount 15.00 (currency 156)" in out
    assert "answer 00 (approved)  auth 123456  RRN 701500000101" in out
    assert "reversal" not in out
    assert TEST_PAN not in out


def test_the_reversal_history_and_the_late_answer(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "journal", "find", "--config", str(lab), "--stan", "000102")
    assert code == 0
    assert "reversed: the host has undone it: no money moved in the end" in out
    assert "answer -  auth -  RRN -" in out  # the terminal got 98 from the gateway, the host said nothing
    assert "reversal 1: done, reason 98 (no answer from the host in time), by gateway" in out
    assert "attempts 2 (ever 2), last 2027-01-15T10:01:03" in out
    assert "last error: timeout" in out and "host answered: 00 (approved)" in out
    assert "late host answer 2027-01-15T10:01:03" in out and "RRN 701500000102 (journalled, never forwarded)" in out

    code, out, _ = run(capsys, "journal", "find", "--config", str(lab), "--stan", "000102", "--json")
    (case,) = json.loads(out)["transactions"]
    assert case["transaction"]["state"] == "reversed"
    assert case["transaction"]["created_at"].startswith("2027-01-15T10:01:00")
    assert "pan_fingerprint" not in case["transaction"]
    assert case["reversal"]["ack_rc"] == "00" and case["reversal"]["total_attempts"] == 2
    assert case["reversal"]["queued_at"].startswith("2027-01-15T10:01:00")
    assert [(a["rc"], a["auth_code"]) for a in case["late_answers"]] == [("00", "654321")]


def test_by_card_amount_and_day(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "journal", "find", "--config", str(lab), "--card", "--json",
                         card="6222 0212 3456 7894 321")  # as printed on the card, spaces and all
    assert code == 0, err
    found = json.loads(out)
    assert [c["transaction"]["terminal_stan"] for c in found["transactions"]] == ["000102", "000101"]
    assert [(r["rc"], r["rc_meaning"], r["reason"]) for r in found["refusals"]] == [
        ("61", "amount limit exceeded", "daily limit reached")]
    assert TEST_PAN not in out and TEST_PAN not in err

    code, out, _ = run(capsys, "journal", "find", "--config", str(lab), "--card", card=OTHER_PAN)
    assert "answer 51 (insufficient funds)" in out and "refused: no money moved" in out
    assert OTHER_PAN not in out

    code, out, _ = run(capsys, "journal", "find", "--config", str(lab), "--amount", "1500", "--json")
    assert [c["transaction"]["terminal_stan"] for c in json.loads(out)["transactions"]] == ["000104", "000101"]
    code, out, _ = run(capsys, "journal", "find", "--config", str(lab), "--amount", "1500", "--date", "2027-01-15",
                       "--json")
    assert [c["transaction"]["terminal_stan"] for c in json.loads(out)["transactions"]] == ["000101"]
    code, out, _ = run(capsys, "journal", "find", "--config", str(lab), "--since", "2027-01-15T10:00:30",
                       "--until", "2027-01-15", "--json")
    assert [c["transaction"]["terminal_stan"] for c in json.loads(out)["transactions"]] == ["000102"]
    code, out, _ = run(capsys, "journal", "find", "--config", str(lab), "--rrn", "999999999999")
    assert code == 0 and out.strip() == "(none)"


def test_refusals_command(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "journal", "refusals", "--config", str(lab), "--card", card=TEST_PAN)
    assert code == 0
    assert "terminal T0000001  STAN 000103  purchase amount 900000" in out
    assert "61 (amount limit exceeded): daily limit reached" in out
    code, out, _ = run(capsys, "journal", "refusals", "--config", str(lab), "--rc", "A0")
    assert out.strip() == "(none)"


def test_a_bad_card_number_is_refused_without_echoing_it(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "journal", "find", "--config", str(lab), "--card", card="62220212x4567")
    assert code == 1 and "12 to 19 digits" in err and "62220212" not in err + out


def test_no_fingerprint_key_no_made_up_one(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = lab.parent / "journal.db.pankey"
    key_file.unlink()
    code, _, err = run(capsys, "journal", "find", "--config", str(lab), "--card", card=TEST_PAN)
    assert code == 1 and "no PAN fingerprint key" in err
    assert not key_file.exists()  # a new key would match nothing and hide every old transaction


def test_read_pan_and_times() -> None:
    assert read_pan(io.StringIO("6222-0212-3456\n"), prompt=False) == "622202123456"
    with pytest.raises(PanInputError):
        read_pan(io.StringIO("\n"), prompt=False)
    assert parse_time("2027-01-15") == datetime(2027, 1, 15).timestamp()
    assert parse_time("2027-01-15", end_of_day=True) > datetime(2027, 1, 15, 23, 59, 59).timestamp()
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("15/01/2027")
