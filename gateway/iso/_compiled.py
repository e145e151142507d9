"""Loading the compiled codec (`gateway.iso._ccodec`, built from `_ccodec.c` by `pip install`) and
turning a `PureCodec`'s dialect into the flat per-field rows it is built from.

Selection happens once, at import, from `GATEWAY_CODEC`:

* unset, empty or ``auto``: the compiled codec when the extension is importable and not stale;
  otherwise the pure codec (a machine without a C compiler installs the pure path);
* ``pure``: always the pure codec;
* ``compiled``: the compiled codec or an ImportError at import (CI uses it to prove what it tests).

A stale extension (built from another version of `_ccodec.c` than the one beside it in a source
checkout or editable install) is never used: `pip install -e .` rebuilds it.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from gateway.iso.errors import CodecError
from gateway.iso.message import Message

if TYPE_CHECKING:
    from gateway.iso.codec import PureCodec

ENV: Final = "GATEWAY_CODEC"
SOURCE: Final = Path(__file__).with_name("_ccodec.c")

# the C file's enums (keep in step with _ccodec.c)
_LEN_FIXED, _LEN_BIN, _LEN_BCD, _LEN_ASCII, _LEN_TEXT = range(5)
_DATA_BIN, _DATA_ASCII, _DATA_LATIN1, _DATA_TEXT, _DATA_ASCII_SUPERSET = range(5)
_CHECK_NONE, _CHECK_NUMERIC, _CHECK_TRACK, _CHECK_HEX, _CHECK_XN = range(5)

_ALNUM: Final = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: CPython codecs known to be stateless and plain ASCII for bytes / characters below 0x80 (checked
#: again on load): ASCII-only data in them skips the codec call. Not utf-7, hz or iso2022-*, whose
#: ASCII bytes can switch state.
_ASCII_SUPERSETS: Final = frozenset(
    {"utf-8", "gbk", "gb2312", "gb18030", "big5", "big5hkscs", "euc_jp", "euc_kr", "cp949", "cp950"}
    | {f"cp{n}" for n in range(1250, 1259)}
    | {f"iso8859-{n}" for n in range(2, 17)}
)
_HEX_UPPER: Final = "0123456789ABCDEF"


class UnsupportedDialect(Exception):
    """The compiled codec cannot promise the pure codec's behaviour for this dialect."""


def source_hash() -> str:
    """sha256 of `_ccodec.c` as setup.py computes it (the extension carries the value it was built from)."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def _load() -> tuple[Any, str]:
    """(the CompiledCodec class or None, why not)."""
    choice = os.environ.get(ENV, "").strip().lower() or "auto"
    if choice not in ("auto", "pure", "compiled"):
        raise ValueError(f"{ENV} must be auto, pure or compiled, not {choice!r}")
    if choice == "pure":
        return None, f"{ENV}=pure"
    try:
        _ccodec = importlib.import_module("gateway.iso._ccodec")
    except ImportError as exc:  # not built (no C compiler at install time), or built but broken
        if isinstance(exc, ModuleNotFoundError):
            reason = "compiled extension not built"
        else:
            reason = f"compiled extension does not load: {exc}"
        if choice == "compiled":
            raise ImportError(f"{ENV}=compiled but the {reason}") from exc
        return None, reason
    if SOURCE.is_file() and source_hash() != _ccodec.SOURCE_HASH:
        reason = "compiled extension is stale (built from another _ccodec.c; run `pip install -e .`)"
        if choice == "compiled":
            raise ImportError(f"{ENV}=compiled but the {reason}")
        return None, reason
    return _ccodec.CompiledCodec, ""


COMPILED, WHY_NOT = _load()


def build(pure: PureCodec) -> Any:
    """A CompiledCodec doing exactly what `pure` does (same dialect, same options).
    Raises UnsupportedDialect for dialects whose MTI or bitmap encoding it does not model."""
    if COMPILED is None:
        raise UnsupportedDialect(WHY_NOT)
    dialect = pure.dialect
    spec = dialect.spec
    mti_binary = spec["t"]["data_enc"] == "b"
    bitmap_binary = spec["p"]["data_enc"] == "b"
    mti_decode, mti_encode = _mti_tables(dialect.mtis, spec["t"]["data_enc"], mti_binary)
    if not bitmap_binary:
        _check_hex_transparent(spec["p"]["data_enc"])
    return COMPILED(
        pure=pure,
        message_type=Message,
        error_type=CodecError,
        dialect_name=dialect.name,
        mti_decode=mti_decode,
        mti_encode=mti_encode,
        mti_binary=mti_binary,
        bitmap_binary=bitmap_binary,
        secondary=dialect.secondary_bitmap,
        fields=rows(pure),
        lenient=pure.lenient,
    )


def _mti_tables(mtis: frozenset[str], enc: str, binary: bool) -> tuple[dict[bytes, str], dict[str, bytes]]:
    """wire → MTI as pyiso8583 decodes it, and MTI → wire as it encodes it."""
    width = 2 if binary else 4
    decode: dict[bytes, str] = {}
    encode: dict[str, bytes] = {}
    for mti in mtis:
        try:
            wire = bytes.fromhex(mti) if binary else mti.encode(enc)
            text = wire.hex().upper() if binary else wire.decode(enc)
        except (LookupError, ValueError) as exc:
            raise UnsupportedDialect(f"MTI {mti} does not survive its encoding {enc!r}") from exc
        if len(wire) != width:
            raise UnsupportedDialect(f"MTI {mti} is {len(wire)} bytes in {enc!r}, not {width}")
        decode[wire] = text
        encode[mti] = wire
    return decode, encode


def _check_hex_transparent(enc: str) -> None:
    """PureCodec checks hex-text bitmaps on the raw bytes as ASCII, pyiso8583 decodes them with the
    field's encoding: the C code models the two only where they agree on every letter and digit."""
    try:
        same = _ALNUM.decode(enc) == _ALNUM.decode("ascii") and all(
            bytes([c]).decode(enc) == chr(c) for c in _ALNUM
        )
        same = same and _HEX_UPPER.encode(enc) == _HEX_UPPER.encode("ascii")
    except (LookupError, ValueError) as exc:
        raise UnsupportedDialect(f"bitmap encoding {enc!r} is not ASCII for hex digits") from exc
    if not same:
        raise UnsupportedDialect(f"bitmap encoding {enc!r} is not ASCII for hex digits")


def _ascii_superset(enc: str) -> bool:
    """Every byte below 0x80 decodes to its own character and back, alone and in sequence."""
    ascii_bytes = bytes(range(128))
    text = ascii_bytes.decode("ascii")
    try:
        return (
            ascii_bytes.decode(enc) == text
            and text.encode(enc) == ascii_bytes
            and all(bytes([b]).decode(enc) == chr(b) for b in range(128))
        )
    except (LookupError, ValueError):
        return False


def _codec_name(enc: str) -> str:
    try:
        return codecs.lookup(enc).name
    except LookupError:
        return ""  # the generic path then reports it exactly as pyiso8583 does


def rows(pure: PureCodec) -> tuple[tuple[Any, ...], ...]:
    """One row per data field, in the order `_ccodec.c`'s `load_field` parses them. The checks come
    from the pure codec's own field sets, so both codecs check the same fields by construction."""
    spec = pure.dialect.spec
    out = []
    for key in pure.dialect.formats:
        field = spec[key]
        len_type = field["len_type"]
        len_enc = field["len_enc"]
        if not len_type:
            len_kind = _LEN_FIXED
        elif len_enc == "b":
            len_kind = _LEN_BIN
        elif len_enc == "bcd":
            len_kind = _LEN_BCD
        else:
            len_kind = _LEN_ASCII if _codec_name(len_enc) == "ascii" else _LEN_TEXT
        data_enc = field["data_enc"]
        if data_enc == "b":
            data_kind = _DATA_BIN
        else:
            name = _codec_name(data_enc)
            data_kind = {"ascii": _DATA_ASCII, "iso8859-1": _DATA_LATIN1}.get(name, _DATA_TEXT)
            if data_kind == _DATA_TEXT and name in _ASCII_SUPERSETS and _ascii_superset(data_enc):
                data_kind = _DATA_ASCII_SUPERSET
        if key in pure._numeric:
            check = _CHECK_NUMERIC
        elif key in pure._tracks:
            check = _CHECK_TRACK
        elif key in pure._hex_text:
            check = _CHECK_HEX
        elif key in pure._xn:
            check = _CHECK_XN
        else:
            check = _CHECK_NONE
        out.append(
            (
                int(key),
                key,
                len_type,
                len_kind,
                len_enc,
                field["max_len"],
                field.get("len_count", "bytes") == "nibbles",
                field.get("left_pad", "")[:1],
                field.get("right_pad", "")[:1],
                data_kind,
                data_enc,
                check,
                key in pure._ascii_lengths,
                key in pure._tracks_bcd,
            )
        )
    return tuple(out)
