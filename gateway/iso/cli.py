"""`gateway decode` and `gateway encode`: look at and build messages by hand.

    gateway decode --dialect cup-pos --framing cup 0047600003000060310031073002003020...
    gateway decode --dialect cup-pos --framing cup --text --file capture.hex
    echo '{"mti": "0800", "fields": {"11": "000001", ...}}' | gateway encode --dialect iso87-ascii -
    gateway encode --dialect iso87-ascii --file message.json

`decode` prints JSON: dialect, envelope (the CUP TPDU/header broken out, or null), mti, fields
(masked: PAN 6+4, track/PIN/ICC/key fields as their length only), names (each present field's name
from the dialect file's `desc`) and subfields (composite fields broken out by
`gateway.iso.subfields`); `--text` prints the same as a table for people. `encode` reads the same
shape (mti + fields, plus envelope.tpdu / envelope.header for cup framing; other keys are ignored)
and prints the frame as hex. Because decode masks secrets, its output re-encodes only after the real
values are filled in.

Bad input exits with status 2 and one line on stderr that names the field and offset.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.iso.codec import Codec
from gateway.iso.errors import IsoError
from gateway.iso.framing import CupEnvelope, make_framer
from gateway.iso.message import Message
from gateway.iso.spec import Dialect, load_dialect

FRAMING_CHOICES = ("none", "len2", "ascii4", "cup")
EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Unusable command-line input (not hex, not JSON, wrong shape)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    dec = subparsers.add_parser("decode", help="decode a message (hex) to JSON, secrets masked")
    _common(dec)
    dec.add_argument("data", metavar="HEX", nargs="?",
                     help="message bytes as hex (whitespace ignored), or - for stdin")
    dec.add_argument("--file", metavar="PATH", help="read the hex from this file instead")
    dec.add_argument("--text", action="store_true", help="a table with field names, for people (default JSON)")
    dec.set_defaults(func=decode_command)

    enc = subparsers.add_parser("encode", help="encode a JSON message (as printed by decode) to hex")
    _common(enc)
    enc.add_argument("data", metavar="JSON", nargs="?", help='{"mti": ..., "fields": {...}}, or - for stdin')
    enc.add_argument("--file", metavar="PATH", help="read the JSON from this file instead")
    enc.set_defaults(func=encode_command)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dialect", required=True, help="cup-pos, iso87-ascii, or the path of a dialect TOML file"
    )
    parser.add_argument(
        "--framing",
        choices=FRAMING_CHOICES,
        default="none",
        help="length prefix / envelope around the message (default: none, the bare body)",
    )


def _read(data: str | None, file: str | None = None) -> str:
    if file is not None:
        if data is not None:
            raise InputError("give the input or --file, not both")
        try:
            return Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
    if data is None:
        raise InputError("no input: give it as an argument, - for stdin, or --file PATH")
    return sys.stdin.read() if data == "-" else data


def _fail(command: str, message: str) -> int:
    print(f"gateway {command}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _parse_hex(text: str) -> bytes:
    compact = "".join(text.split())
    for index, char in enumerate(compact):
        if char not in "0123456789abcdefABCDEF":
            raise InputError(f"not hex at character {index} of the input")
    if len(compact) % 2:
        raise InputError(f"odd number of hex digits ({len(compact)})")
    return bytes.fromhex(compact)


def decode_command(args: argparse.Namespace) -> int:
    try:
        dialect = load_dialect(args.dialect)
        raw = _parse_hex(_read(args.data, getattr(args, "file", None)))
        result = decode_to_json(dialect, raw, args.framing)
    except (InputError, IsoError) as exc:
        return _fail("decode", str(exc))
    if getattr(args, "text", False):
        print(render_text(result))
    else:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def render_text(doc: dict[str, Any]) -> str:
    """`decode --text`: one line per field (number, name, value) and its sub-fields indented below."""
    lines = [f"{doc['dialect']} {doc['mti']}"]
    envelope = doc.get("envelope")
    if envelope:
        lines.append("  envelope " + "  ".join(f"{k} {v}" for k, v in envelope.items()))
    names: dict[str, str] = doc.get("names", {})
    subfields: dict[str, dict[str, str]] = doc.get("subfields", {})
    width = min(max((len(str(v)) for v in doc["fields"].values()), default=0), 40)
    for field, value in doc["fields"].items():
        lines.append(f"  {field:>3}  {value!s:<{width}}  {names.get(field, '')}".rstrip())
        parts = subfields.get(field, {})
        part_width = max((len(name) for name in parts), default=0)
        for name, part in parts.items():
            lines.append(f"         {name:<{part_width}}  {part}")
    return "\n".join(lines)


def decode_to_json(dialect: Dialect, raw: bytes, framing: str) -> dict[str, Any]:
    """The JSON document `gateway decode` prints for these bytes."""
    envelope: CupEnvelope | None = None
    body, body_start = raw, 0
    if framing != "none":
        decoder = make_framer(framing, max_frame=0xFFFF if framing != "ascii4" else 9999).decoder()
        frames = decoder.feed(raw)
        if len(frames) != 1 or decoder.buffered:
            if not frames:
                raise InputError(f"incomplete frame: {len(raw)} bytes, the length prefix asks for more")
            raise InputError(
                f"input holds {len(frames)} frame(s) and {decoder.buffered} extra byte(s); give one"
            )
        body, envelope = frames[0].body, frames[0].envelope
        body_start = len(raw) - len(body)
    try:
        msg = Codec(dialect).decode(body)
    except IsoError as exc:
        if body_start:
            raise InputError(
                f"{exc} [offsets count from the message body, input offset {body_start}]"
            ) from None
        raise
    masked = msg.masked()
    del masked["t"]
    result: dict[str, Any] = {
        "dialect": dialect.name,
        "envelope": envelope.as_dict() if envelope is not None else None,
        "mti": msg.mti,
        "fields": masked,
        "names": {f: str(dialect.spec.get(f, {}).get("desc", "")) for f in masked},
    }
    subfields = _subfields(dialect, msg)
    if subfields is not None:
        result["subfields"] = subfields
    return result


def _subfields(dialect: Dialect, msg: Message) -> dict[str, dict[str, str]] | None:
    """Composite fields broken out by gateway.iso.subfields; None when that module is unavailable."""
    try:
        from gateway.iso.subfields import break_out
    except ImportError:
        return None
    return break_out(dialect.name, msg)


def encode_command(args: argparse.Namespace) -> int:
    try:
        dialect = load_dialect(args.dialect)
        frame = encode_from_json(dialect, _read(args.data, getattr(args, "file", None)), args.framing)
    except (InputError, IsoError) as exc:
        return _fail("encode", str(exc))
    print(frame.hex().upper())
    return 0


def encode_from_json(dialect: Dialect, text: str, framing: str) -> bytes:
    """The frame `gateway encode` prints (as hex) for this JSON document."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc.msg} at offset {exc.pos}") from None
    if not isinstance(doc, dict):
        raise InputError("JSON must be an object with mti and fields")
    mti, fields = doc.get("mti"), doc.get("fields")
    if not isinstance(mti, str):
        raise InputError('JSON key mti must be a string such as "0200"')
    if not isinstance(fields, dict):
        raise InputError("JSON key fields must be an object of field id → string value")
    body = Codec(dialect).encode(Message(mti, fields))
    if framing == "none":
        return body
    envelope = None
    if framing == "cup":
        env = doc.get("envelope")
        if (
            not isinstance(env, dict)
            or not isinstance(env.get("tpdu"), str)
            or not isinstance(env.get("header"), str)
        ):
            raise InputError("cup framing needs envelope.tpdu and envelope.header as hex strings")
        envelope = CupEnvelope.from_hex(env["tpdu"], env["header"])
    return make_framer(framing, max_frame=0xFFFF if framing != "ascii4" else 9999).encode(body, envelope)


def main(argv: list[str] | None = None) -> int:
    """`python -m gateway.iso.cli decode|encode ...`, for use without the `gateway` script."""
    parser = argparse.ArgumentParser(prog="python -m gateway.iso.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
