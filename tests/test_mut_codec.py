"""Every check of tests/test_codec.py, run on the pure-Python codec (`PureCodec`) in this process.

`Codec` picks the compiled codec wherever it is built, so test_codec.py alone never runs the pure
walker: a bug there (the specification, the oracle of the differential tests and the fallback on a
machine without a C compiler) would go unnoticed, which is what mutation testing (issue 16) showed.
This module loads test_codec.py a second time with the import-time selection set to pure (as
`GATEWAY_CODEC=pure` does, but in process), so the same promises are asserted of both codecs; the
tests below it cover what test_codec.py does not reach in the pure walker.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from gateway.iso import _compiled
from gateway.iso.codec import Codec
from gateway.iso.spec import load_dialect


def _load_pure_copy() -> ModuleType:
    source = Path(__file__).with_name("test_codec.py")
    spec = importlib.util.spec_from_file_location("test_codec_on_pure", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = _compiled.COMPILED
    _compiled.COMPILED = None  # the selection `Codec(...)` consults: what GATEWAY_CODEC=pure yields
    try:
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        _compiled.COMPILED = saved
    return module


_pure = _load_pure_copy()
assert _pure.CUP.implementation == "pure" and _pure.ISO87.implementation == "pure"

# the same test functions (with their parametrisation, which names the pure codecs), collected here
globals().update({name: obj for name, obj in vars(_pure).items() if name.startswith("test_")})


@pytest.fixture(autouse=True)
def fresh_pure_codecs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets pure codecs built inside it, with empty plan caches: codecs built once at import
    would answer every later test from plans cached by the first, so a broken bitmap walk or check
    selection would go unseen. The objects are refilled in place because the parametrised tests hold
    them since collection."""
    monkeypatch.setattr(_compiled, "COMPILED", None)
    for name, dialect in (("CUP", "cup-pos"), ("ISO87", "iso87-ascii")):
        fresh = Codec(load_dialect(dialect))
        assert fresh.implementation == "pure"
        held = getattr(_pure, name)
        for slot in ("decode", "dialect", "encode", "implementation", "lenient"):
            setattr(held, slot, getattr(fresh, slot))
