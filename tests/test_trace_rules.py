"""Rules as data and the compare engine, on hand-built messages: every rule kind passes what it should
and names what it should not, rule files override the defaults by specificity, captures map recorded
values to this run's, and no finding ever shows a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.trace.compare import Comparison, Seen, Where, compare, flow_of, message_key, substitute_refs
from gateway.trace.format import SecretKind
from gateway.trace.report import FindingKind
from gateway.trace.rules import Captures, Check, Mode, RulesError, parse_rule
from gateway.trace.rulesfile import beside, load_rules
from gateway.trace.templates import parse_templates

PAN = "6222021234567890123"
REQUEST = {"2": PAN, "3": "000000", "4": "000000001000", "11": "000123", "22": "021", "25": "00",
           "41": "10000001", "42": "898100012340001", "49": "156", "60": "22000001000500", "64": "0" * 16}
ANSWER = {"2": PAN, "3": "000000", "4": "000000001000", "11": "000123", "12": "101010", "13": "1124",
          "25": "00", "32": "00000001234", "37": "123456789012", "38": "A1B2C3", "39": "00", "41": "10000001",
          "42": "898100012340001", "49": "156", "60": "22000001000500", "63": "CUP", "64": "0" * 16}


def run(got: dict[str, str], *, expected: dict[str, str] | None = None, rules_text: str = "",
        tmp: Path | None = None, verified: dict[str, str] | None = None, captures: Captures | None = None,
        request: dict[str, str] | None = None, mti: str = "0210", direction: str = "out",
        mode: Mode = Mode.REPLAY, secrets: dict[str, SecretKind] | None = None) -> list:
    path = None
    if rules_text:
        assert tmp is not None
        path = tmp / "run.rules.toml"
        path.write_text(rules_text)
    rules = load_rules(path)
    flow = flow_of("cup-pos", mti, got)
    cmp = Comparison(rules.rules, message_key("cup-pos", "terminal", direction, mti, flow, mode),
                     Where("T1 10000001 stan 000123 0200 purchase", "terminal", "10000001", "000123"),
                     captures or Captures(), flow, request=REQUEST if request is None else request,
                     verified=verified or {"64": ""})
    return compare(cmp, Seen(mti, expected if expected is not None else ANSWER, secrets or {}), Seen(mti, got))


def test_identical_answer_passes_and_volatile_fields_only_need_their_format() -> None:
    assert run(dict(ANSWER)) == []
    later = dict(ANSWER, **{"12": "235959", "13": "1231"})
    assert run(later) == []
    bad = dict(ANSWER, **{"12": "2359"})
    [f] = run(bad)
    assert (f.kind, f.field, f.rule, f.got) == (FindingKind.FIELD, "12", "format", "'2359'")
    assert f.expected == "format n6"


def test_a_changed_field_names_message_field_expected_got_and_rule() -> None:
    [f] = run(dict(ANSWER, **{"39": "61"}))
    assert (f.mti, f.terminal, f.stan, f.field, f.expected, f.got, f.rule) == (
        "0210", "10000001", "000123", "39", "'00'", "'61'", "same")
    assert f.message.startswith("T1 10000001 stan 000123 0200 purchase: terminal 0210 field 39: expected '00'")


def test_echo_compares_with_the_request_this_run_sent() -> None:
    """11 is in the purchase flow's response.echo list: it must equal the request's, whatever the recording."""
    [f] = run(dict(ANSWER, **{"11": "000124"}))
    assert (f.field, f.rule, f.expected) == ("11", "echo", "'000123' (the request's)")
    assert run(dict(ANSWER, **{"11": "000777"}), request=dict(REQUEST, **{"11": "000777"})) == []


def test_missing_and_unexpected_fields() -> None:
    without = dict(ANSWER)
    del without["63"]
    [f] = run(without)
    assert (f.field, f.expected, f.got) == ("63", "'CUP'", "(absent)")
    [g] = run(dict(ANSWER, **{"44": "x"}))
    assert (g.field, g.expected, g.got) == ("44", "(absent)", "'x'")


def test_every_rule_kind(tmp_path: Path) -> None:
    rules = """
[[rules]]
mti = "0210"
fields = { "63" = "any", "38" = "present", "15" = "absent", "39" = "one-of 00 10", "32" = "secret" }
"""
    got = dict(ANSWER, **{"63": "???", "39": "10", "32": "99999999999"})
    del got["4"]  # 4 is echo: the request has it, the answer must too
    findings = run(got, rules_text=rules, tmp=tmp_path)
    assert [(f.field, f.rule) for f in findings] == [("4", "echo")]
    names = [(f.field, f.rule) for f in run(dict(ANSWER, **{"39": "05", "15": "1201"}), rules_text=rules, tmp=tmp_path)]
    assert names == [("15", "absent"), ("39", "one-of 00 10")]
    no38 = dict(ANSWER)
    del no38["38"]
    assert [(f.field, f.rule) for f in run(no38, rules_text=rules, tmp=tmp_path)] == [("38", "present")]


def test_verify_reports_the_io_sides_verdict_never_the_value() -> None:
    got = dict(ANSWER, **{"64": "41424344454631320"[:16]})
    assert run(got, verified={"64": ""}) == []
    [f] = run(got, verified={"64": "the MAC does not verify under the MAK of the sign-in"})
    assert (f.field, f.rule) == ("64", "verify")
    assert "does not verify" in f.message and "4142434445463132" not in f.message


def test_secrets_are_never_compared_nor_shown() -> None:
    req_expected = dict(REQUEST, **{"52": "1111111111111111", "35": PAN + "D30121010000000000"})
    req_got = dict(REQUEST, **{"52": "2222222222222222", "35": PAN + "D30121010000000001"})
    secrets = {"52": SecretKind.PIN, "35": SecretKind.TRACK, "2": SecretKind.PAN}
    findings = run(req_got, expected=req_expected, mti="0200", direction="in", secrets=secrets, request={})
    [f] = findings  # the PIN block differs (never compared); the surrogate track is compared
    assert f.field == "35" and "differ from position 37" in f.message
    assert PAN not in f.message and "30121010000000001" not in f.message
    other_pan = dict(ANSWER, **{"2": "6222029999999999999"})
    [p] = run(other_pan)
    assert (p.expected, p.got) == ("622202*********0123 (the request's)", "622202*********9999")
    assert "1234567890" not in p.message and "9999999" not in p.message


def test_user_rules_beat_defaults_and_specific_beats_general(tmp_path: Path) -> None:
    rules = """
[[rules]]
leg = "terminal"
fields = { "*" = "any" }

[[rules]]
leg = "terminal"
mti = "02x0"
fields = { "39" = "one-of 00" }
"""
    got = dict(ANSWER, **{"12": "xx", "63": "VIS"})
    assert run(got, rules_text=rules, tmp=tmp_path) == []  # "*" = any in the user's file beats the defaults
    [f] = run(dict(got, **{"39": "51"}), rules_text=rules, tmp=tmp_path)
    assert (f.field, f.rule) == ("39", "one-of 00")


def test_when_diff_rules_apply_only_in_diff_mode() -> None:
    other_rrn = dict(ANSWER, **{"37": "999999999999"})
    [f] = run(other_rrn)  # in a replay the trace host sends the recorded RRN: it must arrive unchanged
    assert f.field == "37"
    assert run(other_rrn, mode=Mode.DIFF) == []  # two hosts give different RRNs: only the format counts


def test_capture_and_ref_map_recorded_values_to_this_runs() -> None:
    """The SUT gives another RRN this run; the refund's 37 (and 61.3, its original's date) follow."""
    captures = Captures()
    run(dict(ANSWER, **{"37": "RUN000000001", "13": "1201"}), mode=Mode.DIFF, captures=captures)
    rules = load_rules(None).rules
    refund = {"3": "200000", "4": "000000000500", "11": "000124", "22": "021", "25": "00", "37": "123456789012",
              "41": "10000001", "42": "898100012340001", "49": "156", "60": "25000001000500",
              "61": "0000010001231124", "63": "CUP"}
    flow = flow_of("cup-pos", "0220", refund)
    assert flow is not None and flow.name == "refund"
    key = message_key("cup-pos", "terminal", "in", "0220", flow, Mode.REPLAY)
    sent = substitute_refs(rules, key, refund, captures, flow)
    assert sent["37"] == "RUN000000001"
    assert sent["61"] == "0000010001231201"  # 61.3: the recorded date 1124 is 1201 in this run
    assert refund["37"] == "123456789012"  # the recorded request is left alone


def test_ref_without_a_mapping_is_compared_as_recorded() -> None:
    captures = Captures()
    captures.record("rrn", "123456789012", "RUN000000001")
    assert captures.candidates("rrn", "123456789012") == ["RUN000000001"]
    assert captures.resolve("rrn", "unknown") is None
    assert captures.resolve("rrn", None) == "RUN000000001"  # templates: the latest


def test_captures_stay_bounded() -> None:
    captures = Captures(limit=100, per_value=3)
    for i in range(10_000):
        captures.record("stan", f"{i:06d}", f"{i + 1:06d}")
        captures.record("time", "1124101010", f"{i:06d}")
    assert len(captures._maps["stan"]) == 100
    assert captures.candidates("time", "1124101010") == ["009997", "009998", "009999"]


@pytest.mark.parametrize("text", ["", "nonsense", "ref", "ref a b", "one-of", "same capture", "capture a b",
                                  "echo 12", "capture x same"])
def test_bad_rule_text_is_refused_with_its_place(text: str) -> None:
    with pytest.raises(RulesError, match="here"):
        parse_rule(text, "here")


def test_rule_forms() -> None:
    assert parse_rule("capture rrn", "x").check is Check.PRESENT
    r = parse_rule("format capture txn_date", "x")
    assert (r.check, r.capture) == (Check.FORMAT, "txn_date")
    t = parse_rule({"check": "one-of", "values": ["00", "10"], "capture": "rc"}, "x")
    assert (t.check, t.values, t.capture) == (Check.ONE_OF, frozenset({"00", "10"}), "rc")


def test_rules_file_problems_name_file_and_table(tmp_path: Path) -> None:
    cases = {
        'oops = 1': "unknown top-level keys",
        '[[rules]]\nleg = "middle"\nfields = { "39" = "same" }': "leg must be terminal or host",
        '[[rules]]\nmti = "02"\nfields = { "39" = "same" }': "mti must be 4 digits",
        '[[rules]]\nfields = { "abc" = "same" }': "not a field id",
        '[[rules]]\nfields = { "37" = "ref nobody" }': "ref nobody names nothing a capture records",
        '[settings]\npin = 1234': "settings.pin",
        '[[case]]\nname = "x"': "give flow",
    }
    for text, error in cases.items():
        path = tmp_path / "bad.rules.toml"
        path.write_text(text)
        with pytest.raises(RulesError, match=error):
            load_rules(path)


def test_the_rules_file_beside_a_trace_is_found(tmp_path: Path) -> None:
    trace = tmp_path / "night-run.trace.jsonl"
    assert beside(trace) == tmp_path / "night-run.rules.toml"
    beside(trace).write_text('[settings]\npin = "4321"\n')
    assert load_rules(None, trace=trace).pin == "4321"
    assert load_rules(None, trace=tmp_path / "other.jsonl").pin is None


def test_templates_parse_and_refuse_mistakes() -> None:
    [t] = parse_templates([{"name": "limit", "flow": "purchase", "amount": 2_000_000, "card": PAN,
                            "expect": {"39": "one-of 61"}, "upstream": False}], "f")
    assert t.expect["39"].values == frozenset({"61"}) and t.upstream is False and t.host == {}
    with pytest.raises(RulesError, match="flow must be one of"):
        parse_templates([{"flow": "teleport"}], "f")
    with pytest.raises(RulesError, match="names the case it reverses"):
        parse_templates([{"flow": "reversal"}], "f")
    with pytest.raises(RulesError, match="a second case named"):
        parse_templates([{"name": "a", "flow": "echo"}, {"name": "a", "flow": "echo"}], "f")


def _host_out(mti: str, fields: dict[str, str], expected: dict[str, str], captures: Captures) -> list:
    rules = load_rules(None).rules
    flow = flow_of("iso87-ascii", mti, fields)
    cmp = Comparison(rules, message_key("iso87-ascii", "host", "out", mti, flow, Mode.REPLAY),
                     Where("case", "host", "10000001", fields.get("11", "")), captures, flow, verified={"128": ""})
    return compare(cmp, Seen(mti, expected), Seen(mti, fields))


def test_host_leg_reversals_name_this_runs_original_and_repeat_it_identically() -> None:
    """The SUT allocates new STANs and times: 90 must name the original this run sent, and (ISO 8583:1987
    practice) a 0401 repeat must carry its 0400's STAN and field 7, not fresh ones."""
    captures = Captures()
    base = {"3": "000000", "4": "000000004200", "32": "00000001234", "41": "10000001", "42": "898100012340001",
            "49": "156"}
    rec_orig = {**base, "7": "1124101010", "11": "000061", "12": "101010", "13": "1124"}
    run_orig = {**base, "7": "1202093000", "11": "000005", "12": "093000", "13": "1202"}
    rec_90 = "0200000061112410101000000001234" + "0" * 11
    run_90 = "0200000005120209300000000001234" + "0" * 11
    assert _host_out("0200", run_orig, rec_orig, captures) == []
    rec_rev = {**base, "7": "1124101013", "11": "000062", "39": "98", "90": rec_90, "128": "0" * 16}
    run_rev = {**base, "7": "1202093003", "11": "000006", "39": "98", "90": run_90, "128": "F" * 16}
    assert _host_out("0400", run_rev, rec_rev, captures) == []
    wrong_90 = {**run_rev, "90": rec_90}  # a gateway that named the recording's original, not its own
    found = _host_out("0400", wrong_90, rec_rev, captures)
    assert [(f.field, f.rule, f.expected) for f in found] == [
        ("90.2", "ref host_stan", "'000005' (ref host_stan)"),
        ("90.3", "ref host_time", "'1202093000' (ref host_time)")]
    rec_repeat = {**rec_rev}  # ISO practice: identical but for the MTI
    assert _host_out("0401", {**run_rev}, rec_repeat, captures) == []
    fresh = {**run_rev, "11": "000007", "7": "1202093009"}
    found = _host_out("0401", fresh, rec_repeat, captures)
    assert sorted((f.field, f.rule) for f in found) == [("11", "ref host_stan"), ("7", "ref host_time")]


def test_fields_the_source_had_masked_compare_as_present() -> None:
    """An import of a masked jPOS log keeps placeholders: only their presence can be compared."""
    rules = load_rules(None).rules
    flow = flow_of("cup-pos", "0210", ANSWER)
    cmp = Comparison(rules, message_key("cup-pos", "terminal", "out", "0210", flow, Mode.DIFF),
                     Where("case", "terminal"), Captures(), flow, request=REQUEST, verified={"64": ""})
    recorded = Seen("0210", dict(ANSWER, **{"63": "___"}), masked=frozenset({"63"}))
    assert compare(cmp, recorded, Seen("0210", dict(ANSWER, **{"63": "VIS"}))) == []
    without = dict(ANSWER)
    del without["63"]
    [f] = compare(cmp, recorded, Seen("0210", without))
    assert (f.field, f.rule) == ("63", "present")
