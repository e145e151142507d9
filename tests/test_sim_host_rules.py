"""Host simulator rules without sockets: every decision code, balances, reversals, faults, config."""

from __future__ import annotations

import pytest

from gateway.iso.message import Message
from gateway.sim.host_rules import (
    Account,
    Fault,
    FaultPlan,
    HostRules,
    HostRulesConfig,
    PinInput,
    SimConfigError,
    TxnKey,
    fault_from_dict,
    pan_of,
)

PAN = "6222020000000018"
OTHER_PAN = "6222030000000017"  # its own range with a low balance
LOST_PAN = "6229990000000011"
UNKNOWN_PAN = "9999990000000011"

CONFIG = HostRulesConfig(
    accounts=(
        Account("alice", 100_000, ("622202",), pin="1234", limit=50_000),
        Account("bob", 1_000, ("622203",)),
        Account("lost", 9_000, ("622999",), rc="41"),
    ),
    pins={PAN: "4321"},
    limit=80_000,
    seed=3,
)

_stan = 0


def request(pc: str, amount: int | None, pan: str = PAN, *, mti: str = "0200", **extra: str) -> Message:
    global _stan
    _stan += 1
    fields = {"2": pan, "3": pc, "7": "0102030405", "11": f"{_stan:06d}", "32": "1234", "41": "TERM0001"}
    if amount is not None:
        fields["4"] = f"{amount:012d}"
    fields.update(extra)
    return Message(mti, fields)


def field_90(original: Message) -> str:
    key = TxnKey.of_request(original)
    return f"{key}{'0' * 11}"


def reversal_of(original: Message, mti: str = "0400") -> Message:
    return Message(mti, {**original.fields, "11": "999999", "90": field_90(original)})


@pytest.fixture
def rules() -> HostRules:
    return HostRules(CONFIG)


def test_purchase_approved_debits_and_issues_rrn_and_auth_code(rules: HostRules):
    d = rules.financial(request("000000", 2_500), PinInput(True, "4321"))
    assert d.rc == "00"
    assert len(d.rrn) == 12 and d.rrn.isdigit()
    assert d.auth_code is not None and len(d.auth_code) == 6
    assert rules.balance("alice") == 97_500
    assert rules.balance(PAN) == 97_500


def test_rrns_are_unique(rules: HostRules):
    rrns = {rules.financial(request("000000", 1)).rrn for _ in range(50)}
    assert len(rrns) == 50


def test_unknown_card_range_is_14(rules: HostRules):
    d = rules.financial(request("000000", 100, UNKNOWN_PAN))
    assert d.rc == "14" and d.auth_code is None


def test_missing_pan_is_14(rules: HostRules):
    msg = request("000000", 100)
    del msg.fields["2"]
    assert rules.financial(msg).rc == "14"


def test_pan_from_track_2_with_either_separator(rules: HostRules):
    for sep in ("=", "D"):
        msg = request("000000", 100)
        del msg.fields["2"]
        msg.fields["35"] = f"{PAN}{sep}30122010000000000"
        assert pan_of(msg) == PAN
        assert rules.financial(msg).rc == "00"


def test_wrong_pin_is_55_and_changes_nothing(rules: HostRules):
    d = rules.financial(request("000000", 100), PinInput(True, "1234"))  # the range PIN, not the card's
    assert d.rc == "55"
    assert rules.balance("alice") == 100_000


def test_range_pin_applies_when_no_card_pin(rules: HostRules):
    other_alice_card = "6222020000000026"
    assert rules.financial(request("000000", 100, other_alice_card), PinInput(True, "1234")).rc == "00"
    assert rules.financial(request("000000", 100, other_alice_card), PinInput(True, "0000")).rc == "55"


def test_undecryptable_pin_block_is_99(rules: HostRules):
    assert rules.financial(request("000000", 100), PinInput(True, None)).rc == "99"


def test_amount_over_account_limit_is_61(rules: HostRules):
    assert rules.financial(request("000000", 50_001)).rc == "61"
    assert rules.financial(request("000000", 50_000)).rc == "00"


def test_global_limit_applies_without_account_limit():
    rules = HostRules(HostRulesConfig(accounts=(Account("rich", 10**9, ("5",)),), limit=1_000))
    assert rules.financial(request("000000", 1_001, "5100000000000008")).rc == "61"


def test_insufficient_balance_is_51(rules: HostRules):
    assert rules.financial(request("000000", 1_001, OTHER_PAN)).rc == "51"
    assert rules.financial(request("000000", 1_000, OTHER_PAN)).rc == "00"
    assert rules.financial(request("000000", 1, OTHER_PAN)).rc == "51"
    assert rules.balance("bob") == 0


def test_zero_amount_is_13(rules: HostRules):
    assert rules.financial(request("000000", 0)).rc == "13"
    assert rules.financial(request("000000", None)).rc == "13"


def test_forced_account_decline(rules: HostRules):
    assert rules.financial(request("000000", 10, LOST_PAN)).rc == "41"


def test_unsupported_processing_code_is_40(rules: HostRules):
    assert rules.financial(request("400000", 10)).rc == "40"


def test_duplicate_request_is_94_and_not_debited_twice(rules: HostRules):
    msg = request("000000", 700)
    assert rules.financial(msg).rc == "00"
    assert rules.financial(msg).rc == "94"
    assert rules.balance("alice") == 99_300


def test_refund_credits(rules: HostRules):
    assert rules.financial(request("200000", 1_234)).rc == "00"
    assert rules.balance("alice") == 101_234


def test_balance_inquiry_reports_balance(rules: HostRules):
    rules.financial(request("000000", 400))
    d = rules.financial(request("310000", None))
    assert d.rc == "00" and d.balance == 99_600


def test_void_by_rrn_credits_and_cannot_repeat(rules: HostRules):
    purchase = rules.financial(request("000000", 900))
    void = rules.financial(request("020000", 900, **{"37": purchase.rrn}))
    assert void.rc == "00"
    assert rules.balance("alice") == 100_000
    assert purchase.entry is not None and purchase.entry.voided
    assert rules.financial(request("020000", 900, **{"37": purchase.rrn})).rc == "12"


def test_void_by_field_90(rules: HostRules):
    original = request("000000", 900)
    rules.financial(original)
    assert rules.financial(request("020000", 900, **{"90": field_90(original)})).rc == "00"


def test_void_wrong_amount_is_64_and_unknown_is_25(rules: HostRules):
    purchase = rules.financial(request("000000", 900))
    assert rules.financial(request("020000", 901, **{"37": purchase.rrn})).rc == "64"
    assert rules.financial(request("020000", 900, **{"37": "000000000000"})).rc == "25"


def test_reversal_restores_and_is_idempotent(rules: HostRules):
    original = request("000000", 5_000)
    rules.financial(original)
    assert rules.balance("alice") == 95_000
    assert rules.reversal(reversal_of(original)).rc == "00"
    assert rules.balance("alice") == 100_000
    # a repeat (0401) and a duplicate 0400 answer 00 and change nothing
    assert rules.reversal(reversal_of(original, "0401")).rc == "00"
    assert rules.reversal(reversal_of(original)).rc == "00"
    assert rules.balance("alice") == 100_000
    assert rules.reversal_count(original) == 3
    assert rules.reversal_count(field_90(original)) == 3
    assert [e.key for e in rules.reversed()] == [TxnKey.of_request(original)]


def test_reversal_of_unknown_original_is_25_by_default_and_counted(rules: HostRules):
    ghost = request("000000", 10)
    assert rules.reversal(reversal_of(ghost)).rc == "25"
    assert rules.reversal_count(ghost) == 1


def test_reversal_unknown_original_code_is_configurable():
    rules = HostRules(HostRulesConfig(unknown_original_rc="00"))
    assert rules.reversal(reversal_of(request("000000", 10))).rc == "00"


def test_reversal_of_declined_original_changes_nothing(rules: HostRules):
    declined = request("000000", 999_999)
    assert rules.financial(declined).rc == "61"
    assert rules.reversal(reversal_of(declined)).rc == "00"
    assert rules.balance("alice") == 100_000


def test_reversal_rejects_first_k_attempts(rules: HostRules):
    original = request("000000", 300)
    rules.financial(original)
    codes = [rules.reversal(reversal_of(original), reject_first=2).rc for _ in range(4)]
    assert codes == ["96", "96", "00", "00"]
    assert rules.balance("alice") == 100_000
    assert rules.reversal_count(original) == 4


def test_reversal_of_refund_and_of_void(rules: HostRules):
    refund = request("200000", 100)
    rules.financial(refund)
    rules.reversal(reversal_of(refund))
    assert rules.balance("alice") == 100_000
    purchase_msg = request("000000", 800)
    purchase = rules.financial(purchase_msg)
    void = request("020000", 800, **{"37": purchase.rrn})
    rules.financial(void)
    assert rules.balance("alice") == 100_000
    rules.reversal(reversal_of(void))  # undoing the void re-debits and re-opens the purchase
    assert rules.balance("alice") == 99_200
    assert purchase.entry is not None and not purchase.entry.voided


def test_cup_style_reversal_matches_terminal_and_stan(rules: HostRules):
    original = request("000000", 250)
    rules.financial(original)
    cup_reversal = Message("0400", {k: v for k, v in original.fields.items() if k != "90"} | {"39": "98"})
    assert rules.reversal(cup_reversal).rc == "00"
    assert rules.balance("alice") == 100_000


def test_field_90_parse_errors():
    with pytest.raises(ValueError):
        TxnKey.from_field_90("12")
    assert str(TxnKey.from_field_90("0200" + "000123" + "0102030405" + "00000001234" + "0" * 11)) == (
        "0200000123010203040500000001234"
    )


# --- faults ----------------------------------------------------------------------------------------


def test_fault_selectors_pan_mti_nth_every_limit():
    plan = FaultPlan(
        [
            Fault("drop", pan=PAN),
            Fault("delay", seconds=0.5, mti=("0400",)),
            Fault("garbage", nth=3),
            Fault("wrong_mac", every=2, limit=2),
        ]
    )
    picks = [[f.kind for f in plan.select("0200", PAN if i == 0 else OTHER_PAN)] for i in range(6)]
    assert picks[0] == ["drop"]
    assert picks[1] == ["wrong_mac"]
    assert picks[2] == ["garbage"]
    assert picks[3] == ["wrong_mac"]
    assert picks[5] == []  # wrong_mac limit reached
    assert [f.kind for f in plan.select("0400", None)] == ["delay"]
    assert plan.fired("wrong_mac") == 2


def test_fault_rate_is_seeded_and_repeatable():
    def run(seed: int) -> list[bool]:
        plan = FaultPlan([Fault("drop", rate=0.3)], seed=seed)
        return [bool(plan.select("0200", PAN)) for _ in range(200)]

    first = run(11)
    assert first == run(11)
    assert 30 < sum(first) < 90


def test_fault_plan_changes_at_run_time():
    plan = FaultPlan()
    assert plan.select("0200", PAN) == []
    plan.add(Fault("disconnect"))
    assert [f.kind for f in plan.select("0200", PAN)] == ["disconnect"]
    plan.set([Fault("close_after", count=5)])
    assert plan.select("0200", PAN) == [] and plan.close_after() == 5
    plan.clear()
    assert plan.close_after() is None


def test_fault_repr_masks_pan():
    assert PAN not in repr(Fault("drop", pan=PAN))


# --- configuration ---------------------------------------------------------------------------------


def test_config_from_toml(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(
        """
limit = 5000
seed = 9
unknown_original_rc = "00"

[[accounts]]
id = "a"
balance = 10000
prefixes = ["411111"]
pin = "1111"

[pins]
"4111111111111111" = "2222"

[[faults]]
kind = "delay"
seconds = 0.25
mti = "0200"
rate = 0.5
"""
    )
    config = HostRulesConfig.from_toml(path)
    assert config.limit == 5000 and config.seed == 9 and config.unknown_original_rc == "00"
    assert config.accounts == (Account("a", 10000, ("411111",), pin="1111"),)
    assert config.pins == {"4111111111111111": "2222"}
    assert config.faults == (Fault("delay", seconds=0.25, mti=("0200",), rate=0.5),)
    rules = HostRules(config)
    assert rules.financial(request("000000", 100, "4111111111111111"), PinInput(True, "2222")).rc == "00"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"limit": -1}, "limit"),
        ({"limit": True}, "limit"),
        ({"bogus": 1}, "bogus"),
        ({"accounts": [{"id": "x", "balance": 1}]}, "accounts[0].prefixes"),
        ({"accounts": [{"id": "x", "balance": 1, "prefixes": ["4"], "pin": "12"}]}, "accounts[0].pin"),
        ({"faults": [{"kind": "explode"}]}, "faults[0].kind"),
        ({"faults": [{"kind": "drop", "rate": 2}]}, "faults[0].rate"),
        ({"faults": [{"kind": "drop", "mti": "20"}]}, "faults[0].mti"),
        ({"faults": [{"kind": "drop", "nth": 0}]}, "nth"),
        ({"pins": {"4111111111111111": "x"}}, "pins.411111******1111"),
        ({"unknown_original_rc": "000"}, "unknown_original_rc"),
    ],
)
def test_config_errors_name_the_key(data, needle):
    with pytest.raises(SimConfigError, match=__import__("re").escape(needle)):
        HostRulesConfig.from_dict(data)


def test_config_error_never_shows_the_pan():
    with pytest.raises(SimConfigError) as info:
        HostRulesConfig.from_dict({"pins": {"4111111111111111": "x"}})
    assert "4111111111111111" not in str(info.value)


def test_missing_toml_file_is_a_config_error(tmp_path):
    with pytest.raises(SimConfigError, match=r"nope\.toml"):
        HostRulesConfig.from_toml(tmp_path / "nope.toml")


def test_fault_from_dict_defaults():
    assert fault_from_dict({"kind": "garbage", "garbage": "length"}) == Fault("garbage", garbage="length")
