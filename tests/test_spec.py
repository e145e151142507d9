"""Dialect spec files: the shipped dialects express the reference's wire rules, lookup order
(installed wheel first, then source checkout), a user-written third dialect works, and every kind of
malformed file fails with a SpecError naming the key."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

import pytest

import gateway
from gateway.iso import spec as spec_module
from gateway.iso.codec import Codec
from gateway.iso.errors import SpecError
from gateway.iso.message import Message
from gateway.iso.spec import load_dialect, spec_dirs

REPO_SPECS = Path(__file__).resolve().parents[1] / "specs"
CUP_TEXT = (REPO_SPECS / "cup-pos.toml").read_text(encoding="utf-8")


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spec_module, "_cache", {})


def test_cup_dialect_rules() -> None:
    d = load_dialect("cup-pos")
    s = d.spec
    assert d.name == "cup-pos" and d.default_framing == "cup"
    assert s["h"]["max_len"] == 0
    assert s["t"]["data_enc"] == "b" and s["p"]["data_enc"] == "b" and s["p"]["max_len"] == 8
    assert "1" not in s and not d.secondary_bitmap
    assert all(int(k) <= 64 for k in d.fields)
    # fixed odd n: right-justified (leading pad) except 22 which is left-justified
    assert s["23"].get("left_pad") == "0" and "right_pad" not in s["23"]
    assert s["22"].get("right_pad") == "0" and "left_pad" not in s["22"]
    # variable n / z: BCD length prefixes counting digits, left-justified
    for key, len_type in (("2", 1), ("32", 1), ("35", 1), ("36", 2), ("48", 2), ("60", 2), ("61", 2)):
        assert s[key]["len_enc"] == "bcd" and s[key]["len_type"] == len_type
        assert s[key]["len_count"] == "nibbles" and s[key]["right_pad"] == "0"
    # an / ans / b variable fields count bytes
    for key in ("44", "54", "55", "62", "63"):
        assert s[key]["len_enc"] == "bcd" and s[key].get("len_count", "bytes") == "bytes"
    assert d.formats["35"] == d.formats["36"] == "z"
    assert s["64"] == {**s["64"], "data_enc": "b", "max_len": 8, "len_type": 0}  # 8 binary bytes
    assert (d.mac_field, d.mac_fields, d.mac_wire_len) == ("64", ("64",), 8)
    assert d.binary_fields == {"52", "55", "62", "64"}
    # reference §7 item 3: the parser accepts the larger maximum
    assert (s["44"]["max_len"], s["54"]["max_len"], s["60"]["max_len"], s["62"]["max_len"]) == (
        40,
        40,
        999,
        512,
    )


def test_iso87_dialect_rules() -> None:
    d = load_dialect("iso87-ascii")
    s = d.spec
    assert s["t"]["data_enc"] == "ascii" and s["t"]["max_len"] == 4
    assert s["p"]["max_len"] == 16 and s["1"]["max_len"] == 16
    assert set(d.fields) == {str(k) for k in range(2, 129)} - {"65"}
    for key in ("52", "64", "96", "128"):
        assert s[key]["data_enc"] == "ascii" and s[key]["max_len"] == 16 and d.formats[key] == "b"
    assert (s["70"]["max_len"], d.formats["70"]) == (3, "n")
    assert (s["90"]["max_len"], d.formats["90"]) == (42, "n")
    assert (s["48"]["len_type"], s["48"]["max_len"], d.formats["48"]) == (3, 999, "ans")
    assert (s["2"]["len_type"], s["35"]["len_type"], d.formats["35"]) == (2, 2, "z")
    assert all(f["len_enc"] == "ascii" for f in s.values())
    assert (d.mac_fields, d.mac_wire_len) == (("64", "128"), 16)
    assert d.mac_field_for(["3", "4"]) == "64" and d.mac_field_for(["3", "90"]) == "128"


def test_mtis_come_from_the_file() -> None:
    d = load_dialect("cup-pos")
    assert {"0200", "0210", "0400", "0401", "0500", "0620", "0800", "0830"} <= d.mtis
    assert not {"0700", "1200", "0260", "0206"} & d.mtis


def test_load_is_cached_and_dialect_is_immutable() -> None:
    d = load_dialect("cup-pos")
    assert load_dialect("cup-pos") is d
    with pytest.raises(AttributeError):
        d.name = "x"  # type: ignore[misc]


def test_lookup_order_installed_specs_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_cache: None
) -> None:
    # simulate an installed wheel: <site>/gateway/__init__.py with specs force-included as gateway/_specs
    package = tmp_path / "site" / "gateway"
    (package / "_specs").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    checkout_specs = tmp_path / "site" / "specs"
    checkout_specs.mkdir()
    shutil.copy(REPO_SPECS / "cup-pos.toml", checkout_specs / "cup-pos.toml")
    installed = CUP_TEXT.replace('description = "CUP POS', 'description = "INSTALLED CUP POS')
    (package / "_specs" / "cup-pos.toml").write_text(installed, encoding="utf-8")
    monkeypatch.setattr(gateway, "__file__", str(package / "__init__.py"))

    assert spec_dirs() == (package.resolve() / "_specs", package.resolve().parent / "specs")
    assert load_dialect("cup-pos").description.startswith("INSTALLED")
    (package / "_specs" / "cup-pos.toml").unlink()
    monkeypatch.setattr(spec_module, "_cache", {})
    assert load_dialect("cup-pos").source == (checkout_specs / "cup-pos.toml").resolve()


def test_source_checkout_lookup() -> None:
    assert spec_dirs()[1] == REPO_SPECS
    assert load_dialect("iso87-ascii").source == REPO_SPECS / "iso87-ascii.toml"


def test_unknown_dialect_name(fresh_cache: None) -> None:
    with pytest.raises(SpecError, match="unknown dialect 'nope'"):
        load_dialect("nope")
    with pytest.raises(SpecError, match="not found"):
        load_dialect("/nonexistent/dir/mine.toml")
    with pytest.raises(SpecError):
        load_dialect("")


THIRD_DIALECT = """
[dialect]
name = "tiny-bcd"
description = "a made-up dialect: BCD MTI, binary bitmaps with a secondary one, binary lengths"
default_framing = "len2"
mac_field = "128"
mac_wire_len = 8

[dialect.mti]
versions = ["0"]
classes = ["2", "8"]
functions = ["0", "1"]
origins = ["0"]

[fields]
h = { data_enc = "b", len_enc = "b", len_type = 0, max_len = 0 }
t = { fmt = "n", data_enc = "b", len_enc = "b", len_type = 0, max_len = 2 }
p = { fmt = "b", data_enc = "b", len_enc = "b", len_type = 0, max_len = 8 }
1 = { fmt = "b", data_enc = "b", len_enc = "b", len_type = 0, max_len = 8 }
3 = { fmt = "n", data_enc = "b", len_enc = "b", len_type = 0, max_len = 6, len_count = "nibbles" }
43 = { fmt = "ans", data_enc = "cp500", len_enc = "b", len_type = 1, max_len = 40 }
70 = { fmt = "n", data_enc = "ascii", len_enc = "ascii", len_type = 0, max_len = 3 }
128 = { fmt = "b", data_enc = "b", len_enc = "b", len_type = 0, max_len = 8 }

[fields.2]  # a standard table works as well as an inline one
fmt = "n"
data_enc = "b"
len_enc = "b"
len_type = 1
max_len = 19
len_count = "nibbles"
left_pad = "F"
"""


def test_third_dialect_from_a_path(tmp_path: Path, fresh_cache: None) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(THIRD_DIALECT, encoding="utf-8")
    d = load_dialect(str(path))
    assert d.name == "tiny-bcd" and d.secondary_bitmap and d.mtis == {"0200", "0210", "0800", "0810"}
    codec = Codec(d)
    msg = Message("0800", {"2": "12345", "3": "990000", "43": "EBCDIC text", "70": "301", "128": "00" * 8})
    body = codec.encode(msg)
    assert body[10 + 8 : 10 + 8 + 4] == bytes.fromhex("05F12345")  # binary length, left 'F' pad
    assert "EBCDIC text".encode("cp500") in body
    assert codec.decode(body).fields == msg.fields
    assert load_dialect(str(path)) is d


def _broken(tmp_path: Path, text: str) -> SpecError:
    path = tmp_path / "broken.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError) as err:
        load_dialect(str(path))
    assert str(path) in str(err.value)
    return err.value


def _edit(pattern: str, replacement: str) -> str:
    edited, count = re.subn(pattern, replacement, CUP_TEXT, count=1, flags=re.MULTILINE)
    assert count == 1, pattern
    return edited


@pytest.mark.parametrize(
    ("pattern", "replacement", "key"),
    [
        (r'^name = "cup-pos"', 'name = "Cup POS"', "dialect.name"),
        (r'^default_framing = "cup"', 'default_framing = "x25"', "dialect.default_framing"),
        (r"^mac_wire_len = 8", "mac_wire_len = 16", "fields.64"),
        (r'^mac_field = "64"', 'mac_field = "63"', "dialect.mac_fields"),
        (r'^mac_fields = \["64"\]', 'mac_fields = ["62"]', "dialect.mac_fields"),
        (r"^classes = \[.*\]", "classes = []", "dialect.mti.classes"),
        (r"^classes = \[.*\]", 'classes = ["12"]', "dialect.mti.classes"),
        (r"^\[dialect.mti\]", "[dialect.mtx]", "dialect.mtx"),
        (
            r"^h = \{ data_enc = \"b\", len_enc = \"b\", len_type = 0, max_len = 0",
            'h = { data_enc = "b", len_enc = "b", len_type = 0, max_len = 2',
            "fields.h.max_len",
        ),
        (
            r"^p = \{ fmt = \"b\", data_enc = \"b\", len_enc = \"b\", len_type = 0, max_len = 8",
            'p = { fmt = "b", data_enc = "b", len_enc = "b", len_type = 0, max_len = 16',
            "fields.p.max_len",
        ),
        (r'^35 = \{ fmt = "z"', '35 = { fmt = "track"', "fields.35.fmt"),
        (r'^4 = \{ fmt = "n", data_enc = "b"', '4 = { fmt = "n", data_enc = "bcd"', "fields.4.data_enc"),
        (
            r'^4 = \{ fmt = "n", data_enc = "b", len_enc = "b"',
            '4 = { fmt = "n", data_enc = "b", len_enc = "utf-99"',
            "fields.4.len_enc",
        ),
        (
            r'^2 = \{ fmt = "n", data_enc = "b", len_enc = "bcd", len_type = 1',
            '2 = { fmt = "n", data_enc = "b", len_enc = "bcd", len_type = 9',
            "fields.2.len_type",
        ),
        (r"len_type = 1, max_len = 19", "len_type = 1, max_len = 190", "fields.2.max_len"),
        (r"len_type = 1, max_len = 19", 'len_type = 1, max_len = "19"', "fields.2.max_len"),
        (
            r'max_len = 19, len_count = "nibbles", right_pad = "0"',
            'max_len = 19, len_count = "nibbles"',
            "fields.2",
        ),
        (
            r'max_len = 19, len_count = "nibbles", right_pad = "0"',
            'max_len = 19, len_count = "digits", right_pad = "0"',
            "fields.2.len_count",
        ),
        (
            r'max_len = 19, len_count = "nibbles", right_pad = "0"',
            'max_len = 19, len_count = "nibbles", right_pad = "00"',
            "fields.2.right_pad",
        ),
        (
            r'max_len = 19, len_count = "nibbles", right_pad = "0"',
            'max_len = 19, len_count = "nibbles", right_pad = "0", left_pad = "0"',
            "fields.2.right_pad",
        ),
        (
            r'max_len = 6, len_count = "nibbles", left_pad = "0", desc = "Processing code"',
            'max_len = 6, left_pad = "0"',
            "fields.3.left_pad",
        ),
        (
            r'^37 = \{ fmt = "an", data_enc = "ascii"',
            '37 = { fmt = "an", data_enc = "ascii", len_count = "nibbles"',
            "fields.37.len_count",
        ),
        (r'^41 = \{ fmt = "ans"', '41 = { fmt = "ans", colour = "red"', "fields.41.colour"),
        (r'^41 = \{ fmt = "ans", ', "41 = { ", "fields.41.fmt"),
        (r"^41 = \{", "141 = {", "fields.141"),
        (r"^41 = \{", "65 = {", "fields.65"),
        (r"^41 = \{", "70 = {", "fields.70"),
        (r"^41 = \{", "041 = {", "fields.041"),
        (r"^\[fields\]", "[fieldz]", "fieldz"),
        (r"^t = \{.*\}$", "", "fields.t"),
    ],
)
def test_bad_spec_names_the_key(
    tmp_path: Path, fresh_cache: None, pattern: str, replacement: str, key: str
) -> None:
    err = _broken(tmp_path, _edit(pattern, replacement))
    assert err.key == key, str(err)
    assert f"{key}:" in str(err)


def test_not_toml(tmp_path: Path, fresh_cache: None) -> None:
    err = _broken(tmp_path, "[dialect\nname = 1")
    assert "not valid TOML" in str(err)


def test_name_must_match_file_name_when_looked_up_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_cache: None
) -> None:
    (tmp_path / "other.toml").write_text(CUP_TEXT, encoding="utf-8")
    monkeypatch.setattr(spec_module, "spec_dirs", lambda: (tmp_path,))
    with pytest.raises(SpecError) as err:
        load_dialect("other")
    assert err.value.key == "dialect.name"


def test_shipped_files_are_plain_toml_with_a_field_per_line() -> None:
    for name in ("cup-pos", "iso87-ascii"):
        raw = tomllib.loads((REPO_SPECS / f"{name}.toml").read_text(encoding="utf-8"))
        assert raw["dialect"]["name"] == name
        assert {"h", "t", "p"} <= raw["fields"].keys()
