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
        ({"trace": {"max_files": 0}}, "trace.max_files"),
        ({"trace": {"max_bytes": "big"}}, "trace.max_bytes"),
        ({"store": {"commit_delay": 0.5}}, "store.commit_delay"),
        ({"store": {"commit_delay": -0.001}}, "store.commit_delay"),
        ({"store": {"commit_delay": float("nan")}}, "store.commit_delay"),
        ({"store": {"max_refusals": 0}}, "store.max_refusals"),
        ({"store": {"max_refusals": "many"}}, "store.max_refusals"),
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
        ({"terminal_side": {"frame_timeout": 0}}, "terminal_side.frame_timeout"),
        ({"terminal_side": {"tls": {"key": "k.pem"}}}, "terminal_side.tls.cert"),
        ({"terminal_side": {"tls": {"cert": "c", "key": "k", "client_certs": "required"}}}, "terminal_side.tls"),
        ({"host": {"tls": {"min_version": "1.0"}}}, "host.tls.min_version"),
        ({"host": {"tls": {"cert": "c.pem"}}}, "host.tls"),
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


def test_every_problem_is_reported_at_once() -> None:
    doc = {
        "host": {"timeout": "soon", "address": "nocolon", "timout": 1},
        "security": {"key_mode": "002"},
        "hots": {},
        "terminals": [{"terminal_id": "123", "merchant_id": "898100012340001"}],
    }
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    keys = [problem.split(":")[0] for problem in err.value.problems]
    assert sorted(keys) == ["host.address", "host.timeout", "host.timout", "hots", "security.key_mode",
                            "terminals[0].terminal_id"]
    assert "host.timeout: Input should be a valid number [got 'soon']" in err.value.problems
    assert "host.timout: unknown key" in err.value.problems
    assert str(err.value).count("\n") == len(keys) - 1


def test_an_environment_value_names_its_variable(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(FULL)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={"GATEWAY_HOST__TIMEOUT": "soon", "GATEWAY_LIMITS__PER_DAY": "-5",
                                   "GATEWAY_HOTS__X": "1"})
    assert err.value.problems == (
        "host.timeout: Input should be a valid number [got 'soon'] (from GATEWAY_HOST__TIMEOUT)",
        "limits.per_day: Input should be greater than or equal to 0 [got -5] (from GATEWAY_LIMITS__PER_DAY)",
        "hots: unknown section (from GATEWAY_HOTS__X)",
    )


def test_environment_text_stays_text() -> None:
    # "004" is not a TOML number and 1234 is one; both must arrive as the text the variable holds
    cfg = load_config(None, environ={"GATEWAY_SECURITY__KEY_MODE": "003", "GATEWAY_HOST__ACQUIRER_ID": "1234",
                                     "GATEWAY_ADMIN__LISTEN": '""', "GATEWAY_TERMINAL_SIDE__LISTEN": "[::1]:5001",
                                     "GATEWAY_HOST__KEY_EXCHANGE": "false", "GATEWAY_LMK": "not a config key"})
    assert cfg.security.key_mode == "003"
    assert cfg.host.acquirer_id == "1234"
    assert cfg.admin.listen is None
    assert cfg.terminal_side.listen == Endpoint("::1", 5001)
    assert cfg.host.key_exchange is False


def test_duplicate_terminals_are_refused_with_the_rest() -> None:
    entry = {"terminal_id": "10000001", "merchant_id": "898100012340001"}
    with pytest.raises(ConfigError) as err:
        parse_config({"terminals": [entry, {"terminal_id": "10000002", "merchant_id": "1"}, dict(entry)]})
    assert err.value.problems == (
        "terminals[1].merchant_id: String should have at least 15 characters [got '1']",
        "terminals: duplicate terminal_id 10000001: terminals[2] repeats terminals[0]",
    )
    with pytest.raises(ConfigError, match=r"^terminals: duplicate terminal_id 10000001"):
        parse_config({"terminals": [entry, dict(entry)]})


def test_sections_check_values_when_code_builds_them_too() -> None:
    import dataclasses

    from pydantic import ValidationError

    from gateway.config import HostConfig

    host = HostConfig(timeout=3)
    assert host.timeout == 3.0
    assert dataclasses.replace(host, timeout=4.5).timeout == 4.5
    with pytest.raises(ValidationError):
        HostConfig(timeout=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        host.timeout = 1.0  # type: ignore[misc]


def test_the_document_masks_secrets_and_reads_back() -> None:
    from gateway.config import MASK, to_document

    doc = {"security": {"zmk": "0123456789ABCDEFFEDCBA9876543210"}, "store": {"pan_hash_key_hex": "11" * 32},
           "admin": {"listen": ""},
           "terminals": [{"terminal_id": "10000001", "merchant_id": "898100012340001", "tmk": "AB" * 16}]}
    cfg = parse_config(doc)
    shown = to_document(cfg)
    assert shown["security"]["zmk"] == MASK
    assert shown["store"]["pan_hash_key_hex"] == MASK
    assert shown["terminals"][0]["tmk"] == MASK
    assert shown["security"]["keystore"] == ""
    assert "AB" * 16 not in repr(shown) and "0123456789ABCDEF" not in repr(shown)
    assert parse_config(to_document(cfg, mask_secrets=False)) == cfg


def test_postgres_store_and_reversal_options() -> None:
    cfg = parse_config({"store": {"url": "postgresql://gw@127.0.0.1/gw", "instance_id": "gw-a", "saf_lease": 20},
                        "reversal": {"repeat": "fresh", "upstream_mti": "0420"}})
    assert (cfg.store.url, cfg.store.instance_id, cfg.store.saf_lease) == ("postgresql://gw@127.0.0.1/gw", "gw-a", 20.0)
    assert (cfg.reversal.repeat, cfg.reversal.upstream_mti) == ("fresh", "0420")
    defaults = parse_config({})
    assert (defaults.store.url, defaults.reversal.repeat, defaults.reversal.upstream_mti) == (None, "identical", "0400")
