"""`SoftwareSecurityModule` end to end against the clear-key functions the terminal and host
simulators use: sign-in, MACs both ways, PIN translation, track decryption, host key exchange."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.config import SecurityConfig, TerminalEntry
from gateway.security import algorithms as alg
from gateway.security.errors import (
    KcvMismatchError,
    KeyBlockError,
    KeyFormatError,
    KeyNotFoundError,
    KeyStoreError,
    KeyUsageError,
    MacError,
    PinFormatError,
    SecurityError,
    TrackDataError,
)
from gateway.security.keys import KeyUsage
from gateway.security.keystore import LMK_ENV, KeyStore, LocalMasterKey
from gateway.security.module import SecurityModule, SoftwareSecurityModule

TID = "12345678"
PAN = "6222021234567890123"
TRACK2 = "6222021234567890123D49121010000000000"


class Terminal:
    """The terminal side, as the simulator does it: clear TMK, keys parsed from field 62."""

    def __init__(self, tmk: bytes) -> None:
        self.tmk = tmk
        self.keys: dict[KeyUsage, bytes] = {}

    def sign_in(self, block: bytes, mode: str) -> None:
        self.keys = alg.parse_key_block(self.tmk, block, mode)

    def mac(self, mab: bytes, algorithm: str = "cup-ecb") -> bytes:
        return alg.terminal_mac(self.keys[KeyUsage.MAK], mab, algorithm)


class Host:
    """The host side: clear ZMK, makes zone keys, checks PINs and MACs."""

    def __init__(self, zmk: bytes) -> None:
        self.zmk = zmk
        self.zpk, self.zpk_under, self.zpk_kcv = alg.make_zone_key_under_zmk(zmk)
        self.zak, self.zak_under, self.zak_kcv = alg.make_zone_key_under_zmk(zmk)


@pytest.fixture
def tmk() -> bytes:
    return alg.generate_key(16)


@pytest.fixture
def host() -> Host:
    return Host(alg.generate_key(16))


@pytest.fixture
def hsm(tmk: bytes, host: Host) -> SoftwareSecurityModule:
    module = SoftwareSecurityModule()
    module.import_clear_key("TMK", tmk, TID)
    module.import_clear_key("ZMK", host.zmk)
    module.install_host_key("ZPK", host.zpk_under, host.zpk_kcv)
    module.install_host_key("ZAK", host.zak_under, host.zak_kcv)
    return module


@pytest.fixture
def terminal(hsm: SoftwareSecurityModule, tmk: bytes) -> Terminal:
    t = Terminal(tmk)
    t.sign_in(hsm.issue_working_keys(TID, "004"), "004")
    return t


def test_it_is_a_security_module(hsm):
    assert isinstance(hsm, SecurityModule)


@pytest.mark.parametrize(("mode", "usages"), [("001", {"PIK", "MAK"}), ("003", {"PIK", "MAK"}),
                                               ("004", {"PIK", "MAK", "TDK"})])
def test_sign_in_issues_keys_the_terminal_can_parse(hsm, tmk, mode, usages):
    block = hsm.issue_working_keys(TID, mode)
    keys = alg.parse_key_block(tmk, block, mode)
    assert {str(u) for u in keys} == usages
    assert hsm.has_working_keys(TID)
    for usage, clear in keys.items():
        assert hsm.key_check_value(str(usage), TID) == alg.kcv(clear)
    assert len(keys[KeyUsage.MAK]) == 8  # CUP ECB MAC: single-length MAK


def test_every_sign_in_changes_the_keys(hsm, tmk):
    first = alg.parse_key_block(tmk, hsm.issue_working_keys(TID), "004")
    second = alg.parse_key_block(tmk, hsm.issue_working_keys(TID), "004")
    assert all(first[u] != second[u] for u in first)


def test_mode_without_tdk_drops_the_old_tdk(hsm, terminal):
    hsm.issue_working_keys(TID, "003")
    with pytest.raises(KeyNotFoundError, match="no TDK"):
        hsm.decrypt_track2(TID, alg.encrypt_track(terminal.keys[KeyUsage.TDK], TRACK2))


def test_terminal_mac_both_ways(hsm, terminal):
    mab = os.urandom(340)
    hsm.verify_terminal_mac(TID, mab, terminal.mac(mab))
    hsm.verify_terminal_mac(TID, mab, terminal.mac(mab).lower())  # hex case does not matter
    response_mab = os.urandom(120)
    assert hsm.generate_terminal_mac(TID, response_mab) == terminal.mac(response_mab)


def test_terminal_mac_failures_are_a0(hsm, terminal):
    mab = os.urandom(200)
    mac = terminal.mac(mab)
    tampered = bytes([mab[0] ^ 1]) + mab[1:]
    cases = [
        (tampered, mac, None, "does not verify"),
        (mab, b"00000000", None, "does not verify"),
        (mab, mac[:7], None, "must be 8 bytes"),
        (b"", mac, None, "empty"),
        (mab[:-8], mac, len(mab), "the message says"),
    ]
    for data, m, expected_length, reason in cases:
        with pytest.raises(MacError, match=reason) as info:
            hsm.verify_terminal_mac(TID, data, m, expected_length=expected_length)
        assert info.value.response_code == "A0"


def test_x919_terminal_mac_uses_a_double_length_mak(tmk, host):
    hsm = SoftwareSecurityModule(terminal_mac="x919")
    hsm.import_clear_key("TMK", tmk, TID)
    block = hsm.issue_working_keys(TID, "004")
    keys = alg.parse_key_block(tmk, block, "004")
    assert len(keys[KeyUsage.MAK]) == 16
    assert block[28:36] != bytes(8)  # the MAK fills the slot the zeros held
    mab = os.urandom(300)
    expected = alg.retail_mac(keys[KeyUsage.MAK], mab)[:4].hex().upper().encode()
    assert hsm.generate_terminal_mac(TID, mab) == expected
    hsm.verify_terminal_mac(TID, mab, expected)
    with pytest.raises(MacError):
        hsm.verify_terminal_mac(TID, mab, alg.cup_mac(keys[KeyUsage.MAK][:8], mab))


def test_unknown_terminal_mac_algorithm():
    with pytest.raises(SecurityError, match="terminal MAC algorithm"):
        SoftwareSecurityModule(terminal_mac="cbc")


def test_not_signed_in_and_sign_off(hsm, terminal):
    mab = b"x" * 40
    with pytest.raises(KeyNotFoundError, match="not signed in") as info:
        hsm.verify_terminal_mac("87654321", mab, b"00000000")
    assert info.value.response_code == "A7"
    hsm.drop_working_keys(TID)
    assert not hsm.has_working_keys(TID)
    with pytest.raises(KeyNotFoundError):
        hsm.generate_terminal_mac(TID, mab)
    hsm.drop_working_keys(TID)  # twice is fine


def test_sign_in_needs_a_tmk_and_a_known_mode(hsm):
    assert not hsm.has_terminal_master_key("87654321")
    with pytest.raises(KeyNotFoundError, match="no TMK/87654321"):
        hsm.issue_working_keys("87654321")
    with pytest.raises(KeyBlockError, match="unknown key mode"):
        hsm.issue_working_keys(TID, "005")


def test_pin_translation_to_the_host(hsm, terminal, host):
    block = alg.encrypt_pin_block(terminal.keys[KeyUsage.PIK], "135790", PAN)
    under_zpk = hsm.translate_pin_to_host(TID, block, PAN)
    assert alg.check_pin_block(host.zpk, under_zpk, PAN, "135790")
    assert not alg.check_pin_block(host.zpk, under_zpk, PAN, "135791")
    # the without-PAN variant (53.1 = 1)
    no_pan = alg.encrypt_pin_block(terminal.keys[KeyUsage.PIK], "1357", None)
    assert alg.check_pin_block(host.zpk, hsm.translate_pin_to_host(TID, no_pan, None), None, "1357")


def test_pin_translation_failures_are_99(hsm, terminal):
    pik = terminal.keys[KeyUsage.PIK]
    good = alg.encrypt_pin_block(pik, "1234", PAN)
    bad_fill = (int.from_bytes(alg.make_pin_block("1234", PAN), "big") ^ 1).to_bytes(8, "big")
    bad_cases = [
        os.urandom(8),  # garbage
        alg.encrypt_ecb(pik, bad_fill),  # last fill nibble E instead of F
        alg.encrypt_pin_block(pik, "1234", PAN, fmt=3),  # format 3 is not format 0
        good[:7],
    ]
    for block in bad_cases:
        with pytest.raises(PinFormatError) as info:
            hsm.translate_pin_to_host(TID, block, PAN)
        assert info.value.response_code == "99"
    with pytest.raises(PinFormatError):
        hsm.translate_pin_to_host(TID, good, "6222021234567890993")  # bound to another PAN


def test_track2_decryption(hsm, terminal):
    encrypted = alg.encrypt_track(terminal.keys[KeyUsage.TDK], TRACK2)
    assert encrypted != TRACK2
    assert hsm.decrypt_track2(TID, encrypted) == TRACK2
    with pytest.raises(TrackDataError):
        hsm.decrypt_track2(TID, "ZZ")


def test_host_mac_both_ways(hsm, host):
    mab = os.urandom(340)
    mac = hsm.generate_host_mac(mab)
    assert len(mac) == 8 and mac == alg.retail_mac(host.zak, mab)
    hsm.verify_host_mac(mab, alg.retail_mac(host.zak, mab))
    for data, m, reason in ((mab[1:], mac, "does not verify"), (mab, mac[:4], "must be 8 bytes"),
                            (b"", mac, "empty")):
        with pytest.raises(MacError, match=reason):
            hsm.verify_host_mac(data, m)
    with pytest.raises(MacError, match="message says"):
        hsm.verify_host_mac(mab, mac, expected_length=341)


def test_host_key_exchange_verifies_the_kcv_before_installing(hsm, host):
    old_kcv = hsm.key_check_value("ZAK")
    clear, under, kcv = alg.make_zone_key_under_zmk(host.zmk)
    with pytest.raises(KcvMismatchError):
        hsm.install_host_key("ZAK", under, bytes(3))
    assert hsm.key_check_value("ZAK") == old_kcv  # the old key stays
    hsm.install_host_key("ZAK", under, kcv)
    assert hsm.key_check_value("ZAK") == alg.kcv(clear)
    assert hsm.generate_host_mac(b"abc") == alg.retail_mac(clear, b"abc")


def test_host_key_exchange_refuses_other_usages_and_a_missing_zmk(host):
    hsm = SoftwareSecurityModule()
    with pytest.raises(KeyNotFoundError, match="no ZMK"):
        hsm.install_host_key("ZPK", host.zpk_under, host.zpk_kcv)
    hsm.import_clear_key("ZMK", host.zmk)
    for usage in ("TMK", "PIK", "ZMK"):
        with pytest.raises(KeyUsageError, match="only a ZPK or ZAK"):
            hsm.install_host_key(usage, host.zpk_under, host.zpk_kcv)
    with pytest.raises(KeyNotFoundError, match="no ZAK installed"):
        hsm.generate_host_mac(b"abc")


def test_import_refuses_bad_keys():
    hsm = SoftwareSecurityModule()
    with pytest.raises(KeyFormatError, match="parity"):
        hsm.import_clear_key("TMK", bytes.fromhex("0022446688AACCEE0022446688AACCEF"), TID)
    with pytest.raises(KeyFormatError, match="weak"):
        hsm.import_clear_key("TMK", bytes.fromhex("0101010101010101"), TID)
    with pytest.raises(KeyFormatError, match="8, 16 or 24"):
        hsm.import_clear_key("TMK", bytes(10), TID)


def test_working_keys_persist_in_the_store_file(tmp_path, tmk):
    lmk = LocalMasterKey.generate()
    path = tmp_path / "keys.store"
    hsm = SoftwareSecurityModule(KeyStore.create(path, lmk))
    hsm.import_clear_key("TMK", tmk, TID)
    keys = alg.parse_key_block(tmk, hsm.issue_working_keys(TID), "004")
    reopened = SoftwareSecurityModule(KeyStore.open(path, lmk))
    mab = os.urandom(64)
    reopened.verify_terminal_mac(TID, mab, alg.cup_mac(keys[KeyUsage.MAK], mab))
    hsm.drop_working_keys(TID)
    assert not SoftwareSecurityModule(KeyStore.open(path, lmk)).has_working_keys(TID)


def test_from_config_in_memory_and_with_a_store(tmp_path, monkeypatch, tmk, host):
    mid = "123456789012345"
    terminals = [TerminalEntry(TID, mid, tmk.hex()), TerminalEntry("00000002", mid)]
    hsm = SoftwareSecurityModule.from_config(SecurityConfig(zmk=host.zmk.hex()), terminals)
    assert hsm.store.path is None
    assert hsm.key_check_value("TMK", TID) == alg.kcv(tmk)
    assert hsm.key_check_value("ZMK") == alg.kcv(host.zmk)
    assert not hsm.has_terminal_master_key("00000002")

    lmk = LocalMasterKey.generate()
    monkeypatch.setenv(LMK_ENV, lmk.to_hex())
    config = SecurityConfig(keystore=tmp_path / "k.store", terminal_mac="x919")
    with pytest.raises(KeyStoreError, match=r"k.store does not exist: create it with `gateway keys init --store"):
        SoftwareSecurityModule.from_config(config, terminals)  # a missing store is never made up
    KeyStore.create(Path(config.keystore), lmk)
    filed = SoftwareSecurityModule.from_config(config, terminals)
    assert filed.terminal_mac_algorithm == "x919"
    assert KeyStore.open(Path(config.keystore), lmk).get(KeyUsage.TMK, TID).kcv == alg.kcv(tmk)
    # opening again finds the existing store
    assert SoftwareSecurityModule.from_config(config).has_terminal_master_key(TID)


def test_from_config_rejects_a_bad_demo_key():
    with pytest.raises(KeyFormatError, match="ZMK is not valid hex"):
        SoftwareSecurityModule.from_config(SecurityConfig(zmk="nothex"))


def test_response_codes():
    assert MacError.response_code == "A0"
    assert PinFormatError.response_code == "99"
    for cls in (KeyNotFoundError, KeyUsageError, KeyFormatError, KcvMismatchError, KeyBlockError,
                TrackDataError):
        assert issubclass(cls, SecurityError) and cls.response_code == "A7"
    assert issubclass(MacError, SecurityError) and issubclass(PinFormatError, SecurityError)


def test_sign_ins_from_worker_threads_with_a_store_file(tmp_path):
    """Sign-in may be pushed to a worker thread (it fsyncs); concurrent sign-ins and MACs stay
    consistent and every terminal's keys end up in the file."""
    import threading

    lmk = LocalMasterKey.generate()
    path = tmp_path / "keys.store"
    hsm = SoftwareSecurityModule(KeyStore.create(path, lmk))
    tmks = {f"T{i:07d}": alg.generate_key(16) for i in range(8)}
    for tid, key in tmks.items():
        hsm.import_clear_key("TMK", key, tid, save=False)
    hsm.store.save()
    macs: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def worker(tids: list[str]) -> None:
        try:
            for tid in tids:
                for _ in range(3):
                    keys = alg.parse_key_block(tmks[tid], hsm.issue_working_keys(tid), "004")
                mab = os.urandom(50)
                hsm.verify_terminal_mac(tid, mab, alg.cup_mac(keys[KeyUsage.MAK], mab))
                macs[tid] = keys[KeyUsage.MAK]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    names = sorted(tmks)
    threads = [threading.Thread(target=worker, args=(names[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    reopened = KeyStore.open(path, lmk)
    for tid, mak in macs.items():
        assert reopened.get(KeyUsage.MAK, tid).cipher.same_key(alg.DesKey(mak))


def test_terminal_mac_accepts_the_field_64_string(hsm, terminal):
    mab = os.urandom(64)
    hsm.verify_terminal_mac(TID, mab, terminal.mac(mab).hex())  # the Message value: the 8 bytes in hex
    for bad in ("ÄÄÄÄÄÄÄÄ", "FF" * 8, terminal.mac(mab).decode()):
        with pytest.raises(MacError):
            hsm.verify_terminal_mac(TID, mab, bad)
