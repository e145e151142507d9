"""Security-module micro-benchmark: the per-transaction crypto through `SoftwareSecurityModule`.

    python bench/crypto.py [--seconds 0.5]

Times, per operation (best of several rounds, one core):
- CUP POS MAC generate / verify over a 340-byte MAB (the terminal side of a purchase)
- X9.19 retail MAC generate / verify over 340 bytes under the ZAK (the host side)
- PIN translation PIK → ZPK
- track-2 decryption
- working-key issue (sign-in, mode 004; in memory, then with the key store file)
and, for comparison, the same MACs and PIN translation done the naive way (a `Cipher` built per call),
which is what caching contexts per key saves. reference/limits.md measured 58 µs for a retail MAC
over 340 B and 21 µs for a PIN translate on this machine class.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from gateway.security.algorithms import (
    encrypt_pin_block,
    encrypt_track,
    generate_key,
    make_zone_key_under_zmk,
    parse_key_block,
)
from gateway.security.keystore import KeyStore, LocalMasterKey
from gateway.security.module import SoftwareSecurityModule

REFERENCE_US = {"x919 generate": 58.0, "PIN translate": 21.0}


def bench(fn: Callable[[], object], seconds: float) -> float:
    """Best µs/op over 5 rounds of about `seconds`/5 each."""
    n = 1
    while True:  # calibrate
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 > 0.02:
            break
        n *= 2
    per_round = max(1, int(n * (seconds / 5) / (time.perf_counter() - t0)))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(per_round):
            fn()
        best = min(best, (time.perf_counter() - t0) / per_round)
    return best * 1e6


def naive_retail_mac(key: bytes, data: bytes) -> bytes:
    """X9.19 with contexts built per call (what the cached path avoids)."""
    padded = data + bytes(-len(data) % 8)
    k1 = key[:8] * 3
    chain = Cipher(TripleDES(k1), modes.CBC(bytes(8))).encryptor().update(padded)[-8:]
    d = Cipher(TripleDES(key[8:] * 3), modes.ECB()).decryptor().update(chain)
    return Cipher(TripleDES(k1), modes.ECB()).encryptor().update(d)


def naive_translate(pik: bytes, zpk: bytes, block: bytes) -> bytes:
    clear = Cipher(TripleDES(pik + pik[:8]), modes.ECB()).decryptor().update(block)
    return Cipher(TripleDES(zpk + zpk[:8]), modes.ECB()).encryptor().update(clear)


def bench_terminal_mac(algorithm: str, tid: str, tmk: bytes, s: float) -> list[tuple[str, float]]:
    hsm = SoftwareSecurityModule(KeyStore.in_memory(), terminal_mac=algorithm)
    hsm.import_clear_key("TMK", tmk, tid)
    hsm.issue_working_keys(tid, "004")
    mab = os.urandom(340)
    mac = hsm.generate_terminal_mac(tid, mab)
    return [
        (f"terminal MAC {algorithm} generate (340 B)", bench(lambda: hsm.generate_terminal_mac(tid, mab), s)),
        (f"terminal MAC {algorithm} verify (340 B)",
         bench(lambda: hsm.verify_terminal_mac(tid, mab, mac), s)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    args = parser.parse_args()
    s = args.seconds

    tid = "12345678"
    tmk = generate_key(16)
    zmk = generate_key(16)
    results: list[tuple[str, float]] = []

    for algorithm in ("cup-ecb", "x919"):
        results += bench_terminal_mac(algorithm, tid, tmk, s)

    # host side and PIN/track on the cup-ecb module
    hsm = SoftwareSecurityModule(KeyStore.in_memory())
    hsm.import_clear_key("TMK", tmk, tid)
    hsm.import_clear_key("ZMK", zmk)
    block = hsm.issue_working_keys(tid, "004")
    keys = parse_key_block(tmk, block, "004")
    zpk_clear, zpk_under, zpk_kcv = make_zone_key_under_zmk(zmk)
    zak_clear, zak_under, zak_kcv = make_zone_key_under_zmk(zmk)
    hsm.install_host_key("ZPK", zpk_under, zpk_kcv)
    hsm.install_host_key("ZAK", zak_under, zak_kcv)
    mab = os.urandom(340)
    host_mac = hsm.generate_host_mac(mab)
    pan = "6222021234567890123"
    pin_block = encrypt_pin_block(keys["PIK"], "123456", pan)  # type: ignore[index]
    track = encrypt_track(keys["TDK"], "6222021234567890123D49121010000000000")  # type: ignore[index]
    results.append(("x919 generate (340 B, ZAK)", bench(lambda: hsm.generate_host_mac(mab), s)))
    results.append(("x919 verify (340 B, ZAK)", bench(lambda: hsm.verify_host_mac(mab, host_mac), s)))
    results.append(("PIN translate", bench(lambda: hsm.translate_pin_to_host(tid, pin_block, pan), s)))
    results.append(("track-2 decrypt", bench(lambda: hsm.decrypt_track2(tid, track), s)))
    results.append(("issue working keys 004 (memory)", bench(lambda: hsm.issue_working_keys(tid, "004"), s)))
    results.append(("naive x919 (Cipher per call)", bench(lambda: naive_retail_mac(zak_clear, mab), s)))
    results.append(("naive PIN translate (Cipher per call)",
                    bench(lambda: naive_translate(keys["PIK"], zpk_clear, pin_block), s)))  # type: ignore[index]

    with tempfile.TemporaryDirectory() as tmp:
        store = KeyStore.create(Path(tmp) / "keys.store", LocalMasterKey.generate())
        filed = SoftwareSecurityModule(store)
        filed.import_clear_key("TMK", tmk, tid)
        for i in range(100):  # a store with some terminals in it, as in production
            filed.import_clear_key("TMK", generate_key(16), f"T{i:07d}", save=False)
        store.save()
        results.append(("issue working keys 004 (store file, fsync)",
                        bench(lambda: filed.issue_working_keys(tid, "004"), s)))

    width = max(len(name) for name, _ in results)
    print(f"{'operation':<{width}}  µs/op   ops/s")
    for name, us in results:
        ref = REFERENCE_US.get(name.split(" (")[0])
        note = f"   (limits.md: {ref:.0f} µs → {ref / us:.1f}× faster)" if ref else ""
        print(f"{name:<{width}}  {us:6.2f}  {1e6 / us:8.0f}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
