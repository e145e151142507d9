"""The clear-key toolbox: every algorithm of the security module as a pure function on clear keys
(bytes, or `DesKey` to keep cipher contexts warm between calls).

The gateway itself goes through `SecurityModule` and never handles clear keys; these functions are
for the terminal and host simulators, tests and tooling. They are the same code the module runs.
"""

from __future__ import annotations

from gateway.security.des import (
    DesKey,
    KeyLike,
    as_des_key,
    combine_components,
    decrypt_ecb,
    encrypt_ecb,
    expand_key,
    generate_key,
    has_odd_parity,
    is_weak,
    kcv,
    parse_hex_key,
    set_odd_parity,
)
from gateway.security.keyblock import (
    build_key_block,
    make_zone_key_under_zmk,
    parse_key_block,
    unwrap_zone_key,
)
from gateway.security.mac import (
    CupMacSteps,
    cbc_mac,
    cup_mac,
    cup_mac_steps,
    hex_upper,
    macs_equal,
    pad_method1,
    retail_mac,
    terminal_mac,
    xor_blocks,
)
from gateway.security.pin import (
    check_pin_block,
    decode_pin_block,
    decrypt_pin_block,
    encrypt_pin_block,
    make_pin_block,
    pan_field,
    translate_pin_block,
)
from gateway.security.track import decrypt_track, encrypt_track

#: X9.19 under its usual name
x919_mac = retail_mac

__all__ = [
    "CupMacSteps",
    "DesKey",
    "KeyLike",
    "as_des_key",
    "build_key_block",
    "cbc_mac",
    "check_pin_block",
    "combine_components",
    "cup_mac",
    "cup_mac_steps",
    "decode_pin_block",
    "decrypt_ecb",
    "decrypt_pin_block",
    "decrypt_track",
    "encrypt_ecb",
    "encrypt_pin_block",
    "encrypt_track",
    "expand_key",
    "generate_key",
    "has_odd_parity",
    "hex_upper",
    "is_weak",
    "kcv",
    "macs_equal",
    "make_pin_block",
    "make_zone_key_under_zmk",
    "pad_method1",
    "pan_field",
    "parse_hex_key",
    "parse_key_block",
    "retail_mac",
    "set_odd_parity",
    "terminal_mac",
    "translate_pin_block",
    "unwrap_zone_key",
    "x919_mac",
    "xor_blocks",
]
