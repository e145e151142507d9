"""No clear key, PIN, PIN block, track or full PAN in any exception text (with its chained
context), repr, or log record produced by the security module, on success or failure paths."""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.security import algorithms as alg
from gateway.security.errors import SecurityError
from gateway.security.keys import KeyUsage
from gateway.security.keystore import KeyStore, LocalMasterKey
from gateway.security.module import SoftwareSecurityModule

TID = "12345678"
PAN = "6222021234567890123"
PIN = "86420975"
TRACK2 = "6222021234567890123D49121010000000000"


def _hex_forms(secret: bytes) -> set[str]:
    h = secret.hex()
    return {h, h.upper()}


class Leaks:
    """Collects every text the module produced and the secrets that must not be in any of it."""

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self.texts: list[str] = []

    def secret(self, name: str, value: bytes | str) -> None:
        if isinstance(value, bytes):
            for i, form in enumerate(_hex_forms(value)):
                self.secrets[f"{name}#{i}"] = form
        else:
            self.secrets[name] = value

    def expect_error(self, fn: Callable[[], object]) -> SecurityError:
        try:
            fn()
        except SecurityError as exc:
            self.texts += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
            return exc
        raise AssertionError("expected a SecurityError")

    def check(self, extra: list[str]) -> None:
        texts = self.texts + extra
        assert texts
        for name, secret in self.secrets.items():
            for text in texts:
                assert secret not in text, f"{name} leaked into: {text[:200]}"


@pytest.fixture
def leaks() -> Iterator[Leaks]:
    yield Leaks()


def test_no_secret_in_errors_reprs_or_logs(tmp_path: Path, caplog, leaks: Leaks):
    caplog.set_level(logging.DEBUG)
    lmk = LocalMasterKey.generate()
    leaks.secret("LMK", bytes.fromhex(lmk.to_hex()))
    tmk, zmk = alg.generate_key(16), alg.generate_key(16)
    leaks.secret("TMK", tmk)
    leaks.secret("ZMK", zmk)
    leaks.secret("PIN", PIN)
    leaks.secret("PAN", PAN)
    leaks.secret("track", TRACK2)

    store = KeyStore.create(tmp_path / "keys.store", lmk)
    hsm = SoftwareSecurityModule(store)
    hsm.import_clear_key("TMK", tmk, TID)
    hsm.import_clear_key("ZMK", zmk)
    zpk, zpk_under, zpk_kcv = alg.make_zone_key_under_zmk(zmk)
    zak, zak_under, zak_kcv = alg.make_zone_key_under_zmk(zmk)
    leaks.secret("ZPK", zpk)
    leaks.secret("ZAK", zak)
    hsm.install_host_key("ZPK", zpk_under, zpk_kcv)
    hsm.install_host_key("ZAK", zak_under, zak_kcv)
    block = hsm.issue_working_keys(TID, "004")
    keys = alg.parse_key_block(tmk, block, "004")
    for usage, clear in keys.items():
        leaks.secret(str(usage), clear)
    pik, mak, tdk = keys[KeyUsage.PIK], keys[KeyUsage.MAK], keys[KeyUsage.TDK]
    pin_block = alg.encrypt_pin_block(pik, PIN, PAN)
    leaks.secret("clear PIN block", alg.make_pin_block(PIN, PAN))

    mab = os.urandom(200)
    # failure paths of every kind
    leaks.expect_error(lambda: hsm.verify_terminal_mac(TID, mab, b"00000000"))
    leaks.expect_error(lambda: hsm.verify_host_mac(mab, bytes(8)))
    leaks.expect_error(lambda: hsm.translate_pin_to_host(TID, pin_block, "6222021234567890993"))
    leaks.expect_error(lambda: hsm.translate_pin_to_host(TID, os.urandom(8), PAN))
    leaks.expect_error(lambda: hsm.translate_pin_to_host(TID, pin_block, PAN + "X"))
    leaks.expect_error(lambda: hsm.decrypt_track2(TID, alg.encrypt_track(alg.generate_key(16), TRACK2)))
    leaks.expect_error(lambda: alg.encrypt_track(tdk, TRACK2.replace("D", "=")))
    leaks.expect_error(lambda: hsm.install_host_key("ZPK", zpk_under, bytes(3)))
    leaks.expect_error(lambda: hsm.install_host_key("TMK", zpk_under, zpk_kcv))
    leaks.expect_error(lambda: alg.parse_key_block(alg.generate_key(16), block, "004"))
    leaks.expect_error(lambda: alg.parse_key_block(tmk, block[:-1] + bytes([block[-1] ^ 1]), "004"))
    leaks.expect_error(lambda: hsm.import_clear_key("TMK", bytes(b & 0xFE for b in tmk), "87654321"))
    leaks.expect_error(lambda: alg.parse_hex_key(tmk.hex()[:-1] + "G", "TMK"))
    leaks.expect_error(lambda: alg.make_pin_block(PIN + "12345", PAN))
    leaks.expect_error(lambda: alg.decrypt_pin_block(pik, pin_block, "6222021234567890993"))
    leaks.expect_error(lambda: hsm.verify_terminal_mac("87654321", mab, alg.cup_mac(mak, mab)))
    leaks.expect_error(lambda: KeyStore.open(store.path, LocalMasterKey.generate()))  # type: ignore[arg-type]
    raw = bytearray(store.path.read_bytes())  # type: ignore[union-attr]
    raw[-3] ^= 1
    tampered = tmp_path / "tampered.store"
    tampered.write_bytes(bytes(raw))
    leaks.expect_error(lambda: KeyStore.open(tampered, lmk))

    # success paths log too
    hsm.verify_terminal_mac(TID, mab, alg.cup_mac(mak, mab))
    hsm.translate_pin_to_host(TID, pin_block, PAN)
    assert hsm.decrypt_track2(TID, alg.encrypt_track(tdk, TRACK2)) == TRACK2
    hsm.drop_working_keys(TID)

    reprs = [repr(hsm), repr(store), repr(lmk), str(lmk), repr(alg.DesKey(tmk)), str(alg.DesKey(zmk))]
    reprs += [repr(k) for k in store.entries()] + [str(k) for k in store.entries()]
    logs = [r.getMessage() for r in caplog.records] + [caplog.text]
    assert any("issued working keys" in line for line in logs)  # the logs were captured
    leaks.check(reprs + logs)


def test_clear_keys_cannot_be_pickled():
    import pickle

    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(alg.DesKey(alg.generate_key(16)))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(LocalMasterKey.generate())
