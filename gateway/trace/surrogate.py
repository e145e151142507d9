"""Surrogates: secret field values replaced by stand-ins of the same length and format, consistent
within one trace, so a frame still encodes and relations between messages survive (sans-I/O).

Every stand-in is derived with HMAC-SHA256 under a per-trace random key (`Surrogates(key=None)`
draws one) that is never written anywhere: without it nobody can go from a surrogate back to a card,
and a new trace (a new key) gives the same card a new surrogate. What each kind of field becomes:

* PAN (2, 34, 102/103 — every field the logs mask as a PAN, `PAN_LIKE_FIELDS` —, the PANs inside
  CUP batch-upload field 48, ICC tag 5A): same length, the same first 6
  and last 4 digits (the 6+4 the project shows in logs anyway), the middle derived from the PAN, one
  middle digit chosen so the result is Luhn-valid; never equal to the real PAN; distinct PANs get
  distinct surrogates (collisions are detected and re-derived, up to `MAX_TRACKED` cards per trace).
* Track 2/3 (35, 36, ICC tag 57) and track 1 (45): built on the surrogate PAN, in clear form, the
  rest derived from the PAN alone (a plausible expiry 203x, then digits), separators kept in place.
  Deriving from the PAN alone makes the TDK-encrypted track of the terminal leg (reference §4.4: only
  its last 17 digits but one are enciphered, the PAN stays clear) and the clear track the gateway
  forwards upstream the *same* surrogate. A replay re-encrypts it where 53.3 = '1'.
* PIN block (52), ICC tag 99: derived hex of the same length (a replay computes a fresh block).
* MAC (64, 128): zeros (a replay recomputes it; comparisons verify, never compare).
* Keys (CUP 62 in network-management answers, ISO 8583:1987 48 in network management, 96):
  derived hex (or text of the same character classes) of the same length.
* ICC data (55): BER-TLV walked; 5A, 57, 56, 5F20, 9F0B, 9F1F, 9F20, 9F6B, 99 replaced inside it; data
  that does not parse as TLV is replaced whole.
* Card verification values travel inside track discretionary data (and ICC 9F1F/9F20), which is
  replaced; neither shipped dialect has a separate CVV field.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets as _secrets
from collections.abc import Mapping
from typing import Final

from gateway.iso.message import PAN_LIKE_FIELDS, Message
from gateway.iso.spec import Dialect
from gateway.trace.format import SecretKind

#: cards whose surrogates are checked for collisions within one trace (memory: ~100 bytes each)
MAX_TRACKED: Final = 200_000
#: ICC tags with card data: PAN, track 2 equivalent, track 1 equivalent, cardholder name (+ extended),
#: track 1 / track 2 discretionary data, track 2 data (contactless), enciphered PIN data
_ICC_PAN: Final = "5A"
_ICC_TRACK2: Final = "57"
_ICC_SECRET_TAGS: Final = frozenset({"56", "5F20", "9F0B", "9F1F", "9F20", "9F6B", "99"})
_HEX: Final = "0123456789ABCDEF"
_LETTERS: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TRACK_SEPARATORS: Final = "D=^"


def _luhn_sum(digits: str) -> int:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total


def luhn_valid(digits: str) -> bool:
    return _luhn_sum(digits) % 10 == 0


#: Luhn weight of a digit in a doubled position, and its inverse (both permutations of 0-9)
_DOUBLED: Final = [d * 2 - 9 if d > 4 else d * 2 for d in range(10)]
_UNDOUBLE: Final = {w: d for d, w in enumerate(_DOUBLED)}
#: results remembered per trace (the same card shows up on both legs and in every message of a flow)
_CACHE_LIMIT: Final = 50_000


class Surrogates:
    """The derivations of one trace. Not thread-safe (one writer owns it)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else _secrets.token_bytes(32)
        #: surrogate PAN → digest of the PAN it stands for (collision detection, bounded)
        self._owners: dict[str, bytes] = {}
        #: digest of an input → its surrogate (PANs and tracks), so repeats cost one HMAC
        self._memo: dict[bytes, str] = {}

    def _remember(self, digest: bytes, value: str) -> str:
        if len(self._memo) >= _CACHE_LIMIT:
            self._memo.clear()
        self._memo[digest] = value
        return value

    def _digest(self, label: str, value: str) -> bytes:
        return hmac.digest(self._key, f"{label}\x00{value}".encode("utf-8", "surrogatepass"), hashlib.sha256)[:16]

    # --- primitives --------------------------------------------------------------------------------

    def _stream(self, label: str, value: str, counter: int = 0) -> bytes:
        """64 pseudo-random bytes for (label, value): two HMAC blocks, plenty for any field here."""
        msg = f"{label}\x00{counter}\x00{value}".encode("utf-8", "surrogatepass")
        first = hmac.digest(self._key, msg + b"\x01", hashlib.sha256)
        return first + hmac.digest(self._key, msg + b"\x02", hashlib.sha256)

    def digits(self, label: str, value: str, n: int, counter: int = 0) -> str:
        out = ""
        block = 0
        while len(out) < n:
            # 64 bytes → ~154 decimal digits; the first few are skewed towards small values: skip them
            out += str(int.from_bytes(self._stream(label, value, counter + 1000 * block), "big"))[3:]
            block += 1
        return out[:n]

    def hexes(self, label: str, value: str, n: int) -> str:
        blocks = [self._stream(label, value, i).hex().upper() for i in range(n // 128 + 1)]
        return "".join(blocks)[:n]

    def like(self, label: str, value: str) -> str:
        """Same length and character classes: digits → digits, letters → letters, the rest kept."""
        stream = self._stream(label, value) * (len(value) // 64 + 1)
        out = []
        for ch, b in zip(value, stream, strict=False):
            if ch.isdigit():
                out.append(str(b % 10))
            elif ch.isascii() and ch.isalpha():
                out.append(_LETTERS[b % 26])
            else:
                out.append(ch)
        return "".join(out)

    # --- PAN ---------------------------------------------------------------------------------------

    def pan(self, pan: str) -> str:
        """The surrogate of a PAN (or of a masked PAN such as jPOS's "400001____0001")."""
        n = len(pan)
        if n < 2:
            return self.digits("pan1", pan, n)
        digest = self._digest("owner", pan)
        known = self._memo.get(digest)
        if known is not None:
            return known
        keep_head, keep_tail = (6, 4) if n >= 13 else (min(6, max(0, n - 4)), 0)
        fix = n - keep_tail - 1  # the digit that makes it Luhn-valid: the last derived one
        doubled = (n - 1 - fix) % 2 == 1
        candidate = pan
        for counter in range(1000):
            derived = self.digits("pan", pan, n, counter)
            chars = [
                pan[i] if (i < keep_head or i >= n - keep_tail) and pan[i].isdigit() else derived[i]
                for i in range(n)
            ]
            chars[fix] = "0"
            need = -_luhn_sum("".join(chars)) % 10
            chars[fix] = str(_UNDOUBLE[need] if doubled else need)
            candidate = "".join(chars)
            if candidate == pan:
                continue
            owner = self._owners.get(candidate)
            if owner is None:
                if len(self._owners) < MAX_TRACKED:
                    self._owners[candidate] = digest
                return self._remember(digest, candidate)
            if owner == digest:
                return self._remember(digest, candidate)
        return candidate  # 1,000 collisions in a row: a tiny PAN space; accept the last one

    # --- tracks ------------------------------------------------------------------------------------

    def _tail(self, pan: str, template: str) -> str:
        """Derived characters for everything after the PAN's separator, separators kept in place;
        the first 4 digits form a plausible expiry YYMM (2030-2039)."""
        derived = self.digits("tail", f"{pan}\x00{len(template)}", len(template))
        out = list(derived)
        for i, ch in enumerate(template):
            if ch in _TRACK_SEPARATORS or not ch.isalnum():
                out[i] = ch
        if len(out) >= 4 and all(c.isdigit() for c in out[:4]):
            out[0] = "3"
            out[2:4] = f"{int(derived[2:4]) % 12 + 1:02d}"
        return "".join(out)

    def track(self, value: str, *, encrypted: bool = False, format_code: bool = False) -> str:
        """Track 2 (or 3 with `format_code`: two digits before the PAN) in clear form."""
        digest = self._digest(f"track{int(encrypted)}{int(format_code)}", value)
        known = self._memo.get(digest)
        if known is None:
            known = self._remember(digest, self._track(value, encrypted, format_code))
        return known

    def _track(self, value: str, encrypted: bool, format_code: bool) -> str:
        n = len(value)
        clear = value[: n - 17] if encrypted and n >= 17 else ("" if encrypted else value)
        cut = next((i for i, ch in enumerate(clear) if ch in "D="), -1)
        if cut < 0:
            # the PAN is not readable (short encrypted track, or no separator): digits only, derived
            # from the whole value (still valid z data)
            return self.digits("track", value, n)
        start = 2 if format_code and cut > 2 else 0
        pan = value[start:cut]
        sep = value[cut]
        rest = value[cut + 1 :]
        template = rest if not encrypted else rest.replace("D", "0")  # cipher nibbles are not separators
        return value[:start] + self.pan(pan) + sep + self._tail(pan, template)

    def track1(self, value: str) -> str:
        """Track 1 "B<PAN>^<NAME>^<YYMM...>": surrogate PAN, a placeholder name, derived rest."""
        parts = value.split("^")
        if len(parts) < 3 or not parts[0][1:].isdigit():
            return self.like("track1", value)
        pan = parts[0][1:]
        name = ("TEST/CARDHOLDER " * (len(parts[1]) // 16 + 1))[: len(parts[1])]
        rest = "^".join(parts[2:])
        return parts[0][:1] + self.pan(pan) + "^" + name + "^" + self._tail(pan, rest)

    # --- chip data ---------------------------------------------------------------------------------

    def chip(self, value: str) -> str:
        """ICC data (hex): sensitive TLV values replaced in place; unparseable data replaced whole."""
        try:
            raw = bytes.fromhex(value)
            return self._tlv(raw).hex().upper()
        except ValueError:
            return self.hexes("chip", value, len(value)) if _is_hex(value) else self.like("chip", value)

    def _tlv(self, data: bytes) -> bytes:
        out = bytearray()
        i = 0
        n = len(data)
        while i < n:
            if data[i] in (0x00, 0xFF):  # padding between TLVs
                out.append(data[i])
                i += 1
                continue
            start = i
            first = data[i]
            i += 1
            if first & 0x1F == 0x1F:
                while i < n and data[i] & 0x80:
                    i += 1
                i += 1
            if i > n:
                raise ValueError("truncated tag")
            tag = data[start:i]
            if i >= n:
                raise ValueError("no length")
            length = data[i]
            i += 1
            if length & 0x80:
                count = length & 0x7F
                if count == 0 or count > 3 or i + count > n:
                    raise ValueError("bad length")
                length = int.from_bytes(data[i : i + count], "big")
                i += count
            if i + length > n:
                raise ValueError("value past the end")
            value = data[i : i + length]
            i += length
            out += data[start : i - length]  # tag and length unchanged
            if first & 0x20:
                out += self._tlv(value)  # constructed: same length, walk inside
            else:
                out += self._icc_value(tag.hex().upper(), value)
        return bytes(out)

    def _icc_value(self, tag: str, value: bytes) -> bytes:
        text = value.hex().upper()
        if tag == _ICC_PAN:
            digits = text.rstrip("F")
            if not digits.isdigit():
                return bytes.fromhex(self.hexes(tag, text, len(text)))
            return bytes.fromhex(self.pan(digits) + text[len(digits) :])
        if tag == _ICC_TRACK2:
            body = text.rstrip("F")
            surrogate = self.track(body) if body.replace("D", "").isdigit() else self.hexes(tag, text, len(body))
            return bytes.fromhex(surrogate + text[len(body) :])
        if tag in _ICC_SECRET_TAGS:
            return bytes.fromhex(self.hexes(tag, text, len(text)))
        return value

    # --- CUP batch upload --------------------------------------------------------------------------

    def batch_items(self, value: str) -> str:
        """CUP 0320 (60.3=201) field 48: n2 count + 40-digit items (org 2, trace 6, PAN 20, amount 12)."""
        if len(value) >= 2 and value[:2].isdigit() and len(value) == 2 + 40 * int(value[:2]) and value.isdigit():
            items = [value[2 + 40 * i : 42 + 40 * i] for i in range(int(value[:2]))]
            out = [value[:2]]
            for item in items:
                pan = item[8:28].lstrip("0")
                out.append(item[:8] + self.pan(pan).rjust(20, "0") + item[28:])
            return "".join(out)
        return self.digits("48", value, len(value)) if value.isdigit() else self.like("48", value)


def _is_hex(value: str) -> bool:
    return all(c in _HEX for c in value.upper())


# --- which fields, per dialect ----------------------------------------------------------------------

#: the card-number fields are the logs' (2, 34, 102/103: where ISO 8583:1987 hosts carry a PAN)
_GENERIC: Final[Mapping[str, SecretKind]] = {
    **{k: SecretKind.PAN for k in sorted(PAN_LIKE_FIELDS)},
    "35": SecretKind.TRACK, "36": SecretKind.TRACK,
    "45": SecretKind.TRACK, "52": SecretKind.PIN, "55": SecretKind.CHIP, "96": SecretKind.KEY,
}  # fmt: skip


def secret_fields(dialect: Dialect, msg: Message) -> dict[str, SecretKind]:
    """Which fields of `msg` are secret and how: the generic ISO ones, the dialect's MAC fields, and
    the dialect-specific private fields (CUP 48 of batch uploads, CUP 62 of network-management answers,
    ISO 8583:1987 48 of network management; in dialects this module does not know, 48 and 62 always)."""
    fields = msg.fields
    kinds = {k: kind for k, kind in _GENERIC.items() if k in fields}
    for k in dialect.mac_fields:
        if k in fields:
            kinds[k] = SecretKind.MAC
    mclass = msg.mti[1:2]
    name = dialect.name
    if "48" in fields:
        if name == "cup-pos":
            if mclass == "3":
                kinds["48"] = SecretKind.PAN
        elif name == "iso87-ascii":
            if mclass == "8":
                kinds["48"] = SecretKind.KEY
        else:
            kinds["48"] = SecretKind.KEY
    if "62" in fields:
        if name == "cup-pos":
            if mclass == "8" and msg.mti[2:3] in "13579":
                kinds["62"] = SecretKind.KEY
        elif name != "iso87-ascii":
            kinds["62"] = SecretKind.KEY
    return kinds


def mask_message(dialect: Dialect, msg: Message,
                 surrogates: Surrogates) -> tuple[dict[str, str], dict[str, SecretKind]]:
    """The message's fields with every secret replaced, and which fields were (field → kind)."""
    kinds = secret_fields(dialect, msg)
    fields = dict(msg.fields)
    if not kinds:
        return fields, kinds
    encrypted = fields.get("53", "")[2:3] == "1"
    for k, kind in kinds.items():
        value = fields[k]
        fmt = dialect.formats.get(k, "ans")
        if kind is SecretKind.MAC:
            fields[k] = "0" * len(value)
        elif kind is SecretKind.PAN:
            if k == "48":
                fields[k] = surrogates.batch_items(value)
            elif value.isdigit():
                fields[k] = surrogates.pan(value)
            else:
                fields[k] = surrogates.like("pan", value)
        elif kind is SecretKind.TRACK:
            if k == "45" or (fmt == "ans" and "^" in value):
                fields[k] = surrogates.track1(value)
            else:
                fields[k] = surrogates.track(value, encrypted=encrypted, format_code=k == "36")
        elif kind is SecretKind.CHIP:
            fields[k] = surrogates.chip(value)
        elif fmt == "b" or _is_hex(value):
            fields[k] = surrogates.hexes(k, value, len(value))
        elif fmt in ("n", "z"):
            fields[k] = surrogates.digits(k, value, len(value))
        else:
            fields[k] = surrogates.like(k, value)
    return fields, kinds
