"""Configuration: one TOML file (plus GATEWAY_<SECTION>__<KEY> environment overrides) read once into
frozen, typed objects that are passed down. Nothing looks configuration up globally.

The sections are pydantic dataclasses: real, frozen dataclasses (`config.host.timeout`,
`dataclasses.replace` work as with the standard library) whose types and constraints pydantic checks
when a file is read *and* when code builds one. A bad file fails at start with `ConfigError`, which
lists every problem at once, each naming its key, and for a value from the environment the variable:

    host.timeout: Input should be a valid number [got 'soon'] (from GATEWAY_HOST__TIMEOUT)
    terminals[1].terminal_id: duplicate of terminals[0] (10000001)

How to add a key (the whole recipe; no parse code to write):

1. Add a field to its section class with a type alias below (`Seconds`, `Count`, `Text`, `Flag`, ...)
   or `Literal[...]` for a choice, and a default:  `frame_deadline: Seconds = 30.0`.
   Constraints go in the type (`Annotated[int, Strict(), Field(ge=1, le=99)]`); a value that needs
   converting first gets a `BeforeValidator` (see `_EndpointField`, `_OptionalPath`). Mark a secret
   with `field(default=None, metadata=SECRET)` so `gateway config show` masks it.
2. A new section: a class with the same `@dataclass(...)` decorator, then a field on `GatewayConfig` with
   `field(default_factory=NewSection)`. Unknown keys are refused in every section.
3. A rule that spans keys (two sections, or a value that depends on another) is a function in
   `CROSS_CHECKS` returning problems as "key: message" strings.
4. Document the key in examples/gateway.toml; tests/test_config.py has a table of bad values and the
   key each must name: add yours.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass

from gateway.store.group_commit import MAX_COMMIT_DELAY
from gateway.store.records import DEFAULT_MAX_REFUSALS

T = TypeVar("T")


class ConfigError(Exception):
    """Configuration values that are missing, of the wrong type or out of range: one line per problem."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems: tuple[str, ...] = (problems,) if isinstance(problems, str) else tuple(problems)
        super().__init__("\n".join(self.problems))


# --- value types ------------------------------------------------------------------------------------


def _split_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    port_no = int(port)
    if not 0 <= port_no <= 65535:
        raise ValueError(f"port {port_no} out of range")
    return host.strip("[]"), port_no


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, key: str) -> Endpoint:
        try:
            return cls(*_split_endpoint(text))
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _to_endpoint(value: object) -> object:
    return Endpoint(*_split_endpoint(value)) if isinstance(value, str) else value


def _empty_is_none(value: object) -> object:
    return None if value == "" else value


def _endpoint_or_none(value: object) -> object:
    return None if value == "" else _to_endpoint(value)


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def _postgres_url(value: object) -> object:
    if value == "":
        return None
    if isinstance(value, str) and not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("expected a postgresql:// URL")
    return value


#: strict: TOML gives real types, so "soon" for a number or true for a count is a mistake, not a hint
Seconds = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]  #: > 0
NonNegativeSeconds = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Strict(), Field(gt=0)]  #: >= 1
NonNegative = Annotated[int, Strict(), Field(ge=0)]
Text = Annotated[str, Strict()]
Flag = Annotated[bool, Strict()]
_EndpointField = Annotated[Endpoint, BeforeValidator(_to_endpoint)]
_OptionalEndpoint = Annotated[Endpoint | None, BeforeValidator(_endpoint_or_none)]  #: "" turns it off
_OptionalPath = Annotated[Path | None, BeforeValidator(_empty_is_none)]
_OptionalText = Annotated[str | None, Strict(), BeforeValidator(_empty_is_none)]
Framing = Literal["len2", "ascii4", "cup"]
_InstanceId = Annotated[str, Strict(), Field(min_length=1, max_length=64)]

#: field metadata of a secret: `gateway config show` prints it masked
SECRET: Mapping[str, bool] = {"secret": True}

#: every section: frozen, slots, unknown keys refused
_STRICT_KEYS = ConfigDict(extra="forbid")


# --- sections ---------------------------------------------------------------------------------------


TlsVersion = Literal["1.2", "1.3"]


@dataclass(frozen=True, slots=True, config=_STRICT_KEYS)
class TlsServerConfig:
    """`[terminal_side.tls]`: TLS on the terminal port (absent: plain TCP, what most CUP terminals speak)."""

    cert: Path  #: PEM certificate (chain) the gateway presents
    key: Path  #: its PEM private key
    ca: _OptionalPath = None  #: PEM CA bundle client certificates must chain to
    #: "none", "optional" (checked when presented) or "required" (mTLS)
    client_certs: Literal["none", "optional", "required"] = "none"
    min_version: TlsVersion = "1.2"

    @model_validator(mode="after")
    def _ca_checks_client_certificates(self) -> TlsServerConfig:
        if self.client_certs != "none" and self.ca is None:
            raise ValueError(f"ca is required to check client certificates (client_certs = {self.client_certs!r})")
        return self


@dataclass(frozen=True, slots=True, config=_STRICT_KEYS)
class TlsClientConfig:
    """`[host.tls]`: TLS on the host link (absent: plain TCP)."""

    ca: _OptionalPath = None  #: PEM CA bundle the host's certificate must chain to (None: the system's)
    cert: _OptionalPath = None  #: PEM client certificate, for a host that asks for one (mTLS)
    key: _OptionalPath = None  #: its PEM private key
    server_name: _OptionalText = None  #: name the host's certificate must carry (None: host.address's host)
    min_version: TlsVersion = "1.2"

    @model_validator(mode="after")
    def _cert_with_key(self) -> TlsClientConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both cert and key")
        return self


@dataclass(frozen=True, slots=True, config=_STRICT_KEYS)
class TerminalSideConfig:
    listen: _EndpointField = Endpoint("127.0.0.1", 5000)
    #: the codec reads any dialect file, but the flow translation is written for this pair
    dialect: Literal["cup-pos"] = "cup-pos"
    framing: Framing = "cup"
    max_connections: Count = 1000
    max_frame: Count = 8192
    idle_timeout: Seconds = 300.0
    write_timeout: Seconds = 5.0
    max_in_flight_per_connection: Count = 64
    #: a frame must arrive whole within this many seconds of its first byte (and a TLS handshake within
    #: this many of the connect): the idle timeout alone restarts on every byte, so a trickle never ends
    frame_timeout: Seconds = 10.0
    tls: Annotated[TlsServerConfig | None, BeforeValidator(_empty_is_none)] = None


MatchKeyPart = Literal["mti_class", "stan", "terminal"]


@dataclass(frozen=True, slots=True, config=_STRICT_KEYS)
class HostConfig:
    address: _EndpointField = Endpoint("127.0.0.1", 6000)
    dialect: Literal["iso87-ascii"] = "iso87-ascii"
    framing: Framing = "len2"
    max_frame: Count = 8192
    timeout: Seconds = 10.0
    connect_timeout: Seconds = 5.0
    echo_interval: Seconds = 30.0
    reconnect_min: Seconds = 0.2
    reconnect_max: Seconds = 30.0
    acquirer_id: Text = "00000001234"
    forwarding_id: Text = "00000000000"
    #: request/response pairing, like jPOS QMUX's key: "stan" plus any of "mti_class", "terminal"
    match_key: tuple[MatchKeyPart, ...] = ("mti_class", "stan", "terminal")
    key_exchange: Flag = True
    #: what this host answers to a reversal of an original it has not booked: "25" (original not found),
    #: or "00" (some hosts). With "00", a MAC-verified approval that comes late, after the reversal was
    #: answered, reopens the reversal as a 25 does: the host may have booked the original after it.
    unknown_reversal_rc: Literal["25", "00"] = "25"
    tls: Annotated[TlsClientConfig | None, BeforeValidator(_empty_is_none)] = None

    @field_validator("match_key")
    @classmethod
    def _needs_stan(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "stan" not in value:
            raise ValueError("must include stan")
        return value


@dataclass(frozen=True, slots=True, config=_STRICT_KEYS)
class SecurityConfig:
    keystore: _OptionalPath = None  #: None: keys live in memory only (demo, tests)
    lmk_file: _OptionalPath = None  #: else the LMK comes from GATEWAY_LMK
    terminal_mac: Literal["cup-ecb", "x919"] = "cup-ecb"
    key_mode: Literal["001", "003", "004"] = "004"
    #: hex; only for the demo and tests, a real deployment imports it with `gateway keys`
    zmk: _OptionalText = field(default=None, metadata=SECRET)


@dataclass(frozen=True, slots=True, config=_STRICT_KEYS)
class StoreConfig:
    path: Path = Path("var/journal.db")
    synchronous: Annotated[Literal["FULL", "NORMAL", "OFF"], BeforeValidator(_upper)] = "FULL"
    #: seconds the first write of a batch waits for others to share its commit (0: none); see group_commit
    commit_delay: Annotated[float, Strict(), Field(ge=0, le=MAX_COMMIT_DELAY, allow_inf_nan=False)] = 0.002
    #: key of the PAN fingerprint (HMAC); GATEWAY_PAN_HASH_KEY overrides
    pan_hash_key_hex: _OptionalText = field(default=None, metadata=SECRET)
    #: refusals kept on record at most (the oldest go first): a flood of garbage cannot fill the disk
    max_refusals: Count = DEFAULT_MAX_REFUSALS
    # --- PostgreSQL: several instances on one journal (README "PostgreSQL store"); `path` and
    # `synchronous` are SQLite's
    #: "postgresql://..." selects the PostgreSQL store; unset: SQLite at `path` (secret: it may hold a password)
    url: Annotated[Text | None, BeforeValidator(_postgres_url)] = field(default=None, metadata=SECRET)
    #: unique per running instance, stable across its restarts (unset: the host name)
    instance_id: Annotated[_InstanceId | None, BeforeValidator(_empty_is_none)] = None
    saf_lease: Seconds = 15.0  #: seconds a claimed SAF entry stays this instance's unless renewed
    heartbeat_interval: Seconds = 1.0
    #: a heartbeat older than this: the instance is dead, live ones take over its pending requests
    orphan_after: Seconds = 10.0
    pool_size: Count = 4  #: read connections
    #: seconds a journal write waits for a row another session holds locked (a dead instance's open
    #: transaction, an operator's FOR UPDATE) before that one write fails instead of stalling them all
    lock_timeout: Annotated[float, Strict(), Field(gt=0, le=600, allow_inf_nan=False)] = 2.0


@dataclass(frozen=True, slots=True, config=_STRICT_KEYS)
class ReversalConfig:
    max_attempts: Count = 6
    backoff: Annotated[tuple[NonNegativeSeconds, ...], Field(min_length=1)] = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
    poll_interval: Seconds = 0.5
    unknown_original_rc: Literal["00", "25"] = "25"  #: answer to a terminal reversal whose original we never saw
    original_wait: NonNegativeSeconds = 15.0  #: how long a terminal reversal waits for its in-flight original
    #: "identical": a repeat is the first attempt's message (same STAN and field 7, kept in the journal)
    #: with the MTI's last digit 1, as ISO 8583:1987 means it; "fresh": a new STAN and field 7 each attempt
    repeat: Literal["identical", "fresh"] = "identical"
    #: "0400": reversals go upstream as 0400/0401; "0420": as acquirer reversal advices 0420/0421
    upstream_mti: Literal["0400", "0420"] = "0400"


@dataclass(frozen=True, slots=True, config=_STRICT_KEYS)
class LimitsConfig:
    per_transaction: NonNegative = 5_000_000  #: minor units
    per_day: NonNegative = 50_000_000  #: per terminal, minor units, purchases


@dataclass(frozen=True, slots=True, config=_STRICT_KEYS)
class AdminConfig:
    listen: _OptionalEndpoint = Endpoint("127.0.0.1", 9100)
    metrics: Flag = True


@dataclass(frozen=True, slots=True, config=_STRICT_KEYS)
class TraceConfig:
    """Recording both legs to a trace (gateway.trace): off unless `path` is set."""

    path: _OptionalPath = None
    max_bytes: Count = 64 * 1024 * 1024  #: per file; the live file rotates to path.1, path.2, ...
    max_files: Count = 8  #: files kept in all (disk used: at most max_bytes × max_files)
    max_pending: Count = 8 * 1024 * 1024  #: bytes waiting for the writer before records are dropped


@dataclass(frozen=True, slots=True, config=_STRICT_KEYS)
class TerminalEntry:
    terminal_id: Annotated[str, Strict(), Field(min_length=8, max_length=8)]
    merchant_id: Annotated[str, Strict(), Field(min_length=15, max_length=15)]
    #: hex; demo/tests only. Production TMKs are imported with `gateway keys`.
    tmk: _OptionalText = field(default=None, metadata=SECRET)


@dataclass(frozen=True, slots=True, config=_STRICT_KEYS)
class GatewayConfig:
    terminal_side: TerminalSideConfig = field(default_factory=TerminalSideConfig)
    host: HostConfig = field(default_factory=HostConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    reversal: ReversalConfig = field(default_factory=ReversalConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    terminals: tuple[TerminalEntry, ...] = ()
    trace: TraceConfig = field(default_factory=TraceConfig)
    _by_id: dict[str, TerminalEntry] = field(init=False, repr=False, compare=False)

    @field_validator("terminals")
    @classmethod
    def _unique_terminals(cls, value: tuple[TerminalEntry, ...]) -> tuple[TerminalEntry, ...]:
        duplicates = duplicate_terminals([entry.terminal_id for entry in value])
        if duplicates:
            raise ValueError("; ".join(duplicates))
        return value

    def __post_init__(self) -> None:
        # looked up on every message: a dict, built once
        object.__setattr__(self, "_by_id", {entry.terminal_id: entry for entry in self.terminals})

    def terminal(self, terminal_id: str) -> TerminalEntry | None:
        return self._by_id.get(terminal_id)


def duplicate_terminals(terminal_ids: Sequence[object]) -> list[str]:
    """One line per repeated terminal id: two entries would share (and fight over) one TMK. Ids that
    are not text are reported by the type check, not here."""
    first: dict[object, int] = {}
    duplicates = []
    for i, tid in enumerate(terminal_ids):
        if not isinstance(tid, str):
            continue
        if tid in first:
            duplicates.append(f"duplicate terminal_id {tid}: terminals[{i}] repeats terminals[{first[tid]}]")
        first.setdefault(tid, i)
    return duplicates


# --- rules across keys ------------------------------------------------------------------------------


def _original_wait_covers_host_timeout(config: GatewayConfig) -> str | None:
    if config.reversal.original_wait < config.host.timeout:
        # a terminal reversal must wait out its original's host exchange, or its 0400 could overtake it
        return "reversal.original_wait: must be at least host.timeout"
    return None


def _heartbeat_within_lease(config: GatewayConfig) -> str | None:
    store = config.store
    if not store.heartbeat_interval < min(store.saf_lease, store.orphan_after):
        # a live instance must beat (and renew its leases) well before anyone may take its work over
        return "store.heartbeat_interval: must be shorter than store.saf_lease and store.orphan_after"
    return None


CROSS_CHECKS: tuple[Callable[[GatewayConfig], str | None], ...] = (
    _original_wait_covers_host_timeout, _heartbeat_within_lease,
)


# --- reading ----------------------------------------------------------------------------------------

_ADAPTER: TypeAdapter[GatewayConfig] = TypeAdapter(GatewayConfig)


def _key(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _secret_names() -> frozenset[str]:
    """Names of the fields marked SECRET in any section: their values never appear in a problem."""
    names = set()
    for section in (*typing.get_type_hints(GatewayConfig).values(), TerminalEntry):
        if isinstance(section, type) and dataclasses.is_dataclass(section):
            names |= {f.name for f in dataclasses.fields(section) if f.metadata.get("secret")}
    return frozenset(names)


_SECRET_NAMES: frozenset[str] = _secret_names()


def _problem(error: Any, sources: Mapping[str, str]) -> str:
    loc = tuple(error["loc"])
    key = _key(loc)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "unexpected_keyword_argument":
        message = "unknown key" if "." in key or "[" in key else "unknown section"
    elif error["type"] not in ("missing", "value_error") and "input" in error and _SECRET_NAMES.isdisjoint(loc):
        message += f" [got {error['input']!r}]"
    # a list item (host.match_key[1]) came from the variable that set the whole key
    source = sources.get(key) or sources.get(_key(tuple(p for p in loc if not isinstance(p, int))))
    return f"{key}: {message}" + (f" (from {source})" if source else "")


def parse_config(doc: Mapping[str, Any], *, sources: Mapping[str, str] | None = None) -> GatewayConfig:
    """Turn a parsed TOML document into a `GatewayConfig`. `ConfigError` lists every bad value by its
    key; `sources` maps keys ("host.timeout") to the environment variable that set them."""
    sources = sources or {}
    if "terminals" in doc and not isinstance(doc["terminals"], list):
        raise ConfigError("terminals: expected an array of tables ([[terminals]])")
    try:
        config = _ADAPTER.validate_python(doc)
    except ValidationError as exc:
        problems = [_problem(error, sources) for error in exc.errors()]
        # the model checks duplicates only once every entry is valid: name them now, with the rest
        raw_ids = [e.get("terminal_id") for e in doc.get("terminals", ()) if isinstance(e, dict)]
        problems += [f"terminals: {line}" for line in duplicate_terminals(raw_ids)
                     if f"terminals: {line}" not in problems]
        raise ConfigError(problems) from None
    problems = [problem for check in CROSS_CHECKS if (problem := check(config))]
    if problems:
        raise ConfigError(problems)
    return config


#: environment overrides: GATEWAY_<SECTION>__<KEY>=value (values parsed as TOML scalars when they can be)
ENV_PREFIX = "GATEWAY_"


def _section_class(name: str) -> type | None:
    hint = typing.get_type_hints(GatewayConfig).get(name)
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _wants_text(hint: Any) -> bool:
    """Whether a field takes text (so an environment value stays the string it is: "004", "1234")."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return all(isinstance(arg, str) for arg in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return any(_wants_text(arg) for arg in typing.get_args(hint) if arg is not type(None))
    return hint in (str, Path, Endpoint)


def _env_value(section_name: str, key: str, raw: str) -> object:
    cls = _section_class(section_name)
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'"
    if cls is not None and _wants_text(typing.get_type_hints(cls).get(key)) and not quoted:
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string such as an address; the type check names it if it is not one


def env_overrides(doc: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The document with GATEWAY_<SECTION>__<KEY> values applied, and which key each variable set."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in doc.items()}
    sources: dict[str, str] = {}
    problems = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section_name, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        table = merged.setdefault(section_name, {})
        if not isinstance(table, dict):
            problems.append(f"{section_name}: not a table, cannot be set from {name}")
            continue
        table[key] = _env_value(section_name, key, raw)
        sources[f"{section_name}.{key}"] = name
        sources.setdefault(section_name, name)  # an unknown section is named by its first variable
    if problems:
        raise ConfigError(problems)
    return merged, sources


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a TOML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read the TOML file (or only defaults when `path` is None) and apply environment overrides."""
    doc = read_config_file(path) if path is not None else {}
    merged, sources = env_overrides(doc, os.environ if environ is None else environ)
    return parse_config(merged, sources=sources)


# --- showing ----------------------------------------------------------------------------------------

MASK = "********"


def to_document(config: object, *, mask_secrets: bool = True) -> dict[str, Any]:
    """The config as a TOML-ready document (what `gateway config show` prints): endpoints as HOST:PORT,
    paths as text, unset values as "" (which reads back as unset), secrets that are set masked."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        if not f.init:
            continue
        value = _plain(getattr(config, f.name), mask_secrets)
        if value is None:
            out[f.name] = ""  # every optional key reads "" as unset
        else:
            out[f.name] = MASK if mask_secrets and f.metadata.get("secret") else value
    return out


def _plain(value: object, mask_secrets: bool) -> Any:
    if isinstance(value, Endpoint | Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_document(value, mask_secrets=mask_secrets)
    if isinstance(value, tuple | list):
        return [_plain(v, mask_secrets) for v in value]
    return value
