"""`gateway saf …` and `gateway journal show` against a real journal file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anyio
import pytest
from test_store_support import OTHER_PAN, TEST_PAN, request

from gateway.iso.message import mask_pan
from gateway.store import SqliteStore
from gateway.store.cli import register


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="gateway")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A journal with a completed purchase, a parked reversal, a pending one and one done."""
    path = tmp_path / "journal.db"

    async def fill() -> None:
        async with SqliteStore.open(path) as store:
            done = await store.record_request(request("000001", amount=1500))
            await store.record_outcome(done, "completed", rc="00", auth_code="111111", rrn="RRN000000001")
            parked = await store.record_request(request("000002", pan=OTHER_PAN, terminal_id="T0000002"))
            saf = await store.record_timeout_and_queue_reversal(parked)
            await store.park_reversal(saf.saf_id, "gave up after 6 attempts: timeout")
            pending = await store.record_request(request("000003"))
            await store.record_timeout_and_queue_reversal(pending)
            acked = await store.record_request(request("000004"))
            await store.ack_reversal((await store.record_timeout_and_queue_reversal(acked)).saf_id, "00")

    anyio.run(fill)
    return path


def test_saf_list_table_and_json(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "saf", "list", "--db", str(db))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "TXN", "STATE", "REASON"]
    assert [line.split()[2] for line in lines[1:]] == ["parked", "pending", "done"]
    assert "gave up after 6 attempts" in out
    assert mask_pan(OTHER_PAN) in out and OTHER_PAN not in out and TEST_PAN not in out

    code, out, _ = run_cli(capsys, "saf", "list", "--state", "parked", "--json", "--db", str(db))
    data = json.loads(out)
    assert code == 0 and len(data) == 1
    assert (data[0]["state"], data[0]["attempts"], data[0]["txn"]["terminal_id"]) == ("parked", 0, "T0000002")
    assert data[0]["txn"]["pan_masked"] == mask_pan(OTHER_PAN)


def test_saf_retry_and_drop(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "saf", "retry", "1", "--db", str(db))
    assert code == 0 and "pending again" in out
    code, out, _ = run_cli(capsys, "saf", "list", "--state", "pending", "--json", "--db", str(db))
    assert sorted(e["saf_id"] for e in json.loads(out)) == [1, 2]

    code, out, _ = run_cli(
        capsys, "saf", "drop", "2", "--note", "reversed by phone, ticket 9", "--json", "--db", str(db)
    )
    assert code == 0
    entry = json.loads(out)
    assert (entry["state"], entry["operator_note"], entry["txn"]["state"]) == (
        "dropped",
        "reversed by phone, ticket 9",
        "reversal_dropped",
    )

    code, _, err = run_cli(capsys, "saf", "drop", "3", "--note", "too late", "--db", str(db))
    assert code == 1 and "SAF entry 3 is done" in err  # already acknowledged by the host
    code, _, err = run_cli(capsys, "saf", "retry", "77", "--db", str(db))
    assert code == 1 and "no SAF entry with id 77" in err


def test_journal_show(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "journal", "show", "--terminal", "T0000001", "--limit", "2", "--db", str(db)
    )
    assert code == 0
    rows = out.splitlines()[1:]
    assert len(rows) == 2 and all("T0000001" in r for r in rows)
    assert rows[0].split()[0] == "4"  # newest first

    code, out, _ = run_cli(capsys, "journal", "show", "--state", "completed", "--json", "--db", str(db))
    (rec,) = json.loads(out)
    assert (rec["txn_id"], rec["amount"], rec["rrn"], rec["kind"]) == (1, 1500, "RRN000000001", "purchase")
    assert rec["pan_masked"] == mask_pan(TEST_PAN)
    assert TEST_PAN not in out

    code, out, _ = run_cli(capsys, "journal", "show", "--terminal", "T0000099", "--db", str(db))
    assert code == 0 and out.strip() == "(none)"


def test_missing_journal_is_an_error_not_a_new_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.db"
    code, _, err = run_cli(capsys, "saf", "list", "--db", str(missing))
    assert code == 1 and "no journal at" in err
    assert not missing.exists()
