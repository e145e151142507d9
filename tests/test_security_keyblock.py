"""Field-62 working-key blocks (layouts 001/003/004 from specs/cup-keyblock.toml) and the host
zone-key exchange."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.security import algorithms as alg
from gateway.security.errors import KcvMismatchError, KeyBlockError, KeyFormatError
from gateway.security.keyblock import (
    default_layouts,
    get_layout,
    load_layouts,
    parse_layouts,
    spec_path,
    unwrap_zone_key,
)
from gateway.security.keys import KeyUsage

PIK, MAK, TDK = KeyUsage.PIK, KeyUsage.MAK, KeyUsage.TDK
SPEC = Path(__file__).resolve().parents[1] / "specs" / "cup-keyblock.toml"


def test_spec_file_is_the_one_loaded():
    assert spec_path() == SPEC
    layouts = default_layouts()
    assert set(layouts) == {"001", "003", "004"}
    assert [layouts[m].total for m in ("001", "003", "004")] == [24, 40, 60]


def test_layout_001_offsets():
    tmk = alg.generate_key(8)
    pik, mak = alg.generate_key(8), alg.generate_key(8)
    block = alg.build_key_block(tmk, {PIK: pik, MAK: mak}, "001")
    assert len(block) == 24
    assert block[0:8] == alg.encrypt_ecb(tmk, pik)
    assert block[8:12] == alg.kcv(pik, 4)
    assert block[12:20] == alg.encrypt_ecb(tmk, mak)
    assert block[20:24] == alg.kcv(mak, 4)
    assert alg.parse_key_block(tmk, block, "001") == {PIK: pik, MAK: mak}


def test_layout_003_has_eight_zero_bytes_after_the_mak():
    tmk = alg.generate_key(16)
    pik, mak = alg.generate_key(16), alg.generate_key(8)
    block = alg.build_key_block(tmk, {PIK: pik, MAK: mak}, "003")
    assert len(block) == 40
    assert block[0:16] == alg.encrypt_ecb(tmk, pik)
    assert block[16:20] == alg.kcv(pik, 4)
    assert block[20:28] == alg.encrypt_ecb(tmk, mak)
    assert block[28:36] == bytes(8)
    assert block[36:40] == alg.kcv(mak, 4)
    assert alg.parse_key_block(tmk, block, "003") == {PIK: pik, MAK: mak}


def test_layout_004_adds_the_tdk():
    tmk = alg.generate_key(16)
    keys = {PIK: alg.generate_key(16), MAK: alg.generate_key(8), TDK: alg.generate_key(16)}
    block = alg.build_key_block(tmk, keys, "004")
    assert len(block) == 60
    assert block[:40] == alg.build_key_block(tmk, {PIK: keys[PIK], MAK: keys[MAK]}, "003")
    assert block[40:56] == alg.encrypt_ecb(tmk, keys[TDK])
    assert block[56:60] == alg.kcv(keys[TDK], 4)
    assert alg.parse_key_block(tmk, block, "004") == keys


def test_double_length_mak_fills_its_slot():
    tmk = alg.generate_key(16)
    keys = {PIK: alg.generate_key(16), MAK: alg.generate_key(16), TDK: alg.generate_key(16)}
    block = alg.build_key_block(tmk, keys, "004")
    assert block[20:36] == alg.encrypt_ecb(tmk, keys[MAK])
    assert alg.parse_key_block(tmk, block, "004")[MAK] == keys[MAK]


@pytest.mark.parametrize(("mode", "cv_offsets"), [("001", (8, 20)), ("003", (16, 36)), ("004", (16, 36, 56))])
def test_check_value_mismatch_is_rejected(mode, cv_offsets):
    tmk = alg.generate_key(16)
    lay = get_layout(mode)
    keys = {s.usage: alg.generate_key(s.length) for s in lay.keys}
    block = alg.build_key_block(tmk, keys, mode)
    for usage, offset in zip(lay.usages, cv_offsets, strict=True):
        bad = bytearray(block)
        bad[offset] ^= 0x01
        with pytest.raises(KcvMismatchError, match=f"{usage} check value") as info:
            alg.parse_key_block(tmk, bytes(bad), mode)
        assert info.value.response_code == "A7"


def test_wrong_tmk_or_flipped_key_byte_is_rejected():
    tmk = alg.generate_key(16)
    keys = {PIK: alg.generate_key(16), MAK: alg.generate_key(8), TDK: alg.generate_key(16)}
    block = alg.build_key_block(tmk, keys, "004")
    with pytest.raises(KcvMismatchError):
        alg.parse_key_block(alg.generate_key(16), block, "004")
    bad = bytearray(block)
    bad[42] ^= 0x80  # inside the encrypted TDK
    with pytest.raises(KcvMismatchError, match="TDK"):
        alg.parse_key_block(tmk, bytes(bad), "004")


def test_wrong_block_length_and_unknown_mode():
    tmk = alg.generate_key(16)
    with pytest.raises(KeyBlockError, match="must be 60 bytes, got 59"):
        alg.parse_key_block(tmk, bytes(59), "004")
    with pytest.raises(KeyBlockError, match="unknown key mode '002'"):
        alg.parse_key_block(tmk, bytes(60), "002")


def test_build_refuses_missing_oversized_or_under_protected_keys():
    tmk16, tmk8 = alg.generate_key(16), alg.generate_key(8)
    with pytest.raises(KeyBlockError, match="needs a TDK"):
        alg.build_key_block(tmk16, {PIK: alg.generate_key(16), MAK: alg.generate_key(8)}, "004")
    with pytest.raises(KeyBlockError, match="does not fit"):
        alg.build_key_block(tmk16, {PIK: alg.generate_key(16), MAK: alg.generate_key(8)}, "001")
    with pytest.raises(KeyFormatError, match="cannot be protected by an 8-byte TMK"):
        alg.build_key_block(tmk8, {PIK: alg.generate_key(16), MAK: alg.generate_key(8)}, "003")


def test_custom_layout_file(tmp_path):
    """An acquirer variant: the MAK check value moved, loaded from its own file."""
    text = SPEC.read_text().split("[layouts.")[0] + (
        '[layouts."003"]\ntotal = 44\nkeys = [\n'
        '  { usage = "PIK", offset = 0, length = 16, slot = 16, cv_offset = 16 },\n'
        '  { usage = "MAK", offset = 20, length = 8, slot = 16, cv_offset = 40 },\n]\n'
    )
    path = tmp_path / "variant.toml"
    path.write_text(text)
    layouts = load_layouts(path)
    tmk = alg.generate_key(16)
    keys = {PIK: alg.generate_key(16), MAK: alg.generate_key(8)}
    block = alg.build_key_block(tmk, keys, "003", layouts)
    assert len(block) == 44 and block[40:44] == alg.kcv(keys[MAK], 4) and block[36:40] == bytes(4)
    assert alg.parse_key_block(tmk, block, "003", layouts) == keys


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"total": 24, "keys": [{"usage": "PIK", "offset": 0, "length": 8, "slot": 8, "cv_offset": 8}]},
         "at least a PIK and a MAK"),
        ({"total": 24, "keys": [{"usage": "PIK", "offset": 0, "length": 8, "slot": 8, "cv_offset": 8},
                                {"usage": "MAK", "offset": 10, "length": 8, "slot": 8, "cv_offset": 20}]},
         "overlaps"),
        ({"total": 20, "keys": [{"usage": "PIK", "offset": 0, "length": 8, "slot": 8, "cv_offset": 8},
                                {"usage": "MAK", "offset": 12, "length": 8, "slot": 8, "cv_offset": 20}]},
         "past total"),
        ({"total": 24, "keys": [{"usage": "ZPK", "offset": 0, "length": 8, "slot": 8, "cv_offset": 8}]},
         "expected one of PIK, MAK, TDK"),
        ({"total": 24, "keys": [{"usage": "PIK", "offset": 0, "length": 16, "slot": 8, "cv_offset": 8}]},
         "fit its slot"),
        ({"total": "24", "keys": []}, "total: expected a non-negative integer"),
    ],
)
def test_bad_layouts_are_refused(layout, message):
    with pytest.raises(KeyBlockError, match=message):
        parse_layouts({"cv_length": 4, "layouts": {"001": layout}})


def test_bad_layout_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("cv_length = [")
    with pytest.raises(KeyBlockError, match="not valid TOML"):
        load_layouts(path)
    with pytest.raises(KeyBlockError, match="cannot read"):
        load_layouts(tmp_path / "missing.toml")


# --- host zone-key exchange -------------------------------------------------------------------------


def test_zone_key_exchange_round_trip():
    zmk = alg.generate_key(16)
    clear, under_zmk, kcv = alg.make_zone_key_under_zmk(zmk)
    assert len(clear) == 16 and alg.has_odd_parity(clear)
    assert under_zmk == alg.encrypt_ecb(zmk, clear)
    assert kcv == alg.kcv(clear, 3)
    installed = unwrap_zone_key(zmk, under_zmk, kcv)
    assert installed.same_key(alg.DesKey(clear))
    # a 4-byte check value works as well
    assert unwrap_zone_key(zmk, under_zmk, alg.kcv(clear, 4)).same_key(installed)


def test_zone_key_kcv_mismatch_wrong_zmk_and_bad_lengths():
    zmk = alg.generate_key(16)
    _clear, under_zmk, kcv = alg.make_zone_key_under_zmk(zmk)
    with pytest.raises(KcvMismatchError, match="not installed"):
        unwrap_zone_key(zmk, under_zmk, bytes([kcv[0] ^ 1]) + kcv[1:])
    with pytest.raises(KcvMismatchError):
        unwrap_zone_key(alg.generate_key(16), under_zmk, kcv)
    with pytest.raises(KeyFormatError, match="3-8 bytes"):
        unwrap_zone_key(zmk, under_zmk, kcv[:2])
    with pytest.raises(KeyFormatError, match="8, 16 or 24 bytes, got 15"):
        unwrap_zone_key(zmk, under_zmk[:15], kcv)
    with pytest.raises(KeyFormatError, match="cannot be protected"):
        alg.make_zone_key_under_zmk(alg.generate_key(8), 16)


def test_zone_key_without_parity_is_refused_after_its_kcv_matched():
    zmk = alg.generate_key(16)
    no_parity = bytes(b & 0xFE for b in alg.generate_key(16))  # every byte even
    under = alg.encrypt_ecb(zmk, no_parity)
    with pytest.raises(KeyFormatError, match="parity"):
        unwrap_zone_key(zmk, under, alg.kcv(no_parity))
