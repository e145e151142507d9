"""Importers: what teams already have → trace records (masked like every trace), streamed.

* `hex_records` — one frame per line, as hex: framed (with the framing's length prefix, and the CUP
  TPDU + header) or a bare message body. An optional first word `in`/`out` (or `>`/`<`) gives the
  direction; otherwise a request goes towards the SUT and an answer from it. `#` starts a comment.
* `jpos_records` — jPOS XML logs: `<log realm=.. at=..><send|receive><isomsg><field id= value=
  [type="binary"]/>`. `receive` is a message the logging system (the SUT) got, `send` one it sent.
  ProtectedLogListener's masked values are recognised: protected strings ("400001____0001", "__" in
  tracks), wiped strings ("[WIPED]") and wiped binaries ("AA55AA55"). A masked field becomes a
  placeholder of a valid form (a surrogate for PANs and tracks) and is listed in the record's
  `masked`. Nested `<isomsg id=..>` (a sub-packager's composite field) cannot be re-packed without that
  packager: it becomes a masked placeholder too.
* `pcap_records` — pcap or pcapng (read with dpkt): TCP segments of the given port reassembled per
  connection and direction (retransmissions and overlaps trimmed, out-of-order segments held), then
  cut into frames by our own framers (which know the CUP TPDU + header). SYN/FIN/RST become
  connect/close events; a framing error becomes an undecodable event and that direction stops.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Final
from xml.etree import ElementTree as ET

from gateway.iso.errors import FramingError
from gateway.iso.framing import CupEnvelope, FrameDecoder
from gateway.iso.message import Message
from gateway.iso.mti import is_request
from gateway.iso.spec import load_dialect, wire_len
from gateway.trace.codecs import make_trace_framer
from gateway.trace.encoder import TraceEncoder
from gateway.trace.format import Direction, EventKind, Leg, Record

log = logging.getLogger("gateway.trace.import")


class ImportFormatError(ValueError):
    """An input that is not what its --format says (malformed XML, a cut capture header, ...)."""


#: what an outgoing CUP frame carries when a dump gave only the body
DEFAULT_ENVELOPE: Final = CupEnvelope.from_hex("6000000000", "603100000000")
JPOS_WIPED: Final = "[WIPED]"
JPOS_BINARY_WIPED: Final = "AA55AA55"
_JPOS_MASK: Final = "_"


def _sut_direction(leg: Leg, mti: str) -> Direction:
    """With nothing else to go on: requests travel towards the SUT on the terminal leg, from it on the
    host leg (the SUT is the terminals' server and the host's client)."""
    request = is_request(mti) if len(mti) == 4 and mti.isdigit() else True
    return (Direction.IN if request else Direction.OUT) if leg is Leg.TERMINAL else (
        Direction.OUT if request else Direction.IN)


# --- hex --------------------------------------------------------------------------------------------


def hex_records(lines: Iterable[str], encoder: TraceEncoder, leg: Leg) -> Iterator[Record]:
    framing = encoder.framings[leg.value]
    framer = make_trace_framer(framing)
    codec = encoder.codec(leg)
    conn = "T1" if leg is Leg.TERMINAL else "H1"
    for lineno, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        direction: Direction | None = None
        if words[0].lower() in ("in", ">", "out", "<"):
            direction = Direction.IN if words.pop(0).lower() in ("in", ">") else Direction.OUT
        t = lineno / 1000.0
        try:
            data = bytes.fromhex("".join(words))
        except ValueError:
            yield encoder.event(t, leg, conn, EventKind.UNDECODABLE, f"line {lineno}: not hex")
            continue
        body, envelope = _unframe(data, framer.decoder())
        if framing == "cup" and envelope is None:
            envelope = DEFAULT_ENVELOPE
        try:
            mti = codec.decode(body).mti
        except Exception:  # the encoder records it as undecodable below
            mti = ""
        yield encoder.frame(t, leg, direction or _sut_direction(leg, mti), conn, body, envelope)


def _unframe(data: bytes, decoder: FrameDecoder) -> tuple[bytes, CupEnvelope | None]:
    """The body (and envelope) when `data` is exactly one framed message; else `data` as a bare body."""
    try:
        frames = decoder.feed(data)
    except FramingError:
        return data, None
    if len(frames) == 1 and decoder.buffered == 0 and not decoder.failed:
        return frames[0].body, frames[0].envelope
    return data, None


# --- jPOS XML ---------------------------------------------------------------------------------------


def _placeholder(dialect_name: str, key: str, masked_text: str) -> str:
    """A value of a valid form for a field the source masked or wiped."""
    dialect = load_dialect(dialect_name)
    spec = dialect.spec.get(key)
    fmt = dialect.formats.get(key, "ans")
    if spec is None:
        return masked_text
    fixed = wire_len(spec) if not spec["len_type"] else None
    if fmt == "b":
        n = spec["max_len"] * (2 if spec["data_enc"] == "b" else 1) if fixed is not None else 2
        return "0" * n
    if fmt in ("n", "z", "xn"):
        digits = masked_text.replace(_JPOS_MASK, "0") if masked_text != JPOS_WIPED else ""
        if fixed is not None:
            n = spec["max_len"]
            if fmt == "xn":
                return "C" + "0" * (n - 1)
            return digits if len(digits) == n and _valid(fmt, digits) else "0" * n
        return digits if digits and _valid(fmt, digits) else "0"
    if fixed is not None:
        return masked_text.ljust(spec["max_len"])[: spec["max_len"]]
    return masked_text


def _valid(fmt: str, value: str) -> bool:
    return value.replace("D", "").replace("=", "").isdigit() if fmt == "z" else value.isdigit()


_JPOS_TIME_FORMATS: Final = ("%a %b %d %H:%M:%S %Z %Y", "%a %b %d %H:%M:%S %Y")


def _jpos_time(text: str, fallback: float) -> float:
    if not text:
        return fallback
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        pass
    for fmt in _JPOS_TIME_FORMATS:
        try:
            return datetime.strptime(re.sub(r"\s+", " ", text.strip()), fmt).timestamp()
        except ValueError:
            continue
    return fallback


def jpos_records(stream: IO[bytes], encoder: TraceEncoder, leg: Leg) -> Iterator[Record]:
    """Streams the XML (a jPOS log file is a sequence of <log> elements, so it is parsed inside a
    synthetic root); each finished <log> is turned into a record and dropped from the tree.

    A DTD cannot follow the synthetic root's start tag, so a file with one (external entities: XXE;
    nested entities: billion laughs) is refused as malformed before any entity is declared; expat also
    limits entity amplification itself. Malformed XML raises `ImportFormatError`."""
    dialect_name = encoder.dialects[leg.value]
    framing = encoder.framings[leg.value]
    conns: dict[str, str] = {}
    prefix = "T" if leg is Leg.TERMINAL else "H"
    parser: Any = ET.XMLPullParser(events=("start", "end"))
    root: ET.Element | None = None
    parser.feed(b"<jpos-import>")
    count = 0
    fed_all = False
    while not fed_all:
        chunk = stream.read(1 << 16)
        try:
            if chunk:
                parser.feed(_strip_xml_declaration(chunk) if count == 0 else chunk)
            else:
                parser.feed(b"</jpos-import>")
                fed_all = True
            events = list(parser.read_events())
        except ET.ParseError as exc:
            raise ImportFormatError(f"not well-formed XML ({exc}; DTDs and entities are refused)") from None
        count += 1
        for kind, found in events:
            if kind == "start":
                if root is None and isinstance(found, ET.Element):
                    root = found
                continue
            elem = found if isinstance(found, ET.Element) else None
            if elem is None or elem.tag != "log":
                continue
            realm = elem.get("realm", "")
            conn = conns.get(realm)
            if conn is None:
                conn = conns[realm] = f"{prefix}{len(conns) + 1}"
            t = _jpos_time(elem.get("at", ""), float(encoder.seq + 1))
            for child in elem:
                if child.tag not in ("send", "receive"):
                    continue
                isomsg = child.find("isomsg")
                if isomsg is None:
                    continue
                direction = Direction.OUT if child.tag == "send" else Direction.IN
                mti, fields, masked = _jpos_fields(isomsg, dialect_name)
                if not mti:
                    yield encoder.event(t, leg, conn, EventKind.UNDECODABLE, "isomsg without field 0 (MTI)")
                    continue
                envelope = DEFAULT_ENVELOPE if framing == "cup" else None
                yield encoder.message(t, leg, direction, conn, Message(mti, fields), envelope, tuple(masked))
            elem.clear()
            if root is not None:
                with contextlib.suppress(ValueError):  # a <log> nested deeper is not the root's
                    root.remove(elem)  # finished: the synthetic root would otherwise keep every <log>


def _strip_xml_declaration(chunk: bytes) -> bytes:
    """A file's own <?xml ...?> cannot follow our synthetic root element."""
    text = chunk.lstrip()
    if text.startswith(b"<?xml"):
        end = text.find(b"?>")
        return text[end + 2 :] if end >= 0 else text
    return chunk


def _jpos_fields(isomsg: ET.Element, dialect_name: str) -> tuple[str, dict[str, str], list[str]]:
    dialect = load_dialect(dialect_name)
    mti = ""
    fields: dict[str, str] = {}
    masked: list[str] = []
    for child in isomsg:
        key = child.get("id", "")
        if child.tag == "isomsg" and key.isdigit():
            fields[key] = _placeholder(dialect_name, key, JPOS_WIPED)
            masked.append(key)
            continue
        if child.tag != "field" or not key.isdigit():
            continue
        value = child.get("value", "")
        if key == "0":
            mti = value
            continue
        if key == "1" or key not in dialect.formats:
            continue
        binary = child.get("type") == "binary"
        if value == JPOS_WIPED or (binary and value.upper() == JPOS_BINARY_WIPED) or (
                _JPOS_MASK in value and dialect.formats[key] in ("n", "z", "b")):
            fields[key] = _placeholder(dialect_name, key, value)
            masked.append(key)
            continue
        fields[key] = value.upper() if binary or dialect.formats[key] == "b" else value
    return mti, fields, masked


# --- pcap -------------------------------------------------------------------------------------------


#: bytes of out-of-order segments one direction may hold while waiting for a missing one: past this the
#: missing bytes are taken as lost by the capture (a gap), and the direction is no longer decoded
MAX_HELD_BYTES: Final = 4 * 1024 * 1024


@dataclass(slots=True)
class _Stream:
    """One direction of one TCP connection: reassembly to in-order bytes, then framing."""

    decoder: FrameDecoder
    next_seq: int | None = None
    held: dict[int, bytes] = field(default_factory=dict)  #: out-of-order segments by sequence number
    held_bytes: int = 0
    failed: bool = False
    gap: bool = False  #: bytes the capture never had: what follows cannot be framed

    def segment(self, seq: int, data: bytes, syn: bool) -> bytes:
        if syn:
            self.next_seq = (seq + 1) & 0xFFFFFFFF
            return b""
        if self.next_seq is None:  # the capture started mid-connection
            self.next_seq = seq
        if self.gap:
            return b""
        out = bytearray()
        if data and seq not in self.held:
            self.held[seq] = data
            self.held_bytes += len(data)
        while True:
            nxt = self.next_seq
            hit = next((s for s, chunk in self.held.items()
                        if _seq_le(s, nxt) and _seq_lt(nxt, (s + len(chunk)) & 0xFFFFFFFF)), None)
            if hit is None:
                break
            chunk = self.held.pop(hit)
            self.held_bytes -= len(chunk)
            skip = (nxt - hit) & 0xFFFFFFFF
            out += chunk[skip:]
            self.next_seq = (hit + len(chunk)) & 0xFFFFFFFF
        # drop what lies wholly before next_seq (retransmissions)
        for s in [s for s in self.held if _seq_le((s + len(self.held[s])) & 0xFFFFFFFF, self.next_seq or 0)]:
            self.held_bytes -= len(self.held.pop(s))
        if self.held_bytes > MAX_HELD_BYTES or len(self.held) > 1024:
            self.held.clear()
            self.held_bytes = 0
            self.gap = True
        return bytes(out)


def _seq_lt(a: int, b: int) -> bool:
    return ((b - a) & 0xFFFFFFFF) < 0x80000000 and a != b


def _seq_le(a: int, b: int) -> bool:
    return a == b or _seq_lt(a, b)


def _ip_text(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


def _tcp_of(dpkt: Any, link: int, buf: bytes) -> tuple[Any, Any] | None:
    """(IP packet, TCP segment) of a captured packet, for the link types loopback captures use."""
    try:
        if link == dpkt.pcap.DLT_EN10MB:
            ip = dpkt.ethernet.Ethernet(buf).data
        elif link in (dpkt.pcap.DLT_NULL, dpkt.pcap.DLT_LOOP):
            ip = dpkt.loopback.Loopback(buf).data
        elif link == dpkt.pcap.DLT_LINUX_SLL:
            ip = dpkt.sll.SLL(buf).data
        elif link in (dpkt.pcap.DLT_RAW, 228, 229):  # raw IP, IPv4, IPv6
            ip = dpkt.ip.IP(buf) if buf[:1] and buf[0] >> 4 == 4 else dpkt.ip6.IP6(buf)
        else:
            return None
    except (dpkt.UnpackError, IndexError, ValueError):
        return None
    tcp = getattr(ip, "data", None)
    if not isinstance(tcp, dpkt.tcp.TCP):
        return None
    return ip, tcp


def _open_capture(dpkt: Any, stream: IO[bytes]) -> Any:
    head = stream.read(4)
    stream.seek(0)
    try:
        if head == b"\x0a\x0d\x0d\x0a":
            return dpkt.pcapng.Reader(stream)
        return dpkt.pcap.Reader(stream)
    except (dpkt.UnpackError, ValueError) as exc:
        raise ImportFormatError(f"not a pcap or pcapng capture ({exc})") from None


def _packets(dpkt: Any, reader: Any) -> Iterator[tuple[float, bytes]]:
    """The capture's packets; a capture cut short (tcpdump killed mid-write) ends at its last whole one."""
    count = 0
    packets = iter(reader)
    while True:
        try:
            ts, buf = next(packets)
        except StopIteration:
            return
        except dpkt.NeedData:
            log.warning("the capture is truncated after %d packets: the rest is not imported", count)
            return
        except (dpkt.UnpackError, ValueError) as exc:
            raise ImportFormatError(f"capture unreadable after {count} packets ({exc})") from None
        count += 1
        yield ts, buf


def pcap_records(stream: IO[bytes], encoder: TraceEncoder, leg: Leg, port: int) -> Iterator[Record]:
    """`port` is the server's port: the SUT's terminal port (leg terminal) or the host's (leg host)."""
    import dpkt  # imported only for pcap imports

    if not stream.seekable():
        stream = io.BytesIO(stream.read())
    reader = _open_capture(dpkt, stream)
    link = reader.datalink()
    framing = encoder.framings[leg.value]
    prefix = "T" if leg is Leg.TERMINAL else "H"
    #: client (ip, port) → connection label, and per-direction streams
    conns: dict[tuple[str, int], str] = {}
    streams: dict[tuple[str, int, bool], _Stream] = {}
    to_server_dir = Direction.IN if leg is Leg.TERMINAL else Direction.OUT
    from_server_dir = Direction.OUT if leg is Leg.TERMINAL else Direction.IN
    closed: set[str] = set()
    for ts, buf in _packets(dpkt, reader):
        parsed = _tcp_of(dpkt, link, buf)
        if parsed is None:
            continue
        ip, tcp = parsed
        if tcp.dport == port:
            client, to_server = (_ip_text(ip.src), tcp.sport), True
        elif tcp.sport == port:
            client, to_server = (_ip_text(ip.dst), tcp.dport), False
        else:
            continue
        t = float(ts)
        syn = bool(tcp.flags & dpkt.tcp.TH_SYN)
        conn = conns.get(client)
        if conn is None or (syn and to_server and not tcp.flags & dpkt.tcp.TH_ACK and conn in closed):
            if not syn and not tcp.data:
                continue  # stray ACKs of a connection whose start is not in the capture
            conn = conns[client] = f"{prefix}{len(conns) + 1}"
            streams.pop((*client, True), None)
            streams.pop((*client, False), None)
            yield encoder.event(t, leg, conn, EventKind.CONNECT, f"{client[0]}:{client[1]}")
        key = (*client, to_server)
        st = streams.get(key)
        if st is None:
            st = streams[key] = _Stream(make_trace_framer(framing).decoder())
        data = st.segment(tcp.seq, bytes(tcp.data), syn)
        if st.gap and not st.failed:
            st.failed = True
            direction = to_server_dir if to_server else from_server_dir
            yield encoder.event(t, leg, conn, EventKind.UNDECODABLE, f"{direction.value}: a gap in the capture "
                                "(bytes it never had): the rest of this direction is not decoded")
        if data and not st.failed:
            try:
                frames = st.decoder.feed(data)
            except FramingError as exc:
                frames = []
                st.failed = True
                yield encoder.event(t, leg, conn, EventKind.UNDECODABLE, str(exc))
            for frame in frames:
                yield encoder.frame(t, leg, to_server_dir if to_server else from_server_dir, conn, frame.body,
                                    frame.envelope)
            if st.decoder.failed and not st.failed:
                st.failed = True
                yield encoder.event(t, leg, conn, EventKind.UNDECODABLE, "framing error after whole frames")
        if tcp.flags & (dpkt.tcp.TH_FIN | dpkt.tcp.TH_RST) and conn not in closed:
            closed.add(conn)
            side = "client" if to_server else "server"
            why = f"reset by the {side}" if tcp.flags & dpkt.tcp.TH_RST else f"closed by the {side}"
            yield encoder.event(t, leg, conn, EventKind.CLOSE, why)


def open_input(path: Path) -> IO[bytes]:
    return path.open("rb")
