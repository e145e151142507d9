"""`trace check` keeps bounded state on a long trace whose flows all differ (new STANs, times, amounts), as
a real recording does: what is done with is let go, what waits is let go after `window` seconds of trace
time, and what is kept long (originals for reversals) is kept small."""

from __future__ import annotations

import sys

from gateway.iso.build import TerminalIdent, cup, iso87
from gateway.iso.build.response import response
from gateway.iso.codec import Codec
from gateway.iso.framing import CupEnvelope
from gateway.iso.spec import load_dialect
from gateway.lab import CARD_CUP, MERCHANT_ID
from gateway.trace.check import Checker, CheckOptions
from gateway.trace.encoder import TraceEncoder
from gateway.trace.format import Direction, EventKind, Leg

CUP, ISO = Codec(load_dialect("cup-pos")), Codec(load_dialect("iso87-ascii"))
ENV = CupEnvelope.from_hex("6000010000", "603100310000")
FLOWS = 600
WINDOW = 5.0


def test_checker_state_stays_bounded_over_many_distinct_flows() -> None:
    enc = TraceEncoder({"terminal": "cup-pos", "host": "iso87-ascii"}, {"terminal": "cup", "host": "len2"},
                       lenient=True)
    checker = Checker(enc.header("test", ""), CheckOptions(window=WINDOW))
    biggest: dict[str, int] = {}
    for i in range(FLOWS):
        t = 1_796_000_000.0 + i  # one flow a second: the window holds about 5
        ident = TerminalIdent(f"{10000001 + i % 7:08d}", MERCHANT_ID)
        stan, host_stan = f"{i + 1:06d}", f"{i + 500:06d}"
        t_req = cup.purchase(ident, stan, "000001", 1_000 + i, track2=CARD_CUP.track2)
        h_req = iso87.purchase(ident, host_stan, f"1202{i // 3600 % 24:02d}{i // 60 % 60:02d}{i % 60:02d}", "1234",
                               1_000 + i, track2=CARD_CUP.track2.replace("D", "="))
        records = [enc.frame(t, Leg.TERMINAL, Direction.IN, "T1", CUP.encode(t_req), ENV),
                   enc.frame(t + 0.1, Leg.HOST, Direction.OUT, "H1", ISO.encode(h_req))]
        if i % 3 == 0:  # a host timeout: the terminal gets 98, the answer comes late
            records += [enc.event(t + 0.2, Leg.HOST, "H1", EventKind.TIMEOUT, f"class=020 11={host_stan} 41="
                                  f"{ident.terminal_id}"),
                        enc.frame(t + 0.3, Leg.TERMINAL, Direction.OUT, "T1",
                                  CUP.encode(response(t_req, "98", "cup-pos")), ENV.reply())]
        elif i % 3 == 1:  # the terminal request is never answered nor timed out (the recording stops short)
            pass
        else:
            records += [enc.frame(t + 0.2, Leg.HOST, Direction.IN, "H1",
                                  ISO.encode(response(h_req, "05", "iso87-ascii", field_37=f"{i:012d}"))),
                        enc.frame(t + 0.3, Leg.TERMINAL, Direction.OUT, "T1",
                                  CUP.encode(response(t_req, "05", "cup-pos", field_37=f"{i:012d}")), ENV.reply())]
        for rec in records:
            checker.feed(rec)
        checker._expire(checker._now - WINDOW)  # as feed() does every 256 frames
        for name in ("_open_order", "_timed_out", "_links", "_approvals"):
            biggest[name] = max(biggest.get(name, 0), len(getattr(checker, name)))
        biggest["_awaiting_upstream"] = max(biggest.get("_awaiting_upstream", 0),
                                            sum(len(v) for v in checker._awaiting_upstream.values()))
    limit = 3 * WINDOW + 5
    assert all(size <= limit for size in biggest.values()), biggest
    # originals are kept by count, for reversals that come long after: small entries, no records in them
    for name in ("_host_originals", "_terminal_originals"):
        store = getattr(checker, name)
        assert len(store) == FLOWS
        key, value = next(iter(store.items()))
        assert sys.getsizeof(key) + sys.getsizeof(value) <= 64, (name, key, value)


def test_open_requests_are_capped_by_max_entries_even_without_time_passing() -> None:
    enc = TraceEncoder({"terminal": "cup-pos"}, {"terminal": "cup"}, lenient=True)
    checker = Checker(enc.header("test", ""), CheckOptions(max_entries=50))
    ident = TerminalIdent("10000001", MERCHANT_ID)
    for i in range(300):  # every record at the same instant: nothing ever leaves the window
        req = cup.purchase(ident, f"{i + 1:06d}", "000001", 1_000, track2=CARD_CUP.track2)
        checker.feed(enc.frame(1.0, Leg.TERMINAL, Direction.IN, "T1", CUP.encode(req), ENV))
        assert len(checker._open_order) <= 50
    pairing = next(c for c in checker.results() if c.name.startswith("pairing"))
    assert pairing.findings  # the requests let go early are still reported as unanswered


def test_requests_done_with_are_let_go_within_the_window_too() -> None:
    # the default window (600 s) holds every flow of this trace: what bounds the state here is that a
    # terminal request linked upstream, or answered, is no longer kept for a later `cause` to name
    enc = TraceEncoder({"terminal": "cup-pos", "host": "iso87-ascii"}, {"terminal": "cup", "host": "len2"},
                       lenient=True)
    checker = Checker(enc.header("test", ""))
    biggest = 0
    for i in range(300):
        t = 1_796_000_000.0 + i
        ident = TerminalIdent("10000001", MERCHANT_ID)
        stan, host_stan = f"{i + 1:06d}", f"{i + 500:06d}"
        t_req = cup.purchase(ident, stan, "000001", 1_000 + i, track2=CARD_CUP.track2)
        refused_here = i % 2 == 1  # refused locally: never goes upstream
        records = [enc.frame(t, Leg.TERMINAL, Direction.IN, "T1", CUP.encode(t_req), ENV)]
        if not refused_here:
            h_req = iso87.purchase(ident, host_stan, f"1202{i // 3600 % 24:02d}{i // 60 % 60:02d}{i % 60:02d}",
                                   "1234", 1_000 + i, track2=CARD_CUP.track2.replace("D", "="))
            records += [enc.frame(t + 0.1, Leg.HOST, Direction.OUT, "H1", ISO.encode(h_req)),
                        enc.frame(t + 0.2, Leg.HOST, Direction.IN, "H1",
                                  ISO.encode(response(h_req, "05", "iso87-ascii", field_37=f"{i:012d}")))]
        records.append(enc.frame(t + 0.3, Leg.TERMINAL, Direction.OUT, "T1",
                                 CUP.encode(response(t_req, "61" if refused_here else "05", "cup-pos")),
                                 ENV.reply()))
        for rec in records:
            checker.feed(rec)
        biggest = max(biggest, len(checker._link_by_seq), len(checker._links))
    assert biggest <= 2, biggest
