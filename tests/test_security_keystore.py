"""The encrypted key store: round trip, tampering, wrong LMK, LMK sources and file permissions,
atomic writes, several processes sharing one store, LMK rotation."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway.security.des import DesKey, generate_key
from gateway.security.errors import (
    KeyNotFoundError,
    KeyStoreError,
    KeyStoreIntegrityError,
    KeyUsageError,
    LmkError,
    SecurityError,
)
from gateway.security.keys import Key, KeyUsage
from gateway.security.keystore import (
    LMK_ENV,
    KeyStore,
    LocalMasterKey,
    load_lmk,
    make_key,
    read_lmk_file,
    write_lmk_file,
)


@pytest.fixture
def lmk() -> LocalMasterKey:
    return LocalMasterKey.generate()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "keys.store"


def _tmk(owner: str = "12345678") -> Key:
    return make_key(KeyUsage.TMK, DesKey(generate_key(16)), owner)


def test_round_trip_through_the_file(store_path, lmk):
    store = KeyStore.create(store_path, lmk)
    tmk = _tmk()
    zmk = make_key(KeyUsage.ZMK, DesKey(generate_key(16)))
    store.put_all([tmk, zmk])
    again = KeyStore.open(store_path, lmk)
    assert len(again) == 2
    got = again.get(KeyUsage.TMK, "12345678")
    assert got.cipher.same_key(tmk.cipher) and got.kcv == tmk.kcv and got.created == tmk.created
    assert again.get(KeyUsage.ZMK).cipher.same_key(zmk.cipher)
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600
    # the file holds no clear key
    raw = store_path.read_bytes()
    assert tmk.cipher.material not in raw and tmk.cipher.material.hex().upper().encode() not in raw


def test_no_temporary_files_left_behind(store_path, lmk):
    store = KeyStore.create(store_path, lmk)
    for i in range(5):
        store.put(_tmk(f"T000000{i}"))
    assert sorted(p.name for p in store_path.parent.iterdir()) == ["keys.store", "keys.store.lock"]


def test_create_refuses_existing_and_open_refuses_missing(store_path, lmk):
    KeyStore.create(store_path, lmk)
    with pytest.raises(KeyStoreError, match="already exists"):
        KeyStore.create(store_path, lmk)
    with pytest.raises(KeyStoreError, match="does not exist"):
        KeyStore.open(store_path.with_name("other.store"), lmk)


def test_wrong_lmk_fails_loudly(store_path, lmk):
    KeyStore.create(store_path, lmk).put(_tmk())
    with pytest.raises(KeyStoreIntegrityError, match="another LMK") as info:
        KeyStore.open(store_path, LocalMasterKey.generate())
    assert info.value.response_code == "A7"


@pytest.mark.parametrize("offset", [0, 9, 14, 30, -1])
def test_tampered_store_fails_loudly(store_path, lmk, offset):
    KeyStore.create(store_path, lmk).put(_tmk())
    data = bytearray(store_path.read_bytes())
    data[offset] ^= 0x40
    store_path.write_bytes(bytes(data))
    with pytest.raises(KeyStoreIntegrityError):
        KeyStore.open(store_path, lmk)


def test_truncated_store_fails_loudly(store_path, lmk):
    KeyStore.create(store_path, lmk).put(_tmk())
    data = store_path.read_bytes()
    for cut in (0, 10, 30, len(data) - 1):
        store_path.write_bytes(data[:cut])
        with pytest.raises(KeyStoreIntegrityError):
            KeyStore.open(store_path, lmk)


def test_lmk_from_env(store_path, lmk):
    env = {LMK_ENV: lmk.to_hex()}
    assert load_lmk(None, env).check == lmk.check
    with pytest.raises(LmkError, match="no LMK"):
        load_lmk(None, {})
    with pytest.raises(LmkError, match="64 hex characters, got 10"):
        load_lmk(None, {LMK_ENV: "0123456789"})
    with pytest.raises(LmkError, match="not valid hex"):
        load_lmk(None, {LMK_ENV: "Z" * 64})


def test_lmk_file_created_owner_only_and_refused_when_readable(tmp_path):
    path = tmp_path / "lmk"
    lmk = write_lmk_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_lmk_file(path).check == lmk.check
    assert load_lmk(path).check == lmk.check
    with pytest.raises(LmkError, match="already exists"):
        write_lmk_file(path)
    for mode in (0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(LmkError, match="group/others") as info:
            read_lmk_file(path)
        assert "chmod 600" in str(info.value)
    with pytest.raises(LmkError, match="does not exist"):
        read_lmk_file(tmp_path / "missing")


def test_lmk_repr_shows_only_its_check(lmk):
    assert lmk.to_hex() not in repr(lmk) and lmk.to_hex().lower() not in repr(lmk)
    assert lmk.check.hex().upper() in repr(lmk)


def test_in_memory_store(lmk):
    store = KeyStore.in_memory()
    store.put(_tmk())
    store.save()  # no-op
    assert store.path is None and len(store) == 1
    with pytest.raises(KeyNotFoundError, match="no TMK/87654321"):
        store.get(KeyUsage.TMK, "87654321")
    with pytest.raises(KeyStoreError, match="in-memory"):
        store.rotate_lmk(lmk)


def test_terminal_keys_need_an_owner():
    with pytest.raises(KeyStoreError, match="needs a terminal id"):
        KeyStore.in_memory().put(make_key(KeyUsage.MAK, DesKey(generate_key(8))))


def test_usage_is_enforced():
    key = _tmk()
    assert key.require(KeyUsage.TMK) is key.cipher
    with pytest.raises(KeyUsageError, match="TMK/12345678 is a TMK key and cannot be used as a MAK"):
        key.require(KeyUsage.MAK)
    with pytest.raises(KeyUsageError, match="unknown key usage"):
        KeyUsage.parse("KEK")


def test_remove(store_path, lmk):
    store = KeyStore.create(store_path, lmk)
    store.put_all([make_key(u, DesKey(generate_key(16)), "T1") for u in (KeyUsage.PIK, KeyUsage.MAK)])
    assert store.remove([KeyUsage.PIK, KeyUsage.MAK, KeyUsage.TDK], "T1") == 2
    assert len(KeyStore.open(store_path, lmk)) == 0


def test_two_processes_merge_instead_of_losing_updates(store_path, lmk):
    """The gateway holds the store open while `gateway keys tmk-import` adds a TMK: the gateway's
    next save keeps the CLI's key, and a lookup that misses finds it at once."""
    gateway = KeyStore.create(store_path, lmk)
    gateway.put(_tmk("T0000001"))
    cli = KeyStore.open(store_path, lmk)
    new_tmk = _tmk("T0000002")
    cli.put(new_tmk)
    # lookup miss → re-read the changed file
    assert gateway.get(KeyUsage.TMK, "T0000002").cipher.same_key(new_tmk.cipher)
    # a change on both sides, then saves in both orders: nothing lost
    cli.put(_tmk("T0000003"))
    gateway.put(make_key(KeyUsage.MAK, DesKey(generate_key(8)), "T0000001"))
    gateway.remove([KeyUsage.TMK], "T0000002")
    final = KeyStore.open(store_path, lmk)
    names = {k.name for k in final.entries()}
    assert names == {"TMK/T0000001", "TMK/T0000003", "MAK/T0000001"}


def test_merge_keeps_warm_key_objects(store_path, lmk):
    gateway = KeyStore.create(store_path, lmk)
    mine = _tmk("T0000001")
    gateway.put(mine)
    KeyStore.open(store_path, lmk).put(_tmk("T0000002"))
    assert gateway.refresh()
    assert gateway.find(KeyUsage.TMK, "T0000001") is mine
    assert not gateway.refresh()  # nothing changed since


def test_rotate_lmk(store_path, lmk):
    store = KeyStore.create(store_path, lmk)
    tmk = _tmk()
    store.put(tmk)
    new = LocalMasterKey.generate()
    store.rotate_lmk(new)
    with pytest.raises(KeyStoreIntegrityError, match="another LMK"):
        KeyStore.open(store_path, lmk)
    assert KeyStore.open(store_path, new).get(KeyUsage.TMK, "12345678").cipher.same_key(tmk.cipher)


def test_malformed_content_under_a_valid_lmk(store_path, lmk):
    """A file that authenticates but does not hold a key list is refused with a typed error."""
    header = b"GWKEYST1" + lmk.check
    for payload in (b"not json", b'{"version": 2, "keys": []}', b'{"version": 1, "keys": [{"usage": "XXX"}]}',
                    b'{"version": 1, "keys": [{"usage": "TMK", "owner": "T", "key": "0022446688AACCEE",'
                    b' "kcv": "000000"}]}'):
        store_path.write_bytes(header + lmk.seal(payload, header))
        with pytest.raises(KeyStoreError):
            KeyStore.open(store_path, lmk)


def test_stored_kcv_is_checked(store_path, lmk):
    header = b"GWKEYST1" + lmk.check
    payload = (b'{"version": 1, "keys": [{"usage": "TMK", "owner": "T",'
               b' "key": "0123456789ABCDEFFEDCBA9876543210", "kcv": "000000"}]}')
    store_path.write_bytes(header + lmk.seal(payload, header))
    with pytest.raises(KeyStoreIntegrityError, match="fails its KCV"):
        KeyStore.open(store_path, lmk)


def test_every_store_error_is_a_security_error():
    for cls in (KeyStoreError, KeyStoreIntegrityError, LmkError):
        assert issubclass(cls, SecurityError) and cls.response_code == "A7"


def test_unwritable_directory_is_a_typed_error(tmp_path, lmk):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    locked = tmp_path / "ro"
    locked.mkdir()
    store = KeyStore.create(locked / "keys.store", lmk)
    locked.chmod(0o500)
    try:
        with pytest.raises(KeyStoreError, match="cannot write key store"):
            store.put(_tmk())
    finally:
        locked.chmod(0o700)
