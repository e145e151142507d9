"""Configuration errors name the key and never the value of a secret (a key in a CI log or a ticket is
a key to rotate), and odd shapes (a table where an id belongs) are problems, not tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config

ZMK = "11111111111111112222222222222222"  # digits only: TOML reads it as an integer, not a string
TMK = "0123456789ABCDEF0123456789ABCDEF"


def problems(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ or {})
    return list(caught.value.problems)


def test_a_secret_of_the_wrong_type_is_named_but_never_shown(tmp_path: Path) -> None:
    found = problems(tmp_path, f'[security]\nzmk = {ZMK}\n[store]\npan_hash_key_hex = {ZMK}\n'
                               f'[[terminals]]\nterminal_id = "10000001"\nmerchant_id = "898100012340001"\n'
                               f'tmk = ["{TMK}"]\n')
    assert {p.split(":")[0] for p in found} == {"security.zmk", "store.pan_hash_key_hex", "terminals[0].tmk"}
    text = "\n".join(found)
    assert ZMK not in text and TMK not in text, text


def test_serve_prints_no_secret_of_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(f"[security]\nzmk = {ZMK}\n")
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "security.zmk" in done.stdout + done.stderr
    assert ZMK not in done.stdout + done.stderr


@pytest.mark.parametrize("value", ["[1]", "{ a = 1 }", "[[1, 2]]"])
def test_a_terminal_id_that_is_no_text_is_a_problem_not_a_crash(tmp_path: Path, value: str) -> None:
    entry = f'[[terminals]]\nterminal_id = {value}\nmerchant_id = "898100012340001"\n'
    found = problems(tmp_path, entry * 2)
    assert found and all(p.startswith("terminals[") for p in found), found


def test_a_list_item_from_the_environment_names_its_variable(tmp_path: Path) -> None:
    found = problems(tmp_path, "", {"GATEWAY_HOST__MATCH_KEY": '["stan", "x"]'})
    assert found == ["host.match_key[1]: Input should be 'mti_class', 'stan' or 'terminal' [got 'x'] "
                     "(from GATEWAY_HOST__MATCH_KEY)"]
