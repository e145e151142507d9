"""Promises of the compare engine and `trace diff` that mutation testing found unchecked (issue 16):
what a conformance engineer reads off a diff — a case only one trace has, an answer or upstream
request only one side has, a changed field on either leg — is reported, with the case, the leg, the
field and the rule, and a pass is never claimed for it; secret values never appear."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.trace.compare import Comparison, Seen, Where, _difference, compare, flow_of, message_key, show
from gateway.trace.diff import DiffStats, diff
from gateway.trace.format import SecretKind
from gateway.trace.report import CaseResult, CaseSink, Finding, FindingKind
from gateway.trace.rules import (
    Captures,
    Check,
    MessageKey,
    Mode,
    RulesError,
    RuleSet,
    parse_entries,
    parse_rule,
)
from gateway.trace.rulesfile import load_rules
from tests.test_trace_rules import ANSWER, REQUEST, run

ROOT = Path(__file__).resolve().parents[1]
SESSION = ROOT / "examples" / "replay" / "session.jsonl"

Edit = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


def records() -> list[dict[str, Any]]:
    return [json.loads(line) for line in SESSION.read_text().splitlines()]


def write(path: Path, recs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def run_diff(tmp: Path, edit_b: Edit | None = None, edit_a: Edit | None = None,
             rules: Path | None = None, horizon: float = 30.0) -> tuple[CaseSink, DiffStats, list[CaseResult]]:
    a = write(tmp / "a.jsonl", (edit_a or (lambda r: r))(records()))
    b = write(tmp / "b.jsonl", (edit_b or (lambda r: r))(records()))
    sink = CaseSink("diff")
    stats = diff(a, b, load_rules(rules), sink, horizon=horizon)
    return sink, stats, sink.failures


def is_frame(r: dict[str, Any], leg: str, mti: str, stan: str | None = None, tid: str | None = None) -> bool:
    return (r.get("kind") == "frame" and r["leg"] == leg and r["mti"] == mti
            and (stan is None or r["fields"].get("11") == stan) and (tid is None or r["fields"].get("41") == tid))


def drop(pred: Callable[[dict[str, Any]], bool]) -> Edit:
    return lambda recs: [r for r in recs if not pred(r)]


def change(pred: Callable[[dict[str, Any]], bool], **fields: str) -> Edit:
    def edit(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for r in recs:
            if pred(r):
                r["fields"].update(fields)
                r.pop("wire", None)
        return recs
    return edit


#: T2's second purchase and the upstream request the SUT made of it (host stan 000009)
T2_SALE = "T2 10000002 stan 000004 0200 purchase"


def t2_sale(r: dict[str, Any]) -> bool:
    return (is_frame(r, "terminal", "0200", "000004", "10000002") or is_frame(r, "terminal", "0210", "000004",
                                                                              "10000002")
            or is_frame(r, "host", "0200", "000009") or is_frame(r, "host", "0210", "000009"))


# --- trace diff: cases, answers and upstream requests only one side has -------------------------------


def test_a_trace_diffed_with_itself_passes_every_case(tmp_path: Path) -> None:
    sink, stats, failures = run_diff(tmp_path)
    assert failures == [] and sink.ok
    assert (stats.cases_a, stats.cases_b, stats.paired, sink.total) == (15, 15, 15, 15)
    assert 1 <= stats.held_max <= 15


def test_a_case_only_in_a_is_missing_and_only_in_b_is_unexpected(tmp_path: Path) -> None:
    sink, stats, failures = run_diff(tmp_path, edit_b=drop(t2_sale))
    assert (stats.cases_a, stats.cases_b, stats.paired) == (15, 14, 14)
    assert sink.total == 15 and sink.failed == 1 and not sink.ok
    [case] = failures
    [f] = case.findings
    assert case.name == T2_SALE
    assert f.kind is FindingKind.MISSING_FRAME and f.message == f"{T2_SALE}: only in A (a.jsonl); B has no such case"
    assert (f.terminal, f.stan, f.mti) == ("10000002", "000004", "0200") and f.seq is not None

    sink, stats, failures = run_diff(tmp_path, edit_a=drop(t2_sale))
    assert (stats.cases_a, stats.cases_b, stats.paired) == (14, 15, 14)
    [case] = failures
    [f] = case.findings
    assert f.kind is FindingKind.UNEXPECTED_FRAME and f.message == f"{T2_SALE}: only in B (b.jsonl); A has no such case"
    assert (f.terminal, f.stan, f.mti) == ("10000002", "000004", "0200")


def test_a_terminal_answer_only_one_side_has_is_named(tmp_path: Path) -> None:
    no_answer = drop(lambda r: is_frame(r, "terminal", "0210", "000004", "10000002"))
    sink, _, failures = run_diff(tmp_path, edit_b=no_answer)
    assert not sink.ok
    assert [c.name for c in failures] == [T2_SALE]
    kinds = [(f.kind, f.leg, f.mti) for f in failures[0].findings]
    assert (FindingKind.MISSING_FRAME, "terminal", "0210") in kinds
    assert any(f.message == f"{T2_SALE}: terminal 0210 answer to 0200 in only A" for f in failures[0].findings)

    _, _, failures = run_diff(tmp_path, edit_a=no_answer)
    assert [c.name for c in failures] == [T2_SALE]
    assert any(f.kind is FindingKind.UNEXPECTED_FRAME and f.message == f"{T2_SALE}: terminal 0210 answer to 0200 "
               "in only B" and (f.terminal, f.stan) == ("10000002", "000004") for f in failures[0].findings)


def test_an_upstream_request_only_one_side_has_is_named(tmp_path: Path) -> None:
    no_upstream = drop(lambda r: is_frame(r, "host", "0200", "000009") or is_frame(r, "host", "0210", "000009"))
    _, _, failures = run_diff(tmp_path, edit_b=no_upstream)
    assert [c.name for c in failures] == [T2_SALE]
    [f] = [f for f in failures[0].findings if f.leg == "host"]
    assert f.kind is FindingKind.MISSING_FRAME and (f.mti, f.terminal) == ("0200", "10000002")
    assert f.message == f"{T2_SALE}: B has no upstream 0200 where A has one (A's host stan 000009)"

    _, _, failures = run_diff(tmp_path, edit_a=no_upstream)
    assert [c.name for c in failures] == [T2_SALE]
    [f] = [f for f in failures[0].findings if f.leg == "host"]
    assert f.kind is FindingKind.UNEXPECTED_FRAME and (f.mti, f.terminal) == ("0200", "10000002")
    assert f.message == f"{T2_SALE}: B has an upstream 0200 A does not have (B's host stan 000009)"
    assert f.seq == next(r["seq"] for r in records() if is_frame(r, "host", "0200", "000009"))  # B's frame


def test_a_changed_field_of_the_upstream_answer_names_the_host_leg(tmp_path: Path) -> None:
    answer = change(lambda r: is_frame(r, "host", "0210", "000009"), **{"39": "05"})
    sink, _, failures = run_diff(tmp_path, edit_b=answer)
    assert sink.failed == 1 and [c.name for c in failures] == [T2_SALE]
    [f] = failures[0].findings
    b_answer = next(r for r in records() if is_frame(r, "host", "0210", "000009"))
    assert f.seq == b_answer["seq"]  # B's frame, to look it up in B
    assert (f.leg, f.mti, f.field, f.expected, f.got, f.rule) == ("host", "0210", "39", "'00'", "'05'", "same")
    assert f.message.startswith(f"{T2_SALE}: host 0210 field 39: expected '00', got '05'")


def test_a_changed_field_of_the_upstream_request_names_the_host_leg(tmp_path: Path) -> None:
    request = change(lambda r: is_frame(r, "host", "0200", "000009"), **{"49": "840"})
    sink, _, failures = run_diff(tmp_path, edit_b=request)
    assert sink.failed == 1
    [f, echo] = failures[0].findings
    assert (f.leg, f.mti, f.field, f.expected, f.got) == ("host", "0200", "49", "'156'", "'840'")
    # and the host's answer (unchanged) now fails to echo B's own request: compared with B's, not A's
    assert (echo.leg, echo.mti, echo.field, echo.rule, echo.expected) == ("host", "0210", "49", "echo",
                                                                          "'840' (the request's)")


def test_a_terminal_request_that_changed_is_reported(tmp_path: Path) -> None:
    pred = lambda r: is_frame(r, "terminal", "0200", "000004", "10000002")  # noqa: E731
    sink, _, failures = run_diff(tmp_path, edit_b=change(pred, **{"22": "051"}))
    assert sink.failed == 1
    [f] = failures[0].findings
    assert (f.leg, f.mti, f.field, f.expected, f.got) == ("terminal", "0200", "22", "'021'", "'051'")


def test_b_later_in_wall_time_pairs_by_trace_relative_time(tmp_path: Path) -> None:
    def shifted(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for r in recs:
            if "t" in r:
                r["t"] += 86_400.0  # recorded a day later: the cases still pair
        return recs
    _, stats, failures = run_diff(tmp_path, edit_b=shifted, horizon=1.0)
    assert failures == [] and stats.paired == 15
    # a horizon shorter than the session: cases still pair with the partner the other trace has at once
    _, stats, failures = run_diff(tmp_path, horizon=0.2)
    assert failures == [] and stats.paired == 15


def with_host_echo(answer_rc: str | None = "00") -> Edit:
    """The host's own echo test (an 0800 the host sends the SUT), and the SUT's answer unless None."""
    def edit(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        at = next(i for i, r in enumerate(recs) if is_frame(r, "host", "0810"))
        t = recs[at]["t"] + 0.001
        fields = {"7": "1202071618", "11": "000777", "70": "301"}
        extra = [{"kind": "frame", "seq": 900, "t": t, "leg": "host", "dir": "in", "conn": "H1", "mti": "0800",
                  "fields": dict(fields)}]
        if answer_rc is not None:
            extra.append({"kind": "frame", "seq": 901, "t": t + 0.001, "leg": "host", "dir": "out", "conn": "H1",
                          "mti": "0810", "fields": dict(fields, **{"39": answer_rc})})
        return recs[: at + 1] + extra + recs[at + 1 :]
    return edit


HOST_ECHO = "H1 host stan 000777 0800"


def test_the_suts_answer_to_a_host_request_is_compared(tmp_path: Path) -> None:
    sink, stats, failures = run_diff(tmp_path, edit_a=with_host_echo(), edit_b=with_host_echo())
    assert failures == [] and stats.paired == 16
    sink, _, failures = run_diff(tmp_path, edit_a=with_host_echo(), edit_b=with_host_echo("96"))
    assert sink.failed == 1 and failures[0].name.startswith(HOST_ECHO)
    [f] = failures[0].findings
    assert (f.leg, f.mti, f.field, f.expected, f.got) == ("host", "0810", "39", "'00'", "'96'")
    _, _, failures = run_diff(tmp_path, edit_a=with_host_echo(), edit_b=with_host_echo(None))
    [f] = failures[0].findings
    assert f.kind is FindingKind.MISSING_FRAME and f.leg == "host" and "0810 answer to 0800 in only A" in f.message


# --- surrogates in a diff: one card of A is one card of B --------------------------------------------

A1, A2 = "6222021111111111118", "6222022222222222226"  # A's surrogates of two cards
B1, B2 = "6222023333333333335", "6222024444444444443"  # B's (another trace, another surrogate key)


def diff_request(captures: Captures, a_pan: str | None, b_pan: str | None) -> list[Finding]:
    def fields(pan: str | None) -> dict[str, str]:
        out = dict(REQUEST)
        del out["2"]
        return out if pan is None else dict(out, **{"2": pan})
    return run(fields(b_pan), expected=fields(a_pan), mti="0200", direction="in", mode=Mode.DIFF,
               secrets={"2": SecretKind.PAN}, request={}, captures=captures)


def test_surrogates_of_two_traces_compare_as_one_card_for_one_card() -> None:
    captures = Captures()
    assert diff_request(captures, A1, B1) == []  # first sight: A1 is B1
    assert diff_request(captures, A1, B1) == []  # the same card again
    assert diff_request(captures, A2, B2) == []  # another card, another surrogate
    [f] = diff_request(captures, A1, B2)  # A's first card came as B's second
    assert (f.field, f.rule, f.got) == ("2", "surrogate", "622202*********4443")
    assert f.expected == "the surrogate B gave this card before (622202*********3335)"
    assert "another card, or the card changed" in f.message and B1 not in f.message and B2 not in f.message


def test_a_surrogate_b_gave_another_card_is_a_difference() -> None:
    captures = Captures()
    assert diff_request(captures, A1, B1) == []
    [f] = diff_request(captures, A2, B1)  # two cards of A, one of B: not the same cards
    assert (f.field, f.rule) == ("2", "surrogate") and f.got == "622202*********3335"


def test_a_surrogate_pan_only_one_side_has_is_a_difference() -> None:
    [f] = diff_request(Captures(), A1, None)
    assert (f.field, f.got) == ("2", "(absent)") and f.expected == "622202*********1118"
    [g] = diff_request(Captures(), None, B1)
    assert (g.field, g.expected, g.got) == ("2", "(absent)", "622202*********3335")
    assert diff_request(Captures(), None, None) == []


# --- rules: which rule a field gets -------------------------------------------------------------------


def text_of(rules: RuleSet, key: MessageKey, fid: str) -> str | None:
    rule = rules.rule_for(key, fid)
    return None if rule is None else rule.text


def test_the_most_specific_selector_wins_and_of_equals_the_later() -> None:
    tables = [
        {"fields": {"39": "any"}},                                   # 0: no selector
        {"mti": "02x0", "fields": {"39": "one-of 00"}},              # 1: mti with x
        {"mti": "0210", "fields": {"39": "one-of 10"}},              # 2: exact mti beats x
        {"mti": "0210", "leg": "terminal", "fields": {"39": "present"}},  # 3: one more key beats it
        {"mti": "0210", "dir": "out", "fields": {"39": "absent"}},   # 4: as specific as 3, later: wins
        {"mti": "0210", "leg": "host", "dir": "out", "flow": "purchase", "fields": {"39": "echo"}},  # other leg
    ]
    rules = RuleSet(parse_entries(tables, "f", file_rank=1))
    key = MessageKey("cup-pos", "terminal", "out", "0210", "purchase", Mode.REPLAY)
    assert text_of(rules, key, "39") == "absent"
    assert text_of(rules, MessageKey("cup-pos", "terminal", "in", "0210", "", Mode.REPLAY), "39") == "present"
    assert text_of(rules, MessageKey("cup-pos", "host", "in", "0230", "", Mode.REPLAY), "39") == "one-of 00"
    assert text_of(rules, MessageKey("cup-pos", "host", "in", "0410", "", Mode.REPLAY), "39") == "any"
    assert text_of(rules, MessageKey("cup-pos", "host", "out", "0210", "purchase", Mode.REPLAY), "39") == "echo"
    assert rules.rule_for(key, "38") is None  # no rule names it: the caller's defaults apply


def test_a_field_rule_beats_a_star_rule_of_the_same_selector_and_star_covers_the_rest() -> None:
    rules = RuleSet(parse_entries([{"fields": {"39": "one-of 00", "*": "any"}},
                                   {"fields": {"*": "present"}, "dialect": "iso87-ascii"}], "f", file_rank=1))
    key = MessageKey("cup-pos", "terminal", "out", "0210", "", Mode.REPLAY)
    assert text_of(rules, key, "39") == "one-of 00" and text_of(rules, key, "12") == "any"
    host = MessageKey("iso87-ascii", "host", "out", "0200", "", Mode.REPLAY)
    assert text_of(rules, host, "12") == "present"  # the more specific selector, even as "*"
    assert rules.rule_for(key, "61.3") is None  # "*" never stands for a sub-field


# --- rules files: every mistake is refused with its place ---------------------------------------------


@pytest.mark.parametrize(("tables", "error"), [
    ({"fields": {}}, "rules must be an array of tables"),
    (["x"], r"rules\[0\]: expected a table"),
    ([{"fields": {"39": "same"}, "colour": "red"}], r"unknown keys \['colour'\]"),
    ([{"leg": "terminal"}], "fields must be a non-empty table"),
    ([{"fields": {}}], "fields must be a non-empty table"),
    ([{"fields": {"1234": "same"}}], "is not a field id"),
    ([{"fields": {"61.123": "same"}}], "is not a field id"),
    ([{"leg": "", "fields": {"39": "same"}}], "leg must be a non-empty string"),
    ([{"dir": "sideways", "fields": {"39": "same"}}], "dir must be in or out"),
    ([{"mti": "02y0", "fields": {"39": "same"}}], "mti must be 4 digits"),
    ([{"when": "always", "fields": {"39": "same"}}], "when must be replay or diff"),
    ([{"fields": {"39": {"check": "one-of"}}}], "one-of needs at least one value"),
    ([{"fields": {"39": {"check": "one-of", "values": "00"}}}], "values must be a list of strings"),
    ([{"fields": {"39": {"check": "ref"}}}], "ref needs a name"),
    ([{"fields": {"39": {"check": "nonsense"}}}], "unknown rule 'nonsense'"),
    ([{"fields": {"39": {"check": "same", "colour": "red"}}}], r"unknown keys \['colour'\]"),
])
def test_a_bad_rules_table_is_refused_naming_the_file_and_table(tables: object, error: str) -> None:
    with pytest.raises(RulesError, match=error) as exc:
        parse_entries(tables, "run.rules.toml", file_rank=1)
    assert str(exc.value).startswith("run.rules.toml")


def test_rules_written_as_tables_read_like_their_text() -> None:
    entries = parse_entries([{"mti": "0210", "why": "the acquirer says so", "fields": {
        "39": {"check": "one-of", "values": ["00", "10"], "capture": "rc"},
        "37": {"check": "ref", "name": "rrn"},
        "38": {"capture": "auth"},
        "12": "format capture t12",
        "61.3": "ref txn_date"}}], "f", file_rank=1)
    by_field = {e.field: e.rule for e in entries}
    assert (by_field["39"].check, by_field["39"].values, by_field["39"].capture) == (
        Check.ONE_OF, frozenset({"00", "10"}), "rc")
    assert by_field["39"].text == "one-of 00 10 capture rc" and by_field["39"].origin == "f"
    assert (by_field["37"].check, by_field["37"].ref, by_field["37"].text) == (Check.REF, "rrn", "ref rrn")
    assert (by_field["38"].check, by_field["38"].capture, by_field["38"].text) == (Check.PRESENT, "auth",
                                                                                  "present capture auth")
    assert (by_field["12"].check, by_field["12"].capture) == (Check.FORMAT, "t12")
    assert [e.selector.mti for e in entries] == ["0210"] * 5
    rules = RuleSet(entries)
    assert rules.names() == ({"rc", "auth", "t12"}, {"rrn", "txn_date"})
    key = MessageKey("cup-pos", "terminal", "out", "0210", "", Mode.REPLAY)
    assert rules.part_ids(key, "61") == ("61.3",)
    assert rules.part_ids(MessageKey("cup-pos", "terminal", "out", "0200", "", Mode.REPLAY), "61") == ()
    assert rules.part_ids(key, "6") == ()  # "61.3" is no sub-field of 6


def test_captures_remember_what_each_recorded_value_stood_for() -> None:
    c = Captures(limit=2, per_value=2)
    c.record("rrn", "R1", None)  # nothing observed: nothing remembered
    assert c.latest("rrn") is None and c.candidates("rrn", "R1") == []
    c.record("rrn", None, "B0")  # a template: only the latest
    assert c.latest("rrn") == "B0" and c.candidates("rrn", None) == ["B0"] and c.candidates("rrn", "R1") == []
    c.record("rrn", "R1", "B1")
    c.record("rrn", "R1", "B2")
    c.record("rrn", "R1", "B1")  # seen again: newest now
    assert c.candidates("rrn", "R1") == ["B2", "B1"] and c.resolve("rrn", "R1") == "B1"
    c.record("rrn", "R1", "B3")  # at most per_value kept, the oldest go
    assert c.candidates("rrn", "R1") == ["B1", "B3"]
    c.record("rrn", "R2", "B4")
    c.record("rrn", "R3", "B5")  # at most `limit` recorded values: R1 (the least recent) goes
    assert c.candidates("rrn", "R1") == [] and c.resolve("rrn", "R3") == "B5" and c.latest("rrn") == "B5"
    assert c.candidates("other", "R3") == [] and c.resolve("other", None) is None


# --- the compare engine: sub-fields, refs, templates, what a finding shows ------------------------------

SUBFIELD_RULES = """
[[rules]]
mti = "0210"
fields = { "60.3" = "any", "60.2" = "format" }
"""


def test_sub_field_rules_compare_each_part_under_its_own_rule(tmp_path: Path) -> None:
    # 60 = 22 000001 000 5 0 0: net code (60.3) is "any", batch (60.2) only needs its format
    assert run(dict(ANSWER, **{"60": "22000002999500"}), rules_text=SUBFIELD_RULES, tmp=tmp_path) == []
    [f] = run(dict(ANSWER, **{"60": "2200000A000500"}), rules_text=SUBFIELD_RULES, tmp=tmp_path)
    assert (f.field, f.rule, f.expected, f.got) == ("60.2", "format", "format n6", "'00000A'")
    [g] = run(dict(ANSWER, **{"60": "23000001000500"}), rules_text=SUBFIELD_RULES, tmp=tmp_path)
    # the parts no rule names keep the field's own rule: 60 is echoed, so each part echoes the request's
    assert (g.field, g.rule, g.expected, g.got) == ("60.1", "echo", "'22' (the request's)", "'23'")
    [h] = run(dict(ANSWER, **{"60": "22000001000501"}), rules_text=SUBFIELD_RULES, tmp=tmp_path)
    assert h.field == "60.6"
    without = dict(ANSWER)
    del without["60"]
    [m] = run(without, rules_text=SUBFIELD_RULES, tmp=tmp_path)  # one finding for the whole field
    assert (m.field, m.expected, m.got) == ("60", "'22000001000500'", "(absent)")
    long = run(dict(ANSWER, **{"60": "22000001000500123456"}), rules_text=SUBFIELD_RULES, tmp=tmp_path)
    assert [(f.field, f.got) for f in long] == [("60.7", "'123'"), ("60", "'456'")]  # past the layout too


def host_cmp(captures: Captures, *, overrides: dict[str, Any] | None = None) -> Any:
    rules = load_rules(None).rules
    fields = {"3": "000000", "4": "000000001000", "11": "000005", "37": "RUN000000001"}
    flow = flow_of("iso87-ascii", "0200", fields)
    return Comparison(rules, message_key("iso87-ascii", "host", "out", "0200", flow, Mode.REPLAY),
                      Where("case", "host", "10000001", "000005"), captures, flow, overrides=overrides)


def test_a_ref_accepts_only_this_runs_value_for_the_recorded_one() -> None:
    base = {"3": "200000", "4": "000000001000", "11": "000005", "32": "00000001234", "41": "10000001"}
    recorded = Seen("0200", dict(base, **{"37": "REC000000001"}))
    captures = Captures()
    # nothing captured for the recorded RRN: it must come as recorded
    assert compare(host_cmp(captures), recorded, Seen("0200", dict(base, **{"37": "REC000000001"}))) == []
    [f] = compare(host_cmp(captures), recorded, Seen("0200", dict(base, **{"37": "RUN000000009"})))
    assert (f.field, f.rule, f.expected) == ("37", "ref rrn", "'REC000000001'")
    assert "no value of this run stands for the recorded one under rrn" in f.message
    captures.record("rrn", "REC000000001", "RUN000000001")
    assert compare(host_cmp(captures), recorded, Seen("0200", dict(base, **{"37": "RUN000000001"}))) == []
    [g] = compare(host_cmp(captures), recorded, Seen("0200", dict(base, **{"37": "REC000000001"})))
    assert (g.field, g.expected, g.got) == ("37", "'RUN000000001' (ref rrn)", "'REC000000001'")
    # the recording had none: none must come
    [h] = compare(host_cmp(captures), Seen("0200", base), Seen("0200", dict(base, **{"37": "RUN000000001"})))
    assert (h.field, h.expected) == ("37", "(absent)")
    assert h.message.endswith("got 'RUN000000001' (rule ref rrn, trace-rules.toml)")  # nothing more to say
    assert compare(host_cmp(captures), Seen("0200", base), Seen("0200", dict(base))) == []


def test_a_template_compares_only_the_fields_its_rules_name() -> None:
    captures = Captures()
    overrides = {"39": parse_rule("one-of 00", "t"), "37": parse_rule("ref rrn", "t"),
                 "62": parse_rule("absent", "t")}
    got = {"3": "000000", "11": "000777", "39": "00", "12": "anything"}
    [f] = compare(host_cmp(captures, overrides=overrides), None, Seen("0210", got))
    assert (f.field, f.rule) == ("37", "ref rrn")
    assert "nothing was captured under that name" in f.message and f.expected == "the value captured as rrn"
    captures.record("rrn", None, "CERT00000002")
    with_rrn = dict(got, **{"37": "CERT00000002"})
    assert compare(host_cmp(captures, overrides=overrides), None, Seen("0210", with_rrn)) == []
    [g] = compare(host_cmp(captures, overrides=overrides), None, Seen("0210", dict(with_rrn, **{"39": "05"})))
    assert (g.field, g.expected, g.got) == ("39", "one of 00", "'05'")
    found = compare(host_cmp(captures, overrides=overrides), None, Seen("0210", {"37": "CERT00000002", "62": "K"}))
    assert [(f.field, f.expected, f.got) for f in found] == [("39", "one of 00", "(absent)"),
                                                              ("62", "(absent)", "<1 characters>")]  # a key: not shown


def test_what_a_finding_may_show_of_a_value() -> None:
    assert show("39", None) == "(absent)" and show("39", "05") == "'05'"
    assert show("2", "6222021234567890123") == "622202*********0123"
    assert show("52", "0123456789ABCDEF") == "<16 characters>" and show("48", "KEYS") == "<4 characters>"
    assert show("64", "0" * 16) == "<16 characters>" and show("35.1", "abc") == "<3 characters>"
    assert _difference("52", "1111222233334444", "1111222233335444") == (
        "<16 characters>", "<16 characters>", " (they differ from position 13)")
    assert _difference("52", "1111", "111122") == ("<4 characters>", "<6 characters>",
                                                   " (they differ from position 5)")
    assert _difference("39", "00", "05") == ("'00'", "'05'", "")
    assert _difference("52", None, "1111") == ("(absent)", "<4 characters>", "")


def test_another_mti_is_a_finding_of_its_own() -> None:
    cmp = host_cmp(Captures())
    fields = {"3": "000000", "4": "000000001000", "11": "000005"}
    [f] = compare(cmp, Seen("0200", fields), Seen("0220", dict(fields), seq=7))
    assert (f.field, f.expected, f.got, f.mti, f.seq) == ("mti", "0200", "0220", "0220", 7)
    assert "field mti: expected 0200, got 0220 (rule same)" in f.message


def test_an_answer_that_echoes_a_field_longer_than_its_layout_passes(tmp_path: Path) -> None:
    """Bug found by mutation testing (issue 16): with a rule on a sub-field of 60, what runs past the
    layout was compared with the request's whole 60, so a correct echo failed."""
    long_60 = "22000001000500123456"  # CUP 60 may run past its 17-digit layout (n..999)
    echoed = dict(ANSWER, **{"60": long_60})
    request = dict(REQUEST, **{"60": long_60})
    assert run(echoed, expected=echoed, request=request, rules_text=SUBFIELD_RULES, tmp=tmp_path) == []
    [f] = run(dict(echoed, **{"60": long_60[:-3] + "999"}), expected=echoed, request=request,
              rules_text=SUBFIELD_RULES, tmp=tmp_path)
    assert (f.field, f.rule, f.expected, f.got) == ("60", "echo", "'456' (the request's)", "'999'")


def test_findings_come_in_field_number_order() -> None:
    found = run(dict(ANSWER, **{"4": "000000009999", "32": "00000009999", "39": "05", "100": "1"}),
                request=dict(ANSWER))
    assert [f.field for f in found] == ["4", "32", "39", "100"]


def test_a_secret_is_compared_for_presence_only_and_never_shown() -> None:
    secrets = {"52": SecretKind.PIN}
    recorded = dict(REQUEST, **{"52": "1111222233334444"})
    assert run(dict(REQUEST, **{"52": "9999888877776666"}), expected=recorded, mti="0200", direction="in",
               secrets=secrets, request={}) == []
    [f] = run(dict(REQUEST), expected=recorded, mti="0200", direction="in", secrets=secrets, request={})
    assert (f.field, f.rule, f.expected, f.got) == ("52", "secret", "<16 characters>", "(absent)")
    assert "1111222233334444" not in f.message



def test_a_field_the_recording_did_not_echo_is_compared_with_the_recording_not_the_request() -> None:
    """A partial approval (the answer's 4 is not the request's): the flow's echo list does not apply
    where the recording itself did not echo; the answer is compared with the recorded one."""
    rules = load_rules(None).rules
    flow = flow_of("cup-pos", "0210", ANSWER)
    partial = dict(ANSWER, **{"4": "000000000500", "39": "10"})
    cmp = Comparison(rules, message_key("cup-pos", "terminal", "out", "0210", flow, Mode.REPLAY),
                     Where("case", "terminal"), Captures(), flow, request=REQUEST, verified={"64": ""},
                     recorded_request=REQUEST, recorded_answer=partial)
    assert compare(cmp, Seen("0210", partial), Seen("0210", dict(partial))) == []
    [f] = compare(cmp, Seen("0210", partial), Seen("0210", dict(partial, **{"4": "000000000600"})))
    assert (f.field, f.rule, f.expected) == ("4", "same", "'000000000500'")


def test_a_capture_without_a_name_is_refused() -> None:
    with pytest.raises(RulesError, match="here: capture needs a name"):
        parse_rule({"check": "present", "capture": "1bad"}, "here")
    with pytest.raises(RulesError, match="here: capture needs a name"):
        parse_rule("present capture 1bad", "here")


def test_two_traces_that_decode_nothing_do_not_pass_as_a_diff(tmp_path: Path) -> None:
    header = records()[0]
    junk = [header, {"kind": "event", "seq": 1, "t": 1.0, "leg": "terminal", "conn": "T1", "event": "undecodable",
                     "detail": "line 1: not hex"}]
    a, b = write(tmp_path / "a.jsonl", junk), write(tmp_path / "b.jsonl", junk)
    sink = CaseSink("diff")
    diff(a, b, load_rules(None), sink)
    assert not sink.ok and sink.failed == 2
    assert all(c.findings and c.findings[0].kind is FindingKind.DECODE for c in sink.failures)
