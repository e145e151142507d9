"""Typed codec errors. Every decode/encode/framing failure is one of these, never a bare
IndexError/ValueError/UnicodeDecodeError, so callers can map it to a response code and a metric."""

from __future__ import annotations


class IsoError(Exception):
    """Base of everything the codec layer raises on bad input."""

    #: short machine-readable kind, used as the metric label `kind` (bounded set)
    kind = "iso"


class CodecError(IsoError):
    """A message body that cannot be decoded or encoded.

    `field` is the pyiso8583 field key ("t" MTI, "p" bitmap, "2".."128"); `offset` the byte offset
    in the body where the problem starts (None when encoding). The text never carries field data.
    """

    kind = "codec"

    def __init__(self, reason: str, *, field: str | None = None, offset: int | None = None) -> None:
        self.reason = reason
        self.field = field
        self.offset = offset
        where = []
        if field is not None:
            where.append(f"field {field}")
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{reason} ({', '.join(where)})" if where else reason)


class FramingError(IsoError):
    """A frame whose length prefix or envelope (TPDU/header) is invalid; the connection must close."""

    kind = "framing"


class SubfieldError(IsoError):
    """A composite field (60, 61, 62, 48, 90, ...) whose layout does not match its data."""

    kind = "subfield"

    def __init__(self, reason: str, *, field: str, offset: int | None = None) -> None:
        self.reason = reason
        self.field = field
        self.offset = offset
        super().__init__(f"{reason} (field {field}" + (f", offset {offset})" if offset is not None else ")"))


class ValidationError(IsoError):
    """A decodable message that breaks its flow's rules (missing mandatory field, wrong value)."""

    kind = "validation"

    def __init__(self, reason: str, *, field: str) -> None:
        self.reason = reason
        self.field = field
        super().__init__(f"{reason} (field {field})")


class SpecError(IsoError):
    """A dialect spec file (`specs/*.toml`) that is missing or malformed: a deployment error, not bad
    input. `key` is the dotted TOML key at fault (e.g. "fields.35.max_len"), `source` the file."""

    kind = "spec"

    def __init__(self, reason: str, *, source: str | None = None, key: str | None = None) -> None:
        self.reason = reason
        self.source = source
        self.key = key
        where = f"{source}: " if source else ""
        at = f"{key}: " if key else ""
        super().__init__(f"{where}{at}{reason}")
