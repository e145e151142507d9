"""Configuration: one TOML file (plus GATEWAY_* environment overrides) read once into frozen, typed
objects that are passed down. Nothing looks configuration up globally.

A bad file fails at start with `ConfigError` naming the key (`host.timeout: expected a number`),
never a traceback.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gateway.store.group_commit import MAX_COMMIT_DELAY

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration value that is missing, of the wrong type or out of range."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, key: str) -> Endpoint:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ConfigError(f"{key}: expected HOST:PORT, got {text!r}")
        port_no = int(port)
        if not 0 <= port_no <= 65535:
            raise ConfigError(f"{key}: port {port_no} out of range")
        return cls(host.strip("[]"), port_no)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TerminalSideConfig:
    listen: Endpoint = Endpoint("127.0.0.1", 5000)
    dialect: str = "cup-pos"
    framing: str = "cup"
    max_connections: int = 1000
    max_frame: int = 8192
    idle_timeout: float = 300.0
    write_timeout: float = 5.0
    max_in_flight_per_connection: int = 64


@dataclass(frozen=True, slots=True)
class HostConfig:
    address: Endpoint = Endpoint("127.0.0.1", 6000)
    dialect: str = "iso87-ascii"
    framing: str = "len2"
    max_frame: int = 8192
    timeout: float = 10.0
    connect_timeout: float = 5.0
    echo_interval: float = 30.0
    reconnect_min: float = 0.2
    reconnect_max: float = 30.0
    acquirer_id: str = "00000001234"
    forwarding_id: str = "00000000000"
    #: request/response pairing, like jPOS QMUX's key: "stan" plus any of "mti_class", "terminal"
    match_key: tuple[str, ...] = ("mti_class", "stan", "terminal")
    key_exchange: bool = True


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    keystore: Path | None = None  #: None: keys live in memory only (demo, tests)
    lmk_file: Path | None = None  #: else the LMK comes from GATEWAY_LMK
    terminal_mac: str = "cup-ecb"
    key_mode: str = "004"
    zmk: str | None = None  #: hex; only for the demo and tests, a real deployment imports it with `gateway keys`


@dataclass(frozen=True, slots=True)
class StoreConfig:
    path: Path = Path("var/journal.db")
    synchronous: str = "FULL"
    #: seconds the first write of a batch waits for others to share its commit (0: none); see group_commit
    commit_delay: float = 0.002
    pan_hash_key_hex: str | None = None  #: key of the PAN fingerprint (HMAC); GATEWAY_PAN_HASH_KEY overrides
    # --- PostgreSQL (several instances on one journal); `path` and `synchronous` are SQLite's ---------
    url: str | None = None  #: "postgresql://..." selects the PostgreSQL store; None: SQLite at `path`
    instance_id: str | None = None  #: unique per running instance, stable across its restarts (default: host name)
    saf_lease: float = 15.0  #: seconds a claimed SAF entry stays this instance's unless renewed
    heartbeat_interval: float = 1.0
    orphan_after: float = 10.0  #: heartbeat older than this: the instance is dead, its pending rows are taken over
    pool_size: int = 4  #: read connections


@dataclass(frozen=True, slots=True)
class ReversalConfig:
    max_attempts: int = 6
    backoff: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
    poll_interval: float = 0.5
    unknown_original_rc: str = "25"  #: answer to a terminal reversal whose original we never saw
    original_wait: float = 15.0  #: how long a terminal reversal waits for its in-flight original
    #: "identical": a repeat is the first attempt's message (same STAN and field 7, kept in the journal)
    #: with the MTI's last digit 1, as ISO 8583:1987 means it; "fresh": a new STAN and field 7 each attempt
    repeat: str = "identical"
    #: "0400": reversals go upstream as 0400/0401; "0420": as acquirer reversal advices 0420/0421
    upstream_mti: str = "0400"


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    per_transaction: int = 5_000_000  #: minor units
    per_day: int = 50_000_000  #: per terminal, minor units, purchases


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Endpoint | None = Endpoint("127.0.0.1", 9100)
    metrics: bool = True


@dataclass(frozen=True, slots=True)
class TerminalEntry:
    terminal_id: str
    merchant_id: str
    tmk: str | None = None  #: hex; demo/tests only. Production TMKs are imported with `gateway keys`.


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    terminal_side: TerminalSideConfig = field(default_factory=TerminalSideConfig)
    host: HostConfig = field(default_factory=HostConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    reversal: ReversalConfig = field(default_factory=ReversalConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    terminals: tuple[TerminalEntry, ...] = ()
    _by_id: dict[str, TerminalEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # looked up on every message: a dict, built once
        object.__setattr__(self, "_by_id", {entry.terminal_id: entry for entry in self.terminals})

    def terminal(self, terminal_id: str) -> TerminalEntry | None:
        return self._by_id.get(terminal_id)


# --- reading ---------------------------------------------------------------------------------------


def _get(table: Mapping[str, Any], key: str, path: str, kind: type[T], default: T) -> T:
    if key not in table:
        return default
    value = table[key]
    full = f"{path}.{key}" if path else key
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"{full}: expected an integer, got a boolean")
    if not isinstance(value, kind):
        raise ConfigError(f"{full}: expected {_kind_name(kind)}, got {type(value).__name__}")
    if kind in (int, float) and value < 0:  # type: ignore[operator]
        raise ConfigError(f"{full}: must not be negative")
    return value  # type: ignore[return-value]


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(kind, kind.__name__)


def _table(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table")
    return value


def _check_unknown(table: Mapping[str, Any], path: str, known: set[str]) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{path}.{key}: unknown key")


def _positive(section: object, path: str, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            raise ConfigError(f"{path}.{name}: must be positive")


def _endpoint(table: Mapping[str, Any], key: str, path: str, default: Endpoint) -> Endpoint:
    text = _get(table, key, path, str, "")
    return Endpoint.parse(text, f"{path}.{key}") if text else default


def parse_config(doc: Mapping[str, Any]) -> GatewayConfig:
    """Turn a parsed TOML document into a `GatewayConfig`, naming the key of any bad value."""
    known_tables = {"terminal_side", "host", "security", "store", "reversal", "limits", "admin", "terminals"}
    for key in doc:
        if key not in known_tables:
            raise ConfigError(f"{key}: unknown section")

    t = _table(doc, "terminal_side")
    d = TerminalSideConfig()
    _check_unknown(t, "terminal_side", {f for f in TerminalSideConfig.__slots__})  # type: ignore[attr-defined]
    terminal_side = TerminalSideConfig(
        listen=_endpoint(t, "listen", "terminal_side", d.listen),
        dialect=_get(t, "dialect", "terminal_side", str, d.dialect),
        framing=_get(t, "framing", "terminal_side", str, d.framing),
        max_connections=_get(t, "max_connections", "terminal_side", int, d.max_connections),
        max_frame=_get(t, "max_frame", "terminal_side", int, d.max_frame),
        idle_timeout=_get(t, "idle_timeout", "terminal_side", float, d.idle_timeout),
        write_timeout=_get(t, "write_timeout", "terminal_side", float, d.write_timeout),
        max_in_flight_per_connection=_get(
            t, "max_in_flight_per_connection", "terminal_side", int, d.max_in_flight_per_connection
        ),
    )

    # the codec reads any dialect file, but the flow translation is written for this pair
    if terminal_side.dialect != "cup-pos":
        raise ConfigError("terminal_side.dialect: only cup-pos terminals are supported by the flows")
    _positive(terminal_side, "terminal_side", ("max_connections", "max_frame", "idle_timeout", "write_timeout",
                                               "max_in_flight_per_connection"))

    h = _table(doc, "host")
    hd = HostConfig()
    _check_unknown(h, "host", set(HostConfig.__slots__))  # type: ignore[attr-defined]
    match_key = h.get("match_key", list(hd.match_key))
    if not isinstance(match_key, list) or "stan" not in match_key or not all(
        k in {"mti_class", "stan", "terminal"} for k in match_key
    ):
        raise ConfigError("host.match_key: expected a list of mti_class/stan/terminal that includes stan")
    host = HostConfig(
        address=_endpoint(h, "address", "host", hd.address),
        dialect=_get(h, "dialect", "host", str, hd.dialect),
        framing=_get(h, "framing", "host", str, hd.framing),
        max_frame=_get(h, "max_frame", "host", int, hd.max_frame),
        timeout=_get(h, "timeout", "host", float, hd.timeout),
        connect_timeout=_get(h, "connect_timeout", "host", float, hd.connect_timeout),
        echo_interval=_get(h, "echo_interval", "host", float, hd.echo_interval),
        reconnect_min=_get(h, "reconnect_min", "host", float, hd.reconnect_min),
        reconnect_max=_get(h, "reconnect_max", "host", float, hd.reconnect_max),
        acquirer_id=_get(h, "acquirer_id", "host", str, hd.acquirer_id),
        forwarding_id=_get(h, "forwarding_id", "host", str, hd.forwarding_id),
        match_key=tuple(match_key),
        key_exchange=_get(h, "key_exchange", "host", bool, hd.key_exchange),
    )
    if host.dialect != "iso87-ascii":
        raise ConfigError("host.dialect: only an iso87-ascii host is supported by the flows")
    _positive(host, "host", ("timeout", "connect_timeout", "echo_interval", "reconnect_min", "reconnect_max",
                              "max_frame"))

    s = _table(doc, "security")
    sd = SecurityConfig()
    _check_unknown(s, "security", set(SecurityConfig.__slots__))  # type: ignore[attr-defined]
    keystore = _get(s, "keystore", "security", str, "")
    lmk_file = _get(s, "lmk_file", "security", str, "")
    security = SecurityConfig(
        keystore=Path(keystore) if keystore else None,
        lmk_file=Path(lmk_file) if lmk_file else None,
        terminal_mac=_get(s, "terminal_mac", "security", str, sd.terminal_mac),
        key_mode=_get(s, "key_mode", "security", str, sd.key_mode),
        zmk=_get(s, "zmk", "security", str, "") or None,
    )
    if security.terminal_mac not in {"cup-ecb", "x919"}:
        raise ConfigError("security.terminal_mac: expected cup-ecb or x919")
    if security.key_mode not in {"001", "003", "004"}:
        raise ConfigError("security.key_mode: expected 001, 003 or 004")

    st = _table(doc, "store")
    std = StoreConfig()
    _check_unknown(st, "store", set(StoreConfig.__slots__))  # type: ignore[attr-defined]
    store = StoreConfig(
        path=Path(_get(st, "path", "store", str, str(std.path))),
        synchronous=_get(st, "synchronous", "store", str, std.synchronous).upper(),
        commit_delay=_get(st, "commit_delay", "store", float, std.commit_delay),
        pan_hash_key_hex=_get(st, "pan_hash_key_hex", "store", str, "") or None,
        url=_get(st, "url", "store", str, "") or None,
        instance_id=_get(st, "instance_id", "store", str, "") or None,
        saf_lease=_get(st, "saf_lease", "store", float, std.saf_lease),
        heartbeat_interval=_get(st, "heartbeat_interval", "store", float, std.heartbeat_interval),
        orphan_after=_get(st, "orphan_after", "store", float, std.orphan_after),
        pool_size=_get(st, "pool_size", "store", int, std.pool_size),
    )
    if store.url is not None and not store.url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("store.url: expected a postgresql:// URL")
    _positive(store, "store", ("saf_lease", "heartbeat_interval", "orphan_after"))
    if not store.heartbeat_interval < store.saf_lease or not store.heartbeat_interval < store.orphan_after:
        raise ConfigError("store.heartbeat_interval: must be shorter than store.saf_lease and store.orphan_after")
    if store.pool_size < 1:
        raise ConfigError("store.pool_size: must be at least 1")
    if store.synchronous not in {"FULL", "NORMAL", "OFF"}:
        raise ConfigError("store.synchronous: expected FULL, NORMAL or OFF")
    if not store.commit_delay <= MAX_COMMIT_DELAY:  # also refuses nan
        raise ConfigError(f"store.commit_delay: at most {MAX_COMMIT_DELAY} seconds")

    r = _table(doc, "reversal")
    rd = ReversalConfig()
    _check_unknown(r, "reversal", set(ReversalConfig.__slots__))  # type: ignore[attr-defined]
    backoff = r.get("backoff", list(rd.backoff))
    if not isinstance(backoff, list) or not backoff or not all(
        isinstance(b, int | float) and b >= 0 for b in backoff
    ):
        raise ConfigError("reversal.backoff: expected a non-empty list of seconds")
    reversal = ReversalConfig(
        max_attempts=_get(r, "max_attempts", "reversal", int, rd.max_attempts),
        backoff=tuple(float(b) for b in backoff),
        poll_interval=_get(r, "poll_interval", "reversal", float, rd.poll_interval),
        unknown_original_rc=_get(r, "unknown_original_rc", "reversal", str, rd.unknown_original_rc),
        original_wait=_get(r, "original_wait", "reversal", float, rd.original_wait),
        repeat=_get(r, "repeat", "reversal", str, rd.repeat),
        upstream_mti=_get(r, "upstream_mti", "reversal", str, rd.upstream_mti),
    )
    if reversal.repeat not in {"identical", "fresh"}:
        raise ConfigError("reversal.repeat: expected identical or fresh")
    if reversal.upstream_mti not in {"0400", "0420"}:
        raise ConfigError("reversal.upstream_mti: expected 0400 or 0420")
    if reversal.unknown_original_rc not in {"00", "25"}:
        raise ConfigError("reversal.unknown_original_rc: expected 00 or 25")
    if reversal.max_attempts < 1:
        raise ConfigError("reversal.max_attempts: must be at least 1")
    _positive(reversal, "reversal", ("poll_interval",))
    if reversal.original_wait < host.timeout:
        # a terminal reversal must wait out its original's host exchange, or its 0400 could overtake it
        raise ConfigError("reversal.original_wait: must be at least host.timeout")

    lim = _table(doc, "limits")
    ld = LimitsConfig()
    _check_unknown(lim, "limits", set(LimitsConfig.__slots__))  # type: ignore[attr-defined]
    limits = LimitsConfig(
        per_transaction=_get(lim, "per_transaction", "limits", int, ld.per_transaction),
        per_day=_get(lim, "per_day", "limits", int, ld.per_day),
    )

    a = _table(doc, "admin")
    _check_unknown(a, "admin", set(AdminConfig.__slots__))  # type: ignore[attr-defined]
    admin_listen = _get(a, "listen", "admin", str, "127.0.0.1:9100")
    admin = AdminConfig(
        listen=Endpoint.parse(admin_listen, "admin.listen") if admin_listen else None,
        metrics=_get(a, "metrics", "admin", bool, True),
    )

    terminals_raw = doc.get("terminals", [])
    if not isinstance(terminals_raw, list):
        raise ConfigError("terminals: expected an array of tables ([[terminals]])")
    terminals = []
    for i, entry in enumerate(terminals_raw):
        path = f"terminals[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: expected a table")
        _check_unknown(entry, path, {"terminal_id", "merchant_id", "tmk"})
        tid = _get(entry, "terminal_id", path, str, "")
        mid = _get(entry, "merchant_id", path, str, "")
        if len(tid) != 8:
            raise ConfigError(f"{path}.terminal_id: expected 8 characters")
        if len(mid) != 15:
            raise ConfigError(f"{path}.merchant_id: expected 15 characters")
        terminals.append(TerminalEntry(tid, mid, _get(entry, "tmk", path, str, "") or None))

    return GatewayConfig(terminal_side, host, security, store, reversal, limits, admin, tuple(terminals))


#: environment overrides: GATEWAY_<SECTION>__<KEY>=value (values parsed as TOML scalars when they can be)
ENV_PREFIX = "GATEWAY_"


def _env_overrides(doc: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in doc.items()}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string such as an address
        table = merged.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: {section} is not a table")
        table[key] = value
    return merged


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read the TOML file (or only defaults when `path` is None) and apply environment overrides."""
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(_env_overrides(doc, os.environ if environ is None else environ))
