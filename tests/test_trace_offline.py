"""Surrogates, `trace check` findings, the importers (hex, jPOS XML, pcap/pcapng written here with
dpkt's writer) and the recorder's drop path — offline, on real files."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import dpkt
import pytest

from gateway.iso.build import TerminalIdent, cup, iso87
from gateway.iso.build.response import response
from gateway.iso.codec import Codec
from gateway.iso.framing import CupEnvelope, make_framer
from gateway.iso.message import Message
from gateway.iso.spec import load_dialect
from gateway.lab import CARD_CUP, CARD_VISA, MERCHANT_ID
from gateway.trace.check import Checker
from gateway.trace.encoder import TraceEncoder
from gateway.trace.format import (
    Direction,
    EventKind,
    FrameRecord,
    Leg,
    SecretKind,
    format_match_key,
    read_trace,
    write_records,
)
from gateway.trace.recorder import Recorder, RecorderSettings
from gateway.trace.surrogate import Surrogates, luhn_valid, mask_message

CUP = load_dialect("cup-pos")
ISO = load_dialect("iso87-ascii")
IDENT = TerminalIdent("10000001", MERCHANT_ID)
ENV = CupEnvelope.from_hex("6000010000", "603100310000")
LEGS = {"terminal": "cup-pos", "host": "iso87-ascii"}
FRAMINGS = {"terminal": "cup", "host": "len2"}


def run_check(records: list) -> dict[str, list]:
    enc_header = TraceEncoder(LEGS, FRAMINGS, lenient=True).header("test", "")
    checker = Checker(enc_header)
    for rec in records:
        checker.feed(rec)
    return {c.name.split(":")[0]: c.findings for c in checker.results()}


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=60)


# --- surrogates --------------------------------------------------------------------------------------


def test_pan_surrogates_keep_6_and_4_are_luhn_valid_consistent_and_never_the_pan() -> None:
    s = Surrogates()
    seen = {}
    for i in range(2_000):
        pan = f"622202{i:09d}0"[:15] + "3"
        sur = s.pan(pan)
        assert len(sur) == len(pan) and sur[:6] == pan[:6] and sur[-4:] == pan[-4:] and luhn_valid(sur)
        assert sur != pan and s.pan(pan) == sur
        seen.setdefault(sur, pan)
        assert seen[sur] == pan, "two cards share a surrogate"
    assert Surrogates().pan(CARD_CUP.pan) != Surrogates().pan(CARD_CUP.pan)  # a new trace, a new key


def test_every_secret_field_is_replaced_and_the_message_still_encodes() -> None:
    s = Surrogates()
    name = b"CARDHOLDER/NAME ".hex().upper()
    icc = f"5A08{CARD_CUP.pan[:16]}5F2010{name}9F26080102030405060708"
    msg = cup.purchase(IDENT, "000123", "000001", 1_000, track2=CARD_CUP.track2, pin_block="0123456789ABCDEF",
                       icc=icc)
    msg.fields["64"] = "1A2B3C4D5E6F7081"
    fields, kinds = mask_message(CUP, msg, s)
    assert kinds == {"35": SecretKind.TRACK, "52": SecretKind.PIN, "55": SecretKind.CHIP, "64": SecretKind.MAC}
    assert fields["52"] != msg.fields["52"] and fields["64"] == "0" * 16
    assert CARD_CUP.pan not in fields["35"] and len(fields["35"]) == len(msg.fields["35"])
    assert CARD_CUP.pan[:12] not in fields["55"] and "9F26080102030405060708" in fields["55"]  # the ARQC stays
    Codec(CUP).encode(Message(msg.mti, fields))
    # the host leg's clear track and the terminal's encrypted one become the same surrogate
    clear = s.track(CARD_CUP.track2.replace("D", "="))
    enciphered = CARD_CUP.track2[:20] + "A1B2C3D4E5F60718" + CARD_CUP.track2[-1]
    assert s.track(enciphered, encrypted=True) == clear.replace("=", "D")
    # key exchange answer (ISO 8583:1987 48) and CUP sign-in keys (62) are KEY; a batch upload's 48 PANs
    key_answer = iso87.key_response(iso87.key_request("000002", "1202060657", "ZPK", "1234"), b"\x11" * 16, b"\x22" * 4)
    assert mask_message(ISO, key_answer, s)[1] == {"48": SecretKind.KEY}
    assert mask_message(ISO, key_answer, s)[0]["48"] != key_answer.fields["48"]


# --- check ---------------------------------------------------------------------------------------------


def flow(enc: TraceEncoder, *, answer_rc: str = "00", tamper: str | None = None) -> list:
    """A terminal purchase, its upstream request, the host's answer and the terminal's answer."""
    t_req = cup.purchase(IDENT, "000123", "000001", 1_000, track2=CARD_CUP.track2)
    t_ans = response(t_req, answer_rc, "cup-pos", field_37="123456789012")
    if tamper is not None:
        t_ans.fields[tamper] = "999999" if tamper != "4" else "000000009999"
    h_req = iso87.purchase(IDENT, "000900", "1202060657", "1234", 1_000, track2=CARD_CUP.track2)
    h_ans = response(h_req, answer_rc, "iso87-ascii", field_37="123456789012")
    return [
        enc.frame(1.0, Leg.TERMINAL, Direction.IN, "T1", Codec(CUP).encode(t_req), ENV),
        enc.frame(1.1, Leg.HOST, Direction.OUT, "H1", Codec(ISO).encode(h_req)),
        enc.frame(1.2, Leg.HOST, Direction.IN, "H1", Codec(ISO).encode(h_ans)),
        enc.frame(1.3, Leg.TERMINAL, Direction.OUT, "T1", Codec(CUP).encode(t_ans), ENV.reply()),
    ]


def test_a_clean_flow_passes_every_case() -> None:
    found = run_check(flow(TraceEncoder(LEGS, FRAMINGS, lenient=True)))
    assert found == {name: [] for name in found}


def test_check_names_what_breaks() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    # an answer that does not echo its request's STAN is an orphan (another match key) and its request
    # has no answer; one that changes the amount is an echo finding naming field 4
    records = flow(enc, tamper="4")
    found = run_check(records)
    assert [f.field for f in found["echo"]] == ["4"] and found["pairing"] == []
    # a tampered wire
    bad = records[0]
    assert isinstance(bad, FrameRecord)
    broken = FrameRecord(bad.seq, bad.t, bad.leg, bad.dir, bad.conn, bad.mti, dict(bad.fields, **{"4": "000000002000"}),
                         bad.wire, bad.envelope, bad.secrets)
    found = run_check([broken, *records[1:]])
    assert found["decode"] and found["decode"][0].field == "4"
    # the host approved, the terminal never heard: neither delivered nor reversed
    found = run_check(records[:3])
    assert found["pairing"] and found["approvals"]
    # ... unless the host request timed out and the approval came late: then it must be reversed
    timeout = enc.event(1.15, Leg.HOST, "H1", EventKind.TIMEOUT, format_match_key({"class": "020", "11": "000900",
                                                                                   "41": "10000001"}))
    t98 = response(cup.purchase(IDENT, "000123", "000001", 1_000, track2=CARD_CUP.track2), "98", "cup-pos")
    answered_98 = enc.frame(1.3, Leg.TERMINAL, Direction.OUT, "T1", Codec(CUP).encode(t98), ENV.reply())
    found = run_check([records[0], records[1], timeout, records[2], answered_98])
    assert found["pairing"] == [] and found["late"] == [] and len(found["approvals"]) == 1
    # forwarding that late approval is the worst case
    found = run_check([records[0], records[1], timeout, records[2], records[3]])
    assert found["late"]


def test_reversal_must_name_an_original_and_a_repeat_must_repeat() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    records = flow(enc)
    h_req = iso87.purchase(IDENT, "000900", "1202060657", "1234", 1_000, track2=CARD_CUP.track2)
    first = iso87.reversal(h_req, "98")
    first.fields.update({"11": "000901", "7": "1202060700"})  # the host link stamps its own
    repeat = Message("0401", dict(first.fields))
    ok = [enc.frame(2.0, Leg.HOST, Direction.OUT, "H1", Codec(ISO).encode(first)),
          enc.frame(2.1, Leg.HOST, Direction.IN, "H1", Codec(ISO).encode(response(first, "00", "iso87-ascii"))),
          enc.frame(3.0, Leg.HOST, Direction.OUT, "H1", Codec(ISO).encode(repeat)),
          enc.frame(3.1, Leg.HOST, Direction.IN, "H1", Codec(ISO).encode(response(repeat, "00", "iso87-ascii")))]
    found = run_check(records + ok)
    assert found["originals"] == [] and found["repeats"] == []
    changed = Message("0401", dict(first.fields, **{"11": "000902"}))
    bad = [enc.frame(3.0, Leg.HOST, Direction.OUT, "H1", Codec(ISO).encode(changed)),
           enc.frame(3.1, Leg.HOST, Direction.IN, "H1", Codec(ISO).encode(response(changed, "00", "iso87-ascii")))]
    found = run_check(records + ok[:2] + bad)
    assert [f.field for f in found["repeats"]] == ["11"]
    stranger = iso87.reversal(iso87.purchase(IDENT, "000555", "1231235959", "1234", 7, track2=CARD_CUP.track2),
                              "98")
    found = run_check([*records, enc.frame(4.0, Leg.HOST, Direction.OUT, "H1", Codec(ISO).encode(stranger))])
    assert found["originals"] and found["originals"][0].field == "90"


def test_check_cli_exit_codes_json_and_junit(tmp_path: Path) -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    good = tmp_path / "good.jsonl"
    with good.open("w") as f:
        write_records(f, enc.header("test", ""), flow(enc))
    bad = tmp_path / "bad.jsonl"
    with bad.open("w") as f:
        write_records(f, enc.header("test", ""), flow(enc, tamper="4"))
    ok = gateway_cli("trace", "check", str(good))
    assert ok.returncode == 0 and "PASS — 7 passed" in ok.stdout, ok.stdout + ok.stderr
    failed = gateway_cli("trace", "check", str(bad), "--json", str(tmp_path / "r.json"), "--junit",
                         str(tmp_path / "r.xml"))
    assert failed.returncode == 1 and "FAIL" in failed.stdout and "field 4" in failed.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["passed"] and any(c["findings"] for c in report["cases"])
    assert "<failure" in (tmp_path / "r.xml").read_text()


# --- importers -----------------------------------------------------------------------------------------


def cup_frames() -> list[bytes]:
    req = cup.purchase(IDENT, "000123", "000001", 1_000, track2=CARD_CUP.track2)
    framer = make_framer("cup")
    return [framer.encode(Codec(CUP).encode(req), ENV),
            framer.encode(Codec(CUP).encode(response(req, "00", "cup-pos", field_37="123456789012")), ENV.reply())]


def test_import_hex(tmp_path: Path) -> None:
    frames = cup_frames()
    body = Codec(CUP).encode(cup.echo(IDENT, "000001"))
    dump = tmp_path / "dump.txt"
    dump.write_text(f"# two framed, one bare body\n{frames[0].hex()}\nout {frames[1].hex().upper()}\n{body.hex()}\n"
                    "not hex at all\n")
    out = tmp_path / "hex.jsonl"
    done = gateway_cli("trace", "import", "--format", "hex", str(dump), "-o", str(out))
    assert done.returncode == 0, done.stderr
    header, records = read_trace(out)
    recs = list(records)
    assert header.source == "import:hex"
    assert [getattr(r, "mti", getattr(r, "event", None)) for r in recs] == ["0200", "0210", "0820",
                                                                            EventKind.UNDECODABLE]
    assert CARD_CUP.pan not in out.read_text()
    assert run_check_file(out)["decode"] == []


def run_check_file(path: Path) -> dict[str, list]:
    header, records = read_trace(path)
    checker = Checker(header)
    for rec in records:
        checker.feed(rec)
    return {c.name.split(":")[0]: c.findings for c in checker.results()}


JPOS_LOG = """<?xml version="1.0" encoding="UTF-8"?>
<log realm="channel/127.0.0.1:8000" at="2026-11-30T10:21:15.123" lifespan="2ms">
  <receive>
    <isomsg direction="incoming">
      <!-- org.jpos.iso.packager.ISO87APackager -->
      <field id="0" value="0200"/>
      <field id="2" value="411111______1111"/>
      <field id="3" value="000000"/>
      <field id="4" value="000000001000"/>
      <field id="7" value="1130102115"/>
      <field id="11" value="000123"/>
      <field id="35" value="411111______1111=3012_______________"/>
      <field id="41" value="10000001"/>
      <field id="42" value="898100012340001"/>
      <field id="48" value="[WIPED]"/>
      <field id="52" value="AA55AA55" type="binary"/>
      <isomsg id="127"><field id="2" value="x"/></isomsg>
    </isomsg>
  </receive>
</log>
<log realm="channel/127.0.0.1:8000" at="2026-11-30T10:21:15.140">
  <send>
    <isomsg direction="outgoing">
      <field id="0" value="0210"/>
      <field id="3" value="000000"/>
      <field id="4" value="000000001000"/>
      <field id="7" value="1130102115"/>
      <field id="11" value="000123"/>
      <field id="39" value="00"/>
      <field id="41" value="10000001"/>
      <field id="42" value="898100012340001"/>
    </isomsg>
  </send>
</log>
"""


def test_import_jpos_xml_with_protected_and_wiped_fields(tmp_path: Path) -> None:
    log_file = tmp_path / "q2.log"
    log_file.write_text(JPOS_LOG)
    out = tmp_path / "jpos.jsonl"
    done = gateway_cli("trace", "import", "--format", "jpos-xml", "--dialect", "iso87-ascii", "--framing", "ascii4",
                       str(log_file), "-o", str(out))
    assert done.returncode == 0, done.stderr
    frames = [r for r in read_trace(out)[1] if isinstance(r, FrameRecord)]
    assert [(f.mti, f.dir) for f in frames] == [("0200", Direction.IN), ("0210", Direction.OUT)]
    req = frames[0]
    assert set(req.masked) == {"2", "35", "48", "52", "127"}
    assert len(req.fields["2"]) == 16 and req.fields["2"][:6] == "411111" and luhn_valid(req.fields["2"])
    assert req.secrets["52"] is SecretKind.PIN and len(req.fields["52"]) == 16
    assert req.t == pytest.approx(frames[1].t - 0.017, abs=1e-3)
    assert run_check_file(out) == {name: [] for name in run_check_file(out)}


def tcp_capture(path: Path, frames: list[bytes], *, ng: bool) -> None:
    """A loopback conversation on port 5000 written with dpkt: SYN, the request split in two segments
    delivered out of order with one retransmitted, the answer, FIN."""
    client, server = socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.1")
    packets: list[bytes] = []

    def seg(sport: int, dport: int, seq: int, flags: int, data: bytes = b"") -> None:
        tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, ack=1, flags=flags, data=data)
        ip = dpkt.ip.IP(src=client, dst=server, p=dpkt.ip.IP_PROTO_TCP, data=tcp)
        ip.len = len(bytes(ip))
        packets.append(bytes(dpkt.ethernet.Ethernet(src=b"\x00" * 6, dst=b"\x00" * 6, type=dpkt.ethernet.ETH_TYPE_IP,
                                                    data=ip)))

    c_isn, s_isn = 1000, 5000
    seg(40000, 5000, c_isn, dpkt.tcp.TH_SYN)
    seg(5000, 40000, s_isn, dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK)
    req, ans = frames
    half = len(req) // 2
    seg(40000, 5000, c_isn + 1 + half, dpkt.tcp.TH_ACK, req[half:])  # second half first
    seg(40000, 5000, c_isn + 1, dpkt.tcp.TH_ACK, req[:half])
    seg(40000, 5000, c_isn + 1, dpkt.tcp.TH_ACK, req[:half])  # retransmission
    seg(5000, 40000, s_isn + 1, dpkt.tcp.TH_ACK, ans)
    seg(40000, 5000, c_isn + 1 + len(req), dpkt.tcp.TH_FIN | dpkt.tcp.TH_ACK)
    with path.open("wb") as f:
        writer = dpkt.pcapng.Writer(f) if ng else dpkt.pcap.Writer(f)
        for i, pkt in enumerate(packets):
            writer.writepkt(pkt, ts=1_764_500_000 + i / 100)


@pytest.mark.parametrize("ng", [False, True], ids=["pcap", "pcapng"])
def test_import_pcap_reassembles_tcp_and_frames_cup(tmp_path: Path, ng: bool) -> None:
    cap = tmp_path / ("c.pcapng" if ng else "c.pcap")
    tcp_capture(cap, cup_frames(), ng=ng)
    out = tmp_path / "pcap.jsonl"
    done = gateway_cli("trace", "import", "--format", "pcap", "--port", "5000", str(cap), "-o", str(out))
    assert done.returncode == 0, done.stderr
    recs = list(read_trace(out)[1])
    kinds = [r.mti if isinstance(r, FrameRecord) else r.event.value for r in recs]
    assert kinds == ["connect", "0200", "0210", "close"]
    req = recs[1]
    assert isinstance(req, FrameRecord) and req.dir is Direction.IN and req.envelope == {
        "tpdu": "6000010000", "header": "603100310000"}
    assert CARD_CUP.pan not in out.read_text()
    assert run_check_file(out) == {name: [] for name in run_check_file(out)}


def test_import_refuses_a_file_that_is_no_capture(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"definitely not a capture")
    done = gateway_cli("trace", "import", "--format", "pcap", "--port", "5000", str(junk), "-o", str(tmp_path / "o"))
    assert done.returncode == 1 and "cannot read" in done.stderr


# --- recorder ------------------------------------------------------------------------------------------


def test_recorder_counts_and_logs_drops_instead_of_waiting(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    drops: list[int] = []
    settings = RecorderSettings(tmp_path / "r.jsonl", {"terminal": "cup-pos"}, {"terminal": "cup"}, max_pending=2_000)
    recorder = Recorder(settings, on_drop=drops.append)
    recorder.start()
    body = Codec(CUP).encode(cup.purchase(IDENT, "000123", "000001", 1_000, track2=CARD_VISA.track2))
    conn = object()
    with caplog.at_level(logging.WARNING, logger="gateway.trace"):
        for _ in range(200):  # far more than 2,000 bytes at once: the buffer refuses instead of growing
            recorder.frame(Leg.TERMINAL, Direction.IN, conn, body, ENV)
    recorder.close()
    assert recorder.dropped > 0 and sum(drops) == recorder.dropped
    assert any("dropped" in r.message for r in caplog.records)
    frames = [r for r in read_trace(tmp_path / "r.jsonl")[1] if isinstance(r, FrameRecord)]
    assert len(frames) == 200 - recorder.dropped and frames[0].conn == "T1"
    assert CARD_VISA.pan not in (tmp_path / "r.jsonl").read_text()


def test_recorder_survives_a_dead_writer(tmp_path: Path) -> None:
    recorder = Recorder(RecorderSettings(tmp_path / "d.jsonl", {"terminal": "cup-pos"}, {"terminal": "cup"}))
    recorder.start()
    assert recorder._process is not None
    recorder._process.kill()
    recorder._process.wait()
    for _ in range(50):
        recorder.event(Leg.TERMINAL, object(), EventKind.CONNECT, "127.0.0.1:1")
    recorder.close()  # no exception, no hang: the records are counted as dropped
    assert recorder.dropped == 50 or recorder.written + recorder.dropped == 50


def test_writer_process_stream_roundtrip(tmp_path: Path) -> None:
    """The pipe protocol end to end without a gateway: frames and events in, masked JSON lines out."""
    from gateway.trace.pipe import HEAD, pack_event
    from gateway.trace.writer_process import run

    body = Codec(CUP).encode(cup.purchase(IDENT, "000123", "000001", 1_000, track2=CARD_CUP.track2))
    env = ENV.tpdu + ENV.header
    data = pack_event(1.0, 0, 1, EventKind.CONNECT, "127.0.0.1:9") + HEAD.pack(1, 1.5, 0, 0, 1, len(env), len(body)) \
        + env + body
    settings = {"path": str(tmp_path / "w.jsonl"), "dialects": {"terminal": "cup-pos"},
                "framings": {"terminal": "cup"}, "max_bytes": 1 << 20, "max_files": 2}
    assert run(settings, io.BufferedReader(io.BytesIO(data))) == 0  # type: ignore[arg-type]
    lines = (tmp_path / "w.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["trace", "event", "frame"]
    assert CARD_CUP.pan not in lines[2]
    assert json.loads(lines[2])["secrets"] == {"35": "track", "64": "mac"}
