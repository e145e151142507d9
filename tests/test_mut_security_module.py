"""Promises of gateway/security/module.py that mutation testing (issue 16) found unasserted.

What an operator reads (the refusals name the key and say why, the logs name the terminal and the
KCVs), what is on disk when (a key import is saved unless deferred; a deferred one is not), and what
the module accepts (a terminal has working keys only with both PIK and MAK; the key-block layouts it
was given, not the built-in ones; mode 004 when none is named)."""

from __future__ import annotations

import logging
import re

import pytest

from gateway.config import SecurityConfig, TerminalEntry
from gateway.security import algorithms as alg
from gateway.security.errors import KcvMismatchError, KeyBlockError, KeyFormatError, KeyStoreError, MacError
from gateway.security.keyblock import default_layouts
from gateway.security.keys import KeyUsage
from gateway.security.keystore import KeyStore, LocalMasterKey, write_lmk_file
from gateway.security.module import SoftwareSecurityModule

TID = "12345678"
LOGGER = "gateway.security"


@pytest.fixture
def tmk() -> bytes:
    return alg.generate_key(16)


@pytest.fixture
def zmk() -> bytes:
    return alg.generate_key(16)


def test_a_terminal_has_working_keys_only_with_both_pik_and_mak(tmk):
    hsm = SoftwareSecurityModule()
    hsm.import_clear_key("TMK", tmk, TID)
    hsm.issue_working_keys(TID, "004")
    assert hsm.has_working_keys(TID)
    hsm.store.remove([KeyUsage.MAK], TID)
    assert not hsm.has_working_keys(TID)


def test_sign_in_without_a_mode_issues_the_mode_004_keys(tmk):
    hsm = SoftwareSecurityModule()
    hsm.import_clear_key("TMK", tmk, TID)
    keys = alg.parse_key_block(tmk, hsm.issue_working_keys(TID), "004")
    assert set(keys) == {KeyUsage.PIK, KeyUsage.MAK, KeyUsage.TDK}


def test_the_module_uses_the_key_block_layouts_it_was_given(tmk):
    hsm = SoftwareSecurityModule(layouts={"007": default_layouts()["004"]})
    hsm.import_clear_key("TMK", tmk, TID)
    assert hsm.issue_working_keys(TID, "007")
    with pytest.raises(KeyBlockError, match="unknown key mode '004'"):
        hsm.issue_working_keys(TID, "004")


def test_an_import_is_saved_at_once_unless_deferred(tmp_path, tmk):
    lmk = LocalMasterKey.generate()
    path = tmp_path / "keys.store"
    hsm = SoftwareSecurityModule(KeyStore.create(path, lmk))
    hsm.import_clear_key("TMK", tmk, TID)
    assert KeyStore.open(path, lmk).find(KeyUsage.TMK, TID) is not None
    hsm.import_clear_key("TMK", alg.generate_key(16), "87654321", save=False)
    assert KeyStore.open(path, lmk).find(KeyUsage.TMK, "87654321") is None
    hsm.store.save()
    assert KeyStore.open(path, lmk).find(KeyUsage.TMK, "87654321") is not None


def test_a_malformed_or_weak_key_is_named_in_the_refusal():
    hsm = SoftwareSecurityModule()
    with pytest.raises(KeyFormatError, match=rf"^TMK {TID} must be 8, 16 or 24 bytes, got 10$"):
        hsm.import_clear_key("TMK", bytes(10), TID)
    with pytest.raises(KeyFormatError, match=r"^ZMK is a weak DES key$"):
        hsm.import_clear_key("ZMK", bytes.fromhex("0101010101010101"))


def test_a_host_key_with_a_wrong_check_value_is_named_in_the_refusal(zmk):
    hsm = SoftwareSecurityModule()
    hsm.import_clear_key("ZMK", zmk)
    _, under, kcv = alg.make_zone_key_under_zmk(zmk)
    wrong = bytes(b ^ 0xFF for b in kcv)
    with pytest.raises(KcvMismatchError, match=r"^ZPK check value does not match"):
        hsm.install_host_key("ZPK", under, wrong)


def test_installing_a_host_key_logs_its_usage_and_kcv(zmk, caplog):
    hsm = SoftwareSecurityModule()
    hsm.import_clear_key("ZMK", zmk)
    _, under, kcv = alg.make_zone_key_under_zmk(zmk)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        hsm.install_host_key("ZAK", under, kcv)
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == \
        [f"installed ZAK from the host key exchange, kcv {hsm.key_check_value('ZAK').hex().upper()}"]


def test_sign_in_and_dropping_keys_log_the_terminal_and_the_kcvs(tmk, caplog):
    hsm = SoftwareSecurityModule()
    hsm.import_clear_key("TMK", tmk, TID)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        hsm.issue_working_keys(TID, "004")
        hsm.drop_working_keys(TID)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    issued = re.fullmatch(rf"issued working keys for terminal '{TID}' \(mode 004\): "
                          r"PIK=([0-9A-F]{6}) MAK=([0-9A-F]{6}) TDK=([0-9A-F]{6})", messages[0])
    assert issued, messages
    assert messages[1:] == [f"dropped working keys of terminal '{TID}'"]


def test_a_missing_key_store_names_the_command_that_makes_it(tmp_path):
    store = tmp_path / "k.store"
    with pytest.raises(KeyStoreError, match=rf"`gateway keys init --store {re.escape(str(store))}`$"):
        SoftwareSecurityModule.from_config(SecurityConfig(keystore=store))
    lmk_file = tmp_path / "lmk"
    with pytest.raises(KeyStoreError, match=rf"--store {re.escape(str(store))} --lmk-file "
                                            rf"{re.escape(str(lmk_file))}`$"):
        SoftwareSecurityModule.from_config(SecurityConfig(keystore=store, lmk_file=lmk_file))


def test_a_key_store_opens_with_the_configured_lmk_file(tmp_path, monkeypatch, tmk):
    monkeypatch.delenv("GATEWAY_LMK", raising=False)
    lmk_file = tmp_path / "lmk"
    lmk = write_lmk_file(lmk_file)
    store = tmp_path / "k.store"
    KeyStore.create(store, lmk)
    hsm = SoftwareSecurityModule.from_config(SecurityConfig(keystore=store, lmk_file=lmk_file))
    assert hsm.store.path == store


def test_mac_refusals_say_what_is_wrong(tmk, zmk):
    hsm = SoftwareSecurityModule()
    hsm.import_clear_key("TMK", tmk, TID)
    hsm.import_clear_key("ZMK", zmk)
    _, under, kcv = alg.make_zone_key_under_zmk(zmk)
    hsm.install_host_key("ZAK", under, kcv)
    hsm.issue_working_keys(TID, "004")
    with pytest.raises(MacError, match=r"^terminal MAC value is not hex$"):
        hsm.verify_terminal_mac(TID, b"0200 some message", "not hex!")
    with pytest.raises(MacError, match=r"^host MAC does not verify$"):
        hsm.verify_host_mac(b"0210 some answer", bytes(8))


def test_working_keys_never_reach_the_disk_when_not_persisted(tmp_path, tmk):
    lmk = LocalMasterKey.generate()
    path = tmp_path / "keys.store"
    hsm = SoftwareSecurityModule(KeyStore.create(path, lmk), persist_working_keys=False)
    hsm.import_clear_key("TMK", tmk, TID)
    hsm.issue_working_keys(TID, "004")
    assert hsm.has_working_keys(TID)
    assert not SoftwareSecurityModule(KeyStore.open(path, lmk)).has_working_keys(TID)


def _usages_on_disk(path, lmk) -> set[tuple[KeyUsage, str]]:
    return {(k.usage, k.owner) for k in KeyStore.open(path, lmk).entries()}


def test_unpersisted_working_keys_never_reach_the_store_file(tmp_path, tmk, zmk):
    """With persistence off (the shared-session setup keeps them on the database), no save for another
    key may write the terminals' session keys: not a host key exchange, not a key import, not another
    process's change merged in. Once this was broken: installing a ZAK wrote every terminal's MAK."""
    lmk = LocalMasterKey.generate()
    path = tmp_path / "keys.store"
    hsm = SoftwareSecurityModule(KeyStore.create(path, lmk), persist_working_keys=False)
    assert not hsm.persist_working_keys
    hsm.import_clear_key("TMK", tmk, TID)
    hsm.import_clear_key("ZMK", zmk)
    hsm.issue_working_keys(TID, "004")
    _, under, kcv = alg.make_zone_key_under_zmk(zmk)
    hsm.install_host_key("ZAK", under, kcv)          # saves the store
    hsm.import_clear_key("TMK", alg.generate_key(16), "87654321")  # saves it again
    # another process (the key CLI) adds a key meanwhile; our next save merges its file in
    SoftwareSecurityModule(KeyStore.open(path, lmk)).import_clear_key("TMK", alg.generate_key(16), "33334444")
    hsm.import_clear_key("TMK", alg.generate_key(16), "11112222")
    on_disk = _usages_on_disk(path, lmk)
    assert {u for u, _ in on_disk} == {KeyUsage.TMK, KeyUsage.ZMK, KeyUsage.ZAK}
    # and the module still signs with the keys it keeps in memory, through those merges
    assert hsm.has_working_keys(TID)
    hsm.verify_terminal_mac(TID, b"0200 abc", hsm.generate_terminal_mac(TID, b"0200 abc"))


def test_persisted_working_keys_are_on_the_store_file(tmp_path, tmk):
    """The other side: with persistence on (the default), a restarted gateway finds the sessions."""
    lmk = LocalMasterKey.generate()
    path = tmp_path / "keys.store"
    hsm = SoftwareSecurityModule(KeyStore.create(path, lmk))
    assert hsm.persist_working_keys
    hsm.import_clear_key("TMK", tmk, TID)
    hsm.issue_working_keys(TID, "004")
    assert SoftwareSecurityModule(KeyStore.open(path, lmk)).has_working_keys(TID)


def test_a_config_whose_keys_do_not_all_load_leaves_the_key_store_untouched(tmp_path, monkeypatch, tmk, zmk):
    """The demo keys of a config are imported together: when one of them is refused (a weak TMK), the
    gateway does not start and the store file holds none of them, not the ones before it."""
    monkeypatch.delenv("GATEWAY_LMK", raising=False)
    lmk_file = tmp_path / "lmk"
    lmk = write_lmk_file(lmk_file)
    store = tmp_path / "k.store"
    KeyStore.create(store, lmk)
    terminals = [TerminalEntry(TID, "898100012340001", tmk.hex()),
                 TerminalEntry("87654321", "898100012340001", "0101010101010101")]
    with pytest.raises(KeyFormatError, match="weak"):
        SoftwareSecurityModule.from_config(SecurityConfig(keystore=store, lmk_file=lmk_file, zmk=zmk.hex()),
                                           terminals)
    assert list(KeyStore.open(store, lmk).entries()) == []
    # the same config without the weak key loads, and saves every key it names
    hsm = SoftwareSecurityModule.from_config(SecurityConfig(keystore=store, lmk_file=lmk_file, zmk=zmk.hex()),
                                             terminals[:1])
    assert _usages_on_disk(store, lmk) == {(KeyUsage.ZMK, ""), (KeyUsage.TMK, TID)}
    assert hsm.key_check_value("TMK", TID) == KeyStore.open(store, lmk).get(KeyUsage.TMK, TID).kcv


def test_a_sign_off_of_unpersisted_working_keys_does_not_write_the_store_file(tmp_path, tmk):
    """With persistence off the working keys live in memory: dropping them at sign-off has nothing to
    write, so the file (shared by the instances, under its lock) is left as it is."""
    lmk = LocalMasterKey.generate()
    path = tmp_path / "keys.store"
    hsm = SoftwareSecurityModule(KeyStore.create(path, lmk), persist_working_keys=False)
    hsm.import_clear_key("TMK", tmk, TID)
    hsm.issue_working_keys(TID, "004")
    before = path.read_bytes()
    hsm.drop_working_keys(TID)
    assert not hsm.has_working_keys(TID)
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", ["001", "003", "004"])
def test_a_sign_in_with_unpersisted_working_keys_does_not_write_the_store_file(tmp_path, tmk, mode):
    """Persistence off (the shared-session setup): a sign-in changes nothing the file keeps, so it does
    not write the file (with every terminal signing in, the instances would queue on its lock)."""
    lmk = LocalMasterKey.generate()
    path = tmp_path / "keys.store"
    hsm = SoftwareSecurityModule(KeyStore.create(path, lmk), persist_working_keys=False)
    hsm.import_clear_key("TMK", tmk, TID)
    before = path.read_bytes()
    hsm.issue_working_keys(TID, "004")
    hsm.issue_working_keys(TID, mode)  # a second sign-in, maybe with fewer keys: the stale ones go too
    assert hsm.has_working_keys(TID)
    assert path.read_bytes() == before
