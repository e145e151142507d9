"""`gateway decode` / `gateway encode`: JSON out, hex out, masking, envelopes, exit code 2 with one
line on stderr for bad input."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.iso import cli
from gateway.iso.codec import Codec
from gateway.iso.message import Message
from gateway.iso.spec import load_dialect

PAN = "6225885916163289123"
SIGN_IN_HEX = (
    "08000020000000C00012000456"
    + b"12345678".hex()
    + b"123456789012345".hex()
    + "0011001234560030"
    + "0002"
    + b"03".hex()
).upper()
CUP = Codec(load_dialect("cup-pos"))
ISO87 = Codec(load_dialect("iso87-ascii"))
TPDU, HEADER = "6000030000", "603100310730"


def run(argv: list[str], capsys: pytest.CaptureFixture[str], stdin: str | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = cli.main(argv)
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def decode_json(argv: list[str], capsys: pytest.CaptureFixture[str], stdin: str | None = None) -> dict:
    code, out, err = run(["decode", *argv], capsys, stdin)
    assert code == 0, err
    assert err == ""
    return json.loads(out)


def test_decode_sign_in_vector(capsys: pytest.CaptureFixture[str]) -> None:
    doc = decode_json(["--dialect", "cup-pos", SIGN_IN_HEX], capsys)
    assert doc["dialect"] == "cup-pos"
    assert doc["envelope"] is None
    assert doc["mti"] == "0800"
    assert doc["fields"] == {
        "11": "000456",
        "41": "12345678",
        "42": "123456789012345",
        "60": "00123456003",
        "63": "03",
    }
    assert list(doc["fields"]) == ["11", "41", "42", "60", "63"]


def test_decode_breaks_out_subfields_when_available(capsys: pytest.CaptureFixture[str]) -> None:
    doc = decode_json(["--dialect", "cup-pos", SIGN_IN_HEX], capsys)
    try:
        from gateway.iso.subfields import break_out
    except ImportError:
        assert "subfields" not in doc
    else:
        expected = break_out("cup-pos", CUP.decode(bytes.fromhex(SIGN_IN_HEX)))
        assert doc["subfields"] == json.loads(json.dumps(expected))


def test_decode_without_subfields_module(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gateway.iso.subfields", None)  # import now raises ImportError
    doc = decode_json(["--dialect", "cup-pos", SIGN_IN_HEX], capsys)
    assert "subfields" not in doc and doc["mti"] == "0800"


def test_decode_masks_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    track = "6225885916163289D17032010000000000000"
    body = CUP.encode(Message("0200", {"2": PAN, "3": "000000", "35": track, "52": "0123456789ABCDEF"}))
    code, out, _err = run(["decode", "--dialect", "cup-pos", body.hex()], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["fields"]["2"] == "622588*********9123"
    assert doc["fields"]["35"] == "<redacted 37>" and doc["fields"]["52"] == "<redacted 16>"
    assert PAN not in out and "0123456789ABCDEF" not in out and "D1703" not in out


def test_decode_cup_frame_from_stdin_with_whitespace(capsys: pytest.CaptureFixture[str]) -> None:
    body = bytes.fromhex(SIGN_IN_HEX)
    frame = (len(body) + 11).to_bytes(2, "big").hex() + TPDU + HEADER + SIGN_IN_HEX
    spaced = " ".join(frame[i : i + 8] for i in range(0, len(frame), 8)) + "\n"
    doc = decode_json(["--dialect", "cup-pos", "--framing", "cup", "-"], capsys, stdin=spaced)
    env = doc["envelope"]
    assert env["tpdu"] == TPDU and env["header"] == HEADER
    assert (env["tpdu_id"], env["destination"], env["source"]) == ("60", "0003", "0000")
    assert (env["application"], env["version"], env["processing_requirement"]) == ("60", "31", 0)
    assert doc["mti"] == "0800"


def test_decode_iso87_with_len2_framing_and_dialect_path(capsys: pytest.CaptureFixture[str]) -> None:
    body = ISO87.encode(Message("0800", {"7": "0101000000", "11": "000003", "70": "301"}))
    frame = (len(body).to_bytes(2, "big") + body).hex()
    path = str(Path(__file__).resolve().parents[1] / "specs" / "iso87-ascii.toml")
    doc = decode_json(["--dialect", path, "--framing", "len2", frame], capsys)
    assert doc["dialect"] == "iso87-ascii"
    assert doc["fields"] == {"7": "0101000000", "11": "000003", "70": "301"}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--dialect", "cup-pos", "08zz"], "not hex at character 2"),
        (["--dialect", "cup-pos", "080"], "odd number of hex digits"),
        (["--dialect", "cup-pos", "0900" + SIGN_IN_HEX[4:]], "field t, offset 0"),
        (["--dialect", "cup-pos", SIGN_IN_HEX + "00"], "offset 48"),
        (["--dialect", "no-such-dialect", SIGN_IN_HEX], "unknown dialect"),
        (["--dialect", "cup-pos", "--framing", "cup", "0020610000"], "TPDU id"),
        (["--dialect", "cup-pos", "--framing", "len2", "0040" + SIGN_IN_HEX], "incomplete frame"),
        (["--dialect", "cup-pos", "--framing", "len2", "0001000001"], "extra byte"),
    ],
)
def test_decode_bad_input(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["decode", *argv], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("gateway decode: error:")
    assert needle in err


def test_decode_error_inside_framed_body_gives_both_offsets(capsys: pytest.CaptureFixture[str]) -> None:
    body = CUP.encode(Message("0200", {"2": PAN, "3": "000000"}))
    spoiled = body[:12] + b"\xab" + body[13:]
    frame = (len(spoiled) + 11).to_bytes(2, "big").hex() + TPDU + HEADER + spoiled.hex()
    code, _out, err = run(["decode", "--dialect", "cup-pos", "--framing", "cup", frame], capsys)
    assert code == 2
    assert "field 2, offset 10" in err and "input offset 13" in err
    assert PAN[:6] not in err and PAN[-4:] not in err


def test_encode_sign_in(capsys: pytest.CaptureFixture[str]) -> None:
    doc = {"mti": "0800", "fields": {"11": "000456", "41": "12345678", "42": "123456789012345"}}
    doc["fields"] |= {"60": "00123456003", "63": "03"}
    code, out, err = run(["encode", "--dialect", "cup-pos", json.dumps(doc)], capsys)
    assert (code, err) == (0, "")
    assert out == SIGN_IN_HEX + "\n"


def test_decode_output_encodes_back(capsys: pytest.CaptureFixture[str]) -> None:
    body = bytes.fromhex(SIGN_IN_HEX)
    frame = ((len(body) + 11).to_bytes(2, "big").hex() + TPDU + HEADER + SIGN_IN_HEX).upper()
    decoded = decode_json(["--dialect", "cup-pos", "--framing", "cup", frame], capsys)
    code, out, _err = run(["encode", "--dialect", "cup-pos", "--framing", "cup", "-"], capsys, json.dumps(decoded))
    assert code == 0 and out.strip() == frame
    code, out, _err = run(["encode", "--dialect", "cup-pos", "--framing", "len2", "-"], capsys, json.dumps(decoded))
    assert code == 0 and out.strip() == f"{len(body):04X}" + SIGN_IN_HEX


def test_encode_ascii4(capsys: pytest.CaptureFixture[str]) -> None:
    doc = {"mti": "0800", "fields": {"11": "000003", "70": "301"}}
    code, out, _err = run(["encode", "--dialect", "iso87-ascii", "--framing", "ascii4", json.dumps(doc)], capsys)
    raw = bytes.fromhex(out.strip())
    assert code == 0 and raw[:4] == b"%04d" % (len(raw) - 4)
    assert ISO87.decode(raw[4:]).fields == doc["fields"]


@pytest.mark.parametrize(
    ("argv", "stdin", "needle"),
    [
        (["--dialect", "cup-pos", '{"mti": "0800", '], None, "not valid JSON"),
        (["--dialect", "cup-pos", "[1, 2]"], None, "must be an object"),
        (["--dialect", "cup-pos", '{"fields": {}}'], None, "mti"),
        (["--dialect", "cup-pos", '{"mti": "0800", "fields": []}'], None, "fields"),
        (["--dialect", "cup-pos", '{"mti": "0800", "fields": {"11": 456}}'], None, "field 11"),
        (["--dialect", "cup-pos", '{"mti": "0800", "fields": {"11": "0004X6"}}'], None, "field 11"),
        (["--dialect", "cup-pos", '{"mti": "0800", "fields": {"99": "1"}}'], None, "field 99"),
        (["--dialect", "cup-pos", '{"mti": "0900", "fields": {"11": "000001"}}'], None, "field t"),
        (["--dialect", "cup-pos", "--framing", "cup", '{"mti": "0800", "fields": {"11": "000001"}}'], None, "envelope"),
        (
            ["--dialect", "cup-pos", "--framing", "cup", "-"],
            json.dumps({"mti": "0800", "fields": {"11": "000001"}, "envelope": {"tpdu": "60", "header": HEADER}}),
            "TPDU must be 5 bytes",
        ),
    ],
)
def test_encode_bad_input(argv: list[str], stdin: str | None, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["encode", *argv], capsys, stdin)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("gateway encode: error:")
    assert needle in err


def test_register_adds_both_commands() -> None:
    parser = argparse.ArgumentParser(prog="gateway")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["decode", "--dialect", "cup-pos", "--framing", "cup", "00"])
    assert args.func is cli.decode_command and args.framing == "cup"
    args = parser.parse_args(["encode", "--dialect", "iso87-ascii", "-"])
    assert args.func is cli.encode_command and args.framing == "none"


def test_module_entry_point() -> None:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "gateway.iso.cli", "decode", "--dialect", "cup-pos", SIGN_IN_HEX],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fields"]["11"] == "000456"
