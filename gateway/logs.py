"""Logging for every `gateway` command: levels, the text and JSON formats, per-transaction context and
the masked message trace.

- `configure(verbosity, fmt, command)` installs one stderr handler on the root logger. The level comes
  from `-v`/`-vv`, else `GATEWAY_LOG_LEVEL`; the format from `--log-format`, else `GATEWAY_LOG_FORMAT`
  (text by default). `serve` starts one step more verbose than the tools (INFO: a server says what it
  does), so there `-v` turns on DEBUG; elsewhere `-v` is INFO and `-vv` DEBUG. DEBUG includes the
  masked message trace; `-vv` also lets other libraries' (asyncio's, ...) debug lines through.
- `json`: one object per line with `time` (UTC, ISO 8601, ms), `level`, `logger`, `message`, and, when
  the line was logged while a transaction was being processed, its `txn_id`, `terminal`, `stan`, `mti`,
  `flow` and `rc` as keys (whatever is known by then); `exception` holds a traceback; a worker of
  `serve --workers N` adds `worker` (its index; in text lines `worker K` before the logger's name).
- The transaction context is a `ContextVar` the service sets once per terminal request
  (`begin_transaction`) and fills in as it goes (`note`): every log line of that request's task, the
  host link's included, carries it without being passed anything.
- `trace(direction, message)`: at DEBUG on the `gateway.wire` logger, one line per message in or out,
  built from `Message.masked()` only: the PAN as 6+4, tracks, PIN blocks, chip data, key blocks and
  private field 48 as their length — as jPOS's ProtectedLogListener does. Nothing else here ever sees a
  message. When the trace is off it costs one `isEnabledFor` (cached by `logging`).

The standard library's `logging` and `json` do the work: a JSON formatter is thirty lines, not worth a
dependency.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextvars import ContextVar, Token
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from gateway.iso.message import Message

FORMATS: Final = ("text", "json")
LEVEL_ENV: Final = "GATEWAY_LOG_LEVEL"
FORMAT_ENV: Final = "GATEWAY_LOG_FORMAT"
#: set by `gateway serve --workers N` for each worker ("index/N"): every line a worker logs says which
#: worker it is, since the workers share the group's stderr (defined here, not in `gateway.workers`, so
#: that logging needs nothing of the process group)
WORKER_SLOT_ENV: Final = "GATEWAY_WORKER_SLOT"
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: the message trace's logger (a child of "gateway": on whenever the gateway logs at DEBUG)
WIRE_LOGGER: Final = "gateway.wire"
#: commands that run as a server and log their INFO lines without being asked
SERVER_COMMANDS: Final = frozenset({"serve"})

_wire = logging.getLogger(WIRE_LOGGER)


class LogConfigError(ValueError):
    """A log level or format that is not one of the known names."""


# --- the transaction context ---------------------------------------------------------------------


@dataclass(slots=True)
class TxnContext:
    """What is known about the terminal request being processed in this task."""

    terminal: str | None = None
    stan: str | None = None
    mti: str | None = None
    flow: str | None = None
    txn_id: int | None = None
    #: field 39 of the answer decided for the terminal
    rc: str | None = None
    #: whether that answer was written to the terminal (None: not tried yet)
    delivered: bool | None = None

    def as_fields(self) -> dict[str, Any]:
        """The known values, for a log line (`delivered` is for metrics, not logs)."""
        out: dict[str, Any] = {}
        if self.txn_id is not None:
            out["txn_id"] = self.txn_id
        for key in ("terminal", "stan", "mti", "flow", "rc"):
            value = getattr(self, key)
            if value:
                out[key] = value
        return out


_current: ContextVar[TxnContext | None] = ContextVar("gateway_transaction", default=None)


def begin_transaction(message: Message | None) -> tuple[TxnContext, Token[TxnContext | None]]:
    """Start the context of one terminal request (in the task that processes it); pass the token to
    `end_transaction` when it is done. Only identifiers are taken from the message: 41, 11, the MTI."""
    if message is None:
        ctx = TxnContext()
    else:
        fields = message.fields
        ctx = TxnContext(fields.get("41"), fields.get("11"), message.mti)
    return ctx, _current.set(ctx)


def end_transaction(token: Token[TxnContext | None]) -> None:
    _current.reset(token)


def current_transaction() -> TxnContext | None:
    return _current.get()


def note(**values: Any) -> None:
    """Add what became known (`flow=`, `txn_id=`, `rc=`, `delivered=`) to the current request's context;
    nothing when no request is being processed in this task."""
    ctx = _current.get()
    if ctx is not None:
        for key, value in values.items():
            setattr(ctx, key, value)


# --- the masked message trace --------------------------------------------------------------------


def trace(direction: str, message: Message) -> None:
    """One DEBUG line for a message seen on the wire ("terminal_in", "terminal_out", "host_out",
    "host_in"), masked. Call it with decoded or about-to-be-encoded messages only."""
    if _wire.isEnabledFor(logging.DEBUG):
        masked = message.masked()
        shown = " ".join(f"{k}={v}" for k, v in masked.items() if k != "t")
        _wire.debug("%s %s %s", direction, message.mti, shown,
                    extra={"wire": {"direction": direction, "fields": masked}})


# --- formats ---------------------------------------------------------------------------------------


class ContextFilter(logging.Filter):
    """Copies the current transaction's context onto every record (as `record.txn`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "txn"):
            ctx = _current.get()
            record.txn = ctx.as_fields() if ctx is not None else {}
        return True


class ThresholdFilter(logging.Filter):
    """The handler's levels: one for the gateway's own loggers, one for everything else. Kept on the
    handler rather than on the "gateway" logger, so installing it changes no logger a library, a test
    or an embedding program relies on (only the root's level, as `logging.basicConfig` does)."""

    def __init__(self, gateway_level: int, other_level: int) -> None:
        super().__init__()
        self.gateway_level = gateway_level
        self.other_level = other_level

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        ours = name == "gateway" or name.startswith("gateway.")
        return record.levelno >= (self.gateway_level if ours else self.other_level)


class TextFormatter(logging.Formatter):
    """The classic line, with the transaction's identifiers appended in brackets when there are any;
    a worker of `serve --workers` puts `worker <index>` before the logger's name."""

    def __init__(self, worker: str | None = None) -> None:
        super().__init__(TEXT_FORMAT.replace("%(name)s", f"worker {worker} %(name)s") if worker else TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context: dict[str, Any] = getattr(record, "txn", {})
        if context:
            line += " [" + " ".join(f"{k}={v}" for k, v in context.items()) + "]"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line (keys described in the module docstring)."""

    def __init__(self, worker: str | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker:
            out["worker"] = self.worker
        out.update(getattr(record, "txn", {}))
        wire = getattr(record, "wire", None)
        if wire is not None:
            out.update(wire)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


# --- configuration ---------------------------------------------------------------------------------

_LEVEL_NAMES: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                       "error": logging.ERROR, "critical": logging.CRITICAL}


def levels_for(verbosity: int, command: str | None) -> tuple[int, int]:
    """(level of the gateway's own loggers, level of everything else) for `-v` given `verbosity` times.
    Tools: WARNING, -v INFO, -vv DEBUG; `serve`: INFO, -v DEBUG. The message trace is part of DEBUG.
    Other libraries (asyncio, ...) stay at WARNING until -vv."""
    step = verbosity + (1 if command in SERVER_COMMANDS else 0)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(step, 2)]
    return level, logging.DEBUG if verbosity >= 2 else logging.WARNING


def _worker_index(slot: str | None) -> str | None:
    """"2/4" → "2"; anything malformed is left to `gateway.workers` to refuse (no tag here)."""
    index = (slot or "").partition("/")[0].strip()
    return index if index.isdigit() else None


def parse_level(text: str) -> int:
    level = _LEVEL_NAMES.get(text.strip().lower())
    if level is None:
        raise LogConfigError(f"{LEVEL_ENV}: expected one of {', '.join(_LEVEL_NAMES)}, got {text!r}")
    return level


def parse_format(text: str) -> str:
    fmt = text.strip().lower()
    if fmt not in FORMATS:
        raise LogConfigError(f"log format: expected {' or '.join(FORMATS)}, got {text!r}")
    return fmt


def configure(verbosity: int = 0, fmt: str | None = None, *, command: str | None = None,
              stream: TextIO | None = None, environ: dict[str, str] | None = None) -> logging.Handler:
    """Install the gateway's log handler on the root logger (replacing any earlier one of ours).

    `-v` flags win over `GATEWAY_LOG_LEVEL` (debug, info, warning, error), which wins over the command's
    default; `fmt` wins over `GATEWAY_LOG_FORMAT`. With `GATEWAY_LOG_LEVEL=debug` the trace is on."""
    env = os.environ if environ is None else environ
    level, others = levels_for(verbosity, command)
    if verbosity == 0 and env.get(LEVEL_ENV):
        level = parse_level(env[LEVEL_ENV])
    chosen = parse_format(fmt or env.get(FORMAT_ENV) or "text")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    worker = _worker_index(env.get(WORKER_SLOT_ENV))
    handler.setFormatter(JsonFormatter(worker) if chosen == "json" else TextFormatter(worker))
    handler.addFilter(ThresholdFilter(level, others))
    handler.addFilter(ContextFilter())
    handler._gateway = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_gateway", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # records below both levels are never made; the trace (`isEnabledFor(DEBUG)`) follows the root
    root.setLevel(min(level, others))
    return handler
