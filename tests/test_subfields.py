"""Sub-field layouts (specs/subfields.toml): pack/unpack of every layout, strict errors, the decode
CLI's break-out, and the settlement value objects built on them (gateway/iso/totals.py)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.iso import subfields
from gateway.iso.errors import SubfieldError
from gateway.iso.message import Message
from gateway.iso.subfields import break_out, layout, layout_names, pack, unpack
from gateway.iso.totals import (
    RESULT_BALANCED,
    RESULT_NOT_BALANCED,
    BatchItem,
    CardTotals,
    SettlementTotals,
    pack_batch_end,
    pack_batch_items,
    unpack_batch_end,
    unpack_batch_items,
)

_ALPHABETS = {
    "n": "0123456789",
    "an": "ABCXYZabc0129 ",
    "ans": "ABC xyz019-/#*.",
    "h": "0123456789ABCDEF",
}


def _value(part: subfields.Part, rng: random.Random) -> str:
    if part.values is not None:
        return rng.choice(sorted(part.values))
    return "".join(rng.choice(_ALPHABETS[part.fmt]) for _ in range(part.length))


def _sample_parts(
    name: str, rng: random.Random, items: int = 2, optional_upto: int | None = None
) -> dict[str, str]:
    """Valid parts for a layout: all mandatory parts, the first `optional_upto` optional ones (all
    when None), and `items` repeated items."""
    lay = layout(name)
    out: dict[str, str] = {}
    optional_seen = 0
    for p in lay.parts:
        if p.optional:
            if optional_upto is not None and optional_seen >= optional_upto:
                break
            optional_seen += 1
        out[p.name] = _value(p, rng)
    if lay.repeat is not None:
        r = lay.repeat
        n = max(r.min, min(items, r.max))
        if r.count is not None:
            counter = next(p for p in lay.parts if p.name == r.count)
            out[r.count] = f"{n:0{counter.length}d}"
        for i in range(1, n + 1):
            for p in r.parts:
                out[f"{r.name}{i}.{p.name}"] = _value(p, rng)
    return out


EXPECTED_LAYOUTS = {
    "cup.60",
    "cup.61",
    "cup.48.totals",
    "cup.48.batch_items",
    "cup.48.batch_end",
    "cup.44",
    "cup.63",
    "amounts.54",
    "iso87.90",
    "iso87.48.key",
}


def test_every_layout_the_brief_names_is_defined() -> None:
    assert set(layout_names()) >= EXPECTED_LAYOUTS


def test_layout_sizes_match_the_reference() -> None:
    assert layout("cup.48.totals").header_len == 62
    assert layout("iso87.90").header_len == 42
    assert layout("cup.48.batch_end").header_len == 4
    items = layout("cup.48.batch_items")
    assert items.repeat is not None and items.header_len + items.repeat.max * items.repeat.size == 322
    amounts = layout("amounts.54")
    assert amounts.repeat is not None and amounts.repeat.size == 20
    assert sorted(layout("cup.60").lengths) == [11, 12, 13, 14, 17]
    assert sorted(layout("cup.61").lengths) == [12, 16, 18, 29]
    assert sorted(layout("cup.63").lengths) == [3, 23, 43, 63]


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYOUTS))
def test_pack_unpack_round_trip_for_every_layout(name: str) -> None:
    rng = random.Random(name)
    lay = layout(name)
    optional = sum(p.optional for p in lay.parts)
    for upto in range(optional + 1):
        for items in (1, 3, 8):
            parts = _sample_parts(name, rng, items=items, optional_upto=upto)
            value = pack(name, parts)
            assert unpack(name, value) == parts
            assert pack(name, unpack(name, value)) == value


@given(data=st.data())
@settings(max_examples=200, deadline=None)
def test_pack_unpack_property(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(EXPECTED_LAYOUTS)))
    seed = data.draw(st.integers(0, 2**32))
    items = data.draw(st.integers(1, 8))
    lay = layout(name)
    upto = data.draw(st.integers(0, sum(p.optional for p in lay.parts)))
    parts = _sample_parts(name, random.Random(seed), items=items, optional_upto=upto)
    assert unpack(name, pack(name, parts)) == parts


def test_unpack_cup60_forms() -> None:
    assert unpack("cup.60", "00123456004") == {"txn_type": "00", "batch": "123456", "net_code": "004"}
    assert unpack("cup.60", "0100000100050") == {
        "txn_type": "01",
        "batch": "000001",
        "net_code": "000",
        "read_capability": "5",
        "ic_condition": "0",
    }


@pytest.mark.parametrize(
    ("value", "field", "offset"),
    [
        ("0012345600", "60.3", 8),  # 10 digits: ends inside 60.3
        ("00123456", "60.3", 8),  # 60.3 absent
        ("001234560041234", "60.7", 14),  # 15: ends inside 60.7
        ("001234560041234567", "60", 17),  # runs on after 60.7
        ("00123A56004", "60.2", 2),
        ("0012345600X", "60.3", 8),
        ("001234560045X", "60.5", 12),
    ],
)
def test_unpack_errors_name_subfield_and_offset(value: str, field: str, offset: int) -> None:
    with pytest.raises(SubfieldError) as info:
        unpack("cup.60", value)
    assert info.value.field == field
    assert info.value.offset == offset
    assert info.value.kind == "subfield"


def test_error_text_never_carries_field_data() -> None:
    pan = "6225880123456789"
    bad = "01" + "00" + "000123" + pan.rjust(20, "0") + "00000000100X"
    with pytest.raises(SubfieldError) as info:
        unpack("cup.48.batch_items", bad)
    assert pan not in str(info.value)
    assert "100X" not in str(info.value)
    assert info.value.field == "48.item1.amount"
    assert info.value.offset == 30


def test_unpack_rejects_unicode_digits_and_lowercase_hex() -> None:
    with pytest.raises(SubfieldError):
        unpack("cup.48.batch_end", "12٣4")  # an Arabic-Indic digit is isdigit() but not ASCII
    with pytest.raises(SubfieldError) as info:
        unpack("iso87.48.key", "ab" * 16 + "ABCDEF01")
    assert info.value.field == "48.1"


def test_value_sets_are_enforced() -> None:
    good = "0000" + "156" + "C" + "000000001000"
    assert unpack("amounts.54", good)["amount1.sign"] == "C"
    with pytest.raises(SubfieldError) as info:
        unpack("amounts.54", good.replace("C", "X"))
    assert info.value.field == "54.amount1.sign"
    with pytest.raises(SubfieldError) as info:
        unpack("cup.48.totals", "0" * 30 + "7" + "0" * 31)
    assert info.value.field == "48.5"


def test_repeat_count_must_match_the_items() -> None:
    item = "00" + "000001" + "0" * 20 + "0" * 12
    assert unpack("cup.48.batch_items", "02" + item * 2)["count"] == "02"
    with pytest.raises(SubfieldError) as info:
        unpack("cup.48.batch_items", "03" + item * 2)
    assert info.value.field == "48.1"
    with pytest.raises(SubfieldError):
        unpack("cup.48.batch_items", "09" + item * 9)  # more than 8 items
    with pytest.raises(SubfieldError):
        unpack("cup.48.batch_items", "01" + item[:-1])  # not whole items
    with pytest.raises(SubfieldError):
        unpack("amounts.54", "")  # at least one amount


def test_pack_fills_the_count_and_checks_a_given_one() -> None:
    parts = {"item1.card_org": "01", "item1.trace": "000009", "item1.pan": "0" * 20, "item1.amount": "0" * 12}
    assert pack("cup.48.batch_items", parts).startswith("0101000009")
    with pytest.raises(SubfieldError) as info:
        pack("cup.48.batch_items", {**parts, "count": "02"})
    assert info.value.field == "48.1"


@pytest.mark.parametrize(
    ("parts", "field"),
    [
        ({"txn_type": "22", "batch": "000001"}, "60.3"),  # mandatory part absent
        ({"txn_type": "22", "batch": "00001", "net_code": "000"}, "60.2"),  # too short
        ({"txn_type": "2X", "batch": "000001", "net_code": "000"}, "60.1"),  # not n
        ({"txn_type": "22", "batch": "000001", "net_code": "000", "ic_condition": "0"}, "60.5"),  # gap
        ({"txn_type": "22", "batch": "000001", "net_code": "000", "colour": "1"}, "60"),  # unknown name
    ],
)
def test_pack_errors(parts: dict[str, str], field: str) -> None:
    with pytest.raises(SubfieldError) as info:
        pack("cup.60", parts)
    assert info.value.field == field


def test_pack_rejects_non_string_values() -> None:
    with pytest.raises(SubfieldError):
        pack("cup.48.batch_end", {"count": 12})  # type: ignore[dict-item]


def test_unknown_layout_is_a_typed_error() -> None:
    with pytest.raises(SubfieldError):
        unpack("cup.99", "")
    with pytest.raises(SubfieldError):
        pack("cup.99", {})


def test_iso87_90_layout() -> None:
    value = "0200" + "000123" + "0102030405" + "00000001234" + "00000000000"
    assert unpack("iso87.90", value) == {
        "orig_mti": "0200",
        "orig_stan": "000123",
        "orig_transmission": "0102030405",
        "orig_acquirer_id": "00000001234",
        "orig_forwarding_id": "00000000000",
    }
    with pytest.raises(SubfieldError):
        unpack("iso87.90", value[:-1])


# --- break_out -------------------------------------------------------------------------------------


def test_break_out_cup_settlement_and_batch_upload() -> None:
    totals = SettlementTotals(CardTotals(1000, 1, 200, 1)).to_field48()
    out = break_out("cup-pos", Message("0500", {"48": totals, "60": "00000001201", "63": "01 "}))
    assert out["48"]["domestic_debit_amount"] == "000000001000"
    assert out["60"]["net_code"] == "201"
    assert out["63"] == {"code": "01 "}

    pan = "6225880123456789"
    items = pack_batch_items([BatchItem("00", "000003", pan, 1000)])
    out = break_out("cup-pos", Message("0320", {"48": items, "60": "00000001201"}))
    assert out["48"]["item1.pan"] == "622588******6789"  # PANs are masked for display
    assert pan not in repr(out)

    out = break_out("cup-pos", Message("0330", {"48": "0007", "60": "00000001207", "39": "00"}))
    assert out["48"] == {"count": "0007"}


def test_break_out_skips_fields_without_a_rule_for_that_message() -> None:
    # 48 in a CUP 0200 has no layout; 90 is an ISO 8583:1987 field
    out = break_out("cup-pos", Message("0200", {"48": "1234", "60": "2200000100050", "90": "0" * 42}))
    assert set(out) == {"60"}


def test_break_out_reports_a_broken_field_without_raising() -> None:
    out = break_out("cup-pos", Message("0200", {"60": "22000001", "61": "000001000002"}))
    assert "!error" in out["60"]
    assert out["61"] == {"orig_batch": "000001", "orig_trace": "000002"}


def test_break_out_iso87_and_dialect_paths() -> None:
    key = "0123456789ABCDEF" * 2
    msg = Message("0810", {"39": "00", "48": key + "A1B2C3D4", "70": "101"})
    out = break_out("iso87-ascii", msg)
    assert out["48"] == {"key_under_zmk": "<redacted 32>", "kcv": "A1B2C3D4"}
    assert break_out("specs/iso87-ascii.toml", msg) == out
    reversal = Message("0400", {"90": "0200" + "000123" + "0102030405" + "0" * 22})
    assert break_out("iso87-ascii", reversal)["90"]["orig_stan"] == "000123"
    assert break_out("unknown-dialect", reversal) == {}


# --- totals ----------------------------------------------------------------------------------------


def test_settlement_totals_round_trip_and_positions() -> None:
    totals = SettlementTotals(CardTotals(123456, 12, 789, 3), CardTotals(5, 1, 0, 0))
    value = totals.to_field48()
    assert len(value) == 62
    assert value[:12] == "000000123456" and value[12:15] == "012"
    assert value[30] == "0" and value[61] == "0"  # result codes at positions 31 and 62 (1-based)
    assert SettlementTotals.from_field48(value) == totals


def test_reconciliation_sets_the_result_codes() -> None:
    claimed = SettlementTotals().__class__(CardTotals().add_debit(1000).add_debit(500).add_credit(500))
    assert claimed.domestic == CardTotals(1500, 2, 500, 1)
    same = claimed.reconciled(SettlementTotals(CardTotals(1500, 2, 500, 1)))
    assert same.balanced
    value = same.to_field48()
    assert value[30] == RESULT_BALANCED and value[61] == RESULT_BALANCED
    off = claimed.reconciled(SettlementTotals(CardTotals(1500, 2, 0, 0)))
    assert not off.balanced
    assert off.domestic.result == RESULT_NOT_BALANCED and off.foreign.result == RESULT_BALANCED


@pytest.mark.parametrize(
    ("totals", "field"),
    [
        (SettlementTotals(CardTotals(10**12, 1)), "48.1"),
        (SettlementTotals(CardTotals(1, 1000)), "48.2"),
        (SettlementTotals(foreign=CardTotals(credit_count=-1)), "48.9"),
        (SettlementTotals(CardTotals(result="9")), "48.5"),
    ],
)
def test_totals_that_do_not_fit_raise(totals: SettlementTotals, field: str) -> None:
    with pytest.raises(SubfieldError) as info:
        totals.to_field48()
    assert info.value.field == field


def test_batch_items_round_trip_and_masking() -> None:
    items = [BatchItem("00", f"{i:06d}", "6225880123456789" + str(i), 100 * i) for i in range(1, 9)]
    value = pack_batch_items(items)
    assert len(value) == 322
    assert unpack_batch_items(value) == items
    assert "6225880123456789" not in repr(items[0])
    with pytest.raises(SubfieldError):
        pack_batch_items([*items, items[0]])
    with pytest.raises(SubfieldError):
        pack_batch_items([])
    with pytest.raises(SubfieldError) as info:
        pack_batch_items([BatchItem("02", "000001", "6225880123456789", 1)])
    assert info.value.field == "48.item1.card_org"


def test_batch_end_round_trip() -> None:
    assert pack_batch_end(17) == "0017"
    assert unpack_batch_end("0017") == 17
    with pytest.raises(SubfieldError):
        pack_batch_end(10000)


@pytest.mark.parametrize(
    "toml",
    [
        '[layouts.x]\nfield = "1"\nparts = [{ id = "1.1", name = "a", len = 1, fmt = "n", optional = true },'
        ' { id = "1.2", name = "b", len = 1, fmt = "n" }]\n',  # mandatory after optional
        '[layouts.x]\nfield = "1"\nparts = [{ id = "1.1", name = "a", len = 1, fmt = "q" }]\n',  # bad format
        '[layouts.x]\nfield = "1"\nparts = [{ id = "1.1", len = 1, fmt = "n" }]\n',  # no name
        '[breakout]\n"cup-pos" = [{ field = "60", layout = "nope" }]\n',  # unknown layout
        "[layouts.x\n",  # not TOML
    ],
)
def test_a_malformed_layout_file_is_a_spec_error(toml: str, tmp_path, monkeypatch) -> None:
    bad = tmp_path / "subfields.toml"
    bad.write_text(toml, encoding="utf-8")
    monkeypatch.setattr(subfields, "spec_path", lambda name: bad)
    subfields._spec.cache_clear()
    try:
        with pytest.raises(subfields.LayoutSpecError) as info:
            layout_names()
        assert info.value.kind == "spec"
    finally:
        monkeypatch.undo()
        subfields._spec.cache_clear()  # the next use reloads the real file
    assert "cup.60" in layout_names()
