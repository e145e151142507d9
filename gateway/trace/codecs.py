"""The codecs and framers the trace tools use, made in one place.

Imports read what other systems produced, so they decode leniently (e.g. jPOS's own ISO87 test image
carries '0' where the strict DE28-style sign check wants C or D); the recorder inside `gateway serve`
decodes as strictly as the live path. Until `Codec(dialect, lenient=True)` exists on the codec side,
`make_codec` falls back to the strict codec: this function is the only place that knows.
"""

from __future__ import annotations

from typing import Any

from gateway.iso.codec import Codec
from gateway.iso.framing import Framer, make_framer
from gateway.iso.spec import Dialect, load_dialect

#: the largest frame the trace tools accept (the framings' own limit for len2 / cup)
TRACE_MAX_FRAME = 0xFFFF


def make_codec(dialect: Dialect | str, *, lenient: bool) -> Codec:
    d = load_dialect(dialect) if isinstance(dialect, str) else dialect
    if lenient:
        try:
            return Codec(d, lenient=True)  # type: ignore[call-arg]
        except TypeError:  # a codec without the option: strict it is
            pass
    return Codec(d)


def make_trace_framer(kind: str) -> Framer:
    limit: Any = 9999 if kind == "ascii4" else TRACE_MAX_FRAME
    return make_framer(kind, limit)
