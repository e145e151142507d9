"""Bad input to `gateway trace import` and `gateway trace check`: a clean message and exit code, never a
traceback, no half-written output, bounded memory, and no secret in what is printed. Real files, the
real CLI in a child process."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import dpkt
import pytest

from gateway.iso.build import TerminalIdent, cup
from gateway.iso.build.response import response
from gateway.iso.codec import Codec
from gateway.iso.framing import CupEnvelope, make_framer
from gateway.iso.spec import load_dialect
from gateway.lab import CARD_CUP, MERCHANT_ID
from gateway.trace.encoder import TraceEncoder
from gateway.trace.format import EventKind, EventRecord, FrameRecord, Leg, read_trace
from gateway.trace.importers import _Stream, pcap_records

IDENT = TerminalIdent("10000001", MERCHANT_ID)
ENV = CupEnvelope.from_hex("6000010000", "603100310000")
PAN = CARD_CUP.pan


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=60)


def assert_clean_failure(done: subprocess.CompletedProcess[str], out: Path, *words: str) -> None:
    assert done.returncode in (1, 2), (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr
    assert PAN not in done.stdout + done.stderr
    assert not out.exists(), "a failed import must not leave a partial trace behind"


# --- jPOS XML ------------------------------------------------------------------------------------------

JPOS_HEAD = f"""<log realm="channel/127.0.0.1:5000" at="2026-11-30T10:00:00.000">
  <receive>
    <isomsg direction="incoming">
      <field id="0" value="0200"/>
      <field id="2" value="{PAN}"/>
      <field id="3" value="000000"/>
"""


@pytest.mark.parametrize("body", [
    JPOS_HEAD + "<field id='4' value=",  # cut in the middle of a field
    JPOS_HEAD + "</receive></log>",  # mismatched tags
    "\x00\x01 not xml at all",
])
def test_jpos_import_of_malformed_xml_fails_cleanly(tmp_path: Path, body: str) -> None:
    src = tmp_path / "q2.log"
    src.write_text(body)
    out = tmp_path / "out.jsonl"
    done = gateway_cli("trace", "import", "--format", "jpos-xml", "--dialect", "iso87-ascii", "--framing",
                       "ascii4", str(src), "-o", str(out))
    assert_clean_failure(done, out, "cannot read", "XML")


@pytest.mark.parametrize("doctype", [
    # XXE: an external entity naming a local file
    '<!DOCTYPE log [ <!ENTITY xxe SYSTEM "file:///etc/hostname"> ]>',
    # billion laughs: nested internal entities
    '<!DOCTYPE log [ <!ENTITY a "aaaaaaaaaa"> <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
    ' <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"> <!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;"> ]>',
])
def test_jpos_import_refuses_dtds_and_entities(tmp_path: Path, doctype: str) -> None:
    src = tmp_path / "q2.log"
    src.write_text('<?xml version="1.0"?>\n' + doctype + "\n" + JPOS_HEAD.replace(PAN, "&xxe;&d;")
                   + "</isomsg></receive></log>\n")
    out = tmp_path / "out.jsonl"
    done = gateway_cli("trace", "import", "--format", "jpos-xml", "--dialect", "iso87-ascii", "--framing",
                       "ascii4", str(src), "-o", str(out))
    assert_clean_failure(done, out, "cannot read")


def test_jpos_import_keeps_no_finished_log_elements_in_memory(tmp_path: Path) -> None:
    """The synthetic root must not collect every (cleared) <log> of a long file."""
    import io

    entry = (JPOS_HEAD + '<field id="11" value="000001"/><field id="41" value="10000001"/></isomsg>'
             "</receive></log>\n")
    from xml.etree import ElementTree as ET

    from gateway.trace import importers

    roots: list[ET.Element] = []
    real = ET.XMLPullParser

    class Spy(real):  # type: ignore[misc,valid-type]
        def read_events(self):  # type: ignore[no-untyped-def]
            for event in super().read_events():
                if event[0] == "start" and not roots:
                    roots.append(event[1])
                yield event

    importers.ET.XMLPullParser = Spy  # type: ignore[misc]
    try:
        enc = TraceEncoder({"terminal": "iso87-ascii"}, {"terminal": "ascii4"}, lenient=True)
        records = list(importers.jpos_records(io.BytesIO(entry.encode() * 2000), enc, Leg.TERMINAL))
    finally:
        importers.ET.XMLPullParser = real  # type: ignore[misc]
    assert len(records) == 2000
    assert roots and len(roots[0]) <= 1, f"the root still holds {len(roots[0])} finished <log> elements"


# --- pcap ----------------------------------------------------------------------------------------------


def segment(sport: int, dport: int, seq: int, flags: int, data: bytes = b"") -> bytes:
    lo = socket.inet_aton("127.0.0.1")
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, ack=1, flags=flags, data=data)
    ip = dpkt.ip.IP(src=lo, dst=lo, p=dpkt.ip.IP_PROTO_TCP, data=tcp)
    ip.len = len(bytes(ip))
    return bytes(dpkt.ethernet.Ethernet(src=b"\x00" * 6, dst=b"\x00" * 6, type=dpkt.ethernet.ETH_TYPE_IP, data=ip))


def purchase_frames() -> list[bytes]:
    req = cup.purchase(IDENT, "000123", "000001", 1_000, track2=CARD_CUP.track2)
    framer = make_framer("cup")
    codec = Codec(load_dialect("cup-pos"))
    return [framer.encode(codec.encode(req), ENV),
            framer.encode(codec.encode(response(req, "00", "cup-pos", field_37="123456789012")), ENV.reply())]


def write_capture(path: Path, packets: list[bytes]) -> None:
    with path.open("wb") as f:
        writer = dpkt.pcap.Writer(f)
        for i, pkt in enumerate(packets):
            writer.writepkt(pkt, ts=1_764_500_000 + i / 100)


def test_pcap_import_of_a_truncated_capture_keeps_what_was_read(tmp_path: Path) -> None:
    """tcpdump killed mid-write leaves half a packet record at the end: the whole packets are imported
    and the truncation is said, not a traceback."""
    req, ans = purchase_frames()
    cap = tmp_path / "cut.pcap"
    write_capture(cap, [segment(40000, 5000, 1000, dpkt.tcp.TH_SYN), segment(40000, 5000, 1001, dpkt.tcp.TH_ACK, req),
                        segment(5000, 40000, 5001, dpkt.tcp.TH_ACK, ans)])
    cap.write_bytes(cap.read_bytes() + b"\x00" * 9)  # the start of a packet header, then nothing
    out = tmp_path / "cut.jsonl"
    done = gateway_cli("trace", "import", "--format", "pcap", "--port", "5000", str(cap), "-o", str(out))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "truncated" in done.stderr
    assert [r.mti for r in read_trace(out)[1] if isinstance(r, FrameRecord)] == ["0200", "0210"]


@pytest.mark.parametrize("content", [b"", b"\xd4\xc3\xb2\xa1\x02\x00", b"\x0a\x0d\x0d\x0a\x00"],
                         ids=["empty", "pcap-header-cut", "pcapng-header-cut"])
def test_pcap_import_of_a_cut_header_fails_cleanly(tmp_path: Path, content: bytes) -> None:
    cap = tmp_path / "bad.pcap"
    cap.write_bytes(content)
    out = tmp_path / "bad.jsonl"
    done = gateway_cli("trace", "import", "--format", "pcap", "--port", "5000", str(cap), "-o", str(out))
    assert_clean_failure(done, out, "cannot read")


def test_pcap_gap_is_reported_and_bounded_not_a_silent_loss(tmp_path: Path) -> None:
    """A segment the capture lost (tcpdump drops) can never be filled: the stream says so with an event
    and stops holding segments, instead of holding them (memory) and dropping everything after in
    silence."""
    req, _ = purchase_frames()
    packets = [segment(40000, 5000, 1000, dpkt.tcp.TH_SYN)]
    seq = 1001 + 10  # the first 10 bytes were never captured
    for _ in range(3000):
        packets.append(segment(40000, 5000, seq, dpkt.tcp.TH_ACK, req))
        seq += len(req)
    cap = tmp_path / "gap.pcap"
    write_capture(cap, packets)
    enc = TraceEncoder({"terminal": "cup-pos"}, {"terminal": "cup"}, lenient=True)
    with cap.open("rb") as f:
        records = list(pcap_records(f, enc, Leg.TERMINAL, 5000))
    events = [r for r in records if isinstance(r, EventRecord) and r.event is EventKind.UNDECODABLE]
    assert events and "gap" in events[0].detail, records[:3]


def test_held_segments_are_bounded_by_bytes() -> None:
    stream = _Stream(make_framer("cup", 0xFFFF).decoder(), next_seq=0)
    for i in range(2000):
        stream.segment(100 + i * 60_000, b"x" * 60_000, False)  # never in order: all held
        assert sum(len(c) for c in stream.held.values()) <= 8 * 1024 * 1024
    assert stream.gap


# --- trace check ---------------------------------------------------------------------------------------

HEADER = '{"kind":"trace","version":1,"dialects":{"terminal":"%s"},"framings":{"terminal":"%s"}}\n'


@pytest.mark.parametrize("content", [
    (HEADER % ("cup-pos", "cup")).encode() + b"\xff\xfe not utf-8\n",
    b"\xff\xfe" + (HEADER % ("cup-pos", "cup")).encode(),
    (HEADER % ("no-such-dialect", "cup")).encode(),
    (HEADER % ("cup-pos", "no-such-framing")).encode(),
    b'{"kind":"trace","version":1,"dialects":["cup-pos"],"framings":{"terminal":"cup"}}\n',
], ids=["bad-utf8-record", "bad-utf8-header", "unknown-dialect", "unknown-framing", "dialects-not-a-table"])
def test_check_of_a_bad_trace_fails_cleanly(tmp_path: Path, content: bytes) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_bytes(content)
    done = gateway_cli("trace", "check", str(trace))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "gateway trace check:" in done.stderr


# --- the output of an import ---------------------------------------------------------------------------


def hex_dump(tmp_path: Path) -> Path:
    req = Codec(load_dialect("cup-pos")).encode(cup.purchase(IDENT, "000001", "000001", 1000, pan=PAN))
    dump = tmp_path / "frames.txt"
    dump.write_text(make_framer("cup").encode(req, ENV).hex() + "\n")
    return dump


def test_import_into_its_own_input_is_refused_and_the_input_kept(tmp_path: Path) -> None:
    dump = hex_dump(tmp_path)
    before = dump.read_bytes()
    done = gateway_cli("trace", "import", "--format", "hex", str(dump), "-o", str(dump))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "is the input" in done.stderr, done.stderr
    assert dump.read_bytes() == before


def test_a_failed_import_leaves_an_existing_trace_of_that_name_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "trace.jsonl"
    done = gateway_cli("trace", "import", "--format", "hex", str(hex_dump(tmp_path)), "-o", str(out))
    assert done.returncode == 0, done.stderr
    kept = out.read_bytes()
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"\xd4\xc3\xb2\xa1\x02\x00")  # a cut capture header
    done = gateway_cli("trace", "import", "--format", "pcap", "--port", "5000", str(bad), "-o", str(out))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert out.read_bytes() == kept, "the earlier trace was truncated or deleted by a failed import"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("trace.jsonl")] == ["trace.jsonl"]
