"""Configuration: defaults, a full file, environment overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, Endpoint, load_config, parse_config

FULL = """
[terminal_side]
listen = "127.0.0.1:7000"
max_connections = 5
idle_timeout = 12

[host]
address = "[::1]:7001"
timeout = 2.5
match_key = ["mti_class", "stan"]

[security]
terminal_mac = "x919"
key_mode = "003"

[store]
path = "/tmp/j.db"
synchronous = "normal"

[reversal]
max_attempts = 3
backoff = [0.1, 0.2]

[limits]
per_transaction = 1000
per_day = 5000

[[terminals]]
terminal_id = "10000001"
merchant_id = "898100012340001"
"""


def test_defaults_without_a_file() -> None:
    cfg = load_config(None, environ={})
    assert cfg.terminal_side.dialect == "cup-pos"
    assert cfg.host.dialect == "iso87-ascii"
    assert cfg.host.match_key == ("mti_class", "stan", "terminal")
    assert cfg.terminals == ()


def test_full_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(FULL)
    cfg = load_config(path, environ={})
    assert cfg.terminal_side.listen == Endpoint("127.0.0.1", 7000)
    assert cfg.terminal_side.idle_timeout == 12.0
    assert cfg.host.address == Endpoint("::1", 7001)
    assert cfg.host.timeout == 2.5
    assert cfg.host.match_key == ("mti_class", "stan")
    assert cfg.security.key_mode == "003"
    assert cfg.store.synchronous == "NORMAL"
    assert cfg.reversal.backoff == (0.1, 0.2)
    assert cfg.limits.per_day == 5000
    assert cfg.terminal("10000001") is not None
    assert cfg.terminal("99999999") is None


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(FULL)
    cfg = load_config(path, environ={"GATEWAY_HOST__TIMEOUT": "7", "GATEWAY_STORE__PATH": "/data/x.db"})
    assert cfg.host.timeout == 7.0
    assert cfg.store.path == Path("/data/x.db")


@pytest.mark.parametrize(
    ("doc", "named"),
    [
        ({"host": {"timeout": "soon"}}, "host.timeout"),
        ({"host": {"timeout": 0}}, "host.timeout"),
        ({"host": {"address": "nocolon"}}, "host.address"),
        ({"host": {"match_key": ["pan"]}}, "host.match_key"),
        ({"host": {"match_key": ["mti_class", "terminal"]}}, "host.match_key"),
        ({"terminal_side": {"max_in_flight_per_connection": 0}}, "terminal_side.max_in_flight_per_connection"),
        ({"terminal_side": {"write_timeout": 0}}, "terminal_side.write_timeout"),
        ({"host": {"timeout": 20}}, "reversal.original_wait"),
        ({"terminal_side": {"max_connections": True}}, "terminal_side.max_connections"),
        ({"terminal_side": {"listen": "127.0.0.1:99999"}}, "terminal_side.listen"),
        ({"security": {"key_mode": "002"}}, "security.key_mode"),
        ({"reversal": {"backoff": []}}, "reversal.backoff"),
        ({"reversal": {"unknown_original_rc": "12"}}, "reversal.unknown_original_rc"),
        ({"limits": {"per_day": -1}}, "limits.per_day"),
        ({"store": {"commit_delay": 0.5}}, "store.commit_delay"),
        ({"store": {"commit_delay": -0.001}}, "store.commit_delay"),
        ({"store": {"commit_delay": float("nan")}}, "store.commit_delay"),
        ({"terminals": [{"terminal_id": "123", "merchant_id": "898100012340001"}]}, "terminals[0].terminal_id"),
        ({"hots": {}}, "hots"),
        ({"terminal_side": {"dialect": "iso87-ascii"}}, "terminal_side.dialect"),
        ({"host": {"dialect": "cup-pos"}}, "host.dialect"),
        ({"host": {"timout": 1}}, "host.timout"),
        ({"store": {"url": "mysql://db/x"}}, "store.url"),
        ({"store": {"saf_lease": 0}}, "store.saf_lease"),
        ({"store": {"heartbeat_interval": 20}}, "store.heartbeat_interval"),
        ({"store": {"pool_size": 0}}, "store.pool_size"),
        ({"reversal": {"repeat": "new"}}, "reversal.repeat"),
        ({"reversal": {"upstream_mti": "0401"}}, "reversal.upstream_mti"),
    ],
)
def test_bad_values_name_the_key(doc: dict, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert str(err.value).startswith(named)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[host\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, environ={})
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml", environ={})


def test_the_example_config_parses() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "gateway.toml"
    cfg = load_config(example, environ={})
    assert cfg.terminals[0].terminal_id == "10000001"
    assert cfg.store.synchronous == "FULL"
    assert cfg.store.commit_delay == 0.002


def test_postgres_store_and_reversal_options() -> None:
    cfg = parse_config({"store": {"url": "postgresql://gw@127.0.0.1/gw", "instance_id": "gw-a", "saf_lease": 20},
                        "reversal": {"repeat": "fresh", "upstream_mti": "0420"}})
    assert (cfg.store.url, cfg.store.instance_id, cfg.store.saf_lease) == ("postgresql://gw@127.0.0.1/gw", "gw-a", 20.0)
    assert (cfg.reversal.repeat, cfg.reversal.upstream_mti) == ("fresh", "0420")
    defaults = parse_config({})
    assert (defaults.store.url, defaults.reversal.repeat, defaults.reversal.upstream_mti) == (None, "identical", "0400")
